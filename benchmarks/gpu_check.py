"""The device check: every CUDA path of selfsup exercised in one command, and the README's GPU figures (issue 18).

    python benchmarks/gpu_check.py --out gpu_check                  # CUDA, all local GPUs: a 450 s budget
    python benchmarks/gpu_check.py --out gpu_check --quick          # 165 s: the second try of a short window
    python benchmarks/gpu_check.py --out dry --device cpu --quick   # the same code at CPU sizes (the dry-run test)
    python benchmarks/gpu_check.py --out gpu_check --only knn sinkhorn   # some sections again (--skip: all but)

It needs the checkout (its ``src/`` goes first on the path, nothing has to be installed) and torch, torchvision,
timm, scikit-learn and PyYAML; no faiss, POT, omegaconf or submitit. The data are generated: a CIFAR-10-format
folder of 50,000 Shapes-10 images (32 px, read by ``data.name=cifar10`` as a user's CIFAR would be) and, for the
two-stage photo path, JPEGs of 250-500 px cut from scikit-learn's two sample photographs. Every training section
builds the real ``Trainer`` from config words and runs ``fit()``; a step callback synchronises the device and
times the steps after the warm-up. Sections, in order (``--quick``: 3 + 10 steps, no BYOL ResNet-50, smaller
probes, ``compile`` last; the CPU dry run: resnet_mini at 16 px, tiny queues, 1 + 2 steps, gloo):

- ``method:<m>`` for moco, byol, isd, isd_plus, msf, sela, mugs: 10 + 20 steps at bf16 + channels_last,
  ResNet-18 with the CIFAR stem at 32 px, batch 256, ``data.augment=batch`` (Mugs: a ViT-tiny, patch 4, 10 local
  crops of 16 px, AdamW), the method's paper defaults otherwise
  (queues of 65,536 / 128,000; SeLa 10 heads x 3,000 clusters, its one label update before the first step);
  finite loss, images/s, peak memory;
- ``readme:<m>_r18_b512`` for MoCo-v2 and BYOL-asym: the same at batch 512, with minutes per 200 epochs of 50,000
  images; ``readme:<m>_r50_224``: ResNet-50 at 224 px, batch 256 (the 32 px sources cropped and augmented on
  the device); ``readme:two_stage_photos``: MoCo ResNet-50 on the JPEG folder with ``data.augment=batch``, run
  only where variable-size images reach that path (otherwise "not available in this checkout");
- ``torchrun``: ``torchrun --nproc_per_node=<all local GPUs>`` (NCCL), MoCo 20 steps, then on every rank: the
  queue rows equal the keys of all ranks gathered in rank order, step by step, the dataset indices stored with
  them follow the global batch order of the sampler, and every rank holds the same queue. With one GPU it runs
  one process (no DDP, the gather is the identity) plus a one-rank NCCL all-gather/all-reduce; the cross-rank
  checks need two GPUs;
- ``compile``: MoCo ResNet-18 as ``method:moco`` with ``train.compile=true``: compile time, images/s after it;
- ``knn``: weighted 20-NN and 1-NN of 50,000 queries over 1,281,167 x 2048 float32 features (ImageNet's sizes);
  ``sinkhorn``: SeLa's P^λ, Sinkhorn-Knopp and the labels over 1,281,167 x 3000 in float64 (benchmarks/sinkhorn.py).
  Each first runs a 1/16 probe and then the full size if the probe's time and memory, scaled, fit what is left;
  otherwise the largest size that does.

Every section runs in its own try/except under a time cap and the overall ``--budget``; a failure is recorded
with its error and the next section runs. ``DIR/gpu_check.json`` and ``DIR/gpu_check.md`` are rewritten after
every section (a killed run keeps its figures); each section's trainer output goes to ``DIR/logs/<section>.log``.
``gpu_check.md`` ends with the README's GPU table (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import math
import os
import pickle
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # this checkout's selfsup, installed or not

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from selfsup.config import load_config  # noqa: E402
from selfsup.data.datasets import SHAPES, make_shapes  # noqa: E402
from selfsup.engine.trainer import Trainer, device_name  # noqa: E402
from selfsup.eval.knn import knn_sweep  # noqa: E402

METHODS = ("moco", "byol", "isd", "isd_plus", "msf", "sela", "mugs")
EPOCH_IMAGES, EPOCHS = 50_000, 200  # "minutes per 200 epochs of 50,000 images"
IMAGENET = 1_281_167
NOT_AVAILABLE = ("stack expects each tensor to be equal size", "needs images of one size")  # fixed-size batch path
TOOLCHAIN_WORDS = ("Cxx", "CppCompile", "compiler", "Python.h", "triton", "Triton", "gcc", "cc1")


# ------------------------------------------------------------------------------------------------ sizes


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU check, its ``--quick`` version and the CPU dry run."""

    backbone: str = "resnet18"
    image_size: int = 32
    batch: int = 256  # method:* sections
    readme_batch: int = 512  # readme:*_r18_b512
    large_backbone: str = "resnet50"
    large_image_size: int = 224
    large_batch: int = 256
    warmup: int = 10
    steps: int = 20
    dist_steps: int = 20
    train_images: int = EPOCH_IMAGES
    test_images: int = 1000
    photo_sides: tuple[int, int] = (250, 500)
    photo_warmup: int = 4  # the workers' first batches arrive together: past them, the steady state
    photo_steps: int = 12
    knn: tuple[int, int, int] = (IMAGENET, 2048, 50_000)  # memory rows, width, queries
    sinkhorn: tuple[int, int, int] = (IMAGENET, 3000, 2048)  # samples, clusters, feature width
    probe_fraction: int = 16
    readme_large_methods: tuple[str, ...] = ("moco", "byol")
    method_words: dict[str, tuple[str, ...]] = field(default_factory=lambda: {
        # 10 heads x 3000 clusters as the paper; one label update, before the first step (its own figure: the
        # sinkhorn section), so the timed steps are training steps
        "sela": ("method.nopts=2",),
        "mugs": ("model.backbone=vit_tiny", "model.patch_size=4", "model.vit_image_size=32",
                 "method.local_crop_size=16", "optim.name=adamw", "optim.lr=0.0005",
                 "optim.weight_decay=0.04"),
    })


QUICK = {"warmup": 3, "steps": 10, "dist_steps": 10, "photo_steps": 6, "probe_fraction": 32,
         "readme_large_methods": ("moco",)}

CPU = Sizes(
    backbone="resnet_mini", image_size=16, batch=16, readme_batch=16, large_backbone="resnet_mini",
    large_image_size=32, large_batch=8, warmup=1, steps=2, dist_steps=2, train_images=128, test_images=16,
    photo_sides=(40, 80), photo_warmup=1, photo_steps=1, knn=(4096, 64, 256), sinkhorn=(4096, 30, 32),
    probe_fraction=8, readme_large_methods=("moco",),
    method_words={
        "moco": ("method.queue_size=256", "method.dim=16"),
        "isd": ("method.queue_size=256",), "isd_plus": ("method.queue_size=256",), "msf": ("method.bank_size=256",),
        "sela": ("method.ncl=8", "method.hc=2", "method.nopts=2"),
        "mugs": ("model.backbone=vit_tiny", "model.patch_size=4", "model.embed_dim=32", "model.depth=2",
                 "model.num_heads=2", "model.vit_image_size=16", "method.local_crops_number=2",
                 "method.local_crop_size=8", "method.head_hidden_dim=32", "method.predictor_hidden_dim=32",
                 "method.instance_out_dim=16", "method.local_group_out_dim=16", "method.group_out_dim=64",
                 "method.group_bottleneck_dim=16", "method.instance_queue_size=128",
                 "method.local_group_queue_size=128", "method.memory_size=128", "method.local_group_top_n=4",
                 "optim.name=adamw", "optim.lr=0.0005"),
    },
)


def sizes_for(device: torch.device, quick: bool) -> Sizes:
    if device.type == "cpu":
        return CPU
    return replace(Sizes(), **QUICK) if quick else Sizes()


# ------------------------------------------------------------------------------------------------ device helpers


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> dict[str, float]:
    """``torch.cuda.max_memory_allocated`` since the last reset, or the process's peak resident set on the CPU."""
    if device.type == "cuda":
        return {"peak_mem_mib": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)}
    return {"host_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def free_bytes(device: torch.device) -> float:
    """Memory a new computation can take: free device memory plus torch's reusable cache, or the host's."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def compiler_missing(device: torch.device) -> str | None:
    """Why ``torch.compile`` cannot build kernels for ``device`` here (inductor needs a C++ compiler and Python's
    headers on the CPU, Triton and a C compiler on CUDA), or None. Detected by compiling a one-line function:
    only a toolchain error counts as missing, anything else is raised."""
    from torch._dynamo.exc import BackendCompilerFailed

    def probe(x: torch.Tensor) -> torch.Tensor:
        return x * 2 + 1

    try:
        out = torch.compile(probe)(torch.ones(4, device=device))
    except (BackendCompilerFailed, ImportError, RuntimeError) as error:
        inner = getattr(error, "inner_exception", None) or error
        text = f"{type(inner).__name__}: {inner}"
        if any(word in text for word in TOOLCHAIN_WORDS):
            return f"torch.compile has no working toolchain for {device.type} here ({text.splitlines()[0][:200]})"
        raise
    finally:
        torch._dynamo.reset()
    if not torch.equal(out.cpu(), torch.full((4,), 3.0)):
        raise AssertionError(f"torch.compile computed {out.tolist()} for 2·1 + 1")
    return None


# ------------------------------------------------------------------------------------------------ generated data


def write_cifar10(folder: Path, train: int, test: int) -> Path:
    """A CIFAR-10 folder in torchvision's python format (``cifar-10-batches-py``) holding Shapes-10 images: 2,000
    generated ones tiled to ``train`` + ``test``. Returns the ``data.path`` to give ``data.name=cifar10``."""
    images, labels = make_shapes(min(2000, train + test), 32, seed=0)
    repeat = np.arange(train + test) % len(images)
    rows = images[repeat].transpose(0, 3, 1, 2).reshape(len(repeat), 3 * 32 * 32)  # CHW planes per row
    labels = labels[repeat]
    batches = folder / "cifar-10-batches-py"
    batches.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, train, 6).astype(int)
    parts = [(f"data_batch_{k + 1}", bounds[k], bounds[k + 1]) for k in range(5)] + [("test_batch", train, None)]
    for name, start, end in parts:
        with open(batches / name, "wb") as handle:
            pickle.dump({"data": rows[start:end], "labels": labels[start:end].tolist()}, handle)
    with open(batches / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": SHAPES}, handle)
    return folder


def write_photos(folder: Path, count: int, sides: tuple[int, int], classes: int = 10) -> Path:
    """An ImageFolder (``train/<class>/``) of ``count`` JPEGs (quality 90), each a random crop of one of
    scikit-learn's two sample photographs rescaled to sides in ``sides``: real photos of varied sizes."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images

    def make(i: int) -> None:
        rng = np.random.default_rng(i)
        source = photos[i % len(photos)]
        h, w = (int(rng.integers(source.shape[k] // 3, source.shape[k] + 1)) for k in (0, 1))
        y, x = int(rng.integers(0, source.shape[0] - h + 1)), int(rng.integers(0, source.shape[1] - w + 1))
        size = tuple(int(s) for s in rng.integers(sides[0], sides[1] + 1, size=2))
        image = Image.fromarray(source[y:y + h, x:x + w]).resize(size, Image.BILINEAR)
        image.save(folder / "train" / f"class{i % classes}" / f"{i:06d}.jpg", quality=90)

    for c in range(classes):
        (folder / "train" / f"class{c}").mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:  # PIL encodes outside the GIL
        list(pool.map(make, range(count)))
    return folder


# ------------------------------------------------------------------------------------------------ the check


class SectionTimeout(Exception):
    pass


@contextlib.contextmanager
def time_cap(seconds: float) -> Iterator[None]:
    """Raise :class:`SectionTimeout` in the main thread once ``seconds`` have passed (SIGALRM). It interrupts
    Python between two operations: a long blocking call (a device synchronisation) ends first."""
    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise SectionTimeout(f"stopped at its time cap of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Section:
    name: str
    run: Callable[[Check, float], dict[str, Any]]  # (check, its time cap) -> figures; may set status/note
    cap: float  # seconds at most
    minimum: float  # seconds it needs at least; skipped when less of the budget is left


class Check:
    """Results, output files, generated data and the clock of one invocation."""

    def __init__(self, out: Path, device: torch.device, quick: bool, budget: float, threads: int | None):
        self.out, self.device, self.quick, self.threads = out, device, quick, threads
        self.sizes = sizes_for(device, quick)
        self.started = time.monotonic()
        self.deadline = self.started + budget
        (out / "logs").mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="selfsup-gpu-check-"))
        self._cifar: Path | None = None
        self.results: dict[str, Any] = {"check": "selfsup benchmarks/gpu_check.py", "environment": environment(device),
                                        "quick": quick, "budget_s": budget, "elapsed_s": 0.0, "finished": False,
                                        "sections": {}}

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    @property
    def cifar(self) -> Path:
        if self._cifar is None:
            self._cifar = write_cifar10(self.work / "cifar", self.sizes.train_images, self.sizes.test_images)
        return self._cifar

    def section(self, name: str) -> dict[str, Any] | None:
        return self.results["sections"].get(name)

    def record(self, name: str, record: dict[str, Any]) -> None:
        self.results["sections"][name] = record
        self.results["elapsed_s"] = round(time.monotonic() - self.started, 1)
        self.write()

    def write(self) -> None:
        """Both files, each replaced atomically: a run killed at any moment leaves complete files."""
        for path, text in ((self.out / "gpu_check.json", json.dumps(self.results, indent=2, allow_nan=False)),
                           (self.out / "gpu_check.md", markdown(self.results))):
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(text + "\n")
            os.replace(tmp, path)

    @contextlib.contextmanager
    def log(self, name: str) -> Iterator[Any]:
        with open(self.out / "logs" / f"{name.replace(':', '_')}.log", "a") as handle, \
                contextlib.redirect_stdout(handle):
            yield handle

    def close(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)

    # ---------------------------------------------------------------------------------------- training runs

    def words(self, name: str, method: str, *, backbone: str | None = None, image_size: int | None = None,
              batch: int | None = None, steps: int | None = None, extra: tuple[str, ...] = ()) -> list[str]:
        """The config words of one training section: bf16, channels_last, on-device batch augmentation of the
        generated CIFAR folder, no checkpoints or evaluation before the end, the method's check-size words."""
        s = self.sizes
        image_size = image_size or s.image_size
        steps = steps or s.warmup + s.steps
        workers = 0 if self.device.type == "cpu" else max(2, min(16, os.cpu_count() or 1) - 2)  # all but 2 cores
        return [
            f"method={method}", f"model.backbone={backbone or s.backbone}",
            f"model.small_stem={str(image_size < 128).lower()}",  # the CIFAR stem below 128 px, as throughput.py
            "data.name=cifar10", f"data.path={self.cifar}", f"data.image_size={image_size}", "data.augment=batch",
            f"data.num_workers={workers}", f"train.batch_size={batch or s.batch}", f"train.device={self.device}",
            "train.precision=bf16", "train.channels_last=true", f"train.epochs={EPOCHS}", f"train.max_steps={steps}",
            f"train.log_every_steps={steps}", "train.checkpoint_every_epochs=1000000",
            "train.checkpoint_every_minutes=1000000", "train.progress_bar=false", "eval.at_end=false",
            f"train.output_dir={self.work / 'runs'}", f"train.run_name={name.replace(':', '-')}",
            *([f"train.threads={self.threads}"] if self.threads else []),
            *s.method_words.get(method, ()), *extra,
        ]

    def train(self, name: str, words: list[str], warmup: int | None = None, steps: int | None = None
              ) -> dict[str, Any]:
        """Build the Trainer from ``words`` and ``fit()`` it; images/s over the steps after ``warmup``."""
        warmup = self.sizes.warmup if warmup is None else warmup
        steps = self.sizes.steps if steps is None else steps
        cfg = load_config(None, words)
        reset_peak(self.device)
        trainer = Trainer(cfg)
        try:
            figures = timed_fit(trainer, warmup, steps)
            figures.update(peak_mib(self.device))
            figures.update({"backbone": cfg.model.backbone, "image_size": cfg.data.image_size,
                            "batch": cfg.train.batch_size, "augment": cfg.data.augment,
                            "workers": cfg.data.num_workers})
            return figures
        finally:
            shutil.rmtree(trainer.run_dir, ignore_errors=True)
            del trainer
            release_memory()


def timed_fit(trainer: Trainer, warmup: int, steps: int) -> dict[str, Any]:
    """``trainer.fit()`` with a step callback that synchronises the device after steps 1, ``warmup`` and
    ``warmup + steps`` (no other host syncs than the trainer's own), and the loss the trainer logged last."""
    device, marks = trainer.device, {}
    last = warmup + steps

    def mark(t: Trainer) -> None:
        if t.step in (1, warmup, last):
            synchronize(device)
            marks[t.step] = time.perf_counter()

    trainer.step_callbacks.append(mark)
    started = time.perf_counter()
    trainer.fit()
    if last not in marks:
        raise RuntimeError(f"training stopped after {trainer.step} of {last} steps")
    window = marks[last] - marks[warmup]
    batch = trainer.cfg.train.batch_size
    figures = {"images_per_s": round(batch * steps / window, 1), "step_ms": round(1000 * window / steps, 2),
               "first_step_s": round(marks[1] - started, 2), "timed_steps": steps}
    if trainer.is_main:  # the process that writes metrics.jsonl
        records = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
        loss = [r["loss"] for r in records if "loss" in r][-1]
        if not math.isfinite(loss):  # the trainer raises first on a logging step; this guards the record
            raise FloatingPointError(f"the loss is {loss}")
        figures["loss"] = round(loss, 4)
    return figures


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {"device": device_name(device), "device_type": device.type, "torch": torch.__version__,
                           "python": platform.python_version(), "cpus": os.cpu_count()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({"gpus": torch.cuda.device_count(), "memory_gib": round(props.total_memory / 2**30, 1),
                    "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda,
                    "cudnn": torch.backends.cudnn.version(), "cudnn_benchmark": torch.backends.cudnn.benchmark,
                    "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32})
    return env


# ------------------------------------------------------------------------------------------------ sections


def method_section(method: str) -> Callable[[Check, float], dict[str, Any]]:
    def run(check: Check, cap: float) -> dict[str, Any]:
        return check.train(f"method:{method}", check.words(f"method:{method}", method))

    return run


def readme_r18(method: str) -> Callable[[Check, float], dict[str, Any]]:
    def run(check: Check, cap: float) -> dict[str, Any]:
        name = f"readme:{method}_r18_b512"
        figures = check.train(name, check.words(name, method, batch=check.sizes.readme_batch))
        figures["minutes_per_200_epochs_50k"] = round(EPOCHS * EPOCH_IMAGES / figures["images_per_s"] / 60, 1)
        return figures

    return run


def readme_r50(method: str) -> Callable[[Check, float], dict[str, Any]]:
    def run(check: Check, cap: float) -> dict[str, Any]:
        s, name = check.sizes, f"readme:{method}_r50_224"
        return check.train(name, check.words(name, method, backbone=s.large_backbone, image_size=s.large_image_size,
                                             batch=s.large_batch))

    return run


def two_stage_photos(check: Check, cap: float) -> dict[str, Any]:
    """MoCo ResNet-50 on variable-size JPEGs with ``data.augment=batch``: decoded and cropped on the loader workers,
    augmented on the device. A probe of 16 photos first: where batches still need one image size, it stops there."""
    s = check.sizes

    def words(folder: Path, batch: int, steps: int) -> list[str]:
        base = check.words("readme:two_stage_photos", "moco", backbone=s.large_backbone,
                           image_size=s.large_image_size, batch=batch, steps=steps)
        return [*base, "data.name=imagefolder", f"data.path={folder}"]

    probe = write_photos(check.work / "photos-probe", 16, s.photo_sides)
    try:
        check.train("readme:two_stage_photos", words(probe, 8, 2), warmup=1, steps=1)
    except Exception as error:  # noqa: BLE001 - the two signatures of the fixed-size path, anything else is raised
        if any(signature in str(error) for signature in NOT_AVAILABLE):
            return {"status": "not_available", "note": "not available in this checkout: data.augment=batch needs "
                    f"images of one size here ({type(error).__name__}: {str(error).splitlines()[0][:160]})"}
        raise
    count = (s.photo_warmup + s.photo_steps + 1) * s.large_batch  # no epoch boundary (loader restart) when timed
    folder = write_photos(check.work / "photos", count, s.photo_sides)
    figures = check.train("readme:two_stage_photos", words(folder, s.large_batch, s.photo_warmup + s.photo_steps),
                          warmup=s.photo_warmup, steps=s.photo_steps)
    figures["photos"] = count
    synthetic = check.section("readme:moco_r50_224") or {}
    if synthetic.get("status") == "ok":  # the data path's share of the step, against the on-device data
        figures["vs_on_device_data"] = round(figures["images_per_s"] / synthetic["images_per_s"], 3)
    return figures


def gpu_decode_photos(check: Check, cap: float) -> dict[str, Any]:
    """The same photos and model with ``data.decode=gpu``: the workers read the JPEG bytes, nvjpeg decodes the batch
    on the GPU (``torchvision.io.decode_jpeg``), crops and stage 2 run there too."""
    if check.device.type != "cuda":
        return {"status": "skipped", "note": "data.decode=gpu needs CUDA (nvjpeg)"}
    s = check.sizes
    count = (s.photo_warmup + s.photo_steps + 1) * s.large_batch
    folder = write_photos(check.work / "photos", count, s.photo_sides)
    words = check.words("readme:gpu_decode_photos", "moco", backbone=s.large_backbone, image_size=s.large_image_size,
                        batch=s.large_batch, steps=s.photo_warmup + s.photo_steps)
    figures = check.train("readme:gpu_decode_photos",
                          [*words, "data.name=imagefolder", f"data.path={folder}", "data.decode=gpu"],
                          warmup=s.photo_warmup, steps=s.photo_steps)
    worker = check.section("readme:two_stage_photos") or {}
    if worker.get("status") == "ok":
        figures["vs_worker_decode"] = round(figures["images_per_s"] / worker["images_per_s"], 3)
    return figures


def compile_section(check: Check, cap: float) -> dict[str, Any]:
    reason = compiler_missing(check.device)
    if reason:
        return {"status": "skipped", "note": reason}
    try:
        figures = check.train("compile", check.words("compile", "moco", extra=("train.compile=true",)))
    finally:
        torch._dynamo.reset()
    eager = check.section("method:moco") or {}
    if eager.get("status") == "ok":
        figures["eager_images_per_s"] = eager["images_per_s"]
        figures["speedup"] = round(figures["images_per_s"] / eager["images_per_s"], 3)
        figures["compile_s"] = round(figures["first_step_s"] - eager["first_step_s"], 1)
    return figures


def torchrun_section(check: Check, cap: float) -> dict[str, Any]:
    """MoCo under ``torchrun --nproc_per_node=<all local GPUs>`` (two gloo processes on the CPU dry run)."""
    s = check.sizes
    nproc = torch.cuda.device_count() if check.device.type == "cuda" else 2
    spec_path, result_path = check.work / "torchrun_spec.json", check.work / "torchrun_result.json"
    steps = s.warmup + s.dist_steps
    batch = max(s.batch // nproc, 1) * nproc  # the total batch: every key of the run stays in one epoch and the queue
    words = check.words("torchrun", "moco", batch=batch, steps=steps)  # train.device=cuda becomes cuda:LOCAL_RANK
    spec_path.write_text(json.dumps({"words": words, "warmup": s.warmup, "steps": s.dist_steps,
                                     "result": str(result_path)}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    if check.device.type == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(Path(__file__).resolve()), "--worker", str(spec_path)]
    log_path = check.out / "logs" / "torchrun.log"
    with open(log_path, "a") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = process.wait(timeout=max(cap - 5, 1))
        except subprocess.TimeoutExpired:
            raise SectionTimeout(f"torchrun ran past its time cap of {cap:.0f} s") from None
        finally:
            stop_group(process)
    if code != 0:
        lines = log_path.read_text().splitlines()
        errors = [line for line in lines if re.search(r"\w(Error|Exception): ", line)] or lines[-2:]
        raise RuntimeError(f"torchrun exited with code {code} (logs/torchrun.log): {errors[0].strip()[:400]}")
    result = json.loads(result_path.read_text())
    failed = [k for k, v in result["checks"].items() if not v]
    result["nproc"] = nproc
    if nproc == 1:
        result["note"] = ("one GPU: one process, no DDP, the gather is the identity; NCCL ran a one-rank "
                          "all-gather/all-reduce. The cross-rank queue checks need two GPUs")
    if failed:
        result.update(status="failed", error=f"queue checks failed: {failed}")
    return result


def stop_group(process: subprocess.Popen) -> None:
    """End a launcher and the workers it started (its own process group)."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=wait)
            return


def sized_run(run_at: Callable[[int], dict[str, Any]], full: int, probe: int, check: Check, cap: float,
              started: float, margin: float = 1.5) -> dict[str, Any]:
    """Run ``run_at(probe)``; then the full size when the probe's time (times ``margin``) and memory, scaled
    linearly in the rows, fit the rest of the cap and the free memory; otherwise the largest size that does."""
    small = run_at(probe)
    left = cap - (time.monotonic() - started) - 5
    per_row_s = small["run_s"] / probe
    per_row_bytes = small["peak_bytes"] / probe
    fits_time = int(left / (margin * per_row_s))
    fits_memory = int(0.85 * free_bytes(check.device) / per_row_bytes)
    rows = min(full, fits_time, fits_memory)
    estimate = {"probe_rows": probe, "probe_s": small["run_s"], "estimated_full_s": round(per_row_s * full, 1),
                "estimated_full_gib": round(per_row_bytes * full / 2**30, 2)}
    if "iterations" in small:
        estimate["probe_iterations"] = small["iterations"]
    if rows <= probe:
        return {**small, **estimate, "note": f"probe size only: the full size needs ~{estimate['estimated_full_s']} s "
                f"and ~{estimate['estimated_full_gib']} GiB"}
    release_memory()
    result = {**run_at(rows), **estimate}
    if rows < full:
        limit = "time" if fits_time <= fits_memory else "memory"
        result["note"] = f"{rows:,} of {full:,} rows: what fits the remaining {limit}"
    return result


def knn_section(check: Check, cap: float) -> dict[str, Any]:
    started = time.monotonic()
    full, dim, queries = check.sizes.knn
    device = check.device

    def run_at(rows: int) -> dict[str, Any]:
        generator = torch.Generator(device=device).manual_seed(0)
        reset_peak(device)
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        memory = F.normalize(torch.randn(rows, dim, device=device, generator=generator), dim=1)
        labels = torch.randint(0, 1000, (rows,), device=device, generator=generator)
        query = F.normalize(torch.randn(queries, dim, device=device, generator=generator), dim=1)
        query_labels = torch.randint(0, 1000, (queries,), device=device, generator=generator)
        synchronize(device)
        start = time.perf_counter()
        scores = knn_sweep(memory, labels, query, query_labels, ks=(1, 20), temperatures=(0.07, None),
                           num_classes=1000)
        synchronize(device)
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else memory.nbytes * 2
        del memory, labels, query, query_labels
        if not all(math.isfinite(v) for v in scores.values()):
            raise FloatingPointError(f"kNN scores {scores}")
        return {"rows": rows, "dim": dim, "queries": queries, "run_s": round(seconds, 3),
                "queries_per_s": round(queries / seconds, 1), "peak_bytes": int(peak),
                "peak_gib": round(peak / 2**30, 3)}

    return sized_run(run_at, full, max(full // check.sizes.probe_fraction, 1), check, cap, started)


def sinkhorn_section(check: Check, cap: float) -> dict[str, Any]:
    started = time.monotonic()
    full, clusters, dim = check.sizes.sinkhorn
    bench = sibling_benchmark("sinkhorn")
    options = argparse.Namespace(lamb=25.0, tol=0.1, logit_std=1.0, chunk=16384)

    def run_at(rows: int) -> dict[str, Any]:
        start = time.perf_counter()
        with torch.no_grad():
            out = bench.run(rows, clusters, dim, torch.float64, check.device, options)
        seconds = time.perf_counter() - start
        release_memory()
        features = rows * dim * 4
        peak = out["peak_GiB_over_features"] * 2**30 + features
        return {"rows": rows, "clusters": clusters, "dtype": "float64", "run_s": round(seconds, 2),
                "build_s": out["build_s"], "sinkhorn_s": out["sinkhorn_s"], "iterations": out["iterations"],
                "argmax_s": out["argmax_s"], "sinkhorn_error": out["error"], "P_gib": out["P_GiB"],
                "peak_bytes": int(max(peak, features)), "peak_gib": round(max(peak, features) / 2**30, 3)}

    # the stopping error Σ_i |c_i/c_i' − 1| sums over the samples: more rows need more iterations, hence margin 3
    return sized_run(run_at, full, max(full // check.sizes.probe_fraction, clusters), check, cap, started, margin=3)


def sibling_benchmark(name: str):
    """Another script of ``benchmarks/`` as a module."""
    spec = importlib.util.spec_from_file_location(f"selfsup_benchmark_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def sections_for(check: Check) -> list[Section]:
    """Every section in running order with its time cap and minimum (quick: smaller caps)."""
    def cap(gpu_seconds: float) -> float:  # the CPU dry run: generous caps, it must not depend on the machine's speed
        if check.device.type == "cpu":
            return 300.0
        return gpu_seconds * (0.6 if check.quick else 1.0)

    out = [Section(f"method:{m}", method_section(m), cap(60), 8) for m in METHODS]
    out += [Section(f"readme:{m}_r18_b512", readme_r18(m), cap(60), 8) for m in ("moco", "byol")]
    out += [Section(f"readme:{m}_r50_224", readme_r50(m), cap(90), 10) for m in check.sizes.readme_large_methods]
    out += [Section("readme:two_stage_photos", two_stage_photos, cap(120), 10),
            Section("readme:gpu_decode_photos", gpu_decode_photos, cap(90), 10),
            Section("torchrun", torchrun_section, cap(150), 30),
            Section("compile", compile_section, cap(240), 40),
            Section("knn", knn_section, cap(90), 10),
            Section("sinkhorn", sinkhorn_section, cap(150), 15)]
    if check.quick:  # a first compilation takes a minute or two: the short run gives it only what is left at the end
        out.append(out.pop(next(i for i, s in enumerate(out) if s.name == "compile")))
    return out


def selected(name: str, only: list[str] | None, skip: list[str] | None) -> bool:
    """``--only`` / ``--skip`` by name or prefix (``method`` matches every ``method:*``)."""
    def match(words: list[str]) -> bool:
        return any(name == w or name.startswith(w.rstrip(":") + ":") for w in words)

    return (not only or match(only)) and not (skip and match(skip))


def run_sections(check: Check, sections: list[Section], only: list[str] | None = None,
                 skip: list[str] | None = None) -> None:
    """Each section in its own try/except under its cap; the results file is rewritten after each."""
    for i, section in enumerate(sections):
        if not selected(section.name, only, skip):
            check.record(section.name, {"status": "skipped", "note": "not selected (--only / --skip)"})
            continue
        reserve = sum(s.minimum for s in sections[i + 1:] if selected(s.name, only, skip))
        cap = min(section.cap, check.remaining() - reserve)
        if cap < section.minimum:
            check.record(section.name, {"status": "skipped", "note": f"no time left in the budget ({cap:.0f} s for "
                                        f"a section that needs {section.minimum:.0f} s)"})
            continue
        print(f"[gpu_check] {section.name} (cap {cap:.0f} s) ...", flush=True)
        check.record(section.name, {"status": "running", "cap_s": round(cap)})
        start = time.monotonic()
        record: dict[str, Any]
        try:
            with time_cap(cap), check.log(section.name):
                figures = section.run(check, cap)
            record = {"status": "ok", **figures}
        except SectionTimeout as error:
            record = {"status": "timeout", "error": str(error)}
        except Exception as error:  # noqa: BLE001 - one broken section must not stop the others
            record = {"status": "failed", "error": f"{type(error).__name__}: {str(error).strip()[:500]}"}
            with open(check.out / "logs" / f"{section.name.replace(':', '_')}.log", "a") as handle:
                handle.write(traceback.format_exc())
        finally:
            release_memory()
        record["seconds"] = round(time.monotonic() - start, 1)
        record.pop("peak_bytes", None)
        record = {k: v for k, v in record.items() if not (isinstance(v, float) and not math.isfinite(v))}
        check.record(section.name, record)
        print(f"[gpu_check] {section.name}: {record['status']} in {record['seconds']} s "
              f"{record.get('error') or record.get('note') or ''}".rstrip(), flush=True)


# ------------------------------------------------------------------------------------------------ tables

FIGURE_KEYS = ("images_per_s", "minutes_per_200_epochs_50k", "step_ms", "loss", "peak_mem_mib", "host_peak_rss_mib",
               "first_step_s", "compile_s", "speedup", "world_size", "rows", "queries", "clusters", "iterations",
               "run_s", "peak_gib", "estimated_full_s", "vs_on_device_data")


def show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    lines = [f"# gpu_check on {env['device']} ({env['device_type']}, torch {env['torch']})", "",
             f"{'quick' if results['quick'] else 'full'} run, {results['elapsed_s']} s of a {results['budget_s']} s "
             f"budget{'' if results['finished'] else ' (not finished)'}", "",
             "| section | status | s | figures | note |", "|---|---|---|---|---|"]
    for name, r in results["sections"].items():
        figures = ", ".join(f"{k} {show(r[k])}" for k in FIGURE_KEYS if k in r)
        checks = r.get("checks")
        if checks:
            figures += (", " if figures else "") + ", ".join(f"{k} {v}" for k, v in checks.items())
        note = str(r.get("error") or r.get("note") or "").replace("|", "/").replace("\n", " ")
        lines.append(f"| {name} | {r['status']} | {show(r.get('seconds', ''))} | {figures} | {note} |")
    lines += ["", readme_table(results)]
    return "\n".join(lines)


README_ROWS = {"readme:moco_r18_b512": "MoCo-v2", "readme:byol_r18_b512": "BYOL-asym", "readme:moco_r50_224": "MoCo-v2",
               "readme:byol_r50_224": "BYOL-asym", "readme:two_stage_photos": "MoCo-v2",
               "readme:gpu_decode_photos": "MoCo-v2", "compile": "MoCo-v2"}


def readme_table(results: dict[str, Any]) -> str:
    """The README's GPU table: one row per figure that ran (bf16, channels_last, images/s after the warm-up)."""
    env, sections = results["environment"], results["sections"]
    lines = [f"README GPU table ({env['device']}, torch {env['torch']}, bf16 + channels_last, "
             "`python benchmarks/gpu_check.py`):", "",
             "| run | images/s | minutes per 200 epochs of 50k images | peak memory (GiB) |", "|---|---|---|---|"]
    for name, method in README_ROWS.items():
        r = sections.get(name, {})
        if r.get("status") != "ok":
            continue
        data = ("JPEG photos, nvjpeg decode on the GPU" if name == "readme:gpu_decode_photos" else
                "JPEG photos, two-stage data path" if name.endswith("photos") else "on-device augmentation")
        title = f"{method}, {r['backbone']}, {r['image_size']} px, batch {r['batch']}, {data}"
        if name == "compile":
            title += f", torch.compile (compiled in {show(r.get('compile_s', r['first_step_s']))} s)"
        minutes = r.get("minutes_per_200_epochs_50k", EPOCHS * EPOCH_IMAGES / r["images_per_s"] / 60)
        peak = show(r["peak_mem_mib"] / 1024) if "peak_mem_mib" in r else "—"
        lines.append(f"| {title} | {show(r['images_per_s'])} | {show(float(minutes))} | {peak} |")
    knn, sinkhorn = sections.get("knn", {}), sections.get("sinkhorn", {})
    if knn.get("status") == "ok":
        lines.append(f"| kNN (20-NN weighted + 1-NN), {knn['queries']:,} queries over {knn['rows']:,} x {knn['dim']} "
                     f"float32 | {show(knn['run_s'])} s | | {show(knn['peak_gib'])} |")
    if sinkhorn.get("status") == "ok":
        lines.append(f"| SeLa labels (P^λ, Sinkhorn-Knopp, argmax), {sinkhorn['rows']:,} x {sinkhorn['clusters']} "
                     f"float64, {sinkhorn['iterations']} iterations | {show(sinkhorn['run_s'])} s | | "
                     f"{show(sinkhorn['peak_gib'])} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ torchrun worker


def torchrun_worker(spec_path: str) -> None:
    """One rank of the torchrun section: MoCo through the Trainer, keys captured at every enqueue, then the checks."""
    import torch.distributed as dist

    from selfsup.data.loader import EpochSampler
    from selfsup.nn import distributed
    from selfsup.nn.memory import MemoryBank

    spec = json.loads(Path(spec_path).read_text())
    cfg = load_config(None, spec["words"])
    nccl = None
    if cfg.train.device.startswith("cuda") and int(os.environ.get("WORLD_SIZE", 1)) == 1:
        nccl = one_rank_nccl()
    trainer = Trainer(cfg)
    queue = getattr(trainer.method, "queue", None)
    if not isinstance(queue, MemoryBank):
        raise RuntimeError("MoCo has no `queue` MemoryBank any more: update gpu_check's torchrun section")
    captured: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    enqueue = queue.enqueue

    def capture(keys: torch.Tensor, ids: torch.Tensor | None = None, keep: torch.Tensor | None = None) -> int:
        if keep is not None:
            raise RuntimeError("MoCo now enqueues with a keep-mask: update gpu_check's torchrun checks")
        captured.append((keys.detach().float().clone(), None if ids is None else ids.detach().clone()))
        return enqueue(keys, ids)

    queue.enqueue = capture  # this instance only
    figures = timed_fit(trainer, spec["warmup"], spec["steps"])
    world, steps, batch = trainer.dist.world_size, trainer.step, cfg.train.batch_size
    rows = steps * batch
    if rows > queue.size or rows > len(trainer.train_set):
        raise ValueError(f"{rows} keys would wrap the queue or the epoch: lower the steps of the torchrun section")
    keys = torch.stack([k for k, _ in captured])  # (steps, local batch, dim)

    def in_rank_order(x: torch.Tensor) -> torch.Tensor:  # every rank's rows of each step, rank 0 first
        everything = distributed.gather(x.contiguous())  # (world·steps, local batch, ...)
        return everything.reshape(world, *x.shape).transpose(0, 1).reshape(rows, *x.shape[2:])

    reference = queue.bank.clone()
    if world > 1:
        dist.broadcast(reference, src=0)
    checks = {
        "queue_equals_gathered_keys": torch.equal(queue.bank[:rows], in_rank_order(keys)),
        "pointer_after_all_keys": int(queue.ptr) == rows % queue.size,
        "same_queue_on_every_rank": torch.equal(queue.bank, reference),
    }
    if queue.store_ids and all(i is not None for _, i in captured):  # the dataset indices ride with the keys
        sampler = EpochSampler(len(trainer.train_set), batch, seed=cfg.train.seed)  # the global batches, one rank
        sampler.set_epoch(0)
        order = torch.tensor([i for i, _ in list(sampler)[:rows]])
        ids = torch.stack([i for _, i in captured])
        checks["queue_ids_equal_gathered_ids"] = torch.equal(queue.ids[:rows], in_rank_order(ids))
        checks["ids_in_global_batch_order"] = torch.equal(queue.ids[:rows].cpu(), order)
    if nccl is not None:
        checks["nccl_one_rank_collectives"] = nccl
    flags = torch.tensor([float(v) for v in checks.values()], device=queue.bank.device)
    if world > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)  # a check holds only where it holds on every rank
    if trainer.is_main:
        backend = dist.get_backend() if dist.is_initialized() else "none (one process)"
        result = {**figures, "world_size": world, "backend": backend, "ddp": world > 1, **peak_mib(trainer.device),
                  "checks": dict(zip(checks, (bool(f) for f in flags.tolist()), strict=True))}
        Path(spec["result"]).write_text(json.dumps(result))
    distributed.shutdown()


def one_rank_nccl() -> bool:
    """All-gather and all-reduce in a one-rank NCCL group (what one GPU can check of NCCL), then tear it down."""
    import torch.distributed as dist

    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl")
    try:
        x = torch.arange(4.0, device="cuda")
        out = torch.empty(4, device="cuda")
        dist.all_gather_into_tensor(out, x)
        dist.all_reduce(x)
        torch.cuda.synchronize()
        return bool(torch.equal(out, x) and torch.equal(x, torch.arange(4.0, device="cuda")))
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the check; returns the results written to ``--out``/gpu_check.json."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for gpu_check.json, gpu_check.md and logs/")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu: the dry run at CPU sizes")
    parser.add_argument("--quick", action="store_true", help="fewer steps and smaller probes (< 3 minutes on a GPU)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole check (default 450, quick 165; CPU dry run 1800)")
    parser.add_argument("--only", nargs="+", help="run only these sections (names or prefixes: method, readme)")
    parser.add_argument("--skip", nargs="+", help="run all but these sections")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (train.threads)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # a torchrun rank of the torchrun section
    args = parser.parse_args(argv)
    if args.worker:
        torchrun_worker(args.worker)
        return {}
    if args.out is None:
        parser.error("--out DIR is required")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --device cpu --quick for the dry run at CPU sizes")
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = args.budget or (1800.0 if device.type == "cpu" else 165.0 if args.quick else 450.0)
    check = Check(args.out, device, args.quick, budget, args.threads)
    try:
        check.write()
        run_sections(check, sections_for(check), args.only, args.skip)
        check.results["finished"] = True
        check.results["elapsed_s"] = round(time.monotonic() - check.started, 1)
        check.write()
    finally:
        check.close()
    print(markdown(check.results), flush=True)
    return check.results


if __name__ == "__main__":
    main()
