"""Your own code under every launcher: a plugin module named under ``imports`` registers a method, a data set
and a backbone before the config is read, in ``selfsup train``, ``selfsup eval`` and torchrun workers alike."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from conftest import TINY
from selfsup.cli import main
from selfsup.engine.checkpoint import load_checkpoint

EXAMPLES = Path(__file__).parents[1] / "docs" / "examples"

PLUGIN = '''
import numpy as np
from torch import nn

from selfsup.data.datasets import ArrayDataset, register_dataset
from selfsup.models.backbones import register_backbone


@register_dataset("noise_squares")
def build(cfg, split):
    rng = np.random.default_rng(0 if split == "train" else 1)
    images = rng.integers(0, 256, size=(64, 12, 12, 3), dtype=np.uint8)
    return ArrayDataset("noise_squares", split, [images], np.arange(64) % 4, ["a", "b", "c", "d"])


@register_backbone("two_convs")
def two_convs(cfg):
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return net, 16
'''


@pytest.fixture
def plugin_path(tmp_path, monkeypatch):
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "my_plugins.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), str(EXAMPLES), os.environ.get("PYTHONPATH", "")]))
    return folder


def test_simsiam_example_is_one_file_that_trains_and_evaluates_through_the_cli(tmp_path, plugin_path):
    assert len((EXAMPLES / "simsiam.py").read_text().splitlines()) <= 45
    words = [*TINY, "imports=[simsiam]", "method=simsiam", "method.dim=32", "method.pred_dim=8", "train.max_steps=3",
             f"train.output_dir={tmp_path}"]
    assert main(["train", *words]) == 0
    state = load_checkpoint(tmp_path / "run")
    assert state["step"] == 3 and state["config"]["imports"] == ["simsiam"]
    assert any(key.startswith("predictor.") for key in state["method"])
    # the run's saved config names the plugin: eval and export rebuild the method without being told
    assert main(["eval", str(tmp_path / "run"), "--protocol", "nn"]) == 0
    assert "nn" in json.loads((tmp_path / "run" / "eval.json").read_text())["trained"]
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "backbone.safetensors")]) == 0


def test_a_plugin_data_set_and_backbone_through_the_cli(tmp_path, plugin_path, capsys):
    words = ["imports=[my_plugins]", "data.name=noise_squares", "model.backbone=two_convs", "data.image_size=12",
             "train.batch_size=16", "train.max_steps=2", "method.queue_size=64", "method.dim=8",
             "train.progress_bar=false", "train.run_name=p", f"train.output_dir={tmp_path}", "eval.protocols=[nn]"]
    assert main(["train", *words]) == 0
    assert load_checkpoint(tmp_path / "p")["step"] == 2
    assert "nn" in capsys.readouterr().out


def test_a_plugin_through_torchrun_workers(tmp_path, plugin_path):
    from test_distributed import torchrun

    words = [*TINY, "imports=[my_plugins]", "data.name=noise_squares", "model.backbone=two_convs",
             "data.image_size=12", "train.batch_size=16", "train.max_steps=2", "method.queue_size=64",
             f"train.output_dir={tmp_path}", "train.threads=1"]
    torchrun("-m", "selfsup", "train", *words, cwd=tmp_path)
    state = load_checkpoint(tmp_path / "run")
    assert state["step"] == 2 and state["method"]["queue.ptr"].item() == 32  # both ranks' keys


def test_an_import_that_fails_is_one_clear_error(tmp_path, capsys):
    assert main(["train", *TINY, "imports=[no_such_plugin_module]", f"train.output_dir={tmp_path}"]) == 2
    assert "imports: cannot import 'no_such_plugin_module'" in capsys.readouterr().err
    assert main(["train", *TINY, "imports=[../evil.py]", f"train.output_dir={tmp_path}"]) == 2
    assert "not a module name" in capsys.readouterr().err
    assert sys.modules.get("no_such_plugin_module") is None
