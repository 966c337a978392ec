"""The errors a user can fix (a recipe, an override, a file), and their one-line wording helpers."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConfigError(ValueError):
    """A recipe, override or argument that does not fit: the message names the key and the fix."""


class ImageLoadError(RuntimeError):
    """An image file that PIL cannot open or decode (the message names the file)."""


def did_you_mean(word: str, choices: Iterable[str], prefix: str = "") -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {prefix + close[0]!r}?)" if close else ""


def check_choice(key: str, value: str, choices: Iterable[str]) -> None:
    """Raise one clear error when ``value`` is not among ``choices``."""
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid{did_you_mean(str(value), choices)}; choose one of {choices}")
