"""torch.distributed helpers: set-up from torchrun / Slurm variables, gathers, rank-zero utilities."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group that torchrun (or srun) describes in the environment; single process otherwise.

    Backend: NCCL on CUDA, gloo on CPU.
    """
    if is_initialized():
        return DistInfo(rank(), world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    env = os.environ
    if "WORLD_SIZE" not in env and "SLURM_NTASKS" in env and "MASTER_ADDR" in env:
        # srun without torchrun: translate Slurm's variables.
        env.setdefault("WORLD_SIZE", env["SLURM_NTASKS"])
        env.setdefault("RANK", env["SLURM_PROCID"])
        env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
    size = int(env.get("WORLD_SIZE", 1))
    if size <= 1:
        return DistInfo()
    local_rank = int(env.get("LOCAL_RANK", 0))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def shutdown() -> None:
    if is_initialized():
        dist.destroy_process_group()


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, in rank order (no gradient); ``x`` alone if single."""
    size = world_size()
    if size == 1:
        return x
    out = torch.empty((size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x.contiguous())
    return out


@torch.no_grad()
def gather_uneven(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, in rank order, when the ranks hold different numbers of rows
    (e.g. shards of a data set that does not divide evenly); ``x`` alone if single."""
    size = world_size()
    if size == 1:
        return x
    lengths = gather(torch.tensor([x.shape[0]], device=x.device))
    longest = int(lengths.max())
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[:x.shape[0]] = x
    everything = gather(padded).reshape(size, longest, *x.shape[1:])
    return torch.cat([everything[r, :n] for r, n in enumerate(lengths.tolist())])


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if world_size() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / world_size()


@torch.no_grad()
def batch_shuffle(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo's ShuffleBN: gather the batch, permute it across ranks, return this rank's slice and the inverse.

    With per-GPU BatchNorm the key encoder then sees statistics of a different sub-batch than the query
    encoder, which prevents the "cheating" the MoCo paper describes. A no-op on one process.
    """
    size = world_size()
    if size == 1:
        return x, torch.arange(x.shape[0], device=x.device)
    everything = gather(x)
    permutation = torch.randperm(everything.shape[0], device=x.device)
    dist.broadcast(permutation, src=0)
    inverse = torch.argsort(permutation)
    local = permutation.view(size, -1)[rank()]
    return everything[local], inverse


@torch.no_grad()
def batch_unshuffle(x: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Undo :func:`batch_shuffle` on the keys computed from the shuffled slice."""
    size = world_size()
    if size == 1:
        return x
    everything = gather(x)
    local = inverse.view(size, -1)[rank()]
    return everything[local]
