"""Scale pieces: the lr scaling rule (closed form, printed and logged at start), SyncBN's refusal on CPU processes,
the loss read on the host only on logging steps, and benchmarks/throughput.py on a tiny configuration."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from conftest import load_benchmark, tiny_config
from selfsup.config import ConfigError, OptimConfig
from selfsup.engine.schedules import lr_scaling_rule, scaled_lr
from selfsup.engine.trainer import Trainer
from selfsup.nn import distributed


def test_lr_scaling_rules_closed_form():
    for batch, reference in [(4096, 256), (32, 256), (256, 256), (1000, 3)]:
        ratio = batch / reference
        assert scaled_lr(OptimConfig(lr=0.3, reference_batch_size=reference), batch) == pytest.approx(0.3 * ratio)
        sqrt = OptimConfig(lr=0.3, reference_batch_size=reference, lr_scaling="sqrt")
        assert scaled_lr(sqrt, batch) == pytest.approx(0.3 * math.sqrt(ratio))
        assert scaled_lr(OptimConfig(lr=0.3, reference_batch_size=reference, lr_scaling="none"), batch) == 0.3
        for rule in ("linear", "sqrt", "none"):  # without a reference the rate is used as given
            assert scaled_lr(OptimConfig(lr=0.3, lr_scaling=rule), batch) == 0.3
    assert lr_scaling_rule(OptimConfig(lr=0.002, reference_batch_size=256), 16) == \
        "lr 0.002 x 16/256 (linear) = 0.000125"
    assert lr_scaling_rule(OptimConfig(lr=0.1, reference_batch_size=256, lr_scaling="sqrt"), 1024) == \
        "lr 0.1 x sqrt(1024/256) (sqrt) = 0.2"
    assert lr_scaling_rule(OptimConfig(lr=0.03), 512) == "lr 0.03 (not scaled with the batch size)"
    with pytest.raises(ConfigError, match="optim.lr_scaling"):
        scaled_lr(OptimConfig(lr_scaling="quadratic", reference_batch_size=256), 512)


def test_lr_rule_printed_and_logged_once_at_start(tmp_path, capsys):
    trainer = Trainer(tiny_config(tmp_path, "optim.reference_batch_size=256", "optim.lr_scaling=sqrt",
                                  "train.max_steps=2"))
    trainer.fit()
    peak = 0.05 * math.sqrt(32 / 256)
    assert trainer.base_lr == pytest.approx(peak)
    assert "lr 0.05 x sqrt(32/256) (sqrt) = 0.0176777" in capsys.readouterr().out
    records = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[0] == {"lr_scaling": "sqrt", "optim_lr": 0.05, "reference_batch_size": 256, "batch_size": 32,
                          "base_lr": pytest.approx(peak)}
    assert sum("lr_scaling" in r for r in records) == 1
    assert records[1]["step"] == 1 and records[1]["lr"] == pytest.approx(peak)  # cosine, no warm-up: the peak


def test_sync_bn_refused_on_cpu_processes_and_a_no_op_for_one(tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(tmp_path / "one", "train.sync_bn=true"))  # one process: nothing to synchronise
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in trainer.method.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in trainer.method.modules())
    # two CPU processes: torch's SyncBatchNorm has no CPU path (tests/dist_worker.py checks that), so the config
    # is refused before anything is built
    monkeypatch.setattr(distributed, "init_distributed", lambda device_type: distributed.DistInfo(0, 2, 0))
    with pytest.raises(ConfigError, match=r"train.sync_bn=true needs CUDA.*shuffle_bn"):
        Trainer(tiny_config(tmp_path / "two", "train.sync_bn=true"))


def test_loss_is_read_on_the_host_only_on_logging_steps(tmp_path, monkeypatch):
    """On CUDA a host read (.item / float) waits for the GPU: with the views made on the device, selfsup's code
    (trainer, method, queue, augmentation) reads tensors only every log_every_steps. (Finiteness and the
    pre-emption flag are checked every step on CPU only, where a read costs nothing; per-sample PIL views read
    their random parameters in the loader, off the device.)"""
    import selfsup

    package = str(Path(selfsup.__file__).parent)
    trainer = Trainer(tiny_config(tmp_path, "data.augment=batch", "train.log_every_steps=3", "train.max_steps=7"))
    reads: list[int] = []
    item, to_float = torch.Tensor.item, torch.Tensor.__float__

    def counted(read):
        def wrapper(self):
            if sys._getframe(1).f_code.co_filename.startswith(package):
                reads.append(trainer.step)
            return read(self)
        return wrapper

    monkeypatch.setattr(torch.Tensor, "item", counted(item))
    monkeypatch.setattr(torch.Tensor, "__float__", counted(to_float))
    trainer.fit()
    assert trainer.step == 7
    assert sorted(set(reads)) == [3, 6]


def test_throughput_benchmark_one_json_line_per_combination(capsys):
    bench = load_benchmark("throughput")
    tiny = ["--methods", "moco", "--backbones", "resnet_mini", "--batches", "16", "--image-size", "16",
            "--warmup", "1", "--steps", "2", "--device", "cpu", "--threads", "1", "method.queue_size=64",
            "method.dim=16"]
    results = bench.main([*tiny, "--augment", "per_sample", "batch"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines == results and [r["augment"] for r in results] == ["per_sample", "batch"]
    for r in results:
        assert (r["method"], r["backbone"], r["image_size"], r["batch"], r["synthetic"]) == (
            "moco", "resnet_mini", 16, 16, False)
        assert (r["precision"], r["channels_last"], r["peak_mem_kind"]) == ("fp32", False, "host_peak_rss")
        assert r["images_per_s"] == pytest.approx(16 / (r["data_s"] + r["step_s"]), rel=1e-2)
        assert r["data_s"] > 0 and r["step_s"] > 0 and r["peak_mem_mib"] > 0 and math.isfinite(r["loss"])
    (synthetic,) = bench.main([*tiny, "--synthetic"])  # one batch kept on the device: no loading
    assert synthetic["synthetic"] and synthetic["data_s"] < 0.01 < synthetic["step_s"] + 0.01
