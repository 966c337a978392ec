"""MoCo-v2 (He et al. 2019; Chen et al. 2020): InfoNCE against a queue of momentum-encoder keys.

q = n(f_q(x_q)), k = sg(n(f_k(x_k))); logits = [q·k, q·Q₁ … q·Q_K] / τ; L = CE(logits, 0).
Step order as the official code: EMA of the key encoder (done after the previous optimiser step,
which is the same weights), keys with ShuffleBN, logits against the queue as it was, then enqueue
the keys gathered from all ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.config import Config, MethodConfig, check_choice, register_method_config
from selfsup.methods.base import DataInfo, Encoder, Method, StepOutput, new_backbone, register_method
from selfsup.models.heads import mlp
from selfsup.nn import distributed
from selfsup.nn.ema import ema_update, make_teacher
from selfsup.nn.memory import MemoryBank


@register_method_config
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


@register_method("moco")
class MoCo(Method):
    cfg: MoCoConfig

    def __init__(self, cfg: MoCoConfig, full: Config, data: DataInfo):
        super().__init__(cfg, full, data)
        check_choice("method.augmentation", cfg.augmentation, ("aug+", "moco_v1"))
        self.views = (cfg.augmentation, cfg.augmentation)
        backbone, width = new_backbone(full)
        head: nn.Module = mlp([width, width, cfg.dim], batch_norm=False) if cfg.mlp else nn.Linear(width, cfg.dim)
        self.encoder_q = Encoder(backbone, head)
        self.encoder_k = make_teacher(self.encoder_q)
        self.queue = MemoryBank(cfg.queue_size, cfg.dim, init_scale=cfg.queue_init_scale, store_labels=True)

    @property
    def backbone(self) -> nn.Module:
        return self.encoder_q.backbone

    def training_step(self, views, indices, labels) -> StepOutput:
        x_q, x_k = views
        q = F.normalize(self.encoder_q(x_q), dim=1)
        with torch.no_grad():
            if self.cfg.shuffle_bn:
                shuffled, inverse = distributed.batch_shuffle(x_k)
                k = distributed.batch_unshuffle(F.normalize(self.encoder_k(shuffled), dim=1), inverse)
            else:
                k = F.normalize(self.encoder_k(x_k), dim=1)
            if self.cfg.ema_after_keys:
                ema_update(self.encoder_k, self.encoder_q, self.cfg.momentum)
        queue = self.queue.snapshot()
        loss = moco_loss(q, k, queue, self.cfg.temperature)
        self.queue.enqueue(k, labels)
        with torch.no_grad():
            positive_sim = (q * k).sum(1).mean()
        return StepOutput(loss, {"positive_sim": positive_sim})

    def on_after_step(self, progress: float) -> None:
        if not self.cfg.ema_after_keys:
            ema_update(self.encoder_k, self.encoder_q, self.cfg.momentum)
