"""Every configuration error before the first step, as one ``selfsup: error`` line (issue 17 item 5).

Values are checked by the rules each config field declares (``checked(...)`` in selfsup.config and the method
configs), data-dependent checks by :func:`selfsup.engine.preflight.preflight`; disk failures and torn run files
become one clear line too.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TINY, tiny_config
from selfsup.cli import main
from selfsup.config import (
    Config,
    ConfigError,
    DataConfig,
    Rule,
    check_config,
    checked,
    config_from_dict,
    field_rule,
    load_config,
)
from selfsup.data.datasets import build_dataset
from selfsup.engine.preflight import preflight
from selfsup.registry import METHODS


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("selfsup: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


BAD_VALUES = [  # override, what the message must say
    ("optim.schedule=cosin", "did you mean 'cosine'"),
    ("optim.name=adam", "optim.name='adam' is not valid"),
    ("train.precision=fp16", "train.precision='fp16'"),
    ("data.augment=gpu", "data.augment='gpu'"),
    ("train.epochs=0", "train.epochs must be at least 1"),
    ("train.epochs=-3", "train.epochs must be at least 1"),
    ("train.batch_size=0", "train.batch_size must be at least 1"),
    ("optim.lr=-0.1", "optim.lr must be at least 0"),
    ("method.queue_size=0", "method.queue_size must be at least 1"),
    ("train.checkpoint_every_epochs=0", "train.checkpoint_every_epochs must be at least 1"),
    ("train.log_every_steps=0", "train.log_every_steps must be at least 1"),
    ("eval.protocols=[knn,knnn]", "eval.protocols entry 'knnn' is not valid (did you mean 'knn'?)"),
    ("eval.knn_k=0", "eval.knn_k must be at least 1"),
    ("eval.knn_temperature=0", "eval.knn_temperature must be more than 0"),
    ("data.image_size=0", "data.image_size must be at least 1"),
    ("data.num_workers=-1", "data.num_workers must be at least 0"),
    ("data.crop_scale=[0.8,0.2]", "data.crop_scale=(0.8, 0.2) must be in increasing order"),
    ("data.crop_scale=[0,1]", "every value of data.crop_scale must be more than 0 and at most 1"),
    ("data.eval_crop_ratio=1.5", "data.eval_crop_ratio must be more than 0 and at most 1"),
    ("train.device=gpu", "train.device='gpu' is not valid; write auto, cpu, cuda or cuda:N"),
    ("optim.momentum=1.5", "optim.momentum must be at least 0 and at most 1"),
    ("eval.linear_holdout=1", "eval.linear_holdout must be more than 0 and less than 1"),
    ("launcher.nodes=0", "launcher.nodes must be at least 1"),
    ("method.queue_size=16", "method.queue_size=16 is smaller than train.batch_size=32"),
    ("model.pos_embed_resample=nearest", "model.pos_embed_resample='nearest'"),
    ("eval.duplicate_threshold=1.5", "eval.duplicate_threshold must be at least -1 and at most 1"),
    ("train.accumulate_steps=0", "train.accumulate_steps must be at least 1"),
    ("data.decode=nvjpeg", "data.decode='nvjpeg' is not valid; choose one of ['cpu', 'gpu']"),
]
METHOD_BAD_VALUES = [  # method, override, message: the method configs' own field rules
    ("msf", "method.bank_size=0", "method.bank_size must be at least 1"),
    ("msf", "method.topk=0", "method.topk must be at least 1"),
    ("isd", "method.teacher_temperature=0", "method.teacher_temperature must be more than 0"),
    ("isd_plus", "method.student_temperature=-1", "method.student_temperature must be more than 0"),  # inherited
    ("isd", "method.queue_init=uniform", "method.queue_init='uniform' is not valid"),
    ("byol", "method.momentum=2", "method.momentum must be at least 0 and at most 1"),
    ("mugs", "method.strong_prob=1.5", "method.strong_prob must be at least 0 and at most 1"),
    ("mugs", "method.local_crops_scale=[0.3,0.1]", "method.local_crops_scale=(0.3, 0.1) must be in increasing order"),
    ("mugs", "method.instance_queue_size=8", "method.instance_queue_size=8 is smaller than train.batch_size=32"),
    ("sela", "method.dtype=f16", "method.dtype='f16' is not valid (did you mean 'f64'?)"),
    ("sela", "method.ncl=0", "method.ncl must be at least 1"),
    ("moco", "method.augmentation=aug++", "method.augmentation='aug++' is not valid (did you mean 'aug+'?)"),
]


@pytest.mark.parametrize(("word", "message"), BAD_VALUES)
def test_bad_value_is_one_config_error_naming_the_key(word, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, ["train.batch_size=32", word])
    assert message in str(error.value)


@pytest.mark.parametrize(("method", "word", "message"), METHOD_BAD_VALUES)
def test_bad_method_value_is_one_config_error(method, word, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, [f"method={method}", "train.batch_size=32", word])
    assert message in str(error.value)


@pytest.mark.parametrize(("word", "message"), BAD_VALUES[:12] + [(w, m) for _, w, m in METHOD_BAD_VALUES[:2]])
def test_bad_value_through_the_cli_stops_before_any_step(tmp_path, capsys, word, message):
    words = [*TINY, f"train.output_dir={tmp_path / 'runs'}", word]
    if word.startswith("method.") and "queue" not in word:
        words = [w for w in words if not w.startswith("method.")] + ["method=msf", "method.bank_size=256", word]
    assert main(["train", *words]) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "runs").exists()  # nothing written, nothing trained


def test_protocol_choices_are_the_evaluations_protocols():
    from selfsup.config import EVAL_PROTOCOLS
    from selfsup.eval.protocols import PROTOCOLS

    assert set(EVAL_PROTOCOLS) == set(PROTOCOLS)


def test_defaults_and_every_method_default_pass_their_rules():
    check_config(Config())
    for name in METHODS:
        cfg = config_from_dict({"method": {"name": name}, "train": {"batch_size": 256}})
        assert cfg.method.name == name


def test_a_rule_is_declared_once_and_inherited_by_overriding_subclasses():
    @dataclass
    class Base:
        rate: float = checked(0.5, ge=0, le=1)
        sizes: list[int] = checked(factory=lambda: [1, 2], ge=1, ascending=True, max_items=3)

    @dataclass
    class Child(Base):
        rate: float = 0.25  # a new default, the same rule

    assert field_rule(Child, "rate") == Rule(ge=0, le=1) and Child().rate == 0.25
    assert Rule(ge=0, le=1).problem("x.rate", 1.5) == "x.rate must be at least 0 and at most 1, got 1.5"
    assert Rule(ge=0, le=1).problem("x.rate", None) is None  # an unset optional field
    rule = field_rule(Base, "sizes")
    assert rule.problem("x.sizes", [1, 1, 3]) is None
    assert "increasing order" in rule.problem("x.sizes", [2, 1])
    assert "at most 3 are allowed" in rule.problem("x.sizes", [1, 2, 3, 4])
    assert "every value of x.sizes must be at least 1" in rule.problem("x.sizes", [0, 1])
    assert dataclasses.fields(Child)[0].metadata == {}  # the override's own field carries no copy


def test_deeply_aliased_recipe_gives_a_short_error(tmp_path):
    laughs = ", ".join(["&a0 [1, 1]"] + [f"&a{k} [*a{k - 1}, *a{k - 1}]" for k in range(1, 40)])
    recipe = tmp_path / "laughs.yaml"
    recipe.write_text(f"train:\n  epochs: [{laughs}]\n")
    with pytest.raises(ConfigError) as error:  # 2**40 leaves if the message printed the value in full
        load_config(recipe)
    assert len(str(error.value)) < 400 and "train.epochs expects an integer" in str(error.value)


def test_recipe_that_is_not_text_is_a_config_error(tmp_path, capsys):
    recipe = tmp_path / "binary.yaml"
    recipe.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(recipe)
    assert main(["train", str(recipe)]) == 2
    assert "binary.yaml" in one_error_line(capsys)


# ---------------------------------------------------------------------------------------------
# preflight: what needs the data


def test_batch_larger_than_the_training_set(tmp_path, capsys):
    cfg = tiny_config(tmp_path, "data.subset=20")
    with pytest.raises(ConfigError, match=r"train.batch_size=32 is larger than the training set \(20 images"):
        preflight(cfg, build_dataset(cfg.data, cfg.data.train_split))
    assert main(["train", *TINY, f"train.output_dir={tmp_path / 'runs'}", "data.subset=20"]) == 2
    assert "raise data.subset" in one_error_line(capsys) and not (tmp_path / "runs").exists()
    fits = tiny_config(tmp_path, "data.subset=32")
    preflight(fits, build_dataset(fits.data, fits.data.train_split))


def image_folder(root: Path, splits: tuple[str, ...]) -> Path:
    rng = np.random.default_rng(0)
    for split in splits:
        for label in ("cat", "dog"):
            (root / split / label).mkdir(parents=True)
            for k in range(4):
                pixels = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{k}.png")
    return root


def test_missing_validation_split_stops_before_training(tmp_path, capsys):
    root = image_folder(tmp_path / "photos", ("train",))
    words = [*TINY, "data.name=imagefolder", f"data.path={root}", "data.subset=null", "train.batch_size=4",
             "method.queue_size=8", f"train.output_dir={tmp_path / 'runs'}", "train.max_steps=1"]
    cfg = load_config(None, [*words, "eval.at_end=true"])
    with pytest.raises(ConfigError, match=r"eval.protocols=knn,nn \(run at the end of training\) need the validation "
                                          r"split data.val_split='val'"):
        preflight(cfg, build_dataset(cfg.data, "train"))
    monitor = load_config(None, [*words, "eval.monitor_every_epochs=1"])
    with pytest.raises(ConfigError, match="eval.monitor_every_epochs=1 .the kNN monitor. need the validation split"):
        preflight(monitor, build_dataset(monitor.data, "train"))
    preflight(load_config(None, words), build_dataset(cfg.data, "train"))  # no evaluation: nothing to check
    assert main(["train", *words, "eval.at_end=true"]) == 2
    assert "eval.at_end=false" in one_error_line(capsys)
    assert not (tmp_path / "runs" / "run" / "checkpoint.pt").exists()  # stopped before the first step


# ---------------------------------------------------------------------------------------------
# disks that refuse a write


def test_output_folder_under_a_file_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the runs folder should go")
    assert main(["train", *TINY, f"train.output_dir={blocker / 'runs'}", "train.max_steps=1"]) == 1
    err = one_error_line(capsys)
    assert str(blocker) in err and "Not a directory" in err and "train.output_dir" in err


def test_full_disk_while_writing_the_checkpoint_names_it(tmp_path, capsys, monkeypatch):
    import torch

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")  # as a failed write() raises it: no file name

    monkeypatch.setattr(torch, "save", no_space)
    assert main(["train", *TINY, f"train.output_dir={tmp_path}", "train.max_steps=1"]) == 1
    err = one_error_line(capsys)
    assert str(tmp_path / "run" / "checkpoint.pt") in err and "the disk is full" in err
    assert not list((tmp_path / "run").glob(".checkpoint.pt.tmp-*"))  # the temporary file is gone


def test_full_disk_while_logging_names_the_output_folder(tmp_path, capsys, monkeypatch):
    import selfsup.engine.trainer as trainer_module

    def no_space(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trainer_module, "open", no_space, raising=False)  # the trainer's metrics.jsonl writes
    assert main(["train", *TINY, f"train.output_dir={tmp_path / 'runs'}", "train.max_steps=1"]) == 1
    assert f"a file under {tmp_path / 'runs'}" in one_error_line(capsys)


def test_full_disk_while_writing_config_yaml_names_it(tmp_path, monkeypatch):
    from selfsup.config import save_config

    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", no_space)
    with pytest.raises(OSError) as error:
        save_config(Config(), tmp_path / "config.yaml")
    assert error.value.filename == str(tmp_path / "config.yaml") and error.value.errno == errno.ENOSPC


# ---------------------------------------------------------------------------------------------
# torn run files


def test_torn_metrics_lines_are_skipped_with_one_warning(tmp_path):
    from selfsup.eval.report import read_metrics
    from selfsup.eval.run import TornFileWarning

    records = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    text = "\n".join(json.dumps(r) for r in records)
    # a crash cut line 3 short; the resumed run appended its next record to the same line
    (tmp_path / "metrics.jsonl").write_text(text + '\n{"step": 3, "lo{"step": 3, "loss": 1.2}\n{"epoch_end": 1}\n'
                                            + '{"step": 4, "lo')
    with pytest.warns(TornFileWarning, match=r"skipped 2 unreadable line\(s\) \(line 3, 5\)"):
        read = read_metrics(tmp_path)
    assert read == [*records, {"epoch_end": 1}]


def test_torn_eval_json_is_kept_aside_and_rewritten(tmp_path, capsys):
    from selfsup.api import train
    from selfsup.eval.run import TornFileWarning, read_scores

    train(tiny_config(tmp_path, "train.max_steps=1"))
    run = tmp_path / "run"
    (run / "eval.json").write_text('{"trained": {"nn": 12.5, "knn20')  # a kill during the write
    with pytest.warns(TornFileWarning, match="eval.json.unreadable"):
        assert main(["eval", str(run), "--protocol", "nn"]) == 0
    scores = read_scores(run / "eval.json")
    assert set(scores) == {"trained"} and set(scores["trained"]) == {"nn"}
    assert (run / "eval.json.unreadable").read_text().startswith('{"trained": {"nn": 12.5')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["eval", str(run), "--protocol", "nn"]) == 0  # a readable file merges silently
    assert not [w for w in caught if issubclass(w.category, TornFileWarning)]


def test_data_config_rules_apply_to_python_built_configs(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg.data = DataConfig(name="digits", image_size=16, crop_scale=(0.9, 0.1))  # built in Python: no load_config
    with pytest.raises(ConfigError, match="data.crop_scale"):
        preflight(cfg, build_dataset(cfg.data, "train"))
