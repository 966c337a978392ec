"""Every schedule of a run, as a function of the training position (step, epoch or progress in [0, 1]).

One cosine (:func:`cosine`) serves the learning rate, the weight decay (DINO/Mugs), the teacher momentum
(BYOL/DINO/Mugs) and anything else that ramps, so ``train.time_budget`` (which re-plans the total) and
resume are right for all of them.

Learning rate: the seeds set the rate once per epoch: cosine ``lr·0.5(1+cos(π·e/E))`` with e the 0-indexed
epoch (identical to the UMBC ``(e−1)/E`` with 1-indexed epochs) and step ``lr·rate^{#milestones ≤ e}``.
``per_step`` evaluates the same curves at fractional epochs instead.
"""

from __future__ import annotations

import math

import numpy as np

from selfsup.config import OptimConfig
from selfsup.errors import check_choice

SCHEDULES = ("cosine", "step", "constant")


def cosine(start: float, end: float, progress: float) -> float:
    """``end + (start − end)·(1 + cos(π·p))/2``: ``start`` at p = 0, ``end`` at p = 1 (p clipped to [0, 1])."""
    progress = min(max(progress, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_at_epoch(cfg: OptimConfig, base_lr: float, epoch: float, total_epochs: float) -> float:
    """The rate at (possibly fractional) epoch ``epoch`` of ``total_epochs``, warm-up included."""
    warmup = cfg.warmup_epochs
    if warmup > 0 and epoch < warmup:
        return base_lr * epoch / warmup
    if cfg.schedule == "cosine":
        span = max(total_epochs - warmup, 1e-12)
        return cosine(base_lr, cfg.min_lr, (epoch - warmup) / span)
    if cfg.schedule == "step":
        passed = sum(1 for milestone in cfg.lr_decay_epochs if milestone <= epoch)
        return base_lr * cfg.lr_decay_rate**passed
    return base_lr


def lr_at_step(cfg: OptimConfig, base_lr: float, step: int, steps_per_epoch: int, epochs: float) -> float:
    """The rate of optimiser step ``step`` (0-indexed); warm-up is always per step, as DINO/Mugs do."""
    position = step / steps_per_epoch
    if not cfg.per_step and position >= cfg.warmup_epochs:
        position = math.floor(position)
    return lr_at_epoch(cfg, base_lr, position, epochs)


def lr_at_planned_step(cfg: OptimConfig, base_lr: float, step: int, steps_per_epoch: int, total_steps: int) -> float:
    """The rate of step ``step`` when the run is planned as ``total_steps`` steps (a time budget): per step,
    reaching the schedule's final value on the last planned step."""
    last = max(total_steps - 1, 1) / steps_per_epoch
    return lr_at_epoch(cfg, base_lr, min(step / steps_per_epoch, last), last)


def lr_schedule(cfg: OptimConfig, base_lr: float, epochs: float, steps_per_epoch: int) -> np.ndarray:
    """One learning rate per step for ``epochs × steps_per_epoch`` steps."""
    check_choice("optim.schedule", cfg.schedule, SCHEDULES)
    total = int(round(epochs * steps_per_epoch))
    return np.array([lr_at_step(cfg, base_lr, s, steps_per_epoch, epochs) for s in range(total)], dtype=np.float64)


def weight_decay_at(cfg: OptimConfig, step: int, total_steps: int) -> float:
    """``optim.weight_decay``, or its cosine to ``optim.weight_decay_end`` over the planned steps (DINO/Mugs)."""
    if cfg.weight_decay_end is None:
        return cfg.weight_decay
    return cosine(cfg.weight_decay, cfg.weight_decay_end, step / max(total_steps - 1, 1))


def momentum_at(base: float, progress: float, final: float = 1.0) -> float:
    """BYOL/DINO teacher momentum: cosine from ``base`` at the start to ``final`` at the end of training."""
    return cosine(base, final, progress)


def warmup_then_constant(warmup_value: float, value: float, warmup_epochs: int, epoch: int) -> float:
    """DINO/Mugs teacher temperature: ``np.linspace(warmup_value, value, W)[epoch]`` for the first W epochs,
    then ``value``."""
    if epoch < warmup_epochs:
        return float(np.linspace(warmup_value, value, warmup_epochs)[epoch])
    return value


LR_SCALING = ("linear", "sqrt", "none")


def lr_scaling_in_effect(cfg: OptimConfig) -> str:
    """``optim.lr_scaling``, or "none" when no ``reference_batch_size`` is set (``lr`` is then used as given)."""
    check_choice("optim.lr_scaling", cfg.lr_scaling, LR_SCALING)
    return cfg.lr_scaling if cfg.reference_batch_size else "none"


def scaled_lr(cfg: OptimConfig, batch_size: int) -> float:
    """The peak rate for a total batch of ``batch_size``: ``lr`` is set for ``reference_batch_size`` and scales
    by ``optim.lr_scaling``: linear ``lr·B/ref`` (Goyal et al.), sqrt ``lr·sqrt(B/ref)``, or none."""
    if lr_scaling_in_effect(cfg) == "none":
        return cfg.lr
    ratio = batch_size / cfg.reference_batch_size
    return cfg.lr * (ratio if cfg.lr_scaling == "linear" else math.sqrt(ratio))


def lr_scaling_rule(cfg: OptimConfig, batch_size: int) -> str:
    """The rule in words, e.g. ``lr 0.002 x 16/256 (linear) = 0.000125``."""
    base = scaled_lr(cfg, batch_size)
    if lr_scaling_in_effect(cfg) == "none":
        return f"lr {base:g} (not scaled with the batch size)"
    ratio = f"{batch_size}/{cfg.reference_batch_size}"
    factor = ratio if cfg.lr_scaling == "linear" else f"sqrt({ratio})"
    return f"lr {cfg.lr:g} x {factor} ({cfg.lr_scaling}) = {base:g}"
