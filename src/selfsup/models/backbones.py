"""Backbone registry: torchvision ResNets (with an optional small-image stem), a tiny CPU ResNet, SeLa's AlexNet,
and ``timm:<name>`` for any timm model.

``build_backbone(name, ...)`` returns ``(module, feature_dim)``; the module maps images to pooled
features (its classifier replaced by ``Identity``), and its parameter names are the library's own, so
an exported state dict loads into the plain torchvision model.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from torchvision import models as tv
from torchvision.models.resnet import BasicBlock

from selfsup.config import ConfigError, ModelConfig
from selfsup.registry import BACKBONES

BackboneBuilder = Callable[[ModelConfig], tuple[nn.Module, int]]


def register_backbone(name: str) -> Callable[[BackboneBuilder], BackboneBuilder]:
    """Decorator: make ``model.backbone=<name>`` build ``builder(model_config) -> (module, feature width)``."""
    return BACKBONES.register(name)


def backbone_builder(name: str) -> BackboneBuilder:
    """The builder of ``model.backbone=name``: a registered backbone, or ``timm:<model>`` for any timm model."""
    if name.startswith(TIMM_PREFIX):
        return timm_builder(name[len(TIMM_PREFIX):])
    if name.startswith("python:") and name not in BACKBONES:
        raise ConfigError(f"model.backbone={name!r} was an nn.Module given to selfsup.train() in another Python "
                          "process; pass it again there (backbone=...), or register a builder with @register_backbone "
                          "in a module named under imports")
    return BACKBONES[name]


def is_backbone(name: str) -> bool:
    """Whether ``model.backbone=name`` names a backbone this process can build."""
    try:
        backbone_builder(name)
    except ConfigError:
        return False
    return True


def build_backbone(cfg: ModelConfig) -> tuple[nn.Module, int]:
    """The encoder named by ``cfg.backbone`` and the width of its pooled features."""
    return backbone_builder(cfg.backbone)(cfg)


def backbone_factory(cfg: ModelConfig) -> Callable[[], tuple[nn.Module, int]]:
    """What a method receives: a call that builds a fresh backbone of ``cfg`` (and its feature width)."""
    backbone_builder(cfg.backbone)  # an unknown name fails now, with a suggestion, not inside the method
    return partial(build_backbone, cfg)


# ---------------------------------------------------------------------------------------------
# timm:<name>: any timm model, randomly initialised, its classifier removed

TIMM_PREFIX = "timm:"


def timm_builder(model_name: str) -> BackboneBuilder:
    """``model.backbone=timm:<model_name>``: ``timm.create_model(model_name, pretrained=False, num_classes=0)``, whose
    forward gives the pooled features (width: timm's ``head_hidden_size`` where the model has a pre-logits layer,
    else ``num_features``). timm builds the model as it defines it: ``model.small_stem``, ``zero_init_residual`` and
    the ViT keys do not apply; ``model.drop_path_rate`` is passed on when non-zero."""
    import timm

    if not model_name or not timm.is_model(model_name):
        close = difflib.get_close_matches(model_name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; close timm names: {', '.join(close)}" if close else ""
        raise ConfigError(f"model.backbone={TIMM_PREFIX + model_name!r} is not a timm model{hint} "
                          "(timm.list_models() lists them all)")

    def build(cfg: ModelConfig) -> tuple[nn.Module, int]:
        if cfg.widths is not None or cfg.pool_grid != 1:
            raise ConfigError(f"model.widths and model.pool_grid apply to resnet_mini only; {cfg.backbone} is built "
                              "as timm defines it")
        options = {"drop_path_rate": cfg.drop_path_rate} if cfg.drop_path_rate else {}
        try:
            net = timm.create_model(model_name, pretrained=False, num_classes=0, **options)
        except TypeError as error:  # an option this architecture does not take
            raise ConfigError(f"{cfg.backbone}: timm cannot build it with {options}: {error}") from None
        return net, int(getattr(net, "head_hidden_size", None) or net.num_features)

    return build


def use_small_stem(net: nn.Module, stem_width: int) -> None:
    """CIFAR stem: 3x3 stride-1 first conv and no max-pool, for 32-px-ish images."""
    net.conv1 = nn.Conv2d(3, stem_width, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.maxpool = nn.Identity()


def _torchvision_resnet(factory: Callable[..., tv.ResNet]) -> BackboneBuilder:
    def build(cfg: ModelConfig) -> tuple[nn.Module, int]:
        if cfg.widths is not None or cfg.pool_grid != 1:
            raise ConfigError(f"model.widths and model.pool_grid apply to resnet_mini only; {cfg.backbone} keeps "
                              "torchvision's architecture (so its export loads into the plain model)")
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
    ``pool_grid`` g > 1 averages the last map over a g x g grid instead of globally and flattens it
    (C·g² features): on 28-px Fashion-MNIST the silhouette's layout matters (see fashion_mnist_cpu.yaml).
    """

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), blocks: int = 1, small_stem: bool = True,
                 pool_grid: int = 1):
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
        if pool_grid < 1:
            raise ValueError(f"pool_grid must be >= 1, got {pool_grid}")
        self.avgpool = nn.AdaptiveAvgPool2d(pool_grid)
        self.feature_dim = in_width * pool_grid**2
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
    net = ResNetMini(tuple(cfg.widths or (16, 32, 64)), blocks=1, small_stem=cfg.small_stem, pool_grid=cfg.pool_grid)
    return net, net.feature_dim


@register_backbone("resnet_mini_wide")
def _resnet_mini_wide(cfg: ModelConfig) -> tuple[nn.Module, int]:
    net = ResNetMini(tuple(cfg.widths or (32, 64, 128)), blocks=1, small_stem=cfg.small_stem,
                     pool_grid=cfg.pool_grid)
    return net, net.feature_dim


# ---------------------------------------------------------------------------------------------
# SeLa / DeepCluster AlexNet with BatchNorm (yukimasano/self-label models/alexnet.py)

# (filters, kernel, stride, padding) per conv, "M" = MaxPool(3, 2)
SELA_ALEXNET = {
    "big": [(96, 11, 4, 2), "M", (256, 5, 1, 2), "M", (384, 3, 1, 1), (384, 3, 1, 1), (256, 3, 1, 1), "M"],
    "small": [(64, 11, 4, 2), "M", (192, 5, 1, 2), "M", (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1), "M"],
}


class SeLaAlexNet(nn.Module):
    """Conv(-BN-ReLU) features, 6x6 pooling, then Dropout-Linear(9216, 4096)-ReLU-Dropout-Linear(4096, 4096)-ReLU:
    the output is the 4096-d fc7 activation that SeLa's heads read (and that its CIFAR kNN monitor uses).

    ``AdaptiveAvgPool2d(6)`` is the identity at 224 px (the map is already 6x6) and lets other sizes through;
    ``small_stem`` makes conv1 3x3 stride 1, so the three max-pools leave 32-px images a 3x3 map.
    Init as the seed: conv N(0, √(2/(k²·C_out))), zero bias; BN 1/0; linear N(0, 0.01), zero bias.
    """

    def __init__(self, size: str = "big", small_stem: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for i, spec in enumerate(SELA_ALEXNET[size]):
            if spec == "M":
                layers.append(nn.MaxPool2d(kernel_size=3, stride=2))
                continue
            out_channels, kernel, stride, padding = spec
            if i == 0 and small_stem:
                kernel, stride, padding = 3, 1, 1
            layers += [nn.Conv2d(in_channels, out_channels, kernel, stride, padding), nn.BatchNorm2d(out_channels),
                       nn.ReLU(inplace=True)]
            in_channels = out_channels
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(in_channels * 36, 4096), nn.ReLU(inplace=True),
                                        nn.Dropout(0.5), nn.Linear(4096, 4096), nn.ReLU(inplace=True))
        self.feature_dim = 4096
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, (2.0 / fan_out) ** 0.5)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


@register_backbone("sela_alexnet")
def _sela_alexnet(cfg: ModelConfig) -> tuple[nn.Module, int]:
    net = SeLaAlexNet("big", small_stem=cfg.small_stem)
    return net, net.feature_dim


@register_backbone("sela_alexnet_small")
def _sela_alexnet_small(cfg: ModelConfig) -> tuple[nn.Module, int]:
    net = SeLaAlexNet("small", small_stem=cfg.small_stem)
    return net, net.feature_dim
