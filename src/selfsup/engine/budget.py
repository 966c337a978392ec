"""Training to a wall-clock deadline: measure the step time, plan how many steps fit, re-plan as it goes."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from selfsup.config import ConfigError

_UNITS = {"s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_duration(text: str | float | int) -> float:
    """Seconds in ``"90s"``, ``"6m"``, ``"1.5h"`` or a bare number of seconds."""
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|m|min|h)?\s*", str(text))
        if not match:
            raise ConfigError(f"train.time_budget={text!r} is not a duration; write e.g. 90s, 6m or 1.5h")
        seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if seconds <= 0:
        raise ConfigError(f"train.time_budget must be positive, got {text!r}")
    return seconds


class TimeBudget:
    """Plans the total number of optimiser steps that end at ``seconds`` of training.

    The step time is measured from step ``warmup_steps`` on (the first steps pay start-up costs) and
    includes everything between steps — data, epoch-end checkpoints, monitors — so the plan converges on
    the real deadline. ``elapsed`` carries the time already spent by a resumed run. ``clock`` (seconds,
    monotonic) is injectable, so the planner is tested without depending on the machine's speed.
    """

    def __init__(self, seconds: float, *, warmup_steps: int = 3, elapsed: float = 0.0,
                 clock: Callable[[], float] = time.monotonic):
        self.seconds = seconds
        self.warmup_steps = warmup_steps
        self.clock = clock
        self._start = clock() - elapsed
        self._mark: tuple[int, float] | None = None

    def elapsed(self) -> float:
        return self.clock() - self._start

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside does not count (e.g. an evaluation in a time-to-accuracy benchmark)."""
        began = self.clock()
        try:
            yield
        finally:
            spent = self.clock() - began
            self._start += spent
            if self._mark is not None:
                self._mark = (self._mark[0], self._mark[1] + spent)

    def plan(self, step: int, current_plan: int) -> int:
        """Total steps that fit, given ``step`` steps done now (``current_plan`` until a rate is known)."""
        now = self.clock()
        remaining = self.seconds - (now - self._start)
        if remaining <= 0:
            return step
        if self._mark is None:
            if step >= self.warmup_steps:
                self._mark = (step, now)
            return max(current_plan, step + 1)
        mark_step, mark_time = self._mark
        if step <= mark_step:
            return max(current_plan, step + 1)
        seconds_per_step = (now - mark_time) / (step - mark_step)
        return step + int(remaining / seconds_per_step)
