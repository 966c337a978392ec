"""The memory bank: a ring buffer of embeddings (and optional labels) shared by MoCo, ISD and MSF.

Keys from every rank are gathered before they are written, so all ranks hold the same bank; the
buffers (``bank``, ``ptr``, ``labels``) are module buffers and travel with the checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.nn import distributed

BANK_INITS = ("normal", "normal_columns", "zeros")


class MemoryBank(nn.Module):
    """A FIFO of ``size`` rows of width ``dim``: write B rows at ``ptr``, then ``ptr = (ptr + B) % size``.

    ``init``: ``normal`` — randn rows scaled to unit norm (MoCo); ``normal_columns`` — randn normalised
    along dim 0 as ISD's original code does (rows of norm ≈ √(dim/size)); ``zeros``. ``init_scale``
    multiplies the initial rows (the single-GPU MoCo-v2 variant divides by 10).
    """

    bank: torch.Tensor
    ptr: torch.Tensor
    labels: torch.Tensor

    def __init__(self, size: int, dim: int, *, init: str = "normal", init_scale: float = 1.0,
                 store_labels: bool = False):
        super().__init__()
        if size <= 0 or dim <= 0:
            raise ValueError(f"memory bank needs positive size and dim, got size={size}, dim={dim}")
        if init not in BANK_INITS:
            raise ValueError(f"unknown memory-bank init {init!r}; choose one of {BANK_INITS}")
        if init == "zeros":
            rows = torch.zeros(size, dim)
        else:
            rows = torch.randn(size, dim)
            rows = F.normalize(rows, dim=0 if init == "normal_columns" else 1)
        self.register_buffer("bank", rows * init_scale)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.store_labels = store_labels
        self.register_buffer("labels", torch.full((size if store_labels else 0,), -1, dtype=torch.long))

    @property
    def size(self) -> int:
        return self.bank.shape[0]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Write the keys gathered from all ranks (in rank order) at the pointer, wrapping around."""
        keys = distributed.gather(keys.detach()).to(self.bank.dtype)
        n = keys.shape[0]
        if n > self.size:
            raise ValueError(f"cannot enqueue {n} keys into a memory bank of {self.size} rows; "
                             "raise the bank size above the global batch size")
        rows = (self.ptr + torch.arange(n, device=self.bank.device)) % self.size
        self.bank[rows] = keys
        if self.store_labels and labels is not None:
            self.labels[rows] = distributed.gather(labels.to(self.labels.device))
        self.ptr.copy_((self.ptr + n) % self.size)

    def snapshot(self) -> torch.Tensor:
        """A copy of the bank that later writes cannot change (for losses computed before an enqueue)."""
        return self.bank.detach().clone()

    @torch.no_grad()
    def purity(self, indices: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean fraction of the rows ``indices`` (B × k) whose stored label equals ``labels`` (B): a monitor
        of neighbour quality (ISD, MSF). Rows never written hold label −1 and never match."""
        if not self.store_labels:
            raise ValueError("purity needs a memory bank built with store_labels=True")
        return (self.labels[indices] == labels.to(self.labels.device).unsqueeze(1)).float().mean()

    @torch.no_grad()
    def topk(self, query: torch.Tensor, k: int, *, chunk_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """Similarities and indices of the ``k`` rows with largest dot product for each query row.

        Works in chunks of queries and keeps everything on the bank's device.
        """
        values, indices = [], []
        bank = self.bank.to(query.dtype)
        for start in range(0, query.shape[0], chunk_size):
            sims = query[start:start + chunk_size] @ bank.T
            v, i = sims.topk(k, dim=1)
            values.append(v)
            indices.append(i)
        return torch.cat(values), torch.cat(indices)
