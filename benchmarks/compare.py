"""Res2Net-50 (26w_4s): this package against its peers, measured side by side in one run.

Inference (eval, fp32, random input): timm eager, timm channels_last, timm torch.compile,
onnxruntime on timm's ONNX export; res2net eager, optimize_for_inference (also compiled with
frozen weights), onnxruntime on res2net's ONNX export. Training step (forward, cross-entropy,
backward, SGD with momentum): timm and res2net. Every model holds the same weights (timm's, with
randomised BatchNorm statistics) and sees the same batch; candidates take turns round by round
so that load from other processes hits them alike, and each is reported as its best round (and
median). fp32 torch.mm and a 1x1 convolution of the same size measure the machine's GEMM
rooflines in the same process. torch.compile starts from an empty cache, so its compile time is
a cold one.

    python benchmarks/compare.py --out benchmarks/results.json   # a few minutes on 2 cores
    python benchmarks/report.py benchmarks/results.json           # ratios table and docs/benchmarks.png
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:  # an empty cache: compile times are cold ones
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")

import numpy as np
import onnxruntime
import timm
import torch
from torch import nn
from torch.nn import functional as F

import res2net
from res2net.export import export_onnx
from res2net.profile import (
    conv_gemm_gflops,
    count_flops,
    machine_info,
    matmul_gflops,
    time_interleaved,
)

NAME, TIMM_NAME = "res2net50_26w_4s", "res2net50_26w_4s"
CL = torch.channels_last


def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics, so that folding them is really exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) + 0.5
            m.bias.data = torch.randn(n, generator=g) * 0.2
            m.running_mean = torch.randn(n, generator=g) * 0.2
            m.running_var = torch.rand(n, generator=g) + 0.5


def ort_session(path: Path) -> onnxruntime.InferenceSession:
    """onnxruntime on the CPU with as many intra-op threads as torch uses. Spinning is off: a
    spinning pool keeps the cores busy after each run and would slow the next candidate."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def export_timm_onnx(model: nn.Module, x: torch.Tensor, path: Path) -> None:
    """timm's model as ONNX with a dynamic batch, by torch's dynamo exporter: the peer file."""
    torch.onnx.export(
        model,
        (x,),
        str(path),
        dynamo=True,
        input_names=["image"],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},),
        verbose=False,
    )


def summarize(
    times: dict[str, list[float]], batch: int, flops_per_step: float, roofline: float
) -> dict[str, dict]:
    """Best and median ms, img/s and achieved GFLOP/s (and its share of `roofline`) per candidate."""
    out = {}
    for name, ms in times.items():
        best = min(ms)
        out[name] = {
            "best_ms": best,
            "median_ms": statistics.median(ms),
            "times_ms": ms,
            "img_s": batch * 1000.0 / best,
            "gflop_s": flops_per_step / (best / 1000.0) / 1e9,
            "roofline_frac": flops_per_step / (best / 1000.0) / 1e9 / roofline,
        }
    return out


def first_call_s(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_inference(
    timm_model: nn.Module, ours: nn.Module, x: torch.Tensor, rounds: int, compile: bool, tmp: Path
) -> tuple[dict, dict]:
    timm_model.eval()
    ours.eval()
    timm_cl = timm.create_model(TIMM_NAME).eval()
    timm_cl.load_state_dict(timm_model.state_dict())
    timm_cl = timm_cl.to(memory_format=CL)
    x_cl = x.contiguous(memory_format=CL)
    optimized = res2net.optimize_for_inference(ours)

    export_s: dict[str, float] = {}
    start = time.perf_counter()
    export_timm_onnx(timm_model, x, tmp / "timm.onnx")
    export_s["onnxruntime (timm ONNX)"] = time.perf_counter() - start
    start = time.perf_counter()
    export_onnx(ours, tmp / "res2net.onnx", image_size=x.shape[-1])
    export_s["onnxruntime (res2net ONNX)"] = time.perf_counter() - start
    timm_ort, ours_ort = ort_session(tmp / "timm.onnx"), ort_session(tmp / "res2net.onnx")
    x_np = x.numpy()

    candidates: dict[str, Callable[[], object]] = {
        "timm eager": lambda: timm_model(x),
        "timm channels_last": lambda: timm_cl(x_cl),
        "onnxruntime (timm ONNX)": lambda: torch.from_numpy(timm_ort.run(None, {"image": x_np})[0]),
        "res2net eager": lambda: ours(x),
        "res2net optimize_for_inference": lambda: optimized(x),
        "onnxruntime (res2net ONNX)": lambda: torch.from_numpy(
            ours_ort.run(None, {"image": x_np})[0]
        ),
    }
    compile_s: dict[str, float] = {}
    with torch.inference_mode():
        if compile:
            timm_compiled = torch.compile(timm_model)
            ours_compiled = res2net.optimize_for_inference(ours, compile=True)
            candidates["timm torch.compile"] = lambda: timm_compiled(x)
            candidates["res2net optimize_for_inference(compile=True)"] = lambda: ours_compiled(x)
            compile_s["timm torch.compile"] = first_call_s(candidates["timm torch.compile"])
            compile_s["res2net optimize_for_inference(compile=True)"] = first_call_s(
                candidates["res2net optimize_for_inference(compile=True)"]
            )
        reference = timm_model(x)
        errors = {
            name: ((fn() - reference).abs().max() / reference.abs().max()).item()
            for name, fn in candidates.items()
        }
        times = time_interleaved(candidates, warmup=1, rounds=rounds)
    extra = {"compile_s": compile_s, "export_s": export_s, "max_rel_err_vs_timm_eager": errors}
    return times, extra


def bench_training(
    timm_model: nn.Module, ours: nn.Module, x: torch.Tensor, rounds: int
) -> dict[str, list[float]]:
    target = torch.randint(0, 1000, (x.shape[0],), generator=torch.Generator().manual_seed(0))

    def step_fn(model: nn.Module, inp: torch.Tensor) -> Callable[[], None]:
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

        def step() -> None:
            loss = F.cross_entropy(model(inp), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return step

    timm_cl = timm.create_model(TIMM_NAME)
    timm_cl.load_state_dict(timm_model.state_dict())
    candidates = {
        "timm train step": step_fn(timm_model, x),
        "timm train step, channels_last": step_fn(
            timm_cl.to(memory_format=CL), x.contiguous(memory_format=CL)
        ),
        "res2net train step": step_fn(ours, x),
    }
    return time_interleaved(candidates, warmup=1, rounds=rounds)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument(
        "--rounds",
        type=int,
        default=8,
        help="timed calls of each candidate (best and median reported)",
    )
    parser.add_argument("--train_rounds", type=int, default=5)
    parser.add_argument(
        "--no_compile",
        action="store_true",
        help="skip the torch.compile candidates (about a minute each)",
    )
    parser.add_argument("--skip", choices=("inference", "training"), help="run only the other part")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    torch.manual_seed(0)
    timm_model = timm.create_model(TIMM_NAME)
    randomize_bn(timm_model)
    ours = res2net.create_model(NAME)
    ours.load_state_dict(timm_model.state_dict())
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    flops = count_flops(ours, args.image_size) * args.batch_size

    result: dict = {
        "machine": machine_info(),
        "load_before": os.getloadavg(),
        "timm": timm.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "gflop_per_image": flops / args.batch_size / 1e9,
        "allocator_env": {
            k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "LD_PRELOAD"
        },
        "matmul_gflop_s": matmul_gflops(n=2048, repeats=5),
        "conv_gemm_gflop_s": conv_gemm_gflops(n=1024, repeats=5),
    }
    roofline = result["matmul_gflop_s"]
    if args.skip != "inference":
        with tempfile.TemporaryDirectory() as tmp:
            times, extra = bench_inference(
                timm_model, ours, x, args.rounds, not args.no_compile, Path(tmp)
            )
        result["inference"] = {
            "candidates": summarize(times, args.batch_size, flops, roofline),
            **extra,
        }
    if args.skip != "training":
        times = bench_training(timm_model, ours, x, args.train_rounds)
        # a training step is about 3 forward passes of FLOPs (forward, input and weight gradients)
        result["training"] = {"candidates": summarize(times, args.batch_size, 3 * flops, roofline)}
    result["load_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
