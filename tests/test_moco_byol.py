"""The mathematics of MoCo-v2 and BYOL-asym on hand-made inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import at, build, step, tiny_config
from selfsup.data.recipes import ViewLayout
from selfsup.engine.schedules import momentum_at
from selfsup.methods.byol import byol_loss
from selfsup.methods.moco import moco_loss
from selfsup.nn.ema import ema_update
from selfsup.nn.memory import MemoryBank


def test_moco_loss_equals_cross_entropy_of_hand_built_logits():
    e = torch.eye(4)
    q = e[[0, 1]]  # two queries
    k = torch.stack([e[0], F.normalize(e[1] + e[2], dim=0)])  # q0·k0 = 1, q1·k1 = 1/√2
    queue = e[[1, 2, 3]]  # q0 sees 0,0,0 ; q1 sees 1,0,0
    tau = 0.2
    expected0 = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 3))
    s = 1 / math.sqrt(2) / tau
    expected1 = -math.log(math.exp(s) / (math.exp(s) + math.exp(1 / tau) + 2))
    got = moco_loss(q, k, queue, tau)
    assert got.item() == pytest.approx((expected0 + expected1) / 2, rel=1e-6)


def test_memory_bank_is_fifo_and_wraps():
    bank = MemoryBank(8, 3, store_ids=True)
    batches = [torch.full((2, 3), float(i)) for i in range(6)]
    for i, keys in enumerate(batches):
        bank.enqueue(keys, torch.full((2,), i))
    # after 6 batches of 2 into 8 rows: rows hold batches 4,5,2,3 (ring), pointer at 12 % 8 = 4
    assert bank.ptr.item() == 4
    assert bank.bank[:, 0].tolist() == [4, 4, 5, 5, 2, 2, 3, 3]
    assert bank.ids.tolist() == [4, 4, 5, 5, 2, 2, 3, 3]
    # K/B steps after any point the bank holds exactly the last K/B batches
    order = torch.cat([bank.bank[4:], bank.bank[:4]])[:, 0].tolist()
    assert order == [2, 2, 3, 3, 4, 4, 5, 5]
    with pytest.raises(ValueError, match="bank size"):
        bank.enqueue(torch.zeros(9, 3))


def test_memory_bank_inits():
    rows = MemoryBank(64, 8).bank
    assert torch.allclose(rows.norm(dim=1), torch.ones(64))
    isd = MemoryBank(64, 8, init="normal_columns").bank
    assert torch.allclose(isd.norm(dim=0), torch.ones(8))  # ISD's quirk: columns are unit-norm
    assert MemoryBank(16, 4, init_scale=0.1).bank.norm(dim=1).allclose(torch.full((16,), 0.1))


def test_memory_bank_topk_matches_full_sort():
    bank = MemoryBank(50, 6)
    query = F.normalize(torch.randn(7, 6), dim=1)
    values, indices = bank.topk(query, 5, chunk_size=3)
    full = query @ bank.bank.T
    assert torch.equal(indices, full.topk(5, dim=1).indices)
    assert torch.allclose(values, full.topk(5, dim=1).values)


def _moco(tmp_path, *overrides):
    cfg = tiny_config(tmp_path, *overrides)
    torch.manual_seed(0)
    return build(cfg)


def test_moco_step_uses_queue_before_enqueue_and_then_enqueues_keys(tmp_path):
    method = _moco(tmp_path)
    x_q, x_k = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    before = method.queue.bank.clone()
    out = step(method, [x_q, x_k], torch.arange(8))
    # same BN batch statistics → same q and k as inside the step
    q = F.normalize(method.net.encoder_q(x_q), dim=1)
    with torch.no_grad():
        k = F.normalize(method.net.encoder_k(x_k), dim=1)
    assert out.loss.item() == pytest.approx(moco_loss(q, k, before, 0.2).item(), rel=1e-5)
    # the current keys were not negatives: a loss against a queue holding them differs
    with_keys = before.clone()
    with_keys[:8] = k
    assert abs(moco_loss(q, k, with_keys, 0.2).item() - out.loss.item()) > 1e-3
    assert torch.allclose(method.queue.bank[:8], k, atol=1e-6)
    assert torch.equal(method.queue.bank[8:], before[8:])
    assert method.queue.ptr.item() == 8
    assert method.queue.ids[:8].tolist() == list(range(8))


def test_no_gradient_reaches_key_encoder_or_queue(tmp_path):
    method = _moco(tmp_path)
    out = step(method, [torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)], torch.arange(8))
    out.loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in method.net.encoder_k.parameters())
    assert not method.queue.bank.requires_grad
    assert all(p.grad is not None for p in method.net.encoder_q.parameters())


def test_ema_extremes_and_formula(tmp_path):
    method = _moco(tmp_path)
    with torch.no_grad():
        for p in method.net.encoder_q.parameters():
            p.add_(torch.randn_like(p))
    teacher_before = [p.clone() for p in method.net.encoder_k.parameters()]
    ema_update(method.net.encoder_k, method.net.encoder_q, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, method.net.encoder_k.parameters(), strict=True))
    ema_update(method.net.encoder_k, method.net.encoder_q, 0.9)
    net = method.net
    for t0, t, o in zip(teacher_before, net.encoder_k.parameters(), net.encoder_q.parameters(), strict=True):
        assert torch.allclose(t, 0.9 * t0 + 0.1 * o, atol=1e-6)
    ema_update(method.net.encoder_k, method.net.encoder_q, 0.0)
    assert all(torch.equal(t, o) for t, o in zip(method.net.encoder_k.parameters(), method.net.encoder_q.parameters(),
                                                  strict=True))


def test_moco_on_after_step_applies_configured_momentum(tmp_path):
    method = _moco(tmp_path, "method.momentum=0.0")
    with torch.no_grad():
        next(method.net.encoder_q.parameters()).add_(1.0)
    method.on_after_step(at(0.5))
    assert all(torch.equal(t, o) for t, o in zip(method.net.encoder_k.parameters(), method.net.encoder_q.parameters(),
                                                  strict=True))


def test_cosine_momentum_endpoints():
    assert momentum_at(0.996, 0.0) == pytest.approx(0.996)
    assert momentum_at(0.996, 1.0) == pytest.approx(1.0)
    assert momentum_at(0.996, 0.5) == pytest.approx(0.998)


def test_byol_loss_is_two_minus_two_cosine():
    p = torch.tensor([[1.0, 0.0], [3.0, 3.0], [0.0, 2.0]])
    z = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 5.0]])
    expected = torch.tensor([2.0, 2 - 2 / math.sqrt(2), 0.0]).mean()
    assert byol_loss(p, z).item() == pytest.approx(expected.item(), rel=1e-6)
    assert byol_loss(z, z).item() == pytest.approx(0.0, abs=1e-7)
    # equals the mean squared distance of the unit vectors
    assert byol_loss(p, z).item() == pytest.approx(
        (F.normalize(p, dim=1) - F.normalize(z, dim=1)).pow(2).sum(1).mean().item(), rel=1e-6)


def test_byol_predictor_is_not_in_the_target(tmp_path):
    cfg = tiny_config(tmp_path, "method.momentum=0.0", method="byol")
    method = build(cfg)
    target_names = {n for n, _ in method.net.encoder_k.named_parameters()}
    assert not any("predictor" in n for n in target_names)
    # projector 64 -> 128 -> 16, predictor 16 -> 128 -> 16 (d -> 2d -> d/4 as the UMBC get_mlp)
    assert [m.out_features for m in method.net.encoder_q.head if isinstance(m, torch.nn.Linear)] == [128, 16]
    assert [m.out_features for m in method.net.predictor if isinstance(m, torch.nn.Linear)] == [128, 16]
    predictor_before = [p.clone() for p in method.net.predictor.parameters()]
    out = step(method, [torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)], torch.arange(8))
    out.loss.backward()
    assert all(p.grad is None for p in method.net.encoder_k.parameters())
    method.on_after_step(at(0.1))
    assert all(torch.equal(t, o) for t, o in zip(method.net.encoder_k.parameters(), method.net.encoder_q.parameters(),
                                                  strict=True))
    assert all(torch.equal(a, b) for a, b in zip(predictor_before, method.net.predictor.parameters(), strict=True))


def test_byol_views_follow_augmentation_option(tmp_path):
    cfg = tiny_config(tmp_path, "method.augmentation=weak/strong", method="byol")
    assert build(cfg).views == ViewLayout.of("aug+", "weak")  # (query, target)
