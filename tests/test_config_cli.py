"""Configuration schema, overrides and the command line's error messages."""

from __future__ import annotations

import pytest
import yaml

from selfsup.cli import RECIPES, main
from selfsup.config import ConfigError, load_config


def test_overrides_and_method_selection():
    cfg = load_config(RECIPES / "quickstart.yaml", ["train.epochs=3", "optim.lr_decay_epochs=140,180"])
    assert cfg.train.epochs == 3 and cfg.method.name == "moco" and cfg.method.queue_size == 1024
    assert cfg.optim.lr_decay_epochs == [140, 180]
    byol = load_config(RECIPES / "quickstart.yaml", ["method=byol"])
    assert byol.method.name == "byol" and byol.method.momentum == 0.99  # paper defaults, recipe's moco keys gone


@pytest.mark.parametrize(("word", "message"), [
    ("train.epoch=3", "did you mean 'train.epochs'"),
    ("method.temprature=0.1", "did you mean 'method.temperature'"),
    ("trian.epochs=3", "did you mean 'train'"),
    ("train.epochs=many", "train.epochs expects an integer"),
    ("train.progress_bar=maybe", "expects true or false"),
    ("method=mocco", "did you mean 'moco'"),
    ("model.backbone=resnet_min", None),
])
def test_bad_keys_and_values_are_one_clear_error(word, message):
    if word.startswith("model.backbone"):
        from selfsup.models.backbones import build_backbone

        with pytest.raises(ConfigError, match="did you mean 'resnet_mini'"):
            build_backbone(load_config(None, [word]).model)
        return
    with pytest.raises(ConfigError, match=message):
        load_config(None, [word])


def test_cli_rejects_unknown_key_with_suggestion(capsys):
    assert main(["train", "train.epoch=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown key train.epoch" in err and "did you mean 'train.epochs'" in err
    assert "Traceback" not in err


def test_cli_print_config_resolves_recipe(capsys):
    assert main(["train", "quickstart", "train.epochs=7", "--print-config"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["train"]["epochs"] == 7 and resolved["data"]["name"] == "digits"


def test_every_packaged_recipe_loads():
    recipes = sorted(RECIPES.glob("*.yaml"))
    assert len(recipes) >= 4
    for path in recipes:
        load_config(path)


def test_seed_recipes_match_the_seed_command_lines():
    byol = load_config(RECIPES / "byol_resnet18_imagenet.yaml")
    assert (byol.method.name, byol.model.backbone, byol.optim.lr, byol.train.epochs, byol.method.momentum,
            byol.optim.schedule, byol.train.batch_size) == ("byol", "resnet18", 0.05, 200, 0.99, "cosine", 256)
    nette = load_config(RECIPES / "moco_v2_resnext50_imagenette.yaml")
    assert (nette.model.backbone, nette.train.batch_size, nette.method.temperature, nette.method.queue_size,
            nette.method.mlp, nette.method.augmentation, nette.optim.schedule, nette.train.epochs) == (
        "resnext50_32x4d", 32, 0.2, 16384, True, "aug+", "cosine", 600)
