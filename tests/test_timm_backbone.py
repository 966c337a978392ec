"""``model.backbone=timm:<name>``: any timm model, randomly initialised, trained, exported and rebuilt."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from conftest import TINY
from selfsup.cli import main
from selfsup.config import ConfigError, ModelConfig
from selfsup.engine.checkpoint import load_checkpoint
from selfsup.export import load_backbone, read_backbone
from selfsup.models.backbones import backbone_factory, build_backbone, is_backbone

TINY_TIMM = "timm:test_resnet"  # timm's own 0.37M-parameter test ResNet


def test_a_timm_model_by_name_with_its_feature_width():
    net, width = build_backbone(ModelConfig(backbone=TINY_TIMM))
    reference = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    assert width == reference.num_features == 96
    assert net.state_dict().keys() == reference.state_dict().keys()  # timm's own keys, no classifier
    assert not any("fc" in key for key in net.state_dict())
    assert net.eval()(torch.zeros(2, 3, 16, 16)).shape == (2, 96)
    assert is_backbone(TINY_TIMM) and not is_backbone("timm:no_such_model")


def test_the_width_is_what_the_forward_gives_for_a_pre_logits_head():
    # MobileNetV3 pools 288 channels, then a 1x1 conv to 1024 before the classifier: the features are 1024 wide
    net, width = build_backbone(ModelConfig(backbone="timm:mobilenetv3_small_050"))
    with torch.no_grad():
        out = net.eval()(torch.zeros(1, 3, 32, 32))
    assert net.num_features == 288 and width == out.shape[1] == 1024


def test_unknown_timm_names_and_selfsup_only_keys_are_clear_errors():
    with pytest.raises(ConfigError, match=r"model.backbone='timm:resnet10' is not a timm model; close timm names: "
                                          r"resnet10t"):
        backbone_factory(ModelConfig(backbone="timm:resnet10"))
    with pytest.raises(ConfigError, match="model.widths and model.pool_grid apply to resnet_mini only"):
        build_backbone(ModelConfig(backbone=TINY_TIMM, pool_grid=2))
    drop = build_backbone(ModelConfig(backbone=TINY_TIMM, drop_path_rate=0.1))[0]
    assert any(type(m).__name__ == "DropPath" for m in drop.modules())  # model.drop_path_rate is passed on


def test_train_export_load_and_eval_a_timm_backbone(tmp_path):
    words = [*TINY, "model.backbone=timm:test_resnet", "train.max_steps=2", f"train.output_dir={tmp_path}"]
    assert main(["train", "quickstart", *words]) == 0
    state = load_checkpoint(tmp_path / "run")
    assert state["step"] == 2 and state["config"]["model"]["backbone"] == TINY_TIMM
    out = tmp_path / "backbone.safetensors"
    assert main(["export", str(tmp_path / "run"), str(out)]) == 0
    tensors, info = read_backbone(out)
    assert info.backbone == TINY_TIMM and info.feature_dim == 96 and "timm.create_model('test_resnet'" in \
        info.rebuild_hint()
    trained = {k[len("net.encoder_q.backbone."):]: v for k, v in state["method"].items()
               if k.startswith("net.encoder_q.backbone.")}
    assert tensors.keys() == trained.keys() and all(torch.equal(tensors[k], trained[k]) for k in trained)
    rebuilt = load_backbone(out)
    plain = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    plain.load_state_dict(tensors, strict=True)  # the file loads into timm's model without selfsup
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), plain.eval()(x))
    assert main(["eval", str(out), "data.name=digits", "data.image_size=16", "--protocol", "nn"]) == 0
    assert "nn" in json.loads((tmp_path / "backbone.safetensors.eval.json").read_text())["trained"]
