"""selfsup: self-supervised visual representation learning.

Importing the package registers the built-in methods, data sets and backbones (``selfsup.registry``). The Python
API (:mod:`selfsup.api`): ``from selfsup import load_config, train, evaluate, load_backbone, embed``.
"""

from selfsup.api import (  # registers the built-ins
    RunResult,
    build_trainer,
    embed,
    evaluate,
    load_backbone,
    load_config,
    train,
)
from selfsup.version import __version__

__all__ = ["RunResult", "__version__", "build_trainer", "embed", "evaluate", "load_backbone", "load_config", "train"]
