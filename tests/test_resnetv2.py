"""sela_resnet50: SeLa's pre-activation ResNet-50 as yukimasano/self-label models/resnetv2.py builds it, and the
import of its official checkpoints / export in its own key layout.

``official_layout`` below writes down, from a reading of the official file, every tensor of
``resnetv2(nlayers=50, num_classes=[K] * hc)``: the tests hold the backbone to it key by key.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import tiny_config
from selfsup.cli import RECIPES, main
from selfsup.config import ConfigError, ModelConfig, load_config
from selfsup.engine.trainer import Trainer
from selfsup.export import BackboneInfo, export_run, load_backbone, read_backbone, save_backbone
from selfsup.imports import ImportMismatchError, import_state_dict, infer_backbone
from selfsup.models import BACKBONES, build_backbone
from selfsup.models.resnetv2 import PreActBottleneck, PreActResNet

STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # (width, blocks, stride of the first block)


def _bn(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{n}": (channels,) for n in ("weight", "bias", "running_mean", "running_var")} | {
        f"{prefix}.num_batches_tracked": ()}


def official_layout(heads: int = 0, classes: int = 3000, stem: int = 7) -> dict[str, tuple[int, ...]]:
    """Key → shape of the official PreActResNet-50, in registration order (heads last, as top_layer{h})."""
    layout: dict[str, tuple[int, ...]] = {"features.0.weight": (64, 3, stem, stem)}  # features.1: MaxPool
    in_planes = 64
    for stage, (width, blocks, stride) in enumerate(STAGES, start=2):
        for b in range(blocks):
            p = f"features.{stage}.{b}"
            layout |= _bn(f"{p}.bn1", in_planes) | {f"{p}.conv1.weight": (width, in_planes, 1, 1)}
            layout |= _bn(f"{p}.bn2", width) | {f"{p}.conv2.weight": (width, width, 3, 3)}
            layout |= _bn(f"{p}.bn3", width) | {f"{p}.conv3.weight": (4 * width, width, 1, 1)}
            if (stride if b == 0 else 1) != 1 or in_planes != 4 * width:
                layout[f"{p}.shortcut.0.weight"] = (4 * width, in_planes, 1, 1)
            in_planes = 4 * width
    for h in range(heads):
        layout |= {f"top_layer{h}.weight": (classes, 2048), f"top_layer{h}.bias": (classes,)}
    return layout


def _net(small_stem: bool = False) -> PreActResNet:
    return build_backbone(ModelConfig(backbone="sela_resnet50", small_stem=small_stem))[0]


def _randomise_bn(net: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


# ------------------------------------------------------------------------------------------ architecture


def test_keys_and_shapes_are_the_official_layout():
    assert "sela_resnet50" in BACKBONES  # importing selfsup.models registers it
    net, dim = build_backbone(ModelConfig(backbone="sela_resnet50", small_stem=False))
    assert dim == 2048
    state = net.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == official_layout()
    assert list(state) == list(official_layout())  # same registration order too
    assert sum(isinstance(m, nn.Conv2d) for m in net.modules()) == 53  # stem + 16 blocks x 3 + 4 shortcuts
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 48  # 3 per block, none in the stem
    assert not any(isinstance(m, (nn.ReLU, nn.Linear)) for m in net.modules())  # ReLUs are functional, no heads


def test_stem_and_stages_layer_by_layer():
    net = _net()
    conv, pool = net.features[0], net.features[1]
    assert isinstance(conv, nn.Conv2d) and (conv.kernel_size, conv.stride, conv.padding, conv.bias) == (
        (7, 7), (2, 2), (3, 3), None)
    assert isinstance(pool, nn.MaxPool2d) and (pool.kernel_size, pool.stride, pool.padding) == (3, 2, 1)
    assert len(net.features) == 6  # conv, max-pool, 4 stages: no BN/ReLU after the stem conv
    for stage, (width, blocks, stride) in zip(net.features[2:], STAGES, strict=True):
        assert len(stage) == blocks and all(isinstance(b, PreActBottleneck) for b in stage)
        first = stage[0]
        assert first.conv2.stride == (stride, stride) and first.conv1.stride == (1, 1)  # stride on the 3x3
        assert first.shortcut is not None and first.shortcut[0].stride == (stride, stride)
        assert len(first.shortcut) == 1 and first.shortcut[0].bias is None  # a bare 1x1 conv, no BN
        assert all(b.shortcut is None for b in stage[1:])
        assert all(c.bias is None for b in stage for c in (b.conv1, b.conv2, b.conv3))
        assert stage[-1].conv3.out_channels == 4 * width


@pytest.mark.parametrize("projection", [True, False])
def test_block_is_pre_activation(projection):
    """out = conv3(relu(bn3(conv2(relu(bn2(conv1(relu(bn1 x)))))))) + (x | shortcut(relu(bn1 x))), no ReLU after."""
    torch.manual_seed(0)
    block = PreActBottleneck(16, 8, stride=2) if projection else PreActBottleneck(32, 8)
    assert (block.shortcut is not None) == projection
    _randomise_bn(block)
    block.eval()
    x = torch.randn(2, block.bn1.num_features, 6, 6)
    pre = F.relu(block.bn1(x))
    residual = block.conv3(F.relu(block.bn3(block.conv2(F.relu(block.bn2(block.conv1(pre)))))))
    expected = residual + (block.shortcut[0](pre) if projection else x)
    out = block(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert (out < 0).any()  # no ReLU after the sum


@pytest.mark.parametrize(("size", "small_stem", "maps"), [
    (224, False, (112, 56, 56, 28, 14, 7)),
    (32, False, (16, 8, 8, 4, 2, 1)),
    (32, True, (32, 32, 32, 16, 8, 4)),
])
def test_output_is_2048_wide_and_the_pooled_last_block(size, small_stem, maps):
    torch.manual_seed(0)
    net = _net(small_stem).eval()
    seen: list[tuple[int, ...]] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(tuple(out.shape[1:]))) for m in net.features]
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        features = net(x)
        last_map = net.features(x)
    for h in hooks:
        h.remove()
    assert [s[-1] for s in seen[:6]] == list(maps)
    assert [s[0] for s in seen[:6]] == [64, 64, 256, 512, 1024, 2048]
    assert features.shape == (1, 2048)
    torch.testing.assert_close(features, last_map.mean(dim=(2, 3)))  # straight into the pool: no final BN-ReLU
    assert (features < 0).any()


def test_init_is_pytorchs_default():
    """Re-seeding and building each layer with plain torch constructors, in the same order, gives every tensor."""
    torch.manual_seed(3)
    net = _net(small_stem=True)
    torch.manual_seed(3)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            fresh = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, bias=False)
            assert torch.equal(m.weight, fresh.weight)
            fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            assert m.weight.abs().max() <= fan_in**-0.5  # Kaiming-uniform with a=sqrt(5): U(-1/sqrt(fan_in), ..)
        elif isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))


def test_options_that_do_not_apply_are_refused_and_pool_grid_works():
    for option in ({"widths": (8, 16)}, {"pool_grid": 2}, {"zero_init_residual": True}):
        with pytest.raises(ConfigError, match="do not apply to sela_resnet50"):
            build_backbone(ModelConfig(backbone="sela_resnet50", **option))
    from selfsup.eval.features import pooled_on_grid

    net = _net(small_stem=True).eval()
    with pooled_on_grid(net, 2) as pooled, torch.no_grad():
        assert pooled(torch.randn(1, 3, 32, 32)).shape == (1, 2048 * 4)


def test_recipe_uses_it():
    cfg = load_config(RECIPES / "sela_resnet50_10x3k_imagenet.yaml")
    assert (cfg.model.backbone, cfg.model.small_stem, cfg.method.hc, cfg.method.ncl) == (
        "sela_resnet50", False, 10, 3000)


# ------------------------------------------------------------------------------------------ import / export


def _official_checkpoint(heads: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with the official key names and shapes (the values: a seeded sela_resnet50 plus heads)."""
    torch.manual_seed(seed)
    state = dict(_net().state_dict())
    for key, shape in official_layout(heads, classes=30).items():
        if key.startswith("top_layer"):
            state[key] = torch.randn(shape)
    return state


def test_import_official_resnetv2_files():
    official = _official_checkpoint(heads=10)
    backbone = {k: v for k, v in official.items() if not k.startswith("top_layer")}
    released = official  # resnet-10x3k.pth: the bare state dict eval_resnet.py loads
    training = {"epoch": 400, "arch": "resnetv2", "optimizer": {"state": {}, "param_groups": []},
                "L": torch.zeros(10, 64, dtype=torch.long),  # main.py checkpoint, DataParallel on features
                "state_dict": {k.replace("features.", "features.module.", 1): v for k, v in official.items()}}
    one_head = dict(backbone) | {"top_layer.0.weight": torch.randn(30, 2048),
                                                       "top_layer.0.bias": torch.randn(30)}
    for ckpt, left_out in ((released, 20), (training, 21), (one_head, 2)):
        imported = import_state_dict(ckpt)
        assert (imported.layout, imported.encoder, imported.left_out) == ("sela", "", left_out)
        assert "top_layer" in imported.source
        info = infer_backbone(imported.state)
        assert (info.backbone, info.small_stem, info.feature_dim) == ("sela_resnet50", False, 2048)
        net = _net()
        net.load_state_dict(imported.state, strict=True)  # the official keys minus the heads, strictly
        assert all(torch.equal(net.state_dict()[k], v) for k, v in backbone.items())


def test_import_refuses_another_preact_depth():
    official = {k: v for k, v in _official_checkpoint(heads=0).items() if not k.startswith("features.4.5.")}
    with pytest.raises(ImportMismatchError, match=r"\(3, 4, 5, 3\) blocks per stage"):
        infer_backbone(import_state_dict(official).state)


def test_import_and_export_files_end_to_end(tmp_path, capsys):
    official = _official_checkpoint(heads=2, seed=1)
    src = tmp_path / "resnet-10x3k.pth"
    torch.save({f"module.{k}": v for k, v in official.items()}, src)
    assert main(["import", str(src), str(tmp_path / "sela.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "sela_resnet50 backbone from the sela layout" in out and "models.resnetv2" in out
    net = load_backbone(tmp_path / "sela.safetensors")
    assert isinstance(net, PreActResNet) and not net.training
    assert all(torch.equal(net.state_dict()[k], v) for k, v in official.items() if not k.startswith("top_layer"))

    tensors, info = read_backbone(tmp_path / "sela.safetensors")  # the file keeps the official key layout
    assert {k: tuple(v.shape) for k, v in tensors.items()} == official_layout()
    assert info.model["backbone"] == "sela_resnet50" and "top_layer" not in "".join(tensors)
    save_backbone(tensors, tmp_path / "again.pt", info)
    again = load_backbone(tmp_path / "again.pt")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x), net(x), rtol=0, atol=0)


def test_export_of_a_sela_resnet50_run_keeps_the_official_keys(tmp_path):
    cfg = tiny_config(tmp_path, "model.backbone=sela_resnet50", "method.hc=2", "method.ncl=4", "train.max_steps=1",
                      "train.batch_size=8", "data.subset=16", method="sela")
    trainer = Trainer(cfg)
    trainer.save()
    path, info = export_run(tmp_path / "run", tmp_path / "sela.pt")
    tensors, _ = read_backbone(path)
    assert set(tensors) == set(official_layout(stem=3)) and info.backbone == "sela_resnet50"
    assert info.small_stem and "models.resnetv2" not in info.rebuild_hint()  # a 3x3 stem is not the official net
    assert "models.resnetv2" in BackboneInfo("sela_resnet50", 2048).rebuild_hint()
