"""k-NN evaluation: weighted / unweighted votes against brute force, tie-breaks, sweep, feature extraction."""

from __future__ import annotations

import math
import sys
import types
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfsup.eval.features import extract_features
from selfsup.eval.knn import knn_classify, knn_sweep


def _random_data(seed: int = 0, n_train: int = 200, n_query: int = 50, dim: int = 16, classes: int = 5):
    g = torch.Generator().manual_seed(seed)
    train = F.normalize(torch.randn(n_train, dim, generator=g), dim=1)
    query = F.normalize(torch.randn(n_query, dim, generator=g), dim=1)
    train_y = torch.randint(0, classes, (n_train,), generator=g)
    query_y = torch.randint(0, classes, (n_query,), generator=g)
    return train, train_y, query, query_y


def _neighbours(train: torch.Tensor, q: torch.Tensor, k: int) -> list[tuple[float, int]]:
    """(similarity, index) of the k most similar training rows, by an explicit Python sort."""
    sims = [(float(train[i] @ q), i) for i in range(train.shape[0])]
    return sorted(sims, key=lambda s: -s[0])[:k]


def _brute_weighted(train, train_y, query, k: int, t: float, classes: int) -> list[int]:
    preds = []
    for q in query:
        scores = [0.0] * classes
        for sim, i in _neighbours(train, q, k):
            scores[int(train_y[i])] += math.exp(sim / t)
        preds.append(max(range(classes), key=lambda c: scores[c]))
    return preds


@pytest.mark.parametrize("k", [1, 5, 20])
@pytest.mark.parametrize("t", [0.07, 0.5])
def test_weighted_matches_brute_force_and_chunking(k: int, t: float) -> None:
    train, train_y, query, _ = _random_data()
    expected = _brute_weighted(train, train_y, query, k, t, 5)
    big = knn_classify(train, train_y, query, k=k, num_classes=5, temperature=t, chunk_size=1024)
    small = knn_classify(train, train_y, query, k=k, num_classes=5, temperature=t, chunk_size=7)
    assert big.dtype == torch.int64 and big.shape == (50,)
    assert big.tolist() == expected
    assert torch.equal(small, big)


def test_weighted_small_temperature_does_not_overflow() -> None:
    train, train_y, query, _ = _random_data(seed=3)
    pred = knn_classify(train, train_y, query, k=20, num_classes=5, temperature=1e-3)
    assert pred.tolist() == _brute_weighted(train, train_y, query, 1, 1.0, 5)  # tiny T → nearest wins


def test_unweighted_vote_matches_brute_force_majority_without_ties() -> None:
    train, train_y, query, _ = _random_data(seed=1)
    k = 7
    expected, untied = [], []
    for j, q in enumerate(query):
        counts = Counter(int(train_y[i]) for _, i in _neighbours(train, q, k)).most_common()
        if len(counts) == 1 or counts[0][1] > counts[1][1]:
            expected.append(counts[0][0])
            untied.append(j)
    assert len(untied) > 10
    for chunk in (3, 1024):
        pred = knn_classify(train, train_y, query, k=k, num_classes=5, temperature=None, chunk_size=chunk,
                            generator=torch.Generator().manual_seed(0))
        assert pred[untied].tolist() == expected


def test_unweighted_vote_breaks_ties_at_random_reproducibly() -> None:
    # the query's 2 nearest neighbours carry labels 0 and 2: an exact 1–1 tie at k=2
    train = F.normalize(torch.tensor([[1.0, 0.1], [1.0, -0.2], [-1.0, 0.0], [0.0, 1.0]]), dim=1)
    train_y = torch.tensor([0, 2, 1, 3])
    query = torch.tensor([[1.0, 0.0]] * 4)

    def predict(seed: int, chunk: int = 1024) -> list[int]:
        return knn_classify(train, train_y, query, k=2, num_classes=4, temperature=None, chunk_size=chunk,
                            generator=torch.Generator().manual_seed(seed)).tolist()

    seen = Counter(c for seed in range(50) for c in predict(seed))
    assert set(seen) == {0, 2}
    assert min(seen.values()) > 50  # 200 draws, both classes well represented
    assert predict(123) == predict(123)
    assert predict(123, chunk=1) == predict(123)  # chunking does not change the draws
    # the weighted vote has no random part: the closer neighbour (label 0) wins
    assert knn_classify(train, train_y, query, k=2, num_classes=4).tolist() == [0] * 4


def test_one_nn_hand_made() -> None:
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    train_y = torch.tensor([3, 1, 0, 2])
    query = F.normalize(torch.tensor([[0.9, 0.2], [-0.1, 1.0], [-1.0, -0.3], [0.2, -1.0]]), dim=1)
    for t in (0.07, None):
        pred = knn_classify(train, train_y, query, k=1, num_classes=4, temperature=t)
        assert pred.tolist() == [3, 1, 0, 2]


def test_k_larger_than_train_set_is_capped() -> None:
    train, train_y, query, _ = _random_data(n_train=6)
    pred = knn_classify(train, train_y, query, k=50, num_classes=5, temperature=0.07)
    assert torch.equal(pred, knn_classify(train, train_y, query, k=6, num_classes=5, temperature=0.07))


def test_sweep_equals_separate_calls() -> None:
    train, train_y, query, query_y = _random_data(seed=2, classes=3)
    ks, temps, seed = (1, 4, 20), (0.07, 0.5, None), 5
    scores = knn_sweep(train, train_y, query, query_y, ks=ks, temperatures=temps, chunk_size=9, seed=seed)
    assert list(scores) == ["nn", "knn4_T0.07", "knn4_T0.5", "knn4_vote",
                            "knn20_T0.07", "knn20_T0.5", "knn20_vote"]
    for key, value in scores.items():
        k = 1 if key == "nn" else int(key[3:].split("_")[0])
        t = None if key in ("nn",) or key.endswith("vote") else float(key.split("_T")[1])
        pred = knn_classify(train, train_y, query, k=k, num_classes=3, temperature=t,
                            generator=torch.Generator().manual_seed(seed))
        assert value == pytest.approx(100.0 * (pred == query_y).float().mean().item())


def test_sweep_default_keys_and_separable_clusters() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(4, 8) * 10
    train_y, query_y = torch.arange(4).repeat(30), torch.arange(4).repeat(10)
    train = F.normalize(centres[train_y] + torch.randn(120, 8, generator=g), dim=1)
    query = F.normalize(centres[query_y] + torch.randn(40, 8, generator=g), dim=1)
    scores = knn_sweep(train, train_y, query, query_y)
    assert scores == {"nn": 100.0, "knn20_T0.07": 100.0, "knn20_vote": 100.0}


def test_faiss_backend_path_with_stub(monkeypatch: pytest.MonkeyPatch) -> None:
    """The faiss code path (exact IndexFlatIP search), exercised with a numpy stand-in for faiss."""

    class IndexFlatIP:
        def __init__(self, dim: int) -> None:
            self.data = np.zeros((0, dim), dtype=np.float32)

        def add(self, x: np.ndarray) -> None:
            self.data = np.concatenate([self.data, x])

        def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
            sims = x @ self.data.T
            idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
            return np.take_along_axis(sims, idx, axis=1), idx

    monkeypatch.setitem(sys.modules, "faiss", types.SimpleNamespace(IndexFlatIP=IndexFlatIP))
    train, train_y, query, query_y = _random_data(seed=4)
    for t in (0.07, None):
        kw = dict(k=10, num_classes=5, temperature=t, chunk_size=8)
        via_faiss = knn_classify(train, train_y, query, backend="faiss",
                                 generator=torch.Generator().manual_seed(1), **kw)
        via_torch = knn_classify(train, train_y, query, backend="torch",
                                 generator=torch.Generator().manual_seed(1), **kw)
        assert torch.equal(via_faiss, via_torch)
    assert knn_sweep(train, train_y, query, query_y, backend="faiss") == knn_sweep(
        train, train_y, query, query_y, backend="torch")


def test_faiss_backend_missing_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    train, train_y, query, _ = _random_data()
    with pytest.raises(ImportError):
        knn_classify(train, train_y, query, k=5, num_classes=5, backend="faiss")
    # "auto" falls back to torch
    assert knn_classify(train, train_y, query, k=5, num_classes=5, backend="auto").shape == (50,)


def test_extract_features_normalised_and_restores_mode() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.Linear(8, 4))
    model.train()
    x = torch.randn(10, 6)
    y = torch.arange(10)
    two = [(x[:4], y[:4]), (x[4:], y[4:])]
    three = [(x[:3], y[:3] + 100, y[:3]), (x[3:], y[3:] + 100, y[3:])]
    feats, labels = extract_features(model, two)
    assert model.training  # flag restored
    assert feats.dtype == torch.float32 and labels.dtype == torch.int64
    assert feats.shape == (10, 4) and torch.equal(labels, y)
    model.eval()
    with torch.no_grad():
        expected = F.normalize(model(x), dim=1)
    torch.testing.assert_close(feats, expected)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(10))
    feats3, labels3 = extract_features(model, three)
    assert not model.training  # an eval-mode model stays in eval mode
    torch.testing.assert_close(feats3, expected)
    assert torch.equal(labels3, y)  # the last element is the label, not the index
    raw, _ = extract_features(model, two, normalize=False, keep_on_device=True)
    torch.testing.assert_close(raw, model(x).detach())


def test_extract_features_flattens_and_autocast() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1))  # (B, 4, 1, 1) output
    x = torch.randn(5, 3, 8, 8)
    feats, labels = extract_features(model, [(x, [0, 1, 2, 3, 4])], channels_last=True,
                                     autocast_dtype=torch.bfloat16)
    assert feats.shape == (5, 4) and feats.dtype == torch.float32 and labels.tolist() == [0, 1, 2, 3, 4]
    torch.testing.assert_close(feats, F.normalize(model(x).flatten(1), dim=1), atol=2e-2, rtol=0)


# ------------------------------------------------------------------------------------- eval.pool_grid


def test_pooled_on_grid_equals_a_backbone_built_with_that_grid_and_is_restored():
    import torchvision

    from selfsup.config import ConfigError, ModelConfig
    from selfsup.eval.features import pooled_on_grid
    from selfsup.models.backbones import build_backbone

    torch.manual_seed(0)
    net, _ = build_backbone(ModelConfig(backbone="resnet_mini", widths=(4, 8, 12), pool_grid=2))
    reference, dim = build_backbone(ModelConfig(backbone="resnet_mini", widths=(4, 8, 12), pool_grid=4))
    reference.load_state_dict(net.state_dict())  # pooling has no weights: the same network
    net.eval(), reference.eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        before = net(x)
        with pooled_on_grid(net, 4) as pooled:
            assert pooled is net and dim == 12 * 16
            assert torch.equal(pooled(x), reference(x))
        assert torch.equal(net(x), before)  # its own 2 x 2 pooling is back
        with pooled_on_grid(net, None):
            assert torch.equal(net(x), before)
        resnet = torchvision.models.resnet18(num_classes=10).eval()
        resnet.fc = nn.Identity()
        with pooled_on_grid(resnet, 2):
            assert resnet(torch.randn(1, 3, 64, 64)).shape == (1, 512 * 4)
    with pytest.raises(ConfigError, match="eval.pool_grid=3 needs a backbone that pools"), \
            pooled_on_grid(nn.Conv2d(3, 4, 3), 3):
        pass
    with pytest.raises(ConfigError, match="at least 1"), pooled_on_grid(net, 0):
        pass


def test_eval_pool_grid_scores_the_grid_pooled_features(tmp_path):
    from conftest import tiny_config
    from selfsup.api import build_trainer
    from selfsup.config import ConfigError
    from selfsup.eval.protocols import evaluate_backbone
    from selfsup.models.backbones import build_backbone

    cfg = tiny_config(tmp_path, "model.widths=[4,8,12]")
    torch.manual_seed(0)
    net, _ = build_backbone(cfg.model)
    cfg.model.pool_grid = 3
    reference, _ = build_backbone(cfg.model)
    reference.load_state_dict(net.state_dict())
    cfg.model.pool_grid = 1
    protocols = ["knn", "nn", "cluster"]
    own = evaluate_backbone(net, cfg, "cpu", protocols)
    cfg.eval.pool_grid = 3
    gridded = evaluate_backbone(net, cfg, "cpu", protocols)
    cfg.eval.pool_grid = None
    assert gridded == evaluate_backbone(reference, cfg, "cpu", protocols) != own
    with pytest.raises(ConfigError, match="eval.pool_grid must be at least 1"):  # before training, not after
        build_trainer(tiny_config(tmp_path, "eval.pool_grid=0"))


def test_time_to_accuracy_baselines_equal_brute_force_knn(tmp_path, capsys):
    """benchmarks/time_to_accuracy.py: raw pixels and random init against the explicit sort above."""
    import copy
    import json

    from conftest import TINY, load_benchmark
    from selfsup.config import load_config
    from selfsup.data.transforms import transform_from_config
    from selfsup.eval.features import pooled_on_grid

    bench = load_benchmark("time_to_accuracy")
    initial: dict[str, nn.Module] = {}

    class RecordingTrainer(bench.Trainer):
        def __init__(self, cfg):
            super().__init__(cfg)
            initial["backbone"] = copy.deepcopy(self.method.backbone)

    bench.Trainer = RecordingTrainer
    overrides = [*TINY, f"train.output_dir={tmp_path}", "eval.pool_grid=2", "data.subset=120"]
    records = bench.main(["quickstart", *overrides, "--budget", "3s", "--points", "2", "--memory", "100"])
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")] == records
    header, raw, random_init, *trained = records
    assert (header["memory"], header["pool_grid"], raw["point"], random_init["point"]) == (
        100, 2, "raw_pixels", "random_init")
    assert trained and trained[-1]["train_seconds"] <= 3 * 1.05 and trained[-1]["step"] > 0

    cfg = load_config(None, overrides)
    memory_set, query_set = bench.split_sets(cfg, 100)
    memory_y, query_y = bench.labels_of(memory_set), bench.labels_of(query_set)

    def pixels(dataset) -> torch.Tensor:
        return F.normalize(torch.stack([torch.tensor(np.asarray(dataset[i][0]), dtype=torch.float32).flatten()
                                        for i in range(len(dataset))]), dim=1)

    tf = transform_from_config(cfg.data, "eval")
    with pooled_on_grid(initial["backbone"], 2) as net:
        embedded = [extract_features(net, [(torch.stack([tf(d[i][0]) for i in range(len(d))]), labels)])[0]
                    for d, labels in ((memory_set, memory_y), (query_set, query_y))]
    for record, (memory, queries) in [(raw, (pixels(memory_set), pixels(query_set))), (random_init, embedded)]:
        for key, k, t in [("knn20_T0.07", 20, 0.07), ("nn", 1, 1.0)]:
            predicted = torch.tensor(_brute_weighted(memory, memory_y, queries, k, t, 10))
            assert record[key] == round(100 * (predicted == query_y).double().mean().item(), 2), key
