"""Issue 17, items 1, 2, 4 and 6: run folders that cannot be clobbered, no non-finite checkpoint, a signal at any
moment ends cleanly, and a resumed run's files read as if it had never stopped. Each test reproduces a failure of the
earlier trainer first."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY, tiny_config
from selfsup.cli import main
from selfsup.engine.checkpoint import load_checkpoint
from selfsup.engine.trainer import Callback, NonFiniteLossError, Preempted, Trainer

SRC = Path(__file__).parents[1] / "src"


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------ 1. one owner per folder


def test_a_finished_run_is_not_overwritten_without_resume(tmp_path, capsys):
    words = [*TINY, "train.max_steps=3", f"train.output_dir={tmp_path}"]
    assert main(["train", *words]) == 0
    before = load_checkpoint(tmp_path / "run")
    assert main(["train", *words]) == 2  # the same name again: the old behaviour trained from step 0 over it
    err = capsys.readouterr().err
    assert "already holds a run" in err and "train.resume=auto" in err and "train.run_name" in err
    assert load_checkpoint(tmp_path / "run")["step"] == before["step"] == 3


def test_a_refused_resume_leaves_config_yaml_untouched(tmp_path, capsys):
    words = [*TINY, "train.max_steps=2", f"train.output_dir={tmp_path}"]
    assert main(["train", *words]) == 0
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert main(["train", *words, "method.dim=8", "train.resume=auto"]) == 2  # a different model: refused
    assert "different configuration" in capsys.readouterr().err
    assert (tmp_path / "run" / "config.yaml").read_text() == saved


def test_a_live_process_owns_the_folder_and_a_dead_ones_lock_is_taken_over(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        owner = {"host": socket.gethostname(), "pid": sleeper.pid, "started": time.time()}
        (run / ".lock").write_text(json.dumps(owner))
        assert main(["train", *TINY, "train.max_steps=1", f"train.output_dir={tmp_path}"]) == 2
        assert f"in use by process {sleeper.pid}" in capsys.readouterr().err
    finally:
        sleeper.kill()
        sleeper.wait()
    with pytest.warns(RuntimeWarning, match="stale lock"):  # its process is gone now
        trainer = Trainer(tiny_config(tmp_path, "train.max_steps=1"))
    assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
    trainer.fit()
    assert not (run / ".lock").exists()  # released at the end


def test_run_names_are_names_not_paths(tmp_path, capsys):
    assert main(["train", *TINY, "train.run_name=../elsewhere", f"train.output_dir={tmp_path}"]) == 2
    assert "is not a name" in capsys.readouterr().err
    assert not (tmp_path.parent / "elsewhere").exists()


# ------------------------------------------------------------------------------------------ 2. no NaN checkpoint


def test_a_divergence_between_two_checks_never_reaches_the_checkpoint(tmp_path):
    """The GPU cadence on CPU: the finite-loss check every 1000 steps, the checkpoint timer firing every step;
    weights turn to NaN after step 3. The earlier trainer saved them (99 of 119 tensors non-finite)."""
    trainer = Trainer(tiny_config(tmp_path, "train.checkpoint_every_minutes=0"))
    trainer.finite_check_every = 1000

    def poison(t: Trainer) -> None:
        if t.step == 3:
            with torch.no_grad():
                next(t.method.parameters()).fill_(float("nan"))

    trainer.step_callbacks.append(poison)
    with pytest.raises(NonFiniteLossError, match="non-finite by step 3.*last good checkpoint is kept"):
        trainer.fit()
    state = load_checkpoint(tmp_path / "run")
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["method"].values()
               if isinstance(v, torch.Tensor) and v.is_floating_point())


# ------------------------------------------------------------------------------------------ 4. signals


def test_sigterm_to_the_process_group_with_loader_workers_checkpoints_and_exits_143(tmp_path):
    out = tmp_path / "out"
    words = [*TINY, "train.epochs=4", "train.threads=1", "data.num_workers=2", f"train.output_dir={out}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-m", "selfsup", "train", *words], env=env, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while (not metrics.is_file() or metrics.read_text().count('"loss"') < 3) and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGTERM)  # what scancel and Slurm pre-emption do: the main process and workers
    _, err = process.communicate(timeout=180)
    assert process.returncode == 143, err[-3000:]  # the earlier trainer: a worker died, exit 1 with a traceback
    assert "Traceback" not in err and "Resume with: selfsup train --resume" in err
    state = load_checkpoint(out / "run")
    assert 3 <= state["step"] < 32 and _records(out / "run")[-1] == {"preempted_at_step": state["step"]}
    resumed = Trainer(tiny_config(out, "train.epochs=4", "data.num_workers=2", "train.resume=auto"))
    assert resumed.step == state["step"]
    resumed.fit()
    assert resumed.step == 32


class SignalAtTheEnd(Callback):
    def on_train_end(self, trainer: Trainer) -> None:
        os.kill(os.getpid(), signal.SIGTERM)


def test_a_signal_during_the_final_evaluation_stops_cleanly_with_the_checkpoint_saved(tmp_path):
    """The earlier trainer ignored it and exited 0 after the whole evaluation."""
    from selfsup.eval.callback import Evaluation

    cfg = tiny_config(tmp_path, "train.max_steps=2", "eval.at_end=true", "eval.protocols=[nn]")
    trainer = Trainer(cfg, callbacks=[SignalAtTheEnd(), Evaluation(cfg)])
    with pytest.raises(Preempted, match="in the final evaluation"):
        trainer.fit()
    assert load_checkpoint(tmp_path / "run")["step"] == 2
    assert not (tmp_path / "run" / "eval.json").exists()  # no evaluation that would look complete
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is given back


# ------------------------------------------------------------------------------------------ 6. bookkeeping


def test_a_resumed_run_reads_as_if_it_had_never_stopped(tmp_path):
    straight = Trainer(tiny_config(tmp_path / "a"))
    straight.fit()
    first = Trainer(tiny_config(tmp_path / "b", "train.max_steps=5"))
    first.fit()
    run = tmp_path / "b" / "run"
    with open(run / "metrics.jsonl", "a") as handle:  # a kill after step 7 but before a checkpoint logged these
        handle.write(json.dumps({"step": 6, "loss": 1.0}) + "\n" + json.dumps({"step": 7, "loss": 1.0}) + "\n")
    (run / ".checkpoint.pt.tmp-4242").write_bytes(b"half a checkpoint")  # a kill during a checkpoint write
    resumed = Trainer(tiny_config(tmp_path / "b", "train.resume=auto"))
    assert not (run / ".checkpoint.pt.tmp-4242").exists()
    resumed.fit()
    steps = [r["step"] for r in _records(run) if "loss" in r]
    assert steps == list(range(1, 17))  # every step once
    ends = [r for r in _records(run) if "epoch_end" in r]
    reference = [r for r in _records(tmp_path / "a" / "run") if "epoch_end" in r]
    assert [r["epoch_end"] for r in ends] == [1, 2]
    # the interrupted epoch's mean covers all its 8 steps, the 5 before the stop included (bit-identical run)
    assert ends[0]["loss_mean"] == pytest.approx(reference[0]["loss_mean"], rel=1e-6)
    assert "partial_from_step" not in ends[0]
