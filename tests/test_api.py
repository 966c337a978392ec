"""The public Python API: the README's example as written, and each entry point on tiny inputs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

import selfsup
from conftest import TINY
from selfsup.api import RunResult, feature_width, register_dataset_object, register_module
from selfsup.config import ConfigError, DataConfig, ModelConfig
from selfsup.data.datasets import build_dataset
from selfsup.data.transforms import transform_from_config
from selfsup.engine.trainer import method_for
from selfsup.models.backbones import backbone_factory, build_backbone
from selfsup.recipe_files import RECIPES

README = Path(__file__).parents[1] / "README.md"


def readme_example() -> str:
    """The first python block of the README's "Python API" section."""
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_python_api_example_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_example(), "README.md (Python API)", "exec"), namespace)
    result, own = namespace["result"], namespace["own"]
    assert isinstance(result, RunResult) and result.run_dir == Path("runs/api-demo") and result.run_dir.is_dir()
    assert {"nn", "knn20_T0.07", "knn20_vote"} == set(result.scores["trained"]) and "random_init" in result.scores
    assert json.loads((result.run_dir / "eval.json").read_text())["trained"]["rankme"] == \
        namespace["scores"]["trained"]["rankme"]  # evaluate() merged its scores into eval.json
    features, paths = namespace["features"], namespace["paths"]
    assert features.shape == (30, 64) and features.dtype == np.float32 and len(paths) == 30
    assert paths == sorted(str(p) for p in Path("my_images").iterdir())
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, rtol=1e-5)
    backbone = namespace["backbone"]
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(backbone(image), result.backbone.cpu().eval()(image))
    assert own.config.model.backbone.startswith("python:Sequential-") and own.config.data.name.startswith(
        "python:FakeData-")
    assert torch.load(own.run_dir / "checkpoint.pt", weights_only=True)["step"] == 10


def test_load_config_takes_recipe_names_paths_and_overrides():
    by_name = selfsup.load_config("quickstart", ["train.epochs=3"])
    by_path = selfsup.load_config(RECIPES / "quickstart.yaml", ["train.epochs=3"])
    assert by_name == by_path and by_name.train.epochs == 3 and by_name.method.name == "moco"
    assert selfsup.load_config() == selfsup.config.load_config()  # no recipe: the defaults
    with pytest.raises(ConfigError, match="recipe 'quikstart' not found; give a YAML path or one of: .*quickstart"):
        selfsup.load_config("quikstart")


def test_train_takes_a_config_plus_overrides_without_changing_it(tmp_path):
    cfg = selfsup.load_config(None, [*TINY, f"train.output_dir={tmp_path}"])
    result = selfsup.train(cfg, ["train.max_steps=1", "train.run_name=one"])
    assert result.run_dir == tmp_path / "one" and result.scores == {}  # TINY: eval.at_end=false
    assert cfg.train.max_steps is None and cfg.train.run_name == "run"
    assert result.config.train.max_steps == 1


class TwoConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.AdaptiveAvgPool2d(2), nn.Flatten())

    def forward(self, x):
        return self.body(x)


def test_a_module_backbone_gives_every_build_a_fresh_copy(tmp_path):
    net = TwoConvs()
    assert feature_width(net, 16) == 48 and net.training  # 12 channels x 2 x 2, the training flag restored
    name = register_module(net, image_size=16)
    assert re.fullmatch(r"python:TwoConvs-\d+", name)
    first, width = build_backbone(ModelConfig(backbone=name))
    second, _ = backbone_factory(ModelConfig(backbone=name))()
    assert width == 48 and first is not second and first is not net
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(first.parameters(), second.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), net.parameters(), strict=True))
    cfg = selfsup.load_config(None, ["method=byol", *[w for w in TINY if not w.startswith("method.")],
                                     f"model.backbone={name}"])
    method = method_for(cfg, 256, 10)
    online = {p.data_ptr() for p in method.net.encoder_q.backbone.parameters()}
    assert not online & {p.data_ptr() for p in method.net.encoder_k.backbone.parameters()}  # a separate teacher
    assert register_module(net, width=7) != name and build_backbone(ModelConfig(
        backbone=register_module(net, width=7)))[1] == 7  # (module, width): the width as given


def test_a_backbone_that_does_not_fit_the_image_size_is_one_clear_error():
    picky = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    with pytest.raises(ConfigError, match=r"fails on a batch of 16-px images .*backbone=\(module, feature_width\)"):
        register_module(picky, image_size=16)
    assert feature_width(picky, 8) == 4


class Photos(Dataset):
    """PIL images, numpy arrays or tensors, alone or with labels."""

    def __init__(self, n: int, kind: str = "pil", labelled: bool = True):
        self.n, self.kind, self.labelled = n, kind, labelled
        self.calls = 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.calls += 1
        pixels = np.full((10, 10, 3), i, dtype=np.uint8)
        image = {"pil": Image.fromarray(pixels).convert("L"), "array": pixels,
                 "tensor": torch.from_numpy(pixels).permute(2, 0, 1)}[self.kind]
        return (image, i % 3) if self.labelled else image


def test_a_torch_dataset_becomes_an_image_dataset_with_a_held_out_split():
    name = register_dataset_object(Photos(50, "array"))
    train, val = build_dataset(DataConfig(name=name), "train"), build_dataset(DataConfig(name=name), "val")
    assert (len(train), len(val)) == (44, 6) and train.classes == ["0", "1", "2"]  # 2 of 17, 17 and 16
    assert sorted(np.concatenate([train.indices, val.indices]).tolist()) == list(range(50))
    image, label = val[0]
    index = int(val.indices[0])
    assert image.mode == "RGB" and image.size == (10, 10) and np.asarray(image)[0, 0, 0] == index
    assert label == index % 3 and val.describe(0) == f"{name}[{index}]"
    unlabelled = build_dataset(DataConfig(name=register_dataset_object(Photos(20, "tensor", labelled=False))), "all")
    assert unlabelled.classes == [] and (unlabelled.targets == -1).all() and np.asarray(unlabelled[3][0])[0, 0, 0] == 3
    own_val = Photos(4)
    both = register_dataset_object(Photos(12), own_val)
    assert len(build_dataset(DataConfig(name=both), "train")) == 12
    assert build_dataset(DataConfig(name=both), "val").dataset is own_val
    labelled = Photos(6)
    labelled.targets, labelled.classes = [0, 1, 0, 1, -1, 1], ["cat", "dog"]  # no pass over the items needed
    ds = build_dataset(DataConfig(name=register_dataset_object(labelled), val_fraction=0.0), "train")
    assert labelled.calls == 1 and ds.classes == ["cat", "dog"] and ds.targets.tolist() == [0, 1, 0, 1, -1, 1]


def test_generated_names_from_another_process_are_explained():
    with pytest.raises(ConfigError, match="torch Dataset given to selfsup.train\\(\\) in another Python process"):
        build_dataset(DataConfig(name="python:Photos-999"), "train")
    with pytest.raises(ConfigError, match="nn.Module given to selfsup.train\\(\\) in another Python process"):
        backbone_factory(ModelConfig(backbone="python:TwoConvs-999"))


def test_evaluate_and_embed_a_module_a_file_and_a_dataset(tmp_path):
    net = TwoConvs()
    photos = Photos(40, labelled=False)
    words = ["data.image_size=16", "data.eval_crop_ratio=1.0"]
    scores = selfsup.evaluate(net, ["rankme", "knn"], words, dataset=photos, device="cpu")
    assert set(scores["trained"]) == {"rankme", "feature_std", "feature_std_x_sqrt_d"}  # knn: no labels, skipped
    with pytest.raises(ConfigError, match="random_init=True needs a run or a backbone file"):
        selfsup.evaluate(net, ["rankme"], words, random_init=True)
    features, names = selfsup.embed(net, photos, words, progress=False, normalize=False)
    assert features.shape == (40, 48) and names == [f"Photos[{i}]" for i in range(40)]
    transform = transform_from_config(DataConfig(image_size=16, eval_crop_ratio=1.0), "eval")
    with torch.no_grad():
        expected = net.eval()(torch.stack([transform(photos[i].convert("RGB")) for i in (0, 39)]))
    np.testing.assert_allclose(features[[0, 39]], expected.numpy(), rtol=1e-5, atol=1e-6)
