"""``selfsup embed RUN|BACKBONE_FILE FOLDER OUT``: the features of every image of a folder (or of any data set),
computed as the evaluation computes them: the frozen backbone in eval mode, the run's eval transform (resize,
centre crop, normalisation) and ``eval.pool_grid``; L2-normalised rows unless raw.

Written as ``OUT.npy`` (float32, one row per image), ``OUT.csv`` (``index,path``: the image of each row) and, when
pyarrow is installed, ``OUT.parquet`` (``index``, ``path`` and the ``embedding`` as a fixed-size list of float32).
"""

from __future__ import annotations

import copy
import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from selfsup.config import Config, apply_overrides, config_from_dict
from selfsup.data.datasets import ImageLoadError, folder_images
from selfsup.data.transforms import transform_from_config
from selfsup.engine.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint
from selfsup.engine.trainer import resolve_device
from selfsup.eval.features import extract_features, pooled_on_grid

OUTPUT_SUFFIXES = (".npy", ".csv", ".parquet")


@dataclass
class Embeddings:
    features: np.ndarray  # (N, D) float32, one row per readable image
    paths: list[str]  # the image of each row
    skipped: list[str] = field(default_factory=list)  # unreadable images left out (skip_corrupt)


def load_frozen_backbone(source: str | Path, overrides: list[str] | None = None) -> tuple[Config, nn.Module, str]:
    """(config, backbone with its trained weights in eval mode, a description) of a run folder, a training checkpoint
    or a backbone file (``selfsup export`` / ``import``; its data keys come from ``overrides``). A run's backbone is
    read from the checkpoint alone, as ``selfsup export`` reads it: the run's data set need not be here."""
    from selfsup.eval.run import load_backbone_file
    from selfsup.export import run_backbone

    state = None if Path(source).suffix == ".safetensors" else load_checkpoint(source)
    if state is None or "selfsup" in state:
        cfg, backbone, _ = load_backbone_file(source, overrides, state)
        return cfg, backbone.eval(), f"{source} (backbone file)"
    checkpoint = resolve_checkpoint(source)
    if "config" not in state or "method" not in state:
        raise CheckpointError(f"{checkpoint} has no 'config'/'method' entries: not a selfsup run checkpoint or "
                              "backbone file")
    cfg = config_from_dict(apply_overrides(copy.deepcopy(state["config"]), overrides))
    backbone, _, _ = run_backbone(state, cfg, checkpoint)
    return cfg, backbone.eval(), f"{checkpoint} (epoch {state.get('epoch')}, step {state.get('step')})"


class _EvalRows(Dataset):
    """``(eval-transformed image, row)`` of each image of ``images``; with ``skip_corrupt`` an unreadable image gives
    zeros and row -1 (dropped afterwards) instead of an :class:`ImageLoadError`."""

    def __init__(self, images: Any, cfg: Config, skip_corrupt: bool):
        self.images, self.skip_corrupt = images, skip_corrupt
        self.transform = transform_from_config(cfg.data, "eval")
        self.size = cfg.data.image_size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        try:
            image, _ = self.images[i]
        except ImageLoadError:
            if not self.skip_corrupt:
                raise
            return torch.zeros(3, self.size, self.size), -1
        return self.transform(image), i


def embed_images(backbone: nn.Module, cfg: Config, images: Any, *, batch_size: int | None = None,
                 workers: int | None = None, device: str | torch.device | None = None, normalize: bool = True,
                 skip_corrupt: bool = False, progress: bool = True) -> Embeddings:
    """Embed every image of ``images`` (``images[i] -> (PIL image, label)``, e.g. :func:`folder_images`) with
    ``backbone``, as the evaluation protocols do. Defaults: ``eval.batch_size``, ``data.num_workers``,
    ``train.device``."""
    rows = _EvalRows(images, cfg, skip_corrupt)
    loader: Any = DataLoader(rows, batch_size=batch_size or cfg.eval.batch_size, shuffle=False,
                             num_workers=cfg.data.num_workers if workers is None else workers)
    if progress:
        loader = tqdm(loader, desc="embed", unit="batch", leave=False)
    target = resolve_device(str(device or cfg.train.device))
    with pooled_on_grid(backbone, cfg.eval.pool_grid) as pooled:
        features, index = extract_features(pooled, loader, target, normalize=normalize)
    kept = index >= 0
    describe = getattr(images, "describe", str)
    read = set(index[kept].tolist())
    return Embeddings(features[kept].numpy().astype(np.float32), [describe(int(i)) for i in index[kept]],
                      [describe(i) for i in range(len(images)) if i not in read])


def output_stem(out: str | Path) -> Path:
    """``OUT`` without one of the suffixes it is written under (``emb.npy`` and ``emb`` both give ``emb``)."""
    out = Path(out)
    return out.with_suffix("") if out.suffix in OUTPUT_SUFFIXES else out


def write_embeddings(embeddings: Embeddings, out: str | Path) -> list[Path]:
    """``OUT.npy``, ``OUT.csv`` and (pyarrow installed) ``OUT.parquet``; returns the paths written."""
    stem = output_stem(out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    npy, table = stem.with_name(stem.name + ".npy"), stem.with_name(stem.name + ".csv")
    np.save(npy, embeddings.features)
    with open(table, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", "path"])
        writer.writerows(enumerate(embeddings.paths))
    written = [npy, table]
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return written
    n, dim = embeddings.features.shape
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(embeddings.features.reshape(-1), pa.float32()), dim)
    parquet = stem.with_name(stem.name + ".parquet")
    pq.write_table(pa.table({"index": pa.array(np.arange(n)), "path": pa.array(embeddings.paths),
                             "embedding": vectors}), parquet)
    return [*written, parquet]


def embed_folder(source: str | Path, folder: str | Path, out: str | Path | None = None,
                 overrides: list[str] | None = None, **options: Any) -> tuple[Embeddings, list[Path]]:
    """``selfsup embed``: the embeddings of every image under ``folder`` by the backbone of ``source`` (a run,
    checkpoint or backbone file), written to ``out`` when given. ``options``: those of :func:`embed_images`."""
    cfg, backbone, _ = load_frozen_backbone(source, overrides)
    embeddings = embed_images(backbone, cfg, folder_images(folder), **options)
    return embeddings, write_embeddings(embeddings, out) if out is not None else []
