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

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms import functional as TF
from torchvision.transforms.functional import pil_to_tensor

from selfsup.config import DataConfig
from selfsup.data import recipes as R
from selfsup.data.batch_augment import BatchAugment, batch_augment
from selfsup.data.datasets import ArrayDataset
from selfsup.data.loader import Choices, ImageTensorDataset, ViewDataset
from selfsup.data.transforms import PerImageViews, randaugment

DeviceStep = Callable[[object, Choices, torch.Generator], list[Tensor]]  # loader views -> views on the device


# ---------------------------------------------------------------------------------------------- stage 1


class Stage1:
    """One view's geometry on a PIL image (RGB): a random-resized crop with torchvision's law, resized (antialiased)
    to the output size, flipped with the recipe's probability, RandAugment if the recipe has it; uint8 CHW."""

    def __init__(self, recipe: R.Recipe, mean: Sequence[float]):
        self.recipe = recipe
        crop = recipe.crop
        self.size, self.scale, self.ratio = recipe.size, list(crop.scale), list(crop.ratio)
        self.interpolation = TF.InterpolationMode(crop.interpolation)
        op = recipe.op(R.RandAugment)
        self.randaugment = randaugment(op, recipe.size, mean) if op is not None else None

    def __call__(self, image: Image.Image) -> Tensor:
        top, left, height, width = RandomResizedCrop.get_params(image, self.scale, self.ratio)
        view = TF.resized_crop(image, top, left, height, width, [self.size, self.size], self.interpolation,
                               antialias=True)
        if self.recipe.flip_p > 0 and torch.rand(()).item() < self.recipe.flip_p:
            view = TF.hflip(view)
        if self.randaugment is not None:
            view = self.randaugment(view)
        return pil_to_tensor(view)


class StagedViews:
    """``image -> (uint8 views, choices)``: stage 1 of every view of a resolved layout; a choice draws u ~ U[0, 1)
    before its views and takes the alternative when u < p, as :class:`~selfsup.data.transforms.PerImageViews`."""

    def __init__(self, layout: R.ViewLayout, mean: Sequence[float]):
        def build(recipes: Sequence[R.Recipe | str]) -> list[Stage1]:
            return [Stage1(recipe, mean) for recipe in recipes]  # type: ignore[arg-type]

        self.slots: list[tuple[str | None, list[Stage1], list[Stage1], float]] = []
        for slot in layout.slots:
            if isinstance(slot, R.Choice):
                self.slots.append((slot.name, build(slot.default), build(slot.alternative), slot.p))
            else:
                self.slots.append((None, build([slot]), [], 0.0))

    def __call__(self, image: Image.Image) -> tuple[list[Tensor], Choices]:
        views: list[Tensor] = []
        choices: Choices = {}
        for name, default, alternative, p in self.slots:
            stages = default
            if name is not None:
                chosen = bool(torch.rand(()).item() < p)
                choices[name] = torch.tensor(chosen)
                stages = alternative if chosen else default
            views += [stage(image) for stage in stages]
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
        device = views[0].device
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
        return [augment(images, generator) for augment in self.augments]


# ---------------------------------------------------------------------------------------------- the route


@dataclass
class TrainingViews:
    """The loader's data set and, for ``data.augment=batch``, the device step that completes the views."""

    dataset: Dataset  # samples (views, choices, index, label)
    device_step: nn.Module | None  # (loader views on the device, CPU choices, generator) -> views; None: ready
    route: str  # per_sample | device | two_stage

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


def training_views(layout: R.ViewLayout, data: DataConfig, dataset: Dataset) -> TrainingViews:
    """The route of ``data.augment`` for ``layout`` (sizes, scales, flips and blurs from ``data``) on ``dataset``."""
    resolved = layout.resolved(data.image_size, tuple(data.crop_scale), data.flip, data.blur)
    if data.augment == "per_sample":
        return TrainingViews(ViewDataset(dataset, PerImageViews(resolved, data.mean, data.std)), None, "per_sample")
    if uniform_in_memory(dataset) and on_device_geometry(resolved):
        return TrainingViews(ImageTensorDataset(dataset), DeviceViews(resolved, data.mean, data.std), "device")
    return TrainingViews(ViewDataset(dataset, StagedViews(resolved, data.mean)), Stage2(resolved, data.mean, data.std),
                         "two_stage")
