"""The mathematics of ISD / ISD+ and MSF on hand-made inputs, their step order, and exact resume."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import at, build, step, tiny_config
from selfsup.cli import RECIPES
from selfsup.config import load_config
from selfsup.data.recipes import ViewLayout
from selfsup.engine.monitors import neighbour_purity
from selfsup.engine.trainer import Trainer
from selfsup.methods.byol import byol_loss
from selfsup.methods.isd import isd_loss, similarities
from selfsup.methods.msf import msf_loss, nearest_to_targets
from selfsup.nn.memory import MemoryBank

SIZE = {"isd": "method.queue_size=256", "isd_plus": "method.queue_size=256", "msf": "method.bank_size=256"}


def _method(tmp_path, name: str, *overrides: str, seed: int = 0):
    cfg = tiny_config(tmp_path, SIZE[name], *overrides, method=name)
    torch.manual_seed(seed)
    return build(cfg)


def _images(seed: int, n: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 16, 16, generator=g), torch.randn(n, 3, 16, 16, generator=g)]


def _angles(degrees: list[float], dim: int) -> torch.Tensor:
    """Unit vectors in the first two coordinates of a ``dim``-d space."""
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    out = torch.zeros(len(degrees), dim, dtype=torch.float64)
    out[:, 0], out[:, 1] = rad.cos(), rad.sin()
    return out.float()


# ---------------------------------------------------------------------------------------------- ISD loss


def test_isd_kl_is_zero_for_equal_logits_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 10, generator=g) / 0.02
    assert isd_loss(logits, logits).item() == pytest.approx(0.0, abs=1e-5)
    other = torch.randn(4, 10, generator=g) / 0.02
    log_p_t, log_p_s = F.log_softmax(other, 1), F.log_softmax(logits, 1)
    expected = (log_p_t.exp() * (log_p_t - log_p_s)).sum() / 4  # (1/B) Σ_b Σ_j p_t log(p_t / p_s)
    got = isd_loss(logits, other)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5) and got.item() > 1.0
    for _ in range(20):
        assert isd_loss(torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)).item() >= 0


def test_isd_gradient_wrt_student_logits_is_ps_minus_pt_over_batch():
    g = torch.Generator().manual_seed(1)
    student = torch.randn(5, 12, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(5, 12, generator=g, dtype=torch.float64)
    isd_loss(student, teacher).backward()
    expected = (F.softmax(student.detach(), 1) - F.softmax(teacher, 1)) / 5
    assert torch.allclose(student.grad, expected, atol=1e-12)


def test_isd_target_becomes_one_hot_on_the_nearest_queue_entry_as_tau_goes_to_zero():
    g = torch.Generator().manual_seed(2)
    queue = F.normalize(torch.randn(50, 8, generator=g), dim=1)
    k = F.normalize(torch.randn(4, 8, generator=g), dim=1)
    nearest = (k @ queue.T).argmax(1)
    soft = F.softmax(similarities(k, queue) / 0.5, dim=1)
    assert soft.max().item() < 0.5  # a warm teacher spreads its mass
    target = F.softmax(similarities(k, queue) / 1e-5, dim=1)
    assert torch.equal(target.argmax(1), nearest)
    assert torch.allclose(target, F.one_hot(nearest, 50).float(), atol=1e-6)
    # the KL then is the cross-entropy of the student on the teacher's nearest entry
    student = torch.randn(4, 50, generator=g)
    assert isd_loss(student, similarities(k, queue) / 1e-5).item() == pytest.approx(
        F.cross_entropy(student, nearest).item(), rel=1e-5)


def test_isd_similarities_stay_float32_under_bf16_autocast():
    x, queue = F.normalize(torch.randn(4, 8), dim=1), F.normalize(torch.randn(16, 8), dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sims = similarities(x.bfloat16(), queue)
    assert sims.dtype == torch.float32
    assert torch.allclose(sims, x.bfloat16().float() @ queue.T, atol=1e-6)


# ---------------------------------------------------------------------------------------------- ISD step


@pytest.mark.parametrize("name", ["isd", "isd_plus"])
def test_isd_step_uses_the_queue_before_enqueue_then_enqueues_keys(tmp_path, name):
    method = _method(tmp_path, name)
    cfg = method.cfg
    x_q, x_k = _images(0)
    before = method.queue.bank.clone()
    out = step(method, [x_q, x_k], torch.arange(8))
    q = method.net.query(x_q)  # same weights and BN batch statistics as inside the step
    k = method.net.target(x_k, False)

    def loss_against(queue):
        return isd_loss(similarities(q, queue) / cfg.student_temperature,
                        similarities(k, queue) / cfg.teacher_temperature).item()

    assert out.loss.item() == pytest.approx(loss_against(before), rel=1e-5)
    with_keys = before.clone()
    with_keys[:8] = k
    assert abs(loss_against(with_keys) - out.loss.item()) > 1e-2  # the current k were not in the queue
    assert torch.allclose(method.queue.bank[:8], k, atol=1e-6)  # ... and are enqueued after the loss
    assert torch.equal(method.queue.bank[8:], before[8:])
    assert method.queue.ptr.item() == 8 and method.queue.ids[:8].tolist() == list(range(8))
    purity = neighbour_purity(out.neighbours, torch.arange(8), torch.arange(256))
    assert purity.item() == 0.0  # no labelled entry in the queue yet


def test_isd_purity_is_the_teachers_top5_label_agreement():
    # hand-made queue in a 16-d space: the teacher key at 0 degrees; its 5 nearest entries are rows 0-4
    queue = MemoryBank(8, 16, store_ids=True)
    queue.bank.copy_(_angles([1, 2, 3, 4, 5, 90, 180, 270], 16))
    queue.ids.copy_(torch.arange(8))  # rows hold images 0-7; image 8 is the teacher key's
    targets = torch.tensor([7, 7, 3, 7, 1, 7, 7, 7, 7])
    k = _angles([0], 16)
    neighbours = (similarities(k, queue.snapshot()) / 0.02).topk(5, dim=1).indices
    assert sorted(neighbours[0].tolist()) == [0, 1, 2, 3, 4]
    assert neighbour_purity(queue.ids[neighbours], torch.tensor([8]), targets).item() == pytest.approx(3 / 5)


def test_isd_teacher_is_the_ema_of_the_encoder_only(tmp_path):
    method = _method(tmp_path, "isd", "method.momentum=0.0")
    assert isinstance(method.net.encoder_q.head, torch.nn.Identity)  # no projection head: pooled 64-d feature
    layers = list(method.net.predictor)
    assert [type(m).__name__ for m in layers] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert (layers[0].in_features, layers[0].out_features, layers[0].bias) == (64, 64, None)
    assert (layers[3].in_features, layers[3].out_features, layers[3].bias is not None) == (64, 64, True)
    assert not any("predictor" in n for n, _ in method.net.encoder_k.named_parameters())
    assert len(list(method.net.encoder_k.parameters())) == len(list(method.net.encoder_q.parameters()))
    assert method.queue.bank.shape == (256, 64)
    assert torch.allclose(method.queue.bank.norm(dim=0), torch.ones(64))  # train_isd.py's dim-0 quirk
    assert method.views == ViewLayout.of("aug+", "aug+")
    with torch.no_grad():
        for p in [*method.net.encoder_q.parameters(), *method.net.predictor.parameters()]:
            p.add_(1.0)
    predictor = [p.clone() for p in method.net.predictor.parameters()]
    method.on_after_step(at(0.5))
    assert all(torch.equal(t, o) for t, o in zip(method.net.encoder_k.parameters(), method.net.encoder_q.parameters(),
                                                  strict=True))
    assert all(torch.equal(a, b) for a, b in zip(predictor, method.net.predictor.parameters(), strict=True))


def test_isd_plus_heads_queue_and_views(tmp_path):
    method = _method(tmp_path, "isd_plus")
    cfg = method.cfg
    assert (cfg.teacher_temperature, cfg.student_temperature, cfg.momentum) == (0.01, 0.1, 0.99)
    linear = [m.out_features for m in method.net.encoder_q.head if isinstance(m, torch.nn.Linear)]
    assert linear == [128, 16] == [m.out_features for m in method.net.encoder_k.head if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in method.net.predictor if isinstance(m, torch.nn.Linear)] == [128, 16]
    assert torch.allclose(method.queue.bank.norm(dim=1), torch.ones(256))  # rows normalised correctly
    assert method.views == ViewLayout.of("aug+", "weak")  # (student, teacher): WEAK teacher, AUG+ student
    assert _method(tmp_path, "isd_plus", "method.augmentation=strong/strong").views == ViewLayout.of("aug+", "aug+")


# ---------------------------------------------------------------------------------------------- MSF


def test_msf_loss_with_one_neighbour_is_the_byol_loss():
    g = torch.Generator().manual_seed(3)
    q, t = torch.randn(6, 16, generator=g), F.normalize(torch.randn(6, 16, generator=g), dim=1)
    assert torch.equal(msf_loss(q, t.unsqueeze(1)), byol_loss(q, t))


def test_msf_with_k1_reproduces_a_byol_step_exactly(tmp_path):
    msf = _method(tmp_path, "msf", "method.topk=1")
    cfg = tiny_config(tmp_path, method="byol")
    torch.manual_seed(0)
    byol = build(cfg)
    assert all(torch.equal(a, b) for a, b in zip(msf.net.encoder_q.parameters(), byol.net.encoder_q.parameters(),
                                                  strict=True))
    views = _images(4)
    a = step(msf, views, torch.arange(8))
    b = step(byol, views, torch.arange(8))
    assert torch.equal(a.loss, b.loss)
    assert neighbour_purity(a.neighbours, torch.arange(8), torch.zeros(256, dtype=torch.long)).item() == 1.0  # self
    a.loss.backward()
    b.loss.backward()
    for p, r in zip(msf.net.encoder_q.parameters(), byol.net.encoder_q.parameters(), strict=True):
        assert torch.equal(p.grad, r.grad)


def test_msf_neighbours_are_nearest_to_the_target_and_include_it():
    bank = MemoryBank(8, 16, store_ids=True)
    bank.bank.copy_(_angles([200, 10, 20, 80, 90, 100, 170, 260], 16))
    t, q = _angles([0], 16), _angles([90], 16)
    bank.enqueue(t, torch.tensor([0]))  # row 0 becomes t
    chosen = nearest_to_targets(bank, t, 3)
    assert sorted(chosen[0].tolist()) == [0, 1, 2]  # t itself, 10 and 20 degrees
    assert sorted(nearest_to_targets(bank, q, 3)[0].tolist()) == [3, 4, 5]  # what the query would pick


def test_msf_step_enqueues_first_then_loss_and_purity_by_hand(tmp_path):
    method = _method(tmp_path, "msf", "method.topk=3")
    dim = method.bank.bank.shape[1]
    rows = _angles([5, 15, 85, 90, 100, 180, 260, 270], dim)
    method.bank = MemoryBank(8, dim, store_ids=True)
    method.bank.bank.copy_(rows)
    method.bank.ids.copy_(torch.tensor([2, 3, 4, 5, 6, 7, -1, -1]))  # images 2-7, whose labels are below
    targets = torch.tensor([0, 1, 0, 0, 1, 1, 2, 0])  # the batch holds images 0 (label 0) and 1 (label 1)
    method.bank.ptr.fill_(6)
    t, q = _angles([0, 93], dim), _angles([45, 93], dim)
    method.net.target = lambda x, shuffle_bn: t
    method.net.query = lambda x: q
    out = step(method, _images(5, n=2), torch.arange(2))
    # t enqueued at rows 6, 7 before the distances: NN(t0 = 0°) = {0°, 5°, 15°}, NN(t1 = 93°) = {93°, 90°, 100°}
    assert torch.allclose(method.bank.bank[6:], t) and method.bank.ids.tolist()[6:] == [0, 1]
    pairs = [45 - 0, 45 - 5, 45 - 15, 0, 93 - 90, 100 - 93]
    expected = sum(2 - 2 * math.cos(math.radians(a)) for a in pairs) / 6
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    # purity: labels {0,0,0} vs 0 -> 1; labels {1,1,2} vs 1 -> 2/3
    assert neighbour_purity(out.neighbours, torch.arange(2), targets).item() == pytest.approx((1 + 2 / 3) / 2)
    # enqueueing after the distances would have given NN(t0) = {5°, 15°, 85°}: another loss
    late = [45 - 5, 45 - 15, 85 - 45, 93 - 90, 100 - 93, 93 - 85]
    assert abs(sum(2 - 2 * math.cos(math.radians(a)) for a in late) / 6 - out.loss.item()) > 1e-2


def test_msf_purity_is_at_least_one_over_k(tmp_path):
    method = _method(tmp_path, "msf", "method.topk=5")
    targets = torch.arange(256)  # every image its own label

    def purity(out) -> float:
        return neighbour_purity(out.neighbours, torch.arange(8), targets).item()

    out = step(method, _images(10), torch.arange(8))
    assert purity(out) == pytest.approx(1 / 5)  # only the self-match: the rest is unlabelled
    for n in range(2):
        out = step(method, _images(11 + n), torch.arange(8))
        assert 1 / 5 <= purity(out) <= 1.0
    assert method.bank.ptr.item() == 24


# ---------------------------------------------------------------------------------------------- both


@pytest.mark.parametrize("name", ["isd", "isd_plus", "msf"])
def test_no_gradient_reaches_the_teacher_or_the_bank(tmp_path, name):
    method = _method(tmp_path, name)
    out = step(method, _images(6), torch.arange(8))
    out.loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in method.net.encoder_k.parameters())
    bank = method.bank if name == "msf" else method.queue
    assert not bank.bank.requires_grad and bank.bank.grad is None
    assert all(p.grad is not None for p in [*method.net.encoder_q.parameters(), *method.net.predictor.parameters()])


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.method.state_dict().items()}


@pytest.mark.parametrize("name", ["isd", "msf"])
def test_resume_is_bit_identical(tmp_path, name):
    """One epoch of 8 steps, interrupted after 5 (the engine tests cover epoch boundaries for MoCo and BYOL)."""
    words = (SIZE[name], "train.epochs=1")
    straight = Trainer(tiny_config(tmp_path / "a", *words, method=name))
    straight.fit()
    assert straight.step == 8
    first = Trainer(tiny_config(tmp_path / "b", *words, "train.max_steps=5", method=name))
    first.fit()
    resumed = Trainer(tiny_config(tmp_path / "b", *words, "train.resume=auto", method=name))
    assert resumed.step == 5
    resumed.fit()
    assert resumed.step == 8
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys() and any(k.endswith("bank") for k in a) and any(k.endswith("ids") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    bank = "bank.ptr" if name == "msf" else "queue.ptr"
    assert a[bank].item() == 8 * 32 % 256  # the pointer wrapped once: 8 batches of 32 into 256 rows


# ---------------------------------------------------------------------------------------------- recipes


def test_seed_recipes_match_the_seed_command_lines():
    isd = load_config(RECIPES / "isd_resnet18_imagenet.yaml")
    o, m = isd.optim, isd.method
    assert (m.name, isd.model.backbone, m.queue_size, m.teacher_temperature, m.student_temperature, m.momentum,
            m.projection_heads, m.queue_init, m.augmentation) == (
        "isd", "resnet18", 128000, 0.02, 0.02, 0.999, False, "normal_columns", "strong/strong")
    assert (o.lr, o.schedule, o.lr_decay_epochs, o.lr_decay_rate, o.momentum, o.weight_decay) == (
        0.01, "step", [140, 180], 0.2, 0.9, 1e-4)
    assert (isd.train.epochs, isd.train.batch_size) == (200, 256)

    plus = load_config(RECIPES / "isd_plus_resnet50_imagenet.yaml")
    o, m = plus.optim, plus.method
    assert (m.name, plus.model.backbone, m.queue_size, m.teacher_temperature, m.student_temperature, m.momentum,
            m.projection_heads, m.queue_init, m.augmentation) == (
        "isd_plus", "resnet50", 128000, 0.01, 0.1, 0.99, True, "normal", "weak/strong")
    assert (o.lr, o.schedule, plus.train.epochs, plus.train.batch_size, o.weight_decay) == (
        0.05, "cosine", 200, 256, 1e-4)

    msf = load_config(RECIPES / "msf_resnet50_imagenet.yaml")
    o, m = msf.optim, msf.method
    assert (m.name, msf.model.backbone, m.topk, m.bank_size, m.momentum, m.augmentation) == (
        "msf", "resnet50", 10, 128000, 0.99, "weak/strong")
    assert (o.lr, o.schedule, msf.train.epochs, msf.train.batch_size, o.weight_decay) == (
        0.05, "cosine", 200, 256, 1e-4)
    for cfg in (isd, plus, msf):  # the UMBC trainers: 224 px ImageNet, torchvision stem, SGD momentum 0.9
        assert (cfg.data.image_size, cfg.model.small_stem, cfg.optim.name, cfg.optim.momentum) == (
            224, False, "sgd", 0.9)
