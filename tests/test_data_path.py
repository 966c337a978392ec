"""The data path of issue 15: one recipe for every backend, the two-stage route for images of any size (multi-crop
included), its determinism (workers, resume) and its statistics against the per-image torchvision pipeline."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageOps
from torch.utils.data import default_collate
from torchvision import transforms as T

from conftest import tiny_config
from selfsup.data import batch_augment as A
from selfsup.data import recipes as R
from selfsup.data.pipeline import StagedViews, training_views
from selfsup.data.transforms import PerImageViews, pil_transform
from selfsup.engine.trainer import Trainer

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    grid = np.sort(np.concatenate([a, b]))
    fa = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    fb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(fa - fb).max())


def photo(height: int = 60, width: int = 80, seed: int = 0) -> Image.Image:
    """A smooth colour image with an edge (structure for crops and blurs to act on)."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    rng = np.random.default_rng(seed)
    image = np.stack([np.sin(6 * x + rng.uniform(0, 3)), np.cos(5 * y), x * y], axis=-1) * 0.5 + 0.5
    image[:, width // 2:] *= 0.6
    return Image.fromarray((image * 255).round().astype(np.uint8))


# ---------------------------------------------------------------------------------------------- one recipe


def test_every_backend_is_built_from_the_one_recipe():
    recipe = R.aug_plus().resolved(32, (0.3, 1.0), flip=True, blur=True)
    pil = pil_transform(recipe).transforms
    assert [type(t).__name__ for t in pil] == ["RandomResizedCrop", "RandomApply", "RandomGrayscale", "RandomApply",
                                               "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert pil[0].scale == (0.3, 1.0) and pil[1].p == 0.8 and pil[3].transforms[0].sigma == pytest.approx(
        (0.1 * 32 / 224, 2.0 * 32 / 224))
    batch = A.batch_augment(recipe)
    assert (batch.size, batch.scale, batch.jitter, batch.jitter_p, batch.gray_p, batch.gray_first, batch.blur_p,
            batch.blur_kernel) == (32, (0.3, 1.0), (0.4, 0.4, 0.4, 0.1), 0.8, 0.2, False, 0.5, 3)
    assert A.batch_augment(R.moco_v1().resolved(32, (0.2, 1.0), True, True)).gray_first  # grey before jitter
    off = R.aug_plus().resolved(32, (0.2, 1.0), flip=False, blur=False)
    assert off.op(R.Flip) is None and off.op(R.GaussianBlur) is None
    strong = R.mugs_strong("s", 24, (0.25, 1.0), erase_p=0.25).resolved(32, (0.2, 1.0), True, True)
    assert [type(t).__name__ for t in pil_transform(strong).transforms] == [
        "RandomHorizontalFlip", "TorchSeeded", "RandomResizedCrop", "ToTensor", "RandomErasing", "Normalize"]
    with pytest.raises(Exception, match="RandAugment"):
        A.batch_augment(strong)  # RandAugment is a stage-1 op: no on-device crop for it
    assert A.batch_augment(strong, geometry=False).erase_p == 0.25


def test_stage_two_after_the_crop_equals_the_whole_batched_recipe():
    """Stage 2 (``geometry=False``) on crops made with the same parameters gives the batched recipe's output, which
    tests/test_batch_augment.py checks against torchvision's functional ops."""
    recipe = R.dino_weak("w", None, (0.3, 1.0), blur_p=0.5, solarize_p=0.5).resolved(24, (0.2, 1.0), True, True)
    recipe = R.Recipe(recipe.name, tuple(R.ResizedCrop(24, (0.3, 1.0)) if isinstance(op, R.ResizedCrop) else op
                                         for op in recipe.ops))  # bilinear, for the on-device crop
    whole, stage2 = A.batch_augment(recipe), A.batch_augment(recipe, geometry=False)
    x = torch.rand(12, 3, 30, 36, generator=torch.Generator().manual_seed(0))
    params = whole.sample(12, 30, 36, torch.Generator().manual_seed(1))
    cropped = A.resized_crop_flip(x, params.boxes, params.flip, 24)
    torch.testing.assert_close(stage2.apply(cropped, params), whole.apply(x, params), atol=1e-6, rtol=0)


def test_random_erasing_matches_torchvision_and_its_law():
    x = torch.rand(5, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(5, 3, 20, 24, generator=torch.Generator().manual_seed(1))
    boxes = torch.tensor([[0, 0, 5, 7], [3, 4, 10, 2], [19, 23, 1, 1], [2, 2, 4, 4], [0, 0, 20, 24]])
    mask = torch.tensor([True, True, True, False, True])
    out = A.erase(x, boxes, mask, noise)
    for i in range(5):
        top, left, h, w = boxes[i].tolist()
        expected = TF.erase(x[i], top, left, h, w, noise[i, :, top:top + h, left:left + w]) if mask[i] else x[i]
        torch.testing.assert_close(out[i], expected, atol=0, rtol=0)
    n = 8000
    ours, found = A.sample_erase_boxes(n, 32, 48, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    image = torch.zeros(3, 32, 48)
    ref = [T.RandomErasing.get_params(image, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=[0.0]) for _ in range(n)]
    ref = torch.tensor([r[:4] for r in ref])
    ref_found = ~((ref[:, 2] == 32) & (ref[:, 3] == 48))
    assert abs(found.double().mean() - ref_found.double().mean()) < 4 * math.sqrt(0.25 / n)
    bound = 2.0 * math.sqrt(2 / n)  # KS at p < 0.001
    ours, ref = ours[found].double(), ref[ref_found].double()
    assert ks((ours[:, 2] * ours[:, 3]).numpy(), (ref[:, 2] * ref[:, 3]).numpy()) < bound
    assert ks(torch.log(ours[:, 2] / ours[:, 3]).numpy(), torch.log(ref[:, 2] / ref[:, 3]).numpy()) < bound
    assert ks((ours[:, 0] / (32 - ours[:, 2] + 1)).numpy(), (ref[:, 0] / (32 - ref[:, 2] + 1)).numpy()) < bound


def test_batched_solarise_inverts_the_same_uint8_values_as_pil():
    recipe = R.Recipe("sol", (R.ResizedCrop(16, (1.0, 1.0), (1.0, 1.0)), R.Solarize(1.0)))
    image = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).convert("RGB")
    reference = TF.pil_to_tensor(ImageOps.solarize(image, 128)).float() / 255
    stage2 = A.batch_augment(recipe, MEAN, STD, geometry=False)
    out = stage2(TF.pil_to_tensor(image)[None], torch.Generator().manual_seed(0))[0]
    out = out * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
    torch.testing.assert_close(out, reference, atol=1e-6, rtol=0)


def test_stage_one_is_torchvisions_crop_and_flip_for_fixed_draws(tmp_path):
    recipe = R.dino_weak("w", 20, (0.2, 1.0), blur_p=0.0).resolved(32, (0.2, 1.0), True, True)
    staged = StagedViews(R.ViewLayout.of(recipe), MEAN)
    image = photo(50, 70)
    torch.manual_seed(3)
    (got,), _ = staged(image)
    torch.manual_seed(3)
    box = T.RandomResizedCrop.get_params(image, [0.2, 1.0], [3 / 4, 4 / 3])
    flipped = torch.rand(()).item() < 0.5
    expected = TF.resized_crop(image, *box, [20, 20], T.InterpolationMode.BICUBIC, antialias=True)
    expected = TF.pil_to_tensor(TF.horizontal_flip(expected) if flipped else expected)
    assert got.dtype == torch.uint8 and torch.equal(got, expected)
    # a file opened lazily (its header only) is decoded by selfsup.data.decode: the same crop, bit for bit for a PNG
    image.save(tmp_path / "photo.png")
    torch.manual_seed(3)
    (lazy,), _ = staged(Image.open(tmp_path / "photo.png"))
    assert torch.equal(lazy, expected)


def test_exif_rotated_photos_are_upright_on_every_route(tmp_path):
    from selfsup.config import DataConfig
    from selfsup.data.datasets import build_dataset

    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        exif = Image.Exif()
        exif[0x0112] = 6  # stored landscape, shown rotated by 90 degrees: portrait
        photo(20, 40).save(tmp_path / split / "a" / "rotated.jpg", exif=exif.tobytes())
    data = DataConfig(name="imagefolder", path=str(tmp_path))
    dataset = build_dataset(data, "train")
    assert dataset[0][0].size == (20, 40)  # (width, height): upright for the per-image route and evaluation
    layout = R.ViewLayout.of(R.Recipe("whole", (R.ResizedCrop(10, (1.0, 1.0), (0.5, 0.5)),)))
    staged = StagedViews(layout.resolved(10, (1.0, 1.0), False, False), MEAN)
    (view,), _ = staged(dataset.open(0)[0])  # the whole upright image (aspect 1:2), decoded lazily
    reference = TF.pil_to_tensor(TF.resize(dataset[0][0], [10, 10], antialias=True))
    assert (view.float() - reference.float()).abs().mean() < 4  # within the reduced decode's tolerance


def test_two_stage_views_have_the_per_image_pipelines_statistics():
    """AUG+ on a photo: the mean and the spread of each view's pixels follow the same law by both routes (KS)."""
    recipe = R.aug_plus().resolved(24, (0.2, 1.0), True, True)
    layout = R.ViewLayout.of(recipe)
    per_image, staged = PerImageViews(layout), StagedViews(layout, MEAN)
    stage2 = A.batch_augment(recipe, geometry=False)
    image, n = photo(), 600
    torch.manual_seed(0)
    reference = torch.stack([per_image(image)[0][0] for _ in range(n)])
    torch.manual_seed(1)
    cropped = torch.stack([staged(image)[0][0] for _ in range(n)])
    ours = stage2(cropped, torch.Generator().manual_seed(2))
    bound = 2.0 * math.sqrt(2 / n)  # p < 0.001
    for stat in (lambda v: v.mean(dim=(1, 2, 3)), lambda v: v.std(dim=(1, 2, 3)), lambda v: v[:, 0].mean(dim=(1, 2))):
        assert ks(stat(ours).numpy(), stat(reference).numpy()) < bound


# ---------------------------------------------------------------------------------------------- real folders


def write_folder(root, sizes=((31, 20), (24, 40), (33, 33), (50, 37))):
    """train/ and val/ with two classes: JPEG RGB, JPEG grey, PNG RGBA, JPEG CMYK, of several sizes."""
    modes = [("RGB", "jpg"), ("L", "jpg"), ("RGBA", "png"), ("CMYK", "jpg")]
    for split, count in (("train", 8), ("val", 4)):
        for c in ("a", "b"):
            folder = root / split / c
            folder.mkdir(parents=True)
            for k in range(count):
                width, height = sizes[k % len(sizes)]
                mode, ext = modes[k % len(modes)]
                image = photo(height, width, seed=k + (c == "b") * 10).convert(mode)
                image.save(folder / f"{k}.{ext}")
    return root


FOLDER = ["data.name=imagefolder", "data.image_size=16", "data.augment=batch", "train.batch_size=8",
          "train.max_steps=2", "data.subset=null"]


@pytest.mark.parametrize("method", ["msf", "mugs"])
def test_variable_size_folders_train_with_batched_augmentation(tmp_path, method):
    root = write_folder(tmp_path / "photos")
    words = [*FOLDER, f"data.path={root}"]
    if method == "msf":
        words += ["method.bank_size=64", "method.topk=2"]
    else:
        from test_mugs import TINY_MUGS

        words = [*TINY_MUGS, *words, "train.batch_size=8", "method.memory_size=32", "method.instance_queue_size=32",
                 "method.local_group_queue_size=32", "data.subset=null"]
    trainer = Trainer(tiny_config(tmp_path, *words, method=method))
    assert trainer.pipeline.route == "two_stage"
    batch = trainer.to_batch(next(iter(trainer.loader)))
    sizes = {tuple(view.shape[1:]) for view in batch.views}
    assert sizes == ({(3, 16, 16)} if method == "msf" else {(3, 16, 16), (3, 8, 8)})
    assert all(torch.isfinite(view).all() for view in batch.views)
    trainer.fit()
    assert trainer.step == 2


def test_two_stage_views_are_the_same_with_zero_and_two_workers_and_after_a_resume(tmp_path):
    root = write_folder(tmp_path / "photos")
    words = [*FOLDER, f"data.path={root}", "method.bank_size=64", "method.topk=2", "train.max_steps=null",
             "train.epochs=1"]

    def first_batch(workers: int):
        trainer = Trainer(tiny_config(tmp_path / f"w{workers}", *words, f"data.num_workers={workers}", method="msf"))
        return trainer.to_batch(next(iter(trainer.loader)))

    a, b = first_batch(0), first_batch(2)
    assert torch.equal(a.indices, b.indices)
    assert all(torch.equal(x, y) for x, y in zip(a.views, b.views, strict=True))

    straight = Trainer(tiny_config(tmp_path / "a", *words, method="msf"))
    straight.fit()
    first = Trainer(tiny_config(tmp_path / "b", *words, "train.max_steps=1", method="msf"))
    first.fit()
    resumed = Trainer(tiny_config(tmp_path / "b", *words, "train.resume=auto", method="msf"))
    resumed.fit()
    assert straight.step == resumed.step == 2
    for key, value in straight.method.state_dict().items():
        assert torch.equal(value, resumed.method.state_dict()[key]), key


def test_in_memory_data_sets_crop_on_the_device():
    from selfsup.config import DataConfig
    from selfsup.data.datasets import build_dataset

    data = DataConfig(augment="batch", image_size=16)
    digits = build_dataset(data, "train")
    assert training_views(R.ViewLayout.of("aug+", "weak"), data, digits).route == "device"
    multicrop = R.ViewLayout.of(R.Choice("c", ("weak",), ("aug+",), 0.5))
    assert training_views(multicrop, data, digits).route == "two_stage"  # a choice needs per-image draws


def test_gpu_decode_route_matches_the_worker_route_on_the_cpu(tmp_path):
    """data.decode=gpu is nvjpeg on CUDA; the same route runs here with torchvision's CPU JPEG decoder: the views of
    each image are the worker route's (the same draws, other decoders and resizers: a few grey levels apart)."""
    from selfsup.config import ConfigError, DataConfig
    from selfsup.data.datasets import build_dataset
    from selfsup.data.loader import ViewDataset
    from selfsup.data.pipeline import collate_encoded, gpu_decoded_views

    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        for k, orientation in enumerate((1, 6, 3, 8)):
            exif = Image.Exif()
            exif[0x0112] = orientation
            photo(48 + 8 * k, 64, seed=k).save(tmp_path / split / "a" / f"{k}.jpg", quality=95, exif=exif.tobytes())
    data = DataConfig(name="imagefolder", path=str(tmp_path), augment="batch", decode="gpu", image_size=24)
    with pytest.raises(ConfigError, match="data.decode=gpu .* CUDA"):
        training_views(R.ViewLayout.of("aug+", "weak"), data, build_dataset(data, "train"), "cpu")
    dataset = build_dataset(data, "train")
    layout = R.ViewLayout.of("aug+", "weak").resolved(24, (0.3, 1.0), True, False)
    route = gpu_decoded_views(layout, data, dataset)
    staged = ViewDataset(dataset, StagedViews(layout, MEAN), lazy=True)
    keys = [(i, 100 + i) for i in range(4)]
    encoded = collate_encoded([route.dataset[key] for key in keys])
    crops = route.device_step(encoded[0], encoded[1], torch.Generator().manual_seed(0))
    reference = default_collate([staged[key] for key in keys])
    stage2 = route.device_step.stage2
    expected = stage2(reference[0], reference[1], torch.Generator().manual_seed(0))
    for ours, theirs in zip(crops, expected, strict=True):
        assert ours.shape == theirs.shape == (4, 3, 24, 24)
        assert (ours - theirs).abs().mul(255 * 0.226).mean() < 3.0  # grey levels, after un-normalising
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "a" / "z.png")
    with_png = build_dataset(data, "train")
    with pytest.raises(Exception, match="decodes JPEG files only"):
        gpu_decoded_views(layout, data, with_png).dataset[(with_png.paths.index(str(tmp_path / "train" / "a" /
                                                                                   "z.png")), 0)]
