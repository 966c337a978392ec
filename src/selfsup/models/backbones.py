"""Backbone registry: torchvision ResNets (with an optional small-image stem) and a tiny CPU ResNet.

``build_backbone(name, ...)`` returns ``(module, feature_dim)``; the module maps images to pooled
features (its classifier replaced by ``Identity``), and its parameter names are the library's own, so
an exported state dict loads into the plain torchvision model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision import models as tv
from torchvision.models.resnet import BasicBlock

from selfsup.config import ModelConfig, check_choice

BackboneBuilder = Callable[[ModelConfig], tuple[nn.Module, int]]
BACKBONES: dict[str, BackboneBuilder] = {}


def register_backbone(name: str) -> Callable[[BackboneBuilder], BackboneBuilder]:
    def wrap(builder: BackboneBuilder) -> BackboneBuilder:
        BACKBONES[name] = builder
        return builder

    return wrap


def build_backbone(cfg: ModelConfig) -> tuple[nn.Module, int]:
    """The encoder named by ``cfg.backbone`` and the width of its pooled features."""
    check_choice("model.backbone", cfg.backbone, BACKBONES)
    return BACKBONES[cfg.backbone](cfg)


def use_small_stem(net: nn.Module, stem_width: int) -> None:
    """CIFAR stem: 3x3 stride-1 first conv and no max-pool, for 32-px-ish images."""
    net.conv1 = nn.Conv2d(3, stem_width, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.maxpool = nn.Identity()


def _torchvision_resnet(factory: Callable[..., tv.ResNet]) -> BackboneBuilder:
    def build(cfg: ModelConfig) -> tuple[nn.Module, int]:
        net = factory(weights=None, zero_init_residual=cfg.zero_init_residual)
        feature_dim = net.fc.in_features
        net.fc = nn.Identity()
        if cfg.small_stem:
            use_small_stem(net, net.conv1.out_channels)
        return net, feature_dim

    return build


for _name, _factory in {
    "resnet18": tv.resnet18,
    "resnet34": tv.resnet34,
    "resnet50": tv.resnet50,
    "resnet101": tv.resnet101,
    "resnext50_32x4d": tv.resnext50_32x4d,
    "wide_resnet50_2": tv.wide_resnet50_2,
}.items():
    register_backbone(_name)(_torchvision_resnet(_factory))


class ResNetMini(nn.Module):
    """A small ResNet for CPU runs and tests: stem, one BasicBlock per stage, adaptive pooling.

    Named like torchvision's ResNet (conv1/bn1/layer1..), widths configurable (default 16/32/64).
    """

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), blocks: int = 1, small_stem: bool = True):
        super().__init__()
        stem = widths[0]
        if small_stem:
            self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, stem, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        stages, in_width = [], stem
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers = []
            for b in range(blocks):
                downsample = None
                if b == 0 and (stride != 1 or in_width != width):
                    downsample = nn.Sequential(
                        nn.Conv2d(in_width, width, 1, stride, bias=False), nn.BatchNorm2d(width)
                    )
                layers.append(BasicBlock(in_width, width, stride if b == 0 else 1, downsample))
                in_width = width
            stages.append(nn.Sequential(*layers))
        self.layers = nn.ModuleList(stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = in_width
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in self.layers:
            x = stage(x)
        return torch.flatten(self.avgpool(x), 1)


@register_backbone("resnet_mini")
def _resnet_mini(cfg: ModelConfig) -> tuple[nn.Module, int]:
    net = ResNetMini((16, 32, 64), blocks=1, small_stem=cfg.small_stem)
    return net, net.feature_dim


@register_backbone("resnet_mini_wide")
def _resnet_mini_wide(cfg: ModelConfig) -> tuple[nn.Module, int]:
    net = ResNetMini((32, 64, 128), blocks=1, small_stem=cfg.small_stem)
    return net, net.feature_dim
