"""SplitBatchNorm: the per-GPU BatchNorm of a multi-GPU run, on one device (``model.bn_splits``).

The seeds trained on several GPUs with per-GPU BatchNorm: MoCo-v2 on 8 (DDP, 32 images per GPU), the UMBC
repos (BYOL-asym, ISD, MSF) on 2-4 through ``nn.DataParallel``, SeLa's ResNet-50 on 4. Each GPU normalised its
own sub-batch, so the batch statistics are noisier than one BatchNorm over the whole batch, and MoCo's
ShuffleBN relies on it. The MoCo CIFAR demo (facebookresearch/moco, ``colab/moco_cifar10_demo.ipynb``,
``SplitBatchNorm``, ``--bn-splits 8`` by default) emulates it on one GPU; this module does the same:

* **Training** (or no running statistics): the batch of B samples is cut into N sub-batches of B/N and each is
  normalised with its own mean and biased variance, exactly as N separate BatchNorms on the sub-batches. As in
  the demo, sub-batch ``s`` holds samples ``s, s+N, s+2N, …`` (the demo reshapes (B, C, …) to (B/N, N·C, …),
  which needs no copy for a contiguous tensor); the loader's order is random, so which samples share a split
  does not matter, only that the key batch is permuted (below).
* **Running statistics**, as the demo: every split starts from the current running mean/var and takes its
  own momentum step with its mean and *unbiased* variance; the buffers become the mean of the N results, i.e.
  ``running ← (1 − m)·running + m·mean_s(stat_s)``. (A multi-GPU run keeps rank 0's: DDP broadcasts rank 0's
  buffers, DataParallel keeps GPU 0's replica; both estimate the same quantity, the mean over splits with less
  noise.) ``num_batches_tracked`` counts forward passes like ``nn.BatchNorm*d`` (the demo leaves it at 0; it
  only matters with ``momentum=None``, a cumulative average, where it is used as BatchNorm uses it).
* **Eval** with running statistics: plain BatchNorm. The parameters and buffers are ``nn.BatchNorm*d``'s
  (``weight, bias, running_mean, running_var, num_batches_tracked``) and the classes subclass them, so state
  dicts, exports and ``isinstance`` checks see ordinary BatchNorm.

``SplitBatchNorm1d`` covers the heads: the UMBC projectors/predictors (Linear-BN1d-ReLU) were per-GPU too
under ``DataParallel``, so a faithful emulation splits them with the encoder.

How a method uses it (``bn_splits = cfg.model.bn_splits``):

1. ``apply_bn_splits(module, bn_splits)`` on every network whose BatchNorm was per GPU in the seed: the
   backbone *and* the heads with BatchNorm (BYOL/ISD+/MSF projector and predictor), before the EMA/key copy is
   made (a deep copy keeps the split layers) or on both copies.
2. With one process (``world_size == 1``) and ``bn_splits > 1``, permute the key/target batch with
   :func:`split_shuffle` before the key/target encoder and restore the order of its outputs with
   :func:`split_unshuffle` (in place of ``nn.distributed.batch_shuffle``/``batch_unshuffle``, which are a
   no-op on one process). Otherwise split ``s`` of the key encoder would normalise the same images as split
   ``s`` of the query encoder, the "cheating" ShuffleBN prevents. With several processes the cross-rank
   shuffle already randomises every split.
3. Every training batch must divide into the splits (``train.batch_size / world_size`` a multiple of
   ``bn_splits``): :func:`check_bn_splits` says so before training. A batch that does not divide (the last
   batch of a pass that keeps every image, e.g. SeLa's label pass) is cut into contiguous chunks of nearly
   equal sizes, as ``DataParallel`` scatters it. ``bn_splits`` and ``train.sync_bn`` exclude each other
   (SyncBatchNorm would replace the split layers).

The trainer does 1 and 3 for ``model.bn_splits`` (the whole method: encoders and heads), and
:class:`selfsup.nn.online_target.OnlineTarget` does 2 (:func:`bn_splits_of` tells it the splits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BatchSplitError(ValueError):
    """A training batch that does not divide into ``model.bn_splits`` sub-batches."""


def _split_error(batch: int, splits: int) -> BatchSplitError:
    return BatchSplitError(
        f"model.bn_splits={splits} needs every training batch to divide into {splits} equal sub-batches, got a "
        f"batch of {batch}: use a per-process batch size (train.batch_size / processes) that is a multiple of "
        f"{splits} with train.drop_last=true, or another model.bn_splits")


def _checked(splits: int) -> int:
    if isinstance(splits, bool) or not isinstance(splits, int) or splits < 1:
        raise ValueError(f"model.bn_splits must be a whole number >= 1, got {splits!r}")
    return splits


class _SplitBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Shared forward of :class:`SplitBatchNorm1d` / :class:`SplitBatchNorm2d` (see the module docstring)."""

    splits: int

    def _init_splits(self, splits: int) -> None:
        self.splits = _checked(splits)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, splits={self.splits}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        uses_batch_stats = self.training or self.running_mean is None
        if self.splits == 1 or not uses_batch_stats:
            return super().forward(x)
        self._check_input_dim(x)
        batch, channels = x.shape[0], x.shape[1]
        update = self.training and self.track_running_stats
        momentum = 0.0 if self.momentum is None else self.momentum
        if update:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as nn.BatchNorm
                momentum = 1.0 / float(self.num_batches_tracked)
        if batch % self.splits:
            return self._uneven_forward(x, update, momentum)
        # sample i goes to split i % N: (B, C, ...) -> (B/N, N·C, ...), channel block s = split s
        grouped = x.reshape(batch // self.splits, self.splits * channels, *x.shape[2:])
        split_mean = self.running_mean.repeat(self.splits) if update else None
        split_var = self.running_var.repeat(self.splits) if update else None
        weight = self.weight.repeat(self.splits) if self.weight is not None else None
        bias = self.bias.repeat(self.splits) if self.bias is not None else None
        out = F.batch_norm(grouped, split_mean, split_var, weight, bias, True, momentum, self.eps)
        if update:  # each split took its own momentum step from the same start: keep their mean
            self.running_mean.copy_(split_mean.view(self.splits, channels).mean(dim=0))
            self.running_var.copy_(split_var.view(self.splits, channels).mean(dim=0))
        return out.reshape(x.shape)

    def _uneven_forward(self, x: torch.Tensor, update: bool, momentum: float) -> torch.Tensor:
        """A batch that does not divide into the splits (the last batch of a pass over a data set that keeps every
        image, e.g. SeLa's label pass): contiguous chunks of nearly equal sizes, as ``DataParallel`` scatters such a
        batch over its GPUs, each normalised with its own statistics; running statistics as above."""
        means, variances, outs = [], [], []
        for chunk in torch.tensor_split(x, min(self.splits, x.shape[0])):
            mean = self.running_mean.clone() if update else None
            var = self.running_var.clone() if update else None
            outs.append(F.batch_norm(chunk, mean, var, self.weight, self.bias, True, momentum, self.eps))
            means.append(mean)
            variances.append(var)
        if update:
            self.running_mean.copy_(torch.stack(means).mean(dim=0))
            self.running_var.copy_(torch.stack(variances).mean(dim=0))
        return torch.cat(outs)


def bn_splits_of(module: nn.Module) -> int:
    """The number of splits of ``module``'s split BatchNorm layers (1 when it has none): how many sub-batches a
    key/target batch must be shuffled across before it."""
    return max((m.splits for m in module.modules() if isinstance(m, _SplitBatchNorm)), default=1)


class SplitBatchNorm1d(_SplitBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` whose training statistics are those of ``splits`` sub-batches ((B, C) or (B, C, L))."""

    def __init__(self, num_features: int, splits: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self._init_splits(splits)


class SplitBatchNorm2d(_SplitBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training statistics are those of ``splits`` sub-batches (the MoCo demo's)."""

    def __init__(self, num_features: int, splits: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self._init_splits(splits)


_SPLIT_CLASS: dict[type[nn.Module], type[_SplitBatchNorm]] = {
    nn.BatchNorm1d: SplitBatchNorm1d, nn.BatchNorm2d: SplitBatchNorm2d,
    SplitBatchNorm1d: SplitBatchNorm1d, SplitBatchNorm2d: SplitBatchNorm2d,
}


def _as_split(bn: nn.modules.batchnorm._BatchNorm, splits: int) -> _SplitBatchNorm:
    """A split layer sharing ``bn``'s parameter and buffer tensors (an optimizer holding them stays valid)."""
    split = _SPLIT_CLASS[type(bn)](bn.num_features, splits, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                                   track_running_stats=bn.track_running_stats, device="meta")
    for name, tensor in (*bn._parameters.items(), *bn._buffers.items()):  # None where bn has none (bias=False)
        setattr(split, name, tensor)
    return split.train(bn.training)


def convert_split_bn(module: nn.Module, splits: int) -> nn.Module:
    """Replace every ``nn.BatchNorm1d``/``nn.BatchNorm2d`` in ``module`` (itself included) by its split version
    with the same parameters and buffers (the same tensors, not copies); split layers get the new ``splits``.
    Subclasses such as ``SyncBatchNorm`` are left alone. ``splits=1`` returns ``module`` unchanged."""
    if _checked(splits) == 1:
        return module
    if type(module) in _SPLIT_CLASS:
        return _as_split(module, splits)
    for name, child in module.named_children():
        converted = convert_split_bn(child, splits)
        if converted is not child:
            setattr(module, name, converted)
    return module


def apply_bn_splits(module: nn.Module, splits: int) -> nn.Module:
    """What a method calls with ``cfg.model.bn_splits`` on a network whose BatchNorm was per GPU in the seed
    (the backbone; a head with BatchNorm): :func:`convert_split_bn`, refusing ``splits > 1`` on a network
    without any ``BatchNorm1d/2d`` (a ViT), where the option would silently do nothing."""
    if splits != 1 and not any(type(m) in _SPLIT_CLASS for m in module.modules()):
        raise ValueError(f"model.bn_splits={splits}: {type(module).__name__} has no BatchNorm1d/2d layer to split; "
                         "set model.bn_splits=1")
    return convert_split_bn(module, splits)


def check_bn_splits(splits: int, batch_size: int, world_size: int = 1, sync_bn: bool = False) -> None:
    """Before training: ``model.bn_splits`` divides the per-process batch (``batch_size`` is the total over
    ``world_size`` processes) and is not combined with ``train.sync_bn``."""
    if _checked(splits) == 1:
        return
    if sync_bn:
        raise ValueError(f"model.bn_splits={splits} emulates per-GPU BatchNorm and train.sync_bn=true synchronises "
                         "it across processes: choose one (SyncBatchNorm would replace the split layers)")
    per_process = batch_size // world_size
    if batch_size % world_size or per_process % splits:
        raise _split_error(per_process, splits)


def split_shuffle(x: torch.Tensor, splits: int,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ShuffleBN on one process: ``x`` in a uniformly random order (dim 0) and the inverse permutation.

    The key/target encoder then normalises each split over a random subset of the batch, not the samples the
    query encoder's split of the same index holds, as MoCo's cross-GPU shuffle does. ``splits=1`` returns
    ``x`` itself and the identity (no random numbers drawn). ``generator`` draws the permutation (on its own
    device; by default torch's generator of ``x``'s device). Undo with :func:`split_unshuffle`.
    """
    batch = x.shape[0]
    if splits == 1:
        return x, torch.arange(batch, device=x.device)
    device = generator.device if generator is not None else x.device
    permutation = torch.randperm(batch, generator=generator, device=device).to(x.device)
    return x[permutation], torch.argsort(permutation)


def split_unshuffle(y: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """The outputs for the shuffled batch back in the original order: ``split_unshuffle(f(x[p]), inv) == f(x)``
    row for row when ``f`` treats rows independently."""
    return y[inverse]
