"""Training throughput on this machine: images/s, data and step time, peak memory, per method x backbone x batch.

    python benchmarks/throughput.py                                         # moco, byol x resnet_mini, resnet18 x 64
    python benchmarks/throughput.py quickstart data.num_workers=4 --methods moco msf --backbones resnet18 \\
        --batches 128 256 --augment per_sample batch
    python benchmarks/throughput.py --methods moco --backbones resnet50 --batches 256 --image-size 224 \\
        --synthetic --compile                                               # the ResNet-50 @ 224 figure (GPU)

Every combination builds the real :class:`~selfsup.engine.trainer.Trainer` from the recipe (default: quickstart)
plus ``method=M model.backbone=B train.batch_size=N data.image_size=S data.augment=A`` (and the CIFAR stem below
128 px, the ImageNet stem from 128 px: ``model.small_stem``) and the given overrides, so
precision (bf16 on CUDA), channels_last, fused optimisers and ``torch.compile`` are the trainer's own. It runs
``--warmup`` steps, then times ``--steps`` calls of ``Trainer.train_step``: *data* is the wait for the next batch
from the trainer's DataLoader (PIL augmentation for ``per_sample``; uint8 images only for ``batch``), *step* is the
host-to-device copy, on-device augmentation (``batch``), forward, backward and optimiser step, with CUDA
synchronised after each step. ``--synthetic`` replaces the loader by random tensors already on the device (the
shapes of one real batch; 256 px uint8 sources for ``batch`` at 224 px), so *data* is zero and *step* is the
model alone. One JSON line per combination; memory is ``torch.cuda.max_memory_allocated`` on CUDA, the process's
peak resident set size on CPU (a running maximum over the combinations of one invocation).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import resource
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import nullcontext

import torch

from selfsup.cli import find_recipe
from selfsup.config import load_config
from selfsup.engine.trainer import Trainer, device_name

Sample = tuple  # a loader batch: (views, choices, indices, labels)


def loader_batches(trainer: Trainer) -> Iterator[Sample]:
    """The trainer's DataLoader, epoch after epoch, in the trainer's own order."""
    for epoch in itertools.count():
        trainer.sampler.set_epoch(epoch)
        yield from trainer.loader


def synthetic_batch(batch: Sample, device: torch.device, image_size: int) -> Sample:
    """Random tensors on the device shaped like ``batch``: float views (per_sample) or uint8 sources (batch)."""
    views, choices, indices, labels = batch

    def fake(view: torch.Tensor) -> torch.Tensor:
        if view.dtype == torch.uint8:
            side = 256 if image_size >= 224 else image_size  # ImageNet-like sources at 224 px, as-is when small
            return torch.randint(0, 256, (*view.shape[:2], side, side), dtype=torch.uint8, device=device)
        return torch.randn(view.shape, device=device)

    fakes = fake(views) if isinstance(views, torch.Tensor) else [fake(v) for v in views]
    return fakes, {k: v.to(device) for k, v in choices.items()}, indices.to(device), labels.to(device)


def peak_memory_mib(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "host_peak_rss"


def measure(trainer: Trainer, warmup: int, steps: int, synthetic: bool) -> dict[str, float | str]:
    device = trainer.device
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.method.train()
    batches = loader_batches(trainer)
    if synthetic:
        batches = itertools.repeat(synthetic_batch(next(batches), device, trainer.cfg.data.image_size))
    data_s, step_s = [], []
    began = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            warmup_s = time.perf_counter() - began
        start = time.perf_counter()
        sample = next(batches)
        fetched = time.perf_counter()
        out, _ = trainer.train_step(trainer.to_batch(sample))
        sync()
        done = time.perf_counter()
        if i >= warmup:
            data_s.append(fetched - start)
            step_s.append(done - fetched)
    if not torch.isfinite(out.loss.detach()).all():
        raise RuntimeError("the loss is not finite: the figures would be meaningless")
    batch = trainer.cfg.train.batch_size
    data, step = statistics.fmean(data_s), statistics.fmean(step_s)
    memory, kind = peak_memory_mib(device)
    return {"images_per_s": round(batch / (data + step), 1), "step_images_per_s": round(batch / step, 1),
            "data_s": round(data, 5), "step_s": round(step, 5), "step_s_min": round(min(step_s), 5),
            "warmup_s": round(warmup_s, 2), "peak_mem_mib": round(memory, 1), "peak_mem_kind": kind,
            "loss": float(out.loss.detach())}


def main(argv: list[str] | None = None) -> list[dict]:
    """Run every combination; print and return one record each."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", nargs="?", default="quickstart")
    parser.add_argument("overrides", nargs="*", help="key=value words applied to every combination")
    parser.add_argument("--methods", nargs="+", default=["moco", "byol"])
    parser.add_argument("--backbones", nargs="+", default=["resnet_mini", "resnet18"])
    parser.add_argument("--batches", nargs="+", type=int, default=[64])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--augment", nargs="+", default=["per_sample"], choices=["per_sample", "batch"])
    parser.add_argument("--synthetic", action="store_true", help="random tensors on the device instead of the loader")
    parser.add_argument("--compile", action="store_true", help="train.compile=true (warm-up includes compilation)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if "=" in args.recipe:  # overrides without a recipe
        args.overrides.insert(0, args.recipe)
        args.recipe = "quickstart"
    recipe = find_recipe(args.recipe)

    rows = []
    with tempfile.TemporaryDirectory() as output:
        for method, backbone, batch, augment in itertools.product(args.methods, args.backbones, args.batches,
                                                                  args.augment):
            words = [f"method={method}", f"model.backbone={backbone}", f"train.batch_size={batch}",
                     f"data.image_size={args.image_size}", f"data.augment={augment}", f"train.device={args.device}",
                     f"model.small_stem={str(args.image_size < 128).lower()}",  # ImageNet stem from 128 px
                     f"train.compile={str(args.compile).lower()}", "train.progress_bar=false", "eval.at_end=false",
                     f"train.output_dir={output}", f"train.run_name={method}-{backbone}-{batch}-{augment}",
                     *([f"train.threads={args.threads}"] if args.threads else []), *args.overrides]
            cfg = load_config(recipe, words)
            trainer = Trainer(cfg)
            if trainer.steps_per_epoch == 0:
                raise SystemExit(f"batch {batch} is larger than the {len(trainer.train_set)} training images")
            row = {"device": device_name(trainer.device), "method": method, "backbone": backbone,
                   "small_stem": cfg.model.small_stem, "image_size": args.image_size, "batch": batch,
                   "augment": augment,
                   "synthetic": args.synthetic, "data": cfg.data.name, "num_workers": cfg.data.num_workers,
                   "precision": "fp32" if trainer.autocast is nullcontext else "bf16",
                   "channels_last": trainer.channels_last, "compile": cfg.train.compile,
                   "threads": torch.get_num_threads()}
            row.update(measure(trainer, args.warmup, args.steps, args.synthetic))
            print(json.dumps(row), flush=True)
            rows.append(row)
            del trainer
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    main()
