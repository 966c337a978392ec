"""Vision Transformers (timm, ``pretrained=False``) registered as ``vit_tiny | vit_small | vit_base | vit_large``.

As DINO/Mugs build them: pre-norm blocks, MLP ratio 4, qkv bias, LayerNorm eps 1e-6, truncated-normal(0.02)
weights and tokens, stochastic depth linspace(0, ``model.drop_path_rate``) over the blocks. The position
embedding is laid out for ``model.vit_image_size``; other input sizes (96-px local crops, small CPU images)
resample its patch part, the class-token entry kept as is, in one of two ways (``model.pos_embed_resample``):

* ``official`` (default): as sail-sg/mugs ``src/vision_transformer.py`` ``interpolate_pos_encoding`` (DINO's):
  the n×n grid (1 + n² = the embedding's length) is resized with ``F.interpolate(mode="bicubic",
  scale_factor=((rows + 0.1) / n, (cols + 0.1) / n))`` (align_corners False, no antialias). The +0.1 makes
  ``floor(n · scale)`` land on the wanted grid despite rounding; because torch then maps coordinates with the
  *given* scale factor, not rows / n, the values differ slightly from a resize to the size: 14 → 6 samples
  the source at (i + 0.5)·14/6.1 − 0.5, not (i + 0.5)·14/6 − 0.5. The grid it was laid out for is used
  unchanged (the official test is on the image: square with as many patches; Mugs' crops are square).
* ``timm``: timm's ``resample_abs_pos_embed`` (``dynamic_img_size``): bicubic to the size, antialiased when
  shrinking.

``forward`` maps images to the CLS token after the final LayerNorm (what kNN and export use). The extra
views Mugs and the evaluations need: :meth:`ViT.forward_tokens` (all tokens after the last block, *before*
the final norm), :meth:`ViT.last_blocks_cls` (normed CLS of the last n blocks, the ViT-S linear probe) and
:meth:`ViT.last_self_attention` (the last block's attention probabilities, per head).
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from selfsup.config import ModelConfig, check_choice
from selfsup.models.backbones import register_backbone

POS_EMBED_RESAMPLES = ("official", "timm")

# (patch size, width, depth, heads); vit_tiny is the CPU preset: DeiT-Ti widths with 4-px patches
VIT_PRESETS: dict[str, tuple[int, int, int, int]] = {
    "vit_tiny": (4, 192, 12, 3),
    "vit_small": (16, 384, 12, 6),
    "vit_base": (16, 768, 12, 12),
    "vit_large": (16, 1024, 24, 16),
}


def resample_pos_embed_official(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(1, 1 + n², D) class + n×n patch position embeddings → (1, 1 + rows·cols, D) for a rows×cols token grid,
    with the DINO/Mugs arithmetic (module docstring); the class-token entry is kept as is. The n×n grid itself
    is returned unchanged, as the official early exit (a resize with scale (n + 0.1)/n would alter it)."""
    side = math.sqrt(pos_embed.shape[1] - 1)
    n, dim = int(side), pos_embed.shape[-1]
    rows, cols = grid
    if rows == cols == n and n * n == pos_embed.shape[1] - 1:
        return pos_embed
    patches = pos_embed[:, 1:].reshape(1, n, n, dim).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, scale_factor=((rows + 0.1) / side, (cols + 0.1) / side), mode="bicubic",
                            align_corners=False)
    if patches.shape[-2:] != (rows, cols):  # the +0.1 guards against this; a failure would misplace every token
        raise RuntimeError(f"position-embedding resampling {n}x{n} -> {rows}x{cols} gave {tuple(patches.shape[-2:])}")
    return torch.cat((pos_embed[:, :1], patches.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)), dim=1)


class ViT(VisionTransformer):
    """timm's VisionTransformer without a classifier; parameter names are timm's (and DINO's/Mugs')."""

    def __init__(self, *, image_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int,
                 drop_path_rate: float = 0.0, pos_embed_resample: str = "official"):
        check_choice("model.pos_embed_resample", pos_embed_resample, POS_EMBED_RESAMPLES)
        super().__init__(img_size=image_size, patch_size=patch_size, num_classes=0, global_pool="token",
                         embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=4.0, qkv_bias=True,
                         norm_layer=partial(nn.LayerNorm, eps=1e-6), drop_path_rate=drop_path_rate,
                         dynamic_img_size=True)  # patch tokens come as (B, rows, cols, D), any input size
        self.pos_embed_resample = pos_embed_resample
        nn.init.trunc_normal_(self.cls_token, std=0.02)  # DINO/Mugs; timm draws it with std 1e-6

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Prepend the class token and add the position embedding, resampled for this grid (module docstring)."""
        if self.pos_embed_resample == "timm":
            return super()._pos_embed(x)
        batch, rows, cols, dim = x.shape
        x = torch.cat((self.cls_token.expand(batch, -1, -1), x.reshape(batch, rows * cols, dim)), dim=1)
        return self.pos_drop(x + resample_pos_embed_official(self.pos_embed, (rows, cols)))

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1 + N, D): CLS and patch tokens after the last block, before the final LayerNorm."""
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        return self.blocks(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D): the CLS token after the final LayerNorm."""
        return self.norm(self.forward_tokens(x))[:, 0]

    def last_blocks_cls(self, x: torch.Tensor, n: int = 4, avgpool: bool = False) -> torch.Tensor:
        """(B, n·D): the CLS tokens of the last ``n`` blocks, each through the final LayerNorm, concatenated
        (DINO/Mugs linear probe for ViT-S). ``avgpool`` appends the mean normed patch token of the last block
        (their ViT-B variant, used with n = 1)."""
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i >= len(self.blocks) - n:
                outputs.append(self.norm(x))
        features = [out[:, 0] for out in outputs]
        if avgpool:
            features.append(outputs[-1][:, self.num_prefix_tokens:].mean(dim=1))
        return torch.cat(features, dim=1)

    def last_self_attention(self, x: torch.Tensor) -> torch.Tensor:
        """(B, heads, 1 + N, 1 + N): softmax(q·kᵀ/√d) of the last block; row 0 is the CLS token's attention."""
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        for block in self.blocks[:-1]:
            x = block(x)
        last = self.blocks[-1]
        attn = last.attn
        y = last.norm1(x)
        qkv = attn.qkv(y).reshape(y.shape[0], y.shape[1], 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)

    def patch_grid(self, height: int, width: int) -> tuple[int, int]:
        """Token grid of an input of this size."""
        ph, pw = self.patch_embed.patch_size
        return height // ph, width // pw


class LastBlocksCLS(nn.Module):
    """A frozen-feature "backbone" for linear probes: images → :meth:`ViT.last_blocks_cls` (1536-d for ViT-S)."""

    def __init__(self, vit: ViT, n: int = 4, avgpool: bool = False):
        super().__init__()
        self.vit = vit
        self.n = n
        self.avgpool = avgpool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit.last_blocks_cls(x, self.n, self.avgpool)

    def final_cls(self, features: torch.Tensor) -> torch.Tensor:
        """The columns of ``forward``'s output that are the last block's normed CLS token, i.e. ``vit(x)``."""
        dim = self.vit.embed_dim
        return features[:, (self.n - 1) * dim:self.n * dim]


def set_drop_path(module: nn.Module, rate: float) -> None:
    """Set every stochastic-depth layer in ``module`` to ``rate`` (a Mugs/DINO teacher uses 0)."""
    for m in module.modules():
        if isinstance(m, DropPath):
            m.drop_prob = rate


def build_vit(name: str, cfg: ModelConfig) -> tuple[ViT, int]:
    patch, width, depth, heads = VIT_PRESETS[name]
    net = ViT(image_size=cfg.vit_image_size, patch_size=cfg.patch_size or patch, embed_dim=cfg.embed_dim or width,
              depth=cfg.depth or depth, num_heads=cfg.num_heads or heads, drop_path_rate=cfg.drop_path_rate,
              pos_embed_resample=cfg.pos_embed_resample)
    return net, net.embed_dim


for _name in VIT_PRESETS:
    register_backbone(_name)(partial(build_vit, _name))
