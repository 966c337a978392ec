"""model.pos_embed_resample: the ViT's position embedding resampled for other input sizes as Mugs/DINO do
(``official``), or as timm does (``timm``)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from selfsup.cli import RECIPES
from selfsup.config import ConfigError, ModelConfig, load_config
from selfsup.models import build_backbone
from selfsup.models.vit import resample_pos_embed_official


def fixed_pos_embed(side: int = 14, dim: int = 3) -> torch.Tensor:
    """(1, 1 + side², dim): a smooth but non-separable pattern per channel; entry 0 is the class token's."""
    r, c = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32),
                          indexing="ij")
    channels = [torch.sin(0.5 * r + 0.3 * (d + 1) * c) + 0.1 * d * r * c / side for d in range(dim)]
    patches = torch.stack(channels, dim=-1).reshape(1, side * side, dim)
    return torch.cat([torch.full((1, 1, dim), 7.0), patches], dim=1)


def mugs_interpolate_pos_encoding(pos_embed: torch.Tensor, height: int, width: int, patch: int) -> torch.Tensor:
    """The arithmetic of sail-sg/mugs ``VisionTransformer.interpolate_pos_encoding`` for an image of this size:
    unchanged for a square image with as many patches; otherwise the √N x √N grid, channels first, through
    ``F.interpolate(bicubic, scale_factor=((height // patch + 0.1) / √N, (width // patch + 0.1) / √N))``
    with torch's defaults (align_corners False, no antialias), class entry prepended."""
    n = pos_embed.shape[1] - 1
    rows, cols = height // patch, width // patch
    if rows * cols == n and height == width:
        return pos_embed
    dim = pos_embed.shape[-1]
    grid = pos_embed[:, 1:].reshape(1, int(math.sqrt(n)), int(math.sqrt(n)), dim).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, scale_factor=((rows + 0.1) / math.sqrt(n), (cols + 0.1) / math.sqrt(n)),
                            mode="bicubic")
    assert resized.shape[-2:] == (rows, cols)
    return torch.cat([pos_embed[:, :1], resized.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


def _cubic_weights(t: float, a: float = -0.75) -> list[float]:
    """Keys' cubic convolution weights (torch's A = -0.75) of the 4 neighbours at offsets -1, 0, 1, 2."""
    def w(x: float) -> float:
        x = abs(x)
        return (a + 2) * x**3 - (a + 3) * x**2 + 1 if x <= 1 else a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
    return [w(t + 1), w(t), w(1 - t), w(2 - t)]


def bicubic_by_hand(grid: torch.Tensor, out: int, scale: float) -> torch.Tensor:
    """(n, n, D) → (out, out, D): output i samples the source at (i + 0.5) / scale − 0.5, border-clamped, separably."""
    n = grid.shape[0]

    def along_first(x: torch.Tensor) -> torch.Tensor:
        rows = []
        for i in range(out):
            real = (i + 0.5) / scale - 0.5
            base = math.floor(real)
            weights = _cubic_weights(real - base)
            rows.append(sum(wk * x[min(max(base - 1 + k, 0), n - 1)] for k, wk in enumerate(weights)))
        return torch.stack(rows)

    return along_first(along_first(grid).transpose(0, 1)).transpose(0, 1)


def test_local_crop_grid_14_to_6_matches_the_official_arithmetic():
    """96-px local crops of a 224-px ViT/16: the 14 x 14 grid resampled to 6 x 6."""
    pos = fixed_pos_embed(14)
    ours = resample_pos_embed_official(pos, (6, 6))
    reference = mugs_interpolate_pos_encoding(pos, 96, 96, 16)
    assert ours.shape == (1, 1 + 36, 3)
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)
    assert torch.equal(ours[:, 0], pos[:, 0])  # the class-token entry as is
    by_hand = bicubic_by_hand(pos[0, 1:].reshape(14, 14, 3).double(), 6, scale=6.1 / 14)
    torch.testing.assert_close(ours[0, 1:].reshape(6, 6, 3).double(), by_hand, rtol=1e-5, atol=1e-5)
    # what the +0.1 scale factor changes: a plain resize to 6 x 6, and timm's antialiased one, give other values
    to_size = bicubic_by_hand(pos[0, 1:].reshape(14, 14, 3).double(), 6, scale=6 / 14)
    assert (ours[0, 1:].reshape(6, 6, 3).double() - to_size).abs().max() > 1e-2
    timm = resample_abs_pos_embed(pos, new_size=(6, 6), old_size=(14, 14), num_prefix_tokens=1)
    assert (ours - timm).abs().max() > 1e-2


@pytest.mark.parametrize(("height", "width"), [(224, 224), (32, 32), (64, 48), (160, 224)])  # 224: identity
def test_other_grids_and_the_identity_match_the_official_arithmetic(height, width):
    pos = fixed_pos_embed(14)
    ours = resample_pos_embed_official(pos, (height // 16, width // 16))
    torch.testing.assert_close(ours, mugs_interpolate_pos_encoding(pos, height, width, 16), rtol=0, atol=0)
    assert (ours is pos) == (height == width == 224)  # the laid-out grid is used as is


def _tiny_vit(resample: str = "official"):
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="vit_tiny", patch_size=4, embed_dim=16, depth=1, num_heads=2, vit_image_size=32,
                      pos_embed_resample=resample)
    return build_backbone(cfg)[0].eval()


def _tokens_with(vit, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """forward_tokens written out with a given position embedding."""
    patches = vit.patch_embed(x)
    patches = patches.reshape(x.shape[0], -1, patches.shape[-1])
    tokens = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), patches], dim=1) + pos
    return vit.blocks(vit.norm_pre(tokens))


def test_the_forward_pass_uses_it_at_both_sizes():
    vit = _tiny_vit()
    with torch.no_grad():
        vit.pos_embed.copy_(fixed_pos_embed(8, 16))
    assert vit.pos_embed_resample == "official"
    g = torch.Generator().manual_seed(1)
    globals_, locals_ = torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, 3, 16, 16, generator=g)
    with torch.no_grad():
        # 32 px: the grid the embedding was laid out for, used unchanged (the identity case)
        torch.testing.assert_close(resample_pos_embed_official(vit.pos_embed, (8, 8)), vit.pos_embed)
        torch.testing.assert_close(vit.forward_tokens(globals_), _tokens_with(vit, globals_, vit.pos_embed))
        # 16 px: 8 x 8 -> 4 x 4 with the official arithmetic
        official = mugs_interpolate_pos_encoding(vit.pos_embed, 16, 16, 4)
        torch.testing.assert_close(vit.forward_tokens(locals_), _tokens_with(vit, locals_, official))
        torch.testing.assert_close(vit(locals_), vit.norm(_tokens_with(vit, locals_, official))[:, 0])
        assert vit.last_blocks_cls(locals_, n=1).shape == (2, 16)


def test_timm_option_keeps_timms_resampling():
    official, timm = _tiny_vit("official"), _tiny_vit("timm")
    timm.load_state_dict(official.state_dict())
    x32, x16 = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = resample_abs_pos_embed(timm.pos_embed, new_size=(4, 4), old_size=(8, 8), num_prefix_tokens=1)
        torch.testing.assert_close(timm.forward_tokens(x16), _tokens_with(timm, x16, expected))
        torch.testing.assert_close(timm(x32), official(x32))  # the same network where nothing is resampled
        assert not torch.allclose(timm(x16), official(x16))


def test_option_is_checked_and_the_mugs_recipes_use_official():
    with pytest.raises(ConfigError, match="model.pos_embed_resample='bicubic' is not valid"):
        build_backbone(ModelConfig(backbone="vit_tiny", pos_embed_resample="bicubic"))
    for name in ("mugs_vit_small_100ep", "mugs_vit_small_300ep", "mugs_vit_small_800ep", "mugs_vit_base_400ep",
                 "mugs_vit_large_250ep"):
        assert load_config(RECIPES / f"{name}.yaml").model.pos_embed_resample == "official"
