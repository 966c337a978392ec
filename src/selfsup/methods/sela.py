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
CIFAR script spaces them linearly and relabels one head per update (``epoch % hc``). E is the planned number
of epochs (re-read from the current plan under ``train.time_budget``), B the global batch.

The logits for relabelling come from one pass over the training set storing the shared penultimate
features once (fc7 for AlexNet, avgpool for ResNet), which the engine runs on request
(:class:`~selfsup.methods.base.EmbedRequest`); each head's Linear is applied chunk by chunk in float64. The
seed's pass uses the *training* views (full augmentation, shuffled) with the model in train mode (BN batch
statistics, dropout on): ``aggregate=train``, the default; ``aggregate=eval`` uses the eval transform and eval
mode instead. Under DDP each process embeds and scales its shard of the images (Sinkhorn's marginals are summed
over processes), and the labels are gathered so that every process holds the same table.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from selfsup.config import MethodConfig, checked
from selfsup.data.recipes import NAMED, ViewLayout
from selfsup.errors import ConfigError, check_choice
from selfsup.methods.base import (
    BackboneFactory,
    Batch,
    Embedding,
    EmbedRequest,
    Method,
    Progress,
    RunInfo,
    StepOutput,
    register_method,
)
from selfsup.models.heads import MultiHead
from selfsup.nn import distributed
from selfsup.nn.sinkhorn import DTYPES, hard_labels, power_softmax, sinkhorn_knopp, storage_device

SCHEDULES = {"quadratic": (1.01, 2), "linear": (1.0001, 1)}  # main.py / cifar.py: (E + offset)·N·grid^power
RELABEL_SEED = 7_919  # offsets the label pass's sampling seed from the training sampler's


@dataclass
class SeLaConfig(MethodConfig):
    name: str = "sela"
    ncl: int = checked(3000, ge=1)  # K, clusters per head
    hc: int = checked(10, ge=1)  # heads (main.py's default is 1; the scripts and released 10x3k models use 10)
    lamb: float = checked(25.0, gt=0)  # λ of P^λ (CIFAR: 10)
    nopts: int = checked(100, ge=1)  # label re-optimisations spread over training (CIFAR: 400)
    dtype: str = checked("f64", choices=tuple(DTYPES))  # Sinkhorn-Knopp precision: f64 | f32
    tol: float = checked(0.1, gt=0)  # stop Sinkhorn-Knopp once Σ|c/c_new − 1| ≤ tol (CIFAR: 0.01)
    schedule: str = checked("quadratic", choices=tuple(SCHEDULES))  # quadratic (main.py) | linear (cifar.py)
    # all (main.py) | one (cifar.py: head epoch % hc per update)
    relabel_heads: str = checked("all", choices=("all", "one"))
    # train: training views, train mode (the seed) | eval: eval transform, eval mode
    aggregate: str = checked("train", choices=("train", "eval"))
    # augs=3: RRC, gray 0.2, jitter 0.4 x4 always, flip (MoCo-v1's recipe)
    augmentation: str = checked("moco_v1", choices=tuple(NAMED))
    # features and P^λ: auto (GPU when they fit, else host) | device | host
    storage: str = checked("auto", choices=("auto", "device", "host"))
    chunk_size: int = checked(16384, ge=1)  # rows per chunk of the logits/softmax and the final argmax


def sela_loss(logits: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """mean_h CE(logits[h], targets[h]); ``targets`` is (hc, B)."""
    return torch.stack([F.cross_entropy(z, y) for z, y in zip(logits, targets, strict=True)]).mean()


def balanced_random_labels(heads: int, num_samples: int, k: int, generator: torch.Generator | None = None
                           ) -> torch.Tensor:
    """The seed's initial labels: i mod K, permuted independently per head. (heads, N) int64."""
    base = torch.arange(num_samples) % k
    return torch.stack([base[torch.randperm(num_samples, generator=generator)] for _ in range(heads)])


def relabel_times(epochs: float, num_samples: int, nopts: int, schedule: str = "quadratic") -> np.ndarray:
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


@register_method(SeLaConfig)
class SeLa(Method):
    cfg: SeLaConfig

    def __init__(self, cfg: SeLaConfig, backbone: BackboneFactory, run: RunInfo):
        super().__init__(cfg, run)
        check_choice("method.dtype", cfg.dtype, DTYPES)
        check_choice("method.relabel_heads", cfg.relabel_heads, ("all", "one"))
        check_choice("method.aggregate", cfg.aggregate, ("train", "eval"))
        check_choice("method.storage", cfg.storage, ("auto", "device", "host"))
        check_choice("method.augmentation", cfg.augmentation, NAMED)
        if cfg.ncl < 1 or cfg.hc < 1 or cfg.nopts < 1:
            raise ConfigError(f"method.ncl, method.hc and method.nopts must be positive, got {cfg.ncl}, {cfg.hc}, "
                              f"{cfg.nopts}")
        if cfg.ncl > run.num_samples:
            raise ConfigError(f"method.ncl={cfg.ncl} clusters cannot be equipartitioned over {run.num_samples} images")
        self.views = ViewLayout.of(cfg.augmentation)
        self.encoder, width = backbone()
        self.heads = MultiHead(width, [cfg.ncl] * cfg.hc)
        self.times = relabel_times(run.total_steps / run.steps_per_epoch, run.num_samples, cfg.nopts, cfg.schedule)
        generator = torch.Generator().manual_seed(run.seed)
        self.register_buffer("labels", balanced_random_labels(cfg.hc, run.num_samples, cfg.ncl, generator))
        # schedule position (plain ints, no device sync per step); saved through get_extra_state
        self.iteration = 0  # optimiser steps done = niter of the next iteration
        self.relabels = 0  # t_j's consumed

    @property
    def backbone(self) -> nn.Module:
        return self.encoder

    @property
    def next_relabel_sample(self) -> float:
        """t_j of the next label update in samples (inf when none is left)."""
        return float(self.times[self.relabels]) if self.relabels < len(self.times) else math.inf

    def get_extra_state(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "relabels": self.relabels}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.iteration, self.relabels = int(state["iteration"]), int(state["relabels"])

    def cluster_assignments(self) -> torch.Tensor:
        return self.labels[0]

    # ------------------------------------------------------------------ training

    def training_step(self, batch: Batch) -> StepOutput:
        logits = self.heads(self.encoder(batch.views[0]))
        return StepOutput(sela_loss(logits, self.labels[:, batch.indices]))

    def on_after_step(self, progress: Progress) -> None:
        self.iteration = progress.step

    # ------------------------------------------------------------------ label re-optimisation

    def embedding_request(self, progress: Progress) -> EmbedRequest | None:
        """The features of the whole training set before the iteration that crosses the next t_j."""
        if progress.total_steps != self.run.total_steps:  # a time budget re-planned the run: E follows the plan
            epochs = progress.total_steps / progress.steps_per_epoch
            self.times = relabel_times(epochs, self.run.num_samples, self.cfg.nopts, self.cfg.schedule)
        self.iteration = progress.step
        if not relabel_due(self.iteration, self.run.global_batch, self.times, self.relabels):
            return None
        seen_in_training = self.cfg.aggregate == "train"
        return EmbedRequest(self.encoder, transform="train" if seen_in_training else "eval",
                            train_mode=seen_in_training, shuffle=seen_in_training,
                            seed=self.run.seed * 1_000_003 + RELABEL_SEED + self.relabels, storage=self.cfg.storage)

    @torch.no_grad()
    def on_embedding(self, embedding: Embedding) -> None:
        """Re-optimise the labels of the scheduled heads with Sinkhorn-Knopp on this shard's features."""
        self.relabels += 1
        self.relabel(embedding)

    @torch.no_grad()
    def relabel(self, embedding: Embedding) -> None:
        start = time.monotonic()
        features, indices = embedding
        epoch = self.iteration // self.run.steps_per_epoch
        heads = range(self.cfg.hc) if self.cfg.relabel_heads == "all" else [epoch % self.cfg.hc]
        device = self.labels.device
        dtype = DTYPES[self.cfg.dtype]
        everywhere = distributed.gather_uneven(indices.to(device))  # every process's rows, in rank order
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
            self.labels[h, everywhere] = distributed.gather_uneven(local.to(device))
            iterations.append(result.iterations)
        self.report({"sela_update": self.relabels, "of": len(self.times),
                     "epoch": self.iteration / self.run.steps_per_epoch, "heads": list(heads),
                     "sinkhorn_iterations": iterations, "seconds": round(time.monotonic() - start, 2)})
