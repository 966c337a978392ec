"""selfsup: self-supervised visual representation learning.

Importing the package registers the built-in methods, data sets and backbones (``selfsup.registry``).
"""

__version__ = "0.1.0"

from selfsup.api import build_trainer, train  # noqa: E402  (after __version__: registers the built-ins)
from selfsup.config import load_config  # noqa: E402

__all__ = ["__version__", "build_trainer", "load_config", "train"]
