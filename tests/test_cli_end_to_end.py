"""The command line end to end on a tiny run: train + evaluate, eval a saved run, resume, divergence."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY
from selfsup.cli import main
from selfsup.engine.checkpoint import load_checkpoint
from selfsup.engine.trainer import NonFiniteLossError, Trainer
from selfsup.eval.run import evaluate_checkpoint


def _words(tmp_path, *extra):
    return [*TINY, f"train.output_dir={tmp_path}", "train.epochs=1", *extra]


def test_train_then_eval_reports_trained_and_random_init(tmp_path, capsys):
    assert main(["train", "quickstart", *_words(tmp_path, "eval.at_end=true")]) == 0
    out = capsys.readouterr().out
    assert "trained" in out and "random_init" in out and "knn20_T0.07" in out
    run = tmp_path / "run"
    assert {"config.yaml", "metrics.jsonl", "checkpoint.pt", "eval.json"} <= {p.name for p in run.iterdir()}
    scores = json.loads((run / "eval.json").read_text())
    for column in ("trained", "random_init"):
        assert set(scores[column]) == {"nn", "knn20_T0.07", "knn20_vote"}
        assert all(10.0 <= v <= 100.0 for v in scores[column].values())  # 10 classes: above chance
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))  # 256 images / batch 32, logged every step
    assert all(r["lr"] > 0 and r["loss"] > 0 for r in steps)

    assert main(["eval", str(run), "--protocol", "knn,nn"]) == 0
    assert "knn20_vote" in capsys.readouterr().out
    again = evaluate_checkpoint(run, ["knn", "nn"], random_init=True)
    for column in scores:  # same weights and seed: the same numbers as at the end of training
        assert again[column] == pytest.approx(scores[column])

    assert main(["eval", str(run), "--protocol", "cluster,align"]) == 0
    merged = json.loads((run / "eval.json").read_text())["trained"]
    expected = {"nn", "knn20_T0.07", "cluster_nmi", "cluster_ami", "cluster_ari", "cluster_label_acc", "align"}
    assert expected <= set(merged)
    assert all(0.0 <= merged[k] <= 100.0 for k in ("cluster_nmi", "cluster_label_acc", "align"))
    assert merged["align"] > 10.0  # above chance on 10 classes


def test_eval_unknown_protocol_and_missing_run(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nowhere")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["train", *_words(tmp_path)]) == 0
    assert main(["eval", str(tmp_path / "run"), "--protocol", "knnn"]) == 2
    assert "unknown evaluation protocol 'knnn'" in capsys.readouterr().err


def test_resume_from_the_command_line_continues_the_run(tmp_path):
    assert main(["train", *_words(tmp_path, "train.epochs=2", "train.max_steps=3")]) == 0
    assert load_checkpoint(tmp_path / "run")["step"] == 3
    assert main(["train", "--resume", str(tmp_path / "run"), "train.max_steps=null"]) == 0
    state = load_checkpoint(tmp_path / "run")
    assert (state["step"], state["epoch"]) == (16, 2)


def test_divergence_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path):
    from conftest import tiny_config

    trainer = Trainer(tiny_config(tmp_path / "early", "optim.lr=1e30"))  # diverges before any checkpoint
    with pytest.raises(NonFiniteLossError, match="no checkpoint had been written yet"):
        trainer.fit()
    assert not (tmp_path / "early" / "run" / "checkpoint.pt").exists()

    Trainer(tiny_config(tmp_path / "late", "train.epochs=1")).fit()  # a good checkpoint at epoch 1, then diverge
    trainer = Trainer(tiny_config(tmp_path / "late", "train.epochs=2", "train.resume=auto", "optim.lr=1e30"))
    with pytest.raises(NonFiniteLossError, match="last good checkpoint is kept at"):
        trainer.fit()
    state = load_checkpoint(tmp_path / "late" / "run")
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["method"].values()
                                       if isinstance(v, torch.Tensor) and v.is_floating_point())


def test_resume_with_a_different_model_is_one_clear_error(tmp_path, capsys):
    assert main(["train", *_words(tmp_path, "train.max_steps=2")]) == 0
    assert main(["train", *_words(tmp_path, "method.dim=8", "train.resume=auto")]) == 2
    err = capsys.readouterr().err
    assert "different configuration" in err and "--resume" in err and "Traceback" not in err
