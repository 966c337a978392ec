"""Typed configuration: dataclass sections, YAML recipes and dotted ``key=value`` overrides.

A recipe is a YAML mapping with the sections of :class:`Config`. Overrides are words such as
``train.epochs=100`` or ``method=msf`` (selects a method with its paper defaults). Every key and
value is checked against the dataclasses; a mistake is one :class:`ConfigError` naming the key and
the nearest valid spelling. Each field declares the values it admits once, beside its default
(``epochs: int = checked(200, ge=1)``, see :class:`Rule`); :func:`check_config` applies them all.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import re
import reprlib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

from selfsup.errors import ConfigError, check_choice, did_you_mean
from selfsup.registry import METHODS

__all__ = ["ConfigError", "check_choice"]  # re-exported: the error type every config key raises

Section = TypeVar("Section")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Rule:
    """The values a config field admits (for a list or tuple field: every item), declared beside the field with
    :func:`checked` and applied by :func:`check_config`. ``None`` always passes (an optional field left unset)."""

    choices: tuple[str, ...] = ()
    ge: float | None = None  # at least
    gt: float | None = None  # more than
    le: float | None = None  # at most
    lt: float | None = None  # less than
    ascending: bool = False  # items in non-decreasing order (a range such as a crop scale)
    max_items: int | None = None
    pattern: str | None = None  # a regular expression the whole value must match
    hint: str = ""  # how a valid value looks, where the bounds alone do not say it
    holds_batch: bool = False  # a ring buffer that takes the whole global batch each step: >= train.batch_size

    def problem(self, key: str, value: Any) -> str | None:
        """Why ``value`` does not fit, as a sentence naming ``key``; None when it fits."""
        if value is None:
            return None
        many = isinstance(value, (list, tuple))
        items = list(value) if many else [value]
        if self.max_items is not None and len(items) > self.max_items:
            return f"{key} holds {len(items)} values; at most {self.max_items} are allowed"
        for item in items:
            if self.choices and item not in self.choices:
                entry = f"{key} entry {_show(item)}" if many else f"{key}={_show(item)}"
                return (f"{entry} is not valid{did_you_mean(str(item)[:100], self.choices)}; "
                        f"choose {'from' if many else 'one of'} {list(self.choices)}")
            if self.pattern is not None and not re.fullmatch(self.pattern, str(item)):
                return f"{key}={_show(item)} is not valid; write {self.hint or self.pattern}"
            if isinstance(item, (int, float)) and not self._in_bounds(item):
                return f"{'every value of ' if many else ''}{key} must be {self.bounds()}, got {_show(value)}"
        if self.ascending and any(b < a for a, b in itertools.pairwise(items)):
            return f"{key}={_show(value)} must be in increasing order"
        return None

    def _in_bounds(self, x: float) -> bool:
        return ((self.ge is None or x >= self.ge) and (self.gt is None or x > self.gt)
                and (self.le is None or x <= self.le) and (self.lt is None or x < self.lt))

    def bounds(self) -> str:
        """``at least 1``, ``more than 0 and at most 1`` ..."""
        words = (("at least", self.ge), ("more than", self.gt), ("at most", self.le), ("less than", self.lt))
        return " and ".join(f"{word} {bound:g}" for word, bound in words if bound is not None)


def checked(default: Any = dataclasses.MISSING, *, factory: Callable[[], Any] | Any = dataclasses.MISSING,
            **rule: Any) -> Any:
    """A dataclass field with its default and the :class:`Rule` of its values: ``lr: float = checked(0.03, ge=0)``;
    a list default goes in ``factory``. A subclass that overrides the default keeps the base class's rule."""
    return field(default=default, default_factory=factory, metadata={"rule": Rule(**rule)})


def field_rule(cls: type, name: str) -> Rule | None:
    """The rule of field ``name`` of dataclass ``cls`` (or of the nearest base class that declares one)."""
    for klass in cls.__mro__:
        declared = getattr(klass, "__dataclass_fields__", {}).get(name)
        if declared is not None and "rule" in declared.metadata:
            return declared.metadata["rule"]
    return None


def check_section(section: Any, prefix: str) -> None:
    """Check every field of one config section (a dataclass instance) against its rule."""
    for f in dataclasses.fields(section):
        rule = field_rule(type(section), f.name)
        problem = rule.problem(prefix + f.name, getattr(section, f.name)) if rule else None
        if problem:
            default = f.default if f.default is not dataclasses.MISSING else None
            example = f" (default: {prefix}{f.name}={_show(default)})" if default is not None else ""
            raise ConfigError(problem + example)


def check_config(cfg: Config) -> Config:
    """Every field of every section against its declared rule, and the queues against the batch: one clear
    :class:`ConfigError` naming the first bad key. Returns ``cfg``."""
    for f in dataclasses.fields(cfg):
        if dataclasses.is_dataclass(section := getattr(cfg, f.name)):  # the sections (not e.g. `imports`)
            check_section(section, f"{f.name}.")
    batch = cfg.train.batch_size
    for f in dataclasses.fields(cfg.method):
        rule, rows = field_rule(type(cfg.method), f.name), getattr(cfg.method, f.name)
        if rule is not None and rule.holds_batch and isinstance(rows, int) and rows < batch:
            raise ConfigError(f"method.{f.name}={rows} is smaller than train.batch_size={batch}: the whole global "
                              f"batch enters it every step; set method.{f.name} to at least {batch} "
                              f"(default {f.default}) or lower train.batch_size")
    return cfg


EVAL_PROTOCOLS = ("knn", "nn", "cluster", "align", "linear", "rankme", "duplicates")  # selfsup.eval.protocols


@dataclass
class DataConfig:
    # digits | fashion-mnist | imagefolder | folder | filelist | cifar10 | cifar100 | stl10 | synthetic
    name: str = "digits"
    path: str | None = None  # data-set root; None uses the data set's default location
    image_size: int = checked(32, ge=1)  # side of the training crops fed to the backbone
    train_split: str = "train"  # split used for self-supervised training
    val_split: str = "val"  # held-out split for monitors and evaluation
    subset: int | None = checked(None, ge=1)  # use only the first N training images (quick experiments)
    num_workers: int = checked(0, ge=0)  # DataLoader worker processes
    # per_sample: PIL transforms in the loader | batch: tensor ops on the training device
    augment: str = checked("per_sample", choices=("per_sample", "batch"))
    skip_corrupt: bool = False  # skip (and count) unreadable images instead of stopping the run
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = checked(IMAGENET_STD, gt=0)
    # RandomResizedCrop area range of the training views
    crop_scale: tuple[float, float] = checked((0.2, 1.0), gt=0, le=1, ascending=True)
    flip: bool = True  # random horizontal flip in the training views
    blur: bool = True  # Gaussian blur in AUG+ (sigma scaled by image_size / 224)
    # eval transform: Resize(size / ratio) -> CenterCrop(size); 224/256
    eval_crop_ratio: float = checked(0.875, gt=0, le=1)
    # data.augment=batch on JPEG folders: cpu (the workers) | gpu (nvjpeg, batched on the device)
    decode: str = checked("cpu", choices=("cpu", "gpu"))
    # labels: auto (data.name=folder: class sub-folders when every image sits in one; filelist: its label column) |
    # none (every image unlabelled, any data set) | folders (data.name=folder: class sub-folders, required)
    labels: str = checked("auto", choices=("auto", "none", "folders"))
    # folder / filelist without train/ and val/ (or a split column): this fraction of the images is held out as the
    # val split, stratified by label, chosen by a hash of each path and split_seed (not train.seed: the split stays)
    val_fraction: float = checked(0.1, ge=0, lt=1)
    split_seed: int = 0


@dataclass
class ModelConfig:
    backbone: str = "resnet_mini"  # see selfsup.models.backbones.BACKBONES
    small_stem: bool = True  # CIFAR stem: 3x3 stride-1 conv and no max-pool (small images)
    zero_init_residual: bool = False
    # resnet_mini stage widths; None keeps the preset (16/32/64, wide 32/64/128)
    widths: tuple[int, ...] | None = checked(None, ge=1, le=8192, max_items=8)
    # resnet_mini: average-pool the last map to g x g and flatten (C·g² features; 1 = global)
    pool_grid: int = checked(1, ge=1)
    # BatchNorm statistics over this many sub-batches per process (selfsup.nn.split_bn, the MoCo CIFAR demo's
    # SplitBatchNorm): N emulates the per-GPU BatchNorm of an N-GPU seed run on one GPU; 1 = plain BatchNorm
    bn_splits: int = checked(1, ge=1)
    # ViTs (selfsup.models.vit); None keeps the architecture's preset, ResNets ignore these
    patch_size: int | None = checked(None, ge=1, le=1024)
    embed_dim: int | None = checked(None, ge=1, le=16384)
    depth: int | None = checked(None, ge=1, le=256)
    num_heads: int | None = checked(None, ge=1, le=1024)
    drop_path_rate: float = checked(0.0, ge=0, lt=1)  # stochastic depth, linspace(0, rate) over the blocks
    # the position-embedding grid is laid out for this side; other sizes interpolate
    vit_image_size: int = checked(224, ge=1, le=16384)
    # how a ViT resamples its position embedding for other input sizes (96-px local crops ...): official = the
    # DINO/Mugs arithmetic (bicubic, scale factor (grid + 0.1)/old grid, no antialias), so a Mugs run sees the
    # embeddings the seed's local crops saw | timm = timm's resample_abs_pos_embed (bicubic to the size, antialias)
    pos_embed_resample: str = checked("official", choices=("official", "timm"))


@dataclass
class MethodConfig:
    """Base of every method's hyper-parameters. A method's subclass sets ``name`` (its one declaration of the
    name, read by ``@register_method``) and adds its fields."""

    name: str = "moco"


@dataclass
class OptimConfig:
    name: str = checked("sgd", choices=("sgd", "adamw"))
    lr: float = checked(0.03, ge=0)  # learning rate at the reference batch size below
    reference_batch_size: int | None = checked(None, ge=1)  # lr is set for this total batch (None: lr is used as given)
    # with a reference: linear lr·B/ref | sqrt lr·sqrt(B/ref) | none
    lr_scaling: str = checked("linear", choices=("linear", "sqrt", "none"))
    momentum: float = checked(0.9, ge=0, le=1)
    weight_decay: float = checked(1e-4, ge=0)
    # cosine weight-decay schedule to this value per step (DINO/Mugs)
    weight_decay_end: float | None = checked(None, ge=0)
    nesterov: bool = False
    schedule: str = checked("cosine", choices=("cosine", "step", "constant"))
    per_step: bool = False  # update the schedule every step instead of every epoch (seeds: per epoch)
    min_lr: float = checked(0.0, ge=0)  # floor of the cosine schedule
    lr_decay_epochs: list[int] = checked(factory=list, ge=0, ascending=True)  # milestones of the step schedule
    lr_decay_rate: float = checked(0.1, gt=0)  # factor applied at each milestone
    warmup_epochs: float = checked(0.0, ge=0)  # linear warm-up from 0 before the schedule


@dataclass
class TrainConfig:
    epochs: int = checked(200, ge=1)
    batch_size: int = checked(256, ge=1)  # total over all processes
    seed: int = 0
    # auto | cpu | cuda | cuda:N
    device: str = checked("auto", pattern=r"auto|cpu|cuda(:\d+)?|mps", hint="auto, cpu, cuda or cuda:N")
    precision: str = checked("auto", choices=("auto", "bf16", "fp32"))  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    channels_last: bool | None = None  # None: on for CUDA
    compile: bool = False  # torch.compile the method
    sync_bn: bool = False  # SyncBatchNorm across processes (CUDA, world size > 1); an alternative to MoCo's ShuffleBN
    threads: int | None = checked(None, ge=1)  # torch intra-op threads on CPU (None: torch's default)
    drop_last: bool = True
    output_dir: str = "runs"
    run_name: str | None = None  # None: <method>-<data>-<timestamp>
    resume: str | None = None  # a checkpoint path, a run folder, or "auto" (continue the latest in run_name)
    checkpoint_every_epochs: int = checked(1, ge=1)
    checkpoint_every_minutes: float = checked(30.0, ge=0)  # also save mid-epoch this often (long epochs; 0: every step)
    log_every_steps: int = checked(10, ge=1)
    max_steps: int | None = checked(None, ge=1)  # stop after this many optimiser steps (debugging, tests)
    time_budget: str | None = None  # e.g. 6m, 90s, 1.5h: train to this deadline, schedules planned over it
    progress_bar: bool = True
    # also keep the last N epoch checkpoints (checkpoint-epochE.pt) beside checkpoint.pt
    keep_checkpoints: int = checked(0, ge=0)
    # gradient accumulation: each step's batch in this many micro-batches (small GPUs)
    accumulate_steps: int = checked(1, ge=1)


@dataclass
class EvalConfig:
    protocols: list[str] = checked(factory=lambda: ["knn", "nn"], choices=EVAL_PROTOCOLS)  # run at the end of training
    at_end: bool = True
    compare_random_init: bool = True  # also evaluate the backbone at its initialisation
    knn_k: int = checked(20, ge=1)
    knn_temperature: float = checked(0.07, gt=0)
    monitor_every_epochs: int = checked(0, ge=0)  # kNN monitor on the val split every N epochs (0: off)
    batch_size: int = checked(256, ge=1)
    # features of every protocol pooled on a g x g grid (conv backbones); None: own
    pool_grid: int | None = checked(None, ge=1)
    # protocol "linear" (selfsup.eval.linear)
    # fast: cached features, L-BFGS, wd chosen on a train hold-out | standard: augmented SGD
    linear_mode: str = checked("fast", choices=("fast", "standard"))
    # standard: moco (lr 30, 100 ep, x0.1 at 60/80) | umbc (standardise, lr 0.01, 40 ep)
    linear_recipe: str = checked("moco", choices=("moco", "umbc"))
    # standard: override the recipe's epochs (its lr milestones scale along)
    linear_epochs: int | None = checked(None, ge=1)
    linear_ten_crop: bool = False  # standard: score val with 10 crops, mean logits (SeLa)
    linear_standardize: bool = True  # fast: L2-normalise + standardise with train mean/var (UMBC) before the fit
    # fast: fraction of the train split held out to choose the weight decay
    linear_holdout: float = checked(0.2, gt=0, lt=1)
    linear_weight_decays: list[float] = checked(factory=lambda: [1e-6, 1e-5, 1e-4, 1e-3, 1e-2], ge=0)  # fast: grid
    # ViT: the probe sees the normed CLS of the last n blocks (Mugs/DINO ViT-S; capped)
    linear_vit_blocks: int = checked(4, ge=1)
    linear_vit_avgpool: bool = False  # ViT: append the mean patch token of the last block (their ViT-B, n = 1)
    # label-free protocols and pictures (selfsup.eval.retrieval, selfsup.eval.report)
    duplicate_threshold: float = checked(0.95, ge=-1, le=1)  # cosine at or above which two images are near duplicates
    retrieval_k: int = checked(8, ge=1)  # neighbours per query in the report's retrieval grid


@dataclass
class LogConfig:
    """Where a run's curves and scores go besides ``metrics.jsonl`` and ``eval.json`` (selfsup.tracking)."""

    backends: list[str] = field(default_factory=list)  # tensorboard | wandb (offline) | mlflow (local store)
    figures: bool = True  # at the end of training, also the loss / lr / monitor curves as images


@dataclass
class LauncherConfig:
    """How ``selfsup train`` starts the run: here (``local``; torchrun also counts) or as a Slurm job (submitit)."""

    name: str = checked("local", choices=("local", "slurm"))
    nodes: int = checked(1, ge=1)
    gpus_per_node: int = checked(1, ge=0)  # also the number of tasks (processes) per node (0: one CPU task)
    cpus_per_task: int = checked(10, ge=1)
    mem_gb: float | None = checked(None, gt=0)  # None: the partition's default
    time: str = "24h"  # wall-clock limit per job: 90m, 24h, or Slurm's [D-]HH:MM:SS
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    folder: str | None = None  # submitit logs and pickles (None: <run folder>/slurm)
    requeue: bool = True  # on pre-emption or time-out: checkpoint, then requeue the job, which resumes
    max_requeues: int = checked(3, ge=0)  # time-outs after which the job is not requeued again
    signal_delay_s: int = checked(120, ge=0)  # Slurm signals the job this long before its time limit


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    log: LogConfig = field(default_factory=LogConfig)
    # modules imported before the rest is read (a user's @register_method / @register_dataset / @register_backbone):
    # importable module names, e.g. [mypkg.ssl_plugins]; every process imports them (CLI, torchrun, Slurm jobs)
    imports: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def run_name(self) -> str:
        """``train.run_name``, or ``<method>-<data>-<start time>`` when it is not set."""
        return self.train.run_name or f"{self.method.name}-{self.data.name}-{datetime.now():%Y%m%d-%H%M%S}"


# ---------------------------------------------------------------------------------------------
# loading


def load_config(recipe: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build a :class:`Config` from an optional YAML recipe and dotted overrides."""
    raw: dict[str, Any] = read_yaml(recipe) if recipe is not None else {}
    return config_from_dict(apply_overrides(raw, overrides))


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """``raw`` (a config mapping: a recipe, a checkpoint's config) with the dotted ``key=value`` words applied, in
    place; returned for chaining."""
    for word in overrides or []:
        set_dotted(raw, *parse_override(word))
    return raw


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {str(path)!r} not found; recipes live in configs/ (e.g. configs/quickstart.yaml)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except UnicodeDecodeError as error:
        raise ConfigError(f"recipe {str(path)!r} is not UTF-8 text ({error.reason} at byte {error.start}); "
                          "a recipe is a YAML file") from None
    except (yaml.YAMLError, RecursionError) as error:
        raise ConfigError(f"recipe {str(path)!r} is not valid YAML: {_yaml_problem(error)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {str(path)!r} must be a mapping of sections, got {type(raw).__name__}")
    return raw


def _yaml_problem(error: Exception) -> str:
    """PyYAML's complaint and where, on one line (its own message spans several, with a snippet)."""
    mark, problem = getattr(error, "problem_mark", None), getattr(error, "problem", None) or str(error)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return " ".join(f"{problem}{where}".split())


def parse_override(word: str) -> tuple[str, Any]:
    if "=" not in word:
        raise ConfigError(f"override {word!r} must look like section.key=value (e.g. train.epochs=10)")
    key, text = word.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {word!r} has no key before '='")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    return key, value


NAMED_SECTIONS = ("method", "launcher")  # `method=msf`, `launcher=slurm`: the section's name alone


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None or not isinstance(child, dict):
            if depth == 0 and part in NAMED_SECTIONS and isinstance(child, str):
                child = {"name": child}  # method=msf earlier, method.topk=5 now
            elif child is not None:
                raise ConfigError(f"cannot set {key!r}: {'.'.join(parts[: depth + 1])!r} is not a section")
            else:
                child = {}
            node[part] = child
        node = child
    last = parts[-1]
    if len(parts) == 1 and last in NAMED_SECTIONS and isinstance(value, str):
        value = {"name": value}  # method=msf: that method with its paper defaults
    node[last] = value


def import_plugins(modules: Any) -> None:
    """Import the modules a config names under ``imports`` (by module name, on this Python's path), so that what
    they register exists before the config names it."""
    if modules is None:
        return
    if not isinstance(modules, (list, tuple)) or not all(isinstance(m, str) and m for m in modules):
        raise ConfigError(f"imports must be a list of module names, e.g. imports=[mypkg.plugins], got {modules!r}")
    for name in modules:
        if not all(part.isidentifier() for part in name.split(".")):
            raise ConfigError(f"imports: {name!r} is not a module name (a dotted Python name such as mypkg.plugins; "
                              "put a file's folder on PYTHONPATH and name the file without .py)")
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise ConfigError(f"imports: cannot import {name!r} ({error}); is its folder on PYTHONPATH?") from None


def config_from_dict(raw: dict[str, Any]) -> Config:
    raw = dict(raw)
    import_plugins(raw.get("imports"))
    method_raw = raw.pop("method", None)
    if isinstance(method_raw, str):
        method_raw = {"name": method_raw}
    if isinstance(raw.get("launcher"), str):
        raw["launcher"] = {"name": raw["launcher"]}
    cfg = _build(Config, raw, "")
    cfg.method = build_method_config(method_raw or {})
    return check_config(cfg)


def section_from_dict(cls: type[Section], raw: Any, prefix: str) -> Section:
    """One config section (e.g. ``ModelConfig`` from a backbone file's metadata), coerced and checked."""
    section = _build(cls, raw, prefix)
    check_section(section, prefix)
    return section


def build_method_config(raw: dict[str, Any]) -> MethodConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"'method' must be a mapping or a method name, got {_show(raw)}")
    name = raw.get("name", MethodConfig.name)
    return _build(METHODS[name].config, raw, "method.")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {_show(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise ConfigError(f"unknown key {prefix}{key}{did_you_mean(str(key), fields, prefix)}; "
                              f"valid keys of {prefix.rstrip('.') or 'the config'}: {', '.join(fields)}")
    kwargs = {}
    for name, value in raw.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            kwargs[name] = _build(kind, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, kind, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(value: Any, kind: Any, key: str) -> Any:
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{key} got {_show(value)}")
    if origin in (list, tuple):
        if isinstance(value, str):  # "140,180" as the seeds write it
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} expects a list, got {_show(value)} (write {key}=[a,b])")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key} expects {len(args)} values, got {len(value)}: {_show(value)}")
            return tuple(_coerce(v, a, key) for v, a in zip(value, args, strict=True))
        item = args[0] if args else Any
        coerced = [_coerce(v, item, key) for v in value]
        return tuple(coerced) if origin is tuple else coerced
    if kind is Any:
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} expects true or false, got {_show(value)}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else _bad(key, value, "an integer")
            except ValueError:
                pass
        return _bad(key, value, "an integer")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        return _bad(key, value, "a number")
    if kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        return _bad(key, value, "a string")
    raise ConfigError(f"{key}: unsupported type {kind}")


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 2, 80, 80


def _show(value: Any) -> str:
    """``repr(value)``, cut short: a recipe's aliases can nest a list exponentially deep (YAML's billion laughs)."""
    return _SHORT.repr(value)


def _bad(key: str, value: Any, expected: str) -> Any:
    raise ConfigError(f"{key} expects {expected}, got {_show(value)}")


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def save_config(cfg: Config, path: str | Path) -> None:
    try:
        Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    except OSError as error:  # a full or read-only disk: name the file (a failed write() names none)
        raise type(error)(error.errno, error.strerror, str(path)) from error
