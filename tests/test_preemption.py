"""A pre-emption signal mid-epoch leaves a checkpoint from which the run finishes with the same weights as an
uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from conftest import TINY
from selfsup.cli import RECIPES
from selfsup.config import load_config
from selfsup.engine.checkpoint import load_checkpoint
from selfsup.engine.trainer import Trainer

SRC = Path(__file__).parents[1] / "src"


def _steps_logged(metrics: Path) -> int:
    if not metrics.is_file():
        return 0
    return sum(1 for line in metrics.read_text().splitlines() if '"step"' in line)


def test_sigterm_saves_and_resume_matches_uninterrupted_run(tmp_path):
    words = [*TINY, "train.epochs=4", "train.threads=1"]  # `selfsup train key=value` starts from the quickstart
    straight = Trainer(load_config(RECIPES / "quickstart.yaml", [*words, f"train.output_dir={tmp_path / 'a'}"]))
    straight.fit()

    out = tmp_path / "b"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-m", "selfsup", "train", *words, f"train.output_dir={out}"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while _steps_logged(out / "run" / "metrics.jsonl") < 3 and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err[-2000:]
    assert "Resume with: selfsup train --resume" in err

    state = load_checkpoint(out / "run")
    assert 3 <= state["step"] < 32  # stopped inside the run, at a step boundary
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1] == {"preempted_at_step": state["step"]}

    again = [*words, f"train.output_dir={out}", "train.resume=auto"]  # the same command resumes automatically
    resumed = Trainer(load_config(RECIPES / "quickstart.yaml", again))
    assert resumed.step == state["step"]
    resumed.fit()
    expected, got = straight.method.state_dict(), resumed.method.state_dict()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
