"""Methods: one file each. Importing this package registers them."""

from selfsup.methods import byol, moco  # noqa: F401  (registration)
from selfsup.methods.base import METHODS, DataInfo, Method, StepOutput, build_method

__all__ = ["METHODS", "DataInfo", "Method", "StepOutput", "build_method"]
