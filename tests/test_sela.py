"""SeLa: Sinkhorn-Knopp on hand-made problems, the label-update schedule, the multi-head loss, resume of
the label table and schedule, label export, and the torchvision export of a ResNet head."""

from __future__ import annotations

import csv
import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from conftest import build, tiny_config
from selfsup.api import build_trainer
from selfsup.engine.trainer import Trainer
from selfsup.eval.clustering import pseudo_label_scores
from selfsup.export import export_labels, export_torchvision
from selfsup.methods import EmbedRequest, Progress
from selfsup.methods.sela import balanced_random_labels, relabel_iterations, relabel_times, sela_loss
from selfsup.nn.sinkhorn import hard_labels, power_softmax, sinkhorn_knopp, sinkhorn_labels, transport_plan


def _biased_logits(n: int = 3000, k: int = 30, seed: int = 0) -> torch.Tensor:
    """Random logits that favour cluster 0: a naive argmax puts far more than N/K images there."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=generator, dtype=torch.float64)
    logits[:, 0] += 2.0
    return logits


def test_sinkhorn_marginals_hold():
    logits = _biased_logits()
    n, k = logits.shape
    p = power_softmax(logits, 25.0)
    result = sinkhorn_knopp(p, tol=1e-3)
    q = transport_plan(p, result) * n
    assert torch.allclose(q.sum(dim=1), torch.ones(n, dtype=torch.float64), atol=1e-12)  # each image: mass 1
    assert torch.allclose(q.sum(dim=0), torch.full((k,), n / k, dtype=torch.float64), rtol=1e-3)  # clusters: N/K
    assert result.error <= 1e-3 and result.iterations % 10 == 1  # checks at iterations 1, 11, 21, ...


def test_labels_are_balanced_where_argmax_is_not():
    logits = _biased_logits()
    naive = torch.bincount(logits.argmax(dim=1), minlength=30)
    assert naive.max() > 500 and naive.min() < 60
    labels, result = sinkhorn_labels(logits, 25.0)  # the seed's defaults: float64, tol 0.1
    counts = torch.bincount(labels, minlength=30)
    assert counts.min() >= 97 and counts.max() <= 104, counts


@pytest.mark.parametrize("seed", range(8))
def test_large_lambda_gives_the_exact_equipartition(seed):
    generator = torch.Generator().manual_seed(seed)
    n, k = 12, 3
    logits = torch.randn(n, k, generator=generator, dtype=torch.float64)
    cost = -torch.log_softmax(logits, dim=1).numpy()  # −log P
    rows, cols = linear_sum_assignment(np.repeat(cost, n // k, axis=1))  # each cluster replicated N/K times
    exact = torch.as_tensor(cols[np.argsort(rows)] // (n // k))
    labels, _ = sinkhorn_labels(logits, 300.0, tol=1e-3)
    assert torch.equal(labels, exact)
    assert torch.equal(torch.bincount(labels), torch.full((k,), n // k))


def test_per_sample_constant_changes_nothing():
    logits = _biased_logits(600, 12)
    shift = 50.0 * torch.randn(600, 1, dtype=torch.float64)
    a, result_a = sinkhorn_labels(logits, 25.0)
    b, result_b = sinkhorn_labels(logits + shift, 25.0)
    assert torch.equal(a, b)
    assert result_a.iterations == result_b.iterations
    assert torch.allclose(result_a.r, result_b.r)


@pytest.mark.parametrize("with_head", [False, True])
def test_power_softmax_leaves_the_callers_logits_alone(with_head):
    x = torch.randn(50, 6, dtype=torch.float64)  # already in the compute dtype and device: .to() would alias it
    before = x.clone()
    weight, bias = (torch.randn(6, 6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)) if with_head \
        else (None, None)
    p = power_softmax(x, 25.0, weight=weight, bias=bias, chunk_size=16)
    assert torch.equal(x, before)
    logits = x @ weight.T + bias if with_head else x
    assert torch.allclose(p, torch.softmax(25.0 * logits, dim=1), rtol=1e-12)


def test_a_dead_cluster_stays_empty_and_the_others_share_the_samples():
    # cluster 5 sits 40 logits below the rest: 25·40 underflows float64, its column of P^λ is all zero.
    # The seed divides by that zero; NaNs then sent every label to the dead cluster.
    logits = torch.randn(300, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    logits[:, 5] -= 40.0
    assert power_softmax(logits, 25.0)[:, 5].max() == 0
    with pytest.warns(RuntimeWarning, match="1 of 6 clusters"):
        labels, result = sinkhorn_labels(logits, 25.0, tol=0.01)
    counts = torch.bincount(labels, minlength=6)
    assert counts[5] == 0 and counts[:5].min() >= 58 and counts[:5].max() <= 62, counts  # 300/5 each
    assert result.r[5] == 0 and torch.isfinite(result.c).all()


def test_float32_overflow_raises_instead_of_labelling():
    # one sample carries a denormal mass for cluster 5, every other sample none: r_5 overflows float32
    p = torch.softmax(torch.randn(300, 6, generator=torch.Generator().manual_seed(0)), dim=1)
    p[:, 5] = 0.0
    p[0, 5] = 1e-44
    with pytest.raises(FloatingPointError, match="float64"):
        sinkhorn_knopp(p)


def test_float32_agrees_with_float64_on_an_easy_case():
    logits = _biased_logits(900, 9).float()
    f64, _ = sinkhorn_labels(logits, 10.0, dtype="f64")
    f32, result = sinkhorn_labels(logits, 10.0, dtype="f32")
    assert result.r.dtype == torch.float32
    assert (f64 == f32).float().mean() > 0.99


def test_chunked_equals_unchunked():
    x = torch.randn(257, 16, dtype=torch.float64)
    weight, bias = torch.randn(10, 16), torch.randn(10)
    whole = power_softmax(x, 25.0, weight=weight, bias=bias, chunk_size=10_000)
    chunked = power_softmax(x, 25.0, weight=weight, bias=bias, chunk_size=7)
    assert torch.allclose(whole, chunked, rtol=1e-12, atol=1e-300)
    reference = torch.softmax(25.0 * (x @ weight.double().T + bias.double()), dim=1)
    assert torch.allclose(whole, reference, rtol=1e-10)
    result = sinkhorn_knopp(whole)
    assert torch.equal(hard_labels(whole, result.r, chunk_size=7), hard_labels(whole, result.r, chunk_size=1000))


def test_schedule_matches_the_seed():
    n = 1_281_167
    times = relabel_times(400, n, 100)
    assert len(times) == 100 and times[0] == 0
    assert np.round(times[:4] / n, 3).tolist() == [0.0, 0.041, 0.164, 0.368]
    within = times[times < 400 * n]
    assert len(within) == 99  # t_99 = 401.01 N lies past the end of training
    assert within[-1] / n == pytest.approx(392.9, abs=0.05) and within[-2] / n == pytest.approx(385.0, abs=0.05)
    # at most one update per iteration: early t_j that share an iteration are spread over the next ones
    small = relabel_times(2, 1000, 20)
    iterations = relabel_iterations(small, 250, 12)
    assert iterations[0] == 0 and all(b > a for a, b in zip(iterations, iterations[1:], strict=False))
    assert sum(1 for t in small if t <= 250) > 2 and iterations[:3] == [0, 1, 2]
    linear = relabel_times(400, 100, 401, "linear")
    assert np.diff(linear).std() < 1e-9 and linear[1] == pytest.approx(401.0001 / 400 * 100)


def test_loss_is_cross_entropy_averaged_over_heads():
    z0 = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    z1 = torch.tensor([[0.0, 0.0, 3.0], [1.0, 1.0, 1.0]])
    targets = torch.tensor([[0, 2], [2, 1]])
    e = torch.e
    ce0 = (-np.log(e**2 / (e**2 + 2)) - np.log(1 / (e + 2))) / 2
    ce1 = (-np.log(e**3 / (e**3 + 2)) - np.log(1 / 3)) / 2
    assert sela_loss([z0, z1], targets).item() == pytest.approx((ce0 + ce1) / 2, rel=1e-6)
    assert sela_loss([z0, z1], targets).item() == pytest.approx(
        (F.cross_entropy(z0, targets[0]) + F.cross_entropy(z1, targets[1])).item() / 2, rel=1e-6)


def test_pseudo_label_scores_per_head_and_mean():
    rng = np.random.default_rng(0)
    targets = np.repeat(np.arange(4), 25)
    targets[:10] = -1  # unknown classes are left out
    perfect = (targets + 1) % 4  # a relabelling of the classes
    perfect[:10] = rng.integers(0, 4, 10)
    noisy = rng.integers(0, 4, 100)
    scores = pseudo_label_scores(np.stack([perfect, noisy]), targets)
    assert list(scores) == ["head0", "head1", "mean"]
    for name in ("nmi", "nmi_geometric", "ami", "ari", "label_acc"):
        assert scores["head0"][name] == pytest.approx(100.0)
        assert scores["head1"][name] < 40  # chance: 25 % label accuracy, ≈0 for the others
        assert scores["mean"][name] == pytest.approx((100.0 + scores["head1"][name]) / 2)
    confusion = np.zeros((4, 4), dtype=int)
    np.add.at(confusion, (noisy[10:], targets[10:]), 1)
    best = max(sum(confusion[c, y] for c, y in enumerate(perm)) for perm in itertools.permutations(range(4)))
    assert scores["head1"]["label_acc"] == pytest.approx(100.0 * best / 90)


def test_initial_labels_are_balanced_and_differ_per_head():
    labels = balanced_random_labels(3, 100, 7, torch.Generator().manual_seed(0))
    for head in labels:
        assert torch.bincount(head, minlength=7).tolist() == [15, 15] + [14] * 5
    assert not torch.equal(labels[0], labels[1])


def test_shard_sizes_match_the_sampler():
    from selfsup.data.loader import EpochSampler

    for n, per_rank, world in [(100, 8, 2), (37, 4, 3), (256, 16, 2), (5, 4, 2)]:
        for rank in range(world):
            for drop_last in (False, True) if n >= per_rank * world else (False,):
                sampler = EpochSampler(n, per_rank, seed=0, rank=rank, world_size=world, drop_last=drop_last)
                assert len(sampler) == len(list(sampler))
                sampler.set_epoch(1, start_batch=1)
                assert len(sampler) == len(list(sampler))


SELA = ["data.subset=128", "method.ncl=8", "method.hc=2", "method.nopts=4", "method.tol=0.01"]


def test_resume_restores_labels_and_schedule_position(tmp_path, capsys):
    # 128 images, batch 32: 4 steps per epoch, 8 in all; t_j = 3.01·128·(j/3)² → updates before steps 0, 2, 6
    straight = build_trainer(tiny_config(tmp_path / "a", *SELA, method="sela"))  # with the label monitor
    straight.fit()
    assert (straight.method.iteration, straight.method.relabels) == (8, 3)
    monitored = straight.callbacks[0].assignment_scores

    first = Trainer(tiny_config(tmp_path / "b", *SELA, "train.max_steps=3", method="sela"))
    first.fit()
    assert (first.method.iteration, first.method.relabels) == (3, 2)
    assert first.method.next_relabel_sample == pytest.approx(3.01 * 128 * 4 / 9)
    labels_at_stop = first.method.labels.clone()
    resumed = Trainer(tiny_config(tmp_path / "b", *SELA, "train.resume=auto", method="sela"))
    assert (resumed.method.iteration, resumed.method.relabels) == (3, 2)
    assert resumed.method.next_relabel_sample == first.method.next_relabel_sample
    assert torch.equal(resumed.method.labels, labels_at_stop)
    resumed.fit()
    assert (resumed.method.iteration, resumed.method.relabels) == (8, 3)
    a, b = straight.method.state_dict(), resumed.method.state_dict()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
    assert a["_extra_state"] == b["_extra_state"]
    # every cluster is used (an untrained net's P^λ is nearly uniform, so hard labels are only roughly
    # balanced), and head 0 is monitored against the digit classes
    for head in straight.method.labels:
        assert torch.bincount(head, minlength=8).min() > 0
    assert set(monitored) == {"nmi", "nmi_geometric", "ami", "ari", "acc"}

    # pseudo-label export: CSV and JSON, dataset index → label per head
    exported = export_labels(tmp_path / "a" / "run", tmp_path / "labels.csv", score=pseudo_label_scores)
    rows = list(csv.reader(exported.path.open()))
    assert rows[0] == ["index", "image", "head0", "head1"] and len(rows) == 129
    assert rows[5] == ["4", "digits/train[4]", *map(str, straight.method.labels[:, 4].tolist())]
    from selfsup.cli import main

    assert main(["labels", str(tmp_path / "a" / "run"), str(tmp_path / "labels.json")]) == 0
    payload = json.loads((tmp_path / "labels.json").read_text())
    assert payload["num_heads"] == 2 and payload["num_clusters"] == 8
    # scored against the digit classes of the 128 training images, head 0 as the training log
    targets = straight.loader.dataset.base.targets
    assert payload["scores"] == pseudo_label_scores(straight.method.labels.numpy(), targets) == exported.scores
    assert payload["scores"]["head0"]["ami"] == pytest.approx(monitored["ami"])
    printed = capsys.readouterr().out.splitlines()
    assert printed[-3].split()[0] == "head0" and printed[-1].split()[0] == "mean"
    assert float(printed[-1].split()[1]) == pytest.approx(payload["scores"]["mean"]["nmi"], abs=0.01)
    assert payload["samples"][7]["labels"] == straight.method.labels[:, 7].tolist()


def test_one_head_per_update_and_clean_aggregation(tmp_path):
    cfg = tiny_config(tmp_path, *SELA, "method.relabel_heads=one", "method.aggregate=eval", method="sela")
    trainer = Trainer(cfg)
    method = trainer.method
    before = method.labels.clone()
    trainer._embed_if_requested()  # the update before the first step: head 0 % 2
    assert method.relabels == 1
    assert not torch.equal(method.labels[0], before[0]) and torch.equal(method.labels[1], before[1])
    request = method.embedding_request(Progress(5, trainer.total_steps, 4))  # in epoch 1 (4 steps per epoch)
    assert request is not None and (request.transform, request.train_mode, request.shuffle) == ("eval", False, False)
    method.on_embedding(trainer.embed(request))  # head 1
    assert not torch.equal(method.labels[1], before[1])
    # eval aggregation is deterministic: the features do not depend on the update number or BN batches
    first, index_a = trainer.embed(request)
    second, index_b = trainer.embed(method.embedding_request(Progress(8, trainer.total_steps, 4)))
    assert torch.equal(index_a, torch.arange(128)) and torch.equal(first, second)


def test_batch_augmentation_relabels_from_the_views_training_sees(tmp_path):
    # data.augment=batch: the loader yields raw uint8 images; the update must embed augmented, normalised views
    from selfsup.data.batch_augment import batch_transform_from_config

    trainer = Trainer(tiny_config(tmp_path, *SELA, "data.augment=batch", method="sela"))
    method = trainer.method
    seen: list[torch.Tensor] = []
    hook = method.encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    trainer._embed_if_requested()  # the update before the first step
    features, indices = trainer.embed(EmbedRequest(method.encoder, seed=123))  # a second pass
    hook.remove()
    assert method.relabels == 1 and features.shape == (128, 64)
    assert torch.equal(indices.sort().values, torch.arange(128))
    # the second pass draws the same crops and colours as a fresh BatchAugment seeded with its seed would
    augment = batch_transform_from_config(trainer.cfg.data, "moco_v1")
    generator = torch.Generator().manual_seed(123)
    raw = torch.stack([trainer.loader.dataset[(int(i), 0)][0] for i in indices[:32]])
    expected = augment(raw, generator)
    assert seen[4].shape == (32, 3, 16, 16) and torch.equal(seen[4], expected)
    trainer.fit()  # and training runs through its scheduled updates
    assert method.relabels == 3


def test_exported_torchvision_resnet_gives_head_zero_logits(tmp_path):
    import torchvision

    cfg = tiny_config(tmp_path, "model.backbone=resnet50", "model.small_stem=false", "method.ncl=10",
                      "method.hc=2", method="sela")
    torch.manual_seed(0)
    method = build(cfg, 64).eval()
    state, labels = export_torchvision(method, head=0)
    model = torchvision.models.resnet50(num_classes=10)
    model.load_state_dict(state, strict=True)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), method.heads(method.backbone(x))[0], atol=1e-6)
    assert torch.equal(labels, method.labels[0])


def test_two_ranks_shard_sinkhorn_and_share_the_label_table(tmp_path):
    from test_distributed import HERE, torchrun

    result = torchrun(str(HERE / "sela_dist_worker.py"), str(tmp_path), cwd=tmp_path)
    assert "rank 0: ok" in result.stdout and "rank 1: ok" in result.stdout


def test_fashion_mnist_recipe_updates_labels_about_once_per_epoch():
    from selfsup.cli import RECIPES
    from selfsup.config import load_config

    cfg = load_config(RECIPES / "sela_fashion_mnist.yaml")
    assert cfg.method.name == "sela" and cfg.method.schedule == "linear" and cfg.method.hc >= 2
    method = build(cfg, cfg.data.subset)
    steps = cfg.train.epochs * method.run.steps_per_epoch
    updates = relabel_iterations(method.times, cfg.train.batch_size, steps)
    assert updates[0] == 0 and cfg.train.epochs - 2 <= len(updates) <= cfg.train.epochs + 1
    assert np.diff(updates).max() <= 1.2 * method.run.steps_per_epoch
