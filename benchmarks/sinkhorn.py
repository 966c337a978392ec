"""SeLa's label step at scale: time and peak memory of P^λ, Sinkhorn-Knopp and the hard labels.

    python benchmarks/sinkhorn.py [--n 128000] [--k 3000] [--dim 2048] [--dtype f64] [--threads N]

Shared features (N, dim) in float32 and one head Linear(dim, K) stand in for a trained network (head weights
scaled so that the logits have standard deviation ``--logit-std``); P^λ = softmax(λ·logits) is built chunk by
chunk, scaled by Sinkhorn-Knopp to tolerance ``--tol``, then argmax'd. On the CPU it runs at ``--n``; with a GPU
it also runs at N = 1.28M (ImageNet) on the GPU. Peak memory: host resident-set growth over the features, or
``torch.cuda.max_memory_allocated``, next to the size of P itself.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from selfsup.engine.trainer import device_name
from selfsup.nn.sinkhorn import DTYPES, hard_labels, power_softmax, sinkhorn_knopp


def rss_gib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**30


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(n: int, k: int, dim: int, dtype: torch.dtype, device: torch.device, args: argparse.Namespace) -> dict:
    generator = torch.Generator(device=device).manual_seed(0)
    features = torch.randn(n, dim, generator=generator, device=device)
    weight = torch.randn(k, dim, generator=generator, device=device) * (args.logit_std / dim**0.5)
    bias = torch.zeros(k, device=device)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = rss_gib()
    start = time.perf_counter()
    p = power_softmax(features, args.lamb, weight=weight, bias=bias, dtype=dtype, chunk_size=args.chunk)
    sync(device)
    built = time.perf_counter()
    result = sinkhorn_knopp(p, tol=args.tol)
    sync(device)
    scaled = time.perf_counter()
    labels = hard_labels(p, result.r, args.chunk)
    sync(device)
    done = time.perf_counter()
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30
    else:
        peak = peak_rss_gib() - base
    counts = torch.bincount(labels, minlength=k)
    return {
        "device": device_name(device),
        "threads": torch.get_num_threads(), "N": n, "K": k, "dim": dim, "dtype": str(dtype).split(".")[-1],
        "lambda": args.lamb, "tol": args.tol, "P_GiB": round(n * k * dtype.itemsize / 2**30, 3),
        "peak_GiB_over_features": round(peak, 3), "build_s": round(built - start, 2),
        "sinkhorn_s": round(scaled - built, 2), "iterations": result.iterations,
        "s_per_iteration": round((scaled - built) / result.iterations, 4), "argmax_s": round(done - scaled, 2),
        "error": result.error, "cluster_size_min_max": [int(counts.min()), int(counts.max())], "N/K": n / k,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=128_000)
    parser.add_argument("--gpu-n", type=int, default=1_281_167)
    parser.add_argument("--k", type=int, default=3000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--dtype", choices=list(DTYPES), default="f64")
    parser.add_argument("--lamb", type=float, default=25.0)
    parser.add_argument("--tol", type=float, default=0.1)
    parser.add_argument("--logit-std", type=float, default=1.0)
    parser.add_argument("--chunk", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    with torch.no_grad():
        print(json.dumps(run(args.n, args.k, args.dim, dtype, torch.device("cpu"), args)), flush=True)
        if torch.cuda.is_available():
            print(json.dumps(run(args.gpu_n, args.k, args.dim, dtype, torch.device("cuda"), args)), flush=True)


if __name__ == "__main__":
    main()
