"""Label-free evaluation: collapse monitors (RankMe, feature std), nearest-neighbour retrieval, near-duplicate pairs,
their picture grids, and the protocols on data sets without (or with partial) labels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import tiny_config
from selfsup.config import ConfigError
from selfsup.data.datasets import ArrayDataset, _digits, register_dataset
from selfsup.eval.embedding_stats import (
    RANKME_EPS,
    collapse_scores,
    normalised_feature_std,
    rankme,
    singular_values,
)
from selfsup.eval.knn import knn_sweep
from selfsup.eval.pictures import OTHER_CLASS, QUERY_COLOUR, SAME_CLASS, pair_grid, retrieval_grid, tiles
from selfsup.eval.protocols import evaluate_backbone, format_scores
from selfsup.eval.retrieval import duplicated_in, near_duplicates, nearest_neighbours


def rankme_formula(sigma: list[float], eps: float = RANKME_EPS) -> float:
    """exp(−Σ p log p), p = σ/Σσ + ε, written out by hand."""
    total = sum(sigma)
    p = [s / total + eps for s in sigma]
    return math.exp(-sum(q * math.log(q) for q in p))


# ------------------------------------------------------------------------------------------- collapse monitors


def test_rankme_of_a_rank_one_matrix_is_one():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(50, 1, generator=g) @ torch.randn(1, 8, generator=g)
    assert rankme(z) == pytest.approx(rankme_formula([1.0] + [0.0] * 7), rel=1e-5)
    assert rankme(z) == pytest.approx(1.0, abs=1e-4)


def test_rankme_of_an_isotropic_matrix_is_its_dimension():
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(1)))
    z = torch.cat([3 * q, -3 * q])  # 32 rows, all 16 singular values equal
    assert rankme(z) == pytest.approx(rankme_formula([1.0] * 16), rel=1e-6)
    assert rankme(z) == pytest.approx(16.0, rel=1e-5)


def test_rankme_of_a_diagonal_matrix_follows_its_spectrum():
    spectrum = [4.0, 3.0, 2.0, 1.0, 0.0, 0.0]
    z = torch.diag(torch.tensor(spectrum))
    torch.testing.assert_close(singular_values(z), torch.tensor(spectrum, dtype=torch.float64), atol=1e-6, rtol=0)
    assert rankme(z) == pytest.approx(rankme_formula(spectrum), rel=1e-6)
    # p = (0.4, 0.3, 0.2, 0.1): exp(entropy) = 3.5961...
    assert rankme(z) == pytest.approx(math.exp(-sum(p * math.log(p) for p in (0.4, 0.3, 0.2, 0.1))), rel=1e-5)
    shuffled = z[torch.randperm(6)] @ torch.linalg.qr(torch.randn(6, 6))[0]  # rows permuted, columns rotated
    assert rankme(shuffled) == pytest.approx(rankme(z), rel=1e-5)


def test_singular_values_in_chunks_match_an_svd_and_keep_min_n_d_of_them():
    z = torch.randn(40, 7, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(singular_values(z, chunk_size=6), torch.linalg.svdvals(z.double()), rtol=1e-9,
                               atol=1e-9)
    assert singular_values(z[:3]).shape == (3,)  # N < D: N values


def test_feature_std_by_hand_and_for_a_collapsed_and_a_spread_embedding():
    z = torch.tensor([[5.0, 0, 0, 0], [-1, 0, 0, 0], [0, 2, 0, 0], [0, -0.5, 0, 0]])  # scales vanish: ±e1, ±e2
    expected = math.sqrt(2 / 3)  # values (1, -1, 0, 0): mean 0, unbiased variance 2/3
    torch.testing.assert_close(normalised_feature_std(z), torch.tensor([expected, expected, 0, 0], dtype=torch.float64))
    scores = collapse_scores(z)
    assert scores["feature_std"] == pytest.approx(expected / 2)
    assert scores["feature_std_x_sqrt_d"] == pytest.approx(expected)
    collapsed = torch.rand(100, 1) * torch.tensor([[1.0, 2.0, 3.0]])  # one direction, many lengths
    assert collapse_scores(collapsed)["feature_std"] == pytest.approx(0.0, abs=1e-6)
    assert collapse_scores(collapsed)["rankme"] == pytest.approx(1.0, abs=1e-4)
    spread = collapse_scores(torch.randn(20000, 16, generator=torch.Generator().manual_seed(3)))
    assert spread["feature_std_x_sqrt_d"] == pytest.approx(1.0, abs=0.02)
    assert spread["rankme"] == pytest.approx(16.0, rel=0.02)


def test_rankme_uses_a_seeded_subset_of_at_most_max_samples_rows():
    z = torch.randn(300, 8, generator=torch.Generator().manual_seed(4))
    assert collapse_scores(z, max_samples=100, seed=1) == collapse_scores(z, max_samples=100, seed=1)
    subset = z[torch.randperm(300, generator=torch.Generator().manual_seed(1))[:100]]
    assert collapse_scores(z, max_samples=100, seed=1)["rankme"] == pytest.approx(rankme(subset))
    assert collapse_scores(z, max_samples=None)["rankme"] == pytest.approx(rankme(z))


# ------------------------------------------------------------------------------------------------- retrieval


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.normalize(a.double(), dim=1) @ F.normalize(b.double(), dim=1).T


def test_nearest_neighbours_equal_a_brute_force_cosine_search():
    g = torch.Generator().manual_seed(0)
    memory, queries = torch.randn(60, 5, generator=g), torch.randn(9, 5, generator=g)
    sims, idx = nearest_neighbours(queries * 7, memory * torch.rand(60, 1, generator=g) + 0, 4, chunk_size=4)
    full = _cosine(queries, memory)
    top = full.topk(4, dim=1)
    assert torch.equal(idx, top.indices)  # scale-free: raw features are normalised first
    torch.testing.assert_close(sims.double(), top.values, rtol=1e-5, atol=1e-5)
    assert (sims[:, :-1] >= sims[:, 1:]).all()


def test_nearest_neighbours_of_the_memory_itself_skip_each_row():
    x = torch.randn(30, 6, generator=torch.Generator().manual_seed(1))
    sims, idx = nearest_neighbours(x, x, 3, exclude_self=True, chunk_size=7)
    full = _cosine(x, x).fill_diagonal_(-2.0)
    assert torch.equal(idx, full.topk(3, dim=1).indices)
    assert not (idx == torch.arange(30)[:, None]).any()
    with pytest.raises(ValueError, match="same number of rows"):
        nearest_neighbours(x[:5], x, 2, exclude_self=True)


def _planted_duplicates() -> torch.Tensor:
    """30 random rows in 16-d, then copies: 30 ≈ 3, 31 = 2 x 7, 32 ≈ 3 (pairs 3-30, 3-32, 30-32, 7-31)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(30, 16, generator=g)
    noise = 1e-3 * torch.randn(2, 16, generator=g)
    return torch.cat([x, x[3:4] + noise[:1], 2 * x[7:8], x[3:4] + noise[1:]])


def test_near_duplicates_find_the_planted_pairs_in_any_tiling():
    x = _planted_duplicates()
    found = near_duplicates(x, 0.99, max_pairs=10)
    assert found.count == 4
    assert {tuple(p) for p in found.pairs.tolist()} == {(3, 30), (3, 32), (30, 32), (7, 31)}
    assert found.pairs.tolist()[0] == [7, 31]  # cosine 1: the most similar first
    assert (found.similarities[:-1] >= found.similarities[1:]).all()
    for tile in (1, 4, 7, 100):
        again = near_duplicates(x, 0.99, max_pairs=10, tile=tile)
        assert again.count == 4 and torch.equal(again.pairs, found.pairs)
        torch.testing.assert_close(again.similarities, found.similarities)
    capped = near_duplicates(x, 0.99, max_pairs=2, tile=4)
    assert capped.count == 4 and torch.equal(capped.pairs, found.pairs[:2])  # the count is of every pair


def test_near_duplicates_count_and_order_equal_brute_force():
    x = torch.randn(45, 4, generator=torch.Generator().manual_seed(6))
    full = _cosine(x, x).float()
    i, j = torch.triu_indices(45, 45, offset=1)
    sims = full[i, j]
    for threshold in (0.2, 0.6, 0.95):
        found = near_duplicates(x, threshold, max_pairs=15, tile=8)
        hit = sims >= threshold
        assert found.count == int(hit.sum())
        order = sorted(zip((-sims[hit]).tolist(), i[hit].tolist(), j[hit].tolist(), strict=True))[:15]
        assert found.pairs.tolist() == [[a, b] for _, a, b in order]
    assert near_duplicates(x, 0.2, max_pairs=0).pairs.shape == (0, 2)
    with pytest.raises(ValueError, match=r"cosine similarity in \[-1, 1\]"):
        near_duplicates(x, 1.5)


def test_duplicated_in_flags_queries_with_a_near_copy_in_memory():
    memory = torch.randn(20, 8, generator=torch.Generator().manual_seed(7))
    queries = torch.cat([3 * memory[[4, 11]], torch.randn(3, 8, generator=torch.Generator().manual_seed(8))])
    mask, nearest = duplicated_in(queries, memory, 0.999)
    assert mask.tolist() == [True, True, False, False, False] and nearest[:2].tolist() == [4, 11]


# -------------------------------------------------------------------------------------------------- pictures


def _near(image, colour, tolerance: int = 40) -> np.ndarray:
    return np.abs(np.asarray(image.convert("RGB")).astype(int) - np.asarray(colour)).sum(-1) < tolerance


def test_tiles_show_the_images_as_the_model_saw_them():
    images = torch.rand(2, 3, 8, 8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    normalised = (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    tile = tiles(normalised, mean, std, height=32)[1]
    assert tile.size == (32, 32)
    pixel = np.asarray(tile)[4 * 3 + 1, 4 * 5 + 2]  # nearest-neighbour x4: source pixel (3, 5)
    np.testing.assert_allclose(pixel, (images[1, :, 3, 5] * 255).round().numpy(), atol=1)


def test_retrieval_grid_has_a_row_per_query_framed_and_coloured_by_class():
    g = torch.Generator().manual_seed(0)  # grey images (equal channels): the only colours are frames and captions
    queries = torch.randn(3, 1, 8, 8, generator=g).expand(3, 3, 8, 8)
    neighbours = torch.randn(3, 4, 1, 8, 8, generator=g).expand(3, 4, 3, 8, 8)
    sims = torch.linspace(0.99, 0.5, 12).view(3, 4)
    mean, std = (0.5,) * 3, (0.25,) * 3
    plain = retrieval_grid(queries, neighbours, sims, mean, std, height=48)
    framed = 48 + 4  # the query tile and its 2-pixel frame
    assert plain.width == framed + 4 + 8 + 4 + 4 * 48 + 3 * 4  # query, gap, spacer, gap, 4 neighbours and 3 gaps
    assert plain.height > 3 * 48 and _near(plain.crop((0, 0, framed, framed)), QUERY_COLOUR).sum() >= 4 * 48
    assert not _near(plain, SAME_CLASS, 60).any() and not _near(plain, OTHER_CLASS, 60).any()  # no labels: no colours
    labelled = retrieval_grid(queries, neighbours, sims, mean, std, height=48, query_labels=[0, 1, 2],
                              neighbour_labels=[[0, 0, 1, 1]] * 3, classes=["zero", "one", "two"])
    assert labelled.height > plain.height  # a class line under every tile
    assert _near(labelled, SAME_CLASS).any() and _near(labelled, OTHER_CLASS).any()
    with pytest.raises(ValueError, match="must both be"):
        retrieval_grid(queries, neighbours, sims[:, :2], mean, std)


def test_pair_grid_puts_per_row_pairs_in_each_row():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(5, 3, 8, 8, generator=g), torch.randn(5, 3, 8, 8, generator=g)
    one_row = pair_grid(a[:4], b[:4], torch.ones(4), (0.5,) * 3, (0.25,) * 3, per_row=4, height=16)
    two_rows = pair_grid(a, b, torch.ones(5), (0.5,) * 3, (0.25,) * 3, per_row=4, height=16, captions=list("abcde"))
    assert two_rows.width == one_row.width and two_rows.height > 2 * one_row.height


# ------------------------------------------------------------------------------- protocols with and without labels


def _digits_with(name: str, keep_label) -> None:
    """Register data set ``name``: the digits with each label kept where ``keep_label(index)``, else -1."""

    @register_dataset(name)
    def build(cfg, split):
        train_x, train_y, val_x, val_y = _digits()
        x, y = (train_x, train_y) if split == "train" else (val_x, val_y)
        targets = np.where([keep_label(i) for i in range(len(y))], y, -1)
        return ArrayDataset(name, split, [x], targets, [str(d) for d in range(10)])


_digits_with("test-digits-unlabelled", lambda i: False)
_digits_with("test-digits-half-labelled", lambda i: i % 2 == 0)


class Pixels(nn.Module):
    """A fixed 'backbone': the mean-pooled 4 x 4 pixels of the image (48 features)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, 4).flatten(1)


def test_label_based_protocols_are_skipped_with_a_note_without_labels(tmp_path, capsys):
    cfg = tiny_config(tmp_path, "data.name=test-digits-unlabelled", "data.subset=200")
    scores = evaluate_backbone(Pixels(), cfg, "cpu", ["knn", "nn", "cluster", "align", "linear", "rankme",
                                                      "duplicates"])
    out = capsys.readouterr().out
    assert "note: knn, nn, cluster, align, linear skipped: data set 'test-digits-unlabelled' has no labels" in out
    assert out.count("\n") == 1
    assert set(scores) == {"rankme", "feature_std", "feature_std_x_sqrt_d", "duplicate_pairs",
                           "duplicates_val_in_train"}
    assert isinstance(scores["duplicate_pairs"], int) and 1 <= scores["rankme"] <= 48
    assert evaluate_backbone(Pixels(), cfg, "cpu", ["knn"]) == {}
    cfg.eval.duplicate_threshold = 2.0
    with pytest.raises(ConfigError, match="eval.duplicate_threshold"):
        evaluate_backbone(Pixels(), cfg, "cpu", ["duplicates"])


def test_label_free_scores_equal_the_functions_on_the_features(tmp_path):
    cfg = tiny_config(tmp_path, "data.subset=200", "eval.duplicate_threshold=0.99")
    scores = evaluate_backbone(Pixels(), cfg, "cpu", ["rankme", "duplicates", "nn"])
    from selfsup.eval.protocols import feature_loader

    train_x = torch.cat([Pixels()(images) for images, _ in feature_loader(cfg, "train")[0]])
    val_x = torch.cat([Pixels()(images) for images, _ in feature_loader(cfg, "val")[0]])
    assert scores["rankme"] == pytest.approx(collapse_scores(train_x)["rankme"], rel=1e-6)
    assert scores["duplicate_pairs"] == near_duplicates(train_x, 0.99).count
    assert scores["duplicates_val_in_train"] == int(duplicated_in(val_x, train_x, 0.99)[0].sum())
    assert "nn" in scores
    rows = {line.split()[0]: line.split()[1:] for line in format_scores({"trained": scores}).splitlines()[1:]}
    assert rows["duplicate_pairs"] == [str(scores["duplicate_pairs"])]  # a count, no decimals
    assert rows["rankme"] == [f"{scores['rankme']:.2f}"]


def test_a_partly_labelled_set_is_scored_on_its_labelled_images(tmp_path):
    cfg = tiny_config(tmp_path, "data.name=test-digits-half-labelled", "data.subset=200")
    scores = evaluate_backbone(Pixels(), cfg, "cpu", ["knn", "nn"])
    from selfsup.eval.protocols import feature_loader

    def labelled(split):
        xs, ys = zip(*[(Pixels()(images), labels) for images, labels in feature_loader(cfg, split)[0]], strict=True)
        x, y = torch.cat(xs), torch.cat(ys)
        return F.normalize(x[y >= 0], dim=1), y[y >= 0]

    (train_x, train_y), (val_x, val_y) = labelled("train"), labelled("val")
    assert len(train_y) == 100
    expected = knn_sweep(train_x, train_y, val_x, val_y, ks=[1, 20], temperatures=[0.07, None], num_classes=10)
    assert scores == {key: expected[key] for key in ("nn", "knn20_T0.07", "knn20_vote")}
