"""The engine's "embed the training set" service (:class:`~selfsup.methods.base.EmbedRequest`): one pass over
this process's shard of the images, batched, seeded, with the method's training view or the eval transform."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from selfsup.methods.base import Embedding, EmbedRequest
from selfsup.nn.sinkhorn import storage_device

Prepare = Callable[[tuple, torch.Generator], torch.Tensor]  # a loader batch -> the images to embed, on the device


@torch.no_grad()
def embed_shard(request: EmbedRequest, batches: Iterable, count: int, prepare: Prepare,
                device: torch.device) -> Embedding:
    """Run ``request.module`` (train or eval mode as requested, restored afterwards) over ``batches`` of
    ``(views, choices, indices, labels)``: ``count`` rows of float32 features on the storage the request names
    (the device when they fit, else host memory), and their dataset indices."""
    module: nn.Module = request.module
    generator = torch.Generator(device=device).manual_seed(request.seed)
    features: torch.Tensor | None = None
    indices = torch.empty(count, dtype=torch.long)
    was_training = module.training
    module.train(request.train_mode)
    filled = 0
    try:
        for batch in batches:
            out = module(prepare(batch, generator)).float().flatten(1)
            if features is None:
                where = storage_device(count * out.shape[1] * 4, device, request.storage)
                features = torch.empty(count, out.shape[1], device=where)
            features[filled:filled + out.shape[0]] = out
            indices[filled:filled + out.shape[0]] = batch[2]
            filled += out.shape[0]
    finally:
        module.train(was_training)
    if filled != count or features is None:
        raise RuntimeError(f"the embedding pass yielded {filled} images, expected {count}")
    return Embedding(features, indices)
