"""Augmentation throughput: per-sample PIL pipeline vs. whole-batch tensor kernels (images/s).

    python benchmarks/augment_throughput.py [--recipe aug+] [--batch 256] [--sizes 32 224] [--threads 1]

For each output size S it times, on one batch of random images (S x S sources for S < 224, 256 x 256 for 224):
(a) ``transforms.build_transform(recipe, S)`` applied image by image to PIL images, as a DataLoader worker does;
(b) ``batch_augment.build_batch_transform(recipe, S)`` on the stacked uint8 batch, on CPU and, when available,
CUDA (including the uint8 -> float conversion and normalisation, excluding the host -> device copy).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from selfsup.data.batch_augment import build_batch_transform
from selfsup.data.transforms import build_transform
from selfsup.engine.trainer import device_name


def source_side(size: int) -> int:
    return 256 if size >= 224 else size


def timed(fn: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None) -> tuple[float, float]:
    """Median wall and process-CPU seconds of ``repeats`` calls after one warm-up call (CPU time sums threads;
    on a shared machine it is the steadier figure)."""
    fn()
    sync()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        sync()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def report(label: str, batch: int, times: tuple[float, float]) -> None:
    wall, cpu = times
    print(f"{label}: {batch / wall:9.0f} images/s  ({1e3 * cpu / batch:.3f} CPU-ms/image)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="aug+")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1, as in a DataLoader worker; 0 keeps torch's default)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cpu = device_name(torch.device("cpu"))
    print(f"CPU: {cpu} ({torch.get_num_threads()} torch threads); torch {torch.__version__}")
    if torch.cuda.is_available():
        print(f"CUDA: {torch.cuda.get_device_name()}")
    print(f"recipe {args.recipe}, batch {args.batch}")
    rng = np.random.default_rng(0)
    for size in args.sizes:
        side = source_side(size)
        arrays = rng.integers(0, 256, (args.batch, side, side, 3), dtype=np.uint8)
        pil = [Image.fromarray(a) for a in arrays]
        batch = torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()
        label = f"{size:4d} px (from {side} px)"

        per_sample = build_transform(args.recipe, size)
        times = timed(lambda t=per_sample, pil=pil: torch.stack([t(im) for im in pil]), args.repeats)
        report(f"{label}  PIL per-sample   ", args.batch, times)

        aug = build_batch_transform(args.recipe, size)
        gen = torch.Generator().manual_seed(0)
        report(f"{label}  BatchAugment CPU ", args.batch, timed(lambda a=aug, b=batch, g=gen: a(b, g), args.repeats))

        if torch.cuda.is_available():
            aug_cuda, batch_cuda = aug.cuda(), batch.cuda()
            gen_cuda = torch.Generator(device="cuda").manual_seed(0)
            times = timed(lambda a=aug_cuda, b=batch_cuda, g=gen_cuda: a(b, g), max(args.repeats, 10),
                          torch.cuda.synchronize)
            report(f"{label}  BatchAugment CUDA", args.batch, times)


if __name__ == "__main__":
    main()
