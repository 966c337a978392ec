"""Momentum (EMA) teachers: θ_t ← m·θ_t + (1−m)·θ_o over parameter pairs (the momentum schedule is
:func:`selfsup.engine.schedules.momentum_at`)."""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_teacher(online: nn.Module) -> nn.Module:
    """A frozen copy of ``online``: same weights, no gradients (the EMA alone moves it)."""
    teacher = copy.deepcopy(online)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, online: nn.Module, momentum: float) -> None:
    """θ_teacher ← m·θ_teacher + (1−m)·θ_online for every parameter (buffers keep their own statistics).

    ``lerp`` is exact at both ends: m=1 leaves the teacher unchanged, m=0 copies the online weights.
    """
    t_params = list(teacher.parameters())
    o_params = list(online.parameters())
    if len(t_params) != len(o_params):
        raise ValueError(f"teacher has {len(t_params)} parameters, online network {len(o_params)}")
    torch._foreach_lerp_(t_params, [p.detach() for p in o_params], 1.0 - momentum)

