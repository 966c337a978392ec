"""Building blocks of Mugs (methods.md §6): the local-group memory buffer and the three kinds of heads.

- :class:`LocalGroupMemory` — a ring buffer of mean patch tokens; :meth:`~LocalGroupMemory.neighbours`
  returns the top-n rows by cosine, without gradient. ``legacy_ptr_bug`` reproduces the official pointer,
  which advances twice the batch when a write does not wrap (so half of the slots may never be written).
- :class:`ContrastiveHead` — projector MLP (bias-free, GELU) and, on the student, a predictor.
- :class:`GroupHead` — DINO's prototype head: MLP with biases → L2-normalise → weight-normed Linear.

Projectors take BatchNorm after their hidden layers with the official ``use_bn_in_head`` (predictors never).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.nn import distributed
from selfsup.nn.memory import MemoryBank


class LocalGroupMemory(MemoryBank):
    """K rows of width D, initialised randn (not normalised, as the official buffer).

    Writes gather the rows (and the optional keep-mask) from every rank first, so all ranks hold the
    same memory. The correct pointer moves by the number of rows written; with ``legacy_ptr_bug`` a write
    that does not wrap moves it by twice that number, as ``Block_mem._dequeue_and_enqueue`` does.
    """

    def __init__(self, size: int, dim: int, top_n: int, *, legacy_ptr_bug: bool = False):
        super().__init__(size, dim, init="zeros")
        if not 0 < top_n <= size:
            raise ValueError(f"local-group top-n must be in [1, memory size {size}], got {top_n}")
        self.bank.copy_(torch.randn(size, dim))
        self.top_n = top_n
        self.legacy_ptr_bug = legacy_ptr_bug

    @torch.no_grad()
    def neighbours(self, query: torch.Tensor) -> torch.Tensor:
        """(B, n, D): the ``top_n`` rows with the largest cosine to each query row (rows as stored); the cosines in
        float32 even under autocast (bf16 would tie rows whose cosines differ by less than 2⁻⁸)."""
        with torch.autocast(query.device.type, enabled=False):
            cosine = F.normalize(query.float(), dim=-1) @ F.normalize(self.bank.float(), dim=-1).T
        index = cosine.topk(self.top_n, dim=-1).indices
        return self.bank[index]

    @torch.no_grad()
    def write(self, rows: torch.Tensor, keep: torch.Tensor | None = None) -> int:
        """Write the rows of all ranks (those with ``keep`` true, when given) at the pointer; returns how many."""
        rows = distributed.gather(rows.detach().float())
        if keep is not None:
            rows = rows[distributed.gather(keep.to(rows.device, torch.uint8)).bool()]
        n = rows.shape[0]
        if n == 0:
            return 0
        if n > self.size:
            raise ValueError(f"cannot write {n} rows into a local-group memory of {self.size}; raise its size")
        ptr = int(self.ptr)
        self.bank[(ptr + torch.arange(n, device=self.bank.device)) % self.size] = rows.to(self.bank.dtype)
        wraps = ptr + n > self.size
        step = 2 * n if self.legacy_ptr_bug and not wraps else n
        self.ptr.fill_((ptr + step) % self.size)
        return n


def mlp_gelu(widths: list[int], *, bias: bool, trunc_normal: bool = True, batch_norm: bool = False) -> nn.Sequential:
    """Linear-(BN)-GELU-…-Linear between consecutive widths (BN with ``use_bn_in_head``); weights trunc-normal(0.02)
    and zero biases, or PyTorch's default Linear init when not ``trunc_normal``."""
    layers: list[nn.Module] = []
    for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        linear = nn.Linear(w_in, w_out, bias=bias)
        if trunc_normal:
            nn.init.trunc_normal_(linear.weight, std=0.02)
            if bias:
                nn.init.zeros_(linear.bias)
        layers.append(linear)
        if i < len(widths) - 2:
            if batch_norm:
                layers.append(nn.BatchNorm1d(w_out))
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


class ContrastiveHead(nn.Module):
    """Instance / local-group head. Teacher (no predictor): n(projector(x)). Student: n(predictor(n(projector(x))))
    (the inner n only with ``norm_before_pred``). Projector D→h→h→out and predictor out→h_p→out, bias-free."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, predictor_hidden_dim: int | None,
                 norm_before_pred: bool = True, batch_norm: bool = False):
        super().__init__()
        self.projector = mlp_gelu([in_dim, hidden_dim, hidden_dim, out_dim], bias=False, batch_norm=batch_norm)
        self.predictor: nn.Module | None = None
        if predictor_hidden_dim:
            # built after the official head's init pass: PyTorch's default Linear init
            self.predictor = mlp_gelu([out_dim, predictor_hidden_dim, out_dim], bias=False, trunc_normal=False)
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
        self.projector = mlp_gelu([in_dim, hidden_dim, hidden_dim, bottleneck_dim], bias=True, batch_norm=batch_norm)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, freeze_norm=norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.projector(x), dim=-1))
