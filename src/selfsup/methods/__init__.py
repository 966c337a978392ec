"""Methods: one file each. Importing this package registers them."""

from selfsup.methods import byol, isd, moco, msf, mugs, sela  # noqa: F401  (registration)
from selfsup.methods.base import METHODS, DataInfo, Method, StepOutput, build_method

__all__ = ["METHODS", "DataInfo", "Method", "StepOutput", "build_method"]
