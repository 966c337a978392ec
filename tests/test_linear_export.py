"""Linear probes (fast / standard), backbone export and loading, import of the seeds' checkpoint layouts."""

from __future__ import annotations

import argparse
import json
import math
from functools import partial

import pytest
import timm
import torch
import torchvision
from torch import nn

import selfsup.eval.linear as linear
from conftest import TINY, tiny_config
from selfsup.cli import main
from selfsup.config import ModelConfig
from selfsup.engine.checkpoint import CheckpointError
from selfsup.engine.trainer import Trainer
from selfsup.export import BackboneInfo, build_from_info, export_run, load_backbone, read_backbone, save_backbone
from selfsup.imports import (
    ImportMismatchError,
    check_against_model,
    import_checkpoint,
    import_state_dict,
    infer_backbone,
)
from selfsup.models.backbones import build_backbone, use_small_stem


def _blobs(n: int, noise_seed: int = 0, classes: int = 6, dim: int = 12):
    """Tight Gaussian clusters around fixed, far-apart centres: linearly separable."""
    centers = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0)) * 4.0
    y = torch.arange(n) % classes
    return centers[y] + 0.3 * torch.randn(n, dim, generator=torch.Generator().manual_seed(noise_seed)), y


# ------------------------------------------------------------------------------------------ linear probe


@pytest.mark.parametrize("standardize", [True, False])
def test_fast_probe_separates_separable_features(standardize):
    train_x, train_y = _blobs(300)
    val_x, val_y = _blobs(120, noise_seed=1)
    result = linear.linear_probe_fast(train_x, train_y, val_x, val_y, 6, standardize=standardize)
    assert result.top1 == 100.0 and result.top5 == 100.0
    assert set(result.scores()) == {"linear_top1", "linear_top5"}
    assert result.info["weight_decay"] in result.info["holdout_top1"]


def test_fast_probe_selects_on_train_holdout_only(monkeypatch):
    """A spy: the val tensors are touched by no torch op until the final classifier exists."""
    events: list[str] = []

    class Spy(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            events.append("val")
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))

    real_fit, real_logistic = linear.fit_fast_probe, linear.fit_logistic
    fits: list[int] = []

    def spy_fit(*args, **kwargs):
        events.append("fit start")
        probe = real_fit(*args, **kwargs)
        events.append("fit end")
        return probe

    def spy_logistic(x, y, *args, **kwargs):
        fits.append(x.shape[0])
        return real_logistic(x, y, *args, **kwargs)

    monkeypatch.setattr(linear, "fit_fast_probe", spy_fit)
    monkeypatch.setattr(linear, "fit_logistic", spy_logistic)
    train_x, train_y = _blobs(240)
    val_x, val_y = _blobs(60, noise_seed=3)
    result = linear.linear_probe_fast(train_x, train_y, val_x.as_subclass(Spy), val_y.as_subclass(Spy), 6,
                                      weight_decays=[1e-4, 1e-2], holdout=0.25)
    assert events.index("fit end") < events.index("val") and events.count("fit start") == 1
    assert fits == [180, 180, 240]  # two grid points on 3/4 of train, the refit on all of train
    assert set(result.info["holdout_top1"]) == {1e-4, 1e-2}


def test_holdout_is_stratified_and_disjoint():
    labels = torch.arange(100) % 4
    fit, held = linear.stratified_holdout(labels, 0.2, seed=1)
    assert len(set(fit.tolist()) & set(held.tolist())) == 0 and len(fit) + len(held) == 100
    assert torch.bincount(labels[held]).tolist() == [5, 5, 5, 5]


def test_umbc_standardisation_uses_train_statistics_only():
    train_x, val_x = torch.randn(200, 8) * 3 + 1, torch.randn(50, 8) * 10 - 5
    std = linear.Standardize.fit(train_x)
    normed = train_x / train_x.norm(dim=1, keepdim=True)
    assert torch.allclose(std.mean, normed.mean(0)) and torch.allclose(std.inv_std, (normed.var(0) + 1e-5).rsqrt())
    out = std(val_x)  # val goes through the frozen train statistics
    expected = (val_x / val_x.norm(dim=1, keepdim=True) - normed.mean(0)) / (normed.var(0) + 1e-5).sqrt()
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(std(train_x).mean(0), torch.zeros(8), atol=1e-5)
    # the probe's pre-processing is fitted on train: changing val changes nothing in it
    train_y = torch.arange(200) % 3
    probe = linear.fit_fast_probe(train_x, train_y, 3, weight_decays=[1e-3])
    assert torch.allclose(probe.classifier[0].mean, std.mean)


def test_standard_probe_runs_a_tiny_backbone(tmp_path):
    cfg = tiny_config(tmp_path, "data.subset=128")
    backbone, _ = build_backbone(cfg.model)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    moco = linear.linear_probe_standard(backbone, cfg, "cpu", recipe="moco", epochs=2, batch_size=64)
    assert 0.0 <= moco.top1 <= moco.top5 <= 100.0 and math.isfinite(moco.info["final_train_loss"])
    assert (moco.info["milestones"], moco.info["lr"]) == ([1, 2], 30.0)  # 60/80 of 100 epochs, scaled to 2
    umbc = linear.linear_probe_standard(backbone, cfg, "cpu", recipe="umbc", epochs=1, ten_crop=True, lr=0.1)
    assert 0.0 <= umbc.top1 <= umbc.top5 <= 100.0 and math.isfinite(umbc.info["final_train_loss"])
    assert umbc.info["ten_crop"] and umbc.info["lr"] == 0.1
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # frozen, BN statistics included
    crops = linear.ten_crop_transform(16, 0.875, (0.5,) * 3, (0.5,) * 3)(torchvision.transforms.ToPILImage()(
        torch.rand(3, 20, 20)))
    assert crops.shape == (10, 3, 16, 16)


def test_linear_protocol_end_to_end(tmp_path, capsys):
    words = [*TINY, f"train.output_dir={tmp_path}", "train.epochs=1"]
    assert main(["train", *words]) == 0
    run = tmp_path / "run"
    assert main(["eval", str(run), "--protocol", "linear,nn"]) == 0
    out = capsys.readouterr().out
    assert "linear_top1" in out and "linear_top5" in out
    scores = json.loads((run / "eval.json").read_text())["trained"]
    assert {"linear_top1", "linear_top5", "nn"} <= set(scores)
    assert 30.0 <= scores["linear_top1"] <= scores["linear_top5"] <= 100.0  # 10 classes
    assert main(["eval", str(run), "eval.linear_mode=standard", "eval.linear_epochs=1", "--protocol", "linear"]) == 0
    assert main(["eval", str(run), "eval.linear_mode=slow", "--protocol", "linear"]) == 2
    assert "eval.linear_mode='slow'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ export


def _features_equal(a: nn.Module, b: nn.Module, size: int = 32) -> bool:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_export_of_a_run_loads_strictly_with_the_same_features(tmp_path, suffix):
    trainer = Trainer(tiny_config(tmp_path, "train.max_steps=2"))
    trainer.fit()
    out = tmp_path / f"backbone{suffix}"
    assert main(["export", str(tmp_path / "run"), str(out)]) == 0
    tensors, info = read_backbone(out)
    assert (info.backbone, info.small_stem, info.feature_dim) == ("resnet_mini", True, 64)
    assert set(tensors) == set(trainer.method.backbone.state_dict())  # the backbone's own keys, nothing else
    loaded = load_backbone(out)
    assert _features_equal(loaded, trainer.method.backbone, size=16)
    plain, _ = build_backbone(ModelConfig(backbone="resnet_mini", small_stem=True))
    plain.load_state_dict(tensors, strict=True)
    assert _features_equal(plain, trainer.method.backbone, size=16)


def test_eval_of_an_exported_backbone_file_equals_the_runs_scores(tmp_path, capsys):
    trainer = Trainer(tiny_config(tmp_path, "train.max_steps=3"))
    trainer.fit()
    run = tmp_path / "run"
    assert main(["eval", str(run), "--protocol", "knn,nn", "--random-init"]) == 0
    expected = json.loads((run / "eval.json").read_text())
    data = [w for w in TINY if w.startswith("data.")]
    for suffix in (".safetensors", ".pt"):
        out = tmp_path / f"backbone{suffix}"
        assert main(["export", str(run), str(out)]) == 0
        assert main(["eval", str(out), *data, "--protocol", "knn,nn", "--random-init"]) == 0
        assert json.loads((tmp_path / f"backbone{suffix}.eval.json").read_text()) == expected
    assert "backbone file, data digits" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "backbone.pt"), "data.nmae=digits"]) == 2  # overrides are checked
    assert "data.name" in capsys.readouterr().err


@pytest.mark.parametrize("small_stem", [False, True])
def test_resnet18_export_loads_into_plain_torchvision(tmp_path, small_stem):
    trainer = Trainer(tiny_config(tmp_path, "model.backbone=resnet18", f"model.small_stem={str(small_stem).lower()}"))
    trainer.save()  # a run checkpoint (untrained weights are as good as any for a key/format check)
    path, info = export_run(tmp_path / "run", tmp_path / "r18.safetensors")
    from safetensors.torch import load_file

    tensors = load_file(path)
    assert "conv1.weight" in tensors and "layer1.0.conv1.weight" in tensors and not any("fc" in k for k in tensors)
    net = torchvision.models.resnet18()
    net.fc = nn.Identity()
    if small_stem:  # the documented rebuild for small-stem runs
        use_small_stem(net, net.conv1.out_channels)
    assert info.small_stem == small_stem and ("use_small_stem" in info.rebuild_hint()) == small_stem
    net.load_state_dict(tensors, strict=True)
    assert _features_equal(net, trainer.method.backbone)


def test_export_of_a_vit_run_keeps_the_vit_options(tmp_path):
    cfg = tiny_config(tmp_path, "model.backbone=vit_tiny", "model.patch_size=4", "model.embed_dim=32",
                      "model.depth=1", "model.num_heads=2", "model.vit_image_size=16", method="mugs")
    trainer = Trainer(cfg)
    trainer.save()
    path, info = export_run(tmp_path / "run", tmp_path / "vit.safetensors")
    tensors, _ = read_backbone(path)
    assert "cls_token" in tensors and not any(k.startswith(("relation", "head")) for k in tensors)
    assert (info.model["embed_dim"], info.model["num_heads"], info.feature_dim) == (32, 2, 32)
    assert _features_equal(load_backbone(path), trainer.method.backbone, size=16)


def test_export_refuses_a_foreign_file_and_a_bad_suffix(tmp_path, capsys):
    torch.save({"state_dict": {"w": torch.ones(1)}}, tmp_path / "other.pt")
    assert main(["export", str(tmp_path / "other.pt"), str(tmp_path / "out.safetensors")]) == 2
    assert "not a selfsup run checkpoint" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="not a selfsup backbone file"):
        read_backbone(tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"\.safetensors"):
        save_backbone({}, tmp_path / "x.bin", BackboneInfo("resnet18", 512))


# ------------------------------------------------------------------------------------------------ import


def _resnet18_state(**kwargs) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = torchvision.models.resnet18(**kwargs)
    return {k: v.clone() for k, v in net.state_dict().items()}


def _mlp_head(prefix: str, dim: int = 512) -> dict[str, torch.Tensor]:
    return {f"{prefix}fc.0.weight": torch.randn(dim, 512), f"{prefix}fc.0.bias": torch.randn(dim),
            f"{prefix}fc.2.weight": torch.randn(128, dim), f"{prefix}fc.2.bias": torch.randn(128)}


def _backbone_only(state):
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def _check_round_trip(imported_state, reference):
    net = torchvision.models.resnet18()
    net.fc = nn.Identity()
    net.load_state_dict(imported_state, strict=True)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in reference.items())


def test_import_moco_v2_layout():
    q, k = _backbone_only(_resnet18_state()), {n: v + 1 for n, v in _backbone_only(_resnet18_state()).items()}
    sd = {f"module.encoder_q.{n}": v for n, v in q.items()} | _mlp_head("module.encoder_q.")
    sd |= {f"module.encoder_k.{n}": v for n, v in k.items()} | _mlp_head("module.encoder_k.")
    sd |= {"module.queue": torch.randn(128, 64), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    ckpt = {"epoch": 200, "arch": "resnet50", "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}}
    imported = import_state_dict(ckpt)
    assert (imported.layout, imported.encoder) == ("moco", "online")
    _check_round_trip(imported.state, q)
    _check_round_trip(import_state_dict(ckpt, "moco", "target").state, k)


@pytest.mark.parametrize("style", ["msf", "isd_plus", "isd_r18"])
def test_import_umbc_layouts(style):
    q = _backbone_only(_resnet18_state())
    t = {n: v * 2 for n, v in q.items()}
    target = "encoder_t" if style == "msf" else "encoder_k"
    if style == "msf":  # DataParallel per sub-module, saved under 'state_dict' with the args Namespace
        sd = {f"encoder_q.module.{n}": v for n, v in q.items()} | _mlp_head("encoder_q.module.")
        sd |= {f"encoder_t.module.{n}": v for n, v in t.items()} | _mlp_head("encoder_t.module.")
        sd |= {"predict_q.module.0.weight": torch.randn(4, 4), "queue": torch.randn(8, 4),
               "labels": torch.zeros(8, dtype=torch.long), "queue_ptr": torch.zeros(1, dtype=torch.long)}
        ckpt = {"opt": argparse.Namespace(arch="resnet18"), "state_dict": sd, "epoch": 200}
    else:
        head = style == "isd_plus"
        sd = {f"module.encoder_q.{n}": v for n, v in q.items()} | (_mlp_head("module.encoder_q.") if head else {})
        sd |= {f"module.{target}.{n}": v for n, v in t.items()} | {"module.queue": torch.randn(8, 4)}
        ckpt = {"model": sd, "epoch": 200}
    imported = import_state_dict(ckpt)
    assert imported.layout == "umbc"
    _check_round_trip(imported.state, q)
    _check_round_trip(import_state_dict(ckpt, encoder="target").state, t)


def test_import_sela_and_plain_torchvision(tmp_path):
    full = _resnet18_state(num_classes=3000)
    ckpt = {"state_dict": {f"module.{k}": v for k, v in full.items()}, "L": torch.randint(0, 3000, (10, 64))}
    imported = import_state_dict(ckpt)
    assert imported.layout == "sela" and imported.left_out >= 3  # fc.weight, fc.bias, L
    _check_round_trip(imported.state, _backbone_only(full))
    converted = {"state_dict": full, "labels": torch.zeros(64, dtype=torch.long)}  # change_state_dict.py output
    assert import_state_dict(converted).layout == "sela"
    assert import_state_dict(_backbone_only(full)).layout == "torchvision"


def _tiny_vit(seed: int = 0) -> nn.Module:
    """selfsup's ViT (timm keys) at ViT-Ti width, so the number of heads can be inferred (3)."""
    torch.manual_seed(seed)
    return build_backbone(ModelConfig(backbone="vit_tiny", patch_size=8, depth=2, vit_image_size=16))[0]


def test_import_mugs_layouts():
    teacher, student = _tiny_vit(0).state_dict(), _tiny_vit(1).state_dict()
    relation = {f"relation_blocks.0.{k[len('blocks.0.'):]}": v for k, v in teacher.items() if k.startswith("blocks.0.")}
    heads = {"instance_head.projector.0.weight": torch.randn(64, 32), "group_head.last_layer.weight_g": torch.ones(1)}
    full = {"student": {f"module.backbone.{k}": v for k, v in (student | relation).items()}
            | {f"module.{k}": v for k, v in heads.items()},
            "teacher": {f"backbone.{k}": v for k, v in (teacher | relation).items()} | heads,
            "epoch": 100, "args": argparse.Namespace(arch="vit_small")}
    for ckpt, encoder, expected in ((full, None, teacher), (full, "online", student),
                                    (teacher | relation, None, teacher),  # backbone-only release
                                    ({"state_dict": dict(teacher)}, None, teacher)):
        imported = import_state_dict(ckpt, encoder=encoder)
        assert imported.layout == "mugs"
        vit = _tiny_vit(5)
        vit.load_state_dict(imported.state, strict=True)
        assert all(torch.equal(vit.state_dict()[k], v) for k, v in expected.items())


def test_import_file_end_to_end_resnet_and_vit(tmp_path, capsys):
    q = _backbone_only(_resnet18_state())
    src = tmp_path / "moco_v2_200ep_pretrain.pth.tar"
    torch.save({"state_dict": {f"module.encoder_q.{n}": v for n, v in q.items()} | _mlp_head("module.encoder_q.")},
               src)
    assert main(["import", str(src), str(tmp_path / "moco.safetensors")]) == 0
    assert "resnet18 backbone from the moco layout" in capsys.readouterr().out
    net = load_backbone(tmp_path / "moco.safetensors")
    assert all(torch.equal(net.state_dict()[k], v) for k, v in q.items())

    torch.manual_seed(0)  # a DINO/Mugs-style ViT-Ti/16 at 32 px, built with timm itself
    vit = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=16, embed_dim=192, depth=3,
                                                           num_heads=3, num_classes=0,
                                                           norm_layer=partial(nn.LayerNorm, eps=1e-6))
    torch.save({"teacher": {f"backbone.{k}": v for k, v in vit.state_dict().items()}, "args": argparse.Namespace()},
               tmp_path / "mugs.pth")
    path, info, _ = import_checkpoint(tmp_path / "mugs.pth", tmp_path / "vit.pt")
    model = info.model_config()
    assert (info.backbone, info.feature_dim) == ("vit_tiny", 192)
    assert (model.patch_size, model.depth, model.num_heads, model.vit_image_size) == (16, 3, 3, 32)
    assert _features_equal(load_backbone(path), vit)


def test_import_names_the_failing_key(tmp_path, capsys):
    q = _backbone_only(_resnet18_state())
    del q["layer3.1.bn2.running_var"]
    src = tmp_path / "broken.pth"
    torch.save({"state_dict": {f"module.encoder_q.{n}": v for n, v in q.items()}}, src)
    assert main(["import", str(src), str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "missing layer3.1.bn2.running_var" in err and "found keys:" in err
    with pytest.raises(ImportMismatchError, match="no key starts with encoder_k. or encoder_t."):
        import_state_dict({"state_dict": {"module.encoder_q.conv1.weight": torch.ones(1)}}, "moco", "target")
    with pytest.raises(ImportMismatchError, match="missing conv1.weight; found keys: layer1"):
        infer_backbone({"layer1.0.conv1.weight": torch.ones(1)})
    with pytest.raises(ImportMismatchError, match="cannot tell which seed"):
        import_state_dict({"weights": {"a.b": torch.ones(1)}})
    wrong = _backbone_only(_resnet18_state())
    wrong["conv1.weight"] = torch.ones(64, 3, 5, 5)
    with pytest.raises(ImportMismatchError, match=r"shape \(file vs model\) conv1.weight"):
        check_against_model(wrong, BackboneInfo("resnet18", 512), "test")


class _Pickled:
    pass


def test_import_refuses_files_that_need_pickle_code(tmp_path):
    src = tmp_path / "dill_style.pth"
    torch.save({"model": _Pickled(), "state_dict": {}}, src)
    with pytest.raises(CheckpointError, match="refuses"):
        import_checkpoint(src, tmp_path / "out.safetensors")


def test_architecture_inference_from_shapes():
    for name in ("resnet50", "resnext50_32x4d", "wide_resnet50_2", "resnet34"):
        with torch.device("meta"):
            net = getattr(torchvision.models, name)()
        info = infer_backbone(_backbone_only(net.state_dict()))
        assert (info.backbone, info.small_stem, info.feature_dim) == (name, False, net.fc.in_features)
        with torch.device("meta"):
            rebuilt = build_from_info(info)
        assert set(rebuilt.state_dict()) == set(_backbone_only(net.state_dict()))
