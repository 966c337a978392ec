"""SplitBatchNorm (model.bn_splits): per-split statistics, running averages as the MoCo demo, one-process ShuffleBN."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from selfsup.config import ModelConfig
from selfsup.nn.split_bn import (
    BatchSplitError,
    SplitBatchNorm1d,
    SplitBatchNorm2d,
    apply_bn_splits,
    check_bn_splits,
    convert_split_bn,
    split_shuffle,
    split_unshuffle,
)


def _randomised(bn: nn.modules.batchnorm._BatchNorm, seed: int = 0) -> nn.modules.batchnorm._BatchNorm:
    """Non-trivial affine parameters and running statistics, so that copying them is visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(bn.num_features, generator=g))
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
    return bn


def _plain(split: nn.Module, cls: type[nn.Module]) -> nn.Module:
    plain = cls(split.num_features, momentum=split.momentum)
    plain.load_state_dict(split.state_dict())
    return plain


@pytest.mark.parametrize("splits", [2, 4])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("kind", ["2d", "1d", "1d_seq"])
def test_training_statistics_equal_one_batchnorm_per_split(kind, momentum, splits):
    """Output of split s = nn.BatchNorm on samples s, s+N, …; running stats = mean of the N BatchNorms' (3 steps)."""
    cls, plain_cls, shape = {"2d": (SplitBatchNorm2d, nn.BatchNorm2d, (3, 5, 4)),
                             "1d": (SplitBatchNorm1d, nn.BatchNorm1d, (3,)),
                             "1d_seq": (SplitBatchNorm1d, nn.BatchNorm1d, (3, 6))}[kind]
    split = _randomised(cls(3, splits, momentum=momentum))
    references = [_plain(split, plain_cls) for _ in range(splits)]
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(4 * splits, *shape, generator=g) * 2 + 0.5
        out = split(x)
        for s, bn in enumerate(references):
            torch.testing.assert_close(out[s::splits], bn(x[s::splits]))
        for name in ("running_mean", "running_var"):
            mean_of_splits = torch.stack([getattr(bn, name) for bn in references]).mean(dim=0)
            torch.testing.assert_close(getattr(split, name), mean_of_splits)
        for bn in references:  # every split starts the next step from the averaged statistics
            bn.running_mean.copy_(split.running_mean)
            bn.running_var.copy_(split.running_var)
    torch.testing.assert_close(split.num_batches_tracked, torch.tensor(3))


def test_running_statistics_follow_the_demo_formula():
    """running ← (1 − m)·running + m·mean over splits of (split mean, unbiased split variance)."""
    split = _randomised(SplitBatchNorm2d(2, 3, momentum=0.25))
    start_mean, start_var = split.running_mean.clone(), split.running_var.clone()
    x = torch.randn(6, 2, 3, 3, generator=torch.Generator().manual_seed(2))
    split(x)
    parts = [x[s::3].transpose(0, 1).reshape(2, -1) for s in range(3)]  # (C, samples·H·W) of split s
    mean = torch.stack([p.mean(dim=1) for p in parts]).mean(dim=0)
    var = torch.stack([p.var(dim=1, unbiased=True) for p in parts]).mean(dim=0)
    torch.testing.assert_close(split.running_mean, 0.75 * start_mean + 0.25 * mean)
    torch.testing.assert_close(split.running_var, 0.75 * start_var + 0.25 * var)


def test_split_statistics_differ_from_whole_batch_statistics():
    """The point of the layer: 2 splits of a batch whose halves differ normalise each half on its own."""
    x = torch.cat([torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2) + 10]).view(2, 4, 1, 2, 2).transpose(0, 1)
    x = x.reshape(8, 1, 2, 2)  # samples alternate between the two groups: split 0 = group 0, split 1 = group 1
    out = SplitBatchNorm2d(1, 2)(x)
    for s in range(2):
        assert abs(out[s::2].mean().item()) < 1e-5
    assert nn.BatchNorm2d(1)(x)[1::2].mean().item() > 0.9


def test_eval_mode_is_plain_batchnorm_and_takes_any_batch():
    split = _randomised(SplitBatchNorm2d(3, 4))
    split(torch.randn(8, 3, 2, 2))  # some training first
    plain = _plain(split, nn.BatchNorm2d)
    split.eval()
    plain.eval()
    x = torch.randn(5, 3, 4, 4)  # 5 does not divide into 4 splits: no splitting in eval mode
    torch.testing.assert_close(split(x), plain(x), rtol=0, atol=0)
    assert split.num_batches_tracked.item() == 1


def test_gradients_flow_as_through_separate_batchnorms():
    split = _randomised(SplitBatchNorm2d(3, 2))
    references = [_plain(split, nn.BatchNorm2d) for _ in range(2)]
    x = torch.randn(6, 3, 2, 2, generator=torch.Generator().manual_seed(3), requires_grad=True)
    upstream = torch.randn(6, 3, 2, 2, generator=torch.Generator().manual_seed(4))
    (split(x) * upstream).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    sum((bn(x_ref[s::2]) * upstream[s::2]).sum() for s, bn in enumerate(references)).backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(split.weight.grad, sum(bn.weight.grad for bn in references))
    torch.testing.assert_close(split.bias.grad, sum(bn.bias.grad for bn in references))
    assert split.weight.grad.abs().sum() > 0


def test_a_batch_that_does_not_divide_is_scattered_like_data_parallel():
    # 10 images over 4 splits: contiguous chunks of 3, 3, 2, 2, each with its own statistics
    split = _randomised(SplitBatchNorm2d(3, 4))
    references = [_plain(split, nn.BatchNorm2d) for _ in range(4)]
    x = torch.randn(10, 3, 2, 2)
    expected = torch.cat([bn(chunk) for bn, chunk in zip(references, torch.tensor_split(x, 4), strict=True)])
    torch.testing.assert_close(split(x), expected)
    torch.testing.assert_close(split.running_mean, torch.stack([bn.running_mean for bn in references]).mean(0))
    torch.testing.assert_close(split.running_var, torch.stack([bn.running_var for bn in references]).mean(0))
    with pytest.raises(ValueError, match="whole number >= 1"):
        SplitBatchNorm1d(3, 0)
    check_bn_splits(8, 256)
    check_bn_splits(4, 256, world_size=2)
    with pytest.raises(BatchSplitError, match=r"model\.bn_splits=8 .* batch of 100"):
        check_bn_splits(8, 200, world_size=2)
    with pytest.raises(ValueError, match="train.sync_bn"):
        check_bn_splits(2, 256, world_size=2, sync_bn=True)


def test_state_dict_is_batchnorms():
    for split, plain in ((SplitBatchNorm2d(4, 2), nn.BatchNorm2d(4)), (SplitBatchNorm1d(4, 2), nn.BatchNorm1d(4))):
        assert {k: (v.shape, v.dtype) for k, v in split.state_dict().items()} == \
               {k: (v.shape, v.dtype) for k, v in plain.state_dict().items()}
        assert isinstance(split, type(plain))
        plain.load_state_dict(_randomised(split).state_dict(), strict=True)
        split.load_state_dict(plain.state_dict(), strict=True)


def test_converted_resnet18_is_the_plain_resnet18_on_each_split():
    torch.manual_seed(0)
    plain = torchvision.models.resnet18()
    bn_count = sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    parameters = {id(p) for p in plain.parameters()}
    reference = copy.deepcopy(plain)
    net = convert_split_bn(plain, 2)
    assert net is plain and sum(type(m) is SplitBatchNorm2d for m in net.modules()) == bn_count == 20
    assert not any(type(m) is nn.BatchNorm2d for m in net.modules())
    assert {id(p) for p in net.parameters()} == parameters  # the same tensors: an optimizer stays valid
    assert list(net.state_dict()) == list(reference.state_dict())

    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    copies = [copy.deepcopy(reference) for _ in range(2)]
    out = net(x)
    for s, single in enumerate(copies):  # train mode: split s is the plain network on samples s, s+2
        torch.testing.assert_close(out[s::2], single(x[s::2]), rtol=1e-4, atol=1e-4)
    name = "layer4.1.bn2.running_var"
    expected = (copies[0].state_dict()[name] + copies[1].state_dict()[name]) / 2
    torch.testing.assert_close(net.state_dict()[name], expected)

    loaded = torchvision.models.resnet18()
    loaded.load_state_dict(net.state_dict(), strict=True)  # the export loads into a plain torchvision model
    net.eval()
    loaded.eval()
    torch.testing.assert_close(net(x), loaded(x), rtol=0, atol=0)


def test_conversion_covers_heads_and_only_plain_batchnorm():
    head = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    head.eval()
    converted = convert_split_bn(head, 4)
    assert type(converted[1]) is SplitBatchNorm1d and converted[1].splits == 4 and not converted[1].training
    assert type(convert_split_bn(nn.BatchNorm2d(3), 2)) is SplitBatchNorm2d  # the root itself
    assert convert_split_bn(converted, 2)[1].splits == 2  # converting again sets the new count
    without_bias = nn.BatchNorm2d(3)
    without_bias.register_parameter("bias", None)  # what bias=False gives in torch versions that have the flag
    no_bias = convert_split_bn(without_bias, 2)
    assert no_bias.bias is None and no_bias(torch.randn(4, 3, 2, 2)).shape == (4, 3, 2, 2)
    sync = nn.Sequential(nn.SyncBatchNorm(3))
    assert type(convert_split_bn(sync, 2)[0]) is nn.SyncBatchNorm
    same = nn.Sequential(nn.BatchNorm2d(3))
    assert convert_split_bn(same, 1) is same and type(same[0]) is nn.BatchNorm2d
    with pytest.raises(ValueError, match="whole number"):
        convert_split_bn(same, 0)


def test_apply_bn_splits_converts_and_refuses_a_network_without_batchnorm():
    from selfsup.models.backbones import build_backbone

    net, _ = build_backbone(ModelConfig(backbone="resnet_mini", widths=(4, 8, 8)))
    assert apply_bn_splits(net, 2) is net and any(type(m) is SplitBatchNorm2d for m in net.modules())
    mlp = nn.Sequential(nn.Linear(4, 4), nn.GELU())
    assert apply_bn_splits(mlp, 1) is mlp
    with pytest.raises(ValueError, match=r"model\.bn_splits=4: Sequential has no BatchNorm"):
        apply_bn_splits(mlp, 4)


def test_split_shuffle_is_a_permutation_and_is_inverted():
    x = torch.arange(32.0).repeat_interleave(3).view(32, 3)  # row i holds the value i
    shuffled, inverse = split_shuffle(x, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(shuffled[:, 0].sort().values, x[:, 0])  # a permutation of the rows
    assert not torch.equal(shuffled, x)
    assert torch.equal(split_unshuffle(shuffled, inverse), x)  # exactly inverted
    assert torch.equal(inverse.sort().values, torch.arange(32))
    for s in range(4):  # the key encoder's split s holds other images than the query encoder's split s
        assert set(shuffled[s::4, 0].tolist()) != set(x[s::4, 0].tolist())
    again, _ = split_shuffle(x, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, shuffled)  # the generator decides


def test_split_shuffle_round_trip_through_an_encoder():
    """A row-wise encoder after shuffle + unshuffle gives the unshuffled outputs; the split BN sees new groups."""
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(5, 6), SplitBatchNorm1d(6, 4), nn.ReLU())
    x = torch.randn(16, 5)
    shuffled, inverse = split_shuffle(x, 4)
    encoder.eval()  # row-wise: exactly the same outputs
    torch.testing.assert_close(split_unshuffle(encoder(shuffled), inverse), encoder(x), rtol=0, atol=0)
    encoder.train()  # batch statistics of other sub-batches: other outputs
    assert not torch.allclose(split_unshuffle(encoder(shuffled), inverse), encoder(x))


def test_split_shuffle_with_one_split_is_the_identity_and_draws_nothing():
    x = torch.randn(6, 2)
    state = torch.random.get_rng_state()
    same, inverse = split_shuffle(x, 1)
    assert same is x and torch.equal(inverse, torch.arange(6))
    assert torch.equal(torch.random.get_rng_state(), state)
    shuffled, inverse = split_shuffle(x, 4)  # any batch size: a permutation
    assert torch.equal(split_unshuffle(shuffled, inverse), x)


SEED_GPUS = {"moco_v2_resnet50_imagenet": 8, "byol_resnet18_imagenet": 2, "isd_resnet18_imagenet": 2,
             "isd_plus_resnet50_imagenet": 4, "msf_resnet50_imagenet": 4, "sela_resnet50_10x3k_imagenet": 4,
             "sela_alexnet_10x3k_imagenet": 4}


@pytest.mark.parametrize("name", sorted(SEED_GPUS))
def test_multi_gpu_recipes_name_the_splits_that_emulate_the_seed(name):
    """Values unchanged (one BatchNorm per batch); the comment gives the one-GPU override, which fits the batch."""
    from selfsup.cli import RECIPES
    from selfsup.config import load_config

    path = RECIPES / f"{name}.yaml"
    cfg = load_config(path)
    gpus = SEED_GPUS[name]
    assert cfg.model.bn_splits == 1
    assert f"model.bn_splits={gpus}" in path.read_text()
    check_bn_splits(gpus, cfg.train.batch_size)


def test_the_single_gpu_recipe_keeps_plain_batchnorm():
    from selfsup.cli import RECIPES
    from selfsup.config import load_config

    path = RECIPES / "moco_v2_resnext50_imagenette.yaml"
    assert load_config(path).model.bn_splits == 1 and "GPUs: 1" in path.read_text()


def test_one_process_shufflebn_permutes_the_key_batch_across_the_splits():
    from selfsup.nn.online_target import shuffled_embedding

    encoder = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).train()
    convert_split_bn(encoder, 2)
    x = torch.randn(8, 4)
    torch.manual_seed(5)
    got = shuffled_embedding(encoder, x, shuffle_bn=True)
    torch.manual_seed(5)
    permutation = torch.randperm(8)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(encoder(x[permutation]), dim=1)[torch.argsort(permutation)]
        plain = torch.nn.functional.normalize(encoder(x), dim=1)
    torch.testing.assert_close(got, expected)  # the outputs come back in the batch's order
    assert not torch.allclose(got, plain)  # each split normalised other images than the query encoder's would
    torch.testing.assert_close(shuffled_embedding(encoder, x, shuffle_bn=False), plain)


def test_trainer_splits_every_batchnorm_of_the_method(tmp_path):
    from conftest import tiny_config
    from selfsup.config import ConfigError
    from selfsup.engine.trainer import Trainer
    from selfsup.nn.split_bn import SplitBatchNorm1d as Split1d

    trainer = Trainer(tiny_config(tmp_path, "model.bn_splits=4", "train.max_steps=2", method="byol"))
    norms = [m for m in trainer.method.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, (SplitBatchNorm2d, Split1d)) and m.splits == 4 for m in norms)
    trainer.fit()
    plain = {k: v.shape for k, v in copy.deepcopy(trainer.method.backbone).state_dict().items()}
    assert plain == {k: v.shape for k, v in trainer.initial_backbone.items()}  # BatchNorm's keys: exports load
    with pytest.raises(ConfigError, match=r"model\.bn_splits=5"):
        Trainer(tiny_config(tmp_path / "odd", "model.bn_splits=5", method="byol"))  # 32 images per step
