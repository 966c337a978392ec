"""Backbone files: ``selfsup export RUN OUT`` and :func:`load_backbone`.

An exported file holds nothing but the backbone's own state-dict tensors (ResNets: plain torchvision keys
``conv1.weight``, ``layer1.0.bn1.running_mean`` … and no ``fc``; ViTs: timm's ``cls_token``, ``blocks.0.*``
…; ``sela_resnet50``: the official self-label resnetv2 keys ``features.0.weight``, ``features.2.0.bn1.*`` …
and no ``top_layer*`` heads) plus a small metadata record (:class:`BackboneInfo`: backbone name, small_stem,
feature_dim, the ``model`` config section that rebuilds it, and a one-line rebuild hint).

* ``.safetensors``: the tensors, metadata in the safetensors header (``safetensors.torch.load_file`` gives
  the plain state dict);
* ``.pt`` / ``.pth``: ``{"state_dict": tensors, "selfsup": metadata}`` (loads with ``weights_only=True``).

Rebuilding without selfsup: ``net = torchvision.models.resnet50(); net.fc = torch.nn.Identity()`` loads a
non-small-stem export with ``strict=True``; a ``sela_resnet50`` export loads into the official
``models.resnetv2(num_classes=[K] * hc)`` of yukimasano/self-label with ``strict=False`` (the heads are not
in the file). A ``small_stem`` run replaced the stem, so first call
``selfsup.models.backbones.use_small_stem(net, net.conv1.out_channels)`` (3×3 stride-1 conv1, no max-pool).
:func:`load_backbone` does all of this from the metadata, loads with ``strict=True`` and returns the
module in eval mode; ``build_backbone(ModelConfig(**info.model))`` is the library call behind it.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn

from selfsup.config import Config, ConfigError, ModelConfig, config_from_dict, section_from_dict
from selfsup.engine.checkpoint import (
    CheckpointError,
    atomic_write,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from selfsup.models import BACKBONES, build_backbone  # the package import registers the ViTs and sela_resnet50
from selfsup.models.backbones import TIMM_PREFIX, is_backbone

FORMAT = "selfsup-backbone/1"
SUFFIXES = (".safetensors", ".pt", ".pth")
MAX_SAFETENSORS_HEADER = 16 << 20  # bytes of JSON: ~100 bytes per tensor, so room for 100,000+ tensors
_INFO_TYPES = {"backbone": str, "feature_dim": int, "small_stem": bool, "model": dict, "source": str}


@dataclass
class BackboneInfo:
    backbone: str  # a selfsup.models.backbones name (resnet50, resnet_mini, vit_small …)
    feature_dim: int
    small_stem: bool = False
    model: dict[str, Any] = field(default_factory=dict)  # the ModelConfig fields that rebuild it
    source: str = ""  # where the weights came from

    @classmethod
    def from_model_config(cls, model: ModelConfig, feature_dim: int, source: str = "") -> BackboneInfo:
        return cls(model.backbone, feature_dim, model.small_stem, dataclasses.asdict(model), source)

    def model_config(self) -> ModelConfig:
        """The ``model`` section this file describes, checked like any config (every field within its bounds)."""
        try:
            return section_from_dict(ModelConfig, {"backbone": self.backbone, "small_stem": self.small_stem,
                                                   **self.model}, "model.")
        except ConfigError as error:  # a field this selfsup version does not know, or a value out of bounds
            raise CheckpointError(f"its backbone metadata does not fit this selfsup version: {error}") from None

    def rebuild_hint(self) -> str:
        own = "selfsup.export.load_backbone(path), or build_backbone(ModelConfig(**info.model))"
        if self.backbone == "sela_resnet50" and not self.small_stem:  # the official key layout, not torchvision's
            return (f"{own}; or self-label's models.resnetv2(num_classes=[K] * hc).load_state_dict(state, "
                    "strict=False) (only its top_layer* heads are missing)")
        if self.backbone.startswith(TIMM_PREFIX):
            return (f"{own}; or timm.create_model({self.backbone[len(TIMM_PREFIX):]!r}, pretrained=False, "
                    "num_classes=0).load_state_dict(state)")
        if not hasattr(torchvision.models, self.backbone):  # selfsup's own (resnet_mini, ViTs ...)
            return own
        hint = f"net = torchvision.models.{self.backbone}(); net.fc = torch.nn.Identity()"
        return hint + ("; selfsup.models.backbones.use_small_stem(net, net.conv1.out_channels)"
                       if self.small_stem else "")

    def to_metadata(self) -> dict[str, str]:
        meta = {"format": FORMAT, "rebuild": self.rebuild_hint()}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            meta[f.name] = value if isinstance(value, str) else json.dumps(value)
        return meta

    @classmethod
    def from_metadata(cls, meta: Any, path: str | Path) -> BackboneInfo:
        """Parse (and type-check) the metadata record of a backbone file; its ``model`` is checked later, by
        :meth:`model_config`."""
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise CheckpointError(f"{path} is not a selfsup backbone file (metadata format {str(found)[:40]!r}, "
                                  f"expected {FORMAT!r}); write one with `selfsup export` or `selfsup import`")
        kwargs = {}
        for name, kind in _INFO_TYPES.items():
            if name not in meta:
                continue
            try:
                value = meta[name] if kind is str else json.loads(meta[name])
            except (TypeError, ValueError, RecursionError):
                value = None
            if type(value) is not kind:  # bool is no int here, nor int a bool
                raise CheckpointError(f"{path}: its metadata field {name!r} is not a {kind.__name__} "
                                      f"({str(meta[name])[:60]!r}); the file is corrupt or was not written by selfsup")
            kwargs[name] = value
        if "backbone" not in kwargs or "feature_dim" not in kwargs:
            raise CheckpointError(f"{path}: its metadata lacks 'backbone' or 'feature_dim'; the file is corrupt")
        return cls(**kwargs)


def _check_suffix(path: Path) -> None:
    if path.suffix not in SUFFIXES:
        raise ConfigError(f"{path}: the output must end in {', '.join(SUFFIXES)} (it picks the file format)")


def save_backbone(state: dict[str, torch.Tensor], path: str | Path, info: BackboneInfo) -> Path:
    """Write ``state`` (a backbone state dict) and ``info``; the format follows the suffix. Atomic."""
    path = Path(path)
    _check_suffix(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    if path.suffix != ".safetensors":
        return save_checkpoint({"state_dict": tensors, "selfsup": info.to_metadata()}, path)
    from safetensors.torch import save

    # safetensors' own save_file creates files readable by the owner only: write the bytes ourselves
    return atomic_write(path, lambda handle: handle.write(save(tensors, metadata=info.to_metadata())))


def read_backbone(path: str | Path, state: dict | None = None) -> tuple[dict[str, torch.Tensor], BackboneInfo]:
    """The tensors and :class:`BackboneInfo` of a file written by :func:`save_backbone` (``state``: the ``.pt``
    file's contents, when the caller has already loaded them)."""
    path = Path(path)
    _check_suffix(path)
    if not path.is_file():
        raise CheckpointError(f"no backbone file at {str(path)!r}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        check_safetensors_header(path)
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (no __iter__)
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from None
    else:
        state = state if state is not None else load_checkpoint(path)
        if "state_dict" not in state or "selfsup" not in state:
            raise CheckpointError(f"{path} has no 'state_dict'/'selfsup' entries: not a selfsup backbone file "
                                  f"(found {abbreviate(sorted(map(str, state)))}); for a seed's checkpoint use "
                                  "`selfsup import`")
        tensors, meta = state["state_dict"], state["selfsup"]
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise CheckpointError(f"{path}: its 'state_dict' is not a mapping of names to tensors")
    info = BackboneInfo.from_metadata(meta, path)
    check_fits(tensors, info, path)
    return tensors, info


def check_safetensors_header(path: Path) -> None:
    """The 8-byte header length of a safetensors file, against the file size and a sane bound, before any parsing."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        length = handle.read(8)
    if len(length) < 8:
        raise CheckpointError(f"{path} is not a readable safetensors file: {size} bytes, too short for its header")
    (header,) = struct.unpack("<Q", length)
    if header > size - 8 or header > MAX_SAFETENSORS_HEADER:
        bound = "the whole file holds" if header > size - 8 else "a header needs"
        raise CheckpointError(f"{path} is not a readable safetensors file: its header claims {header} bytes, "
                              f"more than {bound} ({size} bytes; corrupt file)")


def check_fits(tensors: dict[str, torch.Tensor], info: BackboneInfo, path: str | Path) -> None:
    """Refuse metadata that does not describe the file's own tensors before any real model is built: the config
    is checked against its bounds, then the model is laid out on the meta device (no memory) and its keys and
    shapes compared with the file's, so the model built afterwards is no larger than the file."""
    try:
        model = info.model_config()
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None
    try:
        with torch.device("meta"):
            expected = build_from_info(info).state_dict()
    except (RuntimeError, NotImplementedError):  # a builder that needs real tensor values: bounds only
        return
    problems = key_problems(expected, tensors)
    if problems:
        raise CheckpointError(f"{path} does not fit the {model.backbone} its metadata describes: {problems}")


def build_from_info(info: BackboneInfo) -> nn.Module:
    """A freshly initialised module with the architecture ``info`` describes (on the default device)."""
    model = info.model_config()
    if not is_backbone(model.backbone):
        raise CheckpointError(f"backbone {model.backbone!r} is not in this selfsup version's registry "
                              f"({', '.join(sorted(BACKBONES))})")
    return build_backbone(model)[0]


def key_problems(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str:
    """What keeps ``state`` from loading strictly where ``expected`` (a model's state dict) is wanted; "" if nothing."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    return "; ".join(f"{label} {abbreviate(keys)}" for label, keys in
                     (("missing", missing), ("unexpected", unexpected), ("shape (file vs model)", shapes)) if keys)


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(strict=True)`` with one error naming the missing, unexpected or mis-shaped keys."""
    problems = key_problems(module.state_dict(), state)
    if problems:
        raise CheckpointError(f"{what}: {problems}")
    module.load_state_dict(state, strict=True)


def abbreviate(items: list[str], n: int = 6) -> str:
    """The first ``n`` items, comma-separated, and how many there are in all."""
    return ", ".join(items[:n]) + (f" … ({len(items)} in all)" if len(items) > n else "")


def load_backbone(path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild the backbone an exported/imported file describes, load it with ``strict=True``, eval mode."""
    state, info = read_backbone(path)
    module = build_from_info(info)
    load_strict(module, state, f"{path} does not fit {info.backbone}")
    return module.to(device).eval()


def _backbone_prefix(cfg: Config) -> str:
    """Key prefix of ``method.backbone`` inside the method's state dict (``encoder_q.backbone.`` for MoCo).

    The method is built (placeholder data sizes; on the meta device when it allows) to find the module by
    identity, so no data set is needed.
    """
    from selfsup.engine.trainer import method_for

    try:
        with torch.device("meta"):
            method = method_for(cfg, 1 << 16, 1000)
    except (RuntimeError, NotImplementedError):  # a method whose construction needs real tensor values
        method = method_for(cfg, 1 << 16, 1000)
    backbone = method.backbone
    name = next(n for n, m in method.named_modules() if m is backbone)
    return f"{name}." if name else ""


def export_run(checkpoint: str | Path, out: str | Path) -> tuple[Path, BackboneInfo]:
    """Write the backbone of a selfsup run (a run folder or its checkpoint) to ``out``."""
    out = Path(out)
    _check_suffix(out)
    path = resolve_checkpoint(checkpoint)
    state = load_checkpoint(path)
    if "config" not in state or "method" not in state:
        raise CheckpointError(f"{path} has no 'config'/'method' entries: not a selfsup run checkpoint "
                              "(for a seed's published checkpoint use `selfsup import`)")
    cfg = config_from_dict(state["config"])
    module, feature_dim, tensors = run_backbone(state, cfg, path)
    info = BackboneInfo.from_model_config(cfg.model, feature_dim,
                                          f"{path} (epoch {state.get('epoch')}, step {state.get('step')})")
    return save_backbone(tensors, out, info), info


def run_backbone(state: dict[str, Any], cfg: Config, path: str | Path
                 ) -> tuple[nn.Module, int, dict[str, torch.Tensor]]:
    """(the backbone with its trained weights, its feature width, its tensors) of a run checkpoint's ``state``, from
    the checkpoint alone (no data set): the method's backbone keys, strictly loaded (complete and consistent)."""
    prefix = _backbone_prefix(cfg)
    tensors = {k[len(prefix):]: v for k, v in state["method"].items() if k.startswith(prefix)}
    module, feature_dim = build_backbone(cfg.model)
    load_strict(module, tensors, f"{path}: the backbone under {prefix!r}")
    return module, feature_dim, tensors


# ---------------------------------------------------------------------------------------------
# SeLa: the released-model layout and the pseudo-labels


def export_torchvision(method: nn.Module, head: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A torchvision ResNet state dict with SeLa's head ``head`` as its ``fc``, and that head's pseudo-labels, as the
    seed's released models: ``torchvision.models.resnet50(num_classes=K).load_state_dict(state)``."""
    backbone = method.backbone
    if not isinstance(backbone, torchvision.models.ResNet):
        raise ValueError(f"export_torchvision needs a torchvision ResNet backbone, got {type(backbone).__name__}")
    if backbone.conv1.kernel_size != (7, 7):
        raise ValueError("this backbone has the small-image stem (model.small_stem=true): torchvision's ResNet "
                         "has a 7x7 conv1 and a max-pool, so the weights would not load")
    state = {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}
    layer = method.heads[head]
    state["fc.weight"] = layer.weight.detach().cpu().clone()
    state["fc.bias"] = layer.bias.detach().cpu().clone()
    return state, method.labels[head].detach().cpu().clone()


@dataclass
class LabelExport:
    path: Path  # the written CSV or JSON file
    scores: dict[str, dict[str, float]] | None  # pseudo_label_scores vs the true labels (None: no labels known)


LabelScorer = Callable[[np.ndarray, np.ndarray], dict[str, dict[str, float]]]  # (heads x N labels, targets) -> scores


def export_labels(checkpoint_path: str | Path, out_path: str | Path, score: LabelScorer | None = None) -> LabelExport:
    """Write a SeLa run's pseudo-labels: dataset index (and image: its path for folder data sets,
    ``ImageDataset.describe``) → label per head. ``.csv`` gives columns index,image,head0..; anything else JSON
    (which also holds the scores). Where the training set can be read and has class labels, ``score`` (e.g.
    :func:`selfsup.eval.clustering.pseudo_label_scores`, as ``selfsup labels`` passes) scores them against those."""
    from selfsup.data.datasets import build_dataset

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
            if score is not None and (targets >= 0).any():
                scores = score(labels, targets)
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
