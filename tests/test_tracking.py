"""Tracking back ends write what they are given (read back with each tool's own reader), and environment.json."""

from __future__ import annotations

import importlib.util
import io
import json
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.config import ConfigError
from selfsup.tracking import (
    MultiTracker,
    Tracker,
    TrackerUnavailable,
    build_trackers,
    environment_info,
    flatten_scores,
    numeric,
    write_environment,
)

CONFIG = {"method": {"name": "moco", "temperature": 0.2}, "optim": {"lr": 0.03}, "eval": {"protocols": ["knn"]}}
SCORES = {"trained": {"knn20_T0.07": 91.25, "duplicate_pairs": 3}, "random_init": {"knn20_T0.07": 40.5}}


def installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def picture() -> Image.Image:
    """A 24 x 16 RGB picture: left half red, right half blue."""
    array = np.zeros((16, 24, 3), dtype=np.uint8)
    array[:, :12, 0] = 255
    array[:, 12:, 2] = 255
    return Image.fromarray(array)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def log_a_short_run(tracker: Tracker) -> None:
    for step in range(3):
        tracker.log_scalars(step * 10, {"loss": 2.0 - step, "lr": 0.1, "note": "text is skipped", "bad": float("nan")})
    tracker.log_scores(SCORES)
    tracker.log_image("report/retrieval", png(picture()), step=20)
    tracker.log_image("report/pil", picture(), step=20)
    tracker.close()


def test_scalars_and_scores_are_flattened_to_finite_numbers():
    assert numeric({"a": 1, "b": 2.5, "c": True, "d": "x", "e": float("inf"), "f": np.float32(0.5)}) == {
        "a": 1.0, "b": 2.5, "f": 0.5}
    assert flatten_scores(SCORES) == {"trained/knn20_T0.07": 91.25, "trained/duplicate_pairs": 3.0,
                                      "random_init/knn20_T0.07": 40.5}


@pytest.mark.skipif(not installed("tensorboard"), reason="tensorboard is not installed (pip install 'selfsup[test]')")
def test_tensorboard_event_files_hold_the_scalars_scores_and_image(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_a_short_run(build_trackers(["tensorboard"], tmp_path, "run", CONFIG))
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    assert {"loss", "lr", "eval/trained/knn20_T0.07", "eval/random_init/knn20_T0.07"} <= set(tags["scalars"])
    assert "note" not in tags["scalars"] and "bad" not in tags["scalars"]
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == [0, 10, 20] and [e.value for e in loss] == [2.0, 1.0, 0.0]
    assert events.Scalars("eval/trained/knn20_T0.07")[0].value == pytest.approx(91.25)
    assert events.Scalars("eval/trained/duplicate_pairs")[0].step == 20  # scores at the last logged step
    assert {"report/retrieval", "report/pil"} <= set(tags["images"])
    stored = events.Images("report/retrieval")[0]
    assert stored.step == 20 and (stored.width, stored.height) == (24, 16)
    decoded = np.asarray(Image.open(io.BytesIO(stored.encoded_image_string)).convert("RGB"))
    np.testing.assert_array_equal(decoded, np.asarray(picture()))


@pytest.mark.skipif(not installed("wandb"), reason="wandb is not installed (pip install 'selfsup[wandb]')")
def test_wandb_offline_run_is_written_without_a_network(tmp_path, monkeypatch):
    for variable in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_DIR", "WANDB_API_KEY"):
        monkeypatch.delenv(variable, raising=False)
    import wandb

    log_a_short_run(build_trackers(["wandb"], tmp_path, "run", CONFIG))
    wandb.teardown()  # waits for wandb's service process to finish writing the run's files
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # the run's record for `wandb sync` (protobuf records; wandb has no public reader for it): keys and JSON values
    record = next(runs[0].glob("*.wandb")).read_bytes()
    for text in (b"loss", b"eval/trained/knn20_T0.07", b"91.25", b"40.5", b"moco", b"temperature"):
        assert text in record
    images = sorted((runs[0] / "files" / "media" / "images" / "report").glob("*.png"))
    assert [p.name.split("_")[:2] for p in images] == [["pil", "20"], ["retrieval", "20"]]
    np.testing.assert_array_equal(np.asarray(Image.open(images[1]).convert("RGB")), np.asarray(picture()))


@pytest.mark.skipif(not (installed("mlflow") and installed("sqlalchemy")),
                    reason="mlflow (with its SQLite store) is not installed (pip install 'selfsup[mlflow]')")
def test_mlflow_local_store_run_is_written_and_read_back(tmp_path):
    from mlflow.tracking import MlflowClient

    log_a_short_run(build_trackers(["mlflow"], tmp_path, "run", CONFIG))
    assert (tmp_path / "mlflow" / "mlflow.db").is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("selfsup")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.params["method.name"] == "moco" and run.data.params["optim.lr"] == "0.03"
    assert run.data.metrics["eval/trained/knn20_T0.07"] == pytest.approx(91.25)
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 2.0), (10, 1.0), (20, 0.0)]
    images = (tmp_path / "mlflow" / "artifacts").rglob("*.png")
    assert {p.name for p in images} == {"report_retrieval_step20.png", "report_pil_step20.png"}


def test_unknown_or_missing_back_ends_are_one_clear_error(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"unknown tracking back end 'tensorbord'.*'tensorboard', 'wandb', 'mlflow'"):
        build_trackers(["tensorbord"], tmp_path)
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb → ImportError, installed or not
    with pytest.raises(TrackerUnavailable, match=r"needs the 'wandb' package.*pip install 'selfsup\[wandb\]'"):
        build_trackers(["wandb"], tmp_path)


class Recorder:
    def __init__(self, log: list, name: str, fail_close: bool = False):
        self.log, self.name, self.fail_close = log, name, fail_close

    def log_scalars(self, step, values):
        self.log.append((self.name, "scalars", step, dict(values)))

    def log_scores(self, scores, step=None):
        self.log.append((self.name, "scores", step, dict(scores)))

    def log_image(self, name, image, step=0):
        self.log.append((self.name, "image", step, name))

    def close(self):
        self.log.append((self.name, "close"))
        if self.fail_close:
            raise RuntimeError(f"{self.name} could not close")


def test_multi_tracker_forwards_every_call_and_closes_all_even_when_one_fails():
    log: list = []
    multi = MultiTracker([Recorder(log, "a", fail_close=True), Recorder(log, "b")])
    assert isinstance(multi, Tracker) and isinstance(Recorder(log, "c"), Tracker)
    multi.log_scalars(5, {"loss": 1.0})
    multi.log_scores({"nn": 90.0})
    multi.log_image("grid", b"png", step=5)
    with pytest.raises(RuntimeError, match="a could not close"):
        multi.close()
    assert log == [("a", "scalars", 5, {"loss": 1.0}), ("b", "scalars", 5, {"loss": 1.0}),
                   ("a", "scores", None, {"nn": 90.0}), ("b", "scores", None, {"nn": 90.0}),
                   ("a", "image", 5, "grid"), ("b", "image", 5, "grid"), ("a", "close"), ("b", "close")]
    MultiTracker().log_scalars(0, {"loss": 1.0})  # no back end: nothing to do


def test_environment_info_names_versions_git_devices_and_world_size(tmp_path, monkeypatch):
    import torchvision

    import selfsup

    monkeypatch.setenv("WORLD_SIZE", "3")
    info = environment_info()
    assert {"python", "platform", "selfsup", "torch", "torchvision", "timm", "numpy", "git", "cuda", "cudnn",
            "devices", "world_size"} <= set(info)
    assert info["python"] == ".".join(map(str, sys.version_info[:3]))
    assert info["torch"] == torch.__version__ and info["torchvision"] == torchvision.__version__
    assert info["selfsup"] == selfsup.__version__ and re.fullmatch(r"\d+\.\d+.*", info["timm"])
    assert info["world_size"] == 3
    assert info["devices"] == ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                               if torch.cuda.is_available() else ["cpu"])
    if info["git"] is not None:  # a source checkout (as in development and CI): a 40-hex commit
        assert re.fullmatch(r"[0-9a-f]{40}", info["git"]["commit"]) and isinstance(info["git"]["dirty"], bool)
    path = write_environment(tmp_path)
    assert json.loads(path.read_text())["torch"] == torch.__version__


@pytest.mark.skipif(__import__("shutil").which("git") is None, reason="no git on this machine")
def test_git_commit_is_that_of_the_checkout_tracking_the_package(tmp_path):
    import subprocess

    from selfsup.tracking import git_commit

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True,
                              text=True).stdout.strip()

    package, vendored = tmp_path / "pkg", tmp_path / "site" / "pkg"
    package.mkdir()
    vendored.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (vendored / "__init__.py").write_text("")  # inside the repository, but not tracked: an installed copy
    git("init", "-q")
    git("add", "pkg/__init__.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    assert git_commit(package) == {"commit": git("rev-parse", "HEAD"), "dirty": False}
    (package / "__init__.py").write_text("x = 1\n")
    assert git_commit(package)["dirty"] is True
    assert git_commit(vendored) is None and git_commit(tmp_path.parent) is None


def test_a_training_run_logs_to_tensorboard_and_keeps_its_console_environment_and_epoch_checkpoints(tmp_path):
    """The trainer's wiring: log.backends=[tensorboard] gets the step and epoch scalars, the final scores and the
    curves; the run folder gets train.log, environment.json and the last N epoch checkpoints."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from conftest import tiny_config
    from selfsup.api import build_trainer

    cfg = tiny_config(tmp_path, "log.backends=[tensorboard]", "train.epochs=3", "train.keep_checkpoints=2",
                      "eval.at_end=true", "eval.protocols=[nn]", "eval.compare_random_init=false")
    trainer = build_trainer(cfg)
    scores = trainer.fit()
    run = trainer.run_dir
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0}).Reload()
    tags = events.Tags()
    assert {"loss", "lr", "loss_mean", "eval/trained/nn"} <= set(tags["scalars"]) and "step" not in tags["scalars"]
    assert len(events.Scalars("loss")) == 24  # 3 epochs x 8 steps, logged every step
    assert events.Scalars("eval/trained/nn")[-1].value == pytest.approx(scores["trained"]["nn"])
    assert any(tag.startswith("curves") for tag in tags["images"])
    console = (run / "train.log").read_text()
    assert "epoch 3/3:" in console and "run folder:" in console and "nn" in console
    environment = json.loads((run / "environment.json").read_text())
    assert environment["torch"] == torch.__version__
    assert sorted(p.name for p in run.glob("checkpoint-epoch*.pt")) == ["checkpoint-epoch2.pt", "checkpoint-epoch3.pt"]


def test_an_unknown_or_missing_backend_is_one_clear_error(tmp_path, capsys):
    from conftest import TINY
    from selfsup.cli import main

    assert main(["train", *TINY, "log.backends=[tensorbored]", f"train.output_dir={tmp_path}"]) == 2
    assert "unknown tracking back end 'tensorbored'" in capsys.readouterr().err
