"""The online/target pair of MoCo, BYOL, ISD and MSF: an online encoder (backbone → head), an optional
predictor, and a target encoder that only the EMA moves.

query  q = n(h(g(f(x))))        (n: L2 normalisation; h: the predictor, absent for MoCo)
target z = sg(n(g_t(f_t(x))))   with ShuffleBN: the batch is shuffled across processes (or across the splits
                                of a split BatchNorm on one process) before the target encoder and
                                unshuffled after it, so its BatchNorm sees other sub-batches
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.nn import distributed
from selfsup.nn.ema import ema_update, make_teacher
from selfsup.nn.split_bn import bn_splits_of, split_shuffle, split_unshuffle


class Encoder(nn.Module):
    """backbone → head, with the backbone reachable for evaluation."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


@torch.no_grad()
def shuffled_embedding(encoder: nn.Module, x: torch.Tensor, shuffle_bn: bool) -> torch.Tensor:
    """n(encoder(x)) without gradient; with ``shuffle_bn`` the batch is permuted across processes for the forward
    pass and the outputs put back in order (MoCo's ShuffleBN). On one process whose BatchNorm is split
    (``model.bn_splits``) the permutation is across the splits instead; otherwise a plain forward."""
    if not shuffle_bn:
        return F.normalize(encoder(x), dim=1)
    if distributed.world_size() > 1:
        shuffled, inverse = distributed.batch_shuffle(x)
        return distributed.batch_unshuffle(F.normalize(encoder(shuffled), dim=1), inverse)
    splits = bn_splits_of(encoder)
    if splits == 1:
        return F.normalize(encoder(x), dim=1)
    shuffled, inverse = split_shuffle(x, splits)
    return split_unshuffle(F.normalize(encoder(shuffled), dim=1), inverse)


class OnlineTarget(nn.Module):
    """``encoder_q`` = backbone → projector (trained), ``predictor`` (trained, or None), ``encoder_k`` = an EMA
    copy of ``encoder_q`` (the predictor is not part of it)."""

    def __init__(self, backbone: nn.Module, projector: nn.Module, predictor: nn.Module | None = None):
        super().__init__()
        self.encoder_q = Encoder(backbone, projector)
        self.encoder_k = make_teacher(self.encoder_q)
        self.predictor = predictor

    @property
    def backbone(self) -> nn.Module:
        return self.encoder_q.backbone

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """n(h(g(f(x)))), or n(g(f(x))) without a predictor."""
        z = self.encoder_q(x)
        return F.normalize(self.predictor(z) if self.predictor is not None else z, dim=1)

    def target(self, x: torch.Tensor, shuffle_bn: bool = True) -> torch.Tensor:
        """sg(n(g_t(f_t(x)))), with ShuffleBN across processes when ``shuffle_bn``."""
        return shuffled_embedding(self.encoder_k, x, shuffle_bn)

    def update_target(self, momentum: float) -> None:
        """θ_t ← m·θ_t + (1 − m)·θ_q."""
        ema_update(self.encoder_k, self.encoder_q, momentum)
