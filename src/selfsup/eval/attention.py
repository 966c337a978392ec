"""Self-attention maps of a ViT's last layer (the DINO/Mugs visualisation), written as PNG files with PIL.

For each image: the CLS token's attention over the patch tokens in the last block, one map per head,
min-max scaled per head, coloured ("hot": black → red → yellow → white) and blended with the input.
A PNG row is ``[input | head 1 | … | head H]``, enlarged with nearest-neighbour pixels for small images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from selfsup.config import ConfigError
from selfsup.data.datasets import build_dataset
from selfsup.data.transforms import transform_from_config
from selfsup.engine.trainer import resolve_device
from selfsup.eval.run import load_run
from selfsup.models.vit import ViT


@torch.no_grad()
def cls_attention(vit: ViT, images: torch.Tensor) -> torch.Tensor:
    """(B, heads, h, w): the last block's CLS → patch attention on the patch grid (each row sums to ≤ 1)."""
    attention = vit.last_self_attention(images)
    h, w = vit.patch_grid(*images.shape[-2:])
    return attention[:, :, 0, vit.num_prefix_tokens:].reshape(images.shape[0], -1, h, w)


def hot_colours(values: np.ndarray) -> np.ndarray:
    """(h, w) in [0, 1] → (h, w, 3) uint8 with the "hot" colour map."""
    v = np.clip(values, 0.0, 1.0)[..., None] * 3.0
    rgb = np.concatenate([np.clip(v, 0, 1), np.clip(v - 1, 0, 1), np.clip(v - 2, 0, 1)], axis=-1)
    return (255 * rgb).round().astype(np.uint8)


def unnormalise(images: torch.Tensor, mean, std) -> np.ndarray:
    """(B, 3, H, W) normalised tensors → (B, H, W, 3) float32 in [0, 1]: the images as they were shown."""
    rgb = images.cpu().float() * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    return rgb.clamp(0, 1).permute(0, 2, 3, 1).numpy()


def attention_panel(image: torch.Tensor, maps: torch.Tensor, mean, std, scale: int = 1,
                    alpha: float = 0.6) -> Image.Image:
    """One PNG row: the de-normalised input (3, H, W), then each head's map (h, w) upsampled and blended."""
    height, width = image.shape[-2:]
    base = (unnormalise(image[None], mean, std)[0] * 255).astype(np.float64)
    tiles = [base]
    for head in F.interpolate(maps[None].cpu().float(), size=(height, width), mode="nearest")[0]:
        lo, hi = head.min(), head.max()
        heat = hot_colours(((head - lo) / (hi - lo).clamp_min(1e-12)).numpy()).astype(np.float64)
        tiles.append((1 - alpha) * base + alpha * heat)
    row = np.concatenate(tiles, axis=1).round().astype(np.uint8)
    panel = Image.fromarray(row)
    return panel.resize((panel.width * scale, panel.height * scale), Image.NEAREST) if scale > 1 else panel


def export_attention(checkpoint_or_run: str | Path, out_dir: str | Path, n_images: int = 8, *,
                     split: str | None = None, overrides: list[str] | None = None, device: str | None = None,
                     scale: int | None = None) -> list[Path]:
    """Write ``attention_000.png …`` for the first ``n_images`` of ``split`` (default the val split) through the
    run's evaluated backbone (Mugs: the teacher ViT), eval transform. Returns the written paths."""
    _, _, cfg, method, _ = load_run(checkpoint_or_run, overrides)
    vit = method.backbone
    if not isinstance(vit, ViT):
        raise ConfigError(f"attention maps need a ViT backbone; this run uses {cfg.model.backbone!r}")
    target = resolve_device(device or cfg.train.device)
    vit.to(target).eval()
    dataset = build_dataset(cfg.data, split or cfg.data.val_split)
    transform = transform_from_config(cfg.data, "eval")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = torch.stack([transform(dataset[i][0]) for i in range(min(n_images, len(dataset)))])
    maps = cls_attention(vit, images.to(target))
    zoom = scale or max(1, 224 // images.shape[-2])
    paths = []
    for i, (image, head_maps) in enumerate(zip(images, maps, strict=True)):
        path = out / f"attention_{i:03d}.png"
        attention_panel(image, head_maps, cfg.data.mean, cfg.data.std, zoom).save(path)
        paths.append(path)
    return paths
