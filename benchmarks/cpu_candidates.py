"""Candidate speed-ups on CPU, each against what the package does today, side by side in one
run (Res2Net-50 26w_4s, batch 8, 224x224, random weights and inputs):

- int8 inference: `optimize_for_inference(precision="int8")` as shipped (dynamic batch
  dimension) against the same quantized graph exported with a static batch, compiled with
  Inductor's `max-autotune`, and run with its float parts in bf16 (`torch.autocast` around
  compilation and calls: PyTorch's "int8-mixed-bf16" recipe for the X86InductorQuantizer);
- a training step (forward, backward, SGD) in eager mode against `torch.compile` of the model,
  in fp32 or bf16 autocast.

Keep what wins; docs/benchmarks.md records what each measured.

    python benchmarks/cpu_candidates.py --out benchmarks/results/cpu-candidates.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:  # an empty cache: compile times are cold ones
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")

import torch
from torch import nn

import res2net
from res2net.inference import FrozenCompiled, optimize_for_inference
from res2net.profile import machine_info, time_interleaved

NAME = "res2net50_26w_4s"
BATCH = 8


class Int8MixedBf16(FrozenCompiled):
    """A quantized graph whose float parts run in bf16 (autocast while compiling and calling)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = super().forward(x)
        assert isinstance(out, torch.Tensor)  # a classifier: one tensor of logits
        return out.float()


class MaxAutotune(FrozenCompiled):
    """`FrozenCompiled` with Inductor's `max-autotune` mode."""

    def __init__(self, module: nn.Module) -> None:
        nn.Module.__init__(self)
        self.compiled = torch.compile(module, mode="max-autotune")


def static_batch_int8(model: nn.Module, calibration: list[torch.Tensor]) -> FrozenCompiled:
    """The shipped int8 model, but exported with the batch size fixed."""
    export = torch.export.export

    def static_export(*args: Any, dynamic_shapes: Any = None, **kwargs: Any) -> Any:
        return export(*args, **kwargs)

    torch.export.export = static_export
    try:
        quantized = optimize_for_inference(model, precision="int8", calibration=calibration)
    finally:
        torch.export.export = export
    assert isinstance(quantized, FrozenCompiled)
    return quantized


def first_call(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def int8_candidates(x: torch.Tensor) -> dict[str, Callable[[], object]]:
    model = res2net.create_model(NAME, num_classes=1000).eval()
    calibration = [torch.randn_like(x) for _ in range(4)]
    shipped = optimize_for_inference(model, precision="int8", calibration=calibration)
    assert isinstance(shipped, FrozenCompiled)
    static = static_batch_int8(model, calibration)
    graph: nn.Module = static.compiled._orig_mod  # type: ignore[attr-defined]  # compiled module
    candidates = {
        "int8 as shipped": shipped,
        "int8 static batch": static,
        "int8 static batch, max-autotune": MaxAutotune(graph),
        "int8 static batch, float parts bf16": Int8MixedBf16(graph),
    }
    return {name: partial(m, x) for name, m in candidates.items()}


def train_candidates(x: torch.Tensor, precision: str) -> dict[str, Callable[[], object]]:
    y = torch.randint(0, 1000, (x.shape[0],))

    def step_of(model: nn.Module) -> Callable[[], object]:
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    eager = res2net.create_model(NAME, num_classes=1000).train()
    compiled = torch.compile(res2net.create_model(NAME, num_classes=1000).train())
    assert isinstance(compiled, nn.Module)  # torch.compile of a module is an OptimizedModule
    return {
        f"train step {precision} eager": step_of(eager),
        f"train step {precision} torch.compile": step_of(compiled),
    }


def measure(candidates: dict[str, Callable[[], object]], rounds: int) -> dict[str, dict]:
    compile_s = {name: first_call(fn) for name, fn in candidates.items()}
    times = time_interleaved(candidates, warmup=1, rounds=rounds)  # int8 models: no autograd
    return {
        name: {
            "first_call_s": compile_s[name],
            "best_img_s": BATCH * 1000 / min(ms),
            "median_img_s": BATCH * 1000 / statistics.median(ms),
            "ms": ms,
        }
        for name, ms in times.items()
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--train_precision", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    torch.manual_seed(0)
    x = torch.randn(BATCH, 3, 224, 224)
    load_before = os.getloadavg()
    results = measure(int8_candidates(x), a.rounds)
    results |= measure(train_candidates(x, a.train_precision), a.rounds)
    record = {
        "machine": machine_info(),
        "model": NAME,
        "batch_size": BATCH,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "results": results,
    }
    a.out.write_text(json.dumps(record, indent=1))
    for name, r in results.items():
        print(
            f"{name:40s} best {r['best_img_s']:6.1f} img/s  median {r['median_img_s']:6.1f}"
            f"  first call {r['first_call_s']:5.0f} s"
        )


if __name__ == "__main__":
    main()
