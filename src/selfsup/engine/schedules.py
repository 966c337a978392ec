"""Learning-rate schedules, precomputed as one value per optimiser step (DINO style).

The seeds set the rate once per epoch: cosine ``lr·0.5(1+cos(π·e/E))`` with e the 0-indexed epoch
(identical to the UMBC ``(e−1)/E`` with 1-indexed epochs) and step ``lr·rate^{#milestones ≤ e}``.
``per_step`` evaluates the same curves at fractional epochs instead.
"""

from __future__ import annotations

import math

import numpy as np

from selfsup.config import OptimConfig, check_choice

SCHEDULES = ("cosine", "step", "constant")


def lr_at_epoch(cfg: OptimConfig, base_lr: float, epoch: float, total_epochs: float) -> float:
    """The rate at (possibly fractional) epoch ``epoch`` of ``total_epochs``, warm-up included."""
    warmup = cfg.warmup_epochs
    if warmup > 0 and epoch < warmup:
        return base_lr * epoch / warmup
    if cfg.schedule == "cosine":
        span = max(total_epochs - warmup, 1e-12)
        progress = min(max((epoch - warmup) / span, 0.0), 1.0)
        return cfg.min_lr + (base_lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
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


def lr_schedule(cfg: OptimConfig, base_lr: float, epochs: float, steps_per_epoch: int) -> np.ndarray:
    """One learning rate per step for ``epochs × steps_per_epoch`` steps."""
    check_choice("optim.schedule", cfg.schedule, SCHEDULES)
    total = int(round(epochs * steps_per_epoch))
    return np.array([lr_at_step(cfg, base_lr, s, steps_per_epoch, epochs) for s in range(total)], dtype=np.float64)


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
