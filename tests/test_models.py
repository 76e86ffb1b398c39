"""The zoo: exact architectures (parameter counts, timm parity), names, options and bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import res2net
from res2net.models import ALIASES, build_model

# Trainable parameters with 1000 classes, from the published weight files' shapes.
PARAMS = {
    "res2net50_26w_4s": 25_699_120,
    "res2net101_26w_4s": 45_206_688,
    "res2net50_26w_6s": 37_051_448,
    "res2net50_26w_8s": 48_403_776,
    "res2net50_48w_2s": 25_287_304,
    "res2net50_14w_8s": 25_059_816,
    "res2next50": 24_671_464,
    "res2net50_v1b": 25_718_352,
    "res2net101_v1b": 45_225_920,
    "dla60_res2net": 20_848_072,
    "dla60_res2next": 17_032_984,
}

# ours -> timm's name for the same network
TIMM_PAIRS = {
    "res2net50_26w_4s": "res2net50_26w_4s",
    "res2net50_26w_6s": "res2net50_26w_6s",
    "res2net50_26w_8s": "res2net50_26w_8s",
    "res2net50_48w_2s": "res2net50_48w_2s",
    "res2net50_14w_8s": "res2net50_14w_8s",
    "res2net101_26w_4s": "res2net101_26w_4s",
    "res2next50": "res2next50",
    "res2net50_v1b_26w_4s": "res2net50d",
    "res2net101_v1b_26w_4s": "res2net101d",
    "dla60_res2net": "dla60_res2net",
    "dla60_res2next": "dla60_res2next",
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial affine parameters and running statistics."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) + 0.5
            m.bias.data = torch.randn(n, generator=g) * 0.2
            m.running_mean = torch.randn(n, generator=g) * 0.2
            m.running_var = torch.rand(n, generator=g) + 0.5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_counts_match_published_weights(name):
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        assert n_params(res2net.create_model(name)) == PARAMS[name]


# One of each block and stem in `make test` (Res2Net, ResNeXt-style groups, the v1b stem and
# shortcut, DLA); the other widths, scales and depths are the same code in `make test-slow`.
TIMM_FAST = {"res2net50_26w_4s", "res2next50", "res2net50_v1b_26w_4s", "dla60_res2net"}


@pytest.mark.parametrize(
    "ours",
    [o if o in TIMM_FAST else pytest.param(o, marks=pytest.mark.slow) for o in sorted(TIMM_PAIRS)],
)
def test_timm_state_dict_loads_unchanged_and_logits_match(ours):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    theirs = timm.create_model(TIMM_PAIRS[ours], pretrained=False)
    randomize_bn(theirs)
    theirs.eval()
    model = res2net.create_model(ours).eval()
    model.load_state_dict(theirs.state_dict())  # strict: every name and shape equal
    # DLA (ours and timm's) joins stride-2 branches, so timm's needs sizes divisible by 32; the
    # other size is odd at every stride (97 -> 49 -> 25 -> 13 -> 7 -> 4), where padding and
    # pooling round
    sizes = [(96, 96), (64, 128) if ours.startswith("dla") else (97, 129)]
    with torch.no_grad():
        for h, w in sizes:
            x = torch.randn(1, 3, h, w)
            assert rel_err(model(x), theirs(x)) <= 1e-5, (h, w)


def test_dla_runs_at_odd_sizes():
    model = res2net.create_model("dla60_res2next", num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 97, 131)).shape == (1, 5)


def test_aliases_are_the_same_networks():
    for alias, canonical in ALIASES.items():
        with torch.device("meta"):  # names and shapes only: no memory, no initialisation
            a, b = build_model(alias), build_model(canonical)
        assert [(k, v.shape) for k, v in a.state_dict().items()] == [
            (k, v.shape) for k, v in b.state_dict().items()
        ]


def test_list_models():
    names = res2net.list_models()
    assert {"res2net50", "res2net152_v1b", "dla60_res2next", "res2net50_14w_8s"} <= set(names)
    assert res2net.list_models("dla*") == ["dla60_res2net", "dla60_res2next"]
    assert res2net.list_models("nothing*") == []


def test_unknown_name_suggests_closest():
    with pytest.raises(ValueError, match="res2net50") as e:
        res2net.create_model("res2nett50")
    assert "Did you mean" in str(e.value)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(scale=0), "scale"),
        (dict(output_stride=4), "output_stride"),
        (dict(features_only=True, out_indices=(1, 5)), "out_indices"),
        (dict(features_only=True, out_indices=(-1,)), "out_indices"),
    ],
)
def test_impossible_combinations_fail_at_construction(kwargs, word):
    with pytest.raises(ValueError, match=word):
        if "scale" in kwargs:
            res2net.models.Res2Net(layers=(1, 1, 1, 1), **kwargs)
        else:
            res2net.create_model("res2net50", **kwargs)


def test_dla_rejects_output_stride():
    with pytest.raises(ValueError, match="output_stride"):
        res2net.create_model("dla60_res2net", output_stride=16)


def tiny(**kwargs) -> nn.Module:
    return res2net.models.Res2Net(
        layers=(1, 1, 1, 1), base_width=4, scale=4, num_classes=10, **kwargs
    )


@pytest.mark.parametrize("name", ["res2net50", "res2net50_v1b", "dla60_res2net"])
def test_features_only_strides_and_channels(name):
    model = res2net.create_model(name, features_only=True).eval()
    x = torch.randn(1, 3, 128, 160)
    with torch.no_grad():
        maps = model(x)
    assert len(maps) == 4
    assert [m.shape[1] for m in maps] == model.feature_channels
    assert model.feature_reductions == [4, 8, 16, 32]
    for m, r in zip(maps, model.feature_reductions):
        assert m.shape[-2:] == (128 // r, 160 // r)
    assert model.fc is None


def test_features_match_classifier_stages():
    model = tiny().eval()
    feats = res2net.models.Res2Net(
        layers=(1, 1, 1, 1), base_width=4, scale=4, out_indices=(0, 4)
    ).eval()
    feats.load_state_dict(model.state_dict(), strict=False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        stem, last = feats(x)
        assert stem.shape[-1] == 32
        assert torch.equal(last, model.forward_features(x))


@pytest.mark.parametrize("output_stride, expect", [(16, [4, 8, 16, 16]), (8, [4, 8, 8, 8])])
def test_output_stride_by_dilation(output_stride, expect):
    model = res2net.create_model(
        "res2net50_v1b", features_only=True, output_stride=output_stride
    ).eval()
    assert model.feature_reductions == expect
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 64, 64))
    assert [64 // m.shape[-1] for m in maps] == expect
    # dilation, not stride, keeps the receptive field growing
    d = 32 // output_stride
    assert (
        model.layer4[0].convs[0].dilation == (d // 2,) * 2
    )  # the stage's first block keeps the previous one
    assert model.layer4[1].convs[0].dilation == (d,) * 2


def test_head_api():
    model = tiny().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        f = model.forward_features(x)
        assert f.shape == (2, 2048, 2, 2)
        assert model.forward_head(f, pre_logits=True).shape == (2, 2048)
        assert torch.equal(model.forward_head(f), model(x))
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.num_classes == 3
    model.reset_classifier(0)
    assert model(x).shape == (2, 2048)


def test_in_chans_dropout_drop_path():
    model = res2net.create_model(
        "res2net50_v1b", in_chans=1, num_classes=4, drop_rate=0.5, drop_path_rate=0.2
    )
    assert model.conv1[0].in_channels == 1
    assert model.head_drop.p == 0.5
    assert model.layer4[-1].drop_path.p == pytest.approx(0.2)
    assert isinstance(model.layer1[0].drop_path, nn.Identity)  # rate 0 for the first block
    model.train()
    torch.manual_seed(0)
    x = torch.randn(2, 1, 64, 64)
    assert not torch.equal(model(x), model(x))  # stochastic while training
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_weight_init():
    model = tiny(zero_init_last=True)
    conv = model.layer2[0].conv1
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert conv.weight.std().item() == pytest.approx((2.0 / fan_out) ** 0.5, rel=0.15)
    assert torch.all(model.layer1[0].bn1.weight == 1) and torch.all(model.layer1[0].bn1.bias == 0)
    assert torch.all(model.layer1[0].bn3.weight == 0)
    assert torch.all(tiny().layer1[0].bn3.weight == 1)


def test_stage_first_block_pools_last_group():
    block = tiny().layer2[0]
    assert block.stage_first and isinstance(block.pool, nn.AvgPool2d) and block.pool.stride == 2
    assert tiny().layer2[0].convs[0].stride == (2, 2)


def test_scale_one_is_a_plain_bottleneck():
    model = res2net.models.Res2Net(
        layers=(1, 1, 1, 1), base_width=64, scale=1, num_classes=10
    ).eval()
    assert len(model.layer1[0].convs) == 1
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_backward_reaches_every_parameter():
    model = tiny(drop_path_rate=0.1)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.slow
def test_torch_export_traces_res2net50():
    """The zoo's Res2Net-50: the same classes as the tiny Res2Net that `torch.export` traces in
    `make test` (test_export.py: the OpenVINO export and the dynamic-size ONNX export, both
    checked against the model's outputs)."""
    model = res2net.create_model("res2net50").eval()
    x = torch.randn(1, 3, 64, 64)
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        assert torch.allclose(program.module()(x), model(x), atol=1e-5)


@pytest.mark.parametrize("name", ["res2net50_v1b", "dla60_res2next"])
def test_norm_and_act_layers_are_the_builders(name):
    """Every normalisation and activation comes from `norm_layer` / `act_layer`, and the state
    dict keys stay those of the published weights (FrozenBatchNorm2d has no batch counter)."""
    from torchvision.ops import FrozenBatchNorm2d

    plain = build_model(name, num_classes=10)
    built = build_model(name, num_classes=10, norm_layer=FrozenBatchNorm2d, act_layer=nn.SiLU)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.ReLU)) for m in built.modules())
    n_norms = sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in built.modules()) == n_norms
    assert sum(isinstance(m, nn.SiLU) for m in built.modules()) == sum(
        isinstance(m, nn.ReLU) for m in plain.modules()
    )
    keys = {k for k in plain.state_dict() if not k.endswith("num_batches_tracked")}
    assert set(built.state_dict()) == keys
    built.load_state_dict(plain.state_dict())  # FrozenBatchNorm2d drops the counter itself
    plain.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        silu_free = build_model(name, num_classes=10, norm_layer=FrozenBatchNorm2d).eval()
        silu_free.load_state_dict(plain.state_dict())
        torch.testing.assert_close(silu_free(x), plain(x))


def test_cpu_layout_is_create_models_choice():
    """The classes compute in the caller's layout; `create_model` adds the channels_last hook
    on CPU unless told not to. Values are the same either way."""
    x = torch.randn(1, 3, 32, 32)
    ours = res2net.create_model(
        "res2net50", num_classes=4, features_only=True, out_indices=(1,)
    ).eval()
    kept = res2net.create_model(
        "res2net50", num_classes=4, features_only=True, out_indices=(1,), cpu_channels_last=False
    ).eval()
    kept.load_state_dict(ours.state_dict())
    plain = build_model("res2net50", num_classes=4, out_indices=(1,)).eval()
    plain.load_state_dict(ours.state_dict())
    with torch.no_grad():
        a, b, c = ours(x)[0], kept(x)[0], plain(x)[0]
    assert a.is_contiguous(memory_format=torch.channels_last) and not a.is_contiguous()
    assert b.is_contiguous() and c.is_contiguous()
    torch.testing.assert_close(a, c)
    assert all(p.is_contiguous() for p in ours.parameters())  # weights keep the standard layout
