"""Feature extraction from a frozen model over a labelled loader."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.config import ConfigError


def _model_device(model: nn.Module) -> torch.device | None:
    """The single device holding the model's tensors, or None (no tensors, or spread over several)."""
    devices = {t.device for t in model.parameters()} | {t.device for t in model.buffers()}
    return devices.pop() if len(devices) == 1 else None


@contextmanager
def _eval_on(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Run the model in eval mode on ``device``; restore its training flag and device afterwards."""
    was_training = model.training
    original = _model_device(model)
    moved = original is not None and original != device
    if moved:
        model.to(device)
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
        if moved:
            model.to(original)


def check_pool_grid(backbone: nn.Module, grid: int | None) -> None:
    """One clear error when ``eval.pool_grid`` cannot apply to ``backbone`` (the trainer checks before training)."""
    if grid is None:
        return
    if not isinstance(getattr(backbone, "avgpool", None), (nn.AdaptiveAvgPool2d, nn.AvgPool2d)):
        raise ConfigError(f"eval.pool_grid={grid} needs a backbone that pools its last feature map with an 'avgpool' "
                          f"module (resnet_mini, torchvision ResNets); {type(backbone).__name__} has none: "
                          "leave eval.pool_grid unset (null)")
    if grid < 1:
        raise ConfigError(f"eval.pool_grid must be at least 1 (or null for the backbone's own pooling), got {grid}")


@contextmanager
def pooled_on_grid(backbone: nn.Module, grid: int | None) -> Iterator[nn.Module]:
    """The backbone with its final average pooling over a ``grid`` x ``grid`` grid (flattened: ``grid``² x the
    channels), restored afterwards; ``None`` keeps its own pooling. For backbones that pool their last map with
    an ``avgpool`` module (``resnet_mini``, torchvision ResNets), as the conv-layer probes of the SSL benchmarks
    do: the spatial layout of the map stays in the features."""
    check_pool_grid(backbone, grid)
    if grid is None:
        yield backbone
        return
    own = backbone.avgpool
    backbone.avgpool = nn.AdaptiveAvgPool2d(grid)
    try:
        yield backbone
    finally:
        backbone.avgpool = own


def _split_batch(batch: object) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` or ``(images, indices, labels)`` → images and labels (first and last)."""
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise TypeError("expected batches of (images, labels) or (images, indices, labels), "
                        f"got {type(batch).__name__}")
    return batch[0], torch.as_tensor(batch[-1])


@torch.no_grad()
def extract_features(model: nn.Module, loader: Iterable, device: torch.device | str = "cpu", *,
                     normalize: bool = True, autocast_dtype: torch.dtype | None = None,
                     channels_last: bool = False, progress: bool = False,
                     keep_on_device: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed every batch of ``loader`` with ``model`` in eval mode.

    Returns float32 features (N, D) — L2-normalised rows when ``normalize`` — and int64 labels (N,), on
    the CPU unless ``keep_on_device``. Model outputs with more than two dims are flattened per sample.
    The model runs on ``device`` (moved there for the call if it lives elsewhere) and gets its training
    flag and device back afterwards. ``autocast_dtype`` (e.g. ``torch.bfloat16``) enables autocast;
    ``channels_last`` converts 4-d inputs to that memory format (the model itself is left as is).
    """
    device = torch.device(device)
    out_device = device if keep_on_device else torch.device("cpu")
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    if progress:
        from tqdm import tqdm

        loader = tqdm(loader, desc="features", leave=False)
    with _eval_on(model, device):
        for batch in loader:
            images, targets = _split_batch(batch)
            images = images.to(device, non_blocking=True)
            if channels_last and images.ndim == 4:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=device.type, dtype=autocast_dtype,
                                enabled=autocast_dtype is not None):
                out = model(images)
            out = out.flatten(1).float()
            if normalize:
                out = F.normalize(out, dim=1)
            feats.append(out.to(out_device))
            labels.append(targets.reshape(-1).to(out_device, torch.int64))
    if not feats:
        raise ValueError("the loader yielded no batches")
    return torch.cat(feats), torch.cat(labels)
