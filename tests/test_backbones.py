"""The tiny CPU ResNet's configurable widths and grid pooling."""

from __future__ import annotations

import pytest
import torch

from selfsup.config import ConfigError, ModelConfig
from selfsup.models.backbones import build_backbone


def last_map(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    for stage in net.layers:
        x = stage(x)
    return x


@pytest.mark.parametrize("grid", [1, 2, 3])
def test_grid_pooling_is_the_mean_over_each_cell(grid):
    torch.manual_seed(0)
    net, dim = build_backbone(ModelConfig(backbone="resnet_mini", widths=(4, 8, 12), pool_grid=grid))
    net.eval()
    x = torch.randn(2, 3, 24, 24)
    features = net(x)
    assert dim == 12 * grid**2 and features.shape == (2, dim)
    fmap = last_map(net, x)  # (2, 12, 6, 6): cells of 6 / grid pixels
    cell = 6 // grid
    expected = torch.stack([fmap[:, :, i * cell:(i + 1) * cell, j * cell:(j + 1) * cell].mean(dim=(2, 3))
                            for i in range(grid) for j in range(grid)], dim=2)  # (2, C, g²), row-major cells
    torch.testing.assert_close(features, expected.flatten(1))


def test_widths_and_grid_are_refused_for_torchvision_resnets():
    with pytest.raises(ConfigError, match="resnet_mini only"):
        build_backbone(ModelConfig(backbone="resnet18", pool_grid=2))
