"""Facts about a model: parameter count, FLOPs, forward time, and the benchmark of a training
step or an inference pass (the seed table's columns) with the machine it ran on."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from .errors import ConfigError


def count_params(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters; BatchNorm statistics are buffers and not counted."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def count_flops(model: nn.Module, image_size: int = 224, in_chans: int = 3) -> int:
    """FLOPs of one forward pass on one image (a multiply-add counts as 2, as PyTorch's
    FlopCounterMode does; the paper's "4.2 GFLOPs" for Res2Net-50 counts multiply-adds once)."""
    was_training = model.training
    model.eval()
    x = torch.zeros(1, in_chans, image_size, image_size, device=next(model.parameters()).device)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops()


@torch.no_grad()
def time_forward(
    model: nn.Module, batch_size: int = 1, image_size: int = 224, repeats: int = 5, warmup: int = 1
) -> float:
    """Median wall-clock milliseconds of an eval forward pass, after `warmup` untimed passes."""
    model.eval()
    device = next(model.parameters()).device
    x = torch.randn(batch_size, 3, image_size, image_size, device=device)
    return statistics.median(
        time_calls(lambda: model(x), device, warmup=max(1, warmup), repeats=repeats)[1]
    )


# ---- benchmarking: the seed table's columns (model, params, cards, batch, resolution, jit level,
# graph compile s, ms/step, img/s), measured after warm-up as the median of repeats.


@dataclass
class StepTiming:
    """One benchmark row. `compile_s` is the first call's extra time over a steady step (graph
    capture and code generation when compiled); `steps_ms` are the timed repeats."""

    model: str
    params_m: float
    cards: int
    batch_size: int
    resolution: int
    jit_level: str
    compile_s: float | None
    ms_per_step: float
    img_per_s: float
    mode: str
    precision: str
    layout: str
    steps_ms: list[float] = field(default_factory=list)


def synchronize(device: torch.device) -> None:
    """Wait for queued work on `device` (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(
    fn: Callable[[], object], device: torch.device, warmup: int = 2, repeats: int = 5
) -> tuple[float, list[float]]:
    """Seconds of the first call (compilation included), and milliseconds of each of `repeats`
    calls made after `warmup` untimed ones (the first call counts as a warm-up)."""
    start = time.perf_counter()
    fn()
    synchronize(device)
    first_s = time.perf_counter() - start
    for _ in range(warmup - 1):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1000.0)
    return first_s, times


def time_interleaved(
    candidates: Mapping[str, Callable[[], object]],
    device: torch.device | str = "cpu",
    warmup: int = 1,
    rounds: int = 5,
) -> dict[str, list[float]]:
    """Milliseconds of each call of each candidate, taking turns (one call of each per round)
    so that load from other processes affects them alike; `warmup` untimed calls each first."""
    device = torch.device(device)
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append((time.perf_counter() - start) * 1000.0)
    return times


def machine_info(device: torch.device | str = "cpu") -> dict[str, str | int]:
    """What the numbers were measured on: CPU model, cores, torch threads and version,
    accelerator."""
    device = torch.device(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu
            )
    except OSError:
        pass
    info: dict[str, str | int] = {
        "cpu": cpu,
        "cores": os.cpu_count() or 0,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device.type,
    }
    if device.type == "cuda":
        info["accelerator"] = torch.cuda.get_device_name(device)
    return info


def matmul_gflops(n: int = 2048, repeats: int = 5, device: torch.device | str = "cpu") -> float:
    """Best fp32 `torch.mm` throughput on two n x n matrices, in GFLOP/s (2 n^3 FLOPs per
    product): the BLAS roofline that convolution throughput is measured against."""
    device = torch.device(device)
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    _, times = time_calls(lambda: torch.mm(a, b), device, warmup=2, repeats=repeats)
    return 2.0 * n**3 / (min(times) / 1000.0) / 1e9


def conv_gemm_gflops(n: int = 1024, repeats: int = 5, device: torch.device | str = "cpu") -> float:
    """Best fp32 throughput, in GFLOP/s, of the same n x n x n product run as a 1x1 convolution
    (n channels in and out over n pixels, channels_last): the convolution library's own GEMM,
    which on some CPUs is faster than `torch.mm`'s BLAS."""
    device = torch.device(device)
    x = torch.randn(1, n, 32, n // 32, device=device).contiguous(memory_format=torch.channels_last)
    w = torch.randn(n, n, 1, 1, device=device)
    _, times = time_calls(lambda: F.conv2d(x, w), device, warmup=2, repeats=repeats)
    return 2.0 * n * n * (32 * (n // 32)) / (min(times) / 1000.0) / 1e9


def _precision_label(precision: str, amp: bool, mode: str) -> str:
    if mode == "infer" and precision != "fp32":
        return precision + (" (+autocast)" if amp else "")
    return "bf16 autocast" if amp else "fp32"


def benchmark_model(
    model: nn.Module,
    name: str,
    *,
    batch_size: int,
    image_size: int,
    mode: str = "infer",
    device: torch.device | str = "cpu",
    compile: bool = False,
    optimize: bool = False,
    amp: bool = False,
    channels_last: bool = False,
    precision: str = "fp32",
    cards: int = 1,
    warmup: int = 2,
    repeats: int = 5,
) -> StepTiming:
    """Time one training step (forward, cross-entropy, backward, SGD update) or one inference
    forward of `model` on random data; `compile` wraps it in `torch.compile`, `optimize` (infer
    only) uses `optimize_for_inference`, `amp` autocasts to bfloat16. With `cards` > 1 the
    caller has joined a process group of that size; the model is wrapped in DDP and img/s
    counts every card's batch. `precision` "bf16" or "int8" (infer only; int8 calibrated on
    random batches, which sets its speed but not meaningful accuracy) uses
    `optimize_for_inference(precision=...)`; in training "bf16" means autocast, as `amp`."""
    if mode not in ("train", "infer"):
        raise ConfigError(f"mode={mode!r} is invalid: choose train or infer")
    if precision == "int8" and mode == "train":
        raise ConfigError("precision int8 applies to inference only: use --mode infer")
    if precision == "bf16" and mode == "train":
        amp = True
    optimize = optimize or (mode == "infer" and precision != "fp32")
    if optimize and mode == "train":
        raise ConfigError(
            "optimize applies to inference only (optimize_for_inference is eval-only)"
        )
    device = torch.device(device)
    params_m = count_params(model) / 1e6
    model = model.to(device)
    in_chans = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    x = torch.randn(batch_size, in_chans, image_size, image_size, device=device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=memory_format)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)

    if mode == "infer":
        model.eval()
        if optimize:
            from .inference import optimize_for_inference

            calibration = [torch.randn_like(x) for _ in range(2)] if precision == "int8" else None
            model = optimize_for_inference(
                model, precision=precision, calibration=calibration, compile=compile
            )
            infer: Callable[[torch.Tensor], Any] = model
        else:
            model = model.to(memory_format=memory_format)
            infer = torch.compile(model) if compile else model

        def step() -> None:
            with torch.inference_mode(), autocast:
                infer(x)

    else:
        model.train().to(memory_format=memory_format)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        train_model: nn.Module = model
        if cards > 1:
            train_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        forward = torch.compile(train_model) if compile else train_model
        num_classes = getattr(model, "num_classes", 1000) or 1000
        target = torch.randint(0, num_classes, (batch_size,), device=device)

        def step() -> None:
            with autocast:
                loss = F.cross_entropy(forward(x), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    first_s, times = time_calls(step, device, warmup=warmup, repeats=repeats)
    ms = statistics.median(times)
    compiled = compile or precision == "int8"  # int8 is always compiled
    jit = "+".join(["optimized"] * optimize + ["compile"] * compiled) or "eager"
    return StepTiming(
        model=name,
        params_m=params_m,
        cards=cards,
        batch_size=batch_size,
        resolution=image_size,
        jit_level=jit,
        compile_s=max(0.0, first_s - ms / 1000.0) if compiled else None,
        ms_per_step=ms,
        img_per_s=cards * batch_size * 1000.0 / ms,
        mode=mode,
        precision=_precision_label(precision, amp, mode),
        layout="channels_last" if channels_last or optimize else "contiguous",
        steps_ms=times,
    )
