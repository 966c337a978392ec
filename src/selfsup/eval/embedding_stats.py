"""Label-free collapse monitors of a feature matrix Z (N, D): they need no labels and flag a collapsing embedding.

* **RankMe** (Garrido et al. 2023, "RankMe: assessing the downstream performance of pretrained self-supervised
  representations by their rank"): the effective rank exp(−Σ_k p_k log p_k) of Z with p_k = σ_k / ‖σ‖₁ + ε over
  its min(N, D) singular values σ_k, ε = 1e-7 as the paper (float32 features), on 25,600 rows as the paper's
  evaluations. 1 for a rank-1 matrix, D for an isotropic one.
* **Per-dimension std of the L2-normalised features** (the SimSiam collapse check): the standard deviation of each
  coordinate of z/‖z‖ over the rows, averaged over the D dimensions. A collapsed embedding gives 0; features spread
  evenly over the sphere give ≈ 1/√D, so ``feature_std_x_sqrt_d`` (the mean times √D) is ≈ 1 for them.

Both read Z in row chunks and accumulate D x D / D-sized statistics in float64: never an N x N matrix, so a
1.28M x 2048 feature matrix on a GPU costs one 2048 x 2048 Gram matrix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

RANKME_EPS = 1e-7  # the paper's ε for float32 features
RANKME_SAMPLES = 25_600  # rows the paper computes RankMe on


def singular_values(features: torch.Tensor, chunk_size: int = 65536) -> torch.Tensor:
    """The min(N, D) singular values of ``features`` (N, D), descending, float64: square roots of the eigenvalues
    of the D x D Gram matrix ZᵀZ, accumulated over row chunks (no N x N matrix, no copy of Z)."""
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"singular values need a non-empty (N, D) matrix, got shape {tuple(features.shape)}")
    n, d = features.shape
    gram = torch.zeros(d, d, dtype=torch.float64, device=features.device)
    for start in range(0, n, chunk_size):
        part = features[start:start + chunk_size].double()
        gram += part.T @ part
    eigenvalues = torch.linalg.eigvalsh(gram).flip(0)[:min(n, d)]
    return eigenvalues.clamp_min(0).sqrt()


def rankme(features: torch.Tensor, eps: float = RANKME_EPS) -> float:
    """RankMe effective rank of ``features`` (N, D): exp of the entropy of the normalised singular values
    (each plus ``eps``). 0 when every row is zero."""
    sigma = singular_values(features)
    total = sigma.sum()
    if total <= 0:
        return 0.0
    p = sigma / total + eps
    return math.exp(float(-(p * p.log()).sum()))


def normalised_feature_std(features: torch.Tensor, chunk_size: int = 65536) -> torch.Tensor:
    """(D,) standard deviation (unbiased, as ``torch.std``) of every coordinate of the L2-normalised rows."""
    n, d = features.shape
    if n < 2:
        raise ValueError(f"a standard deviation needs at least 2 rows, got {n}")
    total = torch.zeros(d, dtype=torch.float64, device=features.device)
    squares = torch.zeros(d, dtype=torch.float64, device=features.device)
    for start in range(0, n, chunk_size):
        part = F.normalize(features[start:start + chunk_size].double(), dim=1)
        total += part.sum(0)
        squares += (part * part).sum(0)
    mean = total / n
    return ((squares - n * mean * mean).clamp_min(0) / (n - 1)).sqrt()


def collapse_scores(features: torch.Tensor, *, max_samples: int | None = RANKME_SAMPLES,
                    seed: int = 0) -> dict[str, float]:
    """``{"rankme", "feature_std", "feature_std_x_sqrt_d"}`` of ``features`` (N, D) — RankMe on a seeded random
    subset of ``max_samples`` rows when there are more (None: all rows), the std on all rows."""
    if features.ndim != 2:
        raise ValueError(f"collapse scores need an (N, D) feature matrix, got shape {tuple(features.shape)}")
    rows = features
    if max_samples is not None and features.shape[0] > max_samples:
        pick = torch.randperm(features.shape[0], generator=torch.Generator().manual_seed(seed))[:max_samples]
        rows = features[pick.to(features.device)]
    std = normalised_feature_std(features)
    mean_std = float(std.mean())
    return {"rankme": rankme(rows), "feature_std": mean_std,
            "feature_std_x_sqrt_d": mean_std * math.sqrt(features.shape[1])}
