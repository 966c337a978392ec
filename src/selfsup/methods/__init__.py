"""Methods: one file each. Importing this package registers them."""

from selfsup.methods import byol, isd, moco, msf, mugs, sela  # noqa: F401  (registration)
from selfsup.methods.base import (
    Batch,
    Embedding,
    EmbedRequest,
    Method,
    ParamGroup,
    Progress,
    RunInfo,
    StepOutput,
    build_method,
    register_method,
)
from selfsup.registry import METHODS

__all__ = ["METHODS", "Batch", "EmbedRequest", "Embedding", "Method", "ParamGroup", "Progress", "RunInfo",
           "StepOutput", "build_method", "register_method"]
