"""Multi-crop views of DINO and Mugs (methods.md §6 "Views"), scaled to any global crop size.

- weak global 1: RRC(scale, bicubic) → flip → ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8 → grey 0.2 → blur p 1.0
- weak global 2: the same with blur p 0.1 and solarise p 0.2
- weak local:    RRC(local size, local scale) → flip/colour as above → blur p 0.5
- strong:        flip → RandAugment (timm ``rand-m9-mstd0.5-inc1``, translate = 0.45 × crop size, *before*
  cropping) → RRC(bicubic) → RandomErasing(0.25, per-pixel normal noise)

``jitter`` (brightness, contrast, saturation, hue) is DINO's (0.4, 0.4, 0.2, 0.1); zeros skip those
operations (saturation and hue do nothing on grey images such as Fashion-MNIST but cost the most time).
Blur radii are DINO's U(0.1, 2.0) px at 224 px, scaled by global size / 224. Random erasing acts on the
[0, 1] image before normalisation, as the official pipeline does (its normalisation runs later, on the GPU).
Every draw comes from torch's RNG; timm's RandAugment (Python ``random`` and NumPy) is run under a seed
drawn from torch, so a sample's views depend on nothing but its seed (see ``selfsup.data.loader``).
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

Transform = Callable[[Image.Image], torch.Tensor]


class RandomPILBlur:
    """With probability ``p``: PIL Gaussian blur with radius ~ U(radius_min, radius_max)."""

    def __init__(self, p: float, radius_min: float, radius_max: float):
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, image: Image.Image) -> Image.Image:
        if torch.rand(()).item() >= self.p:
            return image
        radius = self.radius_min + (self.radius_max - self.radius_min) * torch.rand(()).item()
        return image.filter(ImageFilter.GaussianBlur(radius=radius))


class RandomSolarize:
    def __init__(self, p: float):
        self.p = p

    def __call__(self, image: Image.Image) -> Image.Image:
        return ImageOps.solarize(image) if torch.rand(()).item() < self.p else image


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


class MultiCrop:
    """The transforms of one Mugs sample; ``global_size``/``local_size`` are the crop sides in pixels."""

    def __init__(self, global_size: int, local_size: int, *, global_scale: Sequence[float] = (0.25, 1.0),
                 local_scale: Sequence[float] = (0.05, 0.25), mean: Sequence[float], std: Sequence[float],
                 flip: bool = True, blur: bool = True, randaugment: str = "rand-m9-mstd0.5-inc1",
                 strong_ratio: float = 0.45, erase_prob: float = 0.25,
                 jitter: Sequence[float] = (0.4, 0.4, 0.2, 0.1)):
        self.mirror: list[Callable] = [T.RandomHorizontalFlip()] if flip else []
        colour = [T.RandomApply([T.ColorJitter(*jitter)], p=0.8), T.RandomGrayscale(p=0.2)]
        self.finish = [T.ToTensor(), T.Normalize(list(mean), list(std))]
        self.mean = mean
        radius = (0.1 * global_size / 224, 2.0 * global_size / 224)

        def weak(size: int, scale: Sequence[float], blur_p: float, solarize_p: float = 0.0) -> Transform:
            steps = [T.RandomResizedCrop(size, scale=tuple(scale), interpolation=InterpolationMode.BICUBIC),
                     *self.mirror, *colour]
            if blur:
                steps.append(RandomPILBlur(blur_p, *radius))
            if solarize_p:
                steps.append(RandomSolarize(solarize_p))
            return T.Compose([*steps, *self.finish])

        self.weak_global_1 = weak(global_size, global_scale, 1.0)
        self.weak_global_2 = weak(global_size, global_scale, 0.1, 0.2)
        self.weak_local = weak(local_size, local_scale, 0.5)
        self.strong_global = self._strong(global_size, global_scale, randaugment, strong_ratio, erase_prob)
        self.strong_local = self._strong(local_size, local_scale, randaugment, strong_ratio, erase_prob)

    def _strong(self, size: int, scale: Sequence[float], config: str, strong_ratio: float,
                erase_prob: float) -> Transform:
        hparams = {"translate_const": int(size * strong_ratio),
                   "img_mean": tuple(min(255, round(255 * m)) for m in self.mean)}
        erase = [T.RandomErasing(p=erase_prob, value="random")] if erase_prob > 0 else []
        normalize = self.finish[1]
        return T.Compose([*self.mirror, TorchSeeded(build_randaugment(config, hparams)),
                          T.RandomResizedCrop(size, scale=tuple(scale), interpolation=InterpolationMode.BICUBIC),
                          T.ToTensor(), *erase, normalize])


class MugsViews:
    """``image -> ([teacher g1, teacher g2, student g1, student g2, local_1 … local_L], {"student_weak": flag})``.

    The teacher's globals are always weak. The student's two globals are, per image, both fresh weak draws
    (flag true) or, with probability ``strong_prob``, both strong; each local crop is strong with
    probability ``strong_prob``. The flag is a 0-d bool tensor (a (B,) batch after collation).
    """

    def __init__(self, crops: MultiCrop, num_local: int, strong_prob: float = 0.5):
        self.crops = crops
        self.num_local = num_local
        self.strong_prob = strong_prob

    def __call__(self, image: Image.Image) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        c = self.crops
        views = [c.weak_global_1(image), c.weak_global_2(image)]
        weak = bool(torch.rand(()).item() >= self.strong_prob)
        if weak:
            views += [c.weak_global_1(image), c.weak_global_2(image)]
        else:
            views += [c.strong_global(image), c.strong_global(image)]
        for _ in range(self.num_local):
            strong = torch.rand(()).item() < self.strong_prob
            views.append(c.strong_local(image) if strong else c.weak_local(image))
        return views, {"student_weak": torch.tensor(weak)}
