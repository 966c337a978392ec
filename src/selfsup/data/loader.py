"""Multi-view samples and a deterministic, resumable sampler.

Every sample's augmentation is seeded from (run seed, epoch, position), so the data a step sees
depends on nothing but the step: the same with 0 or 8 workers, and the same after a resume.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler
from torchvision.transforms.functional import pil_to_tensor


class MultiView:
    """One transform per view, each applied to the same image: ``image -> [view_0, view_1, ...]``."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, image) -> list[torch.Tensor]:
        return [transform(image) for transform in self.transforms]


Choices = dict[str, torch.Tensor]  # per-image draws of a view layout (e.g. Mugs: were the student's globals weak?)


class ViewDataset(Dataset):
    """``(views, choices, index, label)`` samples: ``make_views(image)`` gives the list of views of one image
    (a :class:`MultiView`), or a ``(views, choices)`` pair (a method's own multi-crop producer).

    Keys are ``(index, seed)`` pairs from :class:`EpochSampler`; the views draw from torch's RNG
    reseeded with ``seed`` (the caller's RNG is left untouched).
    """

    def __init__(self, base: Dataset, make_views: Callable[..., list[torch.Tensor]], *, lazy: bool = False):
        self.base = base
        self.make_views = make_views
        self.lazy = lazy  # hand make_views a lazily opened image (ImageDataset.open) it decodes itself

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> tuple[list[torch.Tensor], Choices, int, int]:
        index, seed = key
        opener = getattr(self.base, "open", None) if self.lazy else None
        image, label = opener(index) if opener is not None else self.base[index]
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # the CPU generator only: no lazy CUDA seeding per sample
            views = self.make_views(image)
        views, choices = views if isinstance(views, tuple) else (views, {})
        return views, choices, index, label


class ImageTensorDataset(Dataset):
    """``(uint8 image tensor (C, H, W), {}, index, label)`` for augmentation on the training device
    (``data.augment=batch``); keys are ``(index, seed)`` from :class:`EpochSampler` (the seed is unused)."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, Choices, int, int]:
        index, _ = key
        image, label = self.base[index]
        return pil_to_tensor(image), {}, index, label


class EvalDataset(Dataset):
    """``(image, label)`` with a deterministic transform, for feature extraction."""

    def __init__(self, base: Dataset, transform: Callable):
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[index]
        return self.transform(image), label


class EpochSampler(Sampler[tuple[int, int]]):
    """Shuffles ``num_samples`` indices per epoch from (seed, epoch) and gives each rank its share of
    every global batch, starting at ``start_batch`` (mid-epoch resume). Yields ``(index, sample_seed)``.
    """

    def __init__(self, num_samples: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True, shuffle: bool = True):
        self.num_samples = num_samples
        self.batch_size = batch_size  # per rank
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.shuffle = shuffle
        self.epoch = 0
        self.start_batch = 0
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{num_samples} training images cannot fill one global batch of "
                f"{batch_size * world_size}; lower train.batch_size or set train.drop_last=false"
            )

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.num_samples, self.global_batch)
        return full + (1 if rest and not self.drop_last else 0)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def _order(self) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator) if self.shuffle else torch.arange(
            self.num_samples)
        seeds = torch.randint(0, 2**62, (self.num_samples,), generator=generator)
        return order, seeds

    def _positions(self, batch: int) -> range:
        """The positions of global batch ``batch`` in the epoch's order that this rank loads (its share)."""
        start = batch * self.global_batch
        stop = min(start + self.global_batch, self.num_samples)
        share = -(-(stop - start) // self.world_size)
        lo = start + self.rank * share
        return range(lo, min(lo + share, stop))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order, seeds = self._order()
        for batch in range(self.start_batch, self.batches_per_epoch):
            for position in self._positions(batch):
                yield int(order[position]), int(seeds[position])

    def __len__(self) -> int:
        """The number of samples this rank yields in the epoch (from ``start_batch`` on)."""
        return sum(len(self._positions(batch)) for batch in range(self.start_batch, self.batches_per_epoch))
