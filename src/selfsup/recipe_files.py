"""The packaged recipes (``src/selfsup/configs/*.yaml``), found by name or path: shared by the CLI and the Python
API, so ``selfsup train quickstart`` and ``selfsup.load_config("quickstart")`` read the same file."""

from __future__ import annotations

from pathlib import Path

from selfsup.errors import ConfigError

RECIPES = Path(__file__).parent / "configs"


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def find_recipe(word: str | Path) -> Path:
    """A YAML path, or the bare name of a packaged recipe (``quickstart``, ``msf_resnet50_imagenet``)."""
    path = Path(word)
    if path.is_file():
        return path
    name = str(word)
    packaged = RECIPES / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    if packaged.is_file():
        return packaged
    packaged = RECIPES / path.name
    if packaged.is_file():
        return packaged
    raise ConfigError(f"recipe {name!r} not found; give a YAML path or one of: {', '.join(recipe_names())}")
