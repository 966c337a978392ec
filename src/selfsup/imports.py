"""Import the seeds' published checkpoints as selfsup backbone files (``selfsup import SRC OUT``).

Files are read with ``weights_only=True`` (:func:`selfsup.engine.checkpoint.load_checkpoint`). The one
class allowed besides tensors and containers is ``argparse.Namespace`` (the UMBC and Mugs scripts store
their args in the checkpoint). A file that needs more (e.g. AlexZaikin94/MoCo-v2's dill-pickled
``Checkpoint`` objects) is refused with an explanation; re-save its ``model.state_dict()`` where you
trust it.

Layouts, after dropping every ``module.`` path segment (DataParallel/DDP insert it before or inside the
sub-module name: ``module.encoder_q.conv1.weight``, ``encoder_q.module.conv1.weight``):

* ``moco`` (facebookresearch/moco): ``state_dict`` → ``encoder_q.*`` (target: ``encoder_k.*``); left out:
  the MLP head ``fc.0``/``fc.2``, the key encoder, ``queue``.
* ``umbc`` (ISD, MSF, BYOL-asym, CompRess): ``model`` or ``state_dict`` (or the dict itself) →
  ``encoder_q.*`` (target: ``encoder_k.*`` for ISD/BYOL, ``encoder_t.*`` for MSF); left out: the
  projector ``fc.*``, ``predict_q``, ``queue``, ``labels``.
* ``sela``, two architectures, told apart by the keys:
  - the torchvision-style ``*_pp.pth`` releases (README "Aug++", ``change_state_dict.py`` output):
    ``state_dict`` of a torchvision ResNet → that ResNet; left out: ``fc.*`` (3000 outputs) and the
    pseudo-labels ``L``/``labels``;
  - the pre-activation ResNet-50 of ``models/resnetv2.py`` (``--arch resnetv2``): the released
    ``resnet-10x3k.pth`` (a bare state dict, what ``eval_resnet.py`` loads) or a ``main.py`` checkpoint
    (``state_dict`` with ``features.module.*`` from its DataParallel, ``optimizer``, ``L``) →
    ``sela_resnet50``, keys unchanged (``features.0.weight``, ``features.2.0.bn1.weight`` …); left out: the
    heads ``top_layer0.*`` … (``top_layer.0.*`` with one head) and ``L``.
  SeLa's AlexNet files (``features.0`` with a bias, ``classifier.*``) are not handled.
* ``mugs``: ``teacher``/``student`` dicts with ``backbone.*`` keys, or a backbone-only dict (maybe under
  ``state_dict``) → timm ViT keys (``cls_token``, ``blocks.*`` …) of selfsup's ``vit_*`` backbones; left
  out: ``relation_blocks.*`` (the local-group module, outside the ViT here too) and the heads.
* ``torchvision``: a plain torchvision ResNet state dict (``state_dict``/``model``/itself); ``fc.*`` left out.

``encoder``: ``online`` (encoder_q / student) or ``target`` (key/EMA encoder / teacher); the default is
what each seed evaluates: online for MoCo and the UMBC repos, the teacher for Mugs.

These key names are read from the seeds' code (MoCo main_moco/main_lincls; UMBC train_*.py and
eval_knn.py; self-label's README and change_state_dict.py; Mugs src/model.py and
extract_backbone_weights.py); no published file could be downloaded here, so the tests check each
mapping on dicts built with the same names.
The architecture (ResNet depth/width/groups, small stem; ViT size, patch, image size) is inferred from
the tensor shapes and the result is checked key by key against a fresh model before it is written.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from selfsup.config import ConfigError, ModelConfig, check_choice
from selfsup.engine.checkpoint import CheckpointError, load_checkpoint
from selfsup.export import BackboneInfo, abbreviate, build_from_info, key_problems, save_backbone

LAYOUTS = ("auto", "moco", "umbc", "sela", "mugs", "torchvision")
ENCODERS = ("online", "target")
TRUSTED_GLOBALS = [argparse.Namespace]
_RESNETS = {(False, (2, 2, 2, 2)): "resnet18", (False, (3, 4, 6, 3)): "resnet34",
            (True, (3, 4, 6, 3)): "resnet50", (True, (3, 4, 23, 3)): "resnet101"}
RESNETV2_KEY = "features.2.0.bn1.weight"  # the first pre-activation BN of SeLa's resnetv2 (no such key elsewhere)
_VITS = {192: ("vit_tiny", 3), 384: ("vit_small", 6), 768: ("vit_base", 12), 1024: ("vit_large", 16)}  # width: heads


class ImportMismatchError(CheckpointError):
    """A file whose keys do not match the layout it was read as; the message names the key."""


@dataclass
class Imported:
    state: dict[str, torch.Tensor]  # the backbone, plain torchvision / timm keys
    layout: str
    encoder: str  # online | target | "" (single-network layouts)
    source: str  # where in the file the tensors came from, e.g. "state_dict: encoder_q.*"
    left_out: int  # tensors of the file not taken (heads, other encoder, queues ...)


@contextmanager
def _trusted_globals() -> Iterator[None]:
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if safe_globals is None:  # torch 2.4: no context manager
        torch.serialization.add_safe_globals(TRUSTED_GLOBALS)
        yield
        return
    with safe_globals(TRUSTED_GLOBALS):
        yield


def load_seed_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)``, argparse.Namespace allowed; anything needing pickle code is refused."""
    with _trusted_globals():
        return load_checkpoint(path)


def _strip_module(key: str) -> str:
    return ".".join(part for part in key.split(".") if part != "module")


def _tensors(obj: Any) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict):
        return {}
    return {_strip_module(k): v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _container(obj: dict[str, Any], names: tuple[str, ...]) -> tuple[str, dict[str, torch.Tensor]]:
    """The first of ``names`` holding tensors, else the top level itself; keys without ``module.``."""
    for name in names:
        found = _tensors(obj.get(name))
        if found:
            return name, found
    return "(top level)", _tensors(obj)


def _describe(obj: dict[str, Any]) -> str:
    top = [f"{k}" + ("{…}" if isinstance(v, dict) else "") for k, v in obj.items()]
    inner = next((list(v)[:6] for v in obj.values() if isinstance(v, dict) and v), [])
    return f"top-level keys: {abbreviate(top)}" + (f"; first keys inside: {abbreviate(inner)}" if inner else "")


def detect_layout(obj: dict[str, Any]) -> str:
    """Guess the seed layout from the keys (see the module table)."""
    if "teacher" in obj or "student" in obj:
        return "mugs"
    where, sd = _container(obj, ("state_dict", "model"))
    raw = obj.get(where, obj) if where != "(top level)" else obj
    if any(k.startswith("encoder_q.") for k in sd):
        moco = where == "state_dict" and any(str(k).startswith("module.encoder_q.") for k in raw) and not any(
            k.startswith(("predict_q.", "encoder_t.")) for k in sd)
        return "moco" if moco else "umbc"
    if "cls_token" in sd or "backbone.cls_token" in sd:
        return "mugs"
    if "conv1.weight" in sd:
        return "sela" if "fc.weight" in sd and ("L" in obj or "labels" in obj) else "torchvision"
    if RESNETV2_KEY in sd:
        return "sela"
    raise ImportMismatchError(f"cannot tell which seed wrote this file (no encoder_q.*, cls_token, conv1.weight or "
                              f"{RESNETV2_KEY} key); {_describe(obj)}. Pass the layout: one of {list(LAYOUTS[1:])}")


def _drop(state: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith(prefixes)}


def import_state_dict(obj: dict[str, Any], layout: str = "auto", encoder: str | None = None) -> Imported:
    """Map a loaded seed checkpoint to a plain backbone state dict (no file I/O, no architecture check)."""
    check_choice("layout", layout, LAYOUTS)
    if encoder is not None:
        check_choice("encoder", encoder, ENCODERS)
    if layout == "auto":
        layout = detect_layout(obj)
    total = sum(len(_tensors(v)) for v in obj.values()) + len(_tensors(obj))
    if layout in ("moco", "umbc"):
        encoder = encoder or "online"
        where, sd = _container(obj, ("state_dict", "model") if layout == "moco" else ("model", "state_dict"))
        prefixes = ("encoder_q.",) if encoder == "online" else ("encoder_k.", "encoder_t.")
        prefix = next((p for p in prefixes if any(k.startswith(p) for k in sd)), None)
        if prefix is None:
            raise ImportMismatchError(f"{layout} layout: no key starts with {' or '.join(prefixes)} in {where} "
                                      f"(module. removed); found keys: {abbreviate(sorted(sd))}")
        state = _drop({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, ("fc.",))
        source = f"{where}: {prefix}* without fc.*"
    elif layout in ("sela", "torchvision"):
        if encoder == "target":
            raise ConfigError(f"the {layout} layout holds one network; there is no target encoder")
        encoder = ""
        where, sd = _container(obj, ("state_dict", "model"))
        state = _drop(sd, ("fc.", "top_layer"))  # top_layer*: the heads of SeLa's resnetv2
        source = f"{where} without fc.*" + (", top_layer*" if RESNETV2_KEY in sd else "")
    else:  # mugs
        encoder = encoder or "target"
        if "teacher" in obj or "student" in obj:
            where = "teacher" if encoder == "target" else "student"
            sd = _tensors(obj.get(where))
            if not sd:
                raise ImportMismatchError(f"mugs layout: no tensors under {where!r}; {_describe(obj)}")
        else:  # backbone-only release: no student/teacher choice
            encoder = ""
            where, sd = _container(obj, ("state_dict", "model", "backbone"))
        if any(k.startswith("backbone.") for k in sd):
            sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
            where += ": backbone.*"
        state = _drop(sd, ("relation_blocks.", "head.", "fc."))
        source = f"{where} without relation_blocks.*"
    for key in [k for k in state if k.endswith(".running_mean")]:  # files from before torch 0.4.1 lack these
        state.setdefault(key[: -len("running_mean")] + "num_batches_tracked", torch.tensor(0))
    if not state:
        raise ImportMismatchError(f"{layout} layout: nothing left to import from {source}; {_describe(obj)}")
    return Imported(state, layout, encoder, source, total - len(state))


def _require(state: dict[str, torch.Tensor], keys: tuple[str, ...], what: str) -> None:
    for key in keys:
        if key not in state:
            raise ImportMismatchError(f"not a {what}: missing {key}; found keys: {abbreviate(sorted(state))}")


def _indices(state: dict[str, torch.Tensor], prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})


def infer_backbone(state: dict[str, torch.Tensor]) -> BackboneInfo:
    """The architecture of a plain ResNet or timm-style ViT state dict, from its keys and shapes."""
    if "cls_token" in state:
        _require(state, ("pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "norm.weight"), "ViT")
        width, patch = state["cls_token"].shape[-1], state["patch_embed.proj.weight"].shape[-1]
        if width not in _VITS:  # heads change the features but not the tensor shapes
            raise ImportMismatchError(f"a ViT of width {width} is none of ViT-T/S/B/L ({sorted(_VITS)}), so its "
                                      "number of heads cannot be read from the weights")
        name, heads = _VITS[width]
        grid = math.isqrt(state["pos_embed"].shape[1] - 1)
        model = ModelConfig(backbone=name, small_stem=False, patch_size=patch, embed_dim=width, num_heads=heads,
                            depth=_indices(state, "blocks."), vit_image_size=grid * patch)
        return BackboneInfo.from_model_config(model, width)
    if RESNETV2_KEY in state:
        return _infer_resnetv2(state)
    _require(state, ("conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "layer4.0.conv1.weight"), "ResNet")
    bottleneck = "layer1.0.conv3.weight" in state
    depths = tuple(_indices(state, f"layer{i}.") for i in range(1, 5))
    name = _RESNETS.get((bottleneck, depths))
    if name is None:
        raise ImportMismatchError(f"a ResNet with {'bottleneck' if bottleneck else 'basic'} blocks {depths} per "
                                  f"stage is none of {sorted(set(_RESNETS.values()))}")
    conv2 = state["layer1.0.conv2.weight"]
    if name == "resnet50" and conv2.shape[0] // conv2.shape[1] == 32:
        name = "resnext50_32x4d"
    elif name == "resnet50" and state["layer1.0.conv1.weight"].shape[0] == 128:
        name = "wide_resnet50_2"
    last = f"layer4.{depths[3] - 1}.{'conv3' if bottleneck else 'conv2'}.weight"
    _require(state, (last,), name)
    model = ModelConfig(backbone=name, small_stem=state["conv1.weight"].shape[-1] == 3)
    return BackboneInfo.from_model_config(model, int(state[last].shape[0]))


def _infer_resnetv2(state: dict[str, torch.Tensor]) -> BackboneInfo:
    """SeLa's pre-activation ResNet (``features.0`` stem conv, ``features.2``-``5`` stages): only the 50-layer one."""
    depths = tuple(_indices(state, f"features.{i}.") for i in range(2, 6))
    if depths != (3, 4, 6, 3) or "features.2.0.conv3.weight" not in state:
        raise ImportMismatchError(f"a pre-activation ResNet with {depths} blocks per stage: only SeLa's ResNet-50 "
                                  "(bottlenecks, (3, 4, 6, 3)) is known (sela_resnet50)")
    _require(state, ("features.0.weight", "features.5.2.conv3.weight"), "SeLa resnetv2")
    model = ModelConfig(backbone="sela_resnet50", small_stem=state["features.0.weight"].shape[-1] == 3)
    return BackboneInfo.from_model_config(model, int(state["features.5.2.conv3.weight"].shape[0]))


def check_against_model(state: dict[str, torch.Tensor], info: BackboneInfo, what: str) -> None:
    """Every key and shape of a fresh ``info`` model present in ``state``, nothing else (built on meta)."""
    with torch.device("meta"):
        expected = build_from_info(info).state_dict()
    problems = key_problems(expected, state)
    if problems:
        raise ImportMismatchError(f"{what} does not fit {info.backbone}: {problems}; "
                                  f"found keys: {abbreviate(sorted(state))}")


def import_checkpoint(src: str | Path, out: str | Path, layout: str = "auto",
                      encoder: str | None = None) -> tuple[Path, BackboneInfo, Imported]:
    """Read a seed checkpoint, map it (:func:`import_state_dict`), check it, write a backbone file."""
    src = Path(src)
    if not src.is_file():
        raise CheckpointError(f"no file at {str(src)!r}")
    obj = load_seed_checkpoint(src)
    try:
        imported = import_state_dict(obj, layout, encoder)
        info = infer_backbone(imported.state)
    except ImportMismatchError as error:
        raise ImportMismatchError(f"{src}: {error}") from None
    info.source = f"{src} ({imported.layout}, {imported.source})"
    check_against_model(imported.state, info, f"{src} ({imported.layout} layout)")
    return save_backbone(imported.state, out, info), info, imported
