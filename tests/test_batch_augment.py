"""Batched augmentation: each op equals torchvision's tensor kernel; samplers match torchvision's laws."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode, RandomResizedCrop

from selfsup.config import IMAGENET_MEAN, IMAGENET_STD
from selfsup.data import batch_augment as A
from selfsup.data.transforms import TRANSFORMS, blur_kernel_size

COLOUR_TOL = 1e-5
GEOMETRY_TOL = 1e-5


def images(b: int = 6, h: int = 23, w: int = 29, seed: int = 0) -> torch.Tensor:
    """Random colours plus special pixels: ties between channels, grey, exact 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, h, w, generator=g)
    x[:, :, :4] = (x[:, :, :4] * 4).round() / 4  # many ties and grey pixels, 0 and 1
    x[:, :, 4, :3] = 0.5  # grey
    return x


def per_sample(fn, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
    """torchvision's kernel applied sample by sample with scalar parameters."""
    return torch.stack([fn(x[i], *(p[i].item() for p in params)) for i in range(len(x))])


def ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    grid = np.sort(np.concatenate([a, b]))
    fa = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    fb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(fa - fb).max())


def ks_uniform(a: np.ndarray, low: float, high: float) -> float:
    a = np.sort(a)
    cdf = (a - low) / (high - low)
    n = len(a)
    return float(max((np.arange(1, n + 1) / n - cdf).max(), (cdf - np.arange(n) / n).max()))


# ---------------------------------------------------------------------------------------------- ops vs torchvision


@pytest.mark.parametrize("size", [(16, 16), (48, 40), (7, 31)])
def test_resized_crop_flip_matches_torchvision(size):
    x = images(10, 37, 45)
    g = torch.Generator().manual_seed(1)
    boxes = A.sample_crop_boxes(10, 37, 45, (0.02, 1.0), generator=g)
    boxes[0] = torch.tensor([0, 0, 37, 45])  # whole image
    boxes[1] = torch.tensor([36, 44, 1, 1])  # one corner pixel
    boxes[2] = torch.tensor([20, 30, 17, 15])  # touching the bottom-right border
    flip = torch.arange(10) % 3 == 1
    out = A.resized_crop_flip(x, boxes, flip, size)
    for i in range(10):
        ref = TF.resized_crop(x[i], *boxes[i].tolist(), list(size), InterpolationMode.BILINEAR, antialias=False)
        ref = TF.horizontal_flip(ref) if flip[i] else ref
        torch.testing.assert_close(out[i], ref, atol=GEOMETRY_TOL, rtol=0)


def test_resized_crop_grid_is_exact_in_float64():
    """Same sampling points as torchvision: in float64 a 500 x 375 -> 224 crop agrees to rounding; in float32 the
    residual (~1e-5 per 100 source pixels on noise images) is grid_sample's float32 coordinate arithmetic."""
    x = torch.rand(3, 3, 375, 500, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    boxes = A.sample_crop_boxes(3, 375, 500, (0.08, 1.0), generator=torch.Generator().manual_seed(1))
    flip = torch.tensor([False, True, True])
    out = A.resized_crop_flip(x, boxes, flip, 224)
    for i in range(3):
        ref = TF.resized_crop(x[i], *boxes[i].tolist(), [224, 224], InterpolationMode.BILINEAR, antialias=False)
        torch.testing.assert_close(out[i], TF.horizontal_flip(ref) if flip[i] else ref, atol=1e-12, rtol=0)


def test_resize_center_crop_matches_torchvision():
    for h, w in [(40, 40), (30, 52), (61, 27)]:
        x = images(3, h, w)
        ref = TF.center_crop(TF.resize(x, 36, antialias=True), [32, 32])
        torch.testing.assert_close(A.resize_center_crop(x, 36, 32), ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name, ours, theirs, factors", [
    ("brightness", A.adjust_brightness, TF.adjust_brightness, [0.0, 0.6, 1.0, 1.4, 0.95, 2.0]),
    ("contrast", A.adjust_contrast, TF.adjust_contrast, [0.0, 0.6, 1.0, 1.4, 0.95, 2.0]),
    ("saturation", A.adjust_saturation, TF.adjust_saturation, [0.0, 0.6, 1.0, 1.4, 0.95, 2.0]),
    ("hue", A.adjust_hue, TF.adjust_hue, [-0.5, -0.1, 0.0, 0.03, 0.27, 0.5]),
])
def test_colour_ops_match_torchvision(name, ours, theirs, factors):
    x = images()
    f = torch.tensor(factors)
    torch.testing.assert_close(ours(x, f), per_sample(theirs, x, f), atol=COLOUR_TOL, rtol=0)
    torch.testing.assert_close(ours(x, 0.3 if name == "hue" else 1.3), theirs(x, 0.3 if name == "hue" else 1.3),
                               atol=COLOUR_TOL, rtol=0)  # Python scalar factor


def test_grayscale_solarize_normalize_match_torchvision():
    x = images()
    mask = torch.tensor([True, False, True, True, False, True])
    gray = per_sample(lambda im, m: TF.rgb_to_grayscale(im, 3) if m else im, x, mask)
    torch.testing.assert_close(A.grayscale(x, mask), gray, atol=COLOUR_TOL, rtol=0)
    sol = per_sample(lambda im, m: TF.solarize(im, 0.5) if m else im, x, mask)
    assert torch.equal(A.solarize(x, mask), sol)
    ref = TF.normalize(x, list(IMAGENET_MEAN), list(IMAGENET_STD))
    torch.testing.assert_close(A.normalize(x, IMAGENET_MEAN, IMAGENET_STD), ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kernel", [3, 9])
def test_gaussian_blur_matches_torchvision(kernel):
    x = images(6, 19, 26)
    sigma = torch.tensor([0.1, 0.5, 1.0, 2.0, 3.3, 0.7])
    ref = per_sample(lambda im, s: TF.gaussian_blur(im, [kernel, kernel], [s, s]), x, sigma)
    torch.testing.assert_close(A.gaussian_blur(x, sigma, kernel), ref, atol=COLOUR_TOL, rtol=0)
    mask = torch.tensor([True, False, False, True, True, False])
    masked = torch.where(mask[:, None, None, None], ref, x)
    torch.testing.assert_close(A.gaussian_blur(x, sigma, kernel, mask), masked, atol=COLOUR_TOL, rtol=0)


def jitter_reference(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor, mask: torch.Tensor,
                     hue: bool = True) -> torch.Tensor:
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    out = []
    for i in range(len(x)):
        im = x[i]
        for op in order[i].tolist():
            if mask[i] and (op != 3 or hue):
                im = ops[op](im, factors[i, op].item())
        out.append(im)
    return torch.stack(out)


def test_color_jitter_per_sample_order_matches_torchvision():
    b = 24
    x = images(b)
    g = torch.Generator().manual_seed(3)
    factors = A.sample_jitter_factors(b, 0.4, 0.4, 0.4, 0.4, g).float()
    order = A.sample_permutations(b, 4, g)
    mask = A.sample_mask(b, 0.7, g)
    ref = jitter_reference(x, factors, order, mask)
    torch.testing.assert_close(A.color_jitter(x, factors, order, mask), ref, atol=COLOUR_TOL, rtol=0)
    ref = jitter_reference(x, factors, order, torch.ones(b, dtype=torch.bool), hue=False)
    torch.testing.assert_close(A.color_jitter(x, factors, order, hue=False), ref, atol=COLOUR_TOL, rtol=0)
    per_batch = torch.tensor([2, 3, 0, 1])  # one order for the whole batch
    ref = jitter_reference(x, factors, per_batch.expand(b, 4), mask)
    torch.testing.assert_close(A.color_jitter(x, factors, per_batch, mask), ref, atol=COLOUR_TOL, rtol=0)


def recipe_reference(aug: A.BatchAugment, x: torch.Tensor, p: A.AugmentParams) -> torch.Tensor:
    """The recipe as a chain of torchvision functional ops, sample by sample, in torchvision's op order."""
    out = []
    for i in range(len(x)):
        top, left, h, w = p.boxes[i].tolist()
        im = TF.resized_crop(x[i], top, left, h, w, [aug.size, aug.size], InterpolationMode.BILINEAR, antialias=False)
        if aug.gray_first and p.gray[i]:
            im = TF.rgb_to_grayscale(im, 3)
        if aug.jitter_p > 0:
            im = jitter_reference(im[None], p.factors[i:i + 1], p.order[i:i + 1], p.jitter[i:i + 1])[0]
        if not aug.gray_first and aug.gray_p > 0 and p.gray[i]:
            im = TF.rgb_to_grayscale(im, 3)
        if aug.blur_p > 0 and p.blur[i]:
            s = p.sigma[i].item()
            im = TF.gaussian_blur(im, [aug.blur_kernel] * 2, [s, s])
        if aug.solarize_p > 0 and p.solarize[i]:
            im = TF.solarize(im, aug.solarize_threshold)
        if p.flip[i]:
            im = TF.horizontal_flip(im)
        out.append(TF.normalize(im, list(IMAGENET_MEAN), list(IMAGENET_STD)))
    return torch.stack(out)


@pytest.mark.parametrize("recipe", ["aug+", "moco_v1", "weak", "dino"])
def test_recipe_equals_torchvision_chain(recipe):
    if recipe == "dino":  # §6 teacher crop 2: jitter 0.8, gray 0.2, blur 0.1, solarise 0.2 (probabilities raised)
        aug = A.BatchAugment(24, scale=(0.25, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, gray_p=0.2,
                             blur_p=0.5, blur_sigma=(0.1, 2.0), blur_kernel=5, solarize_p=0.5)
    else:
        aug = A.build_batch_transform(recipe, 24)
    x = images(16, 30, 36, seed=5)
    params = aug.sample(16, 30, 36, torch.Generator().manual_seed(7))
    params.factors = params.factors.float()
    params.sigma = params.sigma.float()
    ours = A.normalize(aug.apply(x, params), IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(ours, recipe_reference(aug, x, params), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------- samplers


def test_crop_boxes_match_random_resized_crop_law():
    n = 20000
    for (h, w), scale, draws in [((64, 64), (0.2, 1.0), n), ((24, 200), (0.08, 1.0), n // 4)]:
        boxes = A.sample_crop_boxes(draws, h, w, scale, generator=torch.Generator().manual_seed(0))
        top, left, ch, cw = boxes.T
        assert (ch >= 1).all() and (cw >= 1).all() and (top >= 0).all() and (left >= 0).all()
        assert (top + ch <= h).all() and (left + cw <= w).all()
        torch.manual_seed(0)
        img = torch.zeros(1, h, w)
        ref = torch.tensor([RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3]) for _ in range(draws)])
        for ours, theirs in [(ch * cw / (h * w), ref[:, 2] * ref[:, 3] / (h * w)),
                             (torch.log(cw / ch), torch.log(ref[:, 3] / ref[:, 2])),
                             (top / (h - ch + 1), ref[:, 0] / (h - ref[:, 2] + 1)),
                             (left / (w - cw + 1), ref[:, 1] / (w - ref[:, 3] + 1))]:
            assert ks(ours.double().numpy(), theirs.double().numpy()) < 2.0 * math.sqrt(2 / draws)  # p < 0.001
            assert abs(ours.double().mean() - theirs.double().mean()) < 0.02
        fallback = ((ch == h) & (cw == min(w, round(h * 4 / 3)))).double().mean()
        ref_fallback = ((ref[:, 2] == h) & (ref[:, 3] == min(w, round(h * 4 / 3)))).double().mean()
        assert abs(fallback - ref_fallback) < 4 * math.sqrt(0.25 / draws) + 1e-9
        if (h, w) == (24, 200):
            assert 0.3 < fallback < 0.9  # the central fallback is really exercised


def test_fallback_is_central_crop():
    boxes = A.sample_crop_boxes(50, 10, 300, (0.5, 1.0), generator=torch.Generator().manual_seed(0))
    assert (boxes == torch.tensor([0, (300 - 13) // 2, 10, 13])).all()  # h = 10, w = round(10 * 4/3)
    boxes = A.sample_crop_boxes(50, 300, 10, (0.5, 1.0), generator=torch.Generator().manual_seed(0))
    assert (boxes == torch.tensor([(300 - 13) // 2, 0, 13, 10])).all()  # w = 10, h = round(10 / (3/4))


def test_factor_mask_and_order_laws():
    n = 20000
    g = torch.Generator().manual_seed(0)
    f = A.sample_jitter_factors(n, 0.4, 1.5, 0.2, 0.1, g).numpy()
    for col, (lo, hi) in enumerate([(0.6, 1.4), (0.0, 2.5), (0.8, 1.2), (-0.1, 0.1)]):
        assert lo <= f[:, col].min() and f[:, col].max() <= hi
        assert ks_uniform(f[:, col], lo, hi) < 0.015
    sigma = A.sample_uniform(n, 0.1, 2.0, g).numpy()
    assert sigma.min() >= 0.1 and sigma.max() <= 2.0 and ks_uniform(sigma, 0.1, 2.0) < 0.015
    for p in (0.0, 0.2, 0.5, 0.8, 1.0):
        assert abs(A.sample_mask(n, p, g).double().mean().item() - p) < 0.015
    order = A.sample_permutations(n, 4, g)
    assert (order.sort(dim=1).values == torch.arange(4)).all()
    codes = (order * torch.tensor([64, 16, 4, 1])).sum(1)
    counts = torch.bincount(codes, minlength=256)[codes.unique()]
    assert len(counts) == 24 and (counts - n / 24).abs().max() < 5 * math.sqrt(n / 24)


# ---------------------------------------------------------------------------------------------- module


def test_build_batch_transform_recipes_and_reproducibility():
    x = (images(5, 40, 44) * 255).round().to(torch.uint8)
    for name in TRANSFORMS:
        aug = A.build_batch_transform(name, 32)
        out = aug(x, torch.Generator().manual_seed(1))
        assert out.shape == (5, 3, 32, 32) and out.dtype == torch.float32 and out.device == x.device
        assert torch.isfinite(out).all()
        assert torch.equal(out, aug(x, torch.Generator().manual_seed(1)))
        other = aug(x, torch.Generator().manual_seed(2))
        assert torch.equal(out, other) == (name == "eval")
    aug = A.build_batch_transform("aug+", 32)
    assert aug.blur_kernel == blur_kernel_size(32) and aug.blur_sigma == pytest.approx((0.1 / 7, 2.0 / 7))
    assert A.build_batch_transform("aug+", 32, blur=False).blur_p == 0
    assert not A.build_batch_transform("weak", 32, flip=False).flip


def test_uint8_float_grey_and_single_inputs():
    aug = A.build_batch_transform("aug+", 16)
    x = (images(4, 20, 20) * 255).round().to(torch.uint8)
    ref = aug(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(aug(x.float() / 255, torch.Generator().manual_seed(0)), ref, atol=1e-6, rtol=0)
    one = aug(x[:1], torch.Generator().manual_seed(0))
    assert one.shape == (1, 3, 16, 16) and torch.isfinite(one).all()
    grey = x[:, :1]
    out = aug(grey, torch.Generator().manual_seed(0))
    assert out.shape == (4, 3, 16, 16)
    rgb = aug(grey.expand(-1, 3, -1, -1), torch.Generator().manual_seed(0))
    # a grey batch is augmented on one channel (saturation, hue and grayscale are identities there, as in
    # torchvision); on its RGB copy they are identities only up to the luma weights' sum, 0.9999
    torch.testing.assert_close(out, rgb, atol=2e-3, rtol=0)
    ev = A.build_batch_transform("eval", 16, crop_ratio=0.8)
    ref = TF.normalize(TF.center_crop(TF.resize(x.float() / 255, 20, antialias=True), [16, 16]),
                       list(IMAGENET_MEAN), list(IMAGENET_STD))
    torch.testing.assert_close(ev(x), ref, atol=1e-6, rtol=0)
    assert ev(grey).shape == (4, 3, 16, 16)


def test_cpu_chunks_do_not_change_the_result():
    x = images(9, 24, 24)
    aug = A.build_batch_transform("aug+", 20)
    whole = aug(x, torch.Generator().manual_seed(4))
    aug.cpu_chunk = 3 * 24 * 24 * 2  # chunks of 2 images
    torch.testing.assert_close(aug(x, torch.Generator().manual_seed(4)), whole, atol=1e-6, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x = images(8, 40, 40)
    aug = A.build_batch_transform("aug+", 32)
    cpu = aug(x, torch.Generator().manual_seed(0))
    gpu = aug.cuda()(x.cuda(), torch.Generator().manual_seed(0))
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)
    out = aug(x.cuda(), torch.Generator(device="cuda").manual_seed(0))
    assert out.shape == (8, 3, 32, 32) and out.device.type == "cuda"


def test_batch_augment_moves_like_any_module():
    """``.to(device/dtype)`` must keep working (nn.Module._apply is not overridden)."""
    augment = A.build_batch_transform("aug+", 16).to("cpu")
    out = augment(torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8), torch.Generator().manual_seed(0))
    assert out.shape == (4, 3, 16, 16)
