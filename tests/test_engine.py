"""Schedules, atomic checkpoints, the sampler, and exact resume of a run."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_config
from selfsup.config import OptimConfig
from selfsup.data.loader import EpochSampler
from selfsup.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from selfsup.engine.schedules import lr_schedule
from selfsup.engine.trainer import Trainer


def test_cosine_per_epoch_matches_closed_form():
    lrs = lr_schedule(OptimConfig(lr=0.03, schedule="cosine"), 0.03, epochs=10, steps_per_epoch=3)
    assert len(lrs) == 30
    for step, lr in enumerate(lrs):
        epoch = step // 3
        assert lr == pytest.approx(0.03 * 0.5 * (1 + math.cos(math.pi * epoch / 10)))


def test_cosine_min_lr_and_per_step():
    cfg = OptimConfig(lr=1.0, schedule="cosine", min_lr=0.1, per_step=True)
    lrs = lr_schedule(cfg, 1.0, epochs=2, steps_per_epoch=4)
    assert lrs[0] == pytest.approx(1.0)
    assert lrs[4] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway
    assert all(a > b for a, b in zip(lrs[:-1], lrs[1:], strict=True))


def test_step_schedule_milestones_like_the_seeds():
    cfg = OptimConfig(lr=0.01, schedule="step", lr_decay_epochs=[140, 180], lr_decay_rate=0.2)
    lrs = lr_schedule(cfg, 0.01, epochs=200, steps_per_epoch=1)
    assert lrs[139] == pytest.approx(0.01) and lrs[140] == pytest.approx(0.002)
    assert lrs[179] == pytest.approx(0.002) and lrs[180] == pytest.approx(0.0004)


def test_linear_warmup_then_cosine():
    cfg = OptimConfig(lr=1.0, schedule="cosine", warmup_epochs=2)
    lrs = lr_schedule(cfg, 1.0, epochs=12, steps_per_epoch=4)
    assert lrs[0] == 0.0 and lrs[4] == pytest.approx(0.5) and lrs[8] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 9 / 10)))


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1  # the last good checkpoint survives
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary left behind


class _Arbitrary:
    pass


def test_checkpoint_needing_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"obj": _Arbitrary()}, path)
    with pytest.raises(CheckpointError, match="contains code"):
        load_checkpoint(path)
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing")


def test_sampler_shards_each_global_batch_and_resumes_mid_epoch():
    ranks = [EpochSampler(100, 8, seed=3, rank=r, world_size=2) for r in range(2)]
    for s in ranks:
        s.set_epoch(5)
    streams = [list(s) for s in ranks]
    assert all(len(x) == 6 * 8 for x in streams)  # 100 // 16 = 6 full global batches
    indices = [i for stream in streams for i, _ in stream]
    assert len(set(indices)) == len(indices)  # disjoint
    single = EpochSampler(100, 16, seed=3)
    single.set_epoch(5)
    whole = list(single)
    for b in range(6):  # rank 0 takes the first half of each global batch, rank 1 the second
        assert streams[0][b * 8:(b + 1) * 8] == whole[b * 16:b * 16 + 8]
        assert streams[1][b * 8:(b + 1) * 8] == whole[b * 16 + 8:(b + 1) * 16]
    single.set_epoch(5, start_batch=4)
    assert list(single) == whole[64:]
    single.set_epoch(6)
    assert list(single) != whole


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.method.state_dict().items()}


@pytest.mark.parametrize("method", ["moco", "byol"])
def test_resume_is_bit_identical(tmp_path, method):
    straight = Trainer(tiny_config(tmp_path / "a", method=method))
    straight.fit()
    assert straight.step == 16  # 2 epochs x (256 // 32)

    first = Trainer(tiny_config(tmp_path / "b", "train.max_steps=5", method=method))
    first.fit()
    assert (first.epoch, first.step, first.step_in_epoch) == (0, 5, 5)
    resumed = Trainer(tiny_config(tmp_path / "b", "train.resume=auto", method=method))
    assert resumed.step == 5
    resumed.fit()
    assert resumed.step == 16
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert torch.equal(straight.optimizer.state_dict()["state"][0]["momentum_buffer"],
                       resumed.optimizer.state_dict()["state"][0]["momentum_buffer"])


def test_duration_parsing():
    from selfsup.config import ConfigError
    from selfsup.engine.budget import parse_duration

    assert parse_duration("6m") == 360 and parse_duration("90s") == 90 and parse_duration("1.5h") == 5400
    assert parse_duration("45") == 45
    with pytest.raises(ConfigError, match="6m"):
        parse_duration("six minutes")


def test_last_planned_step_reaches_the_final_value():
    from selfsup.engine.schedules import lr_at_epoch

    cfg = OptimConfig(lr=0.5, schedule="cosine", min_lr=0.01)
    assert lr_at_epoch(cfg, 0.5, 3.0, 3.0) == pytest.approx(0.01)
    assert lr_at_epoch(cfg, 0.5, 0.0, 3.0) == pytest.approx(0.5)


class StepClock:
    """A clock that advances by ``seconds_per_step`` after every optimiser step (a step callback) and by
    ``seconds_per_epoch`` at every epoch end (e.g. a checkpoint), whatever the machine's speed."""

    def __init__(self, seconds_per_step: float, seconds_per_epoch: float = 0.0):
        self.now, self.seconds_per_step, self.seconds_per_epoch = 1000.0, seconds_per_step, seconds_per_epoch

    def __call__(self) -> float:
        return self.now

    def after_step(self, trainer: Trainer) -> None:
        self.now += self.seconds_per_step
        if trainer.step_in_epoch == trainer.steps_per_epoch:
            self.now += self.seconds_per_epoch


def test_time_budget_run_ends_at_the_deadline_with_the_final_lr(tmp_path):
    """A 6 s budget on an injected clock (0.2 s a step, 0.1 s more at each epoch end): the planner re-plans from the
    measured step times and stops within one step of the deadline, on the last planned step."""
    import json

    budget, clock = 6.0, StepClock(0.2, 0.1)
    trainer = Trainer(tiny_config(tmp_path, f"train.time_budget={budget}s", "optim.min_lr=0.001"), clock=clock)
    trainer.step_callbacks.append(clock.after_step)
    trainer.fit()
    seconds = trainer.budget.elapsed()
    assert abs(seconds - budget) <= 0.2 + 0.1, seconds
    assert trainer.step == trainer.total_steps and trainer.step > trainer.steps_per_epoch  # several epochs
    records = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if "lr" in r]
    assert lrs[0] == pytest.approx(0.05)
    assert lrs[-1] == pytest.approx(0.001, abs=2e-3)  # the cosine ends at min_lr on the last step
    assert all(0.001 - 1e-9 <= lr <= 0.05 + 1e-9 for lr in lrs)  # re-planning stays on the cosine's range
    assert records[-1]["steps"] == trainer.step and records[-1]["budget_seconds"] == budget


def test_weight_decay_cosine_schedule_spares_exempt_groups(tmp_path, monkeypatch):
    from selfsup.methods import Method, ParamGroup

    extra = torch.nn.Parameter(torch.zeros(2))  # e.g. biases and norms
    default = Method.parameter_groups
    monkeypatch.setattr(Method, "parameter_groups",
                        lambda self: [*default(self), ParamGroup([extra], weight_decay=False)])
    trainer = Trainer(tiny_config(tmp_path, "optim.weight_decay=0.04", "optim.weight_decay_end=0.4"))
    seen = []
    for sample in trainer.loader:
        trainer.train_step(trainer.to_batch(sample))
        seen.append([g["weight_decay"] for g in trainer.optimizer.param_groups])
    total = trainer.total_steps
    for step, (decayed, exempt) in enumerate(seen):
        expected = 0.4 + (0.04 - 0.4) * 0.5 * (1 + math.cos(math.pi * step / (total - 1)))
        assert decayed == pytest.approx(expected) and exempt == 0.0


def test_time_budget_pause_excludes_time_and_the_plan_follows_the_measured_rate():
    from selfsup.engine.budget import TimeBudget

    clock = StepClock(0.0)
    budget = TimeBudget(10.0, warmup_steps=2, clock=clock)
    clock.now += 1.0
    with budget.paused():
        clock.now += 5.0  # e.g. an evaluation in a time-to-accuracy benchmark
    assert budget.elapsed() == pytest.approx(1.0)
    assert budget.plan(2, 100) == 100  # the rate is measured from step 2 on: keep the plan until then
    clock.now += 1.0  # 0.5 s a step for 2 steps; 2 s spent in all: 8 s left = 16 more steps
    assert budget.plan(4, 100) == 4 + 16
    clock.now += 20.0
    assert budget.plan(5, 20) == 5  # past the deadline: stop now


def test_batch_augmentation_on_the_device_trains_and_resumes_exactly(tmp_path):
    straight = Trainer(tiny_config(tmp_path / "a", "data.augment=batch", "data.blur=true"))
    images, _, _, _ = next(iter(straight.loader))
    assert images.dtype == torch.uint8 and images.shape == (32, 3, 8, 8)  # raw digits, augmented in the step
    views = straight._augment_on_device(images)
    assert [v.shape for v in views] == [(32, 3, 16, 16)] * 2 and not torch.equal(views[0], views[1])
    assert torch.equal(views[0], straight._augment_on_device(images)[0])  # seeded by (seed, rank, step)
    straight.fit()
    first = Trainer(tiny_config(tmp_path / "b", "data.augment=batch", "data.blur=true", "train.max_steps=5"))
    first.fit()
    resumed = Trainer(tiny_config(tmp_path / "b", "data.augment=batch", "data.blur=true", "train.resume=auto"))
    resumed.fit()
    for key, value in straight.method.state_dict().items():
        assert torch.equal(value, resumed.method.state_dict()[key]), key
