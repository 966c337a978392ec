"""Label-free search in a feature space (cosine similarity): nearest-neighbour retrieval and near-duplicate pairs.

* :func:`nearest_neighbours`: for each query, its top-k rows of a memory set, with their similarities (the exact
  search of :mod:`selfsup.eval.knn`, chunked over queries, faiss where it applies).
* :func:`near_duplicates`: the pairs (i < j) of one feature set with cosine ≥ a threshold — the exact count and the
  ``max_pairs`` most similar — over square tiles of the similarity matrix, so memory is O(tile²), never N x N.

Features are L2-normalised here (the caller may pass raw ones); nothing needs labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from selfsup.eval.knn import _search_chunks

DUPLICATE_TILE = 4096  # rows x columns of one similarity tile in near_duplicates (64 MiB of float32)


@torch.no_grad()
def nearest_neighbours(queries: torch.Tensor, memory: torch.Tensor, k: int, *, exclude_self: bool = False,
                       chunk_size: int = 1024, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(similarities, indices), each (Q, k), descending: the ``k`` memory rows nearest (cosine) to each query row.

    ``exclude_self``: the queries are the memory set itself (query i is memory row i), and a row is not its own
    neighbour. ``k`` is capped at the number of candidates. Runs on ``memory``'s device; results stay there.
    """
    if queries.ndim != 2 or memory.ndim != 2 or queries.shape[1] != memory.shape[1]:
        raise ValueError(f"queries and memory must be (Q, D) and (N, D) with the same D, got "
                         f"{tuple(queries.shape)} and {tuple(memory.shape)}")
    if exclude_self and queries.shape[0] != memory.shape[0]:
        raise ValueError("exclude_self needs the queries to be the memory set itself (same number of rows)")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if memory.shape[0] == 0 or queries.shape[0] == 0:
        raise ValueError("nearest_neighbours needs at least one query and one memory row")
    memory = F.normalize(memory.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    k = min(k, memory.shape[0] - exclude_self)
    if k < 1:
        raise ValueError("exclude_self with a single memory row leaves no neighbour")
    searched = k + 1 if exclude_self else k
    sims, indices = [], []
    for start, top, idx in _search_chunks(memory, queries, searched, chunk_size, backend):
        if exclude_self:
            own = torch.arange(start, start + top.shape[0], device=idx.device)[:, None]
            top = top.masked_fill(idx == own, float("-inf"))  # drop the row itself (or, if absent, the last)
            top, order = top.topk(k, dim=1)
            idx = idx.gather(1, order)
        sims.append(top)
        indices.append(idx)
    return torch.cat(sims), torch.cat(indices)


@dataclass
class NearDuplicates:
    pairs: torch.Tensor  # (P, 2) int64, i < j, the P ≤ max_pairs most similar pairs, most similar first
    similarities: torch.Tensor  # (P,) their cosine similarities
    count: int  # every pair (i < j) with cosine ≥ threshold, also those beyond max_pairs
    threshold: float


@torch.no_grad()
def near_duplicates(features: torch.Tensor, threshold: float, *, max_pairs: int = 100,
                    tile: int = DUPLICATE_TILE) -> NearDuplicates:
    """Pairs of rows of ``features`` (N, D) whose cosine similarity is at least ``threshold``: the exact number and
    the ``max_pairs`` most similar (ties: lower indices first). Upper-triangle tiles of ``tile`` x ``tile``
    similarities, on ``features``' device; O(N²·D) work, O(tile² + max_pairs) memory."""
    if features.ndim != 2:
        raise ValueError(f"near_duplicates needs an (N, D) feature matrix, got shape {tuple(features.shape)}")
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"the duplicate threshold is a cosine similarity in [-1, 1], got {threshold}")
    if max_pairs < 0 or tile < 1:
        raise ValueError(f"max_pairs must be >= 0 and tile >= 1, got {max_pairs} and {tile}")
    x = F.normalize(features.float(), dim=1)
    n, device = x.shape[0], x.device
    count = torch.zeros((), dtype=torch.int64, device=device)
    best_sims = torch.empty(0, device=device)
    best_pairs = torch.empty(0, 2, dtype=torch.int64, device=device)
    for row in range(0, n, tile):
        rows = x[row:row + tile]
        for col in range(row, n, tile):
            sims = rows @ x[col:col + tile].T
            i = torch.arange(row, row + sims.shape[0], device=device)[:, None]
            j = torch.arange(col, col + sims.shape[1], device=device)[None, :]
            hit = (sims >= threshold) & (j > i)
            count += hit.sum()
            if max_pairs == 0 or not bool(hit.any()):
                continue
            where = hit.nonzero()
            best_sims = torch.cat([best_sims, sims[where[:, 0], where[:, 1]]])
            best_pairs = torch.cat([best_pairs, where + torch.tensor([row, col], device=device)])
            order = _most_similar_first(best_sims, best_pairs)[:max_pairs]
            best_sims, best_pairs = best_sims[order], best_pairs[order]
    return NearDuplicates(best_pairs, best_sims, int(count), threshold)


def _most_similar_first(sims: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """The order of the pairs by descending similarity, ties by ascending (i, j): a result independent of tiling."""
    n = int(pairs.max()) + 1 if pairs.numel() else 1
    order = torch.argsort(pairs[:, 0] * n + pairs[:, 1], stable=True)
    return order[torch.argsort(sims[order], descending=True, stable=True)]


@torch.no_grad()
def duplicated_in(queries: torch.Tensor, memory: torch.Tensor, threshold: float, *,
                  chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask (Q,) of the queries with a memory row at cosine ≥ ``threshold``, that nearest memory row (Q,)): e.g.
    held-out images that (nearly) reappear in the training set."""
    sims, indices = nearest_neighbours(queries, memory, 1, chunk_size=chunk_size, backend="torch")
    return sims[:, 0] >= threshold, indices[:, 0]
