"""The GPU paths rehearsed on the CPU where torch allows it (issue 18): bf16 autocast, channels_last,
``torch.compile`` and on-device batch augmentation through the real Trainer, and the quantities that must stay
float32 under autocast (MoCo/Mugs InfoNCE logits, ISD/MSF similarities, Mugs' prototypes and local-group
neighbours, Sinkhorn, the kNN, feature extraction).

CPU autocast is not CUDA autocast: both run conv/linear/matmul in bf16, but on CUDA ``normalize``, ``softmax`` and
``sum`` are also forced to float32 and ``mv`` to bf16, on the CPU neither. Code that needs float32 therefore says
so itself (``.float()`` with autocast switched off) rather than relying on either list, and these tests check it
on the CPU list. What the CPU cannot reach (fused optimisers, NCCL, SyncBN, Triton kernels, CUDA's op lists,
pinned asynchronous copies) is what ``benchmarks/gpu_check.py`` runs on a GPU.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import load_benchmark, tiny_config
from selfsup.engine.trainer import Trainer
from selfsup.eval.features import extract_features
from selfsup.eval.knn import knn_classify, knn_sweep
from selfsup.methods.isd import similarities
from selfsup.methods.moco import moco_loss
from selfsup.methods.msf import nearest_to_targets
from selfsup.methods.mugs import local_group_memory, memory_neighbours
from selfsup.models.heads import GroupHead
from selfsup.nn.memory import MemoryBank
from selfsup.nn.sinkhorn import hard_labels, power_softmax, sinkhorn_knopp
from test_mugs import TINY_MUGS
from test_sela import SELA

BF16 = ("train.precision=bf16", "train.channels_last=true")
FP32 = ("train.precision=fp32", "train.channels_last=false")
METHOD_WORDS = {"moco": (), "byol": (), "isd": ("method.queue_size=256",), "isd_plus": ("method.queue_size=256",),
                "msf": ("method.bank_size=256",), "sela": tuple(SELA), "mugs": tuple(TINY_MUGS)}

# Tolerance of the first step's loss, bf16 against fp32 (same seed, same weights, same views).
# bf16 keeps 8 significant bits: round-to-nearest moves a value by at most U = 2⁻⁸ relative. Under autocast each
# conv / linear / matmul rounds its operands to bf16 and its (float32-accumulated) result once more, ~U per op;
# BatchNorm, LayerNorm and the L2 normalisation rescale and do not amplify relative errors. Independent roundings
# add in quadrature, so D such ops on the path from the image give an embedding error ε ≈ U·√D (the measured
# backbone error is below that: test_backbone_features_under_autocast_and_channels_last). Every loss here is a
# softmax cross-entropy / KL over logits s/τ of unit embeddings (BYOL and MSF: 2 − 2·cos, i.e. τ = 1; SeLa:
# linear-head logits of magnitude < 1 at its init, std 0.01 on 64-d features: τ = 1 bounds them). A logit moves by
# at most 2ε/τ (both embeddings of a dot product), and a cross-entropy's gradient over its logits, p − y, has ℓ1
# norm ≤ 2 (ISD's KL: exactly so on the student side; on the teacher side as long as the two distributions are
# comparable, as at initialisation), so to first order |ΔL| ≤ 4·U·√D/τ, τ the smallest temperature of the loss.
# The rounding errors mostly cancel, so the bound sits one to two orders of magnitude above the measured
# differences; at ISD's τ of 0.01-0.02 it is wide, and the float32 similarities ISD relies on are checked directly
# further down.
U = 2.0 ** -8
PATHS = {  # method: (bf16 ops on the longest image → logit path, smallest temperature)
    "moco": (7 + 2, 0.2),  # resnet_mini: stem + 3 stages x 2 convs; MLP head 2 linears; τ 0.2
    "byol": (7 + 4, 1.0),  # projector 2 + predictor 2
    "isd": (7 + 2, 0.02),  # predictor 2; τ_s = τ_t = 0.02
    "isd_plus": (7 + 4, 0.01),  # projector + predictor; τ_t 0.01
    "msf": (7 + 4, 1.0),
    "sela": (7 + 1, 1.0),  # one linear head
    "mugs": (1 + 2 * 6 + 6 + 5, 0.04),  # patch conv, 2 blocks (qkv, q·k, a·v, proj, fc1, fc2), relation block,
                                          # projector 3 + predictor 2; group teacher τ 0.04 in warm-up
}


def loss_tolerance(method: str) -> float:
    ops, temperature = PATHS[method]
    return 4 * U * math.sqrt(ops) / temperature


def logged_losses(trainer: Trainer) -> list[float]:
    records = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "step" in r and "loss" in r]


def first_conv(module: nn.Module) -> nn.Conv2d:
    return next(m for m in module.modules() if isinstance(m, nn.Conv2d))


def train(tmp_path, method: str, *words: str, steps: int = 3) -> tuple[list[float], set[tuple[bool, torch.dtype]]]:
    """``steps`` steps of the real Trainer: the logged losses, and (input in channels_last, output dtype) of every
    call of the backbone's first conv."""
    trainer = Trainer(tiny_config(tmp_path, *METHOD_WORDS[method], f"train.max_steps={steps}", *words, method=method))
    conv = first_conv(trainer.method.backbone)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) == ("train.channels_last=true" in words)
    seen: set[tuple[bool, torch.dtype]] = set()
    hook = conv.register_forward_hook(
        lambda module, inputs, output: seen.add((inputs[0].is_contiguous(memory_format=torch.channels_last),
                                                 output.dtype)))
    trainer.fit()
    hook.remove()
    assert trainer.step == steps
    return logged_losses(trainer), seen


# SeLa's label update embeds the training set through the engine's embedding service before the step, outside
# its autocast: float32, in the model's layout (the one backbone pass that bf16 does not reach)
OUTSIDE_THE_STEP = {"sela": {(True, torch.float32)}}


@pytest.mark.parametrize("method", list(PATHS))
def test_every_method_trains_under_bf16_and_channels_last_close_to_fp32(tmp_path, method):
    reference, seen32 = train(tmp_path / "fp32", method, *FP32)
    losses, seen = train(tmp_path / "bf16", method, *BF16)
    assert seen == {(True, torch.bfloat16)} | OUTSIDE_THE_STEP.get(method, set())
    assert seen32 == {(False, torch.float32)}
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses), losses
    assert abs(losses[0] - reference[0]) <= loss_tolerance(method), (losses[0], reference[0])


def test_split_batchnorm_under_bf16_and_channels_last(tmp_path):
    """model.bn_splits (one GPU emulating several: per-split BatchNorm statistics) regroups the batch of a
    channels_last bf16 activation; the step must match fp32 as the plain one does."""
    reference, _ = train(tmp_path / "fp32", "moco", "model.bn_splits=2", *FP32)
    losses, seen = train(tmp_path / "bf16", "moco", "model.bn_splits=2", *BF16)
    assert seen == {(True, torch.bfloat16)} and all(math.isfinite(x) for x in losses)
    assert abs(losses[0] - reference[0]) <= loss_tolerance("moco"), (losses[0], reference[0])


@pytest.mark.parametrize("method", ["moco", "mugs"])
def test_batch_augmentation_on_the_device_under_bf16(tmp_path, method):
    """data.augment=batch: the views come from tensor ops on the training device (Mugs: its multi-crop, with
    RandAugment and erasing in the device stage), then the bf16 step."""
    reference, _ = train(tmp_path / "fp32", method, "data.augment=batch", *FP32)
    losses, seen = train(tmp_path / "bf16", method, "data.augment=batch", *BF16)
    assert seen == {(True, torch.bfloat16)}
    assert all(math.isfinite(x) for x in losses)
    assert abs(losses[0] - reference[0]) <= loss_tolerance(method), (losses[0], reference[0])


def test_compiled_moco_trains_under_bf16_and_channels_last(tmp_path):
    reason = load_benchmark("gpu_check").compiler_missing(torch.device("cpu"))  # a real toolchain probe
    if reason:
        pytest.skip(reason)
    from torch._dynamo.utils import counters

    reference, _ = train(tmp_path / "fp32", "moco", *FP32, steps=2)
    counters.clear()
    try:
        losses, _ = train(tmp_path / "compiled", "moco", *BF16, "train.compile=true", steps=2)
        assert counters["stats"]["unique_graphs"] >= 1  # the step ran as compiled graphs, not eagerly
    finally:
        torch._dynamo.reset()
    assert all(math.isfinite(x) for x in losses) and len(losses) == 2
    assert abs(losses[0] - reference[0]) <= loss_tolerance("moco"), (losses[0], reference[0])


# ------------------------------------------------------------------------------------------------ features


@pytest.mark.parametrize("kind", ["resnet_mini", "vit_tiny"])
def test_backbone_features_under_autocast_and_channels_last(tmp_path, kind):
    """The trained-layout backbone (channels_last from the trainer) under bf16 autocast against its float32,
    contiguous copy, through extract_features: float32 unit rows within the U·√D estimate of the tolerance above
    (2x for the worst of 32 rows: a χ-like spread of independent roundings)."""
    method, ops = ("moco", 7) if kind == "resnet_mini" else ("mugs", 1 + 2 * 6)
    trainer = Trainer(tiny_config(tmp_path, *METHOD_WORDS[method], *BF16, method=method))
    backbone = trainer.method.backbone
    assert first_conv(backbone).weight.is_contiguous(memory_format=torch.channels_last)
    reference = copy.deepcopy(backbone).to(memory_format=torch.contiguous_format)
    images = torch.rand(32, 3, 16, 16)
    batches = [(images, torch.zeros(32, dtype=torch.long))]
    bf16, _ = extract_features(backbone, batches, autocast_dtype=torch.bfloat16, channels_last=True)
    fp32, _ = extract_features(reference, batches)
    assert bf16.dtype == torch.float32 and torch.allclose(bf16.norm(dim=1), torch.ones(32), atol=1e-5)
    error = (bf16 - fp32).norm(dim=1)
    assert error.max() <= 2 * U * math.sqrt(ops), error.max()
    assert error.max() > 0  # bf16 did run: the rows differ from float32


# ------------------------------------------------------------------------------------------------ float32 islands

AUTOCAST = {"device_type": "cpu", "dtype": torch.bfloat16}


def near_tie(best: int, dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """A query e₀ and three unit rows, row ``best`` the nearest: cosines 0.9992 there and 0.9990, 0.9991 in the
    other two, distinct in float32 but all 1.0 in bf16 (its spacing just below 1 is 2⁻⁸). A bf16 search ties the
    three and breaks the tie by the values alone, the same way for every ``best``: wrong for at least two of them.
    """
    cosines = [0.9990, 0.9991]
    cosines.insert(best, 0.9992)
    cos = torch.tensor(cosines, dtype=torch.float64)
    rows = torch.zeros(3, dim, dtype=torch.float64)
    rows[:, 0], rows[:, 1] = cos, (1 - cos**2).sqrt()
    query = torch.zeros(1, dim)
    query[0, 0] = 1.0
    assert torch.equal(rows.float().bfloat16()[:, 0], torch.ones(3, dtype=torch.bfloat16))
    return query, rows.float()


def test_isd_and_msf_similarities_stay_float32_under_autocast():
    x, queue = F.normalize(torch.randn(4, 8), dim=1), F.normalize(torch.randn(16, 8), dim=1)
    with torch.autocast(**AUTOCAST):
        inside = similarities(x.bfloat16(), queue)
    assert inside.dtype == torch.float32
    assert torch.equal(inside, x.bfloat16().float() @ queue.T)

    bank = MemoryBank(3, 8)
    for best in range(3):
        query, rows = near_tie(best)
        bank.bank.copy_(rows)
        with torch.autocast(**AUTOCAST):
            assert nearest_to_targets(bank, query.bfloat16(), 1).item() == best


def test_moco_and_mugs_info_nce_logits_stay_float32_under_autocast():
    q, k = F.normalize(torch.randn(8, 16), dim=1), F.normalize(torch.randn(8, 16), dim=1)
    queue = F.normalize(torch.randn(64, 16), dim=1)
    expected = moco_loss(q, k, queue, 0.2)
    with torch.autocast(**AUTOCAST):
        inside = moco_loss(q, k, queue, 0.2)  # float32 embeddings: nothing may be rounded to bf16
    assert inside.dtype == torch.float32
    assert inside.item() == pytest.approx(expected.item(), rel=1e-6)


def test_mugs_prototype_logits_and_neighbours_stay_float32_under_autocast():
    torch.manual_seed(0)
    head = GroupHead(16, 32, 8, 64, norm_last_layer=False)
    bottleneck = F.normalize(torch.randn(4, 8), dim=1)
    with torch.autocast(**AUTOCAST):
        logits = head.last_layer(bottleneck)
        assert head(torch.randn(4, 16)).dtype == torch.float32
    assert logits.dtype == torch.float32
    assert torch.allclose(logits, head.last_layer(bottleneck), rtol=1e-6, atol=1e-7)

    memory = local_group_memory(3, 8)
    for best in range(3):
        query, rows = near_tie(best)
        memory.bank.copy_(rows)
        with torch.autocast(**AUTOCAST):
            assert torch.equal(memory_neighbours(memory, query.bfloat16(), 1), rows[[best]].unsqueeze(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sinkhorn_is_unchanged_by_autocast(dtype):
    torch.manual_seed(0)
    features, weight, bias = torch.randn(300, 16), torch.randn(12, 16) * 0.3, torch.zeros(12)

    def labels() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p = power_softmax(features, 25.0, weight=weight, bias=bias, dtype=dtype, chunk_size=64)
        result = sinkhorn_knopp(p, tol=1e-3)
        return p, result.r, hard_labels(p, result.r, chunk_size=64)

    outside = labels()
    with torch.autocast(**AUTOCAST):
        inside = labels()
    for a, b in zip(outside, inside, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert inside[0].dtype == dtype


@pytest.mark.parametrize("best", range(3))
def test_knn_is_unchanged_by_autocast(best):
    """1-NN on a near tie: the float32 search finds the true neighbour (class 1) wherever it is, a bf16 one would
    tie it with rows of class 0; knn_sweep and knn_classify give the same inside and outside autocast."""
    query, rows = near_tie(best)
    labels = torch.tensor([int(i == best) for i in range(3)] + [2] * 30)
    train = F.normalize(torch.cat([rows, torch.randn(30, 8)]), dim=1)
    expected = knn_sweep(train, labels, query, torch.tensor([1]), ks=(1, 5), num_classes=3)
    with torch.autocast(**AUTOCAST):
        inside = knn_sweep(train, labels, query, torch.tensor([1]), ks=(1, 5), num_classes=3)
        assert knn_classify(train, labels, query, k=1, num_classes=3).item() == 1
    assert inside == expected and inside["nn"] == 100.0
