"""Backbones and heads."""

from selfsup.models import vit  # noqa: F401  (registers the ViT backbones)
from selfsup.models.backbones import BACKBONES, build_backbone
from selfsup.models.heads import mlp

__all__ = ["BACKBONES", "build_backbone", "mlp"]
