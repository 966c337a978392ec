"""SeLa's pre-activation ResNet-50 (``sela_resnet50``), as yukimasano/self-label ``models/resnetv2.py`` builds it.

What the official file does (``resnetv2(nlayers=50, num_classes=[3000] * 10, expansion=1)``, the ``--arch
resnetv2`` of ``scripts/resnet.sh``), layer by layer:

* ``features`` is one ``nn.Sequential``: ``0`` Conv2d(3, 64, 7, stride 2, padding 3, no bias), ``1``
  MaxPool2d(3, 2, 1), ``2``-``5`` the four stages of [3, 4, 6, 3] bottlenecks with widths 64/128/256/512
  (outputs ×4: 256/512/1024/2048), ``6`` AdaptiveAvgPool2d(1). **No BatchNorm or ReLU after the stem conv**.
* A pre-activation bottleneck (He et al., "Identity Mappings"): ``bn1`` on its input, then ``conv1`` 1×1,
  ``bn2``, ``conv2`` 3×3 (carries the stride), ``bn3``, ``conv3`` 1×1 to 4× the width, each conv preceded by
  BN-ReLU: ``out = conv3(relu(bn3(conv2(relu(bn2(conv1(relu(bn1(x)))))))) + shortcut``. The shortcut is
  ``x`` itself, or, in the first block of a stage (stride 2, or a width change in stage 1), a 1×1 conv
  ``shortcut.0`` (no bias, no BN) applied to the *pre-activated* ``relu(bn1(x))``. No ReLU after the sum.
* **No final BN-ReLU**: the last block's sum goes straight into the average pool, so the 2048-d features
  can be negative. The heads (``top_layer0`` … ``top_layer9``, Linear(2048, 3000); ``top_layer.0`` with one
  head) are SeLa's, not the backbone's.
* No weight initialisation code is applied (``util.weight_init`` is never called): PyTorch's defaults
  (Conv2d Kaiming-uniform with a=√5, BatchNorm weight 1 and bias 0). 48 BatchNorm2d, 53 convs.

Parameter names are the official ones, ``features.0.weight``, ``features.2.0.bn1.weight``,
``features.2.0.shortcut.0.weight`` … ``features.5.2.conv3.weight``, so the released ``resnet-10x3k.pth``
minus its ``top_layer*`` loads with ``strict=True`` (``selfsup import``) and an export loads into the
official ``models.resnetv2(num_classes=[K] * hc)`` with ``strict=False`` (only the heads missing). The one
change: the average pool sits in ``avgpool`` instead of ``features.6`` (it has no tensors, so the keys are
the same) so that ``eval.pool_grid`` can swap it. ``model.small_stem`` (for small images) makes the stem a
3×3 stride-1 conv and drops the max-pool, keeping every name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.config import ConfigError, ModelConfig
from selfsup.models.backbones import register_backbone

EXPANSION = 4  # bottleneck output = 4 × its width


class PreActBottleneck(nn.Module):
    """BN-ReLU-conv ×3 (1×1, 3×3 with the stride, 1×1 to 4× width) plus the identity or a 1×1 projection of
    the pre-activated input."""

    def __init__(self, in_channels: int, width: int, stride: int = 1):
        super().__init__()
        out_channels = EXPANSION * width
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, kernel_size=1, bias=False)
        self.shortcut: nn.Sequential | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride,
                                                    bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        identity = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + identity


class PreActResNet(nn.Module):
    """``features`` (stem conv, max-pool, four stages) then global average pooling: images → (B, 2048)."""

    def __init__(self, blocks: tuple[int, ...] = (3, 4, 6, 3), stem_width: int = 64, small_stem: bool = False):
        super().__init__()
        if small_stem:
            stem: list[nn.Module] = [nn.Conv2d(3, stem_width, kernel_size=3, stride=1, padding=1, bias=False),
                                     nn.Identity()]
        else:
            stem = [nn.Conv2d(3, stem_width, kernel_size=7, stride=2, padding=3, bias=False),
                    nn.MaxPool2d(kernel_size=3, stride=2, padding=1)]
        stages, in_channels = [], stem_width
        for i, count in enumerate(blocks):
            width = stem_width * 2**i
            layers = []
            for b in range(count):
                layers.append(PreActBottleneck(in_channels, width, stride=2 if (b == 0 and i > 0) else 1))
                in_channels = EXPANSION * width
            stages.append(nn.Sequential(*layers))
        self.features = nn.Sequential(*stem, *stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # the official features.6 (no tensors)
        self.feature_dim = in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.features(x)), 1)


@register_backbone("sela_resnet50")
def _sela_resnet50(cfg: ModelConfig) -> tuple[nn.Module, int]:
    if cfg.widths is not None or cfg.pool_grid != 1 or cfg.zero_init_residual:
        raise ConfigError("model.widths, model.pool_grid and model.zero_init_residual do not apply to sela_resnet50: "
                          "it is the official self-label resnetv2 (default PyTorch init, so that its keys and "
                          "training match the seed's)")
    net = PreActResNet((3, 4, 6, 3), small_stem=cfg.small_stem)
    return net, net.feature_dim
