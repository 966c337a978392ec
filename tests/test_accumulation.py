"""train.accumulate_steps: a step's batch in micro-batches gives the update of the whole batch (for a method whose
loss is a mean over independent images), and queue methods enqueue every micro-batch."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import tiny_config
from selfsup.config import ConfigError, MethodConfig
from selfsup.engine.trainer import Trainer
from selfsup.methods import Method, StepOutput, register_method
from selfsup.models.backbones import register_backbone


@dataclass
class AlignConfig(MethodConfig):
    name: str = "test_align"  # no BatchNorm, no queue: the loss is a mean of per-image terms


@register_method(AlignConfig)
class Align(Method):
    def __init__(self, cfg, backbone, run):
        super().__init__(cfg, run)
        self.encoder, _ = backbone()

    @property
    def backbone(self):
        return self.encoder

    def training_step(self, batch):
        a, b = (F.normalize(self.encoder(x), dim=1) for x in batch.views)
        return StepOutput((2 - 2 * (a * b).sum(dim=1)).mean())


@register_backbone("test_linear")
def linear(cfg):
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 8)), 8


def test_two_half_batches_give_the_update_of_the_whole_batch(tmp_path):
    weights = {}
    for steps in (1, 2, 4):
        trainer = Trainer(tiny_config(tmp_path / str(steps), "method=test_align", "model.backbone=test_linear",
                                      f"train.accumulate_steps={steps}", "train.max_steps=1", method="test_align"))
        trainer.fit()
        weights[steps] = trainer.method.encoder[1].weight.detach().clone()
    assert not torch.equal(weights[1], tiny_initial(tmp_path))
    torch.testing.assert_close(weights[2], weights[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(weights[4], weights[1], atol=1e-6, rtol=0)


def tiny_initial(tmp_path) -> torch.Tensor:
    trainer = Trainer(tiny_config(tmp_path / "init", "method=test_align", "model.backbone=test_linear",
                                  method="test_align"))
    return trainer.method.encoder[1].weight.detach().clone()


def test_queue_methods_enqueue_every_micro_batch(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "train.accumulate_steps=2", "train.max_steps=1"))
    trainer.fit()
    assert trainer.method.queue.ptr.item() == 32  # both micro-batches of 16 keys
    assert trainer.method.queue.ids[:32].unique().numel() == 32


def test_accumulation_that_does_not_divide_the_batch_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="train.accumulate_steps=3"):
        Trainer(tiny_config(tmp_path, "train.accumulate_steps=3"))
