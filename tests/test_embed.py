"""``selfsup embed RUN|BACKBONE_FILE FOLDER OUT``: one row per image, equal to the evaluation's features."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from conftest import TINY
from selfsup.cli import main
from selfsup.config import load_config
from selfsup.data.datasets import folder_images
from selfsup.data.loader import EvalDataset
from selfsup.data.transforms import transform_from_config
from selfsup.eval.embed import output_stem
from selfsup.eval.features import extract_features, pooled_on_grid
from selfsup.export import load_backbone


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Fifteen images of three sizes and modes, some in sub-folders."""
    root = tmp_path_factory.mktemp("embed") / "images"
    rng = np.random.default_rng(0)
    for i in range(15):
        size = [(12, 12), (20, 14), (9, 17)][i % 3]
        path = root / ("nested/deeper" if i % 4 == 0 else "") / f"{i:02d}.{['png', 'jpg'][i % 2]}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(
            "L" if i % 5 == 0 else "RGB").save(path)
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """Two MoCo steps on digits, scored (and so embedded) on a 2 x 2 grid of the last map."""
    out = tmp_path_factory.mktemp("embed-run")
    assert main(["train", "quickstart", *TINY, "train.max_steps=2", f"train.output_dir={out}", "eval.pool_grid=2"]) == 0
    return out / "run"


def eval_features(backbone: torch.nn.Module, overrides: list[str], folder: Path, normalize: bool) -> torch.Tensor:
    """What the evaluation protocols compute for these images: the eval transform, eval.pool_grid, extract_features."""
    cfg = load_config(None, overrides)
    dataset = EvalDataset(folder_images(folder), transform_from_config(cfg.data, "eval"))
    with pooled_on_grid(backbone, cfg.eval.pool_grid) as pooled:
        features, _ = extract_features(pooled, DataLoader(dataset, batch_size=4), "cpu", normalize=normalize)
    return features


def read_rows(stem: Path) -> tuple[np.ndarray, list[str]]:
    with open(f"{stem}.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["index", "path"] and [int(r[0]) for r in rows[1:]] == list(range(len(rows) - 1))
    return np.load(f"{stem}.npy"), [r[1] for r in rows[1:]]


def test_embed_rows_equal_the_eval_features_of_a_run(run, images, tmp_path, capsys):
    assert main(["embed", str(run), str(images), str(tmp_path / "emb.npy"), "--batch-size", "6", "--device",
                 "cpu"]) == 0
    assert "15 images x 256 features (L2-normalised)" in capsys.readouterr().out  # 64 channels x 2 x 2
    features, paths = read_rows(tmp_path / "emb")
    assert features.dtype == np.float32 and features.shape == (15, 256)
    assert paths == sorted(str(p) for p in images.rglob("*.*")) and paths == folder_images(images).paths
    exported = tmp_path / "backbone.safetensors"
    assert main(["export", str(run), str(exported)]) == 0
    cfg_words = [f"{key}={value}" for key, value in (("data.image_size", 16), ("data.eval_crop_ratio", 1.0),
                                                     ("eval.pool_grid", 2))]
    expected = eval_features(load_backbone(exported), cfg_words, images, normalize=True)
    np.testing.assert_allclose(features, expected.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, rtol=1e-5)


def test_embed_a_backbone_file_raw(run, images, tmp_path):
    exported = tmp_path / "backbone.pt"
    assert main(["export", str(run), str(exported)]) == 0
    words = ["data.image_size=20", "data.eval_crop_ratio=0.8"]  # a backbone file's eval transform: the overrides
    assert main(["embed", str(exported), str(images), str(tmp_path / "raw"), *words, "--raw", "--workers", "1"]) == 0
    features, paths = read_rows(tmp_path / "raw")
    expected = eval_features(load_backbone(exported), words, images, normalize=False)
    assert features.shape == (15, 64) and paths == folder_images(images).paths  # the backbone's own pooling
    np.testing.assert_allclose(features, expected.numpy(), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.linalg.norm(features, axis=1), 1.0)


def test_unreadable_images_stop_with_their_path_or_are_left_out(run, images, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for source in sorted(images.rglob("*.png"))[:3]:
        (broken / source.name).write_bytes(source.read_bytes())
    (broken / "00.png").write_bytes(b"not a png")  # the first of four
    assert main(["embed", str(run), str(broken), str(tmp_path / "e")]) == 2
    assert "cannot read image" in capsys.readouterr().err and not (tmp_path / "e.npy").exists()
    assert main(["embed", str(run), str(broken), str(tmp_path / "e"), "--skip-corrupt"]) == 0
    assert "left out 1 unreadable image(s), e.g. " in capsys.readouterr().out
    features, paths = read_rows(tmp_path / "e")
    assert features.shape[0] == 3 and [Path(p).name for p in paths] == sorted(p.name for p in broken.iterdir())[1:]


def test_parquet_is_written_with_pyarrow_and_skipped_cleanly_without(run, images, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError, installed or not
    assert main(["embed", str(run), str(images), str(tmp_path / "without")]) == 0
    assert "no .parquet written: pyarrow is not installed" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["without.csv", "without.npy"]
    monkeypatch.undo()
    pytest.importorskip("pyarrow.parquet")
    import pyarrow.parquet as pq

    assert main(["embed", str(run), str(images), str(tmp_path / "with.parquet")]) == 0
    table = pq.read_table(tmp_path / "with.parquet").to_pydict()
    features, paths = read_rows(tmp_path / "with")
    assert table["index"] == list(range(15)) and table["path"] == paths
    np.testing.assert_array_equal(np.array(table["embedding"], dtype=np.float32), features)


def test_output_names():
    assert output_stem("a/emb.npy") == Path("a/emb") == output_stem("a/emb") == output_stem("a/emb.parquet")
    assert output_stem("emb.v2") == Path("emb.v2")
