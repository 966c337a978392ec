"""benchmarks/gpu_check.py on the CPU: the dry run (``--device cpu --quick``, the code the GPU runs at CPU sizes)
writes every section with finite figures and the tables; the torchrun section's queue checks on two gloo
processes; a failing or overrunning section is recorded and the next one still runs; the kNN/Sinkhorn sizing."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from conftest import load_benchmark

bench = load_benchmark("gpu_check")
CPU = ["--device", "cpu", "--quick", "--threads", "1"]
TRAINING = [*(f"method:{m}" for m in bench.METHODS), "readme:moco_r18_b512", "readme:byol_r18_b512",
            "readme:moco_r50_224"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """Every section but torchrun (its own test) and compile (torch.compile is rehearsed in
    test_gpu_paths_on_cpu.py; inductor's CPU build of a training step takes about a minute here)."""
    out = tmp_path_factory.mktemp("gpu_check")
    return out, bench.main(["--out", str(out), *CPU, "--skip", "torchrun", "compile"])


def test_dry_run_records_every_section_with_finite_figures(dry_run):
    out, results = dry_run
    assert json.loads((out / "gpu_check.json").read_text()) == results
    assert results["finished"] and results["environment"]["device_type"] == "cpu"
    sections = results["sections"]
    assert list(sections) == [*TRAINING, "readme:two_stage_photos", "readme:gpu_decode_photos", "torchrun", "knn",
                              "sinkhorn", "compile"]  # quick
    assert sections["readme:gpu_decode_photos"] == {"status": "skipped", "note": "data.decode=gpu needs CUDA (nvjpeg)"}
    for name in TRAINING:
        r = sections[name]
        assert r["status"] == "ok", (name, r)
        assert r["timed_steps"] == 2 and r["augment"] == "batch"
        for key in ("images_per_s", "step_ms", "loss", "first_step_s", "host_peak_rss_mib", "seconds"):
            assert math.isfinite(r[key]) and r[key] >= 0, (name, key, r[key])
        assert r["images_per_s"] == pytest.approx(1000 * r["batch"] / r["step_ms"], rel=0.02)
    for name in ("readme:moco_r18_b512", "readme:byol_r18_b512"):
        r = sections[name]
        assert r["minutes_per_200_epochs_50k"] == pytest.approx(200 * 50_000 / r["images_per_s"] / 60, rel=0.01)
    photos = sections["readme:two_stage_photos"]  # only a checkout with the two-stage path trains on the photos
    assert photos["status"] == "ok" or (photos["status"] == "not_available" and "not available in this checkout"
                                        in photos["note"]), photos
    for name in ("torchrun", "compile"):
        assert sections[name] == {"status": "skipped", "note": "not selected (--only / --skip)"}
    knn, sinkhorn = sections["knn"], sections["sinkhorn"]
    assert knn["status"] == sinkhorn["status"] == "ok"
    assert (knn["rows"], knn["dim"], knn["queries"]) == bench.CPU.knn  # the CPU sizes fit: full size after the probe
    assert (sinkhorn["rows"], sinkhorn["clusters"]) == bench.CPU.sinkhorn[:2] and sinkhorn["iterations"] > 0
    assert knn["probe_rows"] == 4096 // 8 and sinkhorn["sinkhorn_error"] <= 0.1


def test_dry_run_tables(dry_run):
    out, results = dry_run
    table = (out / "gpu_check.md").read_text()
    for name, r in results["sections"].items():
        assert f"| {name} | {r['status']} |" in table
    assert "| method:moco | ok |" in table and "images_per_s" in table
    readme = table[table.index("README GPU table"):]
    assert "| MoCo-v2, resnet_mini, 16 px, batch 16, on-device augmentation |" in readme
    assert "kNN (20-NN weighted + 1-NN), 256 queries over 4,096 x 64 float32" in readme
    assert "SeLa labels (P^λ, Sinkhorn-Knopp, argmax), 4,096 x 30 float64" in readme
    assert ("two-stage data path" in readme) == (results["sections"]["readme:two_stage_photos"]["status"] == "ok")
    assert (out / "logs" / "method_moco.log").read_text().count("run folder:") == 1  # the trainer's own output


def test_torchrun_section_checks_the_queue_on_two_gloo_processes(tmp_path):
    results = bench.main(["--out", str(tmp_path), *CPU, "--only", "torchrun"])
    r = results["sections"]["torchrun"]
    assert r["status"] == "ok", r
    assert (r["world_size"], r["backend"], r["ddp"], r["nproc"]) == (2, "gloo", True, 2)
    assert r["checks"] == {"queue_equals_gathered_keys": True, "pointer_after_all_keys": True,
                           "same_queue_on_every_rank": True, "queue_ids_equal_gathered_ids": True,
                           "ids_in_global_batch_order": True}
    assert math.isfinite(r["loss"]) and r["images_per_s"] > 0


def test_a_failure_and_an_overrun_are_recorded_and_the_next_section_still_runs(tmp_path):
    check = bench.Check(tmp_path, torch.device("cpu"), quick=True, budget=120, threads=1)
    on_disk: dict = {}

    def broken(check, cap):
        raise ValueError("deliberately broken")

    def endless(check, cap):
        time.sleep(60)  # the section's 1 s cap interrupts it

    def reads_the_file(check, cap):
        on_disk.update(json.loads((tmp_path / "gpu_check.json").read_text())["sections"])
        return {"images_per_s": 2.0}

    sections = [bench.Section("too_big", reads_the_file, cap=30, minimum=10_000),  # needs more than the budget
                bench.Section("broken", broken, cap=30, minimum=0), bench.Section("endless", endless, cap=1, minimum=0),
                bench.Section("after", reads_the_file, cap=30, minimum=0)]
    try:
        bench.run_sections(check, sections)
    finally:
        check.close()
    results = check.results["sections"]
    assert results["broken"]["status"] == "failed" and results["broken"]["error"] == "ValueError: deliberately broken"
    assert results["endless"]["status"] == "timeout" and results["endless"]["seconds"] < 30
    assert results["after"]["status"] == "ok" and results["after"]["images_per_s"] == 2.0
    assert results["too_big"]["status"] == "skipped" and "no time left" in results["too_big"]["note"]
    # the file was rewritten after each section: the third saw the first two finished and itself running
    assert [on_disk[n]["status"] for n in ("broken", "endless", "after")] == ["failed", "timeout", "running"]
    assert "deliberately broken" in (tmp_path / "logs" / "broken.log").read_text()  # with its traceback
    assert "| broken | failed |" in (tmp_path / "gpu_check.md").read_text()


def test_large_runs_take_the_size_that_fits_the_time_left(tmp_path):
    """A probe of 1,000 rows "takes" 10 s (1e-2 s a row, reported, not timed): with ~95 s left and a 1.5x margin
    the run takes ~6,300 of the 100,000 rows; with all the time it needs, the full size."""
    check = bench.Check(tmp_path, torch.device("cpu"), quick=True, budget=120, threads=1)
    sizes: list[int] = []

    def run_at(rows: int) -> dict:
        sizes.append(rows)
        return {"rows": rows, "run_s": rows * 1e-2, "peak_bytes": rows * 100}

    try:
        partial = bench.sized_run(run_at, 100_000, 1000, check, cap=100, started=time.monotonic())
        full = bench.sized_run(run_at, 100_000, 1000, check, cap=10_000, started=time.monotonic())
    finally:
        check.close()
    assert sizes[0] == 1000 and 6000 <= sizes[1] <= int(95 / 0.015) and sizes[2:] == [1000, 100_000]
    assert partial["rows"] == sizes[1] and "remaining time" in partial["note"]
    assert partial["estimated_full_s"] == 1000.0 and partial["probe_s"] == 10.0
    assert full["rows"] == 100_000 and "note" not in full


def test_compile_section_bookkeeping(tmp_path, monkeypatch):
    """compile time = first compiled step - first eager step; speed-up over method:moco; a missing toolchain is a
    recorded skip (the compiled training itself is rehearsed in test_gpu_paths_on_cpu.py)."""
    check = bench.Check(tmp_path, torch.device("cpu"), quick=True, budget=120, threads=1)
    try:
        monkeypatch.setattr(bench, "compiler_missing", lambda device: "no C++ compiler")
        assert bench.compile_section(check, 60) == {"status": "skipped", "note": "no C++ compiler"}
        monkeypatch.setattr(bench, "compiler_missing", lambda device: None)
        words: list[list[str]] = []
        monkeypatch.setattr(bench.Check, "train", lambda self, name, w: words.append(w) or
                            {"images_per_s": 300.0, "first_step_s": 41.0})
        check.results["sections"]["method:moco"] = {"status": "ok", "images_per_s": 200.0, "first_step_s": 1.0}
        figures = bench.compile_section(check, 60)
    finally:
        check.close()
    assert "train.compile=true" in words[0] and "method=moco" in words[0]
    assert figures == {"images_per_s": 300.0, "first_step_s": 41.0, "eager_images_per_s": 200.0, "speedup": 1.5,
                       "compile_s": 40.0}


def test_section_selection_by_name_or_prefix():
    assert bench.selected("method:moco", ["method"], None) and bench.selected("method:moco", None, ["readme"])
    assert not bench.selected("method:moco", ["readme", "knn"], None) and not bench.selected("knn", None, ["knn"])
    assert bench.selected("readme:moco_r50_224", ["readme:moco_r50_224"], None)
