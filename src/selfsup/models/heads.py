"""Projection and prediction heads built from a list of layer widths."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def mlp(widths: Sequence[int], *, batch_norm: bool = True, bias: bool = True,
        first_bias: bool | None = None) -> nn.Sequential:
    """Linear-(BN)-ReLU blocks between consecutive widths; the last Linear stands alone.

    ``mlp([512, 1024, 128])`` is the BYOL/UMBC projector Linear(512,1024)-BN-ReLU-Linear(1024,128);
    ``mlp([2048, 2048, 128], batch_norm=False)`` is the MoCo-v2 head.
    ``first_bias`` overrides ``bias`` for the first Linear (ISD's predictor has none there).
    """
    if len(widths) < 2:
        raise ValueError(f"an MLP needs at least input and output widths, got {list(widths)}")
    layers: list[nn.Module] = []
    last = len(widths) - 2
    for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        use_bias = first_bias if (i == 0 and first_bias is not None) else bias
        layers.append(nn.Linear(w_in, w_out, bias=use_bias))
        if i < last:
            if batch_norm:
                layers.append(nn.BatchNorm1d(w_out))
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def byol_projector(feature_dim: int) -> nn.Sequential:
    """UMBC ``get_mlp``: d -> 2d (BN, ReLU) -> d/4 (512->1024->128 for R18, 2048->4096->512 for R50)."""
    return mlp([feature_dim, 2 * feature_dim, feature_dim // 4])


def byol_predictor(dim: int, hidden: int) -> nn.Sequential:
    """UMBC predictor: dim -> hidden (BN, ReLU) -> dim."""
    return mlp([dim, hidden, dim])


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
