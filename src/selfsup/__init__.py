"""selfsup: self-supervised visual representation learning.

Importing the package registers the built-in methods, data sets and backbones (``selfsup.registry``). The Python
API (:mod:`selfsup.api`): ``from selfsup import load_config, train, evaluate, load_backbone, embed``.
"""

__version__ = "0.1.0"

# after __version__ (the CLI reads it); importing the API registers the built-ins
from selfsup.api import RunResult, build_trainer, embed, evaluate, load_backbone, load_config, train  # noqa: E402

__all__ = ["RunResult", "__version__", "build_trainer", "embed", "evaluate", "load_backbone", "load_config", "train"]
