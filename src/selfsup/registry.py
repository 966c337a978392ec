"""Name → object registries: the methods, data sets and backbones a recipe can name.

One :class:`Registry` per kind; each entry is declared once, by a decorator next to its definition
(``@register_method``, ``@register_dataset``, ``@register_backbone``). A user's own module registers
its entries the same way; naming it under ``imports:`` in a recipe imports it before the config is read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from selfsup.errors import ConfigError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries by name; looking up an unknown name is one :class:`ConfigError` naming ``key`` and the nearest name."""

    def __init__(self, kind: str, key: str):
        self.kind = kind  # e.g. "method"
        self.key = key  # the config key that names an entry, e.g. "method.name"
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@registry.register("name")`` adds the decorated object under ``name``."""

        def add(entry: T) -> T:
            self.add(name, entry)
            return entry

        return add

    def add(self, name: str, entry: T) -> None:
        if not name or not isinstance(name, str):
            raise ValueError(f"a {self.kind} needs a non-empty name, got {name!r}")
        self._entries[name] = entry  # re-registering a name replaces it (a reloaded plugin module)

    def __getitem__(self, name: str) -> T:
        if name not in self._entries:
            raise ConfigError(f"{self.key}={name!r} is not a {self.kind}{did_you_mean(str(name), self._entries)}; "
                              f"choose one of {sorted(self._entries)}")
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return sorted(self._entries)


METHODS: Registry = Registry("method", "method.name")  # name -> selfsup.methods.base.MethodEntry
DATASETS: Registry = Registry("data set", "data.name")  # name -> builder(DataConfig, split) -> ImageDataset
BACKBONES: Registry = Registry("backbone", "model.backbone")  # name -> builder(ModelConfig) -> (module, width)
