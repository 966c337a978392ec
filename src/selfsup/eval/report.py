"""``selfsup report RUN``: one self-contained HTML page about a run.

Sections: the run summary, training curves from ``metrics.jsonl``, the score table from ``eval.json``, collapse
monitors (RankMe, the per-dimension std, the singular-value spectrum) of the validation features, a 2-D embedding
(t-SNE, or UMAP when installed) of them coloured by class, k-means clusters of them ranked by purity with rows of
their images (the purest and the most mixed), nearest-neighbour retrieval (validation queries and their neighbours
among the training images), near-duplicate pairs of training images, and, for ViT backbones, the last layer's CLS
attention maps. Without labels no section needs them: the embedding is coloured by k-means cluster and the clusters
are ranked by tightness (mean cosine to the centroid). Every image is an inline ``data:image/png;base64`` URI: the
file opens offline, copied anywhere, with no scripts and no external links. A section whose data are missing says so
in one line.
"""

from __future__ import annotations

import base64
import html
import io
import json
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from matplotlib.figure import Figure
from PIL import Image
from torch.utils.data import DataLoader, Subset

from selfsup.config import Config, ConfigError
from selfsup.data.datasets import ImageDataset, build_dataset
from selfsup.data.loader import EvalDataset
from selfsup.data.transforms import transform_from_config
from selfsup.engine.trainer import resolve_device
from selfsup.eval.attention import attention_panel, cls_attention
from selfsup.eval.clustering import cluster_tightness, kmeans
from selfsup.eval.embedding_stats import collapse_scores, singular_values
from selfsup.eval.features import extract_features, pooled_on_grid
from selfsup.eval.pictures import image_row, pair_grid, retrieval_grid
from selfsup.eval.protocols import LABEL_FREE_PROTOCOLS, format_score, score_names
from selfsup.eval.retrieval import duplicated_in, near_duplicates, nearest_neighbours
from selfsup.eval.run import TornFileWarning, load_run, read_scores
from selfsup.models.vit import ViT

EMBEDDINGS = ("tsne", "umap")
UNLABELLED_CLUSTERS = 10  # k of the report's k-means when the data set has no labels (build_report's clusters=)
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars")

# ---------------------------------------------------------------------------------------------- pieces


def png_bytes(image: Image.Image | Figure) -> bytes:
    buffer = io.BytesIO()
    if isinstance(image, Figure):
        image.savefig(buffer, format="png", dpi=100)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def img_tag(png: bytes, alt: str, css_class: str = "") -> str:
    """An ``<img>`` whose source is the PNG itself, base64-encoded."""
    data = base64.b64encode(png).decode("ascii")
    extra = f' class="{css_class}"' if css_class else ""
    return f'<img{extra} alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of the run's ``metrics.jsonl`` (none if the file is absent). A line that is no JSON record (the
    last one cut short by a crash or a full disk, perhaps continued by a resumed run) is skipped with one
    :class:`~selfsup.eval.run.TornFileWarning`: the curves are drawn from every readable record."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records, torn = [], []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            torn.append(number)
    if torn:
        warnings.warn(f"{path}: skipped {len(torn)} unreadable line(s) (line {', '.join(map(str, torn[:3]))}"
                      f"{' ...' if len(torn) > 3 else ''}), cut short by a crash or a full disk", TornFileWarning,
                      stacklevel=2)
    return records


def split_records(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """(per-step records, per-epoch records)."""
    return [r for r in records if "step" in r and "loss" in r], [r for r in records if "epoch_end" in r]


def _figure(width: float = 3.9, height: float = 2.7) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    return figure


def curve_figures(steps: list[dict], epochs: list[dict]) -> list[tuple[str, bytes]]:
    """One small PNG per logged quantity against epochs: loss (per step and epoch mean), lr, the kNN monitor,
    then every other scalar a method logs (purity, …) — per step where logged per step, else per epoch."""
    figures: list[tuple[str, bytes]] = []

    def plot(title: str, series: list[tuple[str, list[float], list[float], str]], ylabel: str) -> None:
        figure = _figure()
        axes = figure.add_subplot()
        for label, x, y, style in series:
            axes.plot(x, y, style, label=label, lw=1.2, ms=4)
        axes.set_title(title, fontsize=10)
        axes.set_xlabel("epoch", fontsize=9)
        axes.set_ylabel(ylabel, fontsize=9)
        axes.tick_params(labelsize=8)
        axes.grid(alpha=0.3)
        if len(series) > 1:
            axes.legend(fontsize=8)
        figures.append((title, png_bytes(figure)))

    step_x = [r["epoch"] for r in steps]
    epoch_x = [r["epoch_end"] for r in epochs]

    def epoch_series(key: str) -> tuple[list[float], list[float]]:
        pairs = [(r["epoch_end"], r[key]) for r in epochs if isinstance(r.get(key), (int, float))]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    loss: list[tuple[str, list[float], list[float], str]] = []
    if steps:
        loss.append(("per logged step", step_x, [r["loss"] for r in steps], "-"))
    if any("loss_mean" in r for r in epochs):
        loss.append(("epoch mean", *epoch_series("loss_mean"), "o-"))
    if loss:
        plot("loss", loss, "loss")
    if steps:
        plot("learning rate", [("lr", step_x, [r["lr"] for r in steps], "-")], "lr")
    monitor = sorted({k for r in epochs for k in r if k.startswith(("knn", "nn"))})
    if monitor:
        plot("kNN monitor (val)", [(k, *epoch_series(k), "o-") for k in monitor], "accuracy (%)")
    step_keys = sorted({k for r in steps for k in r} - {"step", "epoch", "loss", "lr"})
    for key in step_keys:
        pairs = [(r["epoch"], r[key]) for r in steps if isinstance(r.get(key), (int, float))]
        series = [("per logged step", [p[0] for p in pairs], [p[1] for p in pairs], "-")]
        if any(f"{key}_mean" in r for r in epochs):
            series.append(("epoch mean", *epoch_series(f"{key}_mean"), "o-"))
        plot(key, series, key)
    shown = {"epoch_end", "seconds", "loss_mean", *monitor, *(f"{k}_mean" for k in step_keys)}
    for key in sorted({k for r in epochs for k in r} - shown):
        x, y = epoch_series(key)
        if x:
            plot(key.replace("_", " "), [(key, x, y, "o-")], key)
    if epoch_x and not figures:
        plot("epoch time", [("seconds", *epoch_series("seconds"), "o-")], "seconds")
    return figures


def embed_2d(features: np.ndarray, embedding: str = "tsne", seed: int = 0) -> tuple[np.ndarray, str]:
    """(N, 2) coordinates of the rows of ``features`` and the name of the method used: UMAP when asked for and
    installed (falls back to t-SNE with a warning otherwise), else t-SNE (PCA initialisation, cosine metric)."""
    if embedding not in EMBEDDINGS:
        raise ConfigError(f"embedding must be one of {list(EMBEDDINGS)}, got {embedding!r}")
    n = features.shape[0]
    if embedding == "umap":
        try:
            import umap
        except ImportError:
            warnings.warn("umap-learn is not installed (pip install 'selfsup[umap]'); using t-SNE", stacklevel=2)
        else:
            reducer = umap.UMAP(n_components=2, n_neighbors=min(15, n - 1), metric="cosine", random_state=seed)
            return np.asarray(reducer.fit_transform(features)), "UMAP"
    from sklearn.manifold import TSNE

    tsne = TSNE(n_components=2, perplexity=min(30.0, max((n - 1) / 3, 1.0)), init="pca", metric="cosine",
                random_state=seed)
    return tsne.fit_transform(features), "t-SNE"


def class_colours(num_classes: int) -> np.ndarray:
    """(C, 4) RGBA colours: tab10 / tab20 for up to 10 / 20 classes, evenly spaced hues beyond."""
    from matplotlib import colormaps

    if num_classes <= 10:
        return colormaps["tab10"](np.arange(num_classes))
    if num_classes <= 20:
        return colormaps["tab20"](np.arange(num_classes))
    return colormaps["hsv"](np.arange(num_classes) / num_classes)


def embedding_figure(points: np.ndarray, labels: np.ndarray, classes: list[str], title: str) -> bytes:
    figure = _figure(7.2, 5.6)
    axes = figure.add_subplot()
    labelled = labels >= 0
    if not labelled.any():
        axes.scatter(points[:, 0], points[:, 1], s=8, c="tab:blue", alpha=0.8)
    else:
        colours = class_colours(len(classes))
        axes.scatter(points[~labelled, 0], points[~labelled, 1], s=6, c="lightgrey")
        for c in np.unique(labels[labelled]):
            inside = labels == c
            axes.scatter(points[inside, 0], points[inside, 1], s=8, color=colours[c], alpha=0.85, label=classes[c])
        if len(classes) <= 20:
            axes.legend(fontsize=8, markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    axes.set_title(title, fontsize=10)
    axes.set_xticks([])
    axes.set_yticks([])
    return png_bytes(figure)


@dataclass
class ClusterStats:
    cluster: int
    size: int
    purity: float  # fraction of the cluster's members carrying its majority label
    majority: int  # that label
    counts: np.ndarray  # (num_classes,) members per label


def rank_clusters(assign: np.ndarray, labels: np.ndarray, num_clusters: int, num_classes: int) -> list[ClusterStats]:
    """Non-empty clusters, purest first (ties: larger first, then lower index)."""
    assign, labels = np.asarray(assign, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    table = np.zeros((num_clusters, num_classes), dtype=np.int64)
    np.add.at(table, (assign, labels), 1)
    stats = [ClusterStats(c, int(row.sum()), float(row.max() / row.sum()), int(row.argmax()), row)
             for c, row in enumerate(table) if row.sum() > 0]
    return sorted(stats, key=lambda s: (-s.purity, -s.size, s.cluster))


def shown_clusters(ranked: list[ClusterStats], per_side: int = 3) -> tuple[list[ClusterStats], list[ClusterStats]]:
    """(the ``per_side`` purest, the ``per_side`` most mixed — most mixed first — not repeating the purest)."""
    purest = ranked[:per_side]
    mixed = [s for s in reversed(ranked[per_side:])][:per_side]
    return purest, mixed


@dataclass
class TightnessStats:
    cluster: int
    size: int
    tightness: float  # mean cosine of the members to the cluster's centroid


def rank_by_tightness(assign: np.ndarray, tightness: np.ndarray) -> list[TightnessStats]:
    """Non-empty clusters, tightest first (ties: larger first, then lower index): the label-free ranking."""
    sizes = np.bincount(np.asarray(assign, dtype=np.int64), minlength=len(tightness))
    stats = [TightnessStats(c, int(sizes[c]), float(tightness[c])) for c in range(len(tightness)) if sizes[c] > 0]
    return sorted(stats, key=lambda s: (-s.tightness, -s.size, s.cluster))


def spectrum_figure(sigma: np.ndarray, title: str) -> bytes:
    """The singular values, normalised to sum to 1, against their rank (log scale): a flat curve is a spread
    embedding, a cliff after a few values a collapsed one."""
    figure = _figure(5.2, 3.0)
    axes = figure.add_subplot()
    p = sigma / max(float(sigma.sum()), 1e-30)
    axes.semilogy(np.arange(1, len(p) + 1), np.maximum(p, 1e-12), "-", lw=1.4)
    axes.set_title(title, fontsize=10)
    axes.set_xlabel("rank k", fontsize=9)
    axes.set_ylabel("σ_k / Σσ", fontsize=9)
    axes.tick_params(labelsize=8)
    axes.grid(alpha=0.3)
    return png_bytes(figure)


# ---------------------------------------------------------------------------------------------- HTML

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2328; margin: 0;
       background: #f6f8fa; }
main { max-width: 1240px; margin: 0 auto; padding: 24px 32px 48px; background: #fff; }
h1 { font-size: 26px; margin: 0 0 4px; } h2 { font-size: 20px; border-bottom: 1px solid #d0d7de;
     padding-bottom: 4px; margin-top: 32px; }
.sub { color: #57606a; margin: 0 0 16px; } .note { color: #57606a; font-style: italic; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
td, th { border: 1px solid #d0d7de; padding: 4px 10px; } th { background: #f6f8fa; text-align: left; }
td.num { text-align: right; } .up { color: #1a7f37; } .down { color: #cf222e; }
.summary th { width: 190px; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; } .grid img { border: 1px solid #d0d7de; }
img { max-width: 100%; height: auto; }
.cluster { display: flex; gap: 16px; align-items: center; margin: 8px 0; padding: 8px; border: 1px solid #d0d7de;
           border-radius: 6px; }
.cluster .info { flex: 0 0 290px; font-size: 13px; }
.hist { display: flex; align-items: flex-end; gap: 2px; height: 40px; margin-top: 4px; }
.hist div { width: 18px; background: #8c959f; position: relative; }
.hist div.major { background: #0969da; }
.hist span { position: absolute; bottom: -16px; left: -2px; width: 22px; text-align: center; font-size: 10px; }
.histwrap { padding-bottom: 16px; }
pre { background: #f6f8fa; padding: 10px; overflow-x: auto; font-size: 12px; }
"""


def note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def summary_table(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f'<table class="summary">{body}</table>'


def scores_table(scores: dict[str, dict[str, float]]) -> str:
    """Rows: scores; columns: each evaluated model (trained, random_init …), plus trained − random_init."""
    columns, keys = list(scores), score_names(scores)
    delta = "trained" in scores and "random_init" in scores
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns) + ("<th>trained − random_init</th>" if delta else "")
    rows = []
    for key in keys:
        cells = "".join(f'<td class="num">{format_score(scores[c][key])}</td>'
                        if isinstance(scores[c].get(key), (int, float))
                        else "<td></td>" for c in columns)
        if delta:
            a, b = scores["trained"].get(key), scores["random_init"].get(key)
            if isinstance(a, (int, float)) and isinstance(b, (int, float)):
                change = f"{a - b:+d}" if isinstance(a, int) and isinstance(b, int) else f"{a - b:+.2f}"
                cells += f'<td class="num {"up" if a >= b else "down"}">{change}</td>'
            else:
                cells += "<td></td>"
        rows.append(f"<tr><th>{html.escape(key)}</th>{cells}</tr>")
    return f'<table><tr><th>score</th>{head}</tr>{"".join(rows)}</table>'


def histogram_bars(counts: np.ndarray, majority: int, classes: list[str], most: int = 20) -> str:
    """The cluster's label histogram as CSS bars, the majority label in blue: every class in order when there are
    at most ``most`` classes, else the ``most`` commonest labels of the cluster."""
    top = max(int(counts.max()), 1)
    order = range(len(counts)) if len(counts) <= most else [int(c) for c in np.argsort(-counts, kind="stable")[:most]]
    bars = []
    for c in order:
        height = 40 * int(counts[c]) / top
        title = html.escape(f"{classes[c]}: {int(counts[c])}")
        bars.append(f'<div class="{"major" if c == majority else ""}" style="height:{height:.1f}px" '
                    f'title="{title}"><span>{html.escape(classes[c][:3])}</span></div>')
    return f'<div class="histwrap"><div class="hist">{"".join(bars)}</div></div>'


def cluster_block(stats: ClusterStats, row: Image.Image, classes: list[str]) -> str:
    present = [(c, int(n)) for c, n in enumerate(stats.counts) if n > 0]
    present.sort(key=lambda p: -p[1])
    labels = ", ".join(f"{html.escape(classes[c])} ({n})" for c, n in present[:6])
    if len(present) > 6:
        labels += f", … {len(present)} labels"
    info = (f"<b>cluster {stats.cluster}</b>: {stats.size} images<br>purity <b>{100 * stats.purity:.1f}%</b> "
            f"(majority {html.escape(classes[stats.majority])})<br><small>labels: {labels}</small>"
            f"{histogram_bars(stats.counts, stats.majority, classes)}")
    return (f'<div class="cluster"><div class="info">{info}</div>'
            f'{img_tag(png_bytes(row), f"cluster {stats.cluster} images")}</div>')


def tightness_block(stats: TightnessStats, row: Image.Image) -> str:
    info = (f"<b>cluster {stats.cluster}</b>: {stats.size} images<br>tightness <b>{stats.tightness:.3f}</b><br>"
            "<small>mean cosine similarity of the members to the centroid</small>")
    return (f'<div class="cluster"><div class="info">{info}</div>'
            f'{img_tag(png_bytes(row), f"cluster {stats.cluster} images")}</div>')


# ---------------------------------------------------------------------------------------------- the report


def wall_time(records: list[dict]) -> str:
    """Training time: the sum of the epoch times (a time-budget run: its logged training seconds if larger)."""
    seconds = sum(r.get("seconds", 0.0) for r in records if "epoch_end" in r)
    budget = [r["train_seconds"] for r in records if "train_seconds" in r]
    if budget:
        seconds = max(seconds, budget[-1])
    if not seconds:
        return "unknown (no epoch records)"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    text = f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"
    return f"{text} (sum of epoch times, evaluations excluded)"


def _summary_rows(cfg: Config, state: dict, checkpoint: Path, method: Any, val_size: int,
                  records: list[dict]) -> list[tuple[str, str]]:
    params = sum(p.numel() for p in method.backbone.parameters())
    train_size = method.run.num_samples  # the training set load_run built the method for
    d, t = cfg.data, cfg.train
    return [
        ("method", cfg.method.name),
        ("backbone", f"{cfg.model.backbone} ({params / 1e6:.2f}M parameters)"),
        ("data", f"{d.name}{f' ({d.path})' if d.path else ''}: {train_size} train / {val_size} val images "
                 f"({d.train_split} / {d.val_split}) at {d.image_size}px"),
        ("epochs", f"{state.get('epoch', '?')} of {t.epochs}" + (f" (time budget {t.time_budget})"
                                                                  if t.time_budget else "")),
        ("steps", f"{state.get('step', '?')} (batch {t.batch_size})"),
        ("optimiser", f"{cfg.optim.name}, lr {cfg.optim.lr:g}, {cfg.optim.schedule} schedule, "
                      f"weight decay {cfg.optim.weight_decay:g}"),
        ("training time", wall_time(records)),
        ("checkpoint", f"{checkpoint} ({datetime.fromtimestamp(checkpoint.stat().st_mtime):%Y-%m-%d %H:%M})"),
    ]


@dataclass
class ReportInputs:
    """What every section reads: the run, its validation features (the report's query set) and their labels."""

    cfg: Config
    state: dict
    checkpoint: Path
    method: Any
    device: torch.device
    records: list[dict]
    val_set: ImageDataset
    val_eval: EvalDataset
    raw_features: torch.Tensor  # (N, D) validation features as the backbone gives them
    features: torch.Tensor  # the same, L2-normalised
    labels: np.ndarray  # (N,) int64, -1 where a validation image has no label
    generator: np.random.Generator  # seeded by train.seed; the sections draw from it in page order

    @property
    def run_dir(self) -> Path:
        return self.checkpoint.parent

    @property
    def classes(self) -> list[str]:
        return list(self.val_set.classes) or ["?"]

    @property
    def labelled(self) -> bool:
        """Whether the label-based sections apply: at least 2 classes and as many labelled images as classes."""
        num_classes = len(self.val_set.classes)
        return num_classes >= 2 and int((self.labels >= 0).sum()) >= num_classes


@dataclass
class Clustering:
    """k-means of the validation features: on the labelled images with k = the number of classes when there are
    labels, else on all of them with the report's k."""

    members: np.ndarray  # indices of the clustered validation images
    assign: np.ndarray  # their clusters
    k: int


@dataclass
class Memory:
    """The retrieval memory: (a seeded subset of) the training split under the eval transform, embedded."""

    dataset: EvalDataset
    indices: np.ndarray  # rows of the training split that were embedded
    features: torch.Tensor  # their L2-normalised features
    labels: np.ndarray
    size: int  # images in the whole training split


def _validation(cfg: Config) -> tuple[ImageDataset, EvalDataset]:
    dataset = build_dataset(cfg.data, cfg.data.val_split)
    return dataset, EvalDataset(dataset, transform_from_config(cfg.data, "eval"))


def _embed(backbone: torch.nn.Module, dataset: Any, cfg: Config, device: torch.device) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """Raw eval-transform features and labels of ``dataset``, pooled as the scores were (``eval.pool_grid``)."""
    loader = DataLoader(dataset, batch_size=cfg.eval.batch_size, num_workers=cfg.data.num_workers, shuffle=False)
    with pooled_on_grid(backbone, cfg.eval.pool_grid) as pooled:
        return extract_features(pooled, loader, device, normalize=False)


def load_report_inputs(run: str | Path, overrides: list[str] | None, device: str | None) -> ReportInputs:
    """The run's checkpoint, config and method, and its validation features (``device`` defaults to the run's)."""
    checkpoint, state, cfg, method, _ = load_run(run, overrides)
    target = resolve_device(device or cfg.train.device)
    val_set, val_eval = _validation(cfg)
    raw, labels = _embed(method.backbone, val_eval, cfg, target)
    return ReportInputs(cfg, state, checkpoint, method, target, read_metrics(checkpoint.parent), val_set, val_eval,
                        raw, F.normalize(raw, dim=1), labels.numpy(), np.random.default_rng(cfg.train.seed))


def _cluster(inputs: ReportInputs, clusters: int | None) -> Clustering | None:
    """k-means (seeded by ``train.seed``, as the ``cluster`` protocol) on the L2-normalised validation features."""
    if inputs.labelled:
        members, k = np.flatnonzero(inputs.labels >= 0), len(inputs.val_set.classes)
    else:
        members = np.arange(len(inputs.labels))
        k = min(clusters or UNLABELLED_CLUSTERS, len(members))
    if k < 2:
        return None
    _, assign = kmeans(inputs.features[members].to(inputs.device), k, seed=inputs.cfg.train.seed)
    return Clustering(members, assign.cpu().numpy(), k)


def _memory(inputs: ReportInputs, max_images: int) -> Memory:
    """The training split (eval transform) as retrieval memory: all of it, or a seeded subset of ``max_images``."""
    cfg = inputs.cfg
    train_set = build_dataset(cfg.data, cfg.data.train_split)
    dataset = EvalDataset(train_set, transform_from_config(cfg.data, "eval"))
    n = len(train_set)
    generator = np.random.default_rng([cfg.train.seed, 1])  # its own draws: the other sections' stay as they were
    indices = np.sort(generator.permutation(n)[:max_images]) if n > max_images else np.arange(n)
    raw, labels = _embed(inputs.method.backbone, Subset(dataset, indices.tolist()), cfg, inputs.device)
    return Memory(dataset, indices, F.normalize(raw, dim=1), labels.numpy(), n)


# ------------------------------------------------------------------------------------------- the sections


def curves_section(records: list[dict]) -> str:
    curves = curve_figures(*split_records(records))
    body = ('<div class="grid">' + "".join(img_tag(png, title, "curve") for title, png in curves) + "</div>"
            if curves else note("No metrics.jsonl records in the run folder: no curves to draw."))
    return f"<h2>Training curves</h2>{body}"


def evaluation_section(run_dir: Path, labelled: bool) -> str:
    eval_path = run_dir / "eval.json"
    scores = read_scores(eval_path) if eval_path.is_file() else None
    if eval_path.is_file() and scores is None:
        warnings.warn(f"{eval_path} is not readable JSON scores (cut short by a crash or a full disk?)",
                      TornFileWarning, stacklevel=2)
        body = note(f"{eval_path.name} in {run_dir} is unreadable (cut short?): run `selfsup eval {run_dir} "
                    "--protocol ...` again to rewrite it.")
    elif scores is not None:
        body = scores_table(scores) + note(f"From {eval_path.name}; k-NN/1-NN/linear in top-1 %, clustering scores "
                                           "in %, rankme an effective rank, feature_std a standard deviation, "
                                           "duplicates counts. Re-run `selfsup eval RUN --protocol ...` to add scores.")
    else:
        protocols = "knn,nn,cluster,rankme" if labelled else ",".join(LABEL_FREE_PROTOCOLS)
        body = note(f"No eval.json in {run_dir}: run `selfsup eval {run_dir} --protocol {protocols} "
                    "--random-init` first.")
    return f"<h2>Evaluation</h2>{body}"


def collapse_section(inputs: ReportInputs) -> str:
    """RankMe and the feature std of the validation features, and their singular-value spectrum."""
    features = inputs.raw_features
    if features.shape[0] < 2:
        return f"<h2>Collapse monitors</h2>{note('Fewer than 2 validation images: no collapse monitors.')}"
    scores = collapse_scores(features.to(inputs.device), seed=inputs.cfg.train.seed)
    dim = features.shape[1]
    rows = [("RankMe (effective rank)", f"{scores['rankme']:.2f} of at most {min(features.shape)}"),
            ("per-dimension std of L2-normalised features", f"{scores['feature_std']:.4f} (1/√D = {dim ** -0.5:.4f})"),
            ("the same × √D", f"{scores['feature_std_x_sqrt_d']:.3f} (≈ 1: spread evenly; 0: collapsed)")]
    sigma = singular_values(features.to(inputs.device)).cpu().numpy()
    title = f"singular values of the {features.shape[0]} x {dim} validation features"
    body = (f"<p>Label-free signs of a collapsing embedding (RankMe, Garrido et al. 2023; the SimSiam std check), on "
            f"the validation features.</p>{summary_table(rows)}"
            f'<div class="grid">{img_tag(spectrum_figure(sigma, title), title, "spectrum")}</div>')
    return f"<h2>Collapse monitors</h2>{body}"


def embedding_section(inputs: ReportInputs, clustering: Clustering | None, embedding: str, max_points: int) -> str:
    """A 2-D embedding of (a seeded subset of) the validation features: coloured by class when there are labels,
    else by k-means cluster."""
    n = inputs.features.shape[0]
    subset = np.sort(inputs.generator.permutation(n)[:max_points]) if n > max_points else np.arange(n)
    if len(subset) < 5:
        return f"<h2>Embedding of validation features</h2>{note(f'Only {len(subset)} validation images: too few.')}"
    points, used = embed_2d(inputs.features[subset].numpy(), embedding, inputs.cfg.train.seed)
    if inputs.labelled or clustering is None:
        colours, names, by = inputs.labels[subset], inputs.classes, "class"
    else:
        colours, names, by = clustering.assign[subset], [f"cluster {c}" for c in range(clustering.k)], "k-means cluster"
    title = f"{used} of {len(subset)} validation features (of {n}), coloured by {by}"
    body = img_tag(embedding_figure(points, colours, names, title), title, "embedding")
    if embedding == "umap" and used != "UMAP":
        body = note("umap-learn is not installed (pip install 'selfsup[umap]'): t-SNE instead.") + body
    if not inputs.labelled:
        body = note(f"The validation split has no class labels: the points are coloured by their k-means cluster "
                    f"(k = {clustering.k if clustering else 1}).") + body
    return f"<h2>Embedding of validation features</h2>{body}"


def clusters_section(inputs: ReportInputs, clustering: Clustering | None, per_side: int, per_cluster: int) -> str:
    """Cluster rows: ranked by purity when there are labels, by tightness (mean cosine to the centroid) otherwise."""
    if clustering is None:
        return f"<h2>Clusters</h2>{note('Too few validation images for k-means with k >= 2.')}"
    members, assign, k = clustering.members, clustering.assign, clustering.k
    if inputs.labelled:
        ranked: list[Any] = rank_clusters(assign, inputs.labels[members], k, k)
        mean_purity = sum(s.purity * s.size for s in ranked) / len(members)
        intro = (f"k-means with k = {k} (the number of classes) on the {len(members)} L2-normalised validation "
                 f"features; purity = the fraction of a cluster carrying its majority label. Size-weighted mean "
                 f"purity <b>{100 * mean_purity:.1f}%</b>.")
        headings = ("Purest clusters", "Most mixed clusters")
    else:
        ranked = rank_by_tightness(assign, cluster_tightness(inputs.features[members], torch.from_numpy(assign), k))
        intro = (f"The validation split has no class labels: k-means with k = {k} on the {len(members)} "
                 "L2-normalised validation features, clusters ranked by tightness (the mean cosine similarity of "
                 "their members to the centroid).")
        headings = ("Tightest clusters", "Loosest clusters")
    blocks = [f"<p>{intro} Each row shows up to {per_cluster} random members (eval transform, no augmentation).</p>"]
    for heading, group in zip(headings, shown_clusters(ranked, per_side), strict=True):
        if group:
            blocks.append(f"<h3>{heading}</h3>")
        for stats in group:
            cluster_members = members[assign == stats.cluster]
            chosen = np.sort(inputs.generator.choice(cluster_members, min(per_cluster, len(cluster_members)),
                                                     replace=False))
            row = image_row(torch.stack([inputs.val_eval[int(i)][0] for i in chosen]), inputs.cfg.data.mean,
                            inputs.cfg.data.std)
            blocks.append(cluster_block(stats, row, inputs.classes) if inputs.labelled else tightness_block(stats, row))
    return f"<h2>Clusters</h2>{''.join(blocks)}"


def retrieval_section(inputs: ReportInputs, memory: Memory, queries: int, k: int) -> str:
    """Seeded random validation images and their ``k`` nearest training images (cosine)."""
    if k < 1:
        raise ConfigError(f"eval.retrieval_k must be at least 1, got {k}")
    count = min(queries, len(inputs.labels))
    if count == 0 or memory.features.shape[0] == 0:
        return f"<h2>Nearest-neighbour retrieval</h2>{note('No validation or training images to search.')}"
    chosen = np.sort(inputs.generator.choice(len(inputs.labels), count, replace=False))
    sims, idx = nearest_neighbours(inputs.features[chosen].to(inputs.device), memory.features.to(inputs.device), k)
    sims, idx = sims.cpu(), idx.cpu().numpy()
    neighbours = torch.stack([torch.stack([memory.dataset[int(memory.indices[j])][0] for j in row]) for row in idx])
    queries_images = torch.stack([inputs.val_eval[int(i)][0] for i in chosen])
    labelled = inputs.labelled
    grid = retrieval_grid(queries_images, neighbours, sims, inputs.cfg.data.mean, inputs.cfg.data.std,
                          query_labels=inputs.labels[chosen] if labelled else None,
                          neighbour_labels=memory.labels[idx] if labelled else None,
                          classes=inputs.classes if labelled else None)
    searched = (f"all {memory.size}" if len(memory.indices) == memory.size
                else f"a seeded random {len(memory.indices)} of the {memory.size}")
    text = (f"{count} random validation images (blue frame) and their {idx.shape[1]} nearest neighbours by cosine "
            f"similarity among {searched} training images (eval transform), most similar first; each neighbour is "
            "captioned with its similarity")
    if labelled:
        same = float((memory.labels[idx] == inputs.labels[chosen, None]).mean())
        text += (f" and class, green where it is the query's class, red where not: {100 * same:.0f}% of these "
                 "neighbours share the query's class")
    body = f"<p>{text}.</p>" + img_tag(png_bytes(grid), "retrieval grid: validation queries and their neighbours",
                                       "retrieval")
    return f"<h2>Nearest-neighbour retrieval</h2>{body}"


def duplicates_section(inputs: ReportInputs, memory: Memory, max_pairs: int) -> str:
    """Near-duplicate pairs among the training images searched, and validation images duplicated among them."""
    threshold = inputs.cfg.eval.duplicate_threshold
    if memory.features.shape[0] < 2:
        return f"<h2>Near duplicates</h2>{note('Fewer than 2 training images: no pairs to compare.')}"
    found = near_duplicates(memory.features.to(inputs.device), threshold, max_pairs=max_pairs)
    in_train, _ = duplicated_in(inputs.features.to(inputs.device), memory.features.to(inputs.device), threshold)
    n = memory.features.shape[0]
    text = (f"<b>{found.count}</b> pairs of the {n} training images searched have cosine similarity ≥ {threshold:g} "
            f"(eval.duplicate_threshold), of {n * (n - 1) // 2} pairs; <b>{int(in_train.sum())}</b> of the "
            f"{len(inputs.labels)} validation images have such a near duplicate among them.")
    if found.count == 0:
        return f"<h2>Near duplicates</h2><p>{text}</p>"
    pairs = found.pairs.cpu().numpy()
    first = torch.stack([memory.dataset[int(memory.indices[i])][0] for i in pairs[:, 0]])
    second = torch.stack([memory.dataset[int(memory.indices[j])][0] for j in pairs[:, 1]])
    captions = [f"train {memory.indices[i]} / {memory.indices[j]}" for i, j in pairs]
    grid = pair_grid(first, second, found.similarities.cpu(), inputs.cfg.data.mean, inputs.cfg.data.std,
                     captions=captions)
    shown = f" The {len(pairs)} most similar pairs:" if found.count > len(pairs) else " The pairs:"
    body = f"<p>{text}{shown}</p>" + img_tag(png_bytes(grid), "near-duplicate pairs", "duplicates")
    return f"<h2>Near duplicates</h2>{body}"


def attention_section(inputs: ReportInputs, attention_images: int) -> str:
    cfg, backbone, val_eval = inputs.cfg, inputs.method.backbone, inputs.val_eval
    if not isinstance(backbone, ViT):
        text = f"Attention maps are drawn for ViT backbones; this run uses {cfg.model.backbone}."
        return f"<h2>Attention maps</h2>{note(text)}"
    count = min(attention_images, len(val_eval))
    images = torch.stack([val_eval[i][0] for i in range(count)])
    backbone.to(inputs.device).eval()
    maps = cls_attention(backbone, images.to(inputs.device))
    zoom = max(1, 96 // images.shape[-2])
    heads = maps.shape[1]
    rows = [img_tag(png_bytes(attention_panel(image, head_maps, cfg.data.mean, cfg.data.std, zoom)),
                    f"attention of validation image {i}")
            for i, (image, head_maps) in enumerate(zip(images, maps, strict=True))]
    body = (f"<p>Last block, CLS token → patches, one map per head ({heads} heads), per-head min–max scaled, "
            f"over the first {count} validation images: [input | head 1 … head {heads}].</p>"
            f'<div class="grid">{"".join(rows)}</div>')
    return f"<h2>Attention maps</h2>{body}"


def page_html(inputs: ReportInputs, sections: list[str]) -> str:
    cfg = inputs.cfg
    summary = summary_table(_summary_rows(cfg, inputs.state, inputs.checkpoint, inputs.method, len(inputs.val_set),
                                          inputs.records))
    config_yaml = html.escape(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    title = f"{cfg.method.name} · {cfg.model.backbone} · {cfg.data.name}"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>selfsup report: {html.escape(inputs.run_dir.name)}</title><style>{CSS}</style></head><body><main>"
            f"<h1>{html.escape(title)}</h1><p class=\"sub\">{html.escape(str(inputs.run_dir))} · report written "
            f"{datetime.now():%Y-%m-%d %H:%M}</p><h2>Run</h2>{summary}"
            f"<details><summary>resolved configuration</summary><pre>{config_yaml}</pre></details>"
            f"{''.join(sections)}</main></body></html>\n")


def build_report(run: str | Path, out: str | Path | None = None, *, embedding: str = "tsne",
                 max_points: int = 1500, device: str | None = None, overrides: list[str] | None = None,
                 clusters_per_side: int = 3, images_per_cluster: int = 10, attention_images: int = 4,
                 retrieval_queries: int = 6, memory_images: int = 10_000, clusters: int | None = None,
                 duplicate_pairs: int = 12) -> Path:
    """Write the run's HTML report (default ``RUN/report.html``) and return its path.

    ``max_points`` validation images (a seeded random subset) enter the 2-D embedding; k-means (k = number of
    classes, on all L2-normalised validation features, seeded by ``train.seed`` as the ``cluster`` protocol; without
    labels k = ``clusters``, default 10) gives the clusters. ``retrieval_queries`` validation images are shown with
    their ``eval.retrieval_k`` nearest neighbours among (a seeded random ``memory_images`` of) the training images,
    which are also searched for near-duplicate pairs (``duplicate_pairs`` shown). ``device`` defaults to the run's
    ``train.device``. Without labels, no section needs them.
    """
    if embedding not in EMBEDDINGS:
        raise ConfigError(f"embedding must be one of {list(EMBEDDINGS)}, got {embedding!r}")
    inputs = load_report_inputs(run, overrides, device)
    clustering = _cluster(inputs, clusters)
    memory = _memory(inputs, memory_images)
    sections = [
        curves_section(inputs.records),
        evaluation_section(inputs.run_dir, inputs.labelled),
        collapse_section(inputs),
        embedding_section(inputs, clustering, embedding, max_points),
        clusters_section(inputs, clustering, clusters_per_side, images_per_cluster),
        retrieval_section(inputs, memory, retrieval_queries, inputs.cfg.eval.retrieval_k),
        duplicates_section(inputs, memory, duplicate_pairs),
        attention_section(inputs, attention_images),
    ]
    path = Path(out) if out else inputs.run_dir / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page_html(inputs, sections), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- Chromium


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class ChromiumError(RuntimeError):
    """Headless Chromium did not render the page (the report file itself is already written)."""


def render_in_chromium(page: str | Path, *, screenshot: str | Path | None = None, window: tuple[int, int] = (1280, 900),
                       browser: str | None = None, timeout: float = 120.0) -> str:
    """Open ``page`` in headless Chromium (offline-safe flags, a fresh profile): with ``screenshot`` write a PNG of
    the ``window``-sized view and return "", else return the rendered DOM (``--dump-dom``)."""
    browser = browser or find_chromium()
    if browser is None:
        raise FileNotFoundError("no Chromium found (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="selfsup-chromium-") as profile:
        command = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={window[0]},{window[1]}"]
        command += [f"--screenshot={Path(screenshot).resolve()}"] if screenshot else ["--dump-dom"]
        try:
            done = subprocess.run([*command, Path(page).resolve().as_uri()], capture_output=True, text=True,
                                  timeout=timeout, check=False)
        except subprocess.TimeoutExpired as error:
            raise ChromiumError(f"{browser} did not finish within {timeout:g} s") from error
    if done.returncode != 0 or (screenshot and not Path(screenshot).is_file()):
        raise ChromiumError(f"{browser} exited with {done.returncode} and wrote no page/picture: "
                            f"{done.stderr.strip()[-2000:] or 'no message'}")
    return "" if screenshot else done.stdout

