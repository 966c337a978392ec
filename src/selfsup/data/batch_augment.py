"""The batched backend of the augmentation recipes (:mod:`selfsup.data.recipes`): tensor ops on the training device.

Every op takes a float batch ``(B, C, H, W)`` in [0, 1] and per-sample parameter tensors, and runs a fixed
number of tensor kernels whatever the batch size (no Python loop over samples, no host synchronisation), on
the device of the input. Two CPU-only shortcuts, where reading a tensor costs no sync: :class:`BatchAugment`
processes a CPU batch in cache-sized chunks, and the masked blur convolves only the selected samples. The ops
follow torchvision's *tensor* kernels (``transforms.v2.functional``); the tests check each against them with
fixed parameters. Differences from the per-sample PIL pipeline of :func:`selfsup.data.transforms.build_transform`:

* Random crops are sampled with bilinear interpolation and **no antialiasing** (torchvision's
  ``resized_crop(..., antialias=False)``); PIL antialiases when a crop is shrunk. Identical when crops are
  upsampled (e.g. 32 px crops of 32 px images); aliasing when the source is much larger than the output.
* Values stay float between ops; the PIL pipeline rounds to uint8 after every op, and PIL's own colour ops
  (grey mean rounded to an integer, 8-bit HSV) differ slightly from torchvision's tensor kernels.
* Luma weights are torchvision's tensor ones, 0.2989 / 0.587 / 0.114 (PIL's ``convert("L")`` uses
  0.299 / 0.587 / 0.114 in integer arithmetic).
* All images of a batch share one size. Variable-size data sets crop on the loader workers instead (stage 1 of
  :mod:`selfsup.data.pipeline`, PIL with antialiasing, bicubic where the recipe says so) and this module runs the
  rest (``geometry=False``).
* Bilinear interpolation only for the on-device crop (no bicubic RandomResizedCrop as in DINO / Mugs).
* DINO/Mugs' PIL blur (``ImageFilter.GaussianBlur(radius=σ)``, an approximation by box filters) is a true Gaussian of
  σ = radius here, over ±3σ of the largest σ.
* Colour jitter applies its four adjustments in an independent random order **per sample** (torchvision
  draws one order per call, i.e. per image, so the distribution is the same).

Parameters are drawn with the ``torch.Generator`` passed in, on that generator's device, then moved to the
images' device: a CPU generator gives the same views on CPU and CUDA (small pinned, asynchronous copies); a
CUDA generator keeps everything on the GPU. Move a :class:`BatchAugment` to the images' device like any module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.config import IMAGENET_MEAN, IMAGENET_STD, ConfigError, DataConfig, check_choice
from selfsup.data import recipes as R
from selfsup.data.transforms import TRANSFORMS

Factor = Tensor | float
LUMA = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")  # ids 0-3 of a jitter order, as torchvision's fn_idx


# ---------------------------------------------------------------------------------------------- geometry


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _source_coords(start: Tensor, length: Tensor, out: int, limit: int) -> Tensor:
    """Pixel centres (B, out) that a bilinear resize of ``[start, start + length)`` to ``out`` samples.

    Half-pixel convention of ``interpolate(align_corners=False)``: ``src = (dst + 0.5) * length / out - 0.5``
    inside the crop, clamped to the crop's first/last pixel as the resize of a cropped tensor does; returned
    as ``grid_sample`` coordinates (align_corners=False) of an image ``limit`` pixels long.
    """
    dst = torch.arange(out, device=start.device, dtype=torch.float64) + 0.5
    length = length.to(torch.float64)[:, None]
    src = (dst * (length / out) - 0.5).clamp(min=0.0)
    src = torch.minimum(src, length - 1) + start.to(torch.float64)[:, None]
    return (2 * src + 1) / limit - 1


def resized_crop_flip(images: Tensor, boxes: Tensor, flip: Tensor, size: int | Sequence[int]) -> Tensor:
    """Crop ``boxes`` (B, 4) = (top, left, height, width) in pixels, resize to ``size`` and mirror where ``flip``.

    One ``grid_sample`` over per-sample axis-aligned grids. Equals torchvision's
    ``hflip(resized_crop(img, *box, size, BILINEAR, antialias=False))`` up to float rounding: the grid puts
    output pixel j of a crop at ``left + (j + 0.5) * width / out_w - 0.5`` (align_corners=False) and clamps
    it to the crop, so pixels outside the crop never leak in. No antialias when shrinking.
    """
    b, _, h, w = images.shape
    oh, ow = _pair(size)
    boxes = boxes.to(images.device)
    flip = flip.to(images.device)
    ys = _source_coords(boxes[:, 0], boxes[:, 2], oh, h)
    xs = _source_coords(boxes[:, 1], boxes[:, 3], ow, w)
    xs = torch.where(flip[:, None], xs.flip(1), xs)
    grid = torch.stack((xs[:, None, :].expand(b, oh, ow), ys[:, :, None].expand(b, oh, ow)), dim=-1)
    return F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode="border", align_corners=False)


def resize_center_crop(images: Tensor, resize: int, size: int | Sequence[int]) -> Tensor:
    """Deterministic eval view: shorter side to ``resize`` (bilinear, antialiased), then a centre crop.

    Equals torchvision's ``center_crop(resize(img, resize, antialias=True), size)`` on tensors.
    """
    h, w = images.shape[-2:]
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(resize * long / short)
    nh, nw = (resize, new_long) if h <= w else (new_long, resize)
    if (nh, nw) != (h, w):
        images = F.interpolate(images, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    ch, cw = _pair(size)
    if ch > nh or cw > nw:
        raise ValueError(f"centre crop {ch}x{cw} is larger than the resized image {nh}x{nw}")
    top, left = int(round((nh - ch) / 2.0)), int(round((nw - cw) / 2.0))
    return images[..., top:top + ch, left:left + cw]


# ---------------------------------------------------------------------------------------------- colour


def _per_sample(value: Factor, images: Tensor) -> Tensor | float:
    """A Python number as is; a (B,) tensor as (B, 1, 1, 1) on the images' device and dtype."""
    if isinstance(value, Tensor):
        return value.to(device=images.device, dtype=images.dtype).reshape(-1, 1, 1, 1)
    return float(value)


def _select(mask: Tensor, images: Tensor, other: Tensor) -> Tensor:
    """``other`` for the samples in ``mask``, ``images`` elsewhere; exact (``lerp`` with weight 0 or 1 returns
    its start or end), and much faster than ``torch.where`` on CPU."""
    weight = mask.to(device=images.device, dtype=images.dtype).reshape(-1, 1, 1, 1)
    return torch.lerp(images, other, weight)


def _luma(images: Tensor) -> Tensor:
    """(B, 1, H, W) grey levels; a 1-channel batch is its own grey level."""
    if images.shape[1] == 1:
        return images
    r, g, b = images.unbind(dim=1)
    return r.mul(LUMA[0]).add_(g, alpha=LUMA[1]).add_(b, alpha=LUMA[2]).unsqueeze(1)


def _blend(images: Tensor, other: Tensor | float, factor: Tensor | float) -> Tensor:
    """``factor * images + (1 - factor) * other`` clamped to [0, 1] (torchvision's ``_blend``)."""
    return (images * factor + other * (1 - factor)).clamp(0.0, 1.0)


def adjust_brightness(images: Tensor, factor: Factor) -> Tensor:
    """Multiply by ``factor`` (per sample), clamp to [0, 1]."""
    return (images * _per_sample(factor, images)).clamp(0.0, 1.0)


def adjust_contrast(images: Tensor, factor: Factor) -> Tensor:
    """Blend each image with the mean of its grey levels."""
    mean = _luma(images).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(images, mean, _per_sample(factor, images))


def adjust_saturation(images: Tensor, factor: Factor) -> Tensor:
    """Blend each image with its grey levels (grey batches are returned unchanged, as torchvision)."""
    if images.shape[1] == 1:
        return images
    return _blend(images, _luma(images), _per_sample(factor, images))


def adjust_hue(images: Tensor, factor: Factor) -> Tensor:
    """Rotate the hue by ``factor`` in [-0.5, 0.5] (fraction of a turn), as torchvision's RGB -> HSV -> RGB.

    Closed form of the same maps, in cheap element-wise kernels: per pixel ``max``, ``delta = max - min`` and the
    hue in sixths of a turn ``h`` (torchvision's formula and max-channel priority r > g > b), shifted by
    ``6 * factor`` and wrapped to [-1, 5); channel n (centre c = 0, 2, 4 for r, g, b) is then
    ``max - delta * clamp(d - 1, 0, 1)`` with ``d`` the circular distance from ``h`` to c (period 6).
    Branch-free (0/1 float masks instead of ``torch.where``, which is slow on CPU).
    """
    if images.shape[1] == 1:
        return images
    r, g, b = images.unbind(dim=1)
    maxc = images.amax(dim=1, keepdim=True)
    delta = maxc - images.amin(dim=1, keepdim=True)
    top, d = maxc[:, 0], delta[:, 0]
    is_r = (r - top).sign_().add_(1.0)  # 1 where r is the max, else 0
    is_g = (g - top).sign_().add_(1.0).mul_(1.0 - is_r)
    is_b = 1.0 - is_r - is_g
    h = (g - b).mul_(is_r)
    h += (b - r).add_(d, alpha=2.0).mul_(is_g)
    h += (r - g).add_(d, alpha=4.0).mul_(is_b)
    h = h.div_(d.clamp(min=torch.finfo(d.dtype).tiny)).unsqueeze(1)  # in [-1, 5]; grey pixels: 0
    h = h.add_(_per_sample(factor, images) * 6.0)  # in [-4, 8]
    h = h.sub_(((h + 1.0) / 6.0).floor_().mul_(6.0))  # wrapped to [-1, 5)
    centres = torch.arange(0, 6, 2, device=images.device, dtype=images.dtype).reshape(1, 3, 1, 1)
    dist = (h - centres).abs_().sub_(3.0).abs_()  # 3 - circular distance, in [0, 3]
    ramp = dist.neg_().add_(2.0).clamp_(0.0, 1.0)  # clamp(distance - 1, 0, 1)
    return maxc - ramp.mul_(delta)


def jitter_plan(factors: Tensor, order: Tensor, mask: Tensor | None = None) -> Tensor:
    """Blend coefficients (6, B, 3) of :func:`color_jitter`'s six passes; pass i maps ``x`` to
    ``clamp(f * x + a * grey(x) + c * mean(grey(x)), 0, 1)`` with (f, a, c) = plan[i]: brightness (f, 0, 0),
    contrast (f, 0, 1 - f), saturation (f, 1 - f, 0), identity (1, 0, 0) (exact).

    Passes 0-2 hold order slots 0-2 where they come before the sample's hue slot, passes 3-5 slots 1-3 where they
    come after it. ``mask`` (B,) False makes every pass the identity.
    """
    b = factors.shape[0]
    order = order.to(factors.device).expand(b, 4)
    hue_slot = (order == 3).to(torch.int64).argmax(dim=1)
    passes = torch.arange(6, device=factors.device)
    before = passes < 3
    slots = passes - 2 * (~before).to(torch.int64)  # 0, 1, 2, 1, 2, 3 (no host -> device copy)
    ops = order[:, slots].T  # (6, B)
    active = torch.where(before[:, None], slots[:, None] < hue_slot, slots[:, None] > hue_slot) & (ops != 3)
    if mask is not None:
        active &= mask.to(device=factors.device, dtype=torch.bool)
    f = torch.where(active, factors[:, :3].T.gather(0, ops.clamp(max=2)), torch.ones_like(ops, dtype=factors.dtype))
    return torch.stack(((f, (ops == 2) * (1 - f), (ops == 1) * (1 - f))), dim=-1)


def _jitter_pass(images: Tensor, coef: Tensor) -> Tensor:
    """One pass of a :func:`jitter_plan`; ``coef`` (B, 3)."""
    f, a, c = coef.to(images.dtype).reshape(-1, 3, 1, 1).unbind(dim=1)
    f, a, c = f[:, None], a[:, None], c[:, None]
    luma = _luma(images)
    other = torch.addcmul(c * luma.mean(dim=(2, 3), keepdim=True), luma, a)
    return torch.addcmul(other, images, f).clamp_(0.0, 1.0)


def run_jitter(images: Tensor, plan: Tensor, hue: Tensor | None, mask: Tensor | None = None) -> Tensor:
    """Apply a :func:`jitter_plan` and the hue shifts ``hue`` (B,) (None: no hue op) to the samples in ``mask``."""
    x = images
    for i in range(3):
        x = _jitter_pass(x, plan[i])
    if hue is not None:
        shifted = adjust_hue(x, hue)
        x = shifted if mask is None else _select(mask, x, shifted)
    for i in range(3, 6):
        x = _jitter_pass(x, plan[i])
    return x


def color_jitter(images: Tensor, factors: Tensor, order: Tensor, mask: Tensor | None = None,
                 hue: bool = True) -> Tensor:
    """torchvision's ColorJitter with given parameters, each sample in its own op order.

    ``factors`` (B, 4): brightness, contrast, saturation factors and hue shift; ``order`` (B, 4) or (4,): a
    permutation of op ids 0-3 (:data:`JITTER_OPS`) per sample; ``mask`` (B,): samples to jitter (others are
    returned unchanged); ``hue=False`` skips the hue op (torchvision's ``hue=0``). Runs six blend passes and
    one hue pass for the whole batch: the blends before each sample's hue slot, hue, the blends after.
    """
    factors = factors.to(device=images.device, dtype=images.dtype)
    mask = None if mask is None else mask.to(images.device)
    return run_jitter(images, jitter_plan(factors, order, mask), factors[:, 3] if hue else None, mask)


def grayscale(images: Tensor, mask: Tensor) -> Tensor:
    """Replace the samples in ``mask`` by their grey levels, repeated over the 3 channels."""
    return _select(mask, images, _luma(images).expand_as(images))


def gaussian_kernels(sigma: Tensor, kernel_size: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """(B, k) normalised 1-D Gaussian kernels for per-sample ``sigma`` (torchvision's discretisation)."""
    x = torch.arange(kernel_size, device=sigma.device, dtype=dtype) - (kernel_size - 1) / 2
    pdf = torch.exp(-0.5 * (x / sigma.to(dtype)[:, None]) ** 2)
    return pdf / pdf.sum(dim=1, keepdim=True)


def gaussian_blur(images: Tensor, sigma: Factor, kernel_size: int, mask: Tensor | None = None) -> Tensor:
    """Gaussian blur with per-sample ``sigma`` (same in x and y), reflect padding, as torchvision's kernel.

    Separable: a horizontal then a vertical grouped convolution with one kernel per (sample, channel).
    ``mask`` (B,) restricts the blur to some samples: the whole batch is convolved and the result selected on
    accelerators (no host sync); on CPU only the selected samples are convolved.
    """
    if kernel_size % 2 == 0 or kernel_size < 1:
        raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
    if not isinstance(sigma, Tensor):
        sigma = torch.full((images.shape[0],), float(sigma), device=images.device)
    sigma = sigma.to(images.device)
    if mask is None:
        return _blur(images, sigma, kernel_size)
    mask = mask.to(images.device)
    if images.device.type != "cpu":
        return _select(mask, images, _blur(images, sigma, kernel_size))
    idx = mask.nonzero()[:, 0]
    out = images.clone()
    if len(idx):
        out[idx] = _blur(images[idx], sigma[idx], kernel_size)
    return out


def _blur(images: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    b, c, h, w = images.shape
    kern = gaussian_kernels(sigma, kernel_size, images.dtype)
    kern = kern.repeat_interleave(c, dim=0)  # (B*C, k), row b*C + ch
    pad = kernel_size // 2
    x = images.reshape(1, b * c, h, w)
    x = F.conv2d(F.pad(x, (pad, pad, 0, 0), mode="reflect"), kern[:, None, None, :], groups=b * c)
    x = F.conv2d(F.pad(x, (0, 0, pad, pad), mode="reflect"), kern[:, None, :, None], groups=b * c)
    return x.reshape(b, c, h, w)


def solarize(images: Tensor, mask: Tensor, threshold: float = 0.5) -> Tensor:
    """Invert the pixels ``>= threshold`` of the samples in ``mask`` (DINO / Mugs, methods.md §6)."""
    weight = torch.heaviside(images - threshold, torch.ones((), dtype=images.dtype, device=images.device))
    weight = weight.mul_(mask.to(device=images.device, dtype=images.dtype).reshape(-1, 1, 1, 1))
    return torch.lerp(images, 1.0 - images, weight)


def erase(images: Tensor, boxes: Tensor, mask: Tensor, noise: Tensor) -> Tensor:
    """Replace the box (top, left, height, width) of each sample in ``mask`` by ``noise`` (same shape as ``images``),
    as torchvision's ``erase`` with a random value."""
    b, _, h, w = images.shape
    boxes, mask = boxes.to(images.device), mask.to(images.device)
    rows = torch.arange(h, device=images.device)
    cols = torch.arange(w, device=images.device)
    inside_rows = (rows >= boxes[:, :1]) & (rows < boxes[:, :1] + boxes[:, 2:3])  # (B, H)
    inside_cols = (cols >= boxes[:, 1:2]) & (cols < boxes[:, 1:2] + boxes[:, 3:4])  # (B, W)
    inside = inside_rows[:, :, None] & inside_cols[:, None, :] & mask.reshape(-1, 1, 1)
    return torch.where(inside[:, None], noise.to(images.dtype), images)


def normalize(images: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor,
              out: Tensor | None = None) -> Tensor:
    """``(images - mean) / std`` per channel (written into ``out`` if given)."""
    mean = torch.as_tensor(mean, dtype=images.dtype).to(images.device).reshape(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=images.dtype).to(images.device).reshape(1, -1, 1, 1)
    return torch.sub(images, mean, out=out).div_(std)


# ---------------------------------------------------------------------------------------------- sampling


def _device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _rand(*shape: int, generator: torch.Generator | None) -> Tensor:
    return torch.rand(shape, generator=generator, device=_device(generator), dtype=torch.float64)


def sample_uniform(batch: int, low: float, high: float, generator: torch.Generator | None = None) -> Tensor:
    """(B,) draws of U[low, high] (float64)."""
    return low + (high - low) * _rand(batch, generator=generator)


def sample_mask(batch: int, p: float, generator: torch.Generator | None = None) -> Tensor:
    """(B,) booleans, each True with probability ``p`` (RandomApply / RandomGrayscale / RandomHorizontalFlip)."""
    return _rand(batch, generator=generator) < p


def sample_permutations(batch: int, n: int, generator: torch.Generator | None = None) -> Tensor:
    """(B, n) independent uniform permutations of 0..n-1 (torch.randperm per sample)."""
    return _rand(batch, n, generator=generator).argsort(dim=1)


def jitter_ranges(brightness: float, contrast: float, saturation: float,
                  hue: float) -> list[tuple[float, float]]:
    """ColorJitter's factor ranges: [max(0, 1 - x), 1 + x] for the first three, [-h, h] for hue."""
    if not 0 <= hue <= 0.5:
        raise ValueError(f"hue jitter must be in [0, 0.5], got {hue}")
    return [(max(0.0, 1 - x), 1 + x) for x in (brightness, contrast, saturation)] + [(-hue, hue)]


def sample_jitter_factors(batch: int, brightness: float, contrast: float, saturation: float, hue: float,
                          generator: torch.Generator | None = None) -> Tensor:
    """(B, 4) brightness, contrast, saturation factors and hue shift, uniform in :func:`jitter_ranges`."""
    u = _rand(batch, 4, generator=generator)
    ranges = jitter_ranges(brightness, contrast, saturation, hue)
    return torch.stack([lo + (hi - lo) * u[:, i] for i, (lo, hi) in enumerate(ranges)], dim=1)


def _candidate_sides(batch: int, area: int, scale: tuple[float, float], ratio: tuple[float, float], attempts: int,
                     generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """(B, attempts) rounded sqrt(A·r) and sqrt(A/r) for areas A uniform in ``area`` x ``scale`` and aspects r
    log-uniform in ``ratio``: the candidate sides both RandomResizedCrop and RandomErasing draw."""
    u = _rand(batch, attempts, 2, generator=generator)
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * u[..., 1])
    return torch.sqrt(target * aspect).round(), torch.sqrt(target / aspect).round()


def sample_crop_boxes(batch: int, height: int, width: int, scale: tuple[float, float] = (0.08, 1.0),
                      ratio: tuple[float, float] = (3 / 4, 4 / 3), generator: torch.Generator | None = None,
                      attempts: int = 10) -> Tensor:
    """(B, 4) int64 (top, left, height, width) with the law of ``RandomResizedCrop.get_params``.

    Each sample draws ``attempts`` (area fraction, log-aspect) candidates at once and keeps the first that
    fits in the image, else takes torchvision's central fallback crop; the position is uniform over the
    valid offsets.
    """
    cw, ch = _candidate_sides(batch, height * width, scale, ratio, attempts, generator)
    fits = (cw > 0) & (cw <= width) & (ch > 0) & (ch <= height)
    first = fits.to(torch.int64).argmax(dim=1, keepdim=True)  # first True (0 if none)
    found = fits.any(dim=1)
    # central fallback (torchvision): clip the aspect ratio to the range, keep the whole short side
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fh, fw = height, int(round(height * max(ratio)))
    else:
        fw, fh = width, height
    ch = torch.where(found, ch.gather(1, first)[:, 0], float(fh))
    cw = torch.where(found, cw.gather(1, first)[:, 0], float(fw))
    pos = _rand(batch, 2, generator=generator)
    top = torch.where(found, torch.minimum((pos[:, 0] * (height - ch + 1)).floor(), height - ch), (height - fh) // 2)
    left = torch.where(found, torch.minimum((pos[:, 1] * (width - cw + 1)).floor(), width - cw), (width - fw) // 2)
    return torch.stack((top, left, ch, cw), dim=1).to(torch.int64)


def sample_erase_boxes(batch: int, height: int, width: int, scale: tuple[float, float] = (0.02, 0.33),
                       ratio: tuple[float, float] = (0.3, 3.3), generator: torch.Generator | None = None,
                       attempts: int = 10) -> tuple[Tensor, Tensor]:
    """(B, 4) int64 boxes and (B,) found flags with the law of ``RandomErasing.get_params``: the first of
    ``attempts`` (area fraction, log-aspect) candidates strictly inside the image, at a uniform position; none
    found: nothing is erased."""
    eh, ew = _candidate_sides(batch, height * width, scale, ratio, attempts, generator)
    fits = (eh < height) & (ew < width)
    first = fits.to(torch.int64).argmax(dim=1, keepdim=True)
    found = fits.any(dim=1)
    eh, ew = eh.gather(1, first)[:, 0], ew.gather(1, first)[:, 0]
    pos = _rand(batch, 2, generator=generator)
    top = torch.minimum((pos[:, 0] * (height - eh + 1)).floor(), (height - eh).clamp(min=0))
    left = torch.minimum((pos[:, 1] * (width - ew + 1)).floor(), (width - ew).clamp(min=0))
    return torch.stack((top, left, eh, ew), dim=1).to(torch.int64), found


@dataclass
class AugmentParams:
    """Per-sample parameters of one :class:`BatchAugment` call (all (B, ...) tensors)."""

    boxes: Tensor  # (B, 4) int64 top, left, height, width
    flip: Tensor  # (B,) bool
    jitter: Tensor  # (B,) bool: colour jitter applied
    factors: Tensor  # (B, 4) brightness, contrast, saturation, hue
    order: Tensor  # (B, 4) jitter op order
    gray: Tensor  # (B,) bool
    blur: Tensor  # (B,) bool
    sigma: Tensor  # (B,) blur sigma
    solarize: Tensor  # (B,) bool
    erase: Tensor  # (B,) bool: random erasing applied (and a box found)
    erase_boxes: Tensor  # (B, 4) int64

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> AugmentParams:
        """Moved to ``device`` (CPU -> CUDA via pinned memory, asynchronously); floating fields cast to ``dtype``."""
        device = torch.device(device)

        def move(t: Tensor) -> Tensor:
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            if device.type == "cuda" and t.device.type == "cpu":
                t = t.pin_memory()
            return t.to(device, non_blocking=True)

        return AugmentParams(**{f.name: move(getattr(self, f.name)) for f in fields(self)})

    def __getitem__(self, index: slice) -> AugmentParams:
        return AugmentParams(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


# ---------------------------------------------------------------------------------------------- module


class BatchAugment(nn.Module):
    """A whole-batch augmentation recipe: ``forward(images, generator) -> normalised (B, 3, S, S)``.

    Random recipe: RandomResizedCrop(``size``, ``scale``, ``ratio``) + flip(p=0.5 if ``flip``) ->
    [RandomGrayscale(``gray_p``) if ``gray_first``] -> RandomApply(ColorJitter(*``jitter``), ``jitter_p``) ->
    RandomGrayscale(``gray_p``) -> RandomApply(GaussianBlur(``blur_kernel``, ``blur_sigma``), ``blur_p``) ->
    RandomSolarize(``solarize_threshold``, ``solarize_p``) -> RandomErasing(``erase_p``, random values) ->
    Normalize. The flip is folded into the crop: it commutes with the per-pixel ops and the symmetric,
    reflect-padded blur. ``geometry=False``: the images come already cropped and flipped to ``size`` (stage 1 of
    :mod:`selfsup.data.pipeline`) and only the rest runs. ``center_crop_ratio`` set instead gives the deterministic
    eval view Resize(size / ratio) -> CenterCrop(size). ``cpu_chunk``: see :meth:`forward`.
    """

    def __init__(self, size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, *,
                 scale: tuple[float, float] = (0.2, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 flip: bool = True, jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0),
                 jitter_p: float = 0.0, gray_p: float = 0.0, gray_first: bool = False,
                 blur_p: float = 0.0, blur_sigma: tuple[float, float] = (0.1, 2.0), blur_kernel: int = 23,
                 solarize_p: float = 0.0, solarize_threshold: float = 0.5, erase_p: float = 0.0,
                 geometry: bool = True, center_crop_ratio: float | None = None, cpu_chunk: int = 2**20) -> None:
        super().__init__()
        if size < 1:
            raise ConfigError(f"image size must be positive, got {size}")
        if center_crop_ratio is not None and not 0 < center_crop_ratio <= 1:
            raise ConfigError(f"centre crop ratio must be in (0, 1], got {center_crop_ratio}")
        jitter_ranges(*jitter)  # validates hue
        self.size, self.scale, self.ratio, self.flip = size, tuple(scale), tuple(ratio), flip
        self.jitter, self.jitter_p = tuple(jitter), jitter_p if any(jitter) else 0.0
        self.gray_p, self.gray_first = gray_p, gray_first
        self.blur_p, self.blur_sigma, self.blur_kernel = blur_p, tuple(blur_sigma), blur_kernel
        self.solarize_p, self.solarize_threshold = solarize_p, solarize_threshold
        self.erase_p, self.geometry = erase_p, geometry
        self.center_crop_ratio, self.cpu_chunk = center_crop_ratio, cpu_chunk
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32), persistent=False)

    def sample(self, batch: int, height: int, width: int, generator: torch.Generator | None = None) -> AugmentParams:
        """Draw every parameter of a batch (always the same draws in the same order, whatever the recipe; erasing's
        draws come last, so recipes without it draw as before it existed)."""
        erase, erase_boxes = torch.zeros(batch, dtype=torch.bool), torch.zeros(batch, 4, dtype=torch.int64)
        if self.erase_p > 0:
            erase = sample_mask(batch, self.erase_p, generator)
            erase_boxes, found = sample_erase_boxes(batch, self.size, self.size, generator=generator)
            erase = erase & found
        return AugmentParams(
            boxes=sample_crop_boxes(batch, height, width, self.scale, self.ratio, generator),
            flip=sample_mask(batch, 0.5 if self.flip else 0.0, generator),
            jitter=sample_mask(batch, self.jitter_p, generator),
            factors=sample_jitter_factors(batch, *self.jitter, generator=generator),
            order=sample_permutations(batch, 4, generator),
            gray=sample_mask(batch, self.gray_p, generator),
            blur=sample_mask(batch, self.blur_p, generator),
            sigma=sample_uniform(batch, *self.blur_sigma, generator=generator),
            solarize=sample_mask(batch, self.solarize_p, generator),
            erase=erase,
            erase_boxes=erase_boxes,
        )

    def apply(self, images: Tensor, params: AugmentParams, noise: Tensor | None = None) -> Tensor:
        """The random recipe with given parameters on a float batch in [0, 1] (before normalisation); ``noise``:
        the erasing values, (B, 3, size, size)."""
        p = params.to(images.device, images.dtype)
        return self._finish(self._transform(images, p, self._plan(p)), p, noise)

    def _finish(self, x: Tensor, p: AugmentParams, noise: Tensor | None) -> Tensor:
        """Three channels (a grey batch is repeated), then random erasing with per-pixel ``noise``."""
        x = x.expand(-1, 3, -1, -1)
        if self.erase_p > 0 and noise is not None:
            x = erase(x, p.erase_boxes, p.erase, noise)
        return x

    def _plan(self, p: AugmentParams) -> Tensor | None:
        return jitter_plan(p.factors, p.order, p.jitter if self.jitter_p < 1 else None) if self.jitter_p > 0 else None

    def _transform(self, images: Tensor, p: AugmentParams, plan: Tensor | None) -> Tensor:
        # a grey batch stays one channel until the end, as torchvision treats a 1-channel image: saturation, hue
        # and grayscale leave it unchanged (3x fewer values, no hue pass); _views repeats it over 3 channels
        x = resized_crop_flip(images, p.boxes, p.flip, self.size) if self.geometry else images
        if self.gray_p > 0 and self.gray_first:
            x = grayscale(x, p.gray)
        if plan is not None:
            hue = p.factors[:, 3] if self.jitter[3] > 0 else None
            x = run_jitter(x, plan, hue, p.jitter if self.jitter_p < 1 else None)
        if self.gray_p > 0 and not self.gray_first:
            x = grayscale(x, p.gray)
        if self.blur_p > 0:
            x = gaussian_blur(x, p.sigma, self.blur_kernel, None if self.blur_p >= 1 else p.blur)
        if self.solarize_p > 0:
            x = solarize(x, p.solarize, self.solarize_threshold)
        return x

    def _views(self, images: Tensor, params: AugmentParams | None, plan: Tensor | None,
               out: Tensor | None = None, noise: Tensor | None = None) -> Tensor:
        """uint8/float, 1/3-channel (chunk of a) batch -> normalised views (written into ``out`` if given)."""
        x = images.float().div_(255) if images.dtype == torch.uint8 else images
        if params is None:
            x = resize_center_crop(x, round(self.size / self.center_crop_ratio), self.size)
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        else:
            x = self._finish(self._transform(x, params, plan), params, noise)
        return normalize(x, self.mean.to(x.dtype), self.std.to(x.dtype), out=out)

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(B, 1 or 3, H, W) uint8 or float in [0, 1] -> normalised float (B, 3, size, size).

        Parameters are drawn for the whole batch first. On CPU the batch is then processed in chunks of about
        ``cpu_chunk`` input values so that the chain of element-wise kernels runs in cache (same result);
        on other devices the whole batch goes through at once.
        """
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected a (B, 1 or 3, H, W) batch, got shape {tuple(images.shape)}")
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise TypeError(f"expected uint8 or float images, got {images.dtype}")
        b, _, h, w = images.shape
        if not self.geometry and (h, w) != (self.size, self.size):
            raise ValueError(f"geometry=False expects images cropped to {self.size} px, got {h}x{w}")
        dtype = images.dtype if images.is_floating_point() else torch.float32
        params, plan, noise = None, None, None
        if self.center_crop_ratio is None:
            params = self.sample(b, h, w, generator).to(images.device, dtype)
            plan = self._plan(params)
            if self.erase_p > 0:
                noise = torch.randn((b, 3, self.size, self.size), generator=generator, device=_device(generator),
                                    dtype=dtype).to(images.device)
        step = max(1, self.cpu_chunk // (3 * h * w)) if images.device.type == "cpu" else b
        if step >= b:
            return self._views(images, params, plan, noise=noise)
        out = images.new_empty((b, 3, self.size, self.size), dtype=dtype)
        for i in range(0, b, step):
            chunk = slice(i, i + step)
            part = None if params is None else params[chunk]
            self._views(images[chunk], part, None if plan is None else plan[:, chunk], out[chunk],
                        None if noise is None else noise[chunk])
        return out

    def extra_repr(self) -> str:
        if self.center_crop_ratio is not None:
            return f"size={self.size}, center_crop_ratio={self.center_crop_ratio}"
        return (f"size={self.size}, scale={self.scale}, flip={self.flip}, jitter={self.jitter}, p={self.jitter_p}, "
                f"gray_p={self.gray_p}, blur_p={self.blur_p}, sigma={self.blur_sigma}, k={self.blur_kernel}, "
                f"solarize_p={self.solarize_p}, erase_p={self.erase_p}, geometry={self.geometry}")


def batch_augment(recipe: R.Recipe, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, *,
                  geometry: bool = True) -> BatchAugment:
    """The batched backend of a resolved recipe: its crop and flip on the device (``geometry``), or not (stage 2
    of the two-stage path), then its photometric ops in the recipe's order."""
    if geometry and recipe.op(R.RandAugment) is not None:
        raise ConfigError(f"recipe {recipe.name!r} has RandAugment, which runs on the loader workers: "
                          "it needs the two-stage path (selfsup.data.pipeline), not an on-device crop")
    crop = recipe.crop
    if geometry and crop.interpolation != "bilinear":
        raise ConfigError(f"recipe {recipe.name!r} crops with {crop.interpolation} interpolation; the on-device crop "
                          "is bilinear only (the two-stage path crops on the workers with any interpolation)")
    flip = recipe.flip_p
    if flip not in (0.0, 0.5):
        raise ConfigError(f"recipe {recipe.name!r}: the batched flip has probability 0.5 (or none), got {flip}")
    options: dict = {}
    for op in recipe.photometric():
        if isinstance(op, R.ColorJitter):
            options.update(jitter=(op.brightness, op.contrast, op.saturation, op.hue), jitter_p=op.p)
        elif isinstance(op, R.Grayscale):
            options.update(gray_p=op.p, gray_first="jitter" not in options)
        elif isinstance(op, R.GaussianBlur):
            options.update(blur_p=op.p, blur_sigma=op.sigma, blur_kernel=op.kernel)
        elif isinstance(op, R.Solarize):  # PIL inverts the uint8 values >= threshold
            options.update(solarize_p=op.p, solarize_threshold=(op.threshold - 0.5) / 255)
        elif isinstance(op, R.RandomErasing):
            options.update(erase_p=op.p)
    if options.get("gray_first") and "jitter" not in options:
        options["gray_first"] = False  # grey alone: where it sits does not matter
    return BatchAugment(recipe.size, mean, std, scale=crop.scale, ratio=crop.ratio, flip=flip > 0, geometry=geometry,
                        **options)


def build_batch_transform(name: str, image_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                          std: Sequence[float] = IMAGENET_STD, blur: bool = True, crop_ratio: float = 0.875, *,
                          scale: tuple[float, float] = (0.2, 1.0), flip: bool = True) -> BatchAugment:
    """Batched counterpart of :func:`selfsup.data.transforms.build_transform` (bilinear only), same recipes:
    ``aug+``, ``weak``, ``moco_v1``, ``eval``; blur kernel ~10% of the size, sigma U[0.1, 2.0] * size / 224."""
    check_choice("transform", name, TRANSFORMS)
    if name == "eval":
        return BatchAugment(image_size, mean, std, center_crop_ratio=crop_ratio)
    return batch_augment(R.named_recipe(name).resolved(image_size, tuple(scale), flip, blur), mean, std)


def batch_transform_from_config(cfg: DataConfig, name: str) -> BatchAugment:
    """:func:`build_batch_transform` with the image size, statistics, blur, crop scale and flip of ``cfg``."""
    return build_batch_transform(name, cfg.image_size, mean=cfg.mean, std=cfg.std, blur=cfg.blur,
                                 crop_ratio=cfg.eval_crop_ratio, scale=cfg.crop_scale, flip=cfg.flip)
