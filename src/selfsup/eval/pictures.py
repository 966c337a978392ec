"""Image grids for the report (PIL): rows of images, retrieval rows (a query and its neighbours) and near-duplicate
pairs, each tile captioned with its cosine similarity and, when labels exist, its class name.

Inputs are eval-transform tensors (B, 3, H, W) normalised with the data set's ``mean`` / ``std``; they are shown as
the model saw them, enlarged with nearest-neighbour pixels when small.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from selfsup.eval.attention import unnormalise

QUERY_COLOUR = (9, 105, 218)  # blue frame and caption of a query tile
SAME_CLASS = (26, 127, 55)  # green: a neighbour of the query's class
OTHER_CLASS = (207, 34, 46)  # red: of another class
PLAIN = (31, 35, 40)  # captions when there are no labels
CAPTION_LINE = 13  # pixels per caption line


def _font() -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=11)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def tiles(images: torch.Tensor, mean: Sequence[float], std: Sequence[float], height: int = 64) -> list[Image.Image]:
    """Each image de-normalised and scaled to ``height`` pixels (nearest-neighbour when enlarging)."""
    out = []
    for array in (unnormalise(images, mean, std) * 255).round().astype(np.uint8):
        tile = Image.fromarray(array)
        width = max(1, round(tile.width * height / tile.height))
        out.append(tile.resize((width, height), Image.NEAREST if tile.height < height else Image.BILINEAR))
    return out


def image_row(images: torch.Tensor, mean, std, height: int = 64, gap: int = 4) -> Image.Image:
    """The images side by side at ``height`` pixels, white gaps between."""
    return hstack(tiles(images, mean, std, height), gap)


def hstack(parts: Sequence[Image.Image], gap: int = 4) -> Image.Image:
    """The pictures side by side, top-aligned, on white."""
    row = Image.new("RGB", (sum(p.width for p in parts) + gap * (len(parts) - 1), max(p.height for p in parts)),
                    "white")
    x = 0
    for part in parts:
        row.paste(part, (x, 0))
        x += part.width + gap
    return row


def vstack(parts: Sequence[Image.Image], gap: int = 8) -> Image.Image:
    """The pictures one below the other, left-aligned, on white."""
    column = Image.new("RGB", (max(p.width for p in parts), sum(p.height for p in parts) + gap * (len(parts) - 1)),
                       "white")
    y = 0
    for part in parts:
        column.paste(part, (0, y))
        y += part.height + gap
    return column


def captioned(tile: Image.Image, lines: Sequence[tuple[str, tuple[int, int, int]]], *,
              frame: tuple[int, int, int] | None = None) -> Image.Image:
    """The tile with one caption line per ``(text, colour)`` below it (text clipped to the tile's width), and an
    optional 2-pixel coloured frame."""
    border = 2 if frame else 0
    width = max(tile.width + 2 * border, 44)
    out = Image.new("RGB", (width, tile.height + 2 * border + CAPTION_LINE * len(lines) + 2), "white")
    if frame:
        ImageDraw.Draw(out).rectangle([0, 0, tile.width + 2 * border - 1, tile.height + 2 * border - 1], fill=frame)
    out.paste(tile, (border, border))
    draw, font = ImageDraw.Draw(out), _font()
    for n, (text, colour) in enumerate(lines):
        while text and draw.textlength(text, font=font) > width:
            text = text[:-1]
        draw.text((0, tile.height + 2 * border + 1 + CAPTION_LINE * n), text, fill=colour, font=font)
    return out


def _class_name(classes: Sequence[str] | None, label: int | None) -> str | None:
    if classes is None or label is None or label < 0:
        return None
    return classes[label] if label < len(classes) else str(label)


def retrieval_grid(queries: torch.Tensor, neighbours: torch.Tensor, similarities: torch.Tensor,
                   mean: Sequence[float], std: Sequence[float], *, query_labels: Sequence[int] | None = None,
                   neighbour_labels: Sequence[Sequence[int]] | None = None, classes: Sequence[str] | None = None,
                   height: int = 64) -> Image.Image:
    """One row per query: the query (blue frame) and its k neighbours (Q, k, 3, H, W), each captioned with its cosine
    similarity; with labels also the class name, green where it is the query's class and red where not."""
    if neighbours.shape[:2] != similarities.shape:
        raise ValueError(f"neighbours {tuple(neighbours.shape[:2])} and similarities {tuple(similarities.shape)} "
                         "must both be (Q, k)")
    rows = []
    for q in range(queries.shape[0]):
        query_class = _class_name(classes, None if query_labels is None else int(query_labels[q]))
        head = captioned(tiles(queries[q:q + 1], mean, std, height)[0],
                         [("query", QUERY_COLOUR), *([(query_class, QUERY_COLOUR)] if query_class else [])],
                         frame=QUERY_COLOUR)
        cells = [head]
        for j, tile in enumerate(tiles(neighbours[q], mean, std, height)):
            label = None if neighbour_labels is None else int(neighbour_labels[q][j])
            name = _class_name(classes, label)
            colour = PLAIN if name is None or query_class is None else (
                SAME_CLASS if label == int(query_labels[q]) else OTHER_CLASS)
            cells.append(captioned(tile, [(f"{float(similarities[q, j]):.3f}", colour),
                                          *([(name, colour)] if name else [])]))
        rows.append(hstack([cells[0], Image.new("RGB", (8, 1), "white"), *cells[1:]], gap=4))
    return vstack(rows)


def pair_grid(first: torch.Tensor, second: torch.Tensor, similarities: torch.Tensor, mean: Sequence[float],
              std: Sequence[float], *, captions: Sequence[str] | None = None, per_row: int = 4,
              height: int = 64) -> Image.Image:
    """Near-duplicate pairs side by side (``per_row`` pairs a row), each pair captioned with its cosine similarity
    and, optionally, a line of ``captions`` (e.g. the two indices or class names)."""
    if not first.shape[0] == second.shape[0] == similarities.shape[0] > 0:
        raise ValueError("pair_grid needs the same, non-zero number of first images, second images and similarities")
    cells = []
    for p, (a, b) in enumerate(zip(tiles(first, mean, std, height), tiles(second, mean, std, height), strict=True)):
        lines = [(f"cosine {float(similarities[p]):.3f}", PLAIN)]
        if captions is not None:
            lines.append((captions[p], PLAIN))
        cells.append(captioned(hstack([a, b], gap=2), lines))
    rows = [hstack(cells[i:i + per_row], gap=16) for i in range(0, len(cells), per_row)]
    return vstack(rows, gap=10)
