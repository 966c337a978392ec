"""The one training loop. It knows devices, DDP, precision, schedules, logging and checkpoints, and
nothing about any method: a method is driven through ``training_step`` and its hooks (see
:mod:`selfsup.methods.base`). Evaluation enters as a :class:`Callback` (``selfsup.eval.callback``).
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from selfsup.config import Config, ConfigError, check_choice, save_config
from selfsup.data.datasets import build_dataset
from selfsup.data.loader import EpochSampler, MultiView, ViewDataset
from selfsup.data.pipeline import TrainingViews, training_views
from selfsup.data.recipes import ViewLayout
from selfsup.data.transforms import transform_from_config
from selfsup.engine.budget import TimeBudget, parse_duration
from selfsup.engine.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from selfsup.engine.embedding import embed_shard
from selfsup.engine.monitors import neighbour_purity
from selfsup.engine.preflight import preflight
from selfsup.engine.run_folder import RunLock, check_run_name, remove_orphans, truncate_metrics
from selfsup.engine.schedules import (
    lr_at_planned_step,
    lr_at_step,
    lr_scaling_in_effect,
    lr_scaling_rule,
    scaled_lr,
    weight_decay_at,
)
from selfsup.methods import (
    Batch,
    Embedding,
    EmbedRequest,
    Method,
    ParamGroup,
    Progress,
    RunInfo,
    StepOutput,
    build_method,
)
from selfsup.models.backbones import backbone_factory
from selfsup.nn import distributed
from selfsup.nn.split_bn import apply_bn_splits, check_bn_splits
from selfsup.tracking import MultiTracker, build_trackers, write_environment

CHECKPOINT_FORMAT = 2  # 2: methods hold their online/target pair as ``net`` and memory banks store dataset indices


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available here; use train.device=cpu")
    return device


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name (``/proc/cpuinfo``; the architecture where there is none)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M) if cpuinfo.is_file() else None
    return found.group(1).strip() if found else platform.processor() or platform.machine()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def plan_run(cfg: Config, num_samples: int, num_classes: int | None) -> RunInfo:
    """The :class:`RunInfo` of a run of ``cfg`` on a training set of that size (before any time-budget re-plan)."""
    t = cfg.train
    full, rest = divmod(num_samples, t.batch_size)
    steps_per_epoch = full + (1 if rest and not t.drop_last else 0)
    return RunInfo(num_samples=num_samples, num_classes=num_classes or None, global_batch=t.batch_size,
                   steps_per_epoch=steps_per_epoch, total_steps=t.epochs * steps_per_epoch, seed=t.seed)


def method_for(cfg: Config, num_samples: int, num_classes: int | None) -> Method:
    """The method of ``cfg``, freshly built (seed the RNG first for the run's initial weights)."""
    return build_method(cfg.method, backbone_factory(cfg.model), plan_run(cfg, num_samples, num_classes))


class NonFiniteLossError(RuntimeError):
    pass


class Preempted(RuntimeError):
    """SIGTERM/SIGUSR1 (e.g. Slurm pre-emption) arrived: the checkpoint was written and the run stopped."""


PREEMPTION_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))


def ignore_preemption_signals(worker_id: int) -> None:
    """In a DataLoader worker: SIGTERM/SIGUSR1/SIGUSR2 sent to the whole process group (``scancel``, pre-emption) are
    for the main process, which checkpoints at the next step boundary and then shuts its workers down."""
    for name in ("SIGTERM", "SIGUSR1", "SIGUSR2"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


class Callback:
    """Hooks into a training run (evaluation, monitors, benchmarks). Every hook is optional."""

    def on_init(self, trainer: Trainer) -> None:
        """The trainer is built, before any resume or step: check what would otherwise fail after training."""

    def on_embedding(self, trainer: Trainer, embedding: Embedding) -> None:
        """The method has just received an embedding of the training set (e.g. SeLa relabelled)."""

    def on_epoch_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        """An epoch ended (rank 0 logs ``summary`` afterwards: add monitors to it)."""

    def on_train_end(self, trainer: Trainer) -> dict[str, Any] | None:
        """Training ended and the final checkpoint is written; the returned dict is merged into ``fit()``'s result."""
        return None


class Trainer:
    """Builds data, method and optimiser from a :class:`Config`; :meth:`fit` trains (and runs the callbacks).

    ``clock`` (seconds, monotonic) times the budget, the epochs and the checkpoint timer; tests inject one.
    """

    def __init__(self, cfg: Config, *, callbacks: Sequence[Callback] = (), resume: str | Path | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.cfg = cfg
        self.callbacks = list(callbacks)
        self.clock = clock
        self.step_callbacks: list[Callable[[Trainer], None]] = []  # called after every step (benchmarks)
        self.preemption_signals = PREEMPTION_SIGNALS  # a launcher may add its own (submitit's USR2)
        self.tracker: MultiTracker | None = None  # the tracking back ends, during fit() on rank 0
        self._setup_process()
        self._build_data()
        self._build_method()
        self._build_model()
        self.epoch = 0
        self.step = 0  # optimiser steps done
        self.step_in_epoch = 0
        self._saved_at = (-1, -1)
        self._epoch_sums: dict[str, float] = {}  # loss and log sums of the epoch so far (a mid-epoch checkpoint)
        self._last_loss: torch.Tensor | None = None
        self._running_sums: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None  # this epoch's, for a checkpoint
        self._signal: int | None = None
        # the finite-loss check's cadence: every step on CPU (free), every log_every_steps on GPU (a host sync)
        self.finite_check_every = 1 if self.device.type == "cpu" else cfg.train.log_every_steps
        self.lock: RunLock | None = None
        self.run_dir = self._run_dir()
        self.checkpoint_path = self.run_dir / CHECKPOINT_NAME
        try:
            for callback in self.callbacks:
                callback.on_init(self)
            self._start_or_resume(resume or cfg.train.resume)
        except BaseException:
            self.close()
            raise

    def _start_or_resume(self, resume: str | Path | None) -> None:
        """Resume from ``resume`` (a checkpoint, a run folder, or ``auto``: this run's checkpoint if any), or start
        afresh in a folder that holds no run; only then write the folder's config.yaml (a refused resume leaves it)."""
        if resume == "auto":
            resume = self.checkpoint_path if self.checkpoint_path.is_file() else None
        metrics = self.run_dir / "metrics.jsonl"
        if resume is None and self.is_main and self.checkpoint_path.is_file():
            state = load_checkpoint(self.checkpoint_path)
            raise ConfigError(
                f"run folder {self.run_dir} already holds a run (checkpoint at epoch {state.get('epoch')}, step "
                f"{state.get('step')}): continue it with train.resume=auto (or selfsup train --resume {self.run_dir}), "
                "or start a new one under another train.run_name")
        if resume:
            self.load(resume)
        if self.is_main:
            if resume:
                truncate_metrics(metrics, self.step, self.epoch)  # the records after the checkpoint come again
            else:
                metrics.unlink(missing_ok=True)  # a run that never checkpointed starts again from step 0
            save_config(self.cfg, self.run_dir / "config.yaml")

    def close(self) -> None:
        """Give the run folder up (the lock); :meth:`fit` does it when it ends."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # ------------------------------------------------------------------ construction

    def _setup_process(self) -> None:
        t = self.cfg.train
        check_choice("train.precision", t.precision, ("auto", "bf16", "fp32"))
        check_choice("optim.name", self.cfg.optim.name, ("sgd", "adamw"))
        device = resolve_device(t.device)
        self.dist = distributed.init_distributed(device.type)
        if device.type == "cuda" and self.dist.world_size > 1:
            device = torch.device("cuda", self.dist.local_rank)
        self.device = device
        if t.threads:
            torch.set_num_threads(t.threads)
        self.is_main = self.dist.is_main
        if t.batch_size % self.dist.world_size:
            raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by the {self.dist.world_size} "
                              "processes; it is the total batch over all of them")
        self.batch_per_rank = t.batch_size // self.dist.world_size
        if t.sync_bn and self.dist.world_size > 1 and device.type != "cuda":
            raise ConfigError(f"train.sync_bn=true needs CUDA: torch's SyncBatchNorm has no {device.type} path; keep "
                              "per-process BatchNorm there (MoCo/BYOL/ISD/MSF: method.shuffle_bn=true, the default)")

    def _build_data(self) -> None:
        cfg = self.cfg
        self.train_set = build_dataset(cfg.data, cfg.data.train_split)
        preflight(cfg, self.train_set)  # every check that needs the data, before anything is built or written
        targets = torch.as_tensor(np.asarray(self.train_set.targets), dtype=torch.long)
        # labels stay with the engine, for monitors only; None for an unlabelled training set
        self.targets = targets.to(self.device) if bool((targets >= 0).any()) else None
        self.sampler = self._sampler(seed=cfg.train.seed, drop_last=cfg.train.drop_last)
        check_choice("data.augment", cfg.data.augment, ("per_sample", "batch"))
        self.steps_per_epoch = self.sampler.batches_per_epoch
        self.total_steps = cfg.train.epochs * self.steps_per_epoch  # with a time budget: re-planned as training runs
        self.budget_seconds = parse_duration(cfg.train.time_budget) if cfg.train.time_budget else None
        self.budget: TimeBudget | None = None  # the clock starts in fit()
        self._seconds_done = 0.0  # training time of the run before a resume

    def _sampler(self, *, seed: int, drop_last: bool, shuffle: bool = True) -> EpochSampler:
        return EpochSampler(len(self.train_set), self.batch_per_rank, seed=seed, rank=self.dist.rank,
                            world_size=self.dist.world_size, drop_last=drop_last, shuffle=shuffle)

    def _loader(self, dataset: Dataset, sampler: EpochSampler, seed: int, collate: Callable | None = None
                ) -> DataLoader:
        return DataLoader(
            dataset, batch_size=self.batch_per_rank, sampler=sampler, num_workers=self.cfg.data.num_workers,
            collate_fn=collate,
            pin_memory=self.device.type == "cuda", persistent_workers=self.cfg.data.num_workers > 0, drop_last=False,
            # its own generator: starting an epoch's iterator must not draw from the global RNG, which the
            # model's own randomness (dropout, drop-path) uses and a resume restores
            generator=torch.Generator().manual_seed(seed),
            worker_init_fn=ignore_preemption_signals,  # the main process checkpoints; a worker must not die first
        )

    def _build_method(self) -> None:
        cfg = self.cfg
        seed_everything(cfg.train.seed)  # the same initial weights (and random-init baseline) on every start
        self.method: Method = method_for(cfg, len(self.train_set), self.train_set.num_classes)
        self.initial_backbone = copy.deepcopy(self.method.backbone.state_dict())
        self.pipeline = training_views(self.method.views, cfg.data, self.train_set, self.device).to(self.device)
        self.dataset: Dataset = self.pipeline.dataset
        self.loader = self._loader(self.dataset, self.sampler, cfg.train.seed, self.pipeline.collate)

    def _build_model(self) -> None:
        t = self.cfg.train
        self.channels_last = t.channels_last if t.channels_last is not None else self.device.type == "cuda"
        splits, micro = self.cfg.model.bn_splits, t.accumulate_steps
        if micro < 1 or self.batch_per_rank % micro:
            raise ConfigError(f"train.accumulate_steps={micro} must be at least 1 and divide the per-process batch "
                              f"({self.batch_per_rank} = train.batch_size / processes) into equal micro-batches")
        try:
            check_bn_splits(splits, t.batch_size // micro, self.dist.world_size, t.sync_bn)  # per micro-batch
            apply_bn_splits(self.method, splits)  # per-"GPU" statistics in every BatchNorm of the method
        except ValueError as error:
            raise ConfigError(str(error)) from None
        self.method.to(self.device)
        if t.sync_bn and self.dist.world_size > 1:  # before DDP wraps it; one process has nothing to synchronise
            self.method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.method)
        if self.channels_last:
            self.method.to(memory_format=torch.channels_last)
        use_bf16 = t.precision == "bf16" or (t.precision == "auto" and self.device.type == "cuda")
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext
        self.param_groups = self.method.parameter_groups()
        self.optimizer = self._optimizer(self.param_groups)
        self.base_lr = scaled_lr(self.cfg.optim, t.batch_size)
        self.model: torch.nn.Module = self.method
        self.ddp: DistributedDataParallel | None = None
        if self.dist.world_size > 1:
            self.ddp = DistributedDataParallel(
                self.method, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False)
            self.model = self.ddp
        if t.compile:
            self.model = torch.compile(self.model)

    def _optimizer(self, groups: list[ParamGroup]) -> torch.optim.Optimizer:
        o = self.cfg.optim
        params = [{"params": g.params, "weight_decay": o.weight_decay if g.weight_decay else 0.0} for g in groups]
        fused = {"fused": True} if self.device.type == "cuda" else {}
        if o.name == "sgd":
            return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, **fused)
        return torch.optim.AdamW(params, lr=o.lr, **fused)

    def _run_dir(self) -> Path:
        """The run folder, owned by this run (rank 0 holds its lock) and cleared of a killed run's temporary files."""
        t = self.cfg.train
        name = check_run_name(self.cfg.run_name())
        if self.dist.world_size > 1:  # every rank must agree on rank 0's timestamp
            holder = [name]
            dist.broadcast_object_list(holder, src=0)
            name = holder[0]
        run_dir = Path(t.output_dir) / name
        if self.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            self.lock = RunLock(run_dir)
            self.lock.acquire()
            remove_orphans(run_dir)
        return run_dir

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        state = {
            "format": CHECKPOINT_FORMAT,
            "config": self.cfg.to_dict(),
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "step_in_epoch": self.step_in_epoch,
            "total_steps": self.total_steps,
            "rng_cpu": torch.get_rng_state(),
        }
        if 0 < self.step_in_epoch < self.steps_per_epoch and self._running_sums is not None:
            loss_sum, log_sums = self._running_sums
            values = torch.stack([loss_sum, *log_sums.values()]).tolist()  # one transfer, at checkpoint time only
            state["epoch_sums"] = dict(zip(["loss", *log_sums], values, strict=True))
        if torch.cuda.is_available():
            state["rng_cuda"] = torch.cuda.get_rng_state_all()
        if self.budget is not None:
            state["train_seconds"] = self.budget.elapsed()
        return state

    def save(self) -> None:
        """Write the checkpoint (rank 0) unless it already holds this position, and never a non-finite one: the
        step's loss and every parameter and buffer are checked first, in one fused pass."""
        position = (self.epoch, self.step)
        if self._saved_at == position:
            return
        if not self._finite():
            raise NonFiniteLossError(f"the loss or the weights became non-finite by step {self.step} (epoch "
                                     f"{self.epoch}); {self._kept()}. Lower optim.lr or check the data.")
        if self.is_main:
            save_checkpoint(self.state_dict(), self.checkpoint_path)
        self._saved_at = position

    def _finite(self) -> bool:
        """Whether the last loss and all floating parameters and buffers are finite: one multi-tensor norm and one
        host read (the norm of a tensor holding a NaN or an infinity is not finite)."""
        tensors = [t.detach() for t in (*self.method.parameters(), *self.method.buffers()) if t.is_floating_point()]
        if self._last_loss is not None:
            tensors.append(self._last_loss.reshape(1))
        norms = [norm.float().reshape(1) for norm in torch._foreach_norm(tensors)] if tensors else []
        return bool(torch.isfinite(torch.cat(norms)).all()) if norms else True

    def _kept(self) -> str:
        if self.checkpoint_path.is_file():
            return f"the last good checkpoint is kept at {self.checkpoint_path}"
        return "no checkpoint had been written yet, so there is nothing to resume from"

    def load(self, path: str | Path) -> None:
        state = load_checkpoint(path, map_location="cpu")
        missing = [k for k in ("method", "optimizer", "epoch", "step") if k not in state]
        if missing:
            raise ConfigError(f"{path} is not a selfsup training checkpoint (missing {missing}); "
                              "use `selfsup eval` for backbone-only files")
        try:
            self.method.load_state_dict(state["method"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError) as error:
            first = str(error).strip().splitlines()
            raise ConfigError(
                f"{path} was written by a run with a different configuration ({first[-1].strip() if first else ''}); "
                "resume with `selfsup train --resume RUN`, which uses the run's saved config"
            ) from None
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self._saved_at = (self.epoch, self.step)
        self.step_in_epoch = int(state.get("step_in_epoch", 0))
        self._epoch_sums = {str(k): float(v) for k, v in state.get("epoch_sums", {}).items()} if self.step_in_epoch \
            else {}
        if self.budget_seconds is not None:
            self.total_steps = int(state.get("total_steps", self.total_steps))
            self._seconds_done = float(state.get("train_seconds", 0.0))
        torch.set_rng_state(state["rng_cpu"])
        if "rng_cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.say(f"resumed from {path} at epoch {self.epoch}, step {self.step}")

    # ------------------------------------------------------------------ one step

    def log(self, record: dict[str, Any]) -> None:
        """One record into ``metrics.jsonl`` (rank 0) and the numbers into the tracking back ends."""
        if self.is_main:
            with open(self.run_dir / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")
            if self.tracker is not None:
                values = {key: value for key, value in record.items() if key != "step"}
                self.tracker.log_scalars(int(record.get("step", self.step)), values)

    def say(self, message: str, *, error: bool = False) -> None:
        """Show ``message`` (rank 0; above the progress bar) and keep it in the run's ``train.log``."""
        if not self.is_main:
            return
        tqdm.write(message, file=sys.stderr if error else sys.stdout)
        with open(self.run_dir / "train.log", "a") as handle:
            handle.write(message + "\n")

    @property
    def progress(self) -> Progress:
        return Progress(self.step, self.total_steps, self.steps_per_epoch)

    def current_lr(self) -> float:
        if self.budget is None:
            return lr_at_step(self.cfg.optim, self.base_lr, self.step, self.steps_per_epoch, self.cfg.train.epochs)
        return lr_at_planned_step(self.cfg.optim, self.base_lr, self.step, self.steps_per_epoch, self.total_steps)

    def current_weight_decay(self) -> float:
        return weight_decay_at(self.cfg.optim, self.step, self.total_steps)

    def _to_device(self, images: torch.Tensor) -> torch.Tensor:
        """Images (4-d) in the model's memory layout; a non-blocking copy does not wait for the GPU."""
        layout = torch.channels_last if self.channels_last and images.dim() == 4 else torch.preserve_format
        return images.to(self.device, non_blocking=True, memory_format=layout)

    def _augment_on_device(self, views: Any, choices: dict | None = None) -> list[torch.Tensor]:
        """``data.augment=batch``: the device step of the data route (every op, or stage 2) for the whole batch,
        with a generator seeded by (run seed, rank, step) so a resumed run draws the same views."""
        generator = torch.Generator(device=self.device)
        generator.manual_seed((self.cfg.train.seed * 1_000_003 + self.dist.rank) * 1_000_000_007 + self.step)
        return self._complete(self.pipeline, views, choices or {}, generator)

    def _complete(self, pipeline: TrainingViews, views: Any, choices: dict, generator: torch.Generator
                  ) -> list[torch.Tensor]:
        """The views of a loader batch on the device: finished there by the route's device step (which takes the
        loader's tensors where they are), or moved there when they come ready."""
        if pipeline.device_step is not None:
            return pipeline.device_step(views, choices, generator)
        return [view.to(self.device, non_blocking=True) for view in views]

    def to_batch(self, sample: tuple) -> Batch:
        """A loader sample ``(views, choices, indices, labels)`` as the method's :class:`Batch` on the device (the
        labels stay behind: the engine reads them from the data set for its monitors)."""
        views, choices, indices, _ = sample
        if self.pipeline.device_step is not None:
            views = self._augment_on_device(views, choices)
        return Batch([self._to_device(v) for v in views], indices.to(self.device, non_blocking=True),
                     {name: value.to(self.device, non_blocking=True) for name, value in choices.items()})

    def _apply_schedules(self) -> float:
        lr, weight_decay = self.current_lr(), self.current_weight_decay()
        for options, group in zip(self.param_groups, self.optimizer.param_groups, strict=True):
            group["lr"] = lr * options.lr_scale
            group["weight_decay"] = weight_decay if options.weight_decay else 0.0
        return lr

    def train_step(self, batch: Batch) -> tuple[StepOutput, float]:
        self._embed_if_requested()
        self.method.on_step_start(self.progress)
        lr = self._apply_schedules()
        self.optimizer.zero_grad(set_to_none=True)
        out = self._forward_backward(batch)
        self.method.on_before_optimizer_step(self.progress)
        self.optimizer.step()
        self.step += 1
        self.step_in_epoch += 1
        if self.budget is not None:
            self.total_steps = self.budget.plan(self.step, self.total_steps)
        self.method.on_after_step(self.progress)
        self._log_reports()
        return out, lr

    def _forward_backward(self, batch: Batch) -> StepOutput:
        """Loss and gradients of one step's batch; with ``train.accumulate_steps=n`` in n micro-batches, each
        forward on its own (BatchNorm statistics, queue and memory-bank writes per micro-batch), each loss weighted
        by its share of the batch so the gradients are those of the batch's mean loss, DDP synchronising once."""
        parts = batch.split(self.cfg.train.accumulate_steps)
        weights = [len(part.indices) / len(batch.indices) for part in parts]
        outs = []
        for i, (part, weight) in enumerate(zip(parts, weights, strict=True)):
            last = i == len(parts) - 1
            with self.ddp.no_sync() if self.ddp is not None and not last else nullcontext():
                with self.autocast():
                    out = self.model(part)
                if out.neighbours is not None and self.targets is not None:
                    out.logs["purity"] = neighbour_purity(out.neighbours, part.indices, self.targets)
                (out.loss * weight if len(parts) > 1 else out.loss).backward()
            outs.append(out)
        if len(outs) == 1:
            return outs[0]
        loss = sum(w * o.loss.detach() for w, o in zip(weights, outs, strict=True))
        logs = {key: sum(w * o.logs[key].detach().float() for w, o in zip(weights, outs, strict=True))
                for key in outs[0].logs}
        return StepOutput(loss, logs)

    # ------------------------------------------------------------------ the embedding service

    def _embed_if_requested(self) -> None:
        request = self.method.embedding_request(self.progress)
        if request is None:
            return
        embedding = self.embed(request)
        self.method.on_embedding(embedding)
        self._log_reports()
        for callback in self.callbacks:
            callback.on_embedding(self, embedding)

    def embed(self, request: EmbedRequest) -> Embedding:
        """This process's shard of the training set, embedded as ``request`` asks (the training views are drawn
        from ``request.seed``: the same on every start; under ``data.augment=batch`` on the device)."""
        sampler = self._sampler(seed=request.seed, drop_last=False, shuffle=request.shuffle)
        if request.transform == "eval":
            eval_views = ViewDataset(self.train_set, MultiView([transform_from_config(self.cfg.data, "eval")]))
            pipeline = TrainingViews(eval_views, None, "per_sample")
        else:  # the method's first view, by the run's route
            first = ViewLayout(self.method.views.slots[:1])
            pipeline = training_views(first, self.cfg.data, self.train_set, self.device).to(self.device)

        def prepare(sample: tuple, generator: torch.Generator) -> torch.Tensor:
            return self._to_device(self._complete(pipeline, sample[0], sample[1], generator)[0])

        loader = self._loader(pipeline.dataset, sampler, request.seed, pipeline.collate)
        return embed_shard(request, loader, len(sampler), prepare, self.device)

    def _log_reports(self) -> None:
        for record in self.method.take_reports():
            self.log({"step": self.step, **record})
            self.say(f"{self.cfg.method.name}: " + " ".join(f"{k}={v}" for k, v in record.items()))

    # ------------------------------------------------------------------ the loop

    def _check_finite(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss).all():
            raise NonFiniteLossError(f"the loss became {loss.item()} at step {self.step} (epoch {self.epoch}); "
                                     f"{self._kept()}. Lower optim.lr or check the data.")

    def fit(self) -> dict[str, Any]:
        """Train to the end (or the time budget), then run the callbacks' ends (evaluation). A pre-emption signal
        saves and raises :class:`Preempted`; the same command with ``train.resume=auto`` (or ``--resume RUN``)
        continues."""
        previous = self._catch_preemption()
        try:
            if self.is_main:
                write_environment(self.run_dir)
                self.tracker = build_trackers(self.cfg.log.backends, self.run_dir, self.run_dir.name,
                                              self.cfg.to_dict())
            self._train()
            results: dict[str, Any] = {}
            for callback in self.callbacks:  # the signal handler stays: a signal here ends the run cleanly too
                results.update(callback.on_train_end(self) or {})
                if self.signalled:
                    message = (f"stopped by signal {self._signal} after training, in the final evaluation; the "
                               f"trained checkpoint is saved in {self.run_dir}. Evaluate it with: selfsup eval "
                               f"{self.run_dir}")
                    self.say(message, error=True)
                    raise Preempted(message)
            return results
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            if self.tracker is not None:
                self.tracker.close()
                self.tracker = None
            self.close()

    @property
    def signalled(self) -> bool:
        """Whether a pre-emption signal arrived (callbacks may stop early: :meth:`fit` then raises Preempted)."""
        return self._signal is not None

    def _catch_preemption(self) -> dict:
        self._signal = None
        if threading.current_thread() is not threading.main_thread():
            return {}

        def note(signum, frame):  # only a flag here: the loop saves at the next step boundary
            self._signal = signum

        return {signum: signal.signal(signum, note) for signum in self.preemption_signals}

    def _preempted(self) -> bool:
        flag = torch.tensor(float(self._signal is not None), device=self.device)
        return bool(distributed.all_reduce_mean(flag) > 0)  # every rank stops at the same step

    def _train(self) -> None:
        t = self.cfg.train
        self.say(f"run folder: {self.run_dir}\n{self._summary()}\n{format_config(self.cfg)}")
        o = self.cfg.optim
        self.log({"lr_scaling": lr_scaling_in_effect(o), "optim_lr": o.lr,
                  "reference_batch_size": o.reference_batch_size, "batch_size": t.batch_size, "base_lr": self.base_lr})
        if self.budget_seconds is not None:
            self.budget = TimeBudget(self.budget_seconds, elapsed=self._seconds_done, clock=self.clock)
        self._last_save = self.clock()
        while self.budget_seconds is not None or self.epoch < t.epochs:
            if self._run_epoch():
                break
        self.save()
        if self.budget is not None:
            self.log({"budget_seconds": self.budget.seconds, "train_seconds": round(self.budget.elapsed(), 2),
                      "steps": self.step})

    def _run_epoch(self) -> bool:
        """One epoch (or what is left of it after a resume); True when training is over (steps, budget)."""
        t = self.cfg.train
        self.method.train()
        self.sampler.set_epoch(self.epoch, self.step_in_epoch)
        # the sums of the epoch so far: restored from a mid-epoch checkpoint, so the epoch's means cover it whole
        restored, self._epoch_sums = self._epoch_sums, {}
        first_step = 0 if restored else self.step_in_epoch
        started, seen = self.clock(), 0
        loss_sum = torch.tensor(restored.get("loss", 0.0), device=self.device)
        log_sums = {key: torch.tensor(value, device=self.device) for key, value in restored.items() if key != "loss"}
        self._running_sums = (loss_sum, log_sums)  # what a mid-epoch checkpoint saves
        bar = tqdm(self.loader, total=self.steps_per_epoch, initial=self.step_in_epoch,
                   desc=f"epoch {self.epoch + 1}/{self.planned_epochs}", leave=False, dynamic_ncols=True,
                   disable=not (t.progress_bar and self.is_main), file=sys.stdout)
        stop = False
        for sample in bar:
            out, lr = self.train_step(self.to_batch(sample))
            seen += sample[2].shape[0] * self.dist.world_size
            self._last_loss = out.loss.detach()
            loss_sum += out.loss.detach().float()
            for key, value in out.logs.items():  # summed on the device: no host sync per step
                log_sums[key] = log_sums[key] + value.detach().float() if key in log_sums else value.detach().float()
            if self.step % self.finite_check_every == 0:
                self._check_finite(out.loss.detach())
            if self.step % t.log_every_steps == 0:
                record = {"step": self.step, "epoch": self.step / self.steps_per_epoch,
                          "loss": distributed.all_reduce_mean(out.loss.detach()).item(), "lr": lr}
                record.update({k: float(v) for k, v in out.logs.items()})
                self.log(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.3g}")
            for callback in self.step_callbacks:
                callback(self)
            if (t.max_steps is not None and self.step >= t.max_steps) or (
                    self.budget is not None and self.step >= self.total_steps):
                stop = True
                break
            if (self.device.type == "cpu" or self.step % t.log_every_steps == 0) and self._preempted():
                self._stop_for_signal()
            if self.clock() - self._last_save > t.checkpoint_every_minutes * 60:
                self.save()
                self._last_save = self.clock()
        bar.close()
        if stop and self.step_in_epoch < self.steps_per_epoch:
            return True  # mid-epoch stop: the final checkpoint resumes inside this epoch (a budget run is done)
        self._end_epoch(self.clock() - started, seen, loss_sum, log_sums, first_step)
        return stop

    def _stop_for_signal(self) -> None:
        self.save()
        message = (f"stopped by signal {self._signal} at step {self.step}; checkpoint saved in "
                   f"{self.run_dir}. Resume with: selfsup train --resume {self.run_dir}")
        self.log({"preempted_at_step": self.step})
        self.say(message, error=True)
        raise Preempted(message)

    def _end_epoch(self, elapsed: float, seen: int, loss_sum: torch.Tensor, log_sums: dict[str, torch.Tensor],
                   first_step: int) -> None:
        steps_done = self.steps_per_epoch - first_step  # all of them, unless resumed from an older checkpoint
        self.epoch += 1
        self.step_in_epoch = 0
        summary: dict[str, Any] = {"epoch_end": self.epoch, "seconds": round(elapsed, 2),
                                   "images_per_s": round(seen / max(elapsed, 1e-9), 1)}
        summary["loss_mean"] = float(distributed.all_reduce_mean(loss_sum)) / max(steps_done, 1)
        for key, total in log_sums.items():  # epoch means of what the method logs (e.g. purity)
            summary[f"{key}_mean"] = float(distributed.all_reduce_mean(total)) / max(steps_done, 1)
        if first_step:
            summary["partial_from_step"] = first_step  # the means cover the steps after a resume only
        if self.train_set.skipped:
            summary["skipped_images"] = self.train_set.skipped
        for callback in self.callbacks:
            callback.on_epoch_end(self, summary)
        self.log(summary)
        scores = " ".join(f"{k}={v:.4g}" for k, v in summary.items() if k != "epoch_end")
        self.say(f"epoch {self.epoch}/{self.planned_epochs}: {scores}")
        if self.epoch % self.cfg.train.checkpoint_every_epochs == 0 or self.epoch == self.planned_epochs:
            self.save()
            self._keep_epoch_checkpoint()
            self._last_save = self.clock()

    def _keep_epoch_checkpoint(self) -> None:
        """``train.keep_checkpoints=N``: a copy of this epoch's checkpoint (a hard link where the disk allows), and
        only the last N such copies."""
        keep = self.cfg.train.keep_checkpoints
        if keep <= 0 or not self.is_main or not self.checkpoint_path.is_file():
            return
        copy_path = self.run_dir / f"checkpoint-epoch{self.epoch}.pt"
        copy_path.unlink(missing_ok=True)
        try:
            os.link(self.checkpoint_path, copy_path)
        except OSError:
            shutil.copyfile(self.checkpoint_path, copy_path)
        kept = sorted(self.run_dir.glob("checkpoint-epoch*.pt"),
                      key=lambda path: int(path.stem.removeprefix("checkpoint-epoch")))
        for old in kept[:-keep]:
            old.unlink(missing_ok=True)

    @property
    def planned_epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)

    def initial_backbone_copy(self) -> torch.nn.Module:
        """The backbone at its initial (seeded, random) weights: the random-init baseline of every evaluation."""
        initial = copy.deepcopy(self.method.backbone)
        initial.load_state_dict(self.initial_backbone)
        return initial

    def _summary(self) -> str:
        c = self.cfg
        params = sum(p.numel() for p in self.method.backbone.parameters())
        return (f"{c.method.name} | {c.model.backbone} ({params / 1e6:.2f}M params) | {c.data.name}: "
                f"{len(self.train_set)} images at {c.data.image_size}px, views {self.method.views.describe()} "
                f"({self.pipeline.route}) | "
                f"batch {c.train.batch_size} on {self.dist.world_size} process(es), {self.device} | "
                f"{self._length()} | {lr_scaling_rule(c.optim, c.train.batch_size)}, {c.optim.schedule}")

    def _length(self) -> str:
        if self.budget_seconds is not None:
            return f"time budget {self.budget_seconds:g}s, {self.steps_per_epoch} steps/epoch"
        return f"{self.cfg.train.epochs} epochs x {self.steps_per_epoch} steps"


def format_config(cfg: Config) -> str:
    """The resolved configuration, one line per section (the full YAML is the run folder's config.yaml)."""
    def show(value: Any) -> str:
        return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)

    def line(values: Any) -> str:
        return " ".join(f"{k}={show(v)}" for k, v in values.items()) if isinstance(values, dict) else show(values)

    return "\n".join(f"  {section}: {line(values)}" for section, values in cfg.to_dict().items())

