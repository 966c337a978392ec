"""Stage-1 decoding (selfsup.data.decode) against the reference: full decode -> exif_transpose -> RGB ->
torchvision resized_crop -> hflip, on tiny files of every common format, mode and EXIF orientation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as F
from PIL import Image, ImageOps, features
from torchvision.transforms import InterpolationMode

from selfsup.data.datasets import ImageLoadError
from selfsup.data.decode import (
    decode_resized_crop,
    decode_resized_crops,
    draft_scale,
    load_rgb,
    open_image,
    oriented_size,
)

# reduced (DCT-scaled) JPEG decodes vs the full decode, in grey levels of 255: mean absolute difference, its
# 99th percentile and the signed mean (no brightness or colour shift). Measured on these test images: at most
# 3.6, 13 and 0.3 (crops barely larger than 8 x the output, of detail near the output's Nyquist frequency); a crop
# misplaced by 2 full-resolution pixels (1/4 of a pixel of the 1/8 decode) is off by 6 on average.
REDUCED_MEAN, REDUCED_P99, REDUCED_BIAS = 4.0, 16.0, 1.0
WIDTH, HEIGHT = 349, 270  # stored sides of the test photos (not multiples of 8 or 16: partial DCT blocks)
OUT = 16  # small outputs, so that a crop of 128+ pixels is decoded at 1/8


def photo(height: int = HEIGHT, width: int = WIDTH, seed: int = 0) -> np.ndarray:
    """A photo-like uint8 RGB array: smooth colour gradients, edges of a few shapes and mild noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    channels = [120 + 70 * np.sin(x / 23 + c) * np.cos(y / 31 - c) + 40 * np.sin((x + 2 * y) / 9 + c)
                for c in range(3)]
    image = np.stack(channels, axis=-1)
    for _ in range(6):  # flat-coloured rectangles give sharp edges
        top, left = rng.integers(0, height - 40), rng.integers(0, width - 40)
        image[top:top + rng.integers(20, 90), left:left + rng.integers(20, 90)] = rng.integers(0, 256, 3)
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def exif_bytes(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def write(tmp_path, kind: str) -> str:
    """Write the test file ``kind`` and return its path."""
    rgb = Image.fromarray(photo())
    path = tmp_path / kind
    if kind.startswith("orient"):  # orient<N>.<ext>: the stored image + EXIF orientation N
        options = {"quality": 92} if kind.endswith(".jpg") else {}
        rgb.save(path, exif=exif_bytes(int(kind[6])), **options)
        return str(path)
    makers = {
        "rgb444.jpg": lambda p: rgb.save(p, quality=92, subsampling=0),
        "rgb420.jpg": lambda p: rgb.save(p, quality=92, subsampling=2),
        "progressive.jpg": lambda p: rgb.save(p, quality=92, progressive=True),
        "grey.jpg": lambda p: rgb.convert("L").save(p, quality=92),
        "cmyk.jpg": lambda p: rgb.convert("CMYK").save(p, quality=92),
        "rgb.png": lambda p: rgb.save(p),
        "rgba.png": lambda p: Image.merge("RGBA", [*rgb.split(), rgb.convert("L")]).save(p),
        "grey.png": lambda p: rgb.convert("L").save(p),
        "la.png": lambda p: rgb.convert("LA").save(p),
        "palette.png": lambda p: rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(p),
        "grey16.png": lambda p: Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 2).save(p),
        "rgb.webp": lambda p: rgb.save(p, quality=92),
    }
    makers[kind](path)
    return str(path)


def reference(path: str, box, size, flip: bool = False, interpolation=InterpolationMode.BILINEAR) -> torch.Tensor:
    with Image.open(path) as image:
        upright = ImageOps.exif_transpose(image).convert("RGB")
    size = [size, size] if isinstance(size, int) else list(size)
    out = F.resized_crop(upright, *box, size, interpolation, antialias=True)
    return F.pil_to_tensor(F.hflip(out) if flip else out)


def boxes_for(height: int, width: int) -> dict[str, tuple[int, int, int, int]]:
    """(top, left, height, width) boxes on the oriented image."""
    return {
        "whole": (0, 0, height, width),
        "small_middle": (height // 2 - 70, width // 2 - 65, 141, 130),  # >= 8 x OUT: decoded at 1/8
        "bottom_right_border": (height - 77, width - 93, 77, 93),  # touches two edges, 1/4
        "top_left_border": (0, 0, 40, 51),  # 1/2
        "thin": (11, 3, height - 20, 33),  # 1/2 (limited by the width)
    }


def difference(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    d = (a.int() - b.int()).abs().float()
    return d.mean().item(), d.flatten().quantile(0.99).item(), d.max().item()


def assert_close_to_reference(got: torch.Tensor, expected: torch.Tensor, where: str = "") -> None:
    mean, p99, top = difference(got, expected)
    bias = (got.float() - expected.float()).mean().item()
    assert mean <= REDUCED_MEAN and p99 <= REDUCED_P99 and abs(bias) <= REDUCED_BIAS, (
        f"{where}: mean {mean:.2f} p99 {p99:.1f} max {top:.0f} signed mean {bias:.2f}")


JPEGS = ["rgb444.jpg", "rgb420.jpg", "progressive.jpg", "grey.jpg", "cmyk.jpg",
         *[f"orient{n}.jpg" for n in range(1, 9)]]
OTHERS = ["rgb.png", "rgba.png", "grey.png", "la.png", "palette.png", "grey16.png", "orient6.png",
          pytest.param("rgb.webp", marks=pytest.mark.skipif(not features.check("webp"), reason="no WebP in PIL"))]


@pytest.mark.parametrize("kind", JPEGS + OTHERS)
def test_matches_full_decode_reference(tmp_path, kind):
    path = write(tmp_path, kind)
    jpeg = path.endswith(".jpg")
    with Image.open(path) as image:
        expected_size = ImageOps.exif_transpose(image).size[::-1]  # (height, width)
    image = open_image(path)
    if jpeg:
        assert image.tile, "open_image must not decode pixels"
    assert oriented_size(image) == expected_size
    for name, box in boxes_for(*expected_size).items():
        for flip in (False, True):
            image = open_image(path)
            scale = draft_scale(image, [box], [OUT])
            got = decode_resized_crop(image, box, OUT, flip=flip)
            assert got.dtype == torch.uint8 and got.shape == (3, OUT, OUT) and got.is_contiguous()
            expected = reference(path, box, OUT, flip)
            where = f"{kind} {name} flip={flip} scale 1/{scale}"
            top = difference(got, expected)[2]
            if scale > 1:
                assert_close_to_reference(got, expected, where)
            else:  # a full decode: the reference's own operations
                assert top == 0, where
            if jpeg:  # the reduced decode is really used: the decoded pixels are 1/scale of the stored sides
                assert image.size == (math.ceil(WIDTH / scale), math.ceil(HEIGHT / scale)), where


@pytest.mark.parametrize("kind", ["rgb420.jpg", "orient6.jpg", "orient3.jpg", "grey.jpg"])
def test_draft_scales_chosen(tmp_path, kind):
    """The largest DCT scale at which every crop still covers its output; PIL really decodes at it."""
    path = write(tmp_path, kind)
    height, width = oriented_size(open_image(path))
    boxes = boxes_for(height, width)
    expected = {"whole": 8, "small_middle": 8, "bottom_right_border": 4, "top_left_border": 2, "thin": 2}
    for name, box in boxes.items():
        assert draft_scale(open_image(path), [box], [OUT]) == expected[name], name
    assert draft_scale(open_image(path), [boxes["whole"]], [(OUT, 100)]) == 2  # width 270 or 349 / 100 -> 1/2
    assert draft_scale(open_image(path), [boxes["whole"]], [200]) == 1
    assert draft_scale(open_image(path), [boxes["whole"]], [OUT], "nearest") == 1
    # several views share one decode at the finest scale any of them needs
    image = open_image(path)
    assert draft_scale(image, [boxes["whole"], boxes["top_left_border"]], [OUT, OUT]) == 2
    views = decode_resized_crops(image, [boxes["whole"], boxes["top_left_border"]], [OUT, (12, 20)], [True, False])
    assert image.size == (math.ceil(WIDTH / 2), math.ceil(HEIGHT / 2))
    assert [v.shape for v in views] == [(3, OUT, OUT), (3, 12, 20)]
    for view, box, size, flip in zip(views, [boxes["whole"], boxes["top_left_border"]], [OUT, (12, 20)],
                                     [True, False], strict=True):
        assert_close_to_reference(view, reference(path, box, size, flip), f"{kind} {box} {size}")


def test_tolerance_catches_a_misplaced_crop(tmp_path):
    """The reduced-decode tolerance sees a box shifted by 2 pixels, a missing flip or an ignored orientation."""
    path = write(tmp_path, "orient6.jpg")
    height, width = oriented_size(open_image(path))
    top, left, h, w = boxes_for(height, width)["small_middle"]
    got = decode_resized_crop(open_image(path), (top, left, h, w), OUT)
    mean, p99, _ = difference(got, reference(path, (top + 2, left + 2, h, w), OUT))
    assert mean > REDUCED_MEAN or p99 > REDUCED_P99
    mean, p99, _ = difference(got, reference(path, (top, left, h, w), OUT, flip=True))
    assert mean > REDUCED_MEAN or p99 > REDUCED_P99
    ignored_orientation = decode_resized_crop(open_image(write(tmp_path, "orient1.jpg")), (top, left, h, w), OUT)
    mean, p99, _ = difference(got, ignored_orientation)
    assert mean > REDUCED_MEAN or p99 > REDUCED_P99


def test_larger_outputs_other_interpolations_and_no_draft(tmp_path):
    path = write(tmp_path, "rgb420.jpg")
    box = (10, 20, 250, 300)
    for interpolation in ("bicubic", InterpolationMode.BICUBIC, "lanczos", "hamming"):
        mode = InterpolationMode(getattr(interpolation, "value", interpolation))
        got = decode_resized_crop(open_image(path), box, (56, 72), interpolation=interpolation)  # 1/4
        assert_close_to_reference(got, reference(path, box, (56, 72), interpolation=mode), str(interpolation))
    box = (10, 20, 240, 230)  # inside the upright image of every kind
    for kind in ("rgb420.jpg", "grey.jpg", "cmyk.jpg", "orient3.jpg", "orient6.jpg"):  # no draft: exact
        other = write(tmp_path, kind)
        assert torch.equal(decode_resized_crop(open_image(other), box, 56, draft=False), reference(other, box, 56))
    for exact in ("nearest", "box"):  # never from a reduced decode
        image = open_image(path)
        got = decode_resized_crop(image, box, 56, interpolation=exact)
        assert image.size == (WIDTH, HEIGHT)
        assert torch.equal(got, reference(path, box, 56, interpolation=InterpolationMode(exact)))


def test_load_rgb_is_the_upright_rgb_image(tmp_path):
    for kind in ("orient8.jpg", "cmyk.jpg", "palette.png", "grey16.png", "orient6.png"):
        path = write(tmp_path, kind)
        with Image.open(path) as image:
            expected = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
        loaded = load_rgb(open_image(path))
        assert loaded.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(loaded), expected)


def test_unreadable_files_raise_one_clear_error(tmp_path):
    jpeg = write(tmp_path, "rgb420.jpg")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(Path(jpeg).read_bytes()[:2000])
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("not an image")
    with pytest.raises(ImageLoadError, match="notes.jpg"):
        open_image(not_image)
    with pytest.raises(ImageLoadError, match="missing.jpg"):
        open_image(tmp_path / "missing.jpg")
    image = open_image(truncated)  # the header is intact: the error comes with the pixels
    with pytest.raises(ImageLoadError, match="truncated.jpg.*skip_corrupt"):
        decode_resized_crop(image, (0, 0, 100, 100), OUT)
    with pytest.raises(ImageLoadError, match="truncated.jpg"):
        load_rgb(open_image(truncated))


def test_bad_arguments(tmp_path):
    path = write(tmp_path, "orient6.jpg")  # stored 349 x 270 (w x h): upright 270 wide, 349 high
    with pytest.raises(ValueError, match="does not lie inside the 349 x 270"):
        decode_resized_crop(open_image(path), (0, 0, 300, 300), OUT)
    with pytest.raises(ValueError, match="interpolation"):
        decode_resized_crop(open_image(path), (0, 0, 100, 100), OUT, interpolation="cubic")
    with pytest.raises(ValueError, match="positive"):
        decode_resized_crop(open_image(path), (0, 0, 100, 100), 0)
    with pytest.raises(ValueError, match="one each per view"):
        decode_resized_crops(open_image(path), [(0, 0, 100, 100)], [OUT, OUT])
    image = open_image(path)
    decode_resized_crop(image, (0, 0, 200, 200), OUT)  # decoded at 1/8
    assert oriented_size(image) == (349, 270)  # still the full-resolution size
    decode_resized_crop(image, (0, 0, 200, 200), OUT)  # the same scale: reuses the decode
    with pytest.raises(ValueError, match="open the file again"):
        decode_resized_crop(image, (0, 0, 200, 200), 150)
    with pytest.raises(ValueError, match="open the file again"):
        load_rgb(image)
