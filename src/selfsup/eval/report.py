"""``selfsup report RUN``: one self-contained HTML page about a run.

Sections: the run summary, training curves from ``metrics.jsonl``, the score table from ``eval.json``, a 2-D
embedding (t-SNE, or UMAP when installed) of the validation features coloured by class, k-means clusters of those
features ranked by purity with rows of their images (the purest and the most mixed), and, for ViT backbones, the
last layer's CLS attention maps. Every image is an inline ``data:image/png;base64`` URI: the file opens offline,
copied anywhere, with no scripts and no external links. A section whose data are missing says so in one line.
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
import yaml
from matplotlib.figure import Figure
from PIL import Image
from torch.utils.data import DataLoader

from selfsup.config import Config, ConfigError
from selfsup.data.datasets import ImageDataset, build_dataset
from selfsup.data.loader import EvalDataset
from selfsup.data.transforms import transform_from_config
from selfsup.engine.trainer import resolve_device
from selfsup.eval.attention import attention_panel, cls_attention, unnormalise
from selfsup.eval.clustering import kmeans
from selfsup.eval.features import extract_features, pooled_on_grid
from selfsup.eval.protocols import score_names
from selfsup.eval.run import load_run
from selfsup.models.vit import ViT

EMBEDDINGS = ("tsne", "umap")
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
    """The records of the run's ``metrics.jsonl`` (none if the file is absent)."""
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


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


def image_row(images: torch.Tensor, mean, std, height: int = 64, gap: int = 4) -> Image.Image:
    """The images side by side at ``height`` pixels (nearest-neighbour when enlarging), white gaps between."""
    tiles = []
    for array in (unnormalise(images, mean, std) * 255).round().astype(np.uint8):
        tile = Image.fromarray(array)
        width = max(1, round(tile.width * height / tile.height))
        tiles.append(tile.resize((width, height), Image.NEAREST if tile.height < height else Image.BILINEAR))
    row = Image.new("RGB", (sum(t.width for t in tiles) + gap * (len(tiles) - 1), height), "white")
    x = 0
    for tile in tiles:
        row.paste(tile, (x, 0))
        x += tile.width + gap
    return row


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
        cells = "".join(f'<td class="num">{scores[c][key]:.2f}</td>' if isinstance(scores[c].get(key), (int, float))
                        else "<td></td>" for c in columns)
        if delta:
            a, b = scores["trained"].get(key), scores["random_init"].get(key)
            if isinstance(a, (int, float)) and isinstance(b, (int, float)):
                cells += f'<td class="num {"up" if a >= b else "down"}">{a - b:+.2f}</td>'
            else:
                cells += "<td></td>"
        rows.append(f"<tr><th>{html.escape(key)}</th>{cells}</tr>")
    return f'<table><tr><th>score (%)</th>{head}</tr>{"".join(rows)}</table>'


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


def _validation(cfg: Config) -> tuple[ImageDataset, EvalDataset]:
    dataset = build_dataset(cfg.data, cfg.data.val_split)
    return dataset, EvalDataset(dataset, transform_from_config(cfg.data, "eval"))


def build_report(run: str | Path, out: str | Path | None = None, *, embedding: str = "tsne",
                 max_points: int = 1500, device: str | None = None, overrides: list[str] | None = None,
                 clusters_per_side: int = 3, images_per_cluster: int = 10, attention_images: int = 4) -> Path:
    """Write the run's HTML report (default ``RUN/report.html``) and return its path.

    ``max_points`` validation images (a seeded random subset) enter the 2-D embedding; k-means (k = number of
    classes, on all L2-normalised validation features, seeded by ``train.seed`` as the ``cluster`` protocol) gives
    the clusters. ``device`` defaults to the run's ``train.device``.
    """
    if embedding not in EMBEDDINGS:
        raise ConfigError(f"embedding must be one of {list(EMBEDDINGS)}, got {embedding!r}")
    checkpoint, state, cfg, method, _ = load_run(run, overrides)
    run_dir = checkpoint.parent
    target = resolve_device(device or cfg.train.device)
    seed = cfg.train.seed
    records = read_metrics(run_dir)
    val_set, val_eval = _validation(cfg)
    classes = list(val_set.classes) or ["?"]
    sections: list[str] = []

    # curves
    curves = curve_figures(*split_records(records))
    body = ('<div class="grid">' + "".join(img_tag(png, title, "curve") for title, png in curves) + "</div>"
            if curves else note("No metrics.jsonl records in the run folder: no curves to draw."))
    sections.append(f"<h2>Training curves</h2>{body}")

    # evaluation table
    eval_path = run_dir / "eval.json"
    if eval_path.is_file():
        scores = json.loads(eval_path.read_text())
        body = scores_table(scores) + note(f"From {eval_path.name}; k-NN/1-NN/linear in top-1 %, clustering "
                                           "scores in %. Re-run `selfsup eval RUN --protocol ...` to add scores.")
    else:
        body = note(f"No eval.json in {run_dir}: run `selfsup eval {run_dir} --protocol knn,nn,cluster "
                    "--random-init` first.")
    sections.append(f"<h2>Evaluation</h2>{body}")

    # validation features: embedding and clusters
    loader = DataLoader(val_eval, batch_size=cfg.eval.batch_size, num_workers=cfg.data.num_workers, shuffle=False)
    with pooled_on_grid(method.backbone, cfg.eval.pool_grid) as backbone:  # the features the scores used
        features, labels = extract_features(backbone, loader, target, normalize=True)
    labels_np = labels.numpy()
    generator = np.random.default_rng(seed)
    n = features.shape[0]
    subset = np.sort(generator.permutation(n)[:max_points]) if n > max_points else np.arange(n)
    if len(subset) >= 5:
        points, used = embed_2d(features[subset].numpy(), embedding, seed)
        title = f"{used} of {len(subset)} validation features (of {n}), coloured by class"
        body = img_tag(embedding_figure(points, labels_np[subset], classes, title), title, "embedding")
        if embedding == "umap" and used != "UMAP":
            body = note("umap-learn is not installed (pip install 'selfsup[umap]'): t-SNE instead.") + body
        if (labels_np < 0).all():
            body = note("The validation split has no labels: the points are not coloured.") + body
    else:
        body = note(f"Only {len(subset)} validation images: too few for a 2-D embedding.")
    sections.append(f"<h2>Embedding of validation features</h2>{body}")

    labelled = labels_np >= 0
    num_classes = len(val_set.classes)
    if num_classes < 2 or labelled.sum() < num_classes:
        body = note("The validation split has no class labels (or fewer images than classes): "
                    "cluster purity needs them.")
    else:
        kept = np.flatnonzero(labelled)
        _, assign = kmeans(features[kept].to(target), num_classes, seed=seed)
        assign_np = assign.cpu().numpy()
        ranked = rank_clusters(assign_np, labels_np[kept], num_classes, num_classes)
        purest, mixed = shown_clusters(ranked, clusters_per_side)
        mean_purity = sum(s.purity * s.size for s in ranked) / len(kept)
        blocks = [f"<p>k-means with k = {num_classes} (the number of classes) on the {len(kept)} L2-normalised "
                  f"validation features; purity = the fraction of a cluster carrying its majority label. "
                  f"Size-weighted mean purity <b>{100 * mean_purity:.1f}%</b>. Each row shows up to "
                  f"{images_per_cluster} random members (eval transform, no augmentation).</p>"]
        for heading, group in (("Purest clusters", purest), ("Most mixed clusters", mixed)):
            if not group:
                continue
            blocks.append(f"<h3>{heading}</h3>")
            for stats in group:
                members = kept[assign_np == stats.cluster]
                chosen = np.sort(generator.choice(members, min(images_per_cluster, len(members)), replace=False))
                images = torch.stack([val_eval[int(i)][0] for i in chosen])
                blocks.append(cluster_block(stats, image_row(images, cfg.data.mean, cfg.data.std), classes))
        body = "".join(blocks)
    sections.append(f"<h2>Clusters</h2>{body}")

    # attention maps
    backbone = method.backbone
    if isinstance(backbone, ViT):
        count = min(attention_images, len(val_eval))
        images = torch.stack([val_eval[i][0] for i in range(count)])
        backbone.to(target).eval()
        maps = cls_attention(backbone, images.to(target))
        zoom = max(1, 96 // images.shape[-2])
        heads = maps.shape[1]
        rows = [img_tag(png_bytes(attention_panel(image, head_maps, cfg.data.mean, cfg.data.std, zoom)),
                        f"attention of validation image {i}") for i, (image, head_maps) in enumerate(zip(images, maps,
                                                                                                      strict=True))]
        body = (f"<p>Last block, CLS token → patches, one map per head ({heads} heads), per-head min–max scaled, "
                f"over the first {count} validation images: [input | head 1 … head {heads}].</p>"
                f'<div class="grid">{"".join(rows)}</div>')
    else:
        body = note(f"Attention maps are drawn for ViT backbones; this run uses {cfg.model.backbone}.")
    sections.append(f"<h2>Attention maps</h2>{body}")

    summary = summary_table(_summary_rows(cfg, state, checkpoint, method, len(val_set), records))
    config_yaml = html.escape(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    title = f"{cfg.method.name} · {cfg.model.backbone} · {cfg.data.name}"
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>selfsup report: {html.escape(run_dir.name)}</title><style>{CSS}</style></head><body><main>"
            f"<h1>{html.escape(title)}</h1><p class=\"sub\">{html.escape(str(run_dir))} · report written "
            f"{datetime.now():%Y-%m-%d %H:%M}</p><h2>Run</h2>{summary}"
            f"<details><summary>resolved configuration</summary><pre>{config_yaml}</pre></details>"
            f"{''.join(sections)}</main></body></html>\n")
    path = Path(out) if out else run_dir / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
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

