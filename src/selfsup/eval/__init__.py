"""Evaluation of frozen backbones."""
