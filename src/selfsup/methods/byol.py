"""BYOL-asym, the small-batch SGD variant of the ISD repository (``train_byol.py``).

p = n(h(g_q(f_q(x_q)))), z = sg(n(g_k(f_k(x_k)))), L = mean_b ‖p − z‖² = mean_b (2 − 2 p·z).
One direction only (no view swap); the target (f_k, g_k) is an EMA of (f_q, g_q), the predictor h
is not part of it. MSF with k = 1 is exactly this loss (:func:`byol_loss` is shared).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.config import Config, MethodConfig, register_method_config
from selfsup.methods.base import (
    DataInfo,
    Encoder,
    Method,
    StepOutput,
    augmentation_views,
    new_backbone,
    register_method,
)
from selfsup.models.heads import byol_predictor, byol_projector
from selfsup.nn import distributed
from selfsup.nn.ema import ema_update, make_teacher


@register_method_config
@dataclass
class BYOLConfig(MethodConfig):
    name: str = "byol"
    momentum: float = 0.99  # target EMA, constant (README value; the argparse default is 0.999)
    augmentation: str = "strong/strong"  # target/query views: AUG+ on both as train_byol.py
    shuffle_bn: bool = True


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """mean_b (2 − 2·cos(p_b, z_b)) = mean_b ‖n(p_b) − n(z_b)‖², in float32 (CPU autocast would keep bf16 here,
    a loss step of 2⁻⁶ near 2 and a cosine step of 2⁻⁸ near 1)."""
    p, z = p.float(), z.float()
    return (2 - 2 * (F.normalize(p, dim=1) * F.normalize(z, dim=1)).sum(dim=1)).mean()


class OnlineTarget(Method):
    """Shared skeleton of BYOL-style methods: online encoder + predictor, EMA target, ShuffleBN targets."""

    def __init__(self, cfg: MethodConfig, full: Config, data: DataInfo):
        super().__init__(cfg, full, data)
        backbone, width = new_backbone(full)
        projector, predictor, self.embedding_dim = self.heads(width)
        self.encoder_q = Encoder(backbone, projector)
        self.encoder_k = make_teacher(self.encoder_q)
        self.predictor = predictor

    def heads(self, width: int) -> tuple[nn.Module, nn.Module, int]:
        """(projector, predictor, embedding width) on a ``width``-d backbone; BYOL's d → 2d → d/4 by default."""
        return byol_projector(width), byol_predictor(width // 4, 2 * width), width // 4

    @property
    def backbone(self) -> nn.Module:
        return self.encoder_q.backbone

    def query(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.predictor(self.encoder_q(x)), dim=1)

    @torch.no_grad()
    def target(self, x: torch.Tensor, shuffle_bn: bool) -> torch.Tensor:
        if shuffle_bn:
            shuffled, inverse = distributed.batch_shuffle(x)
            return distributed.batch_unshuffle(F.normalize(self.encoder_k(shuffled), dim=1), inverse)
        return F.normalize(self.encoder_k(x), dim=1)

    def on_after_step(self, progress: float) -> None:
        ema_update(self.encoder_k, self.encoder_q, self.cfg.momentum)


@register_method("byol")
class BYOL(OnlineTarget):
    cfg: BYOLConfig

    def __init__(self, cfg: BYOLConfig, full: Config, data: DataInfo):
        super().__init__(cfg, full, data)
        self.views = augmentation_views(cfg.augmentation)

    def training_step(self, views, indices, labels) -> StepOutput:
        x_q, x_t = views
        p = self.query(x_q)
        z = self.target(x_t, self.cfg.shuffle_bn)
        loss = byol_loss(p, z.to(p.dtype))
        return StepOutput(loss, {"cosine": (1 - loss.detach() / 2)})
