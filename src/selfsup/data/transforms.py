"""The per-image backend of the augmentation recipes (:mod:`selfsup.data.recipes`): PIL → normalised float tensor,
with torchvision's transforms (and timm's RandAugment), on the loader workers (``data.augment=per_sample``).

All randomness comes from torch's global RNG (torchvision v1 transforms; timm's RandAugment runs under a seed drawn
from torch), so reseeding torch per sample reproduces views: see :mod:`selfsup.data.loader`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from timm.data import auto_augment, rand_augment_transform
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from selfsup.config import IMAGENET_MEAN, IMAGENET_STD, ConfigError, DataConfig, check_choice
from selfsup.data import recipes as R
from selfsup.data.recipes import blur_kernel_size  # noqa: F401  (re-exported: the blur side of the recipes)

TRANSFORMS = ("aug+", "weak", "moco_v1", "eval")

Transform = Callable[[Image.Image], torch.Tensor]


class RandomPILBlur:
    """With probability ``p``: PIL Gaussian blur with radius ~ U(radius_min, radius_max) (DINO / Mugs)."""

    def __init__(self, p: float, radius_min: float, radius_max: float):
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, image: Image.Image) -> Image.Image:
        if torch.rand(()).item() >= self.p:
            return image
        radius = self.radius_min + (self.radius_max - self.radius_min) * torch.rand(()).item()
        return image.filter(ImageFilter.GaussianBlur(radius=radius))


class RandomSolarize:
    """With probability ``p``: PIL's solarise (pixels ≥ ``threshold`` inverted)."""

    def __init__(self, p: float, threshold: int = 128):
        self.p, self.threshold = p, threshold

    def __call__(self, image: Image.Image) -> Image.Image:
        return ImageOps.solarize(image, self.threshold) if torch.rand(()).item() < self.p else image


def posterize_any_bits(image: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize for every level: 0 bits gives a black image as older Pillow did (Pillow ≥ 10 raises)."""
    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return ImageOps.posterize(image, bits_to_keep)


def build_randaugment(config: str, hparams: dict) -> Callable:
    """timm's ``rand_augment_transform`` with :func:`posterize_any_bits` in its posterize operations."""
    transform = rand_augment_transform(config, hparams)
    for op in transform.ops:
        if op.aug_fn is auto_augment.posterize:
            op.aug_fn = posterize_any_bits
    return transform


class TorchSeeded:
    """Run a transform that draws from Python's ``random`` and NumPy under a seed drawn from torch's RNG,
    leaving both global generators as they were."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, image):
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
        py_state, np_state = random.getstate(), np.random.get_state()
        random.seed(seed)
        np.random.seed(seed)
        try:
            return self.transform(image)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def randaugment(op: R.RandAugment, size: int, mean: Sequence[float]) -> TorchSeeded:
    """timm's RandAugment as Mugs sets it: translations up to ``op.translate`` x ``size``, the mean colour as fill."""
    hparams = {"translate_const": int(size * op.translate), "img_mean": tuple(min(255, round(255 * m)) for m in mean)}
    return TorchSeeded(build_randaugment(op.config, hparams))


def _interpolation(name: str) -> InterpolationMode:
    check_choice("interpolation", name.lower(), [m.value for m in InterpolationMode])
    return InterpolationMode(name.lower())


def pil_transform(recipe: R.Recipe, mean: Sequence[float] = IMAGENET_MEAN,
                  std: Sequence[float] = IMAGENET_STD) -> Transform:
    """The per-image pipeline of a resolved recipe: its ops in order, then ToTensor, random erasing (on the [0, 1]
    tensor, as torchvision and Mugs do) and Normalize."""
    steps: list[Callable] = []
    erasing: list[Callable] = []
    for op in recipe.ops:
        if isinstance(op, R.ResizedCrop):
            steps.append(T.RandomResizedCrop(op.size, scale=op.scale, ratio=op.ratio,
                                             interpolation=_interpolation(op.interpolation)))
        elif isinstance(op, R.Flip):
            steps.append(T.RandomHorizontalFlip(op.p))
        elif isinstance(op, R.ColorJitter):
            jitter = T.ColorJitter(op.brightness, op.contrast, op.saturation, op.hue)
            steps.append(jitter if op.p >= 1 else T.RandomApply([jitter], p=op.p))
        elif isinstance(op, R.Grayscale):
            steps.append(T.RandomGrayscale(p=op.p))
        elif isinstance(op, R.GaussianBlur):
            steps.append(RandomPILBlur(op.p, *op.sigma) if op.pil
                         else T.RandomApply([T.GaussianBlur(op.kernel, sigma=op.sigma)], p=op.p))
        elif isinstance(op, R.Solarize):
            steps.append(RandomSolarize(op.p, op.threshold))
        elif isinstance(op, R.RandAugment):
            steps.append(randaugment(op, recipe.size, mean))
        elif isinstance(op, R.RandomErasing):
            erasing.append(T.RandomErasing(p=op.p, value="random"))
    return T.Compose([*steps, T.ToTensor(), *erasing, T.Normalize(mean=list(mean), std=list(std))])


def eval_transform(image_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                   crop_ratio: float = 0.875, interpolation: str = "bilinear") -> Transform:
    """Resize(size / ratio) -> CenterCrop(size) -> ToTensor -> Normalize (1.0 resizes straight to ``image_size``)."""
    if not 0 < crop_ratio <= 1:
        raise ConfigError(f"data.eval_crop_ratio must be in (0, 1], got {crop_ratio}")
    return T.Compose([T.Resize(round(image_size / crop_ratio), interpolation=_interpolation(interpolation)),
                      T.CenterCrop(image_size), T.ToTensor(), T.Normalize(mean=list(mean), std=list(std))])


def build_transform(
    name: str,
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    blur: bool = True,
    crop_ratio: float = 0.875,
    *,
    scale: tuple[float, float] = (0.2, 1.0),
    flip: bool = True,
    interpolation: InterpolationMode | str = InterpolationMode.BILINEAR,
) -> Transform:
    """One of :data:`TRANSFORMS`: the recipes ``aug+`` (MoCo-v2 / UMBC strong), ``weak``, ``moco_v1``, or ``eval``.

    ``scale`` is the RandomResizedCrop area range of the random recipes; ``crop_ratio`` the eval centre crop.
    ``flip=False`` drops the horizontal flip (for data whose meaning changes under a mirror, e.g. digits).
    """
    check_choice("transform", name, TRANSFORMS)
    if image_size < 1:
        raise ConfigError(f"data.image_size must be positive, got {image_size}")
    interpolation = interpolation.value if isinstance(interpolation, InterpolationMode) else str(interpolation)
    _interpolation(interpolation)
    if name == "eval":
        return eval_transform(image_size, mean, std, crop_ratio, interpolation)
    recipe = R.named_recipe(name)
    recipe = R.Recipe(recipe.name, tuple(
        R.ResizedCrop(op.size, op.scale, op.ratio, interpolation.lower()) if isinstance(op, R.ResizedCrop) else op
        for op in recipe.ops))
    return pil_transform(recipe.resolved(image_size, tuple(scale), flip, blur), mean, std)


def transform_from_config(cfg: DataConfig, name: str) -> Transform:
    """:func:`build_transform` with the image size, statistics, blur and eval crop of ``cfg``."""
    return build_transform(name, cfg.image_size, mean=cfg.mean, std=cfg.std, blur=cfg.blur,
                           crop_ratio=cfg.eval_crop_ratio, scale=cfg.crop_scale, flip=cfg.flip)


class PerImageViews:
    """``image -> (views, choices)``: every view of a resolved :class:`~selfsup.data.recipes.ViewLayout`, per image.

    A choice draws u ~ U[0, 1) before its views and takes the alternative when u < p (reported as a 0-d bool)."""

    def __init__(self, layout: R.ViewLayout, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD):
        def build(recipes: Sequence[R.Recipe | str]) -> list[Transform]:
            return [pil_transform(recipe, mean, std) for recipe in recipes]  # type: ignore[arg-type]

        self.slots = [(name, build(default), build(alternative), p)
                      for name, default, alternative, p in layout.options()]

    def __call__(self, image: Image.Image) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        views: list[torch.Tensor] = []
        choices: dict[str, torch.Tensor] = {}
        for name, default, alternative, p in self.slots:
            transforms = default
            if name is not None:
                chosen = bool(torch.rand(()).item() < p)
                choices[name] = torch.tensor(chosen)
                transforms = alternative if chosen else default
            views += [transform(image) for transform in transforms]
        return views, choices
