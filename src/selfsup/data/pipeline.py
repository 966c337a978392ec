"""The data path of a run: from a data set and a method's :class:`~selfsup.data.recipes.ViewLayout` to the views of
every training step, by one of three routes chosen from ``data.augment`` and the data:

- ``per_sample``: every view of every image on the loader workers, PIL/torchvision (:class:`PerImageViews`);
- ``batch`` on an in-memory data set of one image size (digits, Fashion-MNIST, CIFAR, STL-10): the loader yields the
  raw uint8 images and every op, the crop included, runs batched on the device (:class:`DeviceViews`);
- ``batch`` on anything else (image folders of any size, multi-crop layouts, RandAugment): two stages.
  *Stage 1*, per image on the workers, seeded per sample as every route (the same views with 0 or N workers and
  after a resume): decode, random-resized crop and flip straight to the output size (a JPEG decoded at reduced size
  when the crop allows), RandAugment where the recipe has it, as uint8. *Stage 2*, on the training device, batched
  per recipe and output size (:class:`Stage2`): colour jitter, grey, blur, solarise, erasing, normalisation.

Differences of the two-stage route from the per-image recipe, by design: RandAugment (Mugs' strong views) runs on
the crop instead of before it (its translations are then relative to the crop, as its ``translate`` fraction says);
the batched ops follow torchvision's tensor kernels (see :mod:`selfsup.data.batch_augment`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import Dataset, default_collate
from torchvision.transforms import functional as TF
from torchvision.transforms.functional import pil_to_tensor

from selfsup.config import DataConfig
from selfsup.data import recipes as R
from selfsup.data.batch_augment import BatchAugment, batch_augment
from selfsup.data.datasets import ArrayDataset
from selfsup.data.decode import decode_resized_crops, orientation, oriented_size
from selfsup.data.loader import Choices, ImageTensorDataset, ViewDataset
from selfsup.data.transforms import PerImageViews, randaugment
from selfsup.errors import ConfigError, ImageLoadError, check_choice

# ---------------------------------------------------------------------------------------------- stage 1


def crop_box(height: int, width: int, scale: Sequence[float], ratio: Sequence[float], u: Sequence[float],
             attempts: int = 10) -> tuple[int, int, int, int]:
    """(top, left, height, width) with RandomResizedCrop's law from ``2 * attempts + 2`` uniform draws ``u``: the first
    of ``attempts`` (area fraction, log-aspect) candidates that fits, at a uniform position, else torchvision's
    central fallback (the aspect clipped to ``ratio``)."""
    area = height * width
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    for a in range(attempts):
        target = area * (scale[0] + (scale[1] - scale[0]) * u[2 * a])
        aspect = math.exp(lo + (hi - lo) * u[2 * a + 1])
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(u[-2] * (height - h + 1)), height - h)
            left = min(int(u[-1] * (width - w + 1)), width - w)
            return top, left, h, w
    if width / height < min(ratio):
        w, h = width, round(width / min(ratio))
    elif width / height > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def crop_boxes_and_flips(height: int, width: int, recipes: Sequence[R.Recipe]) -> tuple[list[tuple], list[bool]]:
    """Every view's crop box (:func:`crop_box`) and flip for one image of that size, from one draw of uniforms."""
    draws = 2 * 10 + 2
    u = torch.rand(len(recipes), draws + 1).tolist()
    boxes = [crop_box(height, width, r.crop.scale, r.crop.ratio, row[:draws])
             for r, row in zip(recipes, u, strict=True)]
    flips = [row[draws] < r.flip_p for r, row in zip(recipes, u, strict=True)]
    return boxes, flips


def draw_recipes(layout: R.ViewLayout) -> tuple[list[R.Recipe], Choices]:
    """The recipe of every view for one image: each choice draws u ~ U[0, 1) and takes the alternative when u < p."""
    recipes: list[R.Recipe] = []
    choices: Choices = {}
    for name, default, alternative, p in layout.options():
        chosen = False
        if name is not None:
            chosen = bool(torch.rand(()).item() < p)
            choices[name] = torch.tensor(chosen)
        recipes += list(alternative if chosen else default)  # type: ignore[arg-type]
    return recipes, choices


class StagedViews:
    """``image -> (uint8 views, choices)``: stage 1 of every view of a resolved layout. Per image: each choice
    draws u ~ U[0, 1) (the alternative when u < p, as :class:`~selfsup.data.transforms.PerImageViews`), then every
    view its crop box (on the upright image) and flip; the file is decoded once for all views, a JPEG at reduced
    size when every crop allows it (:func:`selfsup.data.decode.decode_resized_crops`, which also crops images that
    are already in memory, at full size); RandAugment last, per view."""

    def __init__(self, layout: R.ViewLayout, mean: Sequence[float]):
        self.layout = layout
        self.randaugments = {recipe: randaugment(recipe.op(R.RandAugment), recipe.size, mean)
                             for recipe in layout.recipes() if recipe.op(R.RandAugment) is not None}

    def __call__(self, image: Image.Image) -> tuple[list[Tensor], Choices]:
        recipes, choices = draw_recipes(self.layout)
        height, width = oriented_size(image)  # from the header of a lazily opened file
        boxes, flips = crop_boxes_and_flips(height, width, recipes)
        views: list[Tensor] = [torch.empty(0)] * len(recipes)
        for interpolation in dict.fromkeys(recipe.crop.interpolation for recipe in recipes):
            chosen = [k for k, recipe in enumerate(recipes) if recipe.crop.interpolation == interpolation]
            crops = decode_resized_crops(image, [boxes[k] for k in chosen], [recipes[k].size for k in chosen],
                                         [flips[k] for k in chosen], interpolation=interpolation)
            for k, crop in zip(chosen, crops, strict=True):
                views[k] = crop
        for k, recipe in enumerate(recipes):
            if recipe in self.randaugments:
                views[k] = pil_to_tensor(self.randaugments[recipe](TF.to_pil_image(views[k])))
        return views, choices


# ---------------------------------------------------------------------------------------------- stage 2


class Stage2(nn.Module):
    """The photometric ops of every view, on the device, one batched call per distinct recipe: views of the same
    recipe (e.g. Mugs' ten local crops, or MoCo's two AUG+ views) are concatenated; a choice sends each image's view
    to the recipe it drew."""

    def __init__(self, layout: R.ViewLayout, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        recipes: list[R.Recipe] = []

        def index(recipe: R.Recipe) -> int:
            if recipe not in recipes:
                recipes.append(recipe)
            return recipes.index(recipe)

        self.positions: list[tuple[str | None, int, int]] = []  # (choice name, default recipe, alternative recipe)
        for slot in layout.slots:
            if isinstance(slot, R.Choice):
                self.positions += [(slot.name, index(a), index(b))
                                   for a, b in zip(slot.default, slot.alternative, strict=True)]
            else:
                self.positions.append((None, index(slot), -1))
        self.augments = nn.ModuleList(batch_augment(recipe, mean, std, geometry=False) for recipe in recipes)

    def forward(self, views: list[Tensor], choices: Choices, generator: torch.Generator) -> list[Tensor]:
        device = self.augments[0].mean.device  # where the module was moved: the loader's views go there
        views = [view.to(device, non_blocking=True) for view in views]
        jobs: dict[int, list[tuple[int, Tensor | None]]] = {}
        for position, (name, default, alternative) in enumerate(self.positions):
            if name is None:
                jobs.setdefault(default, []).append((position, None))
                continue
            chosen = choices[name].cpu().bool()  # the loader's CPU copy: no device sync
            for recipe, mask in ((default, ~chosen), (alternative, chosen)):
                jobs.setdefault(recipe, []).append((position, mask.nonzero()[:, 0].to(device, non_blocking=True)))
        out: list[Tensor | None] = [None] * len(views)
        for recipe in sorted(jobs):
            items = jobs[recipe]
            parts = [views[p] if rows is None else views[p][rows] for p, rows in items]
            sizes = [part.shape[0] for part in parts]
            if not sum(sizes):
                continue
            done = self.augments[recipe](torch.cat(parts), generator).split(sizes)
            for (position, rows), part in zip(items, done, strict=True):
                if rows is None:
                    out[position] = part
                    continue
                if out[position] is None:
                    out[position] = part.new_empty((views[position].shape[0], *part.shape[1:]))
                out[position][rows] = part  # type: ignore[index]
        return out  # type: ignore[return-value]


class DeviceViews(nn.Module):
    """In-memory images of one size: every view's whole recipe, the crop included, batched on the device."""

    def __init__(self, layout: R.ViewLayout, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.augments: Sequence[BatchAugment] = nn.ModuleList(
            batch_augment(recipe, mean, std) for recipe in layout.recipes())  # type: ignore[arg-type]

    def forward(self, images: Tensor, choices: Choices, generator: torch.Generator) -> list[Tensor]:
        images = images.to(self.augments[0].mean.device, non_blocking=True)
        return [augment(images, generator) for augment in self.augments]


# ---------------------------------------------------------------------------------------------- decode on the GPU

Encoded = tuple[list[Tensor], Tensor, Tensor, Tensor]  # JPEG bytes, EXIF orientations (B,), boxes (B, V, 4), flips


class EncodedViews:
    """``data.decode=gpu``, stage 1 on the workers: the JPEG's bytes (read, not decoded), its EXIF orientation,
    and every view's crop box (upright coordinates, from the header's size) and flip, drawn as stage 1 draws them.
    A file that is no JPEG is one clear error (nvjpeg decodes JPEG only)."""

    def __init__(self, layout: R.ViewLayout):
        self.layout = layout

    def __call__(self, image: Image.Image) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor], Choices]:
        name = getattr(image, "filename", "")
        if image.format != "JPEG" or not name:
            raise ImageLoadError(f"data.decode=gpu decodes JPEG files only; {name or 'an in-memory image'} is "
                                 f"{image.format or 'not a file'}: use data.decode=cpu")
        recipes, choices = draw_recipes(self.layout)
        boxes, flips = crop_boxes_and_flips(*oriented_size(image), recipes)
        boxes, flips = torch.tensor(boxes, dtype=torch.int64), torch.tensor(flips)
        data = torch.frombuffer(bytearray(Path(name).read_bytes()), dtype=torch.uint8)
        return (data, torch.tensor(orientation(image)), boxes, flips), choices


def collate_encoded(samples: list) -> tuple:
    """The batch of :class:`EncodedViews` samples: the JPEG bytes stay a list (their lengths differ)."""
    encoded = [sample[0] for sample in samples]
    data = [item[0] for item in encoded]
    rest = default_collate([(item[1], item[2], item[3]) for item in encoded])
    others = default_collate([sample[1:] for sample in samples])
    return ((data, *rest), *others)


def upright(image: Tensor, orientation: int) -> Tensor:
    """A (C, H, W) image stored with EXIF ``orientation`` (1-8), turned upright as ``ImageOps.exif_transpose`` turns
    it (2 mirror, 3 half turn, 4 upside-down mirror, 5 transpose, 6 quarter turn clockwise, 7 transverse, 8 quarter
    turn counter-clockwise)."""
    rows_cols = (-2, -1)
    if orientation in (5, 7):
        image = image.transpose(-1, -2)
    turns = {3: 2, 6: -1, 7: 2, 8: 1}.get(orientation, 0)
    if turns:
        image = torch.rot90(image, turns, rows_cols)
    if orientation == 2:
        image = image.flip(-1)
    elif orientation == 4:
        image = image.flip(-2)
    return image


class DecodeOnDevice(nn.Module):
    """``data.decode=gpu``, on the device: one batched nvjpeg decode of the batch's JPEGs, each image turned upright,
    every view cropped, resized (antialiased, the recipe's interpolation) and flipped, then :class:`Stage2`."""

    def __init__(self, layout: R.ViewLayout, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.positions = [(options[0].size, options[0].crop.interpolation) for options in layout.views()]
        self.stage2 = Stage2(layout, mean, std)
        self.register_buffer("anchor", torch.zeros(0), persistent=False)  # the device the module was moved to

    def forward(self, encoded: Encoded, choices: Choices, generator: torch.Generator) -> list[Tensor]:
        from torchvision.io import ImageReadMode, decode_jpeg

        data, orientations, boxes, flips = encoded
        images = decode_jpeg(list(data), mode=ImageReadMode.RGB, device=self.anchor.device)
        views = []
        for k, (size, interpolation) in enumerate(self.positions):
            crops = []
            for b, image in enumerate(images):
                top, left, height, width = boxes[b, k].tolist()
                crop = upright(image, int(orientations[b]))[:, top:top + height, left:left + width]
                crop = F.interpolate(crop[None].float(), size=(size, size), mode=interpolation, antialias=True,
                                     align_corners=False)[0]
                crops.append(crop.flip(-1) if flips[b, k] else crop)
            views.append(torch.stack(crops).clamp_(0, 255).div_(255))
        return self.stage2(views, choices, generator)


# ---------------------------------------------------------------------------------------------- the route


@dataclass
class TrainingViews:
    """The loader's data set and, for ``data.augment=batch``, the device step that completes the views."""

    dataset: Dataset  # samples (views, choices, index, label)
    device_step: nn.Module | None  # (loader views, CPU choices, generator) -> views on its device; None: ready
    route: str  # per_sample | device | two_stage | gpu_decode
    collate: Callable[[list], object] = default_collate

    def to(self, device: torch.device) -> TrainingViews:
        if self.device_step is not None:
            self.device_step.to(device)
        return self


def uniform_in_memory(data: Dataset) -> bool:
    """An in-memory data set whose images all share one size (the on-device crop applies)."""
    if not isinstance(data, ArrayDataset):
        return False
    shapes = {tuple(part[0].shape[:2]) for part in data.parts if len(part)}
    return len(shapes) == 1


def on_device_geometry(layout: R.ViewLayout) -> bool:
    """Whether every view of a resolved layout can crop on the device: no choices, no RandAugment, bilinear crops."""
    return not layout.choices() and all(recipe.op(R.RandAugment) is None and recipe.crop.interpolation == "bilinear"
                                        for recipe in layout.recipes())  # type: ignore[union-attr]


def training_views(layout: R.ViewLayout, data: DataConfig, dataset: Dataset,
                   device: torch.device | str | None = None) -> TrainingViews:
    """The route of ``data.augment`` (and ``data.decode``) for ``layout`` (sizes, scales, flips and blurs from
    ``data``) on ``dataset``, for a run on ``device``."""
    check_choice("data.decode", data.decode, ("cpu", "gpu"))
    resolved = layout.resolved(data.image_size, tuple(data.crop_scale), data.flip, data.blur)
    if data.augment == "per_sample":
        return TrainingViews(ViewDataset(dataset, PerImageViews(resolved, data.mean, data.std)), None, "per_sample")
    if uniform_in_memory(dataset) and on_device_geometry(resolved):
        return TrainingViews(ImageTensorDataset(dataset), DeviceViews(resolved, data.mean, data.std), "device")
    if data.decode == "gpu":
        if device is None or torch.device(device).type != "cuda":
            raise ConfigError(f"data.decode=gpu decodes JPEGs with nvjpeg on a CUDA device; this run is on "
                              f"{device or 'no device'}: use data.decode=cpu")
        return gpu_decoded_views(resolved, data, dataset)
    staged = ViewDataset(dataset, StagedViews(resolved, data.mean), lazy=True)
    return TrainingViews(staged, Stage2(resolved, data.mean, data.std), "two_stage")


def gpu_decoded_views(resolved: R.ViewLayout, data: DataConfig, dataset: Dataset) -> TrainingViews:
    """The ``data.decode=gpu`` route of a resolved layout (the CUDA check is :func:`training_views`')."""
    if any(recipe.op(R.RandAugment) is not None for recipe in resolved.recipes()):  # type: ignore[union-attr]
        raise ConfigError("data.decode=gpu cannot run RandAugment (timm's PIL ops, Mugs' strong views) on the "
                          "device: use data.decode=cpu")
    encoded = ViewDataset(dataset, EncodedViews(resolved), lazy=True)
    return TrainingViews(encoded, DecodeOnDevice(resolved, data.mean, data.std), "gpu_decode", collate_encoded)
