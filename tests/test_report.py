"""`selfsup report`: the self-contained HTML page of a tiny run, the cluster ranking, and its rendering in Chromium."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from conftest import TINY
from selfsup.cli import main
from selfsup.data.datasets import ArrayDataset, _digits, register_dataset
from selfsup.eval.report import (
    build_report,
    embed_2d,
    find_chromium,
    rank_clusters,
    render_in_chromium,
    shown_clusters,
)

SECTIONS = ("Run", "Training curves", "Evaluation", "Collapse monitors", "Embedding of validation features", "Clusters",
            "Nearest-neighbour retrieval", "Near duplicates", "Attention maps")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY_VIT = ["model.backbone=vit_tiny", "model.patch_size=4", "model.embed_dim=32", "model.depth=2",
            "model.num_heads=2", "model.vit_image_size=16"]


def embedded_pngs(page: str) -> list[Image.Image]:
    """Every inline ``data:image/png`` image of the page, decoded (and checked to be a PNG)."""
    images = []
    for data in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page):
        raw = base64.b64decode(data, validate=True)
        assert raw.startswith(PNG_SIGNATURE)
        image = Image.open(__import__("io").BytesIO(raw))
        image.load()
        images.append(image)
    return images


def train_and_eval(root, *extra: str):
    words = [*TINY, f"train.output_dir={root}", "train.epochs=1", "eval.monitor_every_epochs=1", "train.threads=1",
             *extra]
    assert main(["train", "quickstart", *words]) == 0
    run = root / "run"
    assert main(["eval", str(run), "--protocol", "knn,nn,cluster", "--random-init", "--device", "cpu"]) == 0
    return run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 1-epoch MoCo run on 16-px digits, evaluated, and its report written by the command line."""
    run = train_and_eval(tmp_path_factory.mktemp("report"))
    assert main(["report", str(run), "--max-points", "150", "--device", "cpu"]) == 0
    return run


def test_report_is_self_contained_with_plots_scores_and_sections(tiny_run):
    page = (tiny_run / "report.html").read_text()
    assert not re.search(r'(src|href)\s*=\s*["\']?\s*(https?:)?//', page, re.I)  # nothing fetched from anywhere
    assert "<script" not in page.lower() and "@import" not in page
    images = embedded_pngs(page)
    # 2+ curves (loss, lr, kNN monitor, …), the embedding, 6 cluster rows (k = 10 on 450 val digits)
    assert len(images) >= 9
    assert all(min(image.size) >= 16 for image in images)
    assert any(image.size[0] >= 300 and image.size[1] >= 200 for image in images)  # a real plot, not an icon
    for heading in SECTIONS:
        assert f"<h2>{heading}</h2>" in page
    scores = json.loads((tiny_run / "eval.json").read_text())
    assert {"trained", "random_init"} <= set(scores) and "cluster_nmi" in scores["trained"]
    for column, values in scores.items():
        assert f"<th>{column}</th>" in page
        for key, value in values.items():
            assert f"<th>{key}</th>" in page and f">{value:.2f}</td>" in page
    delta = scores["trained"]["nn"] - scores["random_init"]["nn"]
    assert f">{delta:+.2f}</td>" in page
    assert "<h3>Purest clusters</h3>" in page and "<h3>Most mixed clusters</h3>" in page
    assert page.count('class="cluster"') == 6
    assert "kNN monitor (val)" in page  # alt text of the monitor curve (eval.monitor_every_epochs=1)
    assert "Attention maps are drawn for ViT backbones" in page
    assert "moco" in page and "resnet_mini" in page and "1 of 1" in page  # summary: method, backbone, epochs
    assert "coloured by class" in page and "RankMe (effective rank)" in page
    share = re.search(r"red where not: (\d+)% of these neighbours share the query's class", page)
    assert share and 10 <= int(share.group(1)) <= 100  # a trained model beats the 10% of random neighbours
    grid = re.search(r'alt="retrieval grid: validation queries and their neighbours" src="data:image/png;base64,'
                     r'([^"]+)"', page)
    with Image.open(io.BytesIO(base64.b64decode(grid.group(1)))) as picture:
        assert picture.width > 9 * 64 and picture.height > 6 * 64  # 6 queries, each with 8 neighbours


def test_report_says_what_is_missing_instead_of_failing(tiny_run, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tiny_run / "checkpoint.pt", bare / "checkpoint.pt")  # no metrics.jsonl, no eval.json
    out = build_report(bare, tmp_path / "elsewhere" / "page.html", max_points=60, device="cpu")
    assert out == tmp_path / "elsewhere" / "page.html" and not (bare / "report.html").exists()
    page = out.read_text()
    assert "No metrics.jsonl records" in page and "No eval.json in" in page
    # still there: the singular-value spectrum, the embedding, the six cluster rows, the retrieval grid and the
    # near-duplicate pairs
    assert len(embedded_pngs(page)) == 10
    for heading in SECTIONS:
        assert f"<h2>{heading}</h2>" in page


def test_clusters_are_ranked_purest_first_with_exact_purities():
    # cluster 0: labels 1,1,1,2 → 3/4; cluster 1: 0,0 → 1 (size 2); cluster 2: 0,1,2 → 1/3;
    # cluster 3: 2,2,2,2,2 → 1 (size 5); cluster 4: empty
    assign = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3])
    labels = np.array([1, 1, 1, 2, 0, 0, 0, 1, 2, 2, 2, 2, 2, 2])
    ranked = rank_clusters(assign, labels, num_clusters=5, num_classes=3)
    assert [s.cluster for s in ranked] == [3, 1, 0, 2]  # equal purity: the larger cluster first; empty left out
    assert [s.purity for s in ranked] == [1.0, 1.0, 0.75, 1 / 3]
    assert [s.size for s in ranked] == [5, 2, 4, 3]
    assert [s.majority for s in ranked] == [2, 0, 1, 0]  # a tie for the majority: the lowest label
    assert ranked[2].counts.tolist() == [0, 3, 1]
    purest, mixed = shown_clusters(ranked, per_side=3)
    assert [s.cluster for s in purest] == [3, 1, 0] and [s.cluster for s in mixed] == [2]  # no cluster twice
    purest, mixed = shown_clusters(ranked, per_side=1)
    assert [s.cluster for s in purest] == [3] and [s.cluster for s in mixed] == [2]


def test_umap_falls_back_to_tsne_when_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", None)  # import umap → ImportError, whether installed or not
    features = np.random.default_rng(0).normal(size=(24, 8)).astype(np.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        points, used = embed_2d(features, "umap", seed=0)
    assert used == "t-SNE" and points.shape == (24, 2) and np.isfinite(points).all()
    assert any("umap-learn is not installed" in str(w.message) for w in caught)
    again, _ = embed_2d(features, "tsne", seed=0)
    np.testing.assert_allclose(points, again)  # seeded: the same layout


def test_vit_run_report_shows_attention_maps(tmp_path):
    run = train_and_eval(tmp_path, *TINY_VIT, "train.max_steps=2", "eval.monitor_every_epochs=0")
    page = build_report(run, max_points=60, device="cpu", attention_images=2).read_text()
    assert "Attention maps are drawn for ViT backbones" not in page
    attention = re.findall(r'alt="attention of validation image (\d)" src="data:image/png;base64,([^"]+)"', page)
    assert [i for i, _ in attention] == ["0", "1"]
    with Image.open(__import__("io").BytesIO(base64.b64decode(attention[0][1]))) as png:
        zoom = 96 // 16
        assert png.format == "PNG" and png.size == (zoom * 16 * (1 + 2), zoom * 16)  # input | 2 heads


@register_dataset("test-digits-no-labels")
def _digits_without_labels(cfg, split):
    """The digits with every target -1 and no class names: a label-free data set, as a user's image folder."""
    train_x, _, val_x, _ = _digits()
    images = train_x if split == "train" else val_x
    return ArrayDataset("test-digits-no-labels", split, [images], np.full(len(images), -1), [])


@pytest.fixture(scope="module")
def label_free_run(tmp_path_factory):
    """A 1-epoch MoCo run on the label-free digits, scored by the label-free protocols, and its report."""
    root = tmp_path_factory.mktemp("label-free")
    words = [w for w in TINY if not w.startswith("data.name=")]
    assert main(["train", "quickstart", *words, "data.name=test-digits-no-labels", f"train.output_dir={root}",
                 "train.epochs=1", "train.threads=1"]) == 0
    run = root / "run"
    assert main(["eval", str(run), "--protocol", "knn,rankme,duplicates", "--random-init", "--device", "cpu"]) == 0
    assert main(["report", str(run), "--max-points", "150", "--device", "cpu"]) == 0
    return run


def visible_text(page: str) -> str:
    """The page without the resolved config (it names eval.knn_k & co) and without the image data."""
    return re.sub(r'src="data:[^"]*"', "", re.sub(r"<pre>.*?</pre>", "", page, flags=re.S))


LABEL_BASED = ("Purest clusters", "Most mixed clusters", "purity", "coloured by class", "knn", "share the query",
               "majority")


def test_label_free_report_has_retrieval_grids_and_no_label_based_section(label_free_run):
    page = (label_free_run / "report.html").read_text()
    for heading in SECTIONS:
        assert f"<h2>{heading}</h2>" in page
    shown = visible_text(page)
    for text in LABEL_BASED:
        assert text not in shown
    scores = json.loads((label_free_run / "eval.json").read_text())
    assert set(scores["trained"]) == {"rankme", "feature_std", "feature_std_x_sqrt_d", "duplicate_pairs",
                                      "duplicates_val_in_train"}  # knn was skipped, not scored
    assert f">{scores['trained']['duplicate_pairs']}</td>" in page  # a count, shown without decimals
    assert "coloured by k-means cluster" in page and "ranked by tightness" in page
    assert "<h3>Tightest clusters</h3>" in page and page.count('class="cluster"') == 6
    tightness = [float(t) for t in re.findall(r"tightness <b>([0-9.]+)</b>", page)]
    assert tightness[:3] == sorted(tightness[:3], reverse=True) and min(tightness[:3]) >= max(tightness[3:])
    grid = re.search(r'alt="retrieval grid: validation queries and their neighbours" src="data:image/png;base64,'
                     r'([^"]+)"', page)
    assert grid is not None
    with Image.open(io.BytesIO(base64.b64decode(grid.group(1)))) as picture:
        assert picture.width > 9 * 64 and picture.height > 6 * 64
    assert re.search(r"<b>\d+</b> pairs of the 256 training images searched have cosine similarity", page)
    assert len(embedded_pngs(page)) >= 13  # curves, spectrum, embedding, 6 cluster rows, retrieval grid, pairs


CHROMIUM = find_chromium()


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (Debian: apt-get install chromium)")
def test_report_renders_in_headless_chromium(tiny_run, tmp_path):
    page = tiny_run / "report.html"
    dom = render_in_chromium(page)
    rendered = re.findall(r'<img[^>]*src="data:image/png;base64,', dom)
    assert len(rendered) == len(embedded_pngs(page.read_text())) >= 9
    for heading in SECTIONS:
        assert f"<h2>{heading}</h2>" in dom
    shot = tmp_path / "report.png"
    render_in_chromium(page, screenshot=shot, window=(1280, 2400))
    assert shot.read_bytes().startswith(PNG_SIGNATURE)
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(int)
    assert image.size == (1280, 2400)
    assert len(np.unique(pixels, axis=0)) > 50  # not blank: text, tables, plots
    # matplotlib's default line colour (tab:blue, #1f77b4) appears only inside the plots: they were drawn
    tab_blue = np.abs(pixels - [31, 119, 180]).sum(1) < 30
    assert tab_blue.sum() > 200


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (Debian: apt-get install chromium)")
def test_label_free_report_renders_in_headless_chromium(label_free_run):
    page = label_free_run / "report.html"
    dom = render_in_chromium(page)
    assert len(re.findall(r'<img[^>]*src="data:image/png;base64,', dom)) == len(embedded_pngs(page.read_text()))
    assert re.search(r'<img[^>]*alt="retrieval grid: validation queries and their neighbours"', dom)
    shown = visible_text(dom)
    for text in LABEL_BASED:
        assert text not in shown


def test_a_failing_browser_is_one_clear_error_and_the_report_is_kept(tiny_run, tmp_path, monkeypatch, capsys):
    broken = tmp_path / "chromium"
    broken.write_text("#!/bin/sh\necho 'cannot open display' >&2\nexit 3\n")
    broken.chmod(0o755)
    monkeypatch.setattr("selfsup.eval.report.find_chromium", lambda: str(broken))
    out = tmp_path / "page.html"
    code = main(["report", str(tiny_run), "--out", str(out), "--max-points", "100", "--device", "cpu",
                 "--screenshot", str(tmp_path / "shot.png")])
    err = capsys.readouterr().err
    assert code == 1 and out.is_file() and not (tmp_path / "shot.png").exists()
    assert "exited with 3" in err and "cannot open display" in err and str(out) in err
    assert "Traceback" not in err
