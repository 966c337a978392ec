"""benchmarks/data_throughput.py on a tiny generated photo folder: the records' keys and values (no timing
thresholds), the cached folder, the profile and the unavailable-pipeline error."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
from PIL import Image


def load_script(name: str):
    """``benchmarks/<name>.py`` as a module registered in ``sys.modules`` (its dataclasses need that)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


bench = load_script("data_throughput")

TINY = ["--images", "24", "--classes", "3", "--batch", "8", "--warmup", "1", "--batches", "2", "--workers", "0",
        "--size", "32", "--local-size", "16", "--num-local", "2", "--device", "cpu"]
KEYS = {"pipeline", "views", "workers", "device", "device_name", "cpu", "nproc", "torch_threads", "folder", "batch",
        "images_per_s", "images_per_s_per_core", "cores_busy", "images_per_cpu_s", "stage1_s", "stage2_s",
        "num_views", "view_shapes", "load_avg_1m"}


def test_both_view_layouts(tmp_path, capsys):
    rows = bench.main([*TINY, "--cache", str(tmp_path), "--views", "2x224", "mugs"])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == rows and [r["views"] for r in rows] == ["2x224", "mugs"]
    for row in rows:
        assert set(row) >= KEYS, KEYS - set(row)
        assert row["pipeline"] == "torchvision" and row["workers"] == 0 and row["batch"] == 8
        for key in ("images_per_s", "images_per_s_per_core", "stage1_s"):
            assert math.isfinite(row[key]) and row[key] > 0, key
        assert row["images_per_s_per_core"] == row["images_per_s"]  # 0 workers: the main process
        assert row["stage2_s"] >= 0
        assert row["cores_busy"] is None or row["cores_busy"] > 0
    assert rows[0]["num_views"] == 2 and rows[0]["view_shapes"] == [[3, 32, 32]]
    assert rows[1]["num_views"] == 4 + 2 and rows[1]["view_shapes"] == [[3, 16, 16], [3, 32, 32]]


def test_photo_folder_is_generated_once(tmp_path, monkeypatch):
    folder = bench.build_photo_folder(tmp_path, images=24, classes=3)
    files = sorted(folder.rglob("*.jpg"))
    assert len(files) == 24 and sorted(p.name for p in folder.iterdir()) == ["class_00", "class_01", "class_02"]
    for path in files[:6]:
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert all(250 <= side <= 500 for side in image.size)
    stamps = {p: p.stat().st_mtime_ns for p in files}

    def no_writes(*args, **kwargs):
        raise AssertionError("the cached photos were generated again")

    with monkeypatch.context() as patch:
        patch.setattr(Image.Image, "save", no_writes)
        assert bench.build_photo_folder(tmp_path, images=24, classes=3) == folder
        rows = bench.main([*TINY, "--cache", str(tmp_path), "--views", "2x224"])
    assert rows[0]["folder"] == str(folder)
    assert {p: p.stat().st_mtime_ns for p in sorted(folder.rglob("*.jpg"))} == stamps
    assert bench.build_photo_folder(tmp_path, images=6, classes=3) != folder  # other photos, another folder
    # --folder takes an ImageFolder root or its train split
    assert bench.image_folder(folder.parent) == folder == bench.image_folder(folder)
    with pytest.raises(SystemExit, match="not an ImageFolder"):
        bench.image_folder(folder / "class_00")


def test_profile_names_the_steps(tmp_path):
    rows = bench.main([*TINY, "--cache", str(tmp_path), "--views", "2x224", "--profile"])
    steps = {r["step"]: r for r in rows}
    for step in ("decode (open + convert RGB)", "RandomResizedCrop", "RandomApply(ColorJitter)", "ToTensor",
                 "Normalize", "collate", "copy to device", "total"):
        assert step in steps, step
    assert all(r["ms_per_image"] >= 0 and r["profile"] == "torchvision" for r in rows)
    parts = sum(r["ms_per_image"] for r in rows if r["step"] != "total")
    assert parts == pytest.approx(steps["total"]["ms_per_image"], rel=0.02, abs=0.01)
    assert steps["total"]["images_per_cpu_s"] > 0


def test_two_stage_pipeline_records_both_layouts(tmp_path):
    rows = bench.main([*TINY, "--cache", str(tmp_path), "--pipeline", "two_stage", "torchvision",
                       "--views", "2x224", "mugs"])
    assert [(r["pipeline"], r["views"]) for r in rows] == [("two_stage", "2x224"), ("two_stage", "mugs"),
                                                            ("torchvision", "2x224"), ("torchvision", "mugs")]
    for row in rows:
        assert set(row) >= KEYS, KEYS - set(row)
        assert math.isfinite(row["images_per_s"]) and row["images_per_s"] > 0
    two, tv = rows[0], rows[2]
    assert (two["num_views"], two["view_shapes"]) == (tv["num_views"], tv["view_shapes"])
    assert (rows[1]["num_views"], rows[1]["view_shapes"]) == (rows[3]["num_views"], rows[3]["view_shapes"])
