"""Sinkhorn-Knopp for SeLa's label assignment (Asano et al. 2020; the official ``sinkhornknopp.py``).

SeLa solves  min_Q ⟨Q, −log P⟩  over Q ∈ U(r, c) (rows: K clusters with mass 1/K, columns: N samples with
mass 1/N). The entropic relaxation gives Q = diag(r) P^λ diag(c); since P = softmax(logits),
P^λ ∝ softmax(λ·logits) up to per-sample factors that c absorbs, so P^λ is built as that softmax
(stable in float64 and float32 alike, where the seed raised probabilities to the power λ).

Layout: P is stored sample-major, ``(N, K)``, so chunks over N are contiguous row blocks. The solver
makes no N×K copy beyond P itself: the matrix-vector products read P in place and the softmax and the
final argmax work on chunks of rows. P may live on the GPU or, when it does not fit, in host memory
(:func:`storage_device`). With ``distributed=True`` each rank holds a shard of the samples and only the
K-vector of cluster marginals and the stopping error are summed over ranks.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from selfsup.nn import distributed as dist_utils

DTYPES = {"f64": torch.float64, "f32": torch.float32}
DEFAULT_CHUNK = 16384  # rows per chunk: 16384 x 3000 float64 = 393 MB of temporaries


@dataclass
class SinkhornResult:
    r: torch.Tensor  # (K,) cluster scaling
    c: torch.Tensor  # (N,) sample scaling (this rank's shard when distributed)
    iterations: int
    error: float  # Σ|c/c_new − 1| at the last check


def storage_device(num_bytes: int, device: torch.device | str, storage: str = "auto",
                   headroom: float = 0.9) -> torch.device:
    """Where a buffer of ``num_bytes`` lives: ``device`` when it is a GPU with room (``auto``) or forced
    (``device``); host memory otherwise (``host``, a CPU device, or too little free GPU memory)."""
    device = torch.device(device)
    if storage not in ("auto", "device", "host"):
        raise ValueError(f"storage must be auto, device or host, got {storage!r}")
    if storage == "host" or device.type != "cuda":
        return torch.device("cpu")
    if storage == "device":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # cached by torch, reusable
    return device if num_bytes <= headroom * free else torch.device("cpu")


@torch.no_grad()
def power_softmax(x: torch.Tensor, lamb: float, *, weight: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float64,
                  out_device: torch.device | str | None = None, compute_device: torch.device | str | None = None,
                  chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """P^λ up to per-sample factors: row i is softmax(λ·ℓ_i), shape (N, K), in ``dtype`` on ``out_device``.

    ``ℓ = x`` (logits), or ``ℓ = x Wᵀ + b`` when ``weight`` is given (x = shared penultimate features, one
    head's Linear applied in ``dtype`` chunk by chunk, as the seed did with its stored activations). The
    arithmetic runs on ``compute_device`` (default: ``x``'s), one chunk of rows at a time, so features and
    P may sit in host memory while the GPU computes.
    """
    n = x.shape[0]
    k = weight.shape[0] if weight is not None else x.shape[1]
    compute = torch.device(compute_device) if compute_device is not None else x.device
    out = torch.empty(n, k, dtype=dtype, device=out_device if out_device is not None else x.device)
    w = weight.to(compute, dtype) if weight is not None else None
    b = bias.to(compute, dtype) if bias is not None else None
    for start in range(0, n, chunk_size):
        z = x[start:start + chunk_size].to(compute, dtype, copy=w is None)  # never modify the caller's x
        if w is not None:
            with torch.autocast(compute.type, enabled=False):  # in ``dtype`` even under autocast (not bf16)
                z = z @ w.T if b is None else torch.addmm(b, z, w.T)
        z.mul_(lamb)
        z.sub_(z.amax(dim=1, keepdim=True)).exp_()  # in place: one chunk of temporaries
        z.div_(z.sum(dim=1, keepdim=True))
        out[start:start + z.shape[0]].copy_(z)
    return out


def _sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """All-reduce (sum) that also works for host tensors under NCCL (moved to the GPU and back)."""
    if dist_utils.world_size() == 1:
        return x
    if dist.get_backend() == "nccl" and x.device.type != "cuda":
        y = x.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(y)
        return y.to(x.device)
    dist.all_reduce(x)
    return x


@torch.no_grad()
def sinkhorn_knopp(p: torch.Tensor, *, tol: float = 0.1, check_every: int = 10, max_iters: int = 100_000,
                   distributed: bool = False) -> SinkhornResult:
    """Scale P^λ (``p``, (N, K), rows = samples) towards the equipartition polytope.

    Starting from r = 1/K and c = 1/N, iterate r ← (1/K)/(P c), c ← (1/N)/(Pᵀ r) (in the seed's K×N
    notation). Every ``check_every`` iterations, starting with the first, err = Σ|c/c_new − 1|; stop
    once err ≤ ``tol`` (0.1 ImageNet, 0.01 CIFAR). ``max_iters`` only guards against a run that never
    converges (the seed loops forever), with a warning. With ``distributed`` this rank holds a shard of
    the rows; N, the cluster marginals P c and err are summed over ranks.

    A cluster whose column of P^λ underflowed to zero for every sample can hold no mass: it is left empty
    (r_k = 0, with a warning) and the others share the equipartition, 1/K' each. The seed divides by zero
    there, and the resulting NaNs made every label that cluster. Non-finite scalings (float32 overflow on
    a nearly dead cluster) raise instead of giving such labels.
    """
    n_local, k = p.shape
    reduce = _sum_over_ranks if distributed else (lambda t: t)
    n = int(reduce(torch.tensor([float(n_local)], dtype=torch.float64, device=p.device)).item())
    alive = reduce(p.amax(dim=0)) > 0  # (K,): some sample gives the cluster non-zero mass
    k_alive = int(alive.sum().item())
    if k_alive < k:
        warnings.warn(f"Sinkhorn-Knopp: {k - k_alive} of {k} clusters have P^λ = 0 for every sample (underflow; "
                      f"use float64 or a smaller λ) and stay empty", RuntimeWarning, stacklevel=2)
    target = alive.to(p.dtype) / k_alive  # cluster masses: 1/K' for the live clusters, 0 for the dead
    tiny = torch.finfo(p.dtype).tiny
    r = target.clone()
    c = torch.full((n_local,), 1.0 / n, dtype=p.dtype, device=p.device)
    error, iteration = float("inf"), 0
    while error > tol:
        if iteration >= max_iters:
            warnings.warn(f"Sinkhorn-Knopp stopped after {max_iters} iterations with error {error:.3g} > {tol}",
                          RuntimeWarning, stacklevel=2)
            break
        with torch.autocast(p.device.type, enabled=False):  # CUDA autocast runs torch.mv of a float32 P in bf16
            r = target / reduce(torch.mv(p.T, c)).clamp_(min=tiny)  # cluster marginals (K,), summed over all samples
            c_new = (1.0 / n) / torch.mv(p, r)  # this rank's samples
        if iteration % check_every == 0:
            if not (torch.isfinite(r).all() and torch.isfinite(c_new).all()):
                raise FloatingPointError(f"Sinkhorn-Knopp scalings overflowed in {p.dtype} at iteration {iteration}: "
                                         "use float64 (method.dtype=f64) or a smaller λ")
            error = float(reduce(torch.nansum(torch.abs(c / c_new - 1)).reshape(1)).item())
        c = c_new
        iteration += 1
    return SinkhornResult(r, c, iteration, error)


@torch.no_grad()
def hard_labels(p: torch.Tensor, r: torch.Tensor, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """y_i = argmax_k r_k P_ik for every row (c_i scales a whole row and cannot change it), chunked."""
    labels = torch.empty(p.shape[0], dtype=torch.long, device=p.device)
    for start in range(0, p.shape[0], chunk_size):
        block = p[start:start + chunk_size]
        labels[start:start + block.shape[0]] = (block * r).argmax(dim=1)
    return labels


def transport_plan(p: torch.Tensor, result: SinkhornResult) -> torch.Tensor:
    """Q = diag(c) P diag(r), (N, K): columns sum to ≈1/K, rows to 1/N. Makes an N×K copy (small problems)."""
    return result.c[:, None] * p * result.r[None, :]


@torch.no_grad()
def sinkhorn_labels(logits: torch.Tensor, lamb: float = 25.0, *, dtype: torch.dtype | str = torch.float64,
                    tol: float = 0.1, chunk_size: int = DEFAULT_CHUNK, out_device: torch.device | str | None = None,
                    distributed: bool = False) -> tuple[torch.Tensor, SinkhornResult]:
    """Equipartitioned hard labels from logits (N, K): P^λ = softmax(λ·logits), Sinkhorn-Knopp, argmax."""
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    p = power_softmax(logits, lamb, dtype=dtype, out_device=out_device, chunk_size=chunk_size)
    result = sinkhorn_knopp(p, tol=tol, distributed=distributed)
    return hard_labels(p, result.r, chunk_size), result
