"""Fuzz-style: random bytes, truncations and bit flips of every file type the CLI reads.

Each mutated file is read through the library (``load_checkpoint``, ``read_backbone``, ``read_idx``, the CIFAR,
STL-10 and image-folder data sets, ``load_config``) and a few through ``selfsup.cli.main``. The outcome must be a
clean load or one error of the file type's own class (CheckpointError, DataFormatError, ImageLoadError,
ConfigError); through the CLI, exit code 2 and one ``selfsup: error:`` line. The corpus runs in a fresh Python
process so that its peak resident memory (``ru_maxrss``) measures the corpus alone: it must grow by less than
MEMORY_BOUND_MB over the process's peak after reading each genuine file once (every file here is under 100 kB).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import pickle
import resource
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

MEMORY_BOUND_MB = 64
SEEDS = range(4)


def valid_files(root: Path) -> dict[str, tuple[str, bytes]]:
    """One genuine, tiny file of each type: name -> (file name, bytes)."""
    import torch

    from selfsup.config import ModelConfig
    from selfsup.export import BackboneInfo, save_backbone
    from selfsup.models import build_backbone

    rng = np.random.default_rng(0)
    checkpoint = io.BytesIO()
    torch.save({"method": {"w": torch.randn(64, 8), "b": torch.zeros(8)}, "config": {"train": {"epochs": 1}},
                "epoch": 1, "step": 2, "rng_cpu": torch.get_rng_state()}, checkpoint)
    model = ModelConfig(backbone="resnet_mini", widths=(4, 8))
    module, feature_dim = build_backbone(model)
    backbone = save_backbone(module.state_dict(), root / "valid.safetensors",
                             BackboneInfo.from_model_config(model, feature_dim))
    images = rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    idx = gzip.compress(struct.pack(">BBBBIII", 0, 0, 8, 3, 3, 28, 28) + images.tobytes())
    cifar = pickle.dumps({"data": rng.integers(0, 256, size=(2, 3072), dtype=np.uint8), "labels": [3, 7],
                          "batch_label": "batch 1", "filenames": ["a.png", "b.png"]}, protocol=2)
    png = io.BytesIO()
    from PIL import Image

    Image.fromarray(rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)).save(png, format="PNG")
    recipe = (Path(__file__).parents[1] / "src" / "selfsup" / "configs" / "quickstart.yaml")
    recipe_text = recipe.read_bytes() if recipe.is_file() else b"train:\n  epochs: 2\n"
    return {
        "checkpoint": ("checkpoint.pt", checkpoint.getvalue()),
        "safetensors": ("backbone.safetensors", backbone.read_bytes()),
        "idx": ("train-images-idx3-ubyte.gz", idx),
        "cifar": ("data_batch_1", cifar),
        "stl": ("train_X.bin", rng.integers(0, 256, size=2 * 3 * 96 * 96, dtype=np.uint8).tobytes()),
        "image": ("a.png", png.getvalue()),
        "recipe": ("recipe.yaml", recipe_text),
    }


def mutations(data: bytes, seed_base: int) -> list[tuple[str, bytes]]:
    """Random bytes, truncations and single-bit flips of ``data``, deterministic."""
    cases = []
    for seed in SEEDS:
        rng = np.random.default_rng(seed_base + seed)
        cases.append((f"random{seed}", rng.bytes(int(rng.choice([0, 1, 9, 777, 4099])))))
    for keep in sorted({0, 1, 7, len(data) // 3, len(data) // 2, len(data) - 1}):
        cases.append((f"truncated{keep}", data[:keep]))
    rng = np.random.default_rng(seed_base + 100)
    for k in range(8):
        flipped = bytearray(data)
        position = int(rng.integers(len(flipped)))
        flipped[position] ^= 1 << int(rng.integers(8))
        cases.append((f"flip{k}@{position}", bytes(flipped)))
    return cases


def place(kind: str, case_dir: Path, name: str, data: bytes) -> Path:
    """Write the case where its reader looks for it (a fresh folder per case: the data sets cache by path)."""
    if kind == "cifar":
        folder = case_dir / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for other in [f"data_batch_{k}" for k in range(2, 6)]:
            (folder / other).write_bytes(pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "labels": [0]}))
    elif kind == "stl":
        folder = case_dir / "stl10_binary"
        folder.mkdir(parents=True)
        (folder / "train_y.bin").write_bytes(bytes([1, 2]))
    elif kind == "image":
        folder = case_dir / "train" / "cat"
        folder.mkdir(parents=True)
        (folder / f"copy-{name}").write_bytes(data)  # two images: one batch of train.batch_size=2
    elif kind == "idx":
        folder = case_dir
        folder.mkdir(parents=True)
        (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(struct.pack(">BBBBI", 0, 0, 8, 1, 3)
                                                                          + bytes([1, 2, 3])))
    else:
        folder = case_dir
        folder.mkdir(parents=True)
    path = folder / name
    path.write_bytes(data)
    return path


def readers() -> dict[str, tuple[Callable[[Path, Path], Any], type]]:
    """kind -> (read(path, case_dir), the error class a bad file must raise)."""
    from selfsup.config import ConfigError, DataConfig, load_config
    from selfsup.data.datasets import DataFormatError, ImageLoadError, build_dataset, read_idx
    from selfsup.engine.checkpoint import CheckpointError, load_checkpoint
    from selfsup.export import read_backbone

    def dataset(name: str, **options: Any) -> Callable[[Path, Path], Any]:
        def read(path: Path, case_dir: Path) -> Any:
            data = build_dataset(DataConfig(name=name, path=str(case_dir), **options), "train")
            return [data[i] for i in range(len(data))]

        return read

    return {
        "checkpoint": (lambda path, _: load_checkpoint(path), CheckpointError),
        "safetensors": (lambda path, _: read_backbone(path), CheckpointError),
        "idx": (lambda path, _: read_idx(path, 3), DataFormatError),
        "cifar": (dataset("cifar10"), DataFormatError),
        "stl": (dataset("stl10"), DataFormatError),
        "image": (dataset("imagefolder"), ImageLoadError),
        "recipe": (lambda path, _: load_config(path), ConfigError),
    }


def cli_words(kind: str, path: Path, case_dir: Path) -> list[str]:
    train = ["train.output_dir=" + str(case_dir / "runs"), "train.progress_bar=false", "train.max_steps=1",
             "eval.at_end=false", "data.image_size=16", "train.batch_size=2", "method.queue_size=8"]
    return {
        "checkpoint": ["eval", str(path)],
        "safetensors": ["eval", str(path), "data.name=digits"],
        "idx": ["train", "data.name=fashion-mnist", f"data.path={case_dir}", *train],
        "cifar": ["train", "data.name=cifar10", f"data.path={case_dir}", *train],
        "stl": ["train", "data.name=stl10", f"data.path={case_dir}", *train],
        "image": ["train", "data.name=imagefolder", f"data.path={case_dir}", *train],
        "recipe": ["train", str(path), "--print-config"],
    }[kind]


def run_cli(words: list[str]) -> tuple[int, str]:
    from selfsup.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(words)
    return code, err.getvalue().strip()


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def run_corpus(root: Path) -> dict[str, Any]:
    """Every case of every kind: outcome counts, the failures (cases that did not end cleanly), the memory peak."""
    import torch

    torch.set_num_threads(1)
    files, read = valid_files(root), readers()
    failures, outcomes = [], {}
    for kind, (name, data) in files.items():  # warm up: imports, caches, plugins
        case_dir = root / "warm" / kind
        path = place(kind, case_dir, name, data)
        read[kind][0](path, case_dir)
        run_cli(cli_words(kind, place(kind, root / "warm-cli" / kind, name, b"\0" * 5), root / "warm-cli" / kind))
    baseline = maxrss_mb()
    for number, (kind, (name, data)) in enumerate(files.items()):
        reader, error_type = read[kind]
        counts = outcomes.setdefault(kind, {})
        for label, mutated in mutations(data, 1000 * number):
            case_dir = root / kind / label
            path = place(kind, case_dir, name, mutated)
            try:
                reader(path, case_dir)
                outcome = "ok"
            except error_type as error:
                outcome = type(error).__name__
                if "\n" in str(error) or len(str(error)) > 1000:
                    failures.append(f"{kind}/{label}: a message of {len(str(error))} chars over several lines")
            except Exception as error:  # noqa: BLE001 (the point: no other error may escape)
                outcome = f"ESCAPED {type(error).__name__}"
                failures.append(f"{kind}/{label}: {type(error).__name__}: {str(error)[:200]}")
            counts[outcome] = counts.get(outcome, 0) + 1
            if label.startswith(("random", "truncated0", "truncated1")):  # mostly invalid: through the CLI too
                cli_dir = root / "cli" / kind / label
                code, err = run_cli(cli_words(kind, place(kind, cli_dir, name, mutated), cli_dir))
                clean = code == 2 and err.startswith("selfsup: error: ") and "\n" not in err
                if not clean and (outcome != "ok" or code != 0):  # an empty recipe is a valid one, for instance
                    failures.append(f"{kind}/{label} via the CLI: exit {code}, stderr {err[:300]!r}")
    return {"outcomes": outcomes, "failures": failures, "maxrss_growth_mb": round(maxrss_mb() - baseline, 1),
            "baseline_mb": round(baseline, 1)}


def test_every_file_type_fails_cleanly_in_bounded_memory(tmp_path):
    import selfsup

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(selfsup.__file__).parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["failures"] == [], "\n".join(report["failures"])
    outcomes = report["outcomes"]
    assert set(outcomes) == {"checkpoint", "safetensors", "idx", "cifar", "stl", "image", "recipe"}
    for kind, counts in outcomes.items():  # every kind was exercised, and most mutations were refused
        assert sum(counts.values()) == len(SEEDS) + 6 + 8, (kind, counts)
        assert sum(n for outcome, n in counts.items() if outcome != "ok") >= len(SEEDS), (kind, counts)
    assert report["maxrss_growth_mb"] < MEMORY_BOUND_MB, report


if __name__ == "__main__":  # the corpus, in its own process (see the module docstring)
    print(json.dumps(run_corpus(Path(sys.argv[1]))))
