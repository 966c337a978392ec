"""Projection, prediction and prototype heads, all built by one :func:`mlp` from a list of layer widths.

- BYOL / UMBC projector and predictor (:func:`byol_heads`), the MoCo-v2 head (``mlp(..., batch_norm=False)``);
- Mugs / DINO: :class:`ContrastiveHead` (instance and local-group heads: bias-free GELU projector and, on the
  student, a predictor) and :class:`GroupHead` (DINO's prototype head: MLP → L2-normalise → weight-normed Linear);
- SeLa: :class:`MultiHead`, one Linear classifier per head on shared features.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

RELU = partial(nn.ReLU, inplace=True)


def mlp(widths: Sequence[int], *, batch_norm: bool = True, bias: bool = True, first_bias: bool | None = None,
        activation: Callable[[], nn.Module] = RELU, trunc_normal_init: bool = False) -> nn.Sequential:
    """Linear-(BN)-activation blocks between consecutive widths; the last Linear stands alone.

    ``mlp([512, 1024, 128])`` is the BYOL/UMBC projector Linear(512,1024)-BN-ReLU-Linear(1024,128);
    ``mlp([2048, 2048, 128], batch_norm=False)`` is the MoCo-v2 head; ``activation=nn.GELU`` with
    ``trunc_normal_init`` (weights trunc-normal(0.02), zero biases, as DINO/Mugs) builds their heads.
    ``first_bias`` overrides ``bias`` for the first Linear (ISD's predictor has none there).
    """
    if len(widths) < 2:
        raise ValueError(f"an MLP needs at least input and output widths, got {list(widths)}")
    layers: list[nn.Module] = []
    last = len(widths) - 2
    for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        use_bias = first_bias if (i == 0 and first_bias is not None) else bias
        linear = nn.Linear(w_in, w_out, bias=use_bias)
        if trunc_normal_init:
            nn.init.trunc_normal_(linear.weight, std=0.02)
            if use_bias:
                nn.init.zeros_(linear.bias)
        layers.append(linear)
        if i < last:
            if batch_norm:
                layers.append(nn.BatchNorm1d(w_out))
            layers.append(activation())
    return nn.Sequential(*layers)


def byol_projector(feature_dim: int) -> nn.Sequential:
    """UMBC ``get_mlp``: d -> 2d (BN, ReLU) -> d/4 (512->1024->128 for R18, 2048->4096->512 for R50)."""
    return mlp([feature_dim, 2 * feature_dim, feature_dim // 4])


def byol_predictor(dim: int, hidden: int) -> nn.Sequential:
    """UMBC predictor: dim -> hidden (BN, ReLU) -> dim."""
    return mlp([dim, hidden, dim])


def byol_heads(feature_dim: int) -> tuple[nn.Sequential, nn.Sequential, int]:
    """BYOL-asym's (projector d → 2d → d/4, predictor d/4 → 2d → d/4, embedding width d/4), shared by ISD+ and MSF."""
    return byol_projector(feature_dim), byol_predictor(feature_dim // 4, 2 * feature_dim), feature_dim // 4


class MultiHead(nn.Module):
    """SeLa's classifier heads: one Linear(in_features, k) per entry of ``num_classes`` on shared features
    (``num_classes=[K] * hc``); ``forward`` returns the list of logits, head 0 first.

    Initialised as the seed's linear layers, N(0, ``init_std``) weights and zero biases.
    """

    def __init__(self, in_features: int, num_classes: Sequence[int], init_std: float = 0.01):
        super().__init__()
        if not num_classes:
            raise ValueError("MultiHead needs at least one head")
        self.heads = nn.ModuleList(nn.Linear(in_features, k) for k in num_classes)
        for head in self.heads:
            nn.init.normal_(head.weight, 0.0, init_std)
            nn.init.zeros_(head.bias)

    def __len__(self) -> int:
        return len(self.heads)

    def __getitem__(self, index: int) -> nn.Linear:
        return self.heads[index]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [head(x) for head in self.heads]


# ------------------------------------------------------------------------------------------------ Mugs / DINO


def gelu_mlp(widths: Sequence[int], *, bias: bool, trunc_normal: bool = True,
             batch_norm: bool = False) -> nn.Sequential:
    """Mugs' Linear-(BN)-GELU-…-Linear (BN with ``use_bn_in_head``): weights trunc-normal(0.02) and zero biases,
    or PyTorch's default Linear init when not ``trunc_normal``."""
    return mlp(widths, batch_norm=batch_norm, bias=bias, activation=nn.GELU, trunc_normal_init=trunc_normal)


class ContrastiveHead(nn.Module):
    """Instance / local-group head. Teacher (no predictor): n(projector(x)). Student: n(predictor(n(projector(x))))
    (the inner n only with ``norm_before_pred``). Projector D→h→h→out and predictor out→h_p→out, bias-free;
    projectors take BatchNorm after their hidden layers with the official ``use_bn_in_head`` (predictors never)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, predictor_hidden_dim: int | None,
                 norm_before_pred: bool = True, batch_norm: bool = False):
        super().__init__()
        self.projector = gelu_mlp([in_dim, hidden_dim, hidden_dim, out_dim], bias=False, batch_norm=batch_norm)
        self.predictor: nn.Module | None = None
        if predictor_hidden_dim:
            # built after the official head's init pass: PyTorch's default Linear init
            self.predictor = gelu_mlp([out_dim, predictor_hidden_dim, out_dim], bias=False, trunc_normal=False)
        self.norm_before_pred = norm_before_pred

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.projector(x)
        if self.predictor is None:
            return F.normalize(z, dim=-1)
        if self.norm_before_pred:
            z = F.normalize(z, dim=-1)
        return F.normalize(self.predictor(z), dim=-1)


class WeightNormLinear(nn.Module):
    """Bias-free Linear with W = g · v/‖v‖ per output row (``torch.nn.utils.weight_norm`` with dim 0), g = 1.

    ``g`` keeps weight_norm's (out, 1) shape; it is frozen when ``freeze_norm`` (DINO's ``norm_last_layer``).
    """

    def __init__(self, in_dim: int, out_dim: int, freeze_norm: bool):
        super().__init__()
        self.weight_v = nn.Parameter(nn.Linear(in_dim, out_dim, bias=False).weight.detach().clone())
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not freeze_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 even under bf16 autocast: these are cosines divided by the teacher's τ (0.04), where bf16's 2⁻⁸
        # rounding would move a logit by up to 0.1 (fp16 AMP, as DINO and Mugs trained: 0.012)
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True))


class GroupHead(nn.Module):
    """DINO head: D→h→h→bottleneck with biases (GELU) → L2-normalise → ``last_layer`` (bottleneck → K logits)."""

    def __init__(self, in_dim: int, hidden_dim: int, bottleneck_dim: int, out_dim: int, norm_last_layer: bool,
                 batch_norm: bool = False):
        super().__init__()
        self.projector = gelu_mlp([in_dim, hidden_dim, hidden_dim, bottleneck_dim], bias=True, batch_norm=batch_norm)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, freeze_norm=norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.projector(x), dim=-1))
