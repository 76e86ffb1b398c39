"""Res2Net-50 on one CUDA GPU: the fast paths checked there, and training images per second
against timm's res2net50_26w_4s under the same settings, measured side by side in one process.

Checks (fp32 with TF32 off, or fp64; random inputs; timm's weights with random BatchNorm
statistics in both models): eval logits, a training step's loss and gradients,
`optimize_for_inference` with and without `compile=True`, and a bf16 autocast training step.

Benchmark: a training step (forward, cross-entropy, backward, SGD with momentum) at batch 128,
224x224, bf16 autocast, channels_last, cuDNN autotuning, eager and under `torch.compile`;
inference at batch 256 in bf16. Candidates take turns, round by round, each round timing
`--steps` steps between CUDA synchronizations; the tables give the median and best round.

    python benchmarks/gpu_train.py --out benchmarks/results/gpu-h200.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
from compare import TIMM_NAME, randomize_bn
from torch import nn
from torch.nn import functional as F

import res2net
from res2net.profile import machine_info, synchronize, time_interleaved

CL = torch.channels_last


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


def grad_of(parameter: nn.Parameter) -> torch.Tensor:
    """A parameter's gradient, flattened (every parameter gets one in these steps)."""
    assert parameter.grad is not None
    return parameter.grad.flatten()


def model_pair(device: torch.device) -> tuple[nn.Module, nn.Module]:
    """timm's and ours, with the same weights."""
    peer = timm.create_model(TIMM_NAME)
    randomize_bn(peer)
    ours = res2net.create_model("res2net50")
    ours.load_state_dict(peer.state_dict())
    return peer.to(device), ours.to(device)


def compiled_check(device: torch.device) -> tuple[str, float, float]:
    """`optimize_for_inference(compile=True)` against the eval model, fp32 without TF32."""
    _, ours = model_pair(device)
    ours.eval()
    x = torch.randn(16, 3, 224, 224, device=device)
    with torch.no_grad():
        difference = rel(res2net.optimize_for_inference(ours, compile=True)(x), ours(x))
    return "optimize_for_inference(compile=True) vs eval (fp32)", difference, 1e-4


def checks(device: torch.device) -> list[tuple[str, float, float]]:
    """(what, relative difference, bound). A training step's gradients are ill-conditioned in
    float32 (an untrained net in train mode: both models' float32 gradients are 3% from their
    float64 ones on the CPU), so ours is compared with timm in float64; in bf16 the loss's error
    against float64 is bounded by timm's."""
    peer, ours = model_pair(device)
    x = torch.randn(16, 3, 224, 224, device=device)
    target = torch.randint(0, 1000, (16,), device=device)
    out: list[tuple[str, float, float]] = []
    with torch.no_grad():
        peer.eval()
        ours.eval()
        reference = peer(x)
        out.append(("eval logits vs timm (fp32)", rel(ours(x), reference), 1e-4))
        out.append(
            (
                "optimize_for_inference vs eval (fp32)",
                rel(res2net.optimize_for_inference(ours)(x), reference),
                1e-4,
            )
        )

    def step(model: nn.Module, dtype: torch.dtype, amp: bool) -> tuple[torch.Tensor, torch.Tensor]:
        model = model.to(dtype).train()
        model.zero_grad(set_to_none=True)
        inp = x.to(dtype).contiguous(memory_format=CL if amp else torch.contiguous_format)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(inp), target)
        loss.backward()
        grads = dict(model.named_parameters())
        return loss.detach(), torch.cat([grad_of(grads[name]) for name in sorted(grads)])

    # BatchNorm statistics move with every step: each model takes its steps from the same state
    state = {
        name: {k: v.clone() for k, v in m.state_dict().items()}
        for name, m in (("peer", peer), ("ours", ours))
    }
    results = {}
    for label, dtype, amp in (("fp64", torch.float64, False), ("bf16", torch.float32, True)):
        for name, model in (("peer", peer), ("ours", ours)):
            model.load_state_dict(state[name])
            results[name, label] = step(model, dtype, amp)
    out.append(
        (
            "train loss vs timm (fp64)",
            rel(results["ours", "fp64"][0], results["peer", "fp64"][0]),
            1e-10,
        )
    )
    out.append(
        (
            "train gradients vs timm (fp64)",
            rel(results["ours", "fp64"][1], results["peer", "fp64"][1]),
            1e-8,
        )
    )
    peer_error = rel(results["peer", "bf16"][0], results["peer", "fp64"][0])
    ours_error = rel(results["ours", "bf16"][0], results["ours", "fp64"][0])
    out.append(
        (
            "bf16 autocast train loss vs fp64 (bound: timm's error x 1.5 + 1e-3)",
            ours_error,
            1.5 * peer_error + 1e-3,
        )
    )
    return out


def interleaved(
    candidates: dict[str, Callable[[], None]], rounds: int, steps: int, device: torch.device
) -> dict[str, list[float]]:
    """ms per call of each candidate, per round of `steps` calls; candidates take turns."""
    batches = {
        name: (lambda fn=fn: [fn() for _ in range(steps)]) for name, fn in candidates.items()
    }
    times = time_interleaved(batches, device, warmup=0, rounds=rounds)
    return {name: [ms / steps for ms in round_ms] for name, round_ms in times.items()}


def train_candidates(
    device: torch.device, batch: int, compiles: tuple[bool, ...]
) -> tuple[dict[str, Callable[[], None]], dict[str, float], dict[str, float]]:
    """Step functions (bf16, channels_last), their first-call (compile) seconds and peak GiB."""
    x = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=CL)
    target = torch.randint(0, 1000, (batch,), device=device)
    candidates: dict[str, Callable[[], None]] = {}
    first_s: dict[str, float] = {}
    peak_gib: dict[str, float] = {}
    for compile in compiles:
        for name, model in zip(("timm", "res2net"), model_pair(device)):
            model = model.to(memory_format=CL).train()
            optimizer = torch.optim.SGD(
                model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4
            )
            run_model = torch.compile(model) if compile else model

            def step(
                run_model: Callable[..., torch.Tensor] = run_model,
                optimizer: torch.optim.Optimizer = optimizer,
            ) -> None:
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    loss = F.cross_entropy(run_model(x), target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

            label = f"{name} train, bf16 + channels_last" + (" + compile" if compile else "")
            synchronize(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            first_s[label] = time.perf_counter() - start
            for _ in range(3):
                step()
            synchronize(device)
            peak_gib[label] = (
                torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
            )
            candidates[label] = step
            print(
                f"ready: {label} (first step {first_s[label]:.1f} s, peak {peak_gib[label]:.1f} GiB)",
                flush=True,
            )
    return candidates, first_s, peak_gib


def infer_candidates(device: torch.device, batch: int) -> dict[str, Callable[[], None]]:
    x = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=CL)
    peer, ours = (m.eval().to(memory_format=CL) for m in model_pair(device))
    optimized = res2net.optimize_for_inference(ours)

    def call(model: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
                model(x)

        return run

    candidates = {
        "timm infer, bf16 + channels_last": call(peer),
        "res2net infer, bf16 + channels_last": call(ours),
        "res2net optimize_for_inference, bf16": call(optimized),
    }
    for fn in candidates.values():
        for _ in range(3):
            fn()
    return candidates


def summary(times: dict[str, list[float]], batch: int) -> dict[str, dict[str, Any]]:
    return {
        name: {
            "median_ms": statistics.median(ms),
            "best_ms": min(ms),
            "img_s": batch * 1000 / statistics.median(ms),
            "rounds_ms": ms,
        }
        for name, ms in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--infer_batch_size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10, help="steps per round and candidate")
    parser.add_argument("--device", default="cuda", help="cpu only to try the script itself")
    parser.add_argument(
        "--no_compile", action="store_true", help="skip the torch.compile candidates and check"
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    # fp32 checks without TF32; the benchmarks run in bf16, where TF32 plays no part
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    record: dict = {"machine": machine_info(device), "batch_size": args.batch_size}

    def save() -> None:  # after each part, so that a run cut short keeps what it measured
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(record, indent=1))

    record["checks"] = checks(device)
    save()
    torch.backends.cudnn.benchmark = True
    compiles = (False,) if args.no_compile else (False, True)
    candidates, first_s, peak = train_candidates(device, args.batch_size, compiles)
    record.update(first_step_s=first_s, peak_gib=peak)
    record["train"] = summary(
        interleaved(candidates, args.rounds, args.steps, device), args.batch_size
    )
    save()
    del candidates
    infer = interleaved(
        infer_candidates(device, args.infer_batch_size), args.rounds, args.steps, device
    )
    record["infer"] = summary(infer, args.infer_batch_size)
    save()
    if not args.no_compile:
        try:
            record["checks"].append(compiled_check(device))
        except Exception as e:  # reported with the other checks rather than losing the tables
            record["checks"].append(
                (
                    f"optimize_for_inference(compile=True) failed: {type(e).__name__}: {e}"[:300],
                    float("nan"),
                    1e-4,
                )
            )
        save()
    report(record, args.batch_size, args.infer_batch_size)


def report(record: dict, batch: int, infer_batch: int) -> None:
    print("\n| check | relative difference | bound |\n|---|---:|---:|")
    for name, value, bound in record["checks"]:
        print(f"| {name} | {value:.2e} | {bound:.1e} {'ok' if value < bound else 'FAILED'} |")
    train, first_s, peak = record["train"], record["first_step_s"], record["peak_gib"]
    print(f"\nTraining, batch {batch}, 224x224, on {record['machine'].get('accelerator', 'cpu')}")
    print(
        "| candidate | median ms/step | best | img/s (median) | first step s | peak GiB | vs timm, same settings |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in train.items():
        peer = train[name.replace("res2net", "timm")]
        print(
            f"| {name} | {r['median_ms']:.1f} | {r['best_ms']:.1f} | {r['img_s']:.0f} | {first_s[name]:.1f} | "
            f"{peak[name]:.1f} | {peer['median_ms'] / r['median_ms']:.2f}x |"
        )
    infer = record["infer"]
    print(f"\nInference, batch {infer_batch}")
    print("| candidate | median ms | img/s | vs timm |\n|---|---:|---:|---:|")
    base = infer["timm infer, bf16 + channels_last"]["median_ms"]
    for name, r in infer.items():
        print(
            f"| {name} | {r['median_ms']:.1f} | {r['img_s']:.0f} | {base / r['median_ms']:.2f}x |"
        )


if __name__ == "__main__":
    main()
