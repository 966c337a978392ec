"""MSF: Mean Shift for self-supervised learning (Koohpayegani et al., ICCV 2021), ``train_msf.py``.

BYOL-asym's networks (online f_q, g_q and predictor h; target f_t, g_t an EMA of f_q, g_q) plus a memory
bank M of past target embeddings. Per step:

1. t = sg(n(g_t(f_t(x_t)))) is enqueued into M *before* any distance is computed;
2. NN_b = the k rows of M with the smallest d_t = 2 − 2 t_b·M: chosen by the target, not the query, so
   t_b itself (d_t = 0) is always among them;
3. L = mean_b (1/k) Σ_{j∈NN_b} d_q[b, j] with d_q = 2 − 2 q_b·M_j and q = n(h(g_q(f_q(x_q)))).

The query is pulled towards the mean of its target's neighbourhood. With k = 1 the only neighbour is t_b
and the loss is BYOL-asym's exactly: :func:`msf_loss` is :func:`byol_loss` on (query, neighbour) pairs.
Monitor: NN_b (``StepOutput.neighbours``); the engine logs their label purity (≥ 1/k through the self-match).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from selfsup.config import MethodConfig, checked
from selfsup.errors import ConfigError
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
from selfsup.methods.byol import byol_loss
from selfsup.models.heads import byol_heads
from selfsup.nn.memory import MemoryBank
from selfsup.nn.online_target import OnlineTarget


@dataclass
class MSFConfig(MethodConfig):
    name: str = "msf"
    topk: int = checked(10, ge=1)  # neighbours per target (README 10; the abstract, argparse and run_msf.sh use 5)
    bank_size: int = checked(128000, ge=1, holds_batch=True)  # --mem_bank_size
    momentum: float = checked(0.99, ge=0, le=1)  # target EMA, constant
    augmentation: str = "weak/strong"  # target/query views (the README's --weak_strong)
    shuffle_bn: bool = True


def msf_loss(q: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    """mean_b (1/k) Σ_j (2 − 2 q_b·M_j) for queries q (B × D) and their targets' neighbours (B × k × D);
    BYOL's loss on the B·k (query, neighbour) pairs, so k = 1 with M_b = t_b is BYOL-asym."""
    b, k, d = neighbours.shape
    return byol_loss(q.repeat_interleave(k, dim=0), neighbours.reshape(b * k, d))


@torch.no_grad()
def nearest_to_targets(bank: MemoryBank, t: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (B × k) of the bank rows with the k smallest d_t = 2 − 2 t·M, i.e. the largest t·M.

    A B × K similarity matrix on the bank's device, in float32 even under autocast (no copy of the bank).
    """
    with torch.autocast(t.device.type, enabled=False):
        return bank.topk(t.float(), k)[1]


@register_method(MSFConfig)
class MSF(Method):
    cfg: MSFConfig

    def __init__(self, cfg: MSFConfig, backbone: BackboneFactory, run: RunInfo):
        super().__init__(cfg, run)
        if not 1 <= cfg.topk <= cfg.bank_size:
            raise ConfigError(f"method.topk={cfg.topk} must be between 1 and method.bank_size={cfg.bank_size}")
        self.views = augmentation_views(cfg.augmentation)
        net, width = backbone()
        projector, predictor, dim = byol_heads(width)
        self.net = OnlineTarget(net, projector, predictor)
        self.bank = MemoryBank(cfg.bank_size, dim, store_ids=True)

    @property
    def backbone(self) -> nn.Module:
        return self.net.backbone

    def training_step(self, batch: Batch) -> StepOutput:
        x_q, x_t = batch.views
        q = self.net.query(x_q)
        t = self.net.target(x_t, self.cfg.shuffle_bn)
        self.bank.enqueue(t, batch.indices)  # t joins the bank before the distances
        neighbours = nearest_to_targets(self.bank, t, self.cfg.topk)
        loss = msf_loss(q, self.bank.bank[neighbours].to(q.dtype))
        return StepOutput(loss, neighbours=self.bank.ids[neighbours])

    def on_after_step(self, progress: Progress) -> None:
        self.net.update_target(self.cfg.momentum)
