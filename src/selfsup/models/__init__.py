"""Backbones and heads."""

from selfsup.models import resnetv2, vit  # noqa: F401  (register sela_resnet50 and the ViT backbones)
from selfsup.models.backbones import BACKBONES, build_backbone
from selfsup.models.heads import mlp

__all__ = ["BACKBONES", "build_backbone", "mlp"]
