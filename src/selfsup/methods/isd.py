"""ISD: Iterative Similarity Distillation (Tejankar et al., ICCV 2021), ``train_isd.py`` and ``train_isd_plus.py``.

Student q = n(h(f_q(x_q))), teacher k = sg(n(f_k(x_k))) with f_k an EMA of f_q (the predictor h is not
part of it). Both are compared with the *same snapshot* of a queue Q of past teacher embeddings:

    S_s = q·Qᵀ / τ_s,   S_t = k·Qᵀ / τ_t,   L = (1/B) Σ_b KL(softmax(S_t,b) ‖ softmax(S_s,b)),

and only then is k enqueued: the two views are never compared directly, and the current keys are not
in the queue that step (the opposite of MSF).

Two variants share this file, selected by name, each with its script's defaults:

- ``method=isd`` (``train_isd.py``, the R18 README run): no projection heads, the embedding is the pooled
  backbone feature; predictor Linear(d,d,bias=False)-BN-ReLU-Linear(d,d); τ_s = τ_t = 0.02; m 0.999;
  AUG+ on both views; the queue initialised with the original code's quirk (randn normalised along
  dim 0, rows of norm ≈ √(d/K)).
- ``method=isd_plus`` (``train_isd_plus.py``, the ICCV R50 run): BYOL's MLP head on both encoders
  (d → 2d (BN, ReLU) → d/4) and BYOL's predictor; τ_t 0.01, τ_s 0.1; m 0.99; WEAK teacher view, AUG+
  student view; unit-norm queue rows.

Every difference is a field of the config, so e.g. ``run_isd_plus.sh``'s R18 run is ``method=isd_plus
method.teacher_temperature=0.02 method.student_temperature=0.2``.
Monitor: the teacher's top-5 queue neighbours (``StepOutput.neighbours``), whose label purity the engine logs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.config import MethodConfig, checked
from selfsup.methods.base import (
    BackboneFactory,
    Batch,
    Method,
    Progress,
    RunInfo,
    StepOutput,
    augmentation_views,
    register_method,
)
from selfsup.models.heads import byol_heads, mlp
from selfsup.nn.memory import MemoryBank
from selfsup.nn.online_target import OnlineTarget


@dataclass
class ISDConfig(MethodConfig):
    name: str = "isd"
    projection_heads: bool = False  # ISD+: MLP heads d -> 2d -> d/4 on both encoders and BYOL's predictor
    queue_size: int = checked(128000, ge=1, holds_batch=True)
    teacher_temperature: float = checked(0.02, gt=0)  # train_isd.py --temp (one τ for both)
    student_temperature: float = checked(0.02, gt=0)
    # teacher EMA, constant (train_isd.py's default; the README does not override it)
    momentum: float = checked(0.999, ge=0, le=1)
    augmentation: str = "strong/strong"  # teacher/student views: AUG+ on both
    # train_isd.py's quirk: randn normalised along dim 0
    queue_init: str = checked("normal_columns", choices=("normal", "normal_columns", "zeros"))
    shuffle_bn: bool = True
    purity_k: int = checked(5, ge=1)  # monitor: the teacher's top-k queue neighbours


@dataclass
class ISDPlusConfig(ISDConfig):
    name: str = "isd_plus"
    projection_heads: bool = True
    teacher_temperature: float = 0.01  # --temp_t
    student_temperature: float = 0.1  # --temp_s
    momentum: float = 0.99
    augmentation: str = "weak/strong"  # the README's --weak_strong: WEAK teacher, AUG+ student
    queue_init: str = "normal"  # unit-norm rows


def isd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(S_t) ‖ softmax(S_s)) summed over the queue, mean over the batch, as the seed's
    ``kl_div(log_softmax(S_s), softmax(S_t), 'batchmean')``. Its gradient w.r.t. S_s is (p_s − p_t) / B."""
    return F.kl_div(F.log_softmax(student_logits, dim=1), F.softmax(teacher_logits, dim=1), reduction="batchmean")


def similarities(x: torch.Tensor, queue: torch.Tensor) -> torch.Tensor:
    """x·Qᵀ in float32 even under bf16 autocast: divided by τ = 0.01, bf16 rounding would be ~0.4 in a logit."""
    with torch.autocast(x.device.type, enabled=False):
        return x.float() @ queue.float().T


def isd_heads(width: int, projection_heads: bool) -> tuple[nn.Module, nn.Module, int]:
    """(projector, predictor, embedding width). ISD+: BYOL's MLP heads on both encoders and BYOL's predictor.
    ISD: the teacher embeds with the pooled feature; predictor Linear(d,d,bias=False)-BN-ReLU-Linear(d,d)."""
    if projection_heads:
        return byol_heads(width)
    return nn.Identity(), mlp([width, width, width], first_bias=False), width


@register_method(ISDConfig, ISDPlusConfig)
class ISD(Method):
    cfg: ISDConfig

    def __init__(self, cfg: ISDConfig, backbone: BackboneFactory, run: RunInfo):
        super().__init__(cfg, run)
        self.views = augmentation_views(cfg.augmentation)
        net, width = backbone()
        projector, predictor, dim = isd_heads(width, cfg.projection_heads)
        self.net = OnlineTarget(net, projector, predictor)
        self.queue = MemoryBank(cfg.queue_size, dim, init=cfg.queue_init, store_ids=True)

    @property
    def backbone(self) -> nn.Module:
        return self.net.backbone

    def training_step(self, batch: Batch) -> StepOutput:
        x_q, x_k = batch.views  # student (query) view, teacher (key) view
        q = self.net.query(x_q)
        k = self.net.target(x_k, self.cfg.shuffle_bn)
        queue = self.queue.snapshot()  # the same queue for student and teacher
        student_logits = similarities(q, queue) / self.cfg.student_temperature
        teacher_logits = similarities(k, queue) / self.cfg.teacher_temperature
        loss = isd_loss(student_logits, teacher_logits)
        neighbours = self.queue.ids[teacher_logits.topk(self.cfg.purity_k, dim=1).indices]
        self.queue.enqueue(k, batch.indices)  # only after the loss
        return StepOutput(loss, neighbours=neighbours)

    def on_after_step(self, progress: Progress) -> None:
        self.net.update_target(self.cfg.momentum)
