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

from selfsup.config import MethodConfig
from selfsup.methods.base import (
    BackboneFactory,
    Batch,
    Method,
    Progress,
    RunInfo,
    StepOutput,
    augmentation_views,
    register_method,
)
from selfsup.models.heads import byol_heads
from selfsup.nn.online_target import OnlineTarget


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


@register_method(BYOLConfig)
class BYOL(Method):
    cfg: BYOLConfig

    def __init__(self, cfg: BYOLConfig, backbone: BackboneFactory, run: RunInfo):
        super().__init__(cfg, run)
        self.views = augmentation_views(cfg.augmentation)
        net, width = backbone()
        projector, predictor, _ = byol_heads(width)
        self.net = OnlineTarget(net, projector, predictor)

    @property
    def backbone(self) -> nn.Module:
        return self.net.backbone

    def training_step(self, batch: Batch) -> StepOutput:
        x_q, x_t = batch.views
        p = self.net.query(x_q)
        z = self.net.target(x_t, self.cfg.shuffle_bn)
        loss = byol_loss(p, z.to(p.dtype))
        return StepOutput(loss, {"cosine": (1 - loss.detach() / 2)})

    def on_after_step(self, progress: Progress) -> None:
        self.net.update_target(self.cfg.momentum)
