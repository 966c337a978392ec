"""Mugs (Zhou et al. 2022): a ViT learns instance, local-group and group discrimination at once.

Per image the teacher sees two weak global crops (u = 0, 1); the student two global crops, both weak or
both strong, and L local crops (v = 0 … L+1). Three losses, each over the pairs (u, v) with v ≠ u:

1. **instance** — InfoNCE of the student's predicted CLS embedding s_v against the teacher's t_u, with a
   queue of past teacher embeddings as negatives (τ 0.2): −log e^{s·t/τ} / (e^{s·t/τ} + Σ_k e^{s·Q_k/τ});
2. **local-group** — the same on the local-group token: the mean a of all tokens after the last block
   (before the final LayerNorm) retrieves its top-n neighbours from a memory of mean patch tokens (no
   gradient), one extra "relation" block runs on [a, neighbours], g = LN_final(out[0]); own heads and queue;
3. **group** — DINO: CE(softmax((t_u − C)/τ_t), softmax(s_v/τ_s)) on prototype logits; C ← 0.9 C + 0.1 mean.

Each loss is the mean over its active parts {global pairs (2), local pairs (2L)} — 0.5/0.5 as the
official code when L ≥ 1, the global mean alone when L = 0 (the official code divides by zero). The
total is Σ active losses / Σ their weights (``loss_weights`` only switch losses on or off). After the
losses the queues receive both teacher targets and the memories the first global crop's mean patch token
(student: only images whose student globals were weak). The teacher is an EMA (cosine 0.996 → 1 per
step) of the backbone, the relation block, each head's projector and the group head's last layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from selfsup.config import MethodConfig
from selfsup.data.recipes import Choice, ViewLayout, dino_weak, mugs_strong
from selfsup.engine.schedules import momentum_at, warmup_then_constant
from selfsup.errors import ConfigError
from selfsup.methods.base import (
    BackboneFactory,
    Batch,
    Method,
    ParamGroup,
    Progress,
    RunInfo,
    StepOutput,
    register_method,
)
from selfsup.methods.moco import moco_loss
from selfsup.models.heads import ContrastiveHead, GroupHead
from selfsup.models.vit import ViT, set_drop_path
from selfsup.nn import distributed
from selfsup.nn.ema import ema_update, make_teacher
from selfsup.nn.memory import MemoryBank


@dataclass
class MugsConfig(MethodConfig):
    name: str = "mugs"
    loss_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # instance, local-group, group: > 0 switches on
    # views (global crop side = data.image_size)
    local_crops_number: int = 10
    local_crop_size: int = 96
    global_crops_scale: tuple[float, float] = (0.25, 1.0)
    local_crops_scale: tuple[float, float] = (0.05, 0.25)
    strong_prob: float = 0.5  # P(strong) of the student's globals (per image) and of each local crop
    randaugment: str = "rand-m9-mstd0.5-inc1"
    strong_ratio: float = 0.45  # RandAugment translation = this × crop size
    random_erasing: float = 0.25
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    # heads
    use_bn_in_head: bool = False  # BatchNorm in the three projectors (official flag; SyncBN across GPUs)
    head_hidden_dim: int = 2048
    predictor_hidden_dim: int = 4096
    norm_before_pred: bool = True
    instance_out_dim: int = 256
    local_group_out_dim: int = 256
    group_out_dim: int = 65536
    group_bottleneck_dim: int = 256
    norm_last_layer: bool = True  # freeze the weight-norm g of the prototypes (official default; ViT-S/B: false)
    # instance and local-group InfoNCE
    instance_queue_size: int = 65536
    instance_temp: float = 0.2
    local_group_queue_size: int = 65536
    local_group_temp: float = 0.2
    memory_size: int = 65536  # local-group memory rows (the official code uses local_group_queue_size)
    local_group_top_n: int = 8
    legacy_ptr_bug: bool = False  # the official memory pointer: +2B per write that does not wrap
    # group (DINO) loss
    group_student_temp: float = 0.1
    group_warmup_teacher_temp: float = 0.04
    group_teacher_temp: float = 0.04
    group_warmup_teacher_temp_epochs: int = 0
    center_momentum: float = 0.9
    # teacher and optimisation
    momentum_teacher: float = 0.996  # cosine to 1 over training, per step
    clip_grad: float = 3.0  # per-parameter gradient-norm clip (0: off)
    clip_grad_drop_epoch: int | None = None  # clip / 10 for epochs > this (official ViT-L: 100)
    freeze_last_layer: int = 1  # epochs without updates of the prototypes
    patch_embed_lr_mult: float = 0.2


# ------------------------------------------------------------------------------------------------ losses

Pair = tuple[int, int]


def crop_pairs(num_student: int, num_teacher: int = 2) -> tuple[list[Pair], list[Pair]]:
    """(teacher u, student v) pairs with v ≠ u, split into global (v < 2) and local (v ≥ 2) student crops."""
    pairs = [(u, v) for u in range(num_teacher) for v in range(num_student) if v != u]
    return [p for p in pairs if p[1] < 2], [p for p in pairs if p[1] >= 2]


def multicrop_mean(pair_loss: Callable[[int, int], torch.Tensor], num_student: int) -> torch.Tensor:
    """Mean over the active parts of {mean of the global pairs, mean of the local pairs}: 0.5/0.5 with locals."""
    parts = [torch.stack([pair_loss(u, v) for u, v in pairs]).mean()
             for pairs in crop_pairs(num_student) if pairs]
    return sum(parts) / len(parts)


def info_nce_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], queue: torch.Tensor,
                  temperature: float) -> torch.Tensor:
    """Mugs InfoNCE over crop pairs; each pair is MoCo's CE([s·t, s·Qᵀ]/τ, 0). Inputs unit-norm."""
    return multicrop_mean(lambda u, v: moco_loss(student[v], teacher[u], queue, temperature), len(student))


def group_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], center: torch.Tensor,
               teacher_temp: float, student_temp: float) -> torch.Tensor:
    """DINO cross-entropy over crop pairs: −Σ_k softmax((t_u − C)/τ_t)_k · log softmax(s_v/τ_s)_k, batch mean."""
    targets = [F.softmax((t - center) / teacher_temp, dim=-1) for t in teacher]
    log_probs = [F.log_softmax(s / student_temp, dim=-1) for s in student]
    return multicrop_mean(lambda u, v: -(targets[u] * log_probs[v]).sum(dim=-1).mean(), len(student))


@torch.no_grad()
def clip_per_parameter(parameters: list[nn.Parameter], max_norm: float) -> None:
    """Scale each parameter's gradient to norm ≤ ``max_norm`` on its own (official ``clip_gradients``)."""
    for p in parameters:
        if p.grad is not None:
            p.grad.mul_((max_norm / (p.grad.norm() + 1e-6)).clamp(max=1.0))


# ------------------------------------------------------------------------------------------------ views


def mugs_views(c: MugsConfig) -> ViewLayout:
    """methods.md §6 "Views", the global side being data.image_size: the teacher's two weak globals (blur 1.0; blur
    0.1 and solarise 0.2), the student's two globals (per image both fresh weak draws or, with ``strong_prob``, both
    strong: flip, RandAugment, crop, erasing), and ``local_crops_number`` locals, each strong with ``strong_prob``."""
    weak_1 = dino_weak("weak_global_1", None, c.global_crops_scale, blur_p=1.0, jitter=c.color_jitter)
    weak_2 = dino_weak("weak_global_2", None, c.global_crops_scale, blur_p=0.1, solarize_p=0.2, jitter=c.color_jitter)
    weak_local = dino_weak("weak_local", c.local_crop_size, c.local_crops_scale, blur_p=0.5, jitter=c.color_jitter)
    strong = mugs_strong("strong_global", None, c.global_crops_scale, c.randaugment, c.strong_ratio, c.random_erasing)
    strong_local = mugs_strong("strong_local", c.local_crop_size, c.local_crops_scale, c.randaugment, c.strong_ratio,
                               c.random_erasing)
    locals_ = [Choice(f"local_{i}_strong", (weak_local,), (strong_local,), c.strong_prob)
               for i in range(c.local_crops_number)]
    return ViewLayout.of(weak_1, weak_2, Choice("student_strong", (weak_1, weak_2), (strong, strong), c.strong_prob),
                         *locals_)


# ------------------------------------------------------------------------------------------------ networks


def local_group_memory(size: int, dim: int, legacy_ptr_bug: bool = False) -> MemoryBank:
    """The local-group memory of mean patch tokens: K rows of width D, randn (not normalised, as the official
    buffer); ``legacy_ptr_bug``: the official pointer, +2B per write that does not wrap."""
    return MemoryBank(size, dim, init="randn", legacy_ptr_bug=legacy_ptr_bug)


@torch.no_grad()
def memory_neighbours(memory: MemoryBank, query: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n, D): the ``n`` rows with the largest cosine to each query row (rows as stored), without gradient; the
    cosines in float32 even under autocast (bf16 would tie rows whose cosines differ by less than 2⁻⁸)."""
    with torch.autocast(query.device.type, enabled=False):
        return memory.bank[memory.topk(query.float(), n, cosine=True)[1]]


class MugsOutput(NamedTuple):
    features: torch.Tensor  # (V·B, D) CLS tokens after the final LayerNorm
    instance: torch.Tensor | None  # (V·B, d) unit-norm; crop-major
    local_group: torch.Tensor | None  # (V·B, d) unit-norm
    group: torch.Tensor | None  # (V·B, K) prototype logits
    memory_tokens: torch.Tensor | None  # (2B, D) mean final-LN'd patch tokens of the global crops


def by_resolution(crops: list[torch.Tensor]) -> list[torch.Tensor]:
    """Concatenate consecutive crops of the same size: one backbone forward per resolution."""
    groups: list[list[torch.Tensor]] = []
    for crop in crops:
        if groups and groups[-1][0].shape[-2:] == crop.shape[-2:]:
            groups[-1].append(crop)
        else:
            groups.append([crop])
    return [torch.cat(group) for group in groups]


class MugsNetwork(nn.Module):
    """One side (student or teacher): ViT + relation block + instance, local-group and group heads."""

    def __init__(self, vit: ViT, cfg: MugsConfig):
        super().__init__()
        dim = vit.embed_dim
        on = [w > 0 for w in cfg.loss_weights]
        self.vit = vit
        self.relation: Block | None = None
        self.instance_head: ContrastiveHead | None = None
        self.local_group_head: ContrastiveHead | None = None
        self.group_head: GroupHead | None = None
        self.top_n = cfg.local_group_top_n
        head = partial(ContrastiveHead, dim, cfg.head_hidden_dim, predictor_hidden_dim=cfg.predictor_hidden_dim,
                       norm_before_pred=cfg.norm_before_pred, batch_norm=cfg.use_bn_in_head)
        if on[0]:
            self.instance_head = head(cfg.instance_out_dim)
        if on[1]:
            self.relation = Block(dim, vit.blocks[0].attn.num_heads, mlp_ratio=4.0, qkv_bias=True,
                                  norm_layer=partial(nn.LayerNorm, eps=1e-6))
            for m in self.relation.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)
            self.local_group_head = head(cfg.local_group_out_dim)
        if on[2]:
            self.group_head = GroupHead(dim, cfg.head_hidden_dim, cfg.group_bottleneck_dim, cfg.group_out_dim,
                                        cfg.norm_last_layer, batch_norm=cfg.use_bn_in_head)

    def local_group_token(self, tokens: torch.Tensor, memory: MemoryBank) -> torch.Tensor:
        """g = LN_final(relation([a, top-n neighbours of a])[0]), a = mean of all tokens before the final LN."""
        a = tokens.mean(dim=1)
        neighbours = memory_neighbours(memory, a, self.top_n).to(a.dtype)
        return self.vit.norm(self.relation(torch.cat([a.unsqueeze(1), neighbours], dim=1))[:, 0])

    def forward(self, crops: list[torch.Tensor], memory: MemoryBank | None) -> MugsOutput:
        cls, local_group, memory_tokens = [], [], None
        for batch in by_resolution(crops):
            tokens = self.vit.forward_tokens(batch)
            normed = self.vit.norm(tokens)
            cls.append(normed[:, 0])
            if self.relation is not None and memory is not None:
                local_group.append(self.local_group_token(tokens, memory))
                if memory_tokens is None:  # the first resolution: the global crops
                    memory_tokens = normed[:, self.vit.num_prefix_tokens:].mean(dim=1).detach()
        features = torch.cat(cls)
        return MugsOutput(
            features=features,
            instance=self.instance_head(features) if self.instance_head is not None else None,
            local_group=self.local_group_head(torch.cat(local_group)) if self.local_group_head is not None else None,
            group=self.group_head(features) if self.group_head is not None else None,
            memory_tokens=memory_tokens,
        )

    def ema_pairs(self, student: MugsNetwork) -> list[tuple[nn.Module, nn.Module]]:
        """(teacher part, student part) pairs the EMA moves: no predictors."""
        pairs: list[tuple[nn.Module, nn.Module]] = [(self.vit, student.vit)]
        if self.relation is not None and student.relation is not None:
            pairs.append((self.relation, student.relation))
        for name in ("instance_head", "local_group_head"):
            mine, theirs = getattr(self, name), getattr(student, name)
            if mine is not None:
                pairs.append((mine.projector, theirs.projector))
        if self.group_head is not None and student.group_head is not None:
            pairs.append((self.group_head, student.group_head))
        return pairs


# ------------------------------------------------------------------------------------------------ method


@register_method(MugsConfig)
class Mugs(Method):
    cfg: MugsConfig
    center: torch.Tensor

    def __init__(self, cfg: MugsConfig, backbone: BackboneFactory, run: RunInfo):
        super().__init__(cfg, run)
        if len(cfg.loss_weights) != 3 or not any(w > 0 for w in cfg.loss_weights):
            raise ConfigError(f"method.loss_weights needs three weights, one of them > 0; got {cfg.loss_weights}")
        vit, dim = backbone()
        if not isinstance(vit, ViT):
            raise ConfigError(f"Mugs needs a ViT backbone (model.backbone=vit_tiny|vit_small|vit_base|vit_large), "
                              f"got {type(vit).__name__}")
        if not 0 < cfg.local_group_top_n <= cfg.memory_size:
            raise ConfigError(f"method.local_group_top_n={cfg.local_group_top_n} must be in [1, method.memory_size="
                              f"{cfg.memory_size}]")
        on = [w > 0 for w in cfg.loss_weights]
        self.student = MugsNetwork(vit, cfg)
        if cfg.use_bn_in_head and distributed.world_size() > 1:
            self.student = nn.SyncBatchNorm.convert_sync_batchnorm(self.student)
        self.teacher = make_teacher(self.student)
        for head in (self.teacher.instance_head, self.teacher.local_group_head):
            if head is not None:
                head.predictor = None  # the teacher outputs n(projection)
        set_drop_path(self.teacher, 0.0)
        self.instance_queue = MemoryBank(cfg.instance_queue_size, cfg.instance_out_dim) if on[0] else None
        self.local_group_queue = MemoryBank(cfg.local_group_queue_size, cfg.local_group_out_dim) if on[1] else None
        self.student_memory, self.teacher_memory = None, None
        if on[1]:
            self.student_memory = local_group_memory(cfg.memory_size, dim, cfg.legacy_ptr_bug)
            self.teacher_memory = local_group_memory(cfg.memory_size, dim, cfg.legacy_ptr_bug)
        self.register_buffer("center", torch.zeros(1, cfg.group_out_dim if on[2] else 0))
        self.epoch = 0  # of the current step (on_step_start)
        self.views = mugs_views(cfg)

    @property
    def backbone(self) -> nn.Module:
        """The teacher's ViT: evaluation and export use it, as the official code does."""
        return self.teacher.vit

    @property
    def teacher_temp(self) -> float:
        c = self.cfg
        return warmup_then_constant(c.group_warmup_teacher_temp, c.group_teacher_temp,
                                    c.group_warmup_teacher_temp_epochs, self.epoch)

    def training_step(self, batch: Batch) -> StepOutput:
        crops, weak = batch.views, ~batch.choices["student_strong"]
        teacher_crops, student_crops = crops[:2], crops[2:]
        n = len(student_crops)
        with torch.no_grad():
            t = self.teacher(teacher_crops, self.teacher_memory)
        s = self.student(student_crops, self.student_memory)

        losses: dict[str, torch.Tensor] = {}
        if s.instance is not None:
            losses["instance"] = self._info_nce(s.instance, t.instance, self.instance_queue, self.cfg.instance_temp, n)
        if s.local_group is not None:
            losses["local_group"] = self._info_nce(s.local_group, t.local_group, self.local_group_queue,
                                                   self.cfg.local_group_temp, n)
        if s.group is not None:
            teacher_logits = t.group.float()
            losses["group"] = group_loss(list(s.group.float().chunk(n)), list(teacher_logits.chunk(2)), self.center,
                                         self.teacher_temp, self.cfg.group_student_temp)
            self.update_center(teacher_logits)
        total = sum(losses.values()) / sum(w for w in self.cfg.loss_weights if w > 0)

        if self.student_memory is not None and self.teacher_memory is not None:
            images = weak.shape[0]  # memory tokens of the first global crop
            self.student_memory.enqueue(s.memory_tokens[:images].float(), keep=weak)
            self.teacher_memory.enqueue(t.memory_tokens[:images].float())
        logs = {f"loss_{name}": value.detach() for name, value in losses.items()}
        logs["weak_fraction"] = weak.float().mean()
        with torch.no_grad():  # collapse monitor: √D · mean per-dimension std of n(teacher CLS), ≈ 1 when spread out
            unit = F.normalize(t.features.float(), dim=1)
            logs["teacher_cls_std"] = unit.std(dim=0).mean() * unit.shape[1] ** 0.5
        return StepOutput(total, logs)

    def _info_nce(self, student: torch.Tensor, teacher: torch.Tensor, queue: MemoryBank, temperature: float,
                  num_student: int) -> torch.Tensor:
        """InfoNCE against the queue as it was, then enqueue the teacher targets of both global crops."""
        targets = list(teacher.float().chunk(2))
        loss = info_nce_loss(list(student.float().chunk(num_student)), targets, queue.snapshot(), temperature)
        for target in targets:
            queue.enqueue(target)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """C ← m·C + (1 − m)·mean of the teacher logits of both crops over all ranks."""
        batch_mean = distributed.all_reduce_mean(teacher_logits.mean(dim=0, keepdim=True))
        self.center.mul_(self.cfg.center_momentum).add_(batch_mean, alpha=1 - self.cfg.center_momentum)

    # ---------------------------------------------------------------------------------------- hooks

    def on_step_start(self, progress: Progress) -> None:
        self.epoch = progress.epoch

    def on_before_optimizer_step(self, progress: Progress) -> None:
        c = self.cfg
        if c.clip_grad > 0:
            late = c.clip_grad_drop_epoch is not None and self.epoch > c.clip_grad_drop_epoch
            clip_per_parameter(list(self.student.parameters()), c.clip_grad / 10 if late else c.clip_grad)
        if self.epoch < c.freeze_last_layer and self.student.group_head is not None:
            for p in self.student.group_head.last_layer.parameters():
                p.grad = None

    def on_after_step(self, progress: Progress) -> None:
        momentum = momentum_at(self.cfg.momentum_teacher, progress.fraction)
        for teacher_part, student_part in self.teacher.ema_pairs(self.student):
            ema_update(teacher_part, student_part, momentum)

    def parameter_groups(self) -> list[ParamGroup]:
        """AdamW groups as the official code: no weight decay on biases and 1-d (norm) parameters, decay on the
        rest (pos_embed and cls_token included); patch_embed at lr × ``patch_embed_lr_mult``."""
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {
            (decay, patch_embed): [] for decay in (True, False) for patch_embed in (False, True)}
        for name, p in self.student.named_parameters():
            if p.requires_grad:
                decay = not (name.endswith(".bias") or p.ndim <= 1)
                groups[(decay, "patch_embed" in name)].append(p)
        return [ParamGroup(params, lr_scale=self.cfg.patch_embed_lr_mult if patch_embed else 1.0, weight_decay=decay)
                for (decay, patch_embed), params in groups.items() if params]
