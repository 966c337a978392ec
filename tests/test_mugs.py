"""Mugs (methods.md §6/§7): losses on hand inputs, the local-group module, schedules, freezing, the memory
pointer, exact resume, attention maps and the recipes."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from conftest import at, build, tiny_config
from conftest import step as run_step
from selfsup.cli import RECIPES
from selfsup.config import load_config
from selfsup.data.transforms import PerImageViews, pil_transform
from selfsup.engine.schedules import momentum_at, scaled_lr, warmup_then_constant
from selfsup.engine.trainer import Trainer
from selfsup.methods import Progress
from selfsup.methods.mugs import (
    clip_per_parameter,
    crop_pairs,
    group_loss,
    info_nce_loss,
    local_group_memory,
    memory_neighbours,
    multicrop_mean,
)

# methods.md §7 tiny sizes, shrunk further for speed: 16-px globals, 8-px locals
TINY_MUGS = [
    "model.backbone=vit_tiny", "model.patch_size=4", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
    "model.vit_image_size=16", "model.drop_path_rate=0.1", "data.subset=64", "train.batch_size=16", "data.flip=false",
    "method.local_crops_number=2", "method.local_crop_size=8", "method.global_crops_scale=[0.5,1.0]",
    "method.local_crops_scale=[0.2,0.5]", "method.strong_ratio=0.1", "method.head_hidden_dim=32",
    "method.predictor_hidden_dim=32", "method.instance_out_dim=16", "method.local_group_out_dim=16",
    "method.group_out_dim=64", "method.group_bottleneck_dim=16", "method.instance_queue_size=128",
    "method.local_group_queue_size=128", "method.memory_size=128", "method.local_group_top_n=4",
    "method.norm_last_layer=false", "method.group_warmup_teacher_temp_epochs=2", "method.group_teacher_temp=0.07",
    "optim.name=adamw", "optim.lr=0.002", "optim.reference_batch_size=256", "optim.weight_decay=0.04",
    "optim.weight_decay_end=0.1", "optim.warmup_epochs=1", "optim.per_step=true", "optim.min_lr=1e-5",
    "train.threads=1",
]


def mugs_config(tmp_path, *overrides: str):
    return tiny_config(tmp_path, *TINY_MUGS, *overrides, method="mugs")


def mugs_method(tmp_path, *overrides: str):
    torch.manual_seed(0)
    return build(mugs_config(tmp_path, *overrides), 128)


def fake_views(batch: int = 4, num_local: int = 2, global_size: int = 16, local_size: int = 8):
    crops = [torch.randn(batch, 3, global_size, global_size) for _ in range(4)]
    crops += [torch.randn(batch, 3, local_size, local_size) for _ in range(num_local)]
    return crops, torch.tensor([True, False] * (batch // 2))  # and which images' student globals were weak


def per_image_views(method, cfg):
    """The per-image (PIL) backend of the method's view layout, as the trainer builds it."""
    d = cfg.data
    return PerImageViews(method.views.resolved(d.image_size, d.crop_scale, d.flip, d.blur), d.mean, d.std)


def mugs_step(method, views):
    crops, weak = views
    return run_step(method, crops, torch.arange(weak.shape[0]), student_strong=~weak)


# ------------------------------------------------------------------------------------------------ losses


@pytest.mark.parametrize("num_local", [0, 1, 10])
def test_pair_bookkeeping_two_global_and_2L_local_pairs_combined_half_half(num_local):
    global_pairs, local_pairs = crop_pairs(2 + num_local)
    assert global_pairs == [(0, 1), (1, 0)]
    assert len(local_pairs) == 2 * num_local and all(v >= 2 and u in (0, 1) for u, v in local_pairs)
    calls = []

    def pair_loss(u: int, v: int) -> torch.Tensor:  # global pairs cost 1, local pairs 10 + v
        calls.append((u, v))
        return torch.tensor(1.0 if v < 2 else 10.0 + v)

    got = multicrop_mean(pair_loss, 2 + num_local).item()
    assert sorted(calls) == sorted(global_pairs + local_pairs)
    local_mean = np.mean([10.0 + v for _, v in local_pairs]) if num_local else None
    expected = 0.5 * (1.0 + local_mean) if num_local else 1.0  # L = 0: the global mean, no division by zero
    assert got == pytest.approx(expected)


def test_info_nce_equals_hand_computation():
    e = torch.eye(4)
    s = [e[[0, 1]], F.normalize(e[[0, 2]] + e[[1, 3]], dim=1)]  # 2 student crops, batch 2
    t = [e[[0, 1]], e[[2, 3]]]
    queue = e[[3]]
    tau = 0.2

    def ce(q: torch.Tensor, k: torch.Tensor) -> float:  # −log e^{q·k/τ} / (e^{q·k/τ} + e^{q·Q/τ})
        pos, neg = float(q @ k) / tau, float(q @ queue[0]) / tau
        return -math.log(math.exp(pos) / (math.exp(pos) + math.exp(neg)))

    pair_01 = np.mean([ce(s[1][b], t[0][b]) for b in range(2)])  # teacher u=0, student v=1
    pair_10 = np.mean([ce(s[0][b], t[1][b]) for b in range(2)])
    assert info_nce_loss(s, t, queue, tau).item() == pytest.approx((pair_01 + pair_10) / 2, rel=1e-6)


def test_group_loss_is_dinos_formula_and_the_centre_moves_by_a_tenth(tmp_path):
    torch.manual_seed(1)
    student = [torch.randn(3, 5) for _ in range(4)]  # 2 globals + 2 locals, K = 5
    teacher = [torch.randn(3, 5) for _ in range(2)]
    center = torch.randn(1, 5)
    t_temp, s_temp = 0.04, 0.1

    def softmax(x):
        z = np.exp(x - x.max())
        return z / z.sum()

    def term(u, v):
        return np.mean([-(softmax(((teacher[u][b] - center[0]) / t_temp).numpy()) *
                          np.log(softmax((student[v][b] / s_temp).numpy()))).sum() for b in range(3)])

    globals_ = np.mean([term(0, 1), term(1, 0)])
    locals_ = np.mean([term(u, v) for u in (0, 1) for v in (2, 3)])
    got = group_loss(student, teacher, center, t_temp, s_temp).item()
    assert got == pytest.approx(0.5 * (globals_ + locals_), rel=1e-5)

    method = mugs_method(tmp_path, "method.group_out_dim=5")
    method.center.copy_(center)
    logits = torch.cat(teacher)
    method.update_center(logits)
    assert torch.allclose(method.center, center + 0.1 * (logits.mean(0, keepdim=True) - center), atol=1e-6)


# ------------------------------------------------------------------------------------------------ local group


def test_local_group_retrieves_neighbours_and_gradients_reach_relation_not_memory(tmp_path):
    method = mugs_method(tmp_path)
    net, memory = method.student, method.student_memory
    u = torch.randn(32)
    memory.bank.copy_(u.expand_as(memory.bank))
    assert torch.equal(memory_neighbours(memory, torch.randn(5, 32), 4), u.expand(5, 4, 32))

    seen = {}
    hook = net.relation.register_forward_hook(lambda module, inputs, output: seen.update(x=inputs[0].detach()))
    tokens = torch.randn(5, 17, 32, requires_grad=True)
    g = net.local_group_token(tokens, memory)
    hook.remove()
    a = tokens.detach().mean(dim=1)
    assert seen["x"].shape == (5, 5, 32)
    assert torch.allclose(seen["x"][:, 0], a) and torch.equal(seen["x"][:, 1:], u.expand(5, 4, 32))
    g.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.relation.parameters())
    assert tokens.grad is not None  # through a
    assert not memory.bank.requires_grad and memory.bank.grad is None


def test_training_step_with_and_without_local_crops(tmp_path):
    for num_local in (2, 0):
        method = mugs_method(tmp_path, f"method.local_crops_number={num_local}")
        out = mugs_step(method, fake_views(num_local=num_local))
        assert torch.isfinite(out.loss)
        terms = [out.logs[f"loss_{k}"] for k in ("instance", "local_group", "group")]
        assert out.loss.item() == pytest.approx(sum(t.item() for t in terms) / 3, rel=1e-6)
        out.loss.backward()
        assert all(p.grad is None for p in method.teacher.parameters())
        assert method.teacher.instance_head.predictor is None and method.student.instance_head.predictor is not None
        # queues took both teacher crops (2B), memories the first global crop (student: weak images only)
        assert method.instance_queue.ptr.item() == 8 and method.local_group_queue.ptr.item() == 8
        assert method.teacher_memory.ptr.item() == 4 and method.student_memory.ptr.item() == 2


def test_legacy_pointer_bug_advances_twice_and_leaves_slots_unwritten():
    for legacy, expected_ptrs, written in ((False, [2, 4, 6, 0], set(range(8))), (True, [4, 0, 4, 0], {0, 1, 4, 5})):
        memory = local_group_memory(8, 3, legacy_ptr_bug=legacy)
        init = memory.bank.clone()
        ptrs = []
        for n in range(4):
            memory.enqueue(torch.full((2, 3), 100.0 + n))
            ptrs.append(int(memory.ptr))
        assert ptrs == expected_ptrs
        changed = {i for i in range(8) if not torch.equal(memory.bank[i], init[i])}
        assert changed == written
    wrap = local_group_memory(6, 1, legacy_ptr_bug=True)  # a wrapping write moves the pointer correctly
    assert [wrap.enqueue(torch.ones(4, 1)) and int(wrap.ptr) for _ in range(3)] == [2, 4, 2]
    keep = local_group_memory(8, 1)
    assert keep.enqueue(torch.arange(4.0).view(4, 1), keep=torch.tensor([True, False, True, False])) == 2
    assert keep.bank[:2, 0].tolist() == [0.0, 2.0] and int(keep.ptr) == 2


# ------------------------------------------------------------------------------------------------ schedules


def test_schedules_match_closed_forms(tmp_path):
    temps = np.array([warmup_then_constant(0.04, 0.07, 30, epoch) for epoch in range(300)])
    assert len(temps) == 300 and temps[0] == pytest.approx(0.04) and temps[29] == pytest.approx(0.07)
    assert temps[10] == pytest.approx(0.04 + 0.03 * 10 / 29) and np.all(temps[30:] == 0.07)
    assert all(warmup_then_constant(0.04, 0.04, 0, epoch) == 0.04 for epoch in range(100))
    for p in (0.0, 0.3, 1.0):
        assert momentum_at(0.996, p) == pytest.approx(1 - 0.004 * (1 + math.cos(math.pi * p)) / 2)

    trainer = Trainer(mugs_config(tmp_path, "train.epochs=4"))
    method, spe = trainer.method, trainer.steps_per_epoch
    assert spe == 4 and trainer.base_lr == pytest.approx(0.002 * 16 / 256) == scaled_lr(trainer.cfg.optim, 16)
    total = trainer.total_steps
    for step in range(total):
        trainer.step = step
        lr = trainer.current_lr()
        if step < spe:  # 1 warm-up epoch, linear from 0 per step
            assert lr == pytest.approx(trainer.base_lr * step / spe)
        else:
            progress = (step - spe) / (total - spe)
            assert lr == pytest.approx(1e-5 + (trainer.base_lr - 1e-5) * 0.5 * (1 + math.cos(math.pi * progress)))
        wd = 0.1 + (0.04 - 0.1) * 0.5 * (1 + math.cos(math.pi * step / (total - 1)))
        assert trainer.current_weight_decay() == pytest.approx(wd)
    method.on_step_start(Progress(spe, total, spe))  # the first step of epoch 1
    assert method.teacher_temp == pytest.approx(0.07)  # W = 2: linspace(0.04, 0.07, 2)

    # the EMA: θ_t ← m θ_t + (1 − m) θ_s with m from the cosine ramp; predictors are not part of it
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    method.on_after_step(at(0.25))
    m = momentum_at(0.996, 0.25)
    student = method.student.state_dict()
    for key, value in method.teacher.state_dict().items():
        assert torch.allclose(value, m * before[key] + (1 - m) * student[key], atol=1e-6), key
    assert not any("predictor" in key for key in before)


def test_parameter_groups_and_per_parameter_clipping(tmp_path):
    method = mugs_method(tmp_path)
    names = {id(p): n for n, p in method.student.named_parameters()}
    groups = {(g.lr_scale, "scheduled" if g.weight_decay else 0.0): [names[id(p)] for p in g.params]
              for g in method.parameter_groups()}
    decayed = groups[(1.0, "scheduled")]
    assert "vit.pos_embed" in decayed and "vit.cls_token" in decayed and "vit.blocks.0.attn.qkv.weight" in decayed
    assert "group_head.last_layer.weight_g" in decayed  # (K, 1) like weight_norm's g: decayed as officially
    assert "vit.norm.weight" in groups[(1.0, 0.0)] and "vit.blocks.0.attn.qkv.bias" in groups[(1.0, 0.0)]
    assert groups[(0.2, "scheduled")] == ["vit.patch_embed.proj.weight"]
    assert groups[(0.2, 0.0)] == ["vit.patch_embed.proj.bias"]
    assert not any(n.startswith("teacher") for names_ in groups.values() for n in names_)

    a, b = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(2, 2))
    a.grad, b.grad = torch.tensor([6.0, 0, 0, 0]), torch.full((2, 2), 0.5)  # norms 6 and 1
    clip_per_parameter([a, b], 3.0)
    assert a.grad.norm().item() == pytest.approx(3.0, rel=1e-5) and torch.equal(b.grad, torch.full((2, 2), 0.5))


def test_last_layer_is_frozen_during_freeze_last_layer_epochs(tmp_path):
    method = mugs_method(tmp_path, "method.freeze_last_layer=1")
    optimizer = torch.optim.AdamW([{"params": g.params} for g in method.parameter_groups()], lr=1e-2,
                                  weight_decay=0.04)
    last = method.student.group_head.last_layer

    def train_step(epoch: int) -> None:
        progress = Progress(4 * epoch, 100, 4)
        method.on_step_start(progress)
        optimizer.zero_grad()
        mugs_step(method, fake_views()).loss.backward()
        method.on_before_optimizer_step(progress)
        optimizer.step()

    frozen = [p.clone() for p in last.parameters()]
    other = method.student.vit.pos_embed.clone()
    train_step(0)
    assert all(torch.equal(a, b) for a, b in zip(frozen, last.parameters(), strict=True))
    assert not torch.equal(other, method.student.vit.pos_embed)
    train_step(1)
    assert not torch.equal(frozen[0], last.weight_v)


# ------------------------------------------------------------------------------------------------ views


def test_views_shapes_flag_and_determinism(tmp_path):
    cfg = mugs_config(tmp_path, "method.strong_prob=0.5")
    method = build(cfg, 128)
    make = per_image_views(method, cfg)
    image = Image.fromarray((np.random.default_rng(0).random((8, 8, 3)) * 255).astype(np.uint8))
    py_state = random.getstate()
    torch.manual_seed(3)
    first, first_choices = make(image)
    torch.manual_seed(3)
    second, second_choices = make(image)
    assert set(first_choices) == {"student_strong", "local_0_strong", "local_1_strong"}
    assert random.getstate() == py_state  # RandAugment ran under a torch-drawn seed
    assert [tuple(v.shape) for v in first] == [(3, 16, 16)] * 4 + [(3, 8, 8)] * 2
    flag = first_choices["student_strong"]
    assert flag.dtype == torch.bool and flag.dim() == 0
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert torch.equal(flag, second_choices["student_strong"])
    flags = set()
    for seed in range(20):
        torch.manual_seed(seed)
        flags.add(bool(make(image)[1]["student_strong"]))
    assert flags == {True, False}


def test_colour_jitter_option_keeps_grey_images_grey_and_skips_saturation_and_hue(tmp_path):
    cfg = mugs_config(tmp_path, "method.color_jitter=[0.4,0.4,0.0,0.0]", "method.strong_prob=0.0")
    method = build(cfg, 128)
    make = per_image_views(method, cfg)
    weak_1 = pil_transform(method.views.resolved(16, (0.2, 1.0), False, True).slots[0])
    colour = next(t for t in weak_1.transforms if isinstance(t, T.RandomApply)).transforms[0]
    assert (colour.saturation, colour.hue) == (None, None) and colour.brightness == (0.6, 1.4)
    grey = Image.fromarray((np.random.default_rng(1).random((8, 8)) * 255).astype(np.uint8)).convert("RGB")
    mean, std = torch.tensor(cfg.data.mean).view(3, 1, 1), torch.tensor(cfg.data.std).view(3, 1, 1)
    torch.manual_seed(0)
    for view in make(grey)[0]:  # all weak: brightness/contrast only, so R = G = B after un-normalising
        pixels = view * std + mean
        assert torch.allclose(pixels[0], pixels[1], atol=1e-5) and torch.allclose(pixels[1], pixels[2], atol=1e-5)


# ------------------------------------------------------------------------------------------------ runs


# Stochastic depth on (0.1 in mugs_config): a resumed run must draw the same drop-path masks as a straight one.


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    trainer = Trainer(mugs_config(tmp_path_factory.mktemp("straight")))
    trainer.fit()
    return trainer


def test_resume_restores_queues_memories_and_centre(tmp_path, straight_run):
    assert straight_run.step == 8  # 2 epochs x (64 // 16)
    first = Trainer(mugs_config(tmp_path, "train.max_steps=3"))
    first.fit()
    resumed = Trainer(mugs_config(tmp_path, "train.resume=auto"))
    assert resumed.step == 3
    resumed.fit()
    a, b = straight_run.method.state_dict(), resumed.method.state_dict()
    assert a.keys() == b.keys()
    for key in ("center", "instance_queue.bank", "local_group_queue.ptr", "student_memory.bank",
                "teacher_memory.bank", "teacher_memory.ptr"):
        assert key in a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["center"], torch.zeros_like(a["center"]))


def test_attention_maps_are_written_as_png(tmp_path, straight_run):
    from selfsup.eval.attention import cls_attention, export_attention

    vit = straight_run.method.backbone
    maps = cls_attention(vit, torch.randn(3, 3, 16, 16))
    assert maps.shape == (3, 2, 4, 4) and torch.all(maps.sum(dim=(2, 3)) <= 1 + 1e-5)
    paths = export_attention(straight_run.run_dir, tmp_path / "attention", n_images=2, device="cpu")
    assert [p.name for p in paths] == ["attention_000.png", "attention_001.png"]
    with Image.open(paths[0]) as png:
        zoom = 224 // 16
        assert png.format == "PNG" and png.size == (zoom * 16 * (1 + 2), zoom * 16)


def test_linear_probe_reads_the_cls_of_the_last_blocks_of_a_vit(tmp_path):
    from selfsup.config import ConfigError
    from selfsup.eval.protocols import evaluate_backbone, linear_probe_features

    torch.manual_seed(0)
    cfg = mugs_config(tmp_path, "model.depth=3", "eval.linear_vit_blocks=2")
    vit = build(cfg, 128).backbone.eval()
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        tokens = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        per_block = []
        for block in vit.blocks:  # by hand: the final LayerNorm on each block's output, CLS row
            tokens = block(tokens)
            per_block.append(vit.norm(tokens))
        features = linear_probe_features(vit, cfg)(x)
        assert torch.allclose(features, torch.cat([per_block[1][:, 0], per_block[2][:, 0]], dim=1), atol=1e-6)
        cfg.eval.linear_vit_blocks, cfg.eval.linear_vit_avgpool = 1, True
        pooled = linear_probe_features(vit, cfg)(x)
        assert torch.allclose(pooled, torch.cat([per_block[2][:, 0], per_block[2][:, 1:].mean(dim=1)], dim=1),
                              atol=1e-6)
    cfg.eval.linear_vit_blocks, cfg.eval.linear_vit_avgpool = 4, False  # deeper than the ViT: all its blocks
    assert torch.allclose(linear_probe_features(vit, cfg)(x), torch.cat([b[:, 0] for b in per_block], dim=1),
                          atol=1e-6)
    cfg.eval.linear_vit_blocks = 0
    with pytest.raises(ConfigError, match="linear_vit_blocks"):
        linear_probe_features(vit, cfg)
    resnet = torch.nn.Conv2d(3, 4, 3)
    assert linear_probe_features(resnet, cfg) is resnet  # other backbones are probed as they are
    cfg.eval.linear_vit_blocks, cfg.eval.linear_vit_avgpool = 2, True
    probe = linear_probe_features(vit, cfg)
    with torch.no_grad():
        assert torch.equal(probe.final_cls(probe(x)), vit(x))  # kNN's CLS is read from the probe's one pass
    scores = evaluate_backbone(vit, cfg, "cpu", ["knn", "linear"])
    assert {"knn20_vote", "linear_top1", "linear_top5"} <= set(scores)
    knn_only = evaluate_backbone(vit, cfg, "cpu", ["knn"])
    assert knn_only == {k: v for k, v in scores.items() if k in knn_only}


# ------------------------------------------------------------------------------------------------ recipes


def test_mugs_recipes_match_the_seed_command_lines():
    expected = {  # batch, lr, min_lr, wd, wd_end, τ_t, τ_t warm-up, freeze, norm_last_layer, drop_path, epochs
        "mugs_vit_small_100ep": ("vit_small", 512, 0.0008, 1e-6, 0.04, 0.2, 0.04, 0, 1, False, 0.1, 100),
        "mugs_vit_small_300ep": ("vit_small", 1024, 0.0008, 1e-6, 0.04, 0.1, 0.07, 30, 1, False, 0.1, 300),
        "mugs_vit_small_800ep": ("vit_small", 1024, 0.0008, 1e-6, 0.04, 0.1, 0.07, 30, 1, False, 0.1, 800),
        "mugs_vit_base_400ep": ("vit_base", 1008, 0.0008, 2e-6, 0.04, 0.1, 0.07, 50, 3, False, 0.1, 400),
        "mugs_vit_large_250ep": ("vit_large", 640, 0.0015, 1.5e-4, 0.025, 0.08, 0.07, 50, 3, True, 0.3, 250),
    }
    for name, values in expected.items():
        c = load_config(RECIPES / f"{name}.yaml")
        m, o = c.method, c.optim
        got = (c.model.backbone, c.train.batch_size, o.lr, o.min_lr, o.weight_decay, o.weight_decay_end,
               m.group_teacher_temp, m.group_warmup_teacher_temp_epochs, m.freeze_last_layer, m.norm_last_layer,
               c.model.drop_path_rate, c.train.epochs)
        assert got == values, name
        assert (m.name, o.name, o.reference_batch_size, o.warmup_epochs, o.per_step, m.clip_grad) == (
            "mugs", "adamw", 256, 10, True, 3.0)
        assert (m.local_crops_number, m.local_crop_size, c.data.image_size, c.model.patch_size) == (10, 96, 224, 16)
        assert (m.group_out_dim, m.instance_queue_size, m.local_group_top_n, m.momentum_teacher) == (
            65536, 65536, 8, 0.996)
        assert c.eval.knn_temperature == (0.05 if c.model.backbone == "vit_small" else 0.04)
        assert m.clip_grad_drop_epoch == (100 if c.model.backbone == "vit_large" else None)
        assert scaled_lr(o, c.train.batch_size) == pytest.approx(o.lr * c.train.batch_size / 256)
    digits = load_config(RECIPES / "mugs_digits.yaml")
    assert (digits.model.backbone, digits.model.embed_dim, digits.method.local_crops_number) == ("vit_tiny", 64, 2)
