"""k-nearest-neighbour classification on L2-normalised features.

Two voting rules over the k nearest training points (cosine similarity; on unit vectors its ranking is
that of L2 distance, so this is also the exact ``IndexFlatL2`` search of the UMBC protocol):

* weighted (DINO / InstDisc): class score Σ exp(sim/T) over the neighbours of that class, exact argmax;
* unweighted (UMBC NN / 20-NN): majority vote, ties broken uniformly at random.

Queries are processed in chunks, so memory is O(chunk_size × N_train). faiss (optional) can do the
exact top-k search for large CPU inputs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from types import ModuleType

import torch

FAISS_MIN_TRAIN = 200_000  # backend="auto" uses faiss (if importable) from this many CPU training rows
BACKENDS = ("auto", "torch", "faiss")


def _import_faiss() -> ModuleType | None:
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _check_inputs(train_features: torch.Tensor, train_labels: torch.Tensor,
                  query_features: torch.Tensor) -> None:
    if train_features.ndim != 2 or query_features.ndim != 2:
        raise ValueError("features must be 2-d (N, D)")
    if train_features.shape[1] != query_features.shape[1]:
        raise ValueError(f"feature dims differ: train {train_features.shape[1]}, "
                         f"query {query_features.shape[1]}")
    if train_labels.shape != (train_features.shape[0],):
        raise ValueError(f"train_labels must have shape ({train_features.shape[0]},), "
                         f"got {tuple(train_labels.shape)}")
    if train_features.shape[0] == 0:
        raise ValueError("no training features")


def _resolve_backend(backend: str, train_features: torch.Tensor) -> ModuleType | None:
    """The faiss module when it should do the search, else None (torch)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")
    if backend == "torch":
        return None
    faiss = _import_faiss()
    if backend == "faiss":
        if faiss is None:
            raise ImportError("backend='faiss' needs the faiss package (pip install faiss-cpu)")
        return faiss
    large_cpu = train_features.device.type == "cpu" and train_features.shape[0] > FAISS_MIN_TRAIN
    return faiss if large_cpu else None


def _search_chunks(train_features: torch.Tensor, query_features: torch.Tensor, k: int, chunk_size: int,
                   backend: str) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield ``(start, sims, idx)`` per query chunk: the top-k cosine similarities (float32, descending)
    and training indices, each (chunk, k), on the training features' device."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    faiss = _resolve_backend(backend, train_features)
    device = train_features.device
    if faiss is not None:
        index = faiss.IndexFlatIP(train_features.shape[1])
        index.add(train_features.detach().float().cpu().contiguous().numpy())
    elif device.type == "cpu" and train_features.dtype not in (torch.float32, torch.float64):
        train_features = train_features.float()  # half-precision matmul is slow on CPU
    for start in range(0, query_features.shape[0], chunk_size):
        query = query_features[start:start + chunk_size]
        if faiss is not None:
            sims, idx = index.search(query.detach().float().cpu().contiguous().numpy(), k)
            yield start, torch.from_numpy(sims).to(device), torch.from_numpy(idx).long().to(device)
        else:
            with torch.autocast(device.type, enabled=False):  # the features' precision even under autocast (bf16 ties)
                sims = query.to(device, train_features.dtype) @ train_features.T
            top, idx = sims.topk(k, dim=1)  # sorted, largest first
            yield start, top.float(), idx


def _tie_draws(num_queries: int, generator: torch.Generator | None) -> torch.Tensor:
    """One random integer per query (drawn up front, so results do not depend on chunking)."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randint(0, 2**62, (num_queries,), generator=generator, device=gen_device)


def _vote(sims: torch.Tensor, neighbour_labels: torch.Tensor, num_classes: int,
          temperature: float | None, draws: torch.Tensor | None) -> torch.Tensor:
    """Predicted class per row from the (q, k) neighbour similarities and labels."""
    scores = sims.new_zeros(sims.shape[0], num_classes)
    if temperature is not None:
        # exp((s - s_max)/T): same argmax as exp(s/T), without float32 overflow for small T
        weights = ((sims - sims[:, :1]) / temperature).exp()
        return scores.scatter_add_(1, neighbour_labels, weights).argmax(dim=1)
    counts = scores.scatter_add_(1, neighbour_labels, torch.ones_like(sims))
    tied = counts == counts.max(dim=1, keepdim=True).values
    # pick the (draw mod #tied)-th tied class: uniform among the tied classes
    choice = draws.to(tied.device) % tied.sum(dim=1)
    position = tied.long().cumsum(dim=1) - 1
    return (tied & (position == choice[:, None])).long().argmax(dim=1)


def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, query_features: torch.Tensor,
                 *, k: int, num_classes: int, temperature: float | None = 0.07, chunk_size: int = 1024,
                 generator: torch.Generator | None = None, backend: str = "auto") -> torch.Tensor:
    """Predict a label (int64, shape (Q,)) for each query row from its k nearest training rows.

    Features are assumed L2-normalised (similarity = dot product). ``temperature`` set: weighted vote
    Σ exp(sim/T) per class; ``None``: unweighted majority vote, exact ties broken uniformly at random
    (reproducible through ``generator``). ``k`` is capped at N_train. ``backend``: "torch", "faiss"
    (``IndexFlatIP``) or "auto" (faiss if importable and N_train > ``FAISS_MIN_TRAIN`` on CPU).
    Runs on the training features' device; predictions are returned there.
    """
    _check_inputs(train_features, train_labels, query_features)
    if k < 1:
        raise ValueError("k must be >= 1")
    if temperature is not None and temperature <= 0:
        raise ValueError("temperature must be > 0 (or None for an unweighted vote)")
    k = min(k, train_features.shape[0])
    labels = train_labels.to(train_features.device, torch.int64)
    draws = _tie_draws(query_features.shape[0], generator) if temperature is None else None
    preds = torch.empty(query_features.shape[0], dtype=torch.int64, device=train_features.device)
    for start, sims, idx in _search_chunks(train_features, query_features, k, chunk_size, backend):
        chunk_draws = None if draws is None else draws[start:start + sims.shape[0]]
        preds[start:start + sims.shape[0]] = _vote(sims, labels[idx], num_classes, temperature, chunk_draws)
    return preds


def knn_sweep(train_features: torch.Tensor, train_labels: torch.Tensor, query_features: torch.Tensor,
              query_labels: torch.Tensor, *, ks: Sequence[int] = (1, 20),
              temperatures: Sequence[float | None] = (0.07, None), num_classes: int | None = None,
              chunk_size: int = 1024, seed: int = 0, backend: str = "auto") -> dict[str, float]:
    """Accuracies (percent) for every (k, temperature) pair, from one top-max(k) search per chunk.

    Keys (nothing else is returned):

    * ``"nn"`` — 1-NN accuracy, when 1 is in ``ks`` (every voting rule agrees for k=1);
    * ``f"knn{k}_T{T:g}"`` — weighted vote with temperature T, e.g. ``"knn20_T0.07"``, for k > 1;
    * ``f"knn{k}_vote"`` — unweighted majority vote (T=None) with random tie-break, for k > 1.

    Each value equals ``knn_classify`` with the same k and T (and, for votes,
    ``generator=torch.Generator().manual_seed(seed)``). ``num_classes`` defaults to max label + 1.
    """
    _check_inputs(train_features, train_labels, query_features)
    if query_labels.shape != (query_features.shape[0],):
        raise ValueError("query_labels must have shape (Q,)")
    if query_features.shape[0] == 0:
        raise ValueError("no query features")
    if not ks or min(ks) < 1:
        raise ValueError("ks must be a non-empty sequence of integers >= 1")
    if any(t is not None and t <= 0 for t in temperatures):
        raise ValueError("temperatures must be > 0 (or None for an unweighted vote)")
    if num_classes is None:
        num_classes = max(int(train_labels.max()), int(query_labels.max())) + 1
    device = train_features.device
    labels = train_labels.to(device, torch.int64)
    targets = query_labels.to(device, torch.int64)
    n_train = train_features.shape[0]
    # key -> (k, temperature); dict.fromkeys keeps the first occurrence and drops duplicates
    plans: dict[str, tuple[int, float | None]] = {}
    for k in dict.fromkeys(ks):
        if k == 1:
            plans["nn"] = (1, None)
        for t in dict.fromkeys(temperatures) if k > 1 else ():
            plans[f"knn{k}_vote" if t is None else f"knn{k}_T{t:g}"] = (k, t)
    draws = _tie_draws(query_features.shape[0], torch.Generator().manual_seed(seed))
    correct = dict.fromkeys(plans, 0)
    k_max = min(max(ks), n_train)
    for start, sims, idx in _search_chunks(train_features, query_features, k_max, chunk_size, backend):
        end = start + sims.shape[0]
        neighbour_labels = labels[idx]
        for key, (k, t) in plans.items():
            k = min(k, n_train)
            if k == 1:
                pred = neighbour_labels[:, 0]
            else:
                pred = _vote(sims[:, :k], neighbour_labels[:, :k], num_classes, t, draws[start:end])
            correct[key] += int((pred == targets[start:end]).sum())
    return {key: 100.0 * hits / query_features.shape[0] for key, hits in correct.items()}
