"""SeLa: self-labelling via simultaneous clustering and representation learning (Asano, Rupprecht and
Vedaldi, ICLR 2020; yukimasano/self-label ``main.py``).

Every training image i carries one pseudo-label per head, y_i^h ∈ {0..K−1}, looked up by dataset index.
The network (backbone → ``hc`` linear heads) is trained with cross-entropy to those labels, averaged over
heads: L = mean_h CE(head_h(f(x_i)), y_i^h). The labels change only at ``nopts`` label re-optimisations:
for every head, P = softmax(head logits) over the whole training set, and

    min_Q ⟨Q, −log P⟩ − H(Q)/λ   subject to   each of the K clusters holding N/K images,

solved by Sinkhorn-Knopp on P^λ (:mod:`selfsup.nn.sinkhorn`, float64); y_i = argmax_k Q_ki.

Schedule: re-optimise when niter·B ≥ t_j, t_j = (E + 1.01)·N·(j/(nopts−1))² samples (at most one per
iteration, the first before the first step): dense early, ≈8 epochs apart at the end for E=400. The seed's
CIFAR script spaces them linearly and relabels one head per update (``epoch % hc``). E is
``train.epochs`` (also under ``train.time_budget``), B the global batch.

The logits for relabelling come from one pass over the training set storing the shared penultimate
features once (fc7 for AlexNet, avgpool for ResNet); each head's Linear is applied chunk by chunk in
float64. The seed's pass uses the *training* loader (full augmentation, shuffled) with the model in train
mode (BN batch statistics, dropout on); that is the default here (``aggregate=train``), ``aggregate=eval``
uses the eval transform and eval mode instead. The pass runs outside the DDP forward (before the first
step and after the optimiser step whose successor crosses t_j) on its own DataLoader and sampler; under
DDP each rank embeds and scales its shard of the images, and the labels are gathered so that every rank
holds the same table.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from selfsup.config import Config, ConfigError, MethodConfig, check_choice, register_method_config
from selfsup.data.batch_augment import BatchAugment, batch_transform_from_config
from selfsup.data.loader import EpochSampler, ImageTensorDataset, MultiView, ViewDataset
from selfsup.data.transforms import TRANSFORMS, transform_from_config
from selfsup.methods.base import DataInfo, Method, StepOutput, new_backbone, register_method
from selfsup.models.heads import MultiHead
from selfsup.nn import distributed
from selfsup.nn.sinkhorn import DTYPES, hard_labels, power_softmax, sinkhorn_knopp, storage_device

SCHEDULES = {"quadratic": (1.01, 2), "linear": (1.0001, 1)}  # main.py / cifar.py: (E + offset)·N·grid^power
RELABEL_SEED = 7_919  # offsets the aggregation sampler's seed from the training sampler's


@register_method_config
@dataclass
class SeLaConfig(MethodConfig):
    name: str = "sela"
    ncl: int = 3000  # K, clusters per head
    hc: int = 10  # heads (main.py's default is 1; the scripts and released 10x3k models use 10)
    lamb: float = 25.0  # λ of P^λ (CIFAR: 10)
    nopts: int = 100  # label re-optimisations spread over training (CIFAR: 400)
    dtype: str = "f64"  # Sinkhorn-Knopp precision: f64 | f32
    tol: float = 0.1  # stop Sinkhorn-Knopp once Σ|c/c_new − 1| ≤ tol (CIFAR: 0.01)
    schedule: str = "quadratic"  # quadratic (main.py) | linear (cifar.py)
    relabel_heads: str = "all"  # all (main.py) | one (cifar.py: head epoch % hc per update)
    aggregate: str = "train"  # train: training views, train mode (the seed) | eval: eval transform, eval mode
    augmentation: str = "moco_v1"  # augs=3: RRC, gray 0.2, jitter 0.4 x4 always, flip (MoCo-v1's recipe)
    storage: str = "auto"  # features and P^λ: auto (GPU when they fit, else host) | device | host
    chunk_size: int = 16384  # rows per chunk of the logits/softmax and the final argmax
    label_metrics: bool = True  # after each update: NMI/aNMI/ARI/label-acc of head 0 vs the true labels
    label_metrics_samples: int | None = 50_000  # on a fixed random subset this large (aNMI takes minutes at 1.28M)


def sela_loss(logits: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """mean_h CE(logits[h], targets[h]); ``targets`` is (hc, B)."""
    return torch.stack([F.cross_entropy(z, y) for z, y in zip(logits, targets, strict=True)]).mean()


def balanced_random_labels(heads: int, num_samples: int, k: int, generator: torch.Generator | None = None
                           ) -> torch.Tensor:
    """The seed's initial labels: i mod K, permuted independently per head. (heads, N) int64."""
    base = torch.arange(num_samples) % k
    return torch.stack([base[torch.randperm(num_samples, generator=generator)] for _ in range(heads)])


def relabel_times(epochs: int, num_samples: int, nopts: int, schedule: str = "quadratic") -> np.ndarray:
    """t_j in samples, ascending: (E + 1.01)·N·(j/(nopts−1))² (quadratic) or (E + 1.0001)·N·j/(nopts−1) (linear)."""
    check_choice("method.schedule", schedule, SCHEDULES)
    offset, power = SCHEDULES[schedule]
    return (epochs + offset) * num_samples * np.linspace(0.0, 1.0, nopts) ** power


def relabel_due(iteration: int, batch_size: int, times: np.ndarray, done: int) -> bool:
    """Whether the update after ``done`` earlier ones runs before iteration ``iteration`` (niter·B ≥ t_done)."""
    return done < len(times) and iteration * batch_size >= times[done]


def relabel_iterations(times: np.ndarray, batch_size: int, num_iterations: int) -> list[int]:
    """The iterations (0-indexed, before their step) that re-optimise labels: at most one t_j each."""
    done, out = 0, []
    for iteration in range(num_iterations):
        if relabel_due(iteration, batch_size, times, done):
            out.append(iteration)
            done += 1
    return out


def steps_per_epoch(num_samples: int, batch_size: int, drop_last: bool) -> int:
    full, rest = divmod(num_samples, batch_size)
    return full + (1 if rest and not drop_last else 0)


def shard_size(num_samples: int, per_rank: int, rank: int, world_size: int) -> int:
    """How many samples :class:`EpochSampler` (drop_last=False) gives ``rank`` in one epoch."""
    full, rest = divmod(num_samples, per_rank * world_size)
    share = -(-rest // world_size)
    return full * per_rank + max(0, min(rank * share + share, rest) - rank * share)


@register_method("sela")
class SeLa(Method):
    cfg: SeLaConfig

    def __init__(self, cfg: SeLaConfig, full: Config, data: DataInfo):
        super().__init__(cfg, full, data)
        check_choice("method.dtype", cfg.dtype, DTYPES)
        check_choice("method.relabel_heads", cfg.relabel_heads, ("all", "one"))
        check_choice("method.aggregate", cfg.aggregate, ("train", "eval"))
        check_choice("method.storage", cfg.storage, ("auto", "device", "host"))
        check_choice("method.augmentation", cfg.augmentation, [t for t in TRANSFORMS if t != "eval"])
        if cfg.ncl < 1 or cfg.hc < 1 or cfg.nopts < 1:
            raise ConfigError(f"method.ncl, method.hc and method.nopts must be positive, got {cfg.ncl}, {cfg.hc}, "
                              f"{cfg.nopts}")
        if cfg.ncl > data.num_samples:
            raise ConfigError(f"method.ncl={cfg.ncl} clusters cannot be equipartitioned over {data.num_samples} images")
        self.views = (cfg.augmentation,)
        self.encoder, width = new_backbone(full)
        self.heads = MultiHead(width, [cfg.ncl] * cfg.hc)
        self.data_cfg = full.data
        self.seed = full.train.seed
        self.batch_size = full.train.batch_size  # B of niter·B: the global batch
        self.steps_per_epoch = steps_per_epoch(data.num_samples, self.batch_size, full.train.drop_last)
        self.times = relabel_times(full.train.epochs, data.num_samples, cfg.nopts, cfg.schedule)
        generator = torch.Generator().manual_seed(full.train.seed)
        self.register_buffer("labels", balanced_random_labels(cfg.hc, data.num_samples, cfg.ncl, generator))
        # schedule position (plain ints, no device sync per step); saved through get_extra_state
        self.iteration = 0  # optimiser steps done = niter of the next iteration
        self.relabels = 0  # t_j's consumed
        self.scores: dict[str, float] = {}  # label metrics of the last update
        self._score_tensor: torch.Tensor | None = None
        self._dataset: ViewDataset | None = None
        self._loader_options: dict[str, Any] = {}

    @property
    def backbone(self) -> nn.Module:
        return self.encoder

    @property
    def next_relabel_sample(self) -> float:
        """t_j of the next label update in samples (inf when none is left)."""
        return float(self.times[self.relabels]) if self.relabels < len(self.times) else math.inf

    def get_extra_state(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "relabels": self.relabels, "scores": dict(self.scores)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.iteration, self.relabels = int(state["iteration"]), int(state["relabels"])
        self.scores, self._score_tensor = dict(state.get("scores", {})), None

    # ------------------------------------------------------------------ training

    def training_step(self, views, indices, labels) -> StepOutput:
        logits = self.heads(self.encoder(views[0]))
        loss = sela_loss(logits, self.labels[:, indices])
        return StepOutput(loss, self._score_logs())

    def _score_logs(self) -> dict[str, torch.Tensor]:
        if not self.scores:
            return {}
        if self._score_tensor is None:  # once per update: a device copy of the monitored label scores
            self._score_tensor = torch.tensor(list(self.scores.values()), device=self.labels.device)
        return {f"label_{name}": value for name, value in zip(self.scores, self._score_tensor, strict=True)}

    def on_epoch_start(self, epoch: int, loader: Any) -> None:
        self._dataset = loader.dataset
        self._loader_options = {"num_workers": loader.num_workers, "pin_memory": loader.pin_memory}
        if self.iteration == 0:
            self._maybe_relabel()  # t_0 = 0: before the first step

    def on_after_step(self, progress: float) -> None:
        self.iteration += 1
        self._maybe_relabel()

    def _maybe_relabel(self) -> None:
        if relabel_due(self.iteration, self.batch_size, self.times, self.relabels):
            self.relabels += 1
            self.relabel()

    # ------------------------------------------------------------------ label re-optimisation

    @torch.no_grad()
    def relabel(self, dataset: ViewDataset | None = None) -> dict[str, Any]:
        """Re-optimise the labels of the scheduled heads with Sinkhorn-Knopp; returns what it did."""
        start = time.monotonic()
        features, indices = self.aggregate(dataset)
        epoch = self.iteration // self.steps_per_epoch
        heads = range(self.cfg.hc) if self.cfg.relabel_heads == "all" else [epoch % self.cfg.hc]
        device = self.labels.device
        dtype = DTYPES[self.cfg.dtype]
        everywhere = self._gather(indices.to(device))
        iterations = []
        for h in heads:
            layer = self.heads[h]
            num_bytes = features.shape[0] * self.cfg.ncl * dtype.itemsize
            p = power_softmax(features, self.cfg.lamb, weight=layer.weight, bias=layer.bias, dtype=dtype,
                              out_device=storage_device(num_bytes, device, self.cfg.storage),
                              compute_device=device, chunk_size=self.cfg.chunk_size)
            result = sinkhorn_knopp(p, tol=self.cfg.tol, distributed=distributed.world_size() > 1)
            local = hard_labels(p, result.r, self.cfg.chunk_size)
            del p
            self.labels[h, everywhere[everywhere >= 0]] = self._gather(local.to(device))[everywhere >= 0]
            iterations.append(result.iterations)
        del features
        self._update_scores()
        report = {"update": self.relabels, "epoch": self.iteration / self.steps_per_epoch, "heads": list(heads),
                  "sinkhorn_iterations": iterations, "seconds": round(time.monotonic() - start, 2), **self.scores}
        if distributed.is_main():
            from tqdm import tqdm

            scores = " ".join(f"{k}={v:.2f}" for k, v in self.scores.items())
            tqdm.write(f"sela: label update {self.relabels}/{len(self.times)} at epoch {report['epoch']:.3f}, "
                       f"heads {report['heads']}, SK iterations {iterations}, {report['seconds']}s {scores}".rstrip())
        return report

    @torch.no_grad()
    def aggregate(self, dataset: ViewDataset | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Penultimate features (float32) of this rank's shard of the training set, and their dataset indices.

        ``aggregate=train``: the training views in shuffled order, the backbone in train mode (the seed),
        drawn on the device as in training under ``data.augment=batch``; ``eval``: the eval transform in
        index order, eval mode. Own DataLoader and sampler (keys
        ``(index, seed)`` drawn from the run seed and the update number), never the trainer's iterator.
        """
        views = dataset or self._dataset
        if views is None:
            raise RuntimeError("SeLa.relabel needs the training data: on_epoch_start(epoch, loader) was not called")
        seen_in_training = self.cfg.aggregate == "train"
        device = self.labels.device
        augment: BatchAugment | None = None  # data.augment=batch: the loader gives raw images, views made here
        if not seen_in_training:
            views = ViewDataset(views.base, MultiView([transform_from_config(self.data_cfg, "eval")]))
        elif isinstance(views, ImageTensorDataset):
            augment = batch_transform_from_config(self.data_cfg, self.cfg.augmentation).to(device)
            generator = torch.Generator(device=device).manual_seed(self.seed + RELABEL_SEED + self.relabels)
        world, rank = distributed.world_size(), distributed.rank()
        per_rank = self.batch_size // world
        sampler = EpochSampler(len(views), per_rank, seed=self.seed + RELABEL_SEED, rank=rank, world_size=world,
                               drop_last=False, shuffle=seen_in_training)
        sampler.set_epoch(self.relabels)
        loader = DataLoader(views, batch_size=per_rank, sampler=sampler, **self._loader_options)
        count = shard_size(len(views), per_rank, rank, world)
        width = self.heads[0].in_features
        features = torch.empty(count, width, device=storage_device(count * width * 4, device, self.cfg.storage))
        indices = torch.empty(count, dtype=torch.long)
        was_training = self.encoder.training
        self.encoder.train(seen_in_training)
        filled = 0
        try:
            for batch, index, _ in loader:
                if augment is None:
                    images = batch[0].to(device, non_blocking=True)
                else:
                    images = augment(batch.to(device, non_blocking=True), generator)
                out = self.encoder(images).float()
                features[filled:filled + out.shape[0]] = out
                indices[filled:filled + out.shape[0]] = index
                filled += out.shape[0]
        finally:
            self.encoder.train(was_training)
        if filled != count:
            raise RuntimeError(f"SeLa aggregation embedded {filled} images, expected {count}")
        return features, indices

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's shard (padded with −1 to the longest) in rank order."""
        if distributed.world_size() == 1:
            return x
        longest = torch.tensor([x.shape[0]], device=x.device)
        dist.all_reduce(longest, op=dist.ReduceOp.MAX)
        padded = torch.full((int(longest.item()),), -1, dtype=x.dtype, device=x.device)
        padded[:x.shape[0]] = x
        return distributed.gather(padded)

    def _update_scores(self) -> None:
        """NMI / aNMI / ARI / label accuracy (%) of head 0 vs the true labels (monitoring only)."""
        targets = getattr(getattr(self._dataset, "base", None), "targets", None)
        if not self.cfg.label_metrics or targets is None:
            return
        from selfsup.eval.clustering import clustering_scores

        targets = np.asarray(targets)
        chosen = np.flatnonzero(targets >= 0)
        if len(chosen) == 0:
            return
        limit = self.cfg.label_metrics_samples
        if limit and len(chosen) > limit:
            chosen = np.sort(np.random.default_rng(self.seed).choice(chosen, limit, replace=False))
        scores = clustering_scores(self.labels[0].cpu().numpy()[chosen], targets[chosen])
        names = {"nmi": "nmi", "nmi_geometric": "nmi_geometric", "ami": "ami", "ari": "ari", "acc": "label_acc"}
        self.scores = {name: float(scores[key]) for name, key in names.items()}
        self._score_tensor = None


# ---------------------------------------------------------------------------------------------
# export


def export_torchvision(method: SeLa, head: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A torchvision ResNet state dict with ``head`` as its ``fc``, and that head's pseudo-labels, as the
    seed's released models: ``torchvision.models.resnet50(num_classes=K).load_state_dict(state)``."""
    from torchvision.models import ResNet

    backbone = method.backbone
    if not isinstance(backbone, ResNet):
        raise ValueError(f"export_torchvision needs a torchvision ResNet backbone, got {type(backbone).__name__}")
    if backbone.conv1.kernel_size != (7, 7):
        raise ValueError("this backbone has the small-image stem (model.small_stem=true): torchvision's ResNet "
                         "has a 7x7 conv1 and a max-pool, so the weights would not load")
    state = {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}
    layer = method.heads[head]
    state["fc.weight"] = layer.weight.detach().cpu().clone()
    state["fc.bias"] = layer.bias.detach().cpu().clone()
    return state, method.labels[head].detach().cpu().clone()


def pseudo_label_scores(labels: np.ndarray, targets: np.ndarray) -> dict[str, dict[str, float]]:
    """NMI (arithmetic and geometric averaging), aNMI, ARI and Hungarian label accuracy (%) of every head's
    pseudo-labels (``labels``: (heads, N)) against the true ``targets`` (N,), over the samples with a
    target ≥ 0; keys ``head0``, ``head1``, …, then ``mean`` (over heads)."""
    from selfsup.eval.clustering import clustering_scores

    labels, targets = np.asarray(labels), np.asarray(targets)
    known = targets >= 0
    scores = {f"head{h}": clustering_scores(head[known], targets[known]) for h, head in enumerate(labels)}
    scores["mean"] = {name: float(np.mean([s[name] for s in scores.values()])) for name in scores["head0"]}
    return scores


@dataclass
class LabelExport:
    path: Path  # the written CSV or JSON file
    scores: dict[str, dict[str, float]] | None  # pseudo_label_scores vs the true labels (None: no labels known)


def export_labels(checkpoint_path: str | Path, out_path: str | Path) -> LabelExport:
    """Write a run's pseudo-labels: dataset index (and image: its path for folder data sets,
    ``ImageDataset.describe``) → label per head. ``.csv`` gives columns index,image,head0..; anything else JSON
    (which also holds the scores). Where the training set can be read and has class labels, the pseudo-labels
    are scored against them (:func:`pseudo_label_scores`)."""
    from selfsup.config import config_from_dict
    from selfsup.data.datasets import build_dataset
    from selfsup.engine.checkpoint import CheckpointError, load_checkpoint

    state = load_checkpoint(checkpoint_path)
    labels = state.get("method", {}).get("labels")
    if labels is None or "config" not in state:
        raise CheckpointError(f"{checkpoint_path} holds no SeLa label table (method.labels)")
    cfg = config_from_dict(state["config"])
    labels = labels.cpu().numpy()
    names: list[str] | None = None
    scores: dict[str, dict[str, float]] | None = None
    try:
        dataset = build_dataset(cfg.data, cfg.data.train_split)
        if len(dataset) == labels.shape[1]:
            names = [dataset.describe(i) for i in range(len(dataset))]
            targets = np.asarray(dataset.targets)
            if (targets >= 0).any():
                scores = pseudo_label_scores(labels, targets)
    except (OSError, ConfigError, RuntimeError):  # data not reachable here: indices only
        names = None
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    heads = range(labels.shape[0])
    if out.suffix.lower() == ".csv":
        with open(out, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["index", *(["image"] if names else []), *(f"head{h}" for h in heads)])
            for i in range(labels.shape[1]):
                writer.writerow([i, *([names[i]] if names else []), *labels[:, i].tolist()])
    else:
        samples = [{"index": i, **({"image": names[i]} if names else {}), "labels": labels[:, i].tolist()}
                   for i in range(labels.shape[1])]
        payload = {"num_heads": labels.shape[0], "num_clusters": int(getattr(cfg.method, "ncl", labels.max() + 1)),
                   "step": state.get("step"), "scores": scores, "samples": samples}
        out.write_text(json.dumps(payload))
    return LabelExport(out, scores)
