"""MSF: Mean Shift for self-supervised learning (Koohpayegani et al., ICCV 2021), ``train_msf.py``.

BYOL-asym's networks (online f_q, g_q and predictor h; target f_t, g_t an EMA of f_q, g_q) plus a memory
bank M of past target embeddings. Per step:

1. t = sg(n(g_t(f_t(x_t)))) is enqueued into M *before* any distance is computed;
2. NN_b = the k rows of M with the smallest d_t = 2 − 2 t_b·M: chosen by the target, not the query, so
   t_b itself (d_t = 0) is always among them;
3. L = mean_b (1/k) Σ_{j∈NN_b} d_q[b, j] with d_q = 2 − 2 q_b·M_j and q = n(h(g_q(f_q(x_q)))).

The query is pulled towards the mean of its target's neighbourhood. With k = 1 the only neighbour is t_b
and the loss is BYOL-asym's exactly: :func:`msf_loss` is :func:`byol_loss` on (query, neighbour) pairs.
Monitor: ``purity``, the mean fraction of NN_b sharing the query's label (≥ 1/k through the self-match).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from selfsup.config import Config, ConfigError, MethodConfig, register_method_config
from selfsup.methods.base import DataInfo, StepOutput, augmentation_views, register_method
from selfsup.methods.byol import OnlineTarget, byol_loss
from selfsup.nn.memory import MemoryBank


@register_method_config
@dataclass
class MSFConfig(MethodConfig):
    name: str = "msf"
    topk: int = 10  # neighbours per target (README 10; the abstract, argparse and run_msf.sh use 5)
    bank_size: int = 128000  # --mem_bank_size
    momentum: float = 0.99  # target EMA, constant
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


@register_method("msf")
class MSF(OnlineTarget):
    cfg: MSFConfig

    def __init__(self, cfg: MSFConfig, full: Config, data: DataInfo):
        super().__init__(cfg, full, data)
        if not 1 <= cfg.topk <= cfg.bank_size:
            raise ConfigError(f"method.topk={cfg.topk} must be between 1 and method.bank_size={cfg.bank_size}")
        self.views = augmentation_views(cfg.augmentation)
        self.bank = MemoryBank(cfg.bank_size, self.embedding_dim, store_labels=True)

    def training_step(self, views, indices, labels) -> StepOutput:
        x_q, x_t = views
        q = self.query(x_q)
        t = self.target(x_t, self.cfg.shuffle_bn)
        self.bank.enqueue(t, labels)  # t joins the bank before the distances
        neighbours = nearest_to_targets(self.bank, t, self.cfg.topk)
        loss = msf_loss(q, self.bank.bank[neighbours].to(q.dtype))
        return StepOutput(loss, {"purity": self.bank.purity(neighbours, labels)})
