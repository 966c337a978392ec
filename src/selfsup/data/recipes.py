"""Augmentation recipes as data: each recipe is one declarative description (ops with their parameters and
probabilities), and a method's views are a layout of recipes. Every backend is built from these descriptions:

- per image, PIL/torchvision on the loader workers (``data.augment=per_sample``): :mod:`selfsup.data.transforms`;
- batched tensor ops (``data.augment=batch``): :mod:`selfsup.data.pipeline` — stage 1 (the geometry: random
  resized crop and flip straight to the output size, uint8; RandAugment) per image on the workers, or on the
  device for in-memory data sets of one image size; stage 2 (colour, grey, blur, solarise, erasing,
  normalisation) on the training device, batched per recipe and output size (:mod:`selfsup.data.batch_augment`).

Sizes, crop scales, flips and blurs left open (``None``) are filled from the ``data`` section when the layout is
resolved (:meth:`ViewLayout.resolved`): ``data.image_size``, ``data.crop_scale``, ``data.flip``, ``data.blur``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from selfsup.errors import ConfigError


@dataclass(frozen=True)
class ResizedCrop:
    """RandomResizedCrop: an area fraction in ``scale`` and an aspect ratio in ``ratio`` (log-uniform), resized."""

    size: int | None = None  # output side; None: data.image_size
    scale: tuple[float, float] | None = None  # None: data.crop_scale
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bilinear"  # bilinear (MoCo, UMBC) | bicubic (DINO, Mugs)


@dataclass(frozen=True)
class Flip:
    p: float = 0.5  # dropped when data.flip=false


@dataclass(frozen=True)
class ColorJitter:
    brightness: float
    contrast: float
    saturation: float
    hue: float
    p: float = 1.0  # RandomApply's probability (1: always, without a draw, as MoCo-v1's recipe)


@dataclass(frozen=True)
class Grayscale:
    p: float


@dataclass(frozen=True)
class GaussianBlur:
    """Gaussian blur with σ ~ U(sigma), given at 224 px and scaled by the reference side / 224 (dropped when
    ``data.blur=false``). ``pil``: PIL's ``ImageFilter.GaussianBlur(radius=σ)`` (DINO, Mugs) instead of torchvision's
    kernel of side ``kernel`` (MoCo-v2; None: about 10 % of the view, 23 at 224 px)."""

    p: float
    sigma: tuple[float, float] = (0.1, 2.0)
    reference: str = "view"  # view: the view's side | data: data.image_size (Mugs blurs locals as globals) | pixels
    pil: bool = False
    kernel: int | None = None


@dataclass(frozen=True)
class Solarize:
    p: float
    threshold: int = 128  # of 255, as PIL's ImageOps.solarize


@dataclass(frozen=True)
class RandAugment:
    config: str = "rand-m9-mstd0.5-inc1"  # timm's notation
    translate: float = 0.45  # the translation limit, as a fraction of the crop side


@dataclass(frozen=True)
class RandomErasing:
    p: float  # torchvision's RandomErasing(p, scale (0.02, 0.33), ratio (0.3, 3.3), value="random")


Op = ResizedCrop | Flip | ColorJitter | Grayscale | GaussianBlur | Solarize | RandAugment | RandomErasing


def blur_kernel_size(image_size: int) -> int:
    """Odd kernel side of about 10% of the image (23 at 224 px), at least 3."""
    k = max(3, round(0.1 * image_size))
    return k if k % 2 else k + 1


@dataclass(frozen=True)
class Recipe:
    """One view's augmentation: ``ops`` in the order the per-image pipeline applies them; one :class:`ResizedCrop`."""

    name: str
    ops: tuple[Op, ...]

    def __post_init__(self) -> None:
        crops = [op for op in self.ops if isinstance(op, ResizedCrop)]
        if len(crops) != 1:
            raise ConfigError(f"augmentation recipe {self.name!r} needs exactly one ResizedCrop, got {len(crops)}")

    def op(self, kind: type) -> Op | None:
        """The recipe's op of that kind, or None."""
        return next((op for op in self.ops if isinstance(op, kind)), None)

    @property
    def crop(self) -> ResizedCrop:
        return self.op(ResizedCrop)  # type: ignore[return-value]

    @property
    def size(self) -> int:
        if self.crop.size is None:
            raise ValueError(f"recipe {self.name!r} is not resolved: its size comes from data.image_size")
        return self.crop.size

    @property
    def flip_p(self) -> float:
        flip = self.op(Flip)
        return flip.p if flip is not None else 0.0

    def photometric(self) -> tuple[Op, ...]:
        """The ops after the geometry, for stage 2: all but the crop, the flip (it commutes with every per-pixel op
        and with the symmetric blur) and RandAugment (its geometric ops run in stage 1)."""
        return tuple(op for op in self.ops if not isinstance(op, (ResizedCrop, Flip, RandAugment)))

    def resolved(self, image_size: int, crop_scale: tuple[float, float], flip: bool, blur: bool) -> Recipe:
        """Open sizes, scales and blur references filled in; the flip and blur dropped when switched off."""
        crop = self.crop
        size = crop.size or image_size
        ops: list[Op] = []
        for op in self.ops:
            if isinstance(op, ResizedCrop):
                op = replace(op, size=size, scale=tuple(op.scale or crop_scale))
            elif isinstance(op, Flip) and not flip or isinstance(op, GaussianBlur) and not blur:
                continue
            elif isinstance(op, GaussianBlur) and op.reference != "pixels":
                reference = size if op.reference == "view" else image_size
                sigma = (op.sigma[0] * reference / 224, op.sigma[1] * reference / 224)
                # PIL's blur has no kernel side: the batched one covers ±3σ of the largest σ
                kernel = op.kernel or (2 * math.ceil(3 * sigma[1]) + 1 if op.pil else blur_kernel_size(size))
                op = replace(op, sigma=sigma, reference="pixels", kernel=kernel)
            ops.append(op)
        return Recipe(self.name, tuple(ops))


@dataclass(frozen=True)
class Choice:
    """Per image, the views ``alternative`` with probability ``p``, else ``default`` (the same number of views, of
    the same sizes). The batch reports the draw as ``choices[name]`` (True: the alternative)."""

    name: str
    default: tuple[Recipe | str, ...]
    alternative: tuple[Recipe | str, ...]
    p: float

    def __post_init__(self) -> None:
        if len(self.default) != len(self.alternative):
            raise ConfigError(f"view choice {self.name!r}: its two options need the same number of views")


Slot = Recipe | Choice | str


@dataclass(frozen=True)
class ViewLayout:
    """A method's views, in order: recipes (or recipe names, :data:`NAMED`) and per-image :class:`Choice` es."""

    slots: tuple[Slot, ...]

    @classmethod
    def of(cls, *slots: Slot) -> ViewLayout:
        return cls(tuple(slots))

    def views(self) -> list[tuple[Recipe | str, ...]]:
        """Per view position, the recipes it can take: one, or (default, alternative) of a choice."""
        out: list[tuple[Recipe | str, ...]] = []
        for slot in self.slots:
            if isinstance(slot, Choice):
                out += [(a, b) for a, b in zip(slot.default, slot.alternative, strict=True)]
            else:
                out.append((slot,))
        return out

    def options(self) -> list[tuple[str | None, tuple[Recipe | str, ...], tuple[Recipe | str, ...], float]]:
        """Per slot, (its choice's name or None, the default views, the alternative views, p): the shape every
        backend draws from (a fixed recipe is a slot without a choice)."""
        return [(slot.name, slot.default, slot.alternative, slot.p) if isinstance(slot, Choice) else
                (None, (slot,), (), 0.0) for slot in self.slots]

    def choices(self) -> list[Choice]:
        return [slot for slot in self.slots if isinstance(slot, Choice)]

    def recipes(self) -> list[Recipe | str]:
        return [recipe for options in self.views() for recipe in options]

    def resolved(self, image_size: int, crop_scale: tuple[float, float], flip: bool, blur: bool) -> ViewLayout:
        """Names replaced by their recipes and every recipe :meth:`Recipe.resolved`."""

        def fill(recipe: Recipe | str) -> Recipe:
            return named_recipe(recipe).resolved(image_size, crop_scale, flip, blur) if isinstance(recipe, str) \
                else recipe.resolved(image_size, crop_scale, flip, blur)

        slots: list[Slot] = []
        for slot in self.slots:
            if isinstance(slot, Choice):
                slot = replace(slot, default=tuple(map(fill, slot.default)),
                               alternative=tuple(map(fill, slot.alternative)))
            else:
                slot = fill(slot)
            slots.append(slot)
        return ViewLayout(tuple(slots))

    def describe(self) -> str:
        """E.g. ``2 x aug+`` or ``weak + aug+`` or ``2 x dino_weak_global, 2 x (weak | strong) ...``."""
        def name(recipe: Recipe | str) -> str:
            return recipe if isinstance(recipe, str) else recipe.name

        parts: list[str] = []
        for slot in self.slots:
            if isinstance(slot, Choice):
                parts.append(f"{slot.name}: {'+'.join(map(name, slot.default))} | "
                             f"{'+'.join(map(name, slot.alternative))} (p {slot.p:g})")
            else:
                parts.append(name(slot))
        counted: list[str] = []
        for part in parts:  # runs of equal parts as "n x part"
            if counted and counted[-1].split(" x ", 1)[-1] == part:
                n = int(counted[-1].split(" x ", 1)[0]) if " x " in counted[-1] else 1
                counted[-1] = f"{n + 1} x {part}"
            else:
                counted.append(part)
        return ", ".join(counted)


# ---------------------------------------------------------------------------------------------- the papers' recipes


def aug_plus() -> Recipe:
    """MoCo-v2's AUG+ (the UMBC "strong" view): crop, jitter 0.4/0.4/0.4/0.1 p 0.8, grey 0.2, blur p 0.5, flip."""
    return Recipe("aug+", (ResizedCrop(), ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8), Grayscale(0.2), GaussianBlur(0.5),
                           Flip()))


def weak() -> Recipe:
    """The UMBC "weak" view (MSF, ISD+ targets): crop and flip."""
    return Recipe("weak", (ResizedCrop(), Flip()))


def moco_v1() -> Recipe:
    """MoCo-v1's recipe (SeLa's augs=3): crop, grey 0.2, jitter 0.4 x4 always, flip."""
    return Recipe("moco_v1", (ResizedCrop(), Grayscale(0.2), ColorJitter(0.4, 0.4, 0.4, 0.4), Flip()))


NAMED = {"aug+": aug_plus, "weak": weak, "moco_v1": moco_v1}


def named_recipe(name: str) -> Recipe:
    from selfsup.errors import check_choice

    check_choice("transform", name, [*NAMED, "eval"])
    if name == "eval":
        raise ConfigError("'eval' is the deterministic evaluation transform, not a training view")
    return NAMED[name]()


def dino_weak(name: str, size: int | None, scale: tuple[float, float], blur_p: float, solarize_p: float = 0.0,
              jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)) -> Recipe:
    """DINO/Mugs weak crop: crop (bicubic), flip, jitter p 0.8, grey 0.2, PIL blur p ``blur_p`` (σ 0.1-2.0 at 224 px,
    scaled with the global crop side), solarise p ``solarize_p``. Zero jitter strengths skip those operations."""
    ops: list[Op] = [ResizedCrop(size, scale, interpolation="bicubic"), Flip(),
                     ColorJitter(*jitter, p=0.8), Grayscale(0.2), GaussianBlur(blur_p, reference="data", pil=True)]
    if solarize_p:
        ops.append(Solarize(solarize_p))
    return Recipe(name, tuple(ops))


def mugs_strong(name: str, size: int | None, scale: tuple[float, float], randaugment: str = "rand-m9-mstd0.5-inc1",
                translate: float = 0.45, erase_p: float = 0.25) -> Recipe:
    """Mugs' strong view: flip, RandAugment (timm, before the crop in the per-image pipeline), crop (bicubic),
    random erasing with per-pixel normal noise (on the [0, 1] image, before normalisation)."""
    ops: list[Op] = [Flip(), RandAugment(randaugment, translate), ResizedCrop(size, scale, interpolation="bicubic")]
    if erase_p > 0:
        ops.append(RandomErasing(erase_p))
    return Recipe(name, tuple(ops))
