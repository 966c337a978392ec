"""Experiment tracking: one small logger interface and its back ends, plus the run's ``environment.json``.

* :class:`Tracker` — what the trainer calls: ``log_scalars(step, values)`` (training curves), ``log_scores(scores)``
  (evaluation scores, flat or nested like ``eval.json``), ``log_image(name, image, step)`` (a PIL image or PNG
  bytes, e.g. the report's figures), ``close()``.
* Back ends, each an optional extra, imported only when chosen: ``tensorboard`` (``torch.utils.tensorboard``, event
  files in ``RUN/tensorboard``), ``wandb`` (offline by default — no network, files in ``RUN/wandb``; ``WANDB_MODE``
  overrides), ``mlflow`` (a local SQLite store and artifact folder in ``RUN/mlflow``; MLflow ≥ 3.13 refuses its
  old plain-file store, SQLite is what it recommends instead).
* :class:`MultiTracker` fans every call out to several; :func:`build_trackers` builds them from names
  (``log.backends=[tensorboard, wandb]``). Build them on rank 0 only.
* :func:`environment_info` — versions, git commit, devices, world size — for ``RUN/environment.json``.
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from selfsup.config import ConfigError

BACKENDS = ("tensorboard", "wandb", "mlflow")
PROJECT = "selfsup"  # the W&B project / MLflow experiment name unless WANDB_PROJECT / an experiment is given

ImageLike = Image.Image | bytes


class TrackerUnavailable(ImportError):
    """A chosen tracking back end whose package is not installed."""


@runtime_checkable
class Tracker(Protocol):
    def log_scalars(self, step: int, values: Mapping[str, Any]) -> None:
        """Numbers at a global step (non-numeric and non-finite values are skipped)."""

    def log_scores(self, scores: Mapping[str, Any], step: int | None = None) -> None:
        """Evaluation scores: flat ``{"knn20_T0.07": 91.3}`` or nested ``{"trained": {...}, "random_init": {...}}``."""

    def log_image(self, name: str, image: ImageLike, step: int = 0) -> None:
        """A picture: a PIL image or the bytes of a PNG file."""

    def close(self) -> None:
        """Flush and release; the tracker is not used afterwards."""


# ------------------------------------------------------------------------------------------------ helpers


def numeric(values: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of ``values`` as floats (bools, strings, NaN and inf left out)."""
    out = {}
    for key, value in values.items():
        number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
        if number and math.isfinite(float(value)):
            out[key] = float(value)
    return out


def flatten_scores(scores: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested score dicts as ``a/b/c`` keys: ``{"trained": {"nn": 90.1}}`` → ``{"trained/nn": 90.1}``."""
    flat: dict[str, Any] = {}
    for key, value in scores.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_scores(value, f"{name}/"))
        else:
            flat[name] = value
    return numeric(flat)


def as_pil(image: ImageLike) -> Image.Image:
    """A PIL image in RGB (or RGBA) from a PIL image or PNG bytes."""
    if isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(image))
        image.load()
    if not isinstance(image, Image.Image):
        raise TypeError(f"log_image takes a PIL image or PNG bytes, got {type(image).__name__}")
    return image if image.mode in ("RGB", "RGBA") else image.convert("RGB")


def _require(module: str, backend: str) -> Any:
    """Import ``module`` for ``backend``, or one clear error naming the extra to install."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as error:
        raise TrackerUnavailable(f"log.backends has {backend!r}, which needs the {module.split('.')[0]!r} package "
                                 f"(not importable: {error}): pip install 'selfsup[{backend}]'") from None


def _safe_name(name: str) -> str:
    """A file- and metric-key-safe version of ``name`` (letters, digits, ``_ - . /``)."""
    return re.sub(r"[^A-Za-z0-9_.\-/ ]", "_", name).strip("/") or "_"


# ---------------------------------------------------------------------------------------------- back ends


class TensorBoardTracker:
    """Event files under ``run_dir/tensorboard`` (``tensorboard --logdir RUN``); scores as ``eval/...`` scalars."""

    def __init__(self, run_dir: str | Path, run_name: str = "", config: Mapping[str, Any] | None = None):
        summary = _require("torch.utils.tensorboard", "tensorboard")
        self.log_dir = Path(run_dir) / "tensorboard"
        self.writer = summary.SummaryWriter(log_dir=str(self.log_dir))
        self._step = 0
        if config:
            self.writer.add_text("config", f"```\n{json.dumps(config, indent=2, default=str)}\n```", 0)

    def log_scalars(self, step: int, values: Mapping[str, Any]) -> None:
        self._step = max(self._step, step)
        for key, value in numeric(values).items():
            self.writer.add_scalar(key, value, step)

    def log_scores(self, scores: Mapping[str, Any], step: int | None = None) -> None:
        for key, value in flatten_scores(scores).items():
            self.writer.add_scalar(f"eval/{key}", value, self._step if step is None else step)

    def log_image(self, name: str, image: ImageLike, step: int = 0) -> None:
        array = np.asarray(as_pil(image).convert("RGB"))
        self.writer.add_image(name, array, step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run in ``run_dir/wandb``, offline unless ``WANDB_MODE`` says otherwise (``wandb sync`` uploads it
    later); the config as the run's config, scores in its summary."""

    def __init__(self, run_dir: str | Path, run_name: str = "", config: Mapping[str, Any] | None = None, *,
                 mode: str | None = None, project: str | None = None):
        self.wandb = _require("wandb", "wandb")
        directory = Path(run_dir)
        directory.mkdir(parents=True, exist_ok=True)
        self.run = self.wandb.init(project=project or os.environ.get("WANDB_PROJECT", PROJECT), name=run_name or None,
                                   dir=str(directory), config=dict(config or {}),
                                   mode=mode or os.environ.get("WANDB_MODE", "offline"),
                                   settings=self.wandb.Settings(console="off"))  # train.log keeps the console
        self._step = 0

    def log_scalars(self, step: int, values: Mapping[str, Any]) -> None:
        self._step = max(self._step, step)
        self.run.log(numeric(values), step=self._step)

    def log_scores(self, scores: Mapping[str, Any], step: int | None = None) -> None:
        flat = {f"eval/{key}": value for key, value in flatten_scores(scores).items()}
        self.run.summary.update(flat)

    def log_image(self, name: str, image: ImageLike, step: int = 0) -> None:
        self._step = max(self._step, step)  # W&B steps only grow: a late picture goes to the current step
        self.run.log({name: self.wandb.Image(as_pil(image))}, step=self._step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    """An MLflow run in a local store under ``run_dir/mlflow`` (``mlflow.db`` and ``artifacts/``; browse with
    ``mlflow ui --backend-store-uri sqlite:///RUN/mlflow/mlflow.db``); the config as flattened parameters,
    images as artifacts under ``images/``. ``tracking_uri`` points elsewhere (a server) instead."""

    def __init__(self, run_dir: str | Path, run_name: str = "", config: Mapping[str, Any] | None = None, *,
                 tracking_uri: str | None = None, experiment: str = PROJECT):
        tracking = _require("mlflow.tracking", "mlflow")
        entities = _require("mlflow.entities", "mlflow")
        self.Metric, self.Param = entities.Metric, entities.Param
        folder = Path(run_dir).resolve() / "mlflow"
        if tracking_uri is None:
            _require("sqlalchemy", "mlflow")  # MLflow's SQLite store (full mlflow has it; mlflow-skinny does not)
        folder.mkdir(parents=True, exist_ok=True)
        self.client = tracking.MlflowClient(tracking_uri=tracking_uri or f"sqlite:///{folder / 'mlflow.db'}")
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found is not None else self.client.create_experiment(
            experiment, artifact_location=(folder / "artifacts").as_uri())
        self.run_id = self.client.create_run(experiment_id, run_name=run_name or None).info.run_id
        params = [self.Param(key[:250], str(value)[:500]) for key, value in _flat_config(config or {}).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[start:start + 100])
        self._step = 0

    def _log(self, values: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        metrics = [self.Metric(_safe_name(key), value, now, step) for key, value in values.items()]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def log_scalars(self, step: int, values: Mapping[str, Any]) -> None:
        self._step = max(self._step, step)
        self._log(numeric(values), step)

    def log_scores(self, scores: Mapping[str, Any], step: int | None = None) -> None:
        self._log({f"eval/{key}": value for key, value in flatten_scores(scores).items()},
                  self._step if step is None else step)

    def log_image(self, name: str, image: ImageLike, step: int = 0) -> None:
        with tempfile.TemporaryDirectory(prefix="selfsup-mlflow-") as folder:
            path = Path(folder) / f"{_safe_name(name).replace('/', '_')}_step{step}.png"
            as_pil(image).save(path)
            self.client.log_artifact(self.run_id, str(path), artifact_path="images")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _flat_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 0.1}}`` → ``{"optim.lr": 0.1}`` (lists kept as values)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update(_flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class MultiTracker:
    """Every call forwarded to each tracker, in order; ``close`` closes all of them even if one fails."""

    def __init__(self, trackers: Sequence[Tracker] = ()):
        self.trackers = list(trackers)

    def log_scalars(self, step: int, values: Mapping[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log_scalars(step, values)

    def log_scores(self, scores: Mapping[str, Any], step: int | None = None) -> None:
        for tracker in self.trackers:
            tracker.log_scores(scores, step)

    def log_image(self, name: str, image: ImageLike, step: int = 0) -> None:
        for tracker in self.trackers:
            tracker.log_image(name, image, step)

    def close(self) -> None:
        failure: BaseException | None = None
        for tracker in self.trackers:
            try:
                tracker.close()
            except Exception as error:  # close the others, then report the first failure
                failure = failure or error
        if failure is not None:
            raise failure


TRACKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}


def build_trackers(names: Sequence[str], run_dir: str | Path, run_name: str = "",
                   config_dict: Mapping[str, Any] | None = None) -> MultiTracker:
    """The trackers named in ``names`` (``log.backends``), all writing under ``run_dir``; an unknown name is a
    ConfigError listing the choices, a missing package a :class:`TrackerUnavailable` naming the extra. Trackers
    already opened are closed again when a later one fails."""
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"unknown tracking back end {name!r} in log.backends; choose from {list(BACKENDS)}")
    built: list[Tracker] = []
    try:
        for name in dict.fromkeys(names):
            built.append(TRACKERS[name](run_dir, run_name, config_dict))
    except BaseException:
        MultiTracker(built).close()
        raise
    return MultiTracker(built)


# -------------------------------------------------------------------------------------------- environment


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def git_commit(path: str | Path | None = None) -> dict[str, Any] | None:
    """``{"commit", "dirty"}`` of the git checkout whose tracked files include the package folder ``path``
    (default: this package's source), or None when there is none (an installed wheel — even one inside some other
    project's repository) or git is missing. ``dirty``: tracked files differ from the commit."""
    folder = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        tracked = subprocess.run(["git", "-C", str(folder), "ls-files", "--error-unmatch", "__init__.py"],
                                 capture_output=True, text=True, timeout=10, check=False)
        commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=False)
        if tracked.returncode != 0 or commit.returncode != 0:
            return None
        status = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}


def environment_info() -> dict[str, Any]:
    """What ran the run: python, platform, the versions of torch / torchvision / timm / numpy / selfsup, the git
    commit of selfsup's checkout (if any), the devices, CUDA / cuDNN versions and the world size."""
    import torch
    import torchvision

    from selfsup.version import __version__

    package = Path(__file__).resolve().parent  # selfsup's own folder
    cuda = torch.cuda.is_available()
    world_size = (torch.distributed.get_world_size() if torch.distributed.is_available()
                  and torch.distributed.is_initialized() else int(os.environ.get("WORLD_SIZE", "1")))
    return {
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "hostname": platform.node(),
        "selfsup": __version__,
        "selfsup_path": str(package),
        "git": git_commit(package),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": _version("timm"),
        "numpy": np.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else ["cpu"],
        "cpu_count": os.cpu_count(),
        "world_size": world_size,
    }


def write_environment(run_dir: str | Path) -> Path:
    """Write :func:`environment_info` to ``run_dir/environment.json`` and return its path."""
    path = Path(run_dir) / "environment.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(environment_info(), indent=2) + "\n")
    return path
