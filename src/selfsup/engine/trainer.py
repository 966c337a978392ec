"""The one training loop. It knows devices, DDP, precision, schedules, logging and checkpoints, and
nothing about any method: a method is driven through ``training_step`` / ``on_after_step`` /
``on_epoch_start`` (see :mod:`selfsup.methods.base`).
"""

from __future__ import annotations

import copy
import json
import math
import platform
import random
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from selfsup.config import Config, ConfigError, check_choice, save_config
from selfsup.data.batch_augment import batch_transform_from_config
from selfsup.data.datasets import build_dataset
from selfsup.data.loader import EpochSampler, ImageTensorDataset, ViewDataset
from selfsup.engine.budget import TimeBudget, parse_duration
from selfsup.engine.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from selfsup.engine.schedules import lr_at_epoch, lr_at_step, lr_scaling_in_effect, lr_scaling_rule, scaled_lr
from selfsup.eval.features import check_pool_grid
from selfsup.eval.protocols import evaluate_backbone, format_scores
from selfsup.methods import DataInfo, Method, build_method
from selfsup.nn import distributed

CHECKPOINT_FORMAT = 1


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


class NonFiniteLossError(RuntimeError):
    pass


class Preempted(RuntimeError):
    """SIGTERM/SIGUSR1 (e.g. Slurm pre-emption) arrived: the checkpoint was written and the run stopped."""


PREEMPTION_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))


class Trainer:
    """Builds data, method and optimiser from a :class:`Config`; :meth:`fit` trains and evaluates."""

    def __init__(self, cfg: Config, *, resume: str | Path | None = None):
        self.cfg = cfg
        t = cfg.train
        check_choice("train.precision", t.precision, ("auto", "bf16", "fp32"))
        check_choice("optim.name", cfg.optim.name, ("sgd", "adamw"))
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

        # data
        self.train_set = build_dataset(cfg.data, cfg.data.train_split)
        seed_everything(t.seed)  # the same initial weights (and random-init baseline) on every start
        self.method: Method = build_method(cfg, DataInfo(len(self.train_set), self.train_set.num_classes))
        self.initial_backbone = copy.deepcopy(self.method.backbone.state_dict())
        check_pool_grid(self.method.backbone, cfg.eval.pool_grid)  # now, not after a day of training
        self.sampler = EpochSampler(len(self.train_set), self.batch_per_rank, seed=t.seed, rank=self.dist.rank,
                                    world_size=self.dist.world_size, drop_last=t.drop_last)
        check_choice("data.augment", cfg.data.augment, ("per_sample", "batch"))
        self.batch_views: list[torch.nn.Module] = []
        if cfg.data.augment == "batch":
            if type(self.method).build_views is not Method.build_views:
                raise ConfigError(f"method {cfg.method.name!r} builds its own multi-crop views, which only "
                                  "data.augment=per_sample supports")
            self.batch_views = [batch_transform_from_config(cfg.data, name).to(device) for name in self.method.views]
            dataset: torch.utils.data.Dataset = ImageTensorDataset(self.train_set)
        else:
            dataset = ViewDataset(self.train_set, self.method.build_views(cfg.data))
        self.loader = DataLoader(
            dataset, batch_size=self.batch_per_rank, sampler=self.sampler,
            num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
            persistent_workers=cfg.data.num_workers > 0, drop_last=False,
            # its own generator: starting an epoch's iterator must not draw from the global RNG, which the
            # model's own randomness (dropout, drop-path) uses and a resume restores
            generator=torch.Generator().manual_seed(t.seed),
        )
        self.steps_per_epoch = self.sampler.batches_per_epoch
        self.total_steps = t.epochs * self.steps_per_epoch  # with a time budget: re-planned as training runs
        self.budget_seconds = parse_duration(t.time_budget) if t.time_budget else None
        self.budget: TimeBudget | None = None  # the clock starts in fit()
        self._seconds_done = 0.0  # training time of the run before a resume

        # model, precision, optimiser, schedule
        self.channels_last = t.channels_last if t.channels_last is not None else device.type == "cuda"
        self.method.to(device)
        if t.sync_bn and self.dist.world_size > 1:  # before DDP wraps it; one process has nothing to synchronise
            self.method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.method)
        if self.channels_last:
            self.method.to(memory_format=torch.channels_last)
        use_bf16 = t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda")
        self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext
        self.optimizer = self._optimizer()
        self.base_lr = scaled_lr(cfg.optim, t.batch_size)
        self.model: torch.nn.Module = self.method
        if self.dist.world_size > 1:
            self.model = DistributedDataParallel(
                self.method, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
            )
        if t.compile:
            self.model = torch.compile(self.model)

        self.epoch = 0
        self.step = 0  # optimiser steps done
        self.step_in_epoch = 0
        self._saved_at = (-1, -1)
        self.step_callbacks: list[Callable[[Trainer], None]] = []  # called after every step (benchmarks)
        self.preemption_signals = PREEMPTION_SIGNALS  # a launcher may add its own (submitit's USR2)
        self.run_dir = self._run_dir()
        self.checkpoint_path = self.run_dir / CHECKPOINT_NAME
        resume = resume or t.resume
        if resume == "auto":
            resume = self.checkpoint_path if self.checkpoint_path.is_file() else None
        if resume:
            self.load(resume)

    # ------------------------------------------------------------------ construction helpers

    def _optimizer(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        groups = self.method.parameter_groups()
        fused = {"fused": True} if self.device.type == "cuda" else {}
        if o.name == "sgd":
            return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                                   nesterov=o.nesterov, **fused)
        return torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay, **fused)

    def _run_dir(self) -> Path:
        t = self.cfg.train
        name = self.cfg.run_name()
        if self.dist.world_size > 1:  # every rank must agree on rank 0's timestamp
            holder = [name]
            dist.broadcast_object_list(holder, src=0)
            name = holder[0]
        run_dir = Path(t.output_dir) / name
        if self.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, run_dir / "config.yaml")
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
        if torch.cuda.is_available():
            state["rng_cuda"] = torch.cuda.get_rng_state_all()
        if self.budget is not None:
            state["train_seconds"] = self.budget.elapsed()
        return state

    def save(self) -> None:
        """Write the checkpoint (rank 0) unless it already holds this position."""
        position = (self.epoch, self.step)
        if self.is_main and self._saved_at != position:
            save_checkpoint(self.state_dict(), self.checkpoint_path)
        self._saved_at = position

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
        if self.budget_seconds is not None:
            self.total_steps = int(state.get("total_steps", self.total_steps))
            self._seconds_done = float(state.get("train_seconds", 0.0))
        torch.set_rng_state(state["rng_cpu"])
        if "rng_cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        if self.is_main:
            print(f"resumed from {path} at epoch {self.epoch}, step {self.step}", flush=True)

    # ------------------------------------------------------------------ the loop

    def log(self, record: dict[str, Any]) -> None:
        if self.is_main:
            with open(self.run_dir / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")

    def _to_device(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        def move(view: torch.Tensor) -> torch.Tensor:  # images (4-d) in the model's layout; flags as they are
            layout = torch.channels_last if self.channels_last and view.dim() == 4 else torch.preserve_format
            return view.to(self.device, non_blocking=True, memory_format=layout)

        return [move(v) for v in views]

    def current_lr(self) -> float:
        if self.budget is None:
            return lr_at_step(self.cfg.optim, self.base_lr, self.step, self.steps_per_epoch, self.cfg.train.epochs)
        # planned over the budget, per step, reaching the schedule's final value on the last planned step
        last = max(self.total_steps - 1, 1) / self.steps_per_epoch
        return lr_at_epoch(self.cfg.optim, self.base_lr, min(self.step / self.steps_per_epoch, last), last)

    def current_weight_decay(self) -> float:
        """``optim.weight_decay``, or its cosine to ``optim.weight_decay_end`` over training (DINO/Mugs)."""
        o = self.cfg.optim
        if o.weight_decay_end is None:
            return o.weight_decay
        progress = min(self.step / max(self.total_steps - 1, 1), 1.0)
        return o.weight_decay_end + (o.weight_decay - o.weight_decay_end) * 0.5 * (1 + math.cos(math.pi * progress))

    def _augment_on_device(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``data.augment=batch``: every view of the whole batch in a few tensor ops on the training device,
        with a generator seeded by (run seed, rank, step) so a resumed run draws the same views."""
        if images.dim() != 4:
            raise ConfigError("data.augment=batch needs images of one size (in-memory data sets such as digits, "
                              "fashion-mnist, cifar, stl10); use data.augment=per_sample")
        images = images.to(self.device, non_blocking=True)
        generator = torch.Generator(device=self.device)
        generator.manual_seed((self.cfg.train.seed * 1_000_003 + self.dist.rank) * 1_000_000_007 + self.step)
        return [augment(images, generator) for augment in self.batch_views]

    def train_step(self, views: list[torch.Tensor], indices: torch.Tensor, labels: torch.Tensor):
        lr = self.current_lr()
        weight_decay = self.current_weight_decay()
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
            if group.get("weight_decay", 0.0) > 0 or group.get("scheduled_decay", False):
                group["weight_decay"] = weight_decay  # groups a method exempts (weight_decay 0) stay at 0
                group["scheduled_decay"] = True
        if self.batch_views:
            views = self._augment_on_device(views)
        with self.autocast():
            out = self.model(self._to_device(views), indices.to(self.device, non_blocking=True),
                             labels.to(self.device, non_blocking=True))  # a blocking copy would wait for the GPU
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        self.method.on_before_optimizer_step()
        self.optimizer.step()
        self.step += 1
        self.step_in_epoch += 1
        if self.budget is not None:
            self.total_steps = self.budget.plan(self.step, self.total_steps)
        self.method.on_after_step(min(self.step / max(self.total_steps, 1), 1.0))
        return out, lr

    def _check_finite(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss).all():
            raise NonFiniteLossError(
                f"the loss became {loss.item()} at step {self.step} (epoch {self.epoch}); the last good "
                f"checkpoint is kept at {self.checkpoint_path}. Lower optim.lr or check the data."
            )

    def fit(self) -> dict[str, float]:
        """Train to the end (or the time budget), then evaluate. A pre-emption signal saves and raises
        :class:`Preempted`; the same command with ``train.resume=auto`` (or ``--resume RUN``) continues."""
        previous = self._catch_preemption()
        try:
            return self._fit()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _catch_preemption(self) -> dict:
        self._signal: int | None = None
        if threading.current_thread() is not threading.main_thread():
            return {}

        def note(signum, frame):  # only a flag here: the loop saves at the next step boundary
            self._signal = signum

        return {signum: signal.signal(signum, note) for signum in self.preemption_signals}

    def _preempted(self) -> bool:
        flag = torch.tensor(float(self._signal is not None), device=self.device)
        return bool(distributed.all_reduce_mean(flag) > 0)  # every rank stops at the same step

    def _fit(self) -> dict[str, float]:
        t = self.cfg.train
        if self.is_main:
            print(f"run folder: {self.run_dir}\n{self._summary()}\n{format_config(self.cfg)}", flush=True)
        o = self.cfg.optim
        self.log({"lr_scaling": lr_scaling_in_effect(o), "optim_lr": o.lr,
                  "reference_batch_size": o.reference_batch_size, "batch_size": t.batch_size, "base_lr": self.base_lr})
        if self.budget_seconds is not None:
            self.budget = TimeBudget(self.budget_seconds, elapsed=self._seconds_done)
        last_save = time.monotonic()
        stop = False
        while (self.budget_seconds is not None or self.epoch < t.epochs) and not stop:
            self.method.train()
            self.method.on_epoch_start(self.epoch, self.loader)
            self.sampler.set_epoch(self.epoch, self.step_in_epoch)
            epoch_start, seen, loss_sum = time.monotonic(), 0, torch.zeros((), device=self.device)
            log_sums: dict[str, torch.Tensor] = {}
            bar = tqdm(self.loader, total=self.steps_per_epoch, initial=self.step_in_epoch,
                       desc=f"epoch {self.epoch + 1}/{self.planned_epochs}", leave=False, dynamic_ncols=True,
                       disable=not (t.progress_bar and self.is_main), file=sys.stdout)
            for views, indices, labels in bar:
                out, lr = self.train_step(views, indices, labels)
                seen += indices.shape[0] * self.dist.world_size
                loss_sum += out.loss.detach().float()
                for key, value in out.logs.items():  # summed on the device: no host sync per step
                    log_sums[key] = log_sums.get(key, 0.0) + value.detach().float()
                if self.step % t.log_every_steps == 0 or self.device.type == "cpu":
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
                    self.save()
                    message = (f"stopped by signal {self._signal} at step {self.step}; checkpoint saved in "
                               f"{self.run_dir}. Resume with: selfsup train --resume {self.run_dir}")
                    self.log({"preempted_at_step": self.step})
                    if self.is_main:
                        print(message, file=sys.stderr, flush=True)
                    raise Preempted(message)
                if time.monotonic() - last_save > t.checkpoint_every_minutes * 60:
                    self.save()
                    last_save = time.monotonic()
            bar.close()
            if stop and self.step_in_epoch < self.steps_per_epoch:
                break  # mid-epoch stop: the checkpoint below resumes inside this epoch (a budget run is done)
            self.epoch += 1
            self.step_in_epoch = 0
            elapsed = time.monotonic() - epoch_start
            summary = {"epoch_end": self.epoch, "seconds": round(elapsed, 2),
                       "images_per_s": round(seen / max(elapsed, 1e-9), 1)}
            steps_done = self.steps_per_epoch - self.sampler.start_batch
            summary["loss_mean"] = float(distributed.all_reduce_mean(loss_sum)) / max(steps_done, 1)
            for key, total in log_sums.items():  # epoch means of what the method logs (e.g. purity)
                summary[f"{key}_mean"] = float(distributed.all_reduce_mean(total)) / max(steps_done, 1)
            if self.train_set.skipped:
                summary["skipped_images"] = self.train_set.skipped
            monitor = self.cfg.eval.monitor_every_epochs
            if monitor and self.epoch % monitor == 0 and self.is_main:
                summary.update(self.evaluate(["knn"], random_init=False, quiet=True)["trained"])
            self.log(summary)
            if self.is_main:
                scores = " ".join(f"{k}={v:.4g}" for k, v in summary.items() if k != "epoch_end")
                print(f"epoch {self.epoch}/{self.planned_epochs}: {scores}", flush=True)
            if self.epoch % t.checkpoint_every_epochs == 0 or self.epoch == self.planned_epochs:
                self.save()
                last_save = time.monotonic()
        self.save()
        if self.budget is not None:
            self.log({"budget_seconds": self.budget.seconds, "train_seconds": round(self.budget.elapsed(), 2),
                      "steps": self.step})
        results: dict[str, Any] = {}
        if self.cfg.eval.at_end and self.cfg.eval.protocols and self.is_main:
            results = self.evaluate(self.cfg.eval.protocols, random_init=self.cfg.eval.compare_random_init)
            with open(self.run_dir / "eval.json", "w") as handle:
                json.dump(results, handle, indent=2)
            print(format_scores(results), flush=True)
            print(f"run folder: {self.run_dir}", flush=True)
        return results

    @property
    def planned_epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)

    def evaluate(self, protocols: list[str], *, random_init: bool, quiet: bool = False) -> dict[str, dict]:
        """Scores of the trained backbone (and of the same backbone at its initial weights)."""
        results = {"trained": evaluate_backbone(self.method.backbone, self.cfg, self.device, protocols,
                                                progress=not quiet and self.cfg.train.progress_bar)}
        if random_init:
            initial = copy.deepcopy(self.method.backbone)
            initial.load_state_dict(self.initial_backbone)
            results["random_init"] = evaluate_backbone(initial, self.cfg, self.device, protocols,
                                                       progress=not quiet and self.cfg.train.progress_bar)
        return results

    def _summary(self) -> str:
        c = self.cfg
        params = sum(p.numel() for p in self.method.backbone.parameters())
        return (f"{c.method.name} | {c.model.backbone} ({params / 1e6:.2f}M params) | {c.data.name}: "
                f"{len(self.train_set)} images at {c.data.image_size}px, views {list(self.method.views)} | "
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

    return "\n".join(f"  {section}: " + " ".join(f"{k}={show(v)}" for k, v in values.items())
                     for section, values in cfg.to_dict().items())


def train(cfg: Config, resume: str | Path | None = None) -> dict[str, Any]:
    """Train (and evaluate) one run; the process group is torn down afterwards."""
    try:
        trainer = Trainer(cfg, resume=resume)
        return trainer.fit()
    finally:
        distributed.shutdown()

