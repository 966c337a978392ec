"""The memory bank: a ring buffer of embeddings shared by MoCo, ISD, MSF and Mugs (queues and memories).

Rows from every rank are gathered before they are written, so all ranks hold the same bank; the
buffers (``bank``, ``ptr``, ``ids``) are module buffers and travel with the checkpoint. ``ids`` keeps the
dataset index of every row (−1 for rows never written): the engine reads neighbour indices through it
to score neighbour purity against the labels, which the methods never see.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.nn import distributed

BANK_INITS = ("normal", "normal_columns", "randn", "zeros")


class MemoryBank(nn.Module):
    """A FIFO of ``size`` rows of width ``dim``: write B rows at ``ptr``, then ``ptr = (ptr + B) % size``.

    ``init``: ``normal`` — randn rows scaled to unit norm (MoCo); ``normal_columns`` — randn normalised
    along dim 0 as ISD's original code does (rows of norm ≈ √(dim/size)); ``randn`` — plain randn (Mugs'
    local-group memory); ``zeros``. ``init_scale`` multiplies the initial rows (the single-GPU MoCo-v2 variant
    divides by 10). ``legacy_ptr_bug`` reproduces Mugs' official pointer, which advances by twice the rows
    written when a write does not wrap (so half of the slots may never be written).
    """

    bank: torch.Tensor
    ptr: torch.Tensor
    ids: torch.Tensor

    def __init__(self, size: int, dim: int, *, init: str = "normal", init_scale: float = 1.0,
                 store_ids: bool = False, legacy_ptr_bug: bool = False):
        super().__init__()
        if size <= 0 or dim <= 0:
            raise ValueError(f"memory bank needs positive size and dim, got size={size}, dim={dim}")
        if init not in BANK_INITS:
            raise ValueError(f"unknown memory-bank init {init!r}; choose one of {BANK_INITS}")
        if init == "zeros":
            rows = torch.zeros(size, dim)
        else:
            rows = torch.randn(size, dim)
            if init != "randn":
                rows = F.normalize(rows, dim=0 if init == "normal_columns" else 1)
        self.register_buffer("bank", rows * init_scale)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.store_ids = store_ids
        self.legacy_ptr_bug = legacy_ptr_bug
        self.register_buffer("ids", torch.full((size if store_ids else 0,), -1, dtype=torch.long))

    @property
    def size(self) -> int:
        return self.bank.shape[0]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, ids: torch.Tensor | None = None, keep: torch.Tensor | None = None) -> int:
        """Write the rows gathered from all ranks (in rank order) at the pointer, wrapping around; only those
        with ``keep`` true when a (B,) mask is given. ``ids``: the rows' dataset indices. Returns the rows written."""
        keys = distributed.gather(keys.detach()).to(self.bank.dtype)
        if self.store_ids and ids is not None:
            ids = distributed.gather(ids.to(self.ids.device))
        if keep is not None:
            kept = distributed.gather(keep.to(keys.device, torch.uint8)).bool()
            keys = keys[kept]
            ids = ids[kept.to(ids.device)] if self.store_ids and ids is not None else ids
        n = keys.shape[0]
        if n > self.size:
            raise ValueError(f"cannot enqueue {n} rows into a memory bank of {self.size}; "
                             "raise the bank size above the global batch size")
        if n == 0:
            return 0
        rows = (self.ptr + torch.arange(n, device=self.bank.device)) % self.size
        self.bank[rows] = keys
        if self.store_ids and ids is not None:
            self.ids[rows] = ids
        step = n
        if self.legacy_ptr_bug and int(self.ptr) + n <= self.size:  # the official write that does not wrap
            step = 2 * n
        self.ptr.copy_((self.ptr + step) % self.size)
        return n

    def snapshot(self) -> torch.Tensor:
        """A copy of the bank that later writes cannot change (for losses computed before an enqueue)."""
        return self.bank.detach().clone()

    @torch.no_grad()
    def topk(self, query: torch.Tensor, k: int, *, cosine: bool = False,
             chunk_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """Similarities and indices of the ``k`` rows with the largest dot product (``cosine``: cosine) for each
        query row, in chunks of queries, on the bank's device."""
        bank = F.normalize(self.bank, dim=-1) if cosine else self.bank
        bank = bank.to(query.dtype)
        if cosine:
            query = F.normalize(query, dim=-1)
        values, indices = [], []
        for start in range(0, query.shape[0], chunk_size):
            v, i = (query[start:start + chunk_size] @ bank.T).topk(k, dim=1)
            values.append(v)
            indices.append(i)
        return torch.cat(values), torch.cat(indices)
