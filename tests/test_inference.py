"""optimize_for_inference (BN folding, fused stage convs, channels_last) and the benchmark CLI."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from torch import nn

import res2net
from res2net.cli import benchmark as benchmark_cmd
from res2net.inference import FusedRes2Block
from res2net.models import DLA, Res2Net
from res2net.models.layers import channels_last_on_cpu
from res2net.profile import benchmark_model, conv_gemm_gflops, machine_info, matmul_gflops

from .test_models import randomize_bn, rel_err

TINY = {
    "classic": lambda **kw: Res2Net(layers=(1, 1, 1, 1), base_width=4, scale=4, **kw),
    "v1b": lambda **kw: Res2Net(
        layers=(1, 1, 1, 1), base_width=4, scale=4, deep_stem=True, avg_down=True, **kw
    ),
    "res2next": lambda **kw: Res2Net(
        layers=(1, 1, 1, 1), base_width=4, scale=4, cardinality=4, **kw
    ),
    "scale1": lambda **kw: Res2Net(layers=(1, 1, 1, 1), base_width=16, scale=1, **kw),
    "scale2_os8": lambda **kw: Res2Net(
        layers=(2, 1, 1, 2), base_width=8, scale=2, output_stride=8, **kw
    ),
    "dla": lambda **kw: DLA(levels=(1, 1, 1, 1, 1, 1), channels=(8, 16, 32, 64, 64, 128), **kw),
    "dla_next": lambda **kw: DLA(
        levels=(1, 1, 1, 2, 2, 1),
        channels=(8, 16, 32, 64, 64, 128),
        base_width=8,
        cardinality=2,
        **kw,
    ),
}


def tiny(kind: str, features: bool = False) -> nn.Module:
    torch.manual_seed(0)
    kw = (
        dict(out_indices=(0, 1, 2, 3, 4) if kind != "dla" else (1, 4))
        if features
        else dict(num_classes=10)
    )
    model = TINY[kind](**kw)
    randomize_bn(model)
    return model.eval()


def n_modules(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def as_list(y: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
    return [y] if isinstance(y, torch.Tensor) else list(y)


@pytest.mark.parametrize(
    "kind, features", [(kind, False) for kind in sorted(TINY)] + [("v1b", True), ("dla", True)]
)
def test_optimized_outputs_equal_eval_outputs(kind, features):
    model = tiny(kind, features)
    optimized = res2net.optimize_for_inference(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want, got = as_list(model(x)), as_list(optimized(x))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert rel_err(g, w) <= 1e-4
    assert n_modules(optimized, nn.BatchNorm2d) == 0
    merged = sum(len(m.convs) - 1 for m in model.modules() if getattr(m, "stage_first", False))
    assert n_modules(optimized, nn.Conv2d) == n_modules(model, nn.Conv2d) - merged
    assert merged > 0 or kind in ("scale1", "scale2_os8")  # those have one 3x3 conv per block


def merged_for_compile(model: nn.Module) -> nn.Module:
    """The module `optimize_for_inference(compile=True)` compiles, not compiled: run eagerly."""
    wrapper = res2net.optimize_for_inference(model, compile=True)
    return wrapper.compiled._orig_mod  # what torch.compile wraps; nothing compiles before a call


@pytest.mark.parametrize("kind", sorted(TINY))
def test_compiled_form_runs_the_stage_first_pool_in_the_grouped_conv(kind):
    model = tiny(kind)
    merged = merged_for_compile(model)
    firsts = [m for m in merged.modules() if isinstance(m, FusedRes2Block) and m.stage_first]
    whole = [b.whole for b in firsts]
    if kind == "res2next":  # cardinality 4: the pool's share of the conv has 4 groups too
        assert whole == [True] * 4 and n_modules(merged, nn.AvgPool2d) == 0
    if kind == "scale2_os8":  # layer4.0's convs are dilated, its pool is not: kept apart
        assert whole == [True, True, True, False]
        assert isinstance(firsts[-1].pool, nn.AvgPool2d)
    assert any(whole) or kind == "scale1"  # no pool with one group
    assert all(b.pool is None and len(b.convs) == 1 for b in firsts if b.whole)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(merged(x), model(x)) <= 1e-4
    eager = res2net.optimize_for_inference(model)  # eager keeps the pool: cheaper there
    assert not any(getattr(m, "whole", False) for m in eager.modules())


def test_optimize_leaves_the_model_alone_and_is_eval_only():
    model = tiny("classic").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimized = res2net.optimize_for_inference(model)
    assert model.training and n_modules(model, nn.BatchNorm2d) > 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not optimized.training
    assert not any(p.requires_grad for p in optimized.parameters())
    assert optimized.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="eval-only"):
        optimized.train()


def test_optimize_keeps_the_classifier_api():
    optimized = res2net.optimize_for_inference(tiny("classic"))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert optimized.forward_head(optimized.forward_features(x), pre_logits=True).shape == (
            1,
            2048,
        )


def test_optimize_rejects_unfoldable_batchnorm():
    model = tiny("classic")
    model.act1 = nn.Sequential(nn.BatchNorm2d(64), nn.ReLU())  # a BN with no conv before it
    with pytest.raises(ValueError, match="act1.0"):
        res2net.optimize_for_inference(model)


@pytest.mark.slow
def test_optimize_with_compile_freezes_and_matches():
    model = tiny("classic")
    compiled = res2net.optimize_for_inference(model, compile=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) <= 1e-4


def timm_twin(kind: str) -> nn.Module:
    """timm's implementation of the same tiny network: the reference for the training path."""
    timm = pytest.importorskip("timm")
    if kind == "dla":
        return timm.models.dla.DLA(
            levels=(1, 1, 1, 1, 1, 1),
            channels=(8, 16, 32, 64, 64, 128),
            num_classes=10,
            block=timm.models.dla.DlaBottle2neck,
            base_width=28,
        )
    return timm.models.resnet.ResNet(
        block=timm.models.res2net.Bottle2neck,
        layers=(1, 1, 1, 1),
        base_width=4,
        block_args=dict(scale=4),
        num_classes=10,
    )


@pytest.mark.parametrize(
    "kind, dtype, size, tol",
    [
        ("classic", torch.float32, 64, 1e-3),
        ("classic", torch.float64, 32, 1e-10),
        ("dla", torch.float64, 32, 1e-10),
    ],
)
def test_training_step_matches_timm(kind, dtype, size, tol):
    """Our training path (channels_last on CPU, as `create_model` installs) computes timm's loss,
    gradients and BatchNorm statistics. float64 shows the math is the same; in float32,
    train-mode BatchNorm over the tiny DLA's smallest maps amplifies rounding differences beyond
    any tolerance."""
    model = tiny(kind).train().to(dtype)
    model.register_forward_pre_hook(channels_last_on_cpu)
    ref = timm_twin(kind).train().to(dtype)
    ref.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, size, size, dtype=dtype)
    for m in (model, ref):
        m(x).square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert rel_err(p.grad, q.grad) <= tol, name
    for (name, b), c in zip(model.named_buffers(), ref.buffers()):
        assert rel_err(b.double(), c.double()) <= tol, name


def test_benchmark_measures_both_modes():
    model = tiny("classic")
    for mode in ("infer", "train"):
        row = benchmark_model(
            model, "tiny", batch_size=2, image_size=32, mode=mode, warmup=1, repeats=2
        )
        assert row.mode == mode and row.ms_per_step > 0 and len(row.steps_ms) == 2
        assert row.img_per_s == pytest.approx(2000.0 / row.ms_per_step)
    assert machine_info()["cores"] >= 1
    assert matmul_gflops(n=128, repeats=1) > 0 and conv_gemm_gflops(n=128, repeats=1) > 0


def benchmark_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    benchmark_cmd.add_parser(parser)
    return parser.parse_args(list(argv))


def test_benchmark_cli_prints_markdown_and_json(capsys):
    args = benchmark_args(
        "--model",
        "res2net50",
        "--batch_size",
        "1",
        "--image_resize",
        "32",
        "--mode",
        "infer",
        "--optimize",
        "--warmup",
        "1",
        "--repeats",
        "1",
        "--device",
        "cpu",
    )
    assert benchmark_cmd.run(args, []) == 0
    out = capsys.readouterr().out
    table, _, json_line = out.strip().rpartition("\n")
    assert (
        "| model name | params(M) | cards | batch size | resolution | jit level | graph compile "
        "| ms/step | img/s" in table
    )
    assert "| res2net50 | 25.70 | 1 | 1 | 32x32 | optimized |" in table
    assert "Machine: cpu" in table
    data = json.loads(json_line)
    assert data["rows"][0]["model"] == "res2net50" and data["machine"]["torch"] == torch.__version__


def test_benchmark_cli_rejects_cards_without_torchrun():
    with pytest.raises(ValueError, match="torchrun"):
        benchmark_cmd.run(benchmark_args("--model", "res2net50", "--cards", "2"), [])


def test_class_names_file_is_bounded_utf8_and_never_blocks(tmp_path):
    import os

    from res2net.errors import DataError
    from res2net.guards import NotARegularFile
    from res2net.inference import class_names

    names = tmp_path / "names.txt"
    names.write_text("cat\n\ndog\n")
    assert class_names(str(names), 2) == ["cat", "dog"]
    names.write_bytes(b"\xff\xfe\n")
    with pytest.raises(DataError, match="not UTF-8 text"):
        class_names(str(names), 1)
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(NotARegularFile, match="--classes .* is a named pipe"):
        class_names(str(tmp_path / "pipe"), 1)
