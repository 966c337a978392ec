"""Data-path throughput on real photos: the seeds' per-image torchvision pipelines (and ours), in images/s.

    python benchmarks/data_throughput.py                         # torchvision, 2x224 and mugs, workers 0 1 2
    python benchmarks/data_throughput.py --views 2x224 --workers 0 2 --batch 64 --device cuda
    python benchmarks/data_throughput.py --folder /datasets/imagenet/train --images 0    # any ImageFolder
    python benchmarks/data_throughput.py --profile --views 2x224   # where the per-image time goes (0 workers)

Photos: unless ``--folder`` names an ImageFolder (``<class>/*.jpg``, or a root holding ``train/<class>/``), the
benchmark builds once, under ``--cache`` (default ``runs/data_throughput_photos``), ``--images`` ImageNet-like
JPEGs (quality 90) from scikit-learn's two bundled sample photographs: random crops, random flips and rescales
to 250-500 px sides, in ``--classes`` class folders ``train/<class>/*.jpg`` (readable by torchvision's
ImageFolder and by selfsup's ``data.name=imagefolder``). A later call with the same ``--images``, ``--classes``
and ``--seed`` reuses it.

Pipelines (``--pipeline``): a pipeline is a Dataset for a torch DataLoader plus a function that turns one
loaded batch into the list of view tensors on ``--device`` (see :class:`Pipeline`; :data:`PIPELINES` holds the
builders, one small function each).

- ``torchvision``: the seeds' per-image PIL pipeline on ``torchvision.datasets.ImageFolder``. ``--views 2x224``:
  two MoCo-v2 / UMBC "aug+" views, built here from torchvision as the MoCo code builds them (RandomResizedCrop
  (224, scale (0.2, 1)), ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8, RandomGrayscale 0.2, PIL Gaussian blur with
  sigma ~ U(0.1, 2.0) p 0.5, horizontal flip, ToTensor, Normalize). ``--views mugs``: 4 global 224 + 10 local 96
  crops from selfsup's ``MugsViews(MultiCrop(...))``, which mirrors the official Mugs/DINO multi-crop code
  (torchvision + timm RandAugment). Its device function is the copy to the device.
- ``two_stage``: ours (``selfsup.data.pipeline``: stage 1 = decode + crop + flip to uint8 on the workers,
  stage 2 = colour, blur, normalisation batched on the device). A checkout without that module says so.

Measurement: each configuration (pipeline x views x workers) runs ``--warmup`` batches, then times ``--batches``
batches of ``--batch`` images (``drop_last``; epochs repeat as needed; workers persistent). ``stage1_s`` is the
mean wait for the next loader batch, ``stage2_s`` the mean time of the device function (CUDA synchronised).
One JSON line per configuration:

- ``images_per_s``: source images per second, ``batch * batches / (sum of stage1 + stage2 times)``;
- ``images_per_s_per_core``: ``images_per_s / max(workers, 1)``, i.e. per process that decodes and augments
  (the main process with 0 workers, the N workers otherwise; the main process's own share is not counted);
- ``cores_busy``: CPU seconds of the main process and its workers over the timed window divided by its wall
  time (Linux ``/proc``; null elsewhere), and ``images_per_cpu_s``: images per CPU second. On a machine shared
  with other jobs, workers may not get whole cores: ``images_per_cpu_s`` is then the steadier per-core figure;
- ``device`` (e.g. ``cpu``, ``cuda``) and ``device_name`` (the GPU's or CPU's model), ``cpu`` (the CPU model,
  ``device_name``), ``nproc``, ``torch_threads`` (of the main process) and ``load_avg_1m`` (the machine's load
  average after the run).

``--profile`` times, with 0 workers in this process (CPU time, ``time.process_time``), each step of the
``torchvision`` pipeline: decode (ImageFolder's loader: open + convert to RGB), every transform of every view
(summed over views), the collation and the device copy; one JSON line per step with ms per image and its share.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import shutil
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision import datasets
from torchvision import transforms as T

from selfsup.config import IMAGENET_MEAN, IMAGENET_STD
from selfsup.data import recipes as R
from selfsup.data.transforms import PerImageViews, RandomPILBlur
from selfsup.engine.trainer import device_name

VIEWS = ("2x224", "mugs")
PHOTO_SIDES = (250, 500)  # the sides of the generated photos, in pixels
PHOTO_FORMAT = 1  # bump when the generated photos change, so old caches are not reused


class PipelineUnavailable(RuntimeError):
    """A pipeline this checkout cannot build."""


# ---------------------------------------------------------------------------------------------
# photos


def build_photo_folder(cache: Path, images: int, classes: int = 10, seed: int = 0) -> Path:
    """``cache/<images>x<classes>-seed<seed>/train``, generated once: ImageNet-like JPEGs from scikit-learn's sample
    photographs (random crop, flip, rescale to 250-500 px sides, quality 90), image ``i`` in class ``i % classes``."""
    if images < classes or classes < 1:
        raise SystemExit(f"--images ({images}) must be at least --classes ({classes}), which must be positive")
    root = cache / f"{images}x{classes}-seed{seed}"
    manifest = {"images": images, "classes": classes, "seed": seed, "format": PHOTO_FORMAT}
    done = root / "manifest.json"
    if done.is_file() and json.loads(done.read_text()) == manifest:
        return root / "train"
    from sklearn.datasets import load_sample_images  # bundled with scikit-learn: nothing is downloaded

    sources = [Image.fromarray(array) for array in load_sample_images().images]
    rng = np.random.default_rng(seed)
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for c in range(classes):
        (partial / "train" / f"class_{c:02d}").mkdir(parents=True)
    for i in range(images):
        source = sources[int(rng.integers(len(sources)))]
        width, height = (int(s) for s in rng.integers(PHOTO_SIDES[0], PHOTO_SIDES[1] + 1, size=2))
        # a crop of the target's aspect ratio, 40-100 % of the largest that fits, resized to the target sides
        largest = min(source.width / width, source.height / height)
        zoom = largest * rng.uniform(0.4, 1.0)
        crop_w, crop_h = round(width * zoom), round(height * zoom)
        left = int(rng.integers(source.width - crop_w + 1))
        top = int(rng.integers(source.height - crop_h + 1))
        photo = source.resize((width, height), Image.Resampling.BICUBIC, box=(left, top, left + crop_w, top + crop_h))
        if rng.random() < 0.5:
            photo = photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        photo.save(partial / "train" / f"class_{i % classes:02d}" / f"{i:05d}.jpg", quality=90)
    (partial / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(root, ignore_errors=True)
    partial.rename(root)  # a build cut short is never mistaken for a finished one
    return root / "train"


def image_folder(path: Path) -> Path:
    """The class-folder directory of ``--folder``: the folder itself, or its ``train`` split."""
    if (path / "train").is_dir():
        path = path / "train"
    if not path.is_dir() or not any(p.is_dir() for p in path.iterdir()):
        raise SystemExit(f"--folder {path} is not an ImageFolder: expected {path}/<class>/*.jpg")
    return path


# ---------------------------------------------------------------------------------------------
# pipelines


@dataclass
class Options:
    """What every pipeline builder gets."""

    folder: Path
    views: str  # one of VIEWS
    size: int = 224  # global crop side
    local_size: int = 96  # local crop side (mugs)
    num_local: int = 10  # local crops (mugs)


@dataclass
class Pipeline:
    """A Dataset for the DataLoader and ``to_views(batch, device) -> [view tensors on the device]``."""

    dataset: Dataset
    to_views: Callable[[Any, torch.device], list[torch.Tensor]]
    collate_fn: Callable[[list], Any] = default_collate
    # per-image transforms to instrument in --profile (name -> object holding T.Compose pipelines)
    profiled: dict[str, Any] = field(default_factory=dict)


PipelineBuilder = Callable[[Options], Pipeline]
PIPELINES: dict[str, PipelineBuilder] = {}


def register_pipeline(name: str) -> Callable[[PipelineBuilder], PipelineBuilder]:
    def decorate(builder: PipelineBuilder) -> PipelineBuilder:
        PIPELINES[name] = builder
        return builder

    return decorate


class TwoViews:
    """``image -> [transform(image), transform(image)]`` (MoCo's TwoCropsTransform)."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        return [self.transform(image), self.transform(image)]


def moco_aug_plus(size: int) -> T.Compose:
    """MoCo-v2's aug+ as main_moco.py builds it (blur: PIL ImageFilter, sigma ~ U(0.1, 2.0), p 0.5)."""
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.2, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        RandomPILBlur(0.5, 0.1, 2.0),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def copy_views(batch: Any, device: torch.device) -> list[torch.Tensor]:
    """The torchvision pipelines' device function: the views of a collated ``(views, label)`` batch, copied."""
    views = batch[0]
    if isinstance(views, (list, tuple)) and len(views) == 2 and isinstance(views[1], dict):  # MugsViews
        views = views[0]
    return [v.to(device, non_blocking=True) for v in views]


@register_pipeline("torchvision")
def torchvision_pipeline(options: Options) -> Pipeline:
    if options.views == "2x224":
        transform: Any = TwoViews(moco_aug_plus(options.size))
        profiled = {"aug+": transform.transform}
    else:  # the official multi-crop, per image: selfsup's PIL backend of the Mugs recipes (methods/mugs.py)
        layout = mugs_layout(options).resolved(options.size, (0.2, 1.0), True, True)
        transform = PerImageViews(layout, IMAGENET_MEAN, IMAGENET_STD)
        profiled = {f"slot {i}": [*default, *alternative] for i, (_, default, alternative, _) in
                    enumerate(transform.slots)}
    dataset = datasets.ImageFolder(str(options.folder), transform=transform)
    return Pipeline(dataset, copy_views, profiled=profiled)


def mugs_layout(options: Options) -> R.ViewLayout:
    """Mugs' views (4 global crops of ``size``, ``num_local`` local crops of ``local_size``) with its defaults."""
    from selfsup.methods.mugs import MugsConfig, mugs_views

    return mugs_views(MugsConfig(local_crop_size=options.local_size, local_crops_number=options.num_local))


class SeededKeys(Dataset):
    """A selfsup view data set (keyed by (index, seed), as the trainer's sampler yields) behind integer indices."""

    def __init__(self, views: Dataset):
        self.views = views

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, index: int) -> Any:
        return self.views[(index, 1_000_003 * index + 7)]


@register_pipeline("two_stage")
def two_stage_pipeline(options: Options) -> Pipeline:
    """Ours, as the trainer builds it for data.augment=batch: stage 1 (decode at reduced size where the crops allow,
    crop, flip, RandAugment, to uint8) on the workers, stage 2 batched per recipe on the device."""
    try:
        from selfsup.config import DataConfig
        from selfsup.data.datasets import build_dataset
        from selfsup.data.pipeline import training_views
    except ModuleNotFoundError:
        raise PipelineUnavailable(
            "pipeline 'two_stage' needs selfsup.data.pipeline (the two-stage data path of issue 15), which this "
            "checkout does not have yet; run --pipeline torchvision") from None
    folder = Path(options.folder)
    data = DataConfig(name="imagefolder", path=str(folder.parent), train_split=folder.name, image_size=options.size,
                      augment="batch", crop_scale=(0.2, 1.0), flip=True, blur=True)
    layout = R.ViewLayout.of("aug+", "aug+") if options.views == "2x224" else mugs_layout(options)
    route = training_views(layout, data, build_dataset(data, data.train_split))
    stage2 = route.device_step
    generator: dict[torch.device, torch.Generator] = {}

    def to_views(batch: Any, device: torch.device) -> list[torch.Tensor]:
        views, choices, _, _ = batch
        if device not in generator:
            stage2.to(device)
            generator[device] = torch.Generator(device=device).manual_seed(0)
        return stage2(views, choices, generator[device])

    return Pipeline(SeededKeys(route.dataset), to_views)


def build_pipeline(name: str, options: Options) -> Pipeline:
    if name not in PIPELINES:
        raise SystemExit(f"--pipeline {name!r} is not one of {sorted(PIPELINES)}")
    return PIPELINES[name](options)


# ---------------------------------------------------------------------------------------------
# measurement


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` (all its threads), from /proc; None where there is none."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def busy_seconds() -> float | None:
    """CPU seconds so far of this process and its live child processes (the DataLoader workers)."""
    total = cpu_seconds(os.getpid())
    for child in multiprocessing.active_children():
        seconds = cpu_seconds(child.pid)
        total = None if total is None or seconds is None else total + seconds
    return total


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def endless(loader: DataLoader) -> Iterator[Any]:
    """The loader's batches, epoch after epoch."""
    for _ in itertools.count():
        yield from loader


def measure(pipeline: Pipeline, workers: int, batch: int, warmup: int, batches: int,
            device: torch.device) -> dict[str, Any]:
    if len(pipeline.dataset) < batch:
        raise SystemExit(f"--batch {batch} is larger than the {len(pipeline.dataset)} images")
    loader = DataLoader(pipeline.dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                        collate_fn=pipeline.collate_fn, pin_memory=device.type == "cuda",
                        persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))
    stream = endless(loader)
    stage1, stage2, cpu1, cpu2 = [], [], [], []
    for i in range(warmup + batches):
        if i == warmup:
            began, busy_began = time.perf_counter(), busy_seconds()
        start, start_cpu = time.perf_counter(), time.process_time()
        loaded = next(stream)
        fetched, fetched_cpu = time.perf_counter(), time.process_time()
        views = pipeline.to_views(loaded, device)
        synchronize(device)
        if i >= warmup:
            stage1.append(fetched - start)
            stage2.append(time.perf_counter() - fetched)
            cpu1.append(fetched_cpu - start_cpu)
            cpu2.append(time.process_time() - fetched_cpu)
    wall = time.perf_counter() - began
    busy_end = busy_seconds()
    busy = None if busy_began is None or busy_end is None else busy_end - busy_began
    if not views or any(v.device.type != device.type or v.shape[0] != batch for v in views):
        raise RuntimeError(f"the pipeline gave views {[tuple(v.shape) for v in views]} on "
                           f"{[v.device for v in views]}, not {batch} images each on {device}")
    del stream, loader  # stops the workers
    images_per_s = batch * batches / (sum(stage1) + sum(stage2))
    return {"images_per_s": round(images_per_s, 2),
            "images_per_s_per_core": round(images_per_s / max(workers, 1), 2),
            "cores_busy": None if busy is None else round(busy / wall, 2),
            "images_per_cpu_s": None if not busy else round(batch * batches / busy, 2),
            "stage1_s": round(statistics.fmean(stage1), 5), "stage2_s": round(statistics.fmean(stage2), 5),
            # CPU time of this process per image (all its threads; with 0 workers stage 1 runs here too):
            # the loader's cost where stage 2 runs on an accelerator, and stage 2's where it runs on this CPU
            "stage1_cpu_ms_per_image": round(1e3 * sum(cpu1) / (batch * batches), 3) if workers == 0 else None,
            "stage2_cpu_ms_per_image": round(1e3 * sum(cpu2) / (batch * batches), 3),
            "num_views": len(views),
            "view_shapes": [list(shape) for shape in sorted({tuple(v.shape[1:]) for v in views})]}


# ---------------------------------------------------------------------------------------------
# profile


class StepTimer:
    """CPU seconds and calls per named step."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.process_time() - start

        return timed


def step_name(transform: Any) -> str:
    if isinstance(transform, T.RandomApply):
        return "RandomApply(" + "+".join(step_name(t) for t in transform.transforms) + ")"
    inner = getattr(transform, "transform", None)  # e.g. TorchSeeded(RandAugment)
    name = type(transform).__name__
    return f"{name}({type(inner).__name__})" if inner is not None else name


def instrument(pipeline: Pipeline, timer: StepTimer) -> None:
    """Time every step of the pipeline's per-image transforms and its image loader, in place."""
    for composes in pipeline.profiled.values():
        for compose in (composes if isinstance(composes, list) else [composes]):
            compose.transforms = [timer.wrap(step_name(t), t) for t in compose.transforms]
    dataset = pipeline.dataset
    if hasattr(dataset, "loader"):
        dataset.loader = timer.wrap("decode (open + convert RGB)", dataset.loader)


def profile(pipeline: Pipeline, batch: int, batches: int, device: torch.device) -> list[dict[str, Any]]:
    """Per-step CPU time of ``batches`` batches loaded in this process (0 workers)."""
    timer = StepTimer()
    instrument(pipeline, timer)
    collate = timer.wrap("collate", pipeline.collate_fn)
    to_device = timer.wrap("copy to device", lambda b: pipeline.to_views(b, device))
    order = torch.randperm(len(pipeline.dataset), generator=torch.Generator().manual_seed(0)).tolist()
    pipeline.dataset[order[-1]]  # warm-up: first calls load libraries and fill caches
    timer.seconds.clear()
    start = time.process_time()
    images = 0
    for b in range(batches):
        indices = [order[(b * batch + k) % len(order)] for k in range(batch)]
        to_device(collate([pipeline.dataset[i] for i in indices]))
        synchronize(device)
        images += batch
    total = time.process_time() - start
    rows = [{"step": name, "ms_per_image": round(1e3 * s / images, 3), "share": round(s / total, 3)}
            for name, s in sorted(timer.seconds.items(), key=lambda item: -item[1])]
    rest = total - sum(timer.seconds.values())
    rows.append({"step": "other (Compose, dataset, loop)", "ms_per_image": round(1e3 * rest / images, 3),
                 "share": round(rest / total, 3)})
    rows.append({"step": "total", "ms_per_image": round(1e3 * total / images, 3), "share": 1.0,
                 "images_per_cpu_s": round(images / total, 2)})
    return rows


# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run every configuration; print and return one record each (one per step with --profile)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", nargs="+", default=["torchvision"])
    parser.add_argument("--views", nargs="+", default=list(VIEWS), choices=VIEWS)
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3, help="batches run before timing")
    parser.add_argument("--batches", type=int, default=10, help="batches timed")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--folder", type=Path, help="an ImageFolder to read instead of the generated photos")
    parser.add_argument("--cache", type=Path, default=Path("runs/data_throughput_photos"))
    parser.add_argument("--images", type=int, default=2000, help="photos to generate")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated photos")
    parser.add_argument("--size", type=int, default=224, help="global crop side")
    parser.add_argument("--local-size", type=int, default=96, help="local crop side (mugs)")
    parser.add_argument("--num-local", type=int, default=10, help="local crops (mugs)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads of the main process (default 1, as in a DataLoader worker; 0: "
                             "torch's default)")
    parser.add_argument("--profile", action="store_true", help="time each step of the torchvision pipeline")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    folder = image_folder(args.folder) if args.folder else build_photo_folder(args.cache, args.images,
                                                                              args.classes, args.seed)
    common = {"device": str(device), "device_name": device_name(device), "cpu": device_name(torch.device("cpu")),
              "nproc": os.cpu_count(),
              "torch_threads": torch.get_num_threads(), "folder": str(folder), "batch": args.batch}
    rows = []
    for name, views in itertools.product(args.pipeline, args.views):
        options = Options(folder, views, size=args.size, local_size=args.local_size, num_local=args.num_local)
        try:
            pipeline = build_pipeline(name, options)
        except PipelineUnavailable as error:
            raise SystemExit(f"error: {error}") from None
        if args.profile:
            for step in profile(pipeline, args.batch, args.batches, device):
                row = {"profile": name, "views": views, "workers": 0, **step, **common,
                       "load_avg_1m": round(os.getloadavg()[0], 2)}
                print(json.dumps(row), flush=True)
                rows.append(row)
            continue
        for workers in args.workers:
            row = {"pipeline": name, "views": views, "workers": workers, **common}
            row.update(measure(build_pipeline(name, options), workers, args.batch, args.warmup, args.batches,
                               device))
            row["load_avg_1m"] = round(os.getloadavg()[0], 2)
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


if __name__ == "__main__":
    main()
