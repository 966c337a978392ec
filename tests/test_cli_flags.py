"""``selfsup --version``, the protocol list in ``selfsup eval --help`` and the report's options as flags."""

from __future__ import annotations

import re

import pytest

import selfsup
from conftest import TINY
from selfsup.cli import main
from selfsup.eval.protocols import PROTOCOLS


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"selfsup {selfsup.__version__}"


def test_eval_help_lists_every_protocol(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps the help text
    for name in PROTOCOLS:
        assert re.search(rf"\b{name}\b", shown)
    assert "label-free" in shown


def test_report_flags_reach_the_report(tmp_path):
    words = [*TINY, "data.labels=none", f"train.output_dir={tmp_path}", "train.max_steps=2"]
    assert main(["train", "quickstart", *words]) == 0
    run = tmp_path / "run"
    out = tmp_path / "report.html"
    assert main(["report", str(run), "--out", str(out), "--max-points", "60", "--device", "cpu",
                 "--retrieval-queries", "3", "--memory-images", "50", "--clusters", "4", "--clusters-per-side", "1",
                 "--images-per-cluster", "5", "--duplicate-pairs", "2", "--attention-images", "1"]) == 0
    page = out.read_text()
    assert "3 random validation images (blue frame)" in page
    assert "among a seeded random 50 of the 256 training images" in page
    assert "k-means with k = 4 on the 450" in page and "up to 5 random members" in page
    assert page.count('class="cluster"') == 2  # one tightest and one loosest cluster
    pairs = int(re.search(r"<b>(\d+)</b> pairs of the 50 training images searched", page).group(1))
    assert pairs > 2 and "The 2 most similar pairs:" in page  # after 2 steps most digits still look alike
