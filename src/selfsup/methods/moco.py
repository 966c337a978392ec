"""MoCo-v2 (He et al. 2019; Chen et al. 2020): InfoNCE against a queue of momentum-encoder keys.

q = n(f_q(x_q)), k = sg(n(f_k(x_k))); logits = [q·k, q·Q₁ … q·Q_K] / τ; L = CE(logits, 0).
Step order as the official code: EMA of the key encoder (done after the previous optimiser step,
which is the same weights), keys with ShuffleBN, logits against the queue as it was, then enqueue
the keys gathered from all ranks (with their dataset indices).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.config import MethodConfig
from selfsup.data.recipes import ViewLayout
from selfsup.errors import check_choice
from selfsup.methods.base import BackboneFactory, Batch, Method, Progress, RunInfo, StepOutput, register_method
from selfsup.models.heads import mlp
from selfsup.nn.memory import MemoryBank
from selfsup.nn.online_target import OnlineTarget


@dataclass
class MoCoConfig(MethodConfig):
    name: str = "moco"
    dim: int = 128  # embedding width
    mlp: bool = True  # v2 head: Linear(d,d)-ReLU-Linear(d,dim); v1: Linear(d,dim)
    queue_size: int = 65536
    temperature: float = 0.2  # v2 0.2; v1 0.07
    momentum: float = 0.999  # key-encoder EMA, constant
    shuffle_bn: bool = True  # shuffle the key batch across ranks (per-GPU BN); no-op on one process
    augmentation: str = "aug+"  # aug+ (v2) | moco_v1
    queue_init_scale: float = 1.0  # 0.1 reproduces the single-GPU (AlexZaikin) variant
    ema_after_keys: bool = False  # single-GPU variant: EMA after keys, so keys lag one step


def moco_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE with the positive in column 0: CE([q·k, q·Qᵀ]/τ, 0), batch mean. Inputs unit-norm.

    The logits are float32 even under bf16 autocast: rounded to bf16, q·Q would move a logit by up to
    2⁻⁸/τ (0.02 at τ 0.2, 8x the fp16 error of the AMP runs); the B × K float32 product is cheap beside the encoder.
    """
    with torch.autocast(q.device.type, enabled=False):
        q, k, queue = q.float(), k.float(), queue.float()
        positive = (q * k).sum(dim=1, keepdim=True)
        negatives = q @ queue.T
        logits = torch.cat([positive, negatives], dim=1) / temperature
        targets = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        return F.cross_entropy(logits, targets)


@register_method(MoCoConfig)
class MoCo(Method):
    cfg: MoCoConfig

    def __init__(self, cfg: MoCoConfig, backbone: BackboneFactory, run: RunInfo):
        super().__init__(cfg, run)
        check_choice("method.augmentation", cfg.augmentation, ("aug+", "moco_v1"))
        self.views = ViewLayout.of(cfg.augmentation, cfg.augmentation)
        net, width = backbone()
        head: nn.Module = mlp([width, width, cfg.dim], batch_norm=False) if cfg.mlp else nn.Linear(width, cfg.dim)
        self.net = OnlineTarget(net, head)  # query encoder f_q, key encoder f_k = EMA(f_q); no predictor
        self.queue = MemoryBank(cfg.queue_size, cfg.dim, init_scale=cfg.queue_init_scale, store_ids=True)

    @property
    def backbone(self) -> nn.Module:
        return self.net.backbone

    def training_step(self, batch: Batch) -> StepOutput:
        x_q, x_k = batch.views
        q = self.net.query(x_q)
        k = self.net.target(x_k, self.cfg.shuffle_bn)
        if self.cfg.ema_after_keys:
            self.net.update_target(self.cfg.momentum)
        queue = self.queue.snapshot()
        loss = moco_loss(q, k, queue, self.cfg.temperature)
        self.queue.enqueue(k, batch.indices)
        with torch.no_grad():
            positive_sim = (q * k).sum(1).mean()
        return StepOutput(loss, {"positive_sim": positive_sim})

    def on_after_step(self, progress: Progress) -> None:
        if not self.cfg.ema_after_keys:
            self.net.update_target(self.cfg.momentum)
