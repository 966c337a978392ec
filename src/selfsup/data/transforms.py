"""Augmentation recipes of the papers (methods.md §0), scaled to the training image size.

``build_transform(name, image_size)`` returns a PIL -> normalised float tensor callable. All randomness
comes from torch's global RNG (torchvision v1 transforms), so reseeding torch per sample reproduces views.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from selfsup.config import IMAGENET_MEAN, IMAGENET_STD, ConfigError, DataConfig, check_choice

TRANSFORMS = ("aug+", "weak", "moco_v1", "eval")

Transform = Callable[[Image.Image], torch.Tensor]


def blur_kernel_size(image_size: int) -> int:
    """Odd kernel side of about 10% of the image (23 at 224 px), at least 3."""
    k = max(3, round(0.1 * image_size))
    return k if k % 2 else k + 1


def gaussian_blur(image_size: int) -> T.GaussianBlur:
    """MoCo-v2's blur (sigma ~ U[0.1, 2.0] at 224 px) with sigma scaled by ``image_size / 224``."""
    scale = image_size / 224
    return T.GaussianBlur(blur_kernel_size(image_size), sigma=(0.1 * scale, 2.0 * scale))


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
    """One of :data:`TRANSFORMS`: ``aug+`` (MoCo-v2 / UMBC strong), ``weak``, ``moco_v1``, ``eval``.

    ``scale`` is the RandomResizedCrop area range of the random recipes; ``crop_ratio`` the eval
    centre crop (Resize(size / ratio) -> CenterCrop(size); 1.0 resizes straight to ``image_size``).
    ``flip=False`` drops the horizontal flip (for data whose meaning changes under a mirror, e.g. digits).
    """
    check_choice("transform", name, TRANSFORMS)
    if image_size < 1:
        raise ConfigError(f"data.image_size must be positive, got {image_size}")
    if isinstance(interpolation, str):
        modes = [m.value for m in InterpolationMode]
        check_choice("interpolation", interpolation.lower(), modes)
        interpolation = InterpolationMode(interpolation.lower())
    finish = [T.ToTensor(), T.Normalize(mean=list(mean), std=list(std))]
    if name == "eval":
        if not 0 < crop_ratio <= 1:
            raise ConfigError(f"data.eval_crop_ratio must be in (0, 1], got {crop_ratio}")
        resize = round(image_size / crop_ratio)
        return T.Compose([T.Resize(resize, interpolation=interpolation), T.CenterCrop(image_size), *finish])
    crop = T.RandomResizedCrop(image_size, scale=scale, interpolation=interpolation)
    mirror = [T.RandomHorizontalFlip()] if flip else []
    if name == "weak":
        steps: list[Callable] = [crop, *mirror]
    elif name == "moco_v1":
        steps = [crop, T.RandomGrayscale(p=0.2), T.ColorJitter(0.4, 0.4, 0.4, 0.4), *mirror]
    else:  # aug+
        steps = [crop, T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(p=0.2)]
        if blur:
            steps.append(T.RandomApply([gaussian_blur(image_size)], p=0.5))
        steps += mirror
    return T.Compose([*steps, *finish])


def transform_from_config(cfg: DataConfig, name: str) -> Transform:
    """:func:`build_transform` with the image size, statistics, blur and eval crop of ``cfg``."""
    return build_transform(name, cfg.image_size, mean=cfg.mean, std=cfg.std, blur=cfg.blur,
                           crop_ratio=cfg.eval_crop_ratio, scale=cfg.crop_scale, flip=cfg.flip)
