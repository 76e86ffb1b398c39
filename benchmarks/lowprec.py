"""Low-precision inference of Res2Net-50 (26w_4s): speed against onnxruntime, side by side in
one run, and accuracy of trained models against their fp32 selves.

`speed`: timm's Res2Net-50 weights (random BatchNorm statistics) in every candidate, batch 8,
224x224, one batch of real photos (the corpus of benchmarks/data_pipeline.py: crops of
scikit-image's and scikit-learn's sample photos). Candidates, taking turns round by round:
onnxruntime fp32 on timm's ONNX export; onnxruntime int8 on the same file quantized with
`onnxruntime.quantization.quantize_static` (QDQ, per-channel int8 weights, uint8 activations);
OpenVINO on timm's model (`openvino.convert_model`) in fp32, in its default precision (bf16 on
CPUs with native bf16 math) and in int8 quantized by NNCF (`nncf.quantize`, post-training);
this package's `optimize_for_inference` fp32 (eager and compiled), bf16 (eager and compiled)
and int8. The three int8 models are calibrated on the same 32 photos (4 batches of 8), which
are not the timed batch. Every peer runs with as many threads as torch, one request at a time.

`accuracy`: a trained checkpoint evaluated on an ImageNet-style val folder in fp32, bf16 and
int8 (calibrated on up to 64 images of the train folder), and in OpenVINO (fp32, its default
bf16, NNCF int8 on the same calibration images): top-1 of each and top-1 agreement with ours in
fp32; `--max_drop 0.5` exits 1 when any is more than 0.5 points under it.

    python benchmarks/lowprec.py speed --rounds 10 --out benchmarks/results/lowprec-cpu2.json
    python benchmarks/lowprec.py plot benchmarks/results/lowprec-cpu2.json \\
        --train benchmarks/results/train-e2e-cpu2.json --png docs/lowprec.png
    python benchmarks/lowprec.py photos --out_dir data/photos   # then fine-tune on it (docs)
    python benchmarks/lowprec.py accuracy --ckpt runs/digits/best.ckpt --data_dir data/digits \\
        --image_size 32 --crop_pct 1.0 --out benchmarks/results/lowprec-acc-digits.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:  # an empty cache: compile times are cold ones
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")

import onnxruntime
import timm
import torch
from compare import export_timm_onnx, ort_session, randomize_bn
from data_pipeline import build_corpus

import res2net
from res2net.export import quantize_onnx
from res2net.lowprec import calibration_batches
from res2net.profile import machine_info, time_interleaved

NAME = "res2net50_26w_4s"


def timed_first_call(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def openvino_models(
    model: torch.nn.Module, example: torch.Tensor, calibration: list[torch.Tensor], bf16: bool
) -> tuple[dict[str, Callable[[torch.Tensor], torch.Tensor]], dict[str, float], dict[str, str]]:
    """OpenVINO on `model` (converted with `openvino.convert_model`), by precision: fp32, its CPU
    default (bf16 where the CPU has native bf16 math; only with `bf16`) and NNCF post-training
    int8 calibrated on `calibration`; each compiled for latency (one request) with as many
    threads as torch, taking and returning float32 tensors. Also returns the setup seconds and
    the precision OpenVINO reports for each."""
    try:
        import nncf
        import openvino as ov
    except ImportError as e:
        sys.exit(f"{e}: pip install 'res2net[openvino]' (or pass --no_openvino)")
    core = ov.Core()
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": torch.get_num_threads()}
    start = time.perf_counter()
    fp32_model = ov.convert_model(model, example_input=example)
    setup_s = {"openvino convert_model": time.perf_counter() - start}
    start = time.perf_counter()
    dataset = nncf.Dataset([b.numpy() for b in calibration])
    int8_model = nncf.quantize(fp32_model, dataset, subset_size=len(calibration))
    setup_s["openvino NNCF int8 quantize"] = time.perf_counter() - start
    compiled = {
        "fp32": core.compile_model(
            fp32_model, "CPU", {**config, "INFERENCE_PRECISION_HINT": "f32"}
        ),
        "int8": core.compile_model(int8_model, "CPU", config),
    }
    if bf16:  # no hint: OpenVINO's own default, bf16 on such CPUs
        compiled["bf16"] = core.compile_model(fp32_model, "CPU", config)
    precision = {k: str(c.get_property("INFERENCE_PRECISION_HINT")) for k, c in compiled.items()}

    def runner(c: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda x: torch.from_numpy(c(x.numpy())[0])

    return {k: runner(c) for k, c in compiled.items()}, setup_s, precision


OPENVINO_NAMES = {
    "fp32": "openvino fp32 (timm)",
    "bf16": "openvino bf16 (timm, its default)",
    "int8": "openvino int8 (timm, NNCF)",
}


def speed(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)  # onnxruntime gets as many intra-op threads
    torch.manual_seed(0)
    timm_model = timm.create_model(NAME).eval()
    randomize_bn(timm_model)
    ours = res2net.create_model(NAME).eval()
    ours.load_state_dict(timm_model.state_dict())
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        build_corpus(tmp / "photos", per_photo=4)
        images = calibration_batches(
            tmp / "photos", batch_size=args.batch_size, max_images=5 * args.batch_size
        )
        x, calibration = images[0], images[1:5]
        export_timm_onnx(timm_model, x, tmp / "timm.onnx")
        start = time.perf_counter()
        quantize_onnx(tmp / "timm.onnx", tmp / "timm-int8.onnx", calibration)
        setup_s = {"onnxruntime int8 quantize_static": time.perf_counter() - start}
        ort_fp32, ort_int8 = ort_session(tmp / "timm.onnx"), ort_session(tmp / "timm-int8.onnx")
    x_np = x.numpy()
    start = time.perf_counter()
    ours_int8 = res2net.optimize_for_inference(ours, precision="int8", calibration=calibration)
    setup_s["res2net int8 quantize"] = time.perf_counter() - start
    candidates: dict[str, Callable[[], torch.Tensor]] = {
        "onnxruntime fp32 (timm ONNX)": lambda: torch.from_numpy(
            ort_fp32.run(None, {"image": x_np})[0]
        ),
        "onnxruntime int8 (timm ONNX, quantize_static)": lambda: torch.from_numpy(
            ort_int8.run(None, {"image": x_np})[0]
        ),
        "res2net fp32": partial(res2net.optimize_for_inference(ours), x),
        "res2net int8": partial(ours_int8, x),
    }
    bf16 = res2net.lowprec.bf16_supported()
    openvino_precision: dict[str, str] = {}
    if not args.no_openvino:
        peers, seconds, by_precision = openvino_models(timm_model, x, calibration, bf16)
        for precision, run in peers.items():
            candidates[OPENVINO_NAMES[precision]] = partial(run, x)
            openvino_precision[OPENVINO_NAMES[precision]] = by_precision[precision]
        setup_s.update(seconds)
    if bf16:
        bf16_model = res2net.optimize_for_inference(ours, precision="bf16")
        candidates["res2net bf16"] = lambda: bf16_model(x)
    if not args.no_compile:
        fp32_c = res2net.optimize_for_inference(ours, compile=True)
        candidates["res2net fp32 compiled"] = lambda: fp32_c(x)
        if bf16:
            bf16_c = res2net.optimize_for_inference(ours, precision="bf16", compile=True)
            candidates["res2net bf16 compiled"] = lambda: bf16_c(x)
    with torch.inference_mode():
        compile_s = {
            name: timed_first_call(fn)
            for name, fn in candidates.items()
            if name.startswith("res2net")
        }
        reference = ours(x)
        quality = {
            name: {
                "max_rel_err_vs_fp32": ((y := fn().float()) - reference).abs().max().item()
                / reference.abs().max().item(),
                "top1_agreement_vs_fp32": (y.argmax(1) == reference.argmax(1))
                .float()
                .mean()
                .item(),
            }
            for name, fn in candidates.items()
        }
        load_before = os.getloadavg()
        times = time_interleaved(candidates, warmup=1, rounds=args.rounds)
    rows = {
        name: {
            "best_ms": min(ms),
            "median_ms": statistics.median(ms),
            "img_s": args.batch_size * 1000.0 / min(ms),
            "times_ms": ms,
            **quality[name],
        }
        for name, ms in times.items()
    }
    return {
        "batch_size": args.batch_size,
        "image_size": 224,
        "first_call_s": compile_s,
        "setup_s": setup_s,
        "openvino_precision": openvino_precision,
        "threads": torch.get_num_threads(),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "candidates": rows,
        "ratios": ratios(rows),
    }


def ratios(rows: dict) -> dict:
    """Targets: speed of ours over the peer in the same run, best round and median; and, per
    precision, ours' fastest candidate over the fastest peer (onnxruntime or OpenVINO)."""
    pairs = {
        "res2net int8 / onnxruntime int8": (
            "res2net int8",
            "onnxruntime int8 (timm ONNX, quantize_static)",
        ),
        "res2net int8 / openvino int8": ("res2net int8", "openvino int8 (timm, NNCF)"),
        "res2net fp32 compiled / openvino fp32": (
            "res2net fp32 compiled",
            "openvino fp32 (timm)",
        ),
        "res2net bf16 compiled / openvino bf16": (
            "res2net bf16 compiled",
            "openvino bf16 (timm, its default)",
        ),
        "res2net bf16 / res2net fp32": ("res2net bf16", "res2net fp32"),
        "res2net bf16 compiled / res2net fp32 compiled": (
            "res2net bf16 compiled",
            "res2net fp32 compiled",
        ),
        "res2net int8 / res2net fp32 compiled": ("res2net int8", "res2net fp32 compiled"),
        "onnxruntime int8 / onnxruntime fp32": (
            "onnxruntime int8 (timm ONNX, quantize_static)",
            "onnxruntime fp32 (timm ONNX)",
        ),
    }
    for precision in ("fp32", "bf16", "int8"):
        ours = [n for n in rows if n.startswith(f"res2net {precision}")]
        peers = [n for n in rows if not n.startswith("res2net") and f" {precision} " in f"{n} "]
        if ours and peers:
            for stat in ("best", "median"):
                key = f"{stat}_ms"
                pairs[f"res2net {precision} / best peer ({stat})"] = (
                    min(ours, key=lambda n: rows[n][key]),
                    min(peers, key=lambda n: rows[n][key]),
                )
    out = {}
    for label, (ours_name, peer) in pairs.items():
        if ours_name in rows and peer in rows:
            out[label] = {
                "best": rows[peer]["best_ms"] / rows[ours_name]["best_ms"],
                "median": rows[peer]["median_ms"] / rows[ours_name]["median_ms"],
                "ours": ours_name,
                "peer": peer,
            }
    return out


@torch.inference_mode()
def top1(
    model: Callable[[torch.Tensor], torch.Tensor], batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[float, torch.Tensor]:
    preds = torch.cat([model(x).float().argmax(1) for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    return (preds == labels).float().mean().item() * 100.0, preds


def accuracy(args: argparse.Namespace) -> dict:
    from torch.utils.data import DataLoader

    from res2net.data import ImageFolderDataset, eval_transform

    checkpoint = res2net.read_checkpoint(args.ckpt, model=args.model)
    if checkpoint.num_classes is None:
        sys.exit(f"{args.ckpt}: no classifier in this checkpoint, so nothing to classify with")
    model = res2net.create_model(
        args.model, num_classes=checkpoint.num_classes, checkpoint=checkpoint
    ).eval()
    transform = eval_transform(args.image_size, crop_pct=args.crop_pct)
    val = ImageFolderDataset(args.data_dir, "val", transform=transform)
    batches = list(DataLoader(val, batch_size=args.batch_size, shuffle=False))
    calibration = calibration_batches(
        Path(args.data_dir) / "train",
        image_size=args.image_size,
        crop_pct=args.crop_pct,
        batch_size=args.batch_size,
    )
    candidates: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "fp32": res2net.optimize_for_inference(model)
    }
    if res2net.lowprec.bf16_supported():
        candidates["bf16"] = res2net.optimize_for_inference(model, precision="bf16")
    candidates["int8"] = res2net.optimize_for_inference(
        model, precision="int8", calibration=calibration
    )
    if not args.no_openvino:
        runs, _, _ = openvino_models(model, calibration[0], calibration, "bf16" in candidates)
        candidates.update({f"openvino {k}": v for k, v in runs.items()})
    results, preds = {}, {}
    for name, m in candidates.items():
        results[name], preds[name] = top1(m, batches)
    out = {
        "checkpoint": str(args.ckpt),
        "val_images": len(val),
        "calibration_images": sum(len(b) for b in calibration),
    }
    for name in candidates:
        out[name] = {
            "top1": results[name],
            "top1_minus_fp32": results[name] - results["fp32"],
            "agreement_with_fp32": (preds[name] == preds["fp32"]).float().mean().item() * 100.0,
        }
    return out


def accuracy_failures(result: dict, max_drop: float) -> list[str]:
    """Each candidate whose top-1 is more than `max_drop` points under ours in fp32."""
    return [
        f"{name} {row['top1']:.2f} ({row['top1_minus_fp32']:+.2f} points)"
        for name, row in result.items()
        if isinstance(row, dict) and row.get("top1_minus_fp32", 0.0) < -max_drop
    ]


def photos(args: argparse.Namespace) -> None:
    """An ImageNet-style photo set: one class per sample photo, random crops at ImageNet-like
    sizes; train and val crops come from different random draws."""
    root = args.out_dir
    build_corpus(root, per_photo=args.train_per_class, seed=0)
    build_corpus(root / "val-src", per_photo=args.val_per_class, seed=1)
    (root / "val-src" / "train").rename(root / "val")
    (root / "val-src").rmdir()
    print(f"wrote {root}/train and {root}/val")


def plot(args: argparse.Namespace) -> None:
    """Images per second of each inference candidate (best round, and median as a tick) and,
    when given, of both trainers end to end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed = json.loads(args.speed.read_text())
    load = max(speed["load_before"] + speed["load_after"])
    title = f"inference, batch {speed['batch_size']}, 224x224 (load average up to {load:.1f})"
    panels = [(title, speed["candidates"], "best_ms", "median_ms", speed["batch_size"])]
    fig, axes = plt.subplots(
        1, 1 + bool(args.train), figsize=(12 if args.train else 8, 4.5), squeeze=False
    )
    for ax, (title, rows, best, median, batch) in zip(axes[0], panels):
        names = sorted(rows, key=lambda n: rows[n][best])
        ax.barh(names, [batch * 1000.0 / rows[n][best] for n in names], color="tab:blue")
        ax.plot([batch * 1000.0 / rows[n][median] for n in names], names, "k|", markersize=12)
        ax.set_xlabel("images/s (bar: best round, tick: median)")
        ax.set_title(title)
    if args.train:
        result = json.loads(args.train.read_text())
        names = list(result["img_s"])
        ax = axes[0][1]
        ax.barh(names, [result["img_s"][n]["best_runs"] for n in names], color="tab:orange")
        ax.set_xlabel("images/s, steady state\n(data loading included)")
        ax.set_title(
            f"training end to end\nbatch {result['batch_size']}, {result['workers']} workers"
        )
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    print(f"wrote {args.png}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="part", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--batch_size", type=int, default=8)
    s.add_argument("--rounds", type=int, default=8)
    s.add_argument("--threads", type=int, help="torch and onnxruntime threads (default: torch's)")
    s.add_argument(
        "--no_compile", action="store_true", help="skip the compiled fp32/bf16 candidates"
    )
    s.add_argument("--no_openvino", action="store_true", help="skip the OpenVINO candidates")
    a = sub.add_parser("accuracy")
    a.add_argument("--model", default="res2net50")
    a.add_argument("--ckpt", required=True)
    a.add_argument("--data_dir", required=True, help="ImageNet-style folder with train/ and val/")
    a.add_argument("--image_size", type=int, default=224)
    a.add_argument("--crop_pct", type=float, default=0.875)
    a.add_argument("--batch_size", type=int, default=32)
    a.add_argument(
        "--max_drop",
        type=float,
        help="exit 1 when any candidate's top-1 is more than this many points under fp32's",
    )
    a.add_argument("--no_openvino", action="store_true", help="skip the OpenVINO candidates")
    for p in (s, a):
        p.add_argument("--out", type=Path, required=True)
    ph = sub.add_parser("photos", help="write the photo set used to fine-tune a model")
    ph.add_argument("--out_dir", type=Path, required=True)
    ph.add_argument("--train_per_class", type=int, default=32)
    ph.add_argument("--val_per_class", type=int, default=48)
    pl = sub.add_parser("plot", help="PNG of a speed result (and a train_e2e.py result)")
    pl.add_argument("speed", type=Path)
    pl.add_argument("--train", type=Path)
    pl.add_argument("--png", type=Path, required=True)
    args = parser.parse_args()
    if args.part == "photos":
        return photos(args)
    if args.part == "plot":
        return plot(args)
    result = {
        "machine": machine_info(),
        "onnxruntime": onnxruntime.__version__,
        "timm": timm.__version__,
        "flags": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    result.update(speed(args) if args.part == "speed" else accuracy(args))
    if args.part == "speed" and not args.no_openvino:
        from importlib.metadata import version

        result["openvino"] = version("openvino")
        result["nncf"] = version("nncf")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("candidates",)}, indent=1))
    if args.part == "accuracy" and args.max_drop is not None:
        if failures := accuracy_failures(result, args.max_drop):
            sys.exit(
                f"top-1 more than {args.max_drop} points under fp32's: {', '.join(failures)} "
                f"(result in {args.out})"
            )


if __name__ == "__main__":
    main()
