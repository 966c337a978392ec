"""Data sets (each format written in miniature to tmp_path) and augmentation recipes."""

from __future__ import annotations

import gzip
import pickle
import random
import struct
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from selfsup.config import IMAGENET_MEAN, IMAGENET_STD, ConfigError, DataConfig
from selfsup.data.datasets import (
    DATASETS,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    SHAPES,
    CorruptImageWarning,
    DataFormatError,
    ImageLoadError,
    _shape_mask,
    build_dataset,
    make_shapes,
    read_idx,
)
from selfsup.data.transforms import TRANSFORMS, blur_kernel_size, build_transform

RNG = np.random.default_rng(1234)


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


# ---------------------------------------------------------------------------------------------
# registry


def test_registry_and_unknown_name() -> None:
    names = {"digits", "fashion-mnist", "imagefolder", "cifar10", "cifar100", "stl10", "synthetic"}
    assert names <= set(DATASETS)
    with pytest.raises(ConfigError, match=r"data.name='digit'.*did you mean 'digits'"):
        build_dataset(DataConfig(name="digit"), "train")


def test_unknown_split_lists_valid_splits() -> None:
    with pytest.raises(ConfigError, match=r"data.train_split='trian'.*did you mean 'train'.*'val'.*digits"):
        build_dataset(DataConfig(train_split="trian"), "trian")


# ---------------------------------------------------------------------------------------------
# digits


def test_digits_splits_stratified_deterministic() -> None:
    from sklearn.datasets import load_digits

    cfg = DataConfig(name="digits")
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert (len(train), len(val)) == (1347, 450)
    assert train.num_classes == 10 and train.classes == [str(d) for d in range(10)]
    assert train.targets.dtype == np.int64 and set(train.targets) == set(range(10))
    full = Counter(load_digits().target.tolist())
    val_counts = Counter(val.targets.tolist())
    assert Counter(train.targets.tolist()) + val_counts == full  # a partition of the 1,797 images
    assert all(abs(val_counts[c] - 0.25 * full[c]) <= 1 for c in full)  # stratified
    np.testing.assert_array_equal(build_dataset(cfg, "train").targets, train.targets)
    np.testing.assert_array_equal(build_dataset(cfg, "test").targets, val.targets)
    image, label = train[0]
    assert image.size == (8, 8) and label == train.targets[0]
    x = pixels(image)
    assert (x[..., 0] == x[..., 1]).all() and (x[..., 0] == x[..., 2]).all()  # grey as RGB
    everything = np.stack([pixels(train[i][0]) for i in range(len(train))])
    assert everything.min() == 0 and everything.max() == 255
    assert train.describe(3) == "digits/train[3]"


def test_subset_trims_training_split_only() -> None:
    full = build_dataset(DataConfig(), "train")
    cfg = DataConfig(subset=100)
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert len(train) == 100 and len(val) == 450
    np.testing.assert_array_equal(train.targets, full.targets[:100])
    np.testing.assert_array_equal(pixels(train[99][0]), pixels(full[99][0]))
    with pytest.raises(IndexError):
        train[100]
    with pytest.raises(ConfigError, match="subset"):
        build_dataset(DataConfig(subset=0), "train")


# ---------------------------------------------------------------------------------------------
# synthetic Shapes-10


def test_synthetic_deterministic_balanced() -> None:
    x1, y1 = make_shapes(100)
    x2, y2 = make_shapes(100)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(make_shapes(100, seed=1)[0], x1)
    assert x1.shape == (100, 32, 32, 3) and x1.dtype == np.uint8
    assert Counter(y1.tolist()) == dict.fromkeys(range(10), 10)

    cfg = DataConfig(name="synthetic")
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert (len(train), len(val)) == (1600, 400)
    assert train.classes == SHAPES and train.num_classes == 10
    assert Counter(np.concatenate([train.targets, val.targets]).tolist()) == dict.fromkeys(range(10), 200)
    image, label = val[5]
    assert image.size == (32, 32) and label == val.targets[5]
    np.testing.assert_array_equal(pixels(build_dataset(cfg, "val")[5][0]), pixels(image))


def test_shapes_are_distinct() -> None:
    g = (np.arange(64) + 0.5) / 32 - 1
    v, u = np.meshgrid(g, g, indexing="ij")
    masks = [_shape_mask(s, u, v) for s in range(10)]
    for a in range(10):
        assert masks[a].mean() > 0.1
        for b in range(a + 1, 10):
            iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
            assert iou < 0.8, (SHAPES[a], SHAPES[b], iou)


# ---------------------------------------------------------------------------------------------
# imagefolder


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture()
def folder(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    written = {}
    for split, count in (("train", 3), ("val", 1)):
        for c in ("cat", "dog"):
            for k in range(count):
                array = RNG.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
                path = tmp_path / split / c / f"{k}.png"
                write_png(path, array)
                written[str(path)] = array
    grey = RNG.integers(0, 256, size=(4, 4), dtype=np.uint8)
    write_png(tmp_path / "train" / "dog" / "3.PNG", grey)  # upper-case extension, grey image
    written[str(tmp_path / "train" / "dog" / "3.PNG")] = np.repeat(grey[..., None], 3, axis=2)
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "cat" / "1b.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    return tmp_path, written


def test_imagefolder_reads_classes_and_pixels(folder: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, written = folder
    cfg = DataConfig(name="imagefolder", path=str(root))
    train = build_dataset(cfg, "train")
    assert train.classes == ["cat", "dog"]
    names = [Path(train.describe(i)).relative_to(root).as_posix() for i in range(len(train))]
    assert names == ["train/cat/0.png", "train/cat/1.png", "train/cat/1b.jpg", "train/cat/2.png",
                     "train/dog/0.png", "train/dog/1.png", "train/dog/2.png", "train/dog/3.PNG"]
    np.testing.assert_array_equal(train.targets, [0, 0, 0, 0, 1, 1, 1, 1])
    for i in (0, 1, 3, 7):
        image, label = train[i]
        np.testing.assert_array_equal(pixels(image), written[train.describe(i)])
        assert label == train.targets[i]
    val = build_dataset(cfg, "val")
    assert len(val) == 2 and val.classes == train.classes
    np.testing.assert_array_equal(val.targets, [0, 1])
    assert len(pickle.loads(pickle.dumps(train))) == len(train)  # DataLoader workers
    assert len(build_dataset(DataConfig(name="imagefolder", path=str(root), subset=2), "train")) == 2


def test_imagefolder_corrupt_image(folder: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, written = folder
    bad = str(root / "train" / "cat" / "1b.jpg")
    train = build_dataset(DataConfig(name="imagefolder", path=str(root)), "train")
    with pytest.raises(ImageLoadError, match="data.skip_corrupt=true") as caught:
        train[2]
    assert bad in str(caught.value)

    skipping = build_dataset(DataConfig(name="imagefolder", path=str(root), skip_corrupt=True), "train")
    with pytest.warns(CorruptImageWarning, match="1b.jpg"):
        image, label = skipping[2]
    np.testing.assert_array_equal(pixels(image), written[str(root / "train" / "cat" / "2.png")])
    assert label == 0 and skipping.skipped == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per path
        np.testing.assert_array_equal(pixels(skipping[2][0]), pixels(image))
    assert skipping.skipped == 1


def test_imagefolder_skip_wraps_around_and_all_bad(tmp_path: Path) -> None:
    write_png(tmp_path / "train" / "a" / "0.png", np.full((3, 3, 3), 7, np.uint8))
    (tmp_path / "train" / "b" ).mkdir(parents=True)
    (tmp_path / "train" / "b" / "1.png").write_bytes(b"garbage")
    ds = build_dataset(DataConfig(name="imagefolder", path=str(tmp_path), skip_corrupt=True), "train")
    with pytest.warns(CorruptImageWarning):
        image, label = ds[1]  # the last image is bad: wrap around to index 0
    assert label == 0 and pixels(image).max() == 7
    (tmp_path / "train" / "a" / "0.png").write_bytes(b"garbage too")
    fresh = build_dataset(DataConfig(name="imagefolder", path=str(tmp_path), skip_corrupt=True), "train")
    with pytest.warns(CorruptImageWarning), pytest.raises(ImageLoadError, match="no readable image"):
        fresh[0]


def test_imagefolder_errors(folder: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    root, _ = folder
    with pytest.raises(ConfigError, match=r"'vla'.*did you mean 'val'.*\['train', 'val'\]"):
        build_dataset(DataConfig(name="imagefolder", path=str(root), val_split="vla"), "vla")
    with pytest.raises(ConfigError, match="data.path"):
        build_dataset(DataConfig(name="imagefolder"), "train")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_dataset(DataConfig(name="imagefolder", path=str(tmp_path / "nowhere")), "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no split sub-folders"):
        build_dataset(DataConfig(name="imagefolder", path=str(tmp_path / "empty")), "train")
    write_png(root / "val" / "bird" / "0.png", np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(DataFormatError, match="bird"):  # val labels must align with train's classes
        build_dataset(DataConfig(name="imagefolder", path=str(root)), "val")


# ---------------------------------------------------------------------------------------------
# CIFAR


def cifar_row(image: np.ndarray) -> np.ndarray:
    return image.transpose(2, 0, 1).reshape(-1)  # R plane, G plane, B plane, each row-major


def write_cifar(folder: Path, files: dict[str, int], label_key: str, bytes_keys: bool,
                num_classes: int) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder.mkdir(parents=True)
    written = {}
    for name, count in files.items():
        images = RNG.integers(0, 256, size=(count, 32, 32, 3), dtype=np.uint8)
        labels = RNG.integers(0, num_classes, size=count).tolist()
        batch = {"data": np.stack([cifar_row(x) for x in images]), label_key: labels}
        with open(folder / name, "wb") as f:
            pickle.dump({k.encode() if bytes_keys else k: v for k, v in batch.items()}, f)
        written[name] = (images, labels)
    return written


def test_cifar10_roundtrip(tmp_path: Path) -> None:
    files = {f"data_batch_{k}": 2 for k in range(1, 6)} | {"test_batch": 3}
    written = write_cifar(tmp_path / "cifar-10-batches-py", files, "labels", bytes_keys=True, num_classes=10)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer",
             b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(tmp_path / "cifar-10-batches-py" / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names}, f)
    cfg = DataConfig(name="cifar10", path=str(tmp_path))
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    assert (len(train), len(test)) == (10, 3)
    assert train.classes[1] == "automobile" and train.num_classes == 10
    expected = np.concatenate([written[f"data_batch_{k}"][0] for k in range(1, 6)])
    labels = sum((written[f"data_batch_{k}"][1] for k in range(1, 6)), [])
    np.testing.assert_array_equal(train.targets, labels)
    for i in (0, 3, 9):
        image, label = train[i]
        np.testing.assert_array_equal(pixels(image), expected[i])
        assert label == labels[i]
    np.testing.assert_array_equal(pixels(build_dataset(cfg, "val")[2][0]), written["test_batch"][0][2])


def test_cifar100_roundtrip_and_missing(tmp_path: Path) -> None:
    written = write_cifar(tmp_path / "cifar-100-python", {"train": 4, "test": 2}, "fine_labels",
                          bytes_keys=False, num_classes=100)
    cfg = DataConfig(name="cifar100", path=str(tmp_path / "cifar-100-python"))  # the folder itself works too
    train = build_dataset(cfg, "train")
    assert len(train) == 4 and train.num_classes == 100 and train.classes[:2] == ["0", "1"]
    np.testing.assert_array_equal(train.targets, written["train"][1])
    np.testing.assert_array_equal(pixels(train[3][0]), written["train"][0][3])
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py.*Downloads are off"):
        build_dataset(DataConfig(name="cifar10", path=str(tmp_path)), "train")


# ---------------------------------------------------------------------------------------------
# STL-10


def stl_bytes(images: np.ndarray) -> bytes:
    # torchvision reads reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2): each channel is stored column-major
    return np.ascontiguousarray(images.transpose(0, 3, 2, 1)).tobytes()


def test_stl10_orientation_and_splits(tmp_path: Path) -> None:
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    marked = np.zeros((96, 96, 3), np.uint8)
    marked[:10, :, 0] = 255  # red band along the top edge
    marked[:, :5, 2] = 200  # blue band along the left edge
    marked[50, 70] = (0, 2, 3)  # one pixel at row 50, column 70
    train = np.stack([marked, RNG.integers(0, 256, size=(96, 96, 3), dtype=np.uint8)])
    unlabeled = RNG.integers(0, 256, size=(3, 96, 96, 3), dtype=np.uint8)
    (folder / "train_X.bin").write_bytes(stl_bytes(train))
    (folder / "train_y.bin").write_bytes(bytes([1, 10]))
    (folder / "test_X.bin").write_bytes(stl_bytes(train[::-1]))
    (folder / "test_y.bin").write_bytes(bytes([3, 4]))
    (folder / "unlabeled_X.bin").write_bytes(stl_bytes(unlabeled))
    cfg = DataConfig(name="stl10", path=str(tmp_path))

    ds = build_dataset(cfg, "train")
    x = pixels(ds[0][0])
    assert x[:10, :, 0].min() == 255 and x[10:, 5:, 0].max() == 0  # top band stays on top
    assert x[:, :5, 2].min() == 200 and tuple(x[50, 70]) == (0, 2, 3)
    np.testing.assert_array_equal(x, marked)
    np.testing.assert_array_equal(ds.targets, [0, 9])  # stored 1-based
    assert ds.classes[0] == "airplane"
    np.testing.assert_array_equal(build_dataset(cfg, "val").targets, [2, 3])

    both = build_dataset(cfg, "train+unlabeled")
    np.testing.assert_array_equal(both.targets, [0, 9, -1, -1, -1])
    np.testing.assert_array_equal(pixels(both[3][0]), unlabeled[1])
    assert both[4][1] == -1 and len(build_dataset(cfg, "unlabeled")) == 3
    clone = pickle.loads(pickle.dumps(both))  # DataLoader workers: the memmap is not copied
    assert len(pickle.dumps(both)) < 96 * 96 * 3
    np.testing.assert_array_equal(pixels(clone[1][0]), train[1])

    (folder / "test_X.bin").write_bytes(stl_bytes(train)[:-7])
    with pytest.raises(DataFormatError, match="test_X.bin"):
        build_dataset(cfg, "test")


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    raw = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def test_fashion_mnist_roundtrip(tmp_path: Path) -> None:
    images = RNG.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = np.array([0, 9, 3, 3, 1], np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images[:2])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels[:2], compress=False)  # plain idx also works
    cfg = DataConfig(name="fashion-mnist", path=str(tmp_path))
    train = build_dataset(cfg, "train")
    assert len(train) == 5 and train.classes == FASHION_MNIST_CLASSES
    np.testing.assert_array_equal(train.targets, labels)
    x = pixels(train[2][0])
    np.testing.assert_array_equal(x, np.repeat(images[2][..., None], 3, axis=2))
    assert train[1][1] == 9
    assert build_dataset(cfg, "train").parts[0] is train.parts[0]  # decoded once per process
    assert len(build_dataset(cfg, "test")) == 2


def test_fashion_mnist_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        build_dataset(DataConfig(name="fashion-mnist", path=str(tmp_path)), "train")
    labels = tmp_path / "labels.gz"
    write_idx(labels, np.arange(4))
    with pytest.raises(DataFormatError, match="magic"):
        read_idx(labels, 3)
    labels.write_bytes(labels.read_bytes()[:-6])  # truncated gzip stream
    with pytest.raises(DataFormatError, match="labels.gz"):
        read_idx(labels, 1)
    short = tmp_path / "short"
    short.write_bytes(struct.pack(">BBBBI", 0, 0, 8, 1, 10) + bytes(9))
    with pytest.raises(DataFormatError, match="truncated"):
        read_idx(short, 1)


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte.gz").is_file(),
                    reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_installed() -> None:
    cfg = DataConfig(name="fashion-mnist")
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert (len(train), len(val)) == (60_000, 10_000)
    assert Counter(val.targets.tolist()) == dict.fromkeys(range(10), 1000)
    assert train[0][0].size == (28, 28)


# ---------------------------------------------------------------------------------------------
# transforms


@pytest.mark.parametrize("size", [32, 16])
@pytest.mark.parametrize("name", TRANSFORMS)
def test_transform_shapes(name: str, size: int) -> None:
    transform = build_transform(name, size)
    for source in (Image.new("RGB", (8, 8), (10, 200, 30)), Image.new("RGB", (50, 40), (0, 0, 0))):
        x = transform(source)
        assert x.shape == (3, size, size) and x.dtype == torch.float32
        assert torch.isfinite(x).all()


def test_eval_transform_values() -> None:
    image = Image.fromarray(RNG.integers(0, 256, size=(32, 32, 3), dtype=np.uint8))
    identity = build_transform("eval", 32, crop_ratio=1.0)(image)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    expected = (torch.from_numpy(np.array(image)).permute(2, 0, 1) / 255 - mean) / std
    torch.testing.assert_close(identity, expected)
    evaluate = build_transform("eval", 32)
    steps = evaluate.transforms
    assert steps[0].size == 37 and steps[1].size == (32, 32)  # Resize(round(32 / 0.875)) -> CenterCrop(32)
    torch.manual_seed(0)
    a = evaluate(image)
    torch.manual_seed(1)
    torch.testing.assert_close(evaluate(image), a, rtol=0, atol=0)
    constant = build_transform("eval", 16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    torch.testing.assert_close(constant(Image.new("RGB", (20, 24), (255, 0, 255)))[:, 3, 3],
                               torch.tensor([1.0, -1.0, 1.0]))


def test_aug_plus_reproducible_from_torch_seed() -> None:
    image = Image.fromarray(RNG.integers(0, 256, size=(40, 40, 3), dtype=np.uint8))
    transform = build_transform("aug+", 32)
    views = []
    for python_seed in (0, 1):
        random.seed(python_seed)  # python's and numpy's RNGs must not matter
        np.random.seed(python_seed)
        torch.manual_seed(7)
        views.append(torch.stack([transform(image) for _ in range(4)]))
    torch.testing.assert_close(views[0], views[1], rtol=0, atol=0)
    assert not torch.equal(views[0][0], views[0][1])
    torch.manual_seed(8)
    assert not torch.equal(transform(image), views[0][0])


def test_aug_plus_blur_scaled() -> None:
    assert [blur_kernel_size(s) for s in (224, 96, 32, 16)] == [23, 11, 3, 3]

    def blurs(transform: T.Compose) -> list[T.GaussianBlur]:
        return [t for s in transform.transforms if isinstance(s, T.RandomApply)
                for t in s.transforms if isinstance(t, T.GaussianBlur)]

    (blur,) = blurs(build_transform("aug+", 32))
    assert blur.kernel_size == (3, 3)
    assert blur.sigma == pytest.approx((0.1 * 32 / 224, 2.0 * 32 / 224))
    assert blurs(build_transform("aug+", 32, blur=False)) == []
    (jitter,) = [t for t in build_transform("moco_v1", 32).transforms if isinstance(t, T.ColorJitter)]
    assert jitter.hue == (-0.4, 0.4)


def test_transform_errors() -> None:
    with pytest.raises(ConfigError, match=r"'aug'.*did you mean 'aug\+'"):
        build_transform("aug", 32)
    with pytest.raises(ConfigError, match="eval_crop_ratio"):
        build_transform("eval", 32, crop_ratio=1.5)
    with pytest.raises(ConfigError, match="bicubic"):
        build_transform("weak", 32, interpolation="bicubc")
    assert build_transform("weak", 32, interpolation="bicubic").transforms[0].interpolation.value == "bicubic"


def test_skipped_images_are_counted_across_loader_workers(tmp_path):
    """Corrupt files read inside DataLoader worker processes still add to the run's count."""
    from torch.utils.data import DataLoader

    root = tmp_path / "folder"
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for k in range(3):
                Image.new("RGB", (4, 4), (k * 40, 0, 0)).save(root / split / c / f"{k}.png")
    (root / "train" / "a" / "bad1.png").write_bytes(b"not an image")
    (root / "train" / "b" / "bad2.png").write_bytes(b"broken")
    cfg = DataConfig(name="imagefolder", path=str(root), skip_corrupt=True)
    train = build_dataset(cfg, "train")
    loader = DataLoader(train, batch_size=2, num_workers=2, collate_fn=lambda batch: [label for _, label in batch])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        labels = [label for batch in loader for label in batch]
    assert len(labels) == 8
    assert train.skipped == 2  # one per unreadable file, counted in the workers
