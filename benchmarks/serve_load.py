"""Load test of `res2net serve`: concurrent clients POST a JPEG for a while; throughput and
p50/p99 latency per number of clients, with micro-batching (max_batch 16) and without (1).

Run by hand (the server is a subprocess, so clients and server do not share a GIL):

    python benchmarks/serve_load.py --out benchmarks/results/serve-cpu.json [--device cuda]
    python benchmarks/serve_load.py --report benchmarks/results/serve-cpu.json \
        --png docs/serving.png

The served model is Res2Net-50 (1000 classes, random weights: the speed does not depend on
them) at 224x224; the image is a 500x375 JPEG, ImageNet's typical size.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def jpeg() -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 255, (375, 500, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def start_server(weights: Path, device: str, max_batch: int) -> tuple[subprocess.Popen, int]:
    cmd = [
        sys.executable,
        "-m",
        "res2net.cli.main",
        "serve",
        "--ckpt_path",
        str(weights),
        "--port",
        "0",
        "--device",
        device,
        "--max_batch",
        str(max_batch),
        "--max_wait_ms",
        "5",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None  # stdout=PIPE
    line = proc.stdout.readline()
    if "serving" not in line:
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    return proc, int(line.rsplit(":", 1)[1].strip("/\n"))


def model_seconds(port: int) -> tuple[float, int, int]:
    """The server's own counters: seconds inside the model, images, model calls."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    values = dict(
        line.split(" ", 1) for line in text.splitlines() if line and not line.startswith("#")
    )
    return (
        float(values["res2net_inference_seconds_total"]),
        int(values["res2net_images_total"]),
        int(values["res2net_batches_total"]),
    )


def load(port: int, body: bytes, clients: int, seconds: float) -> dict[str, float]:
    """`clients` threads, each with its own keep-alive connection, posting for `seconds`."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        mine = []
        while time.perf_counter() < stop:
            t = time.perf_counter()
            conn.request("POST", "/predict", body=body, headers={"Content-Type": "image/jpeg"})
            response = conn.getresponse()
            response.read()
            if response.status == 200:
                mine.append(time.perf_counter() - t)
            else:
                errors[0] += 1
        conn.close()
        with lock:
            latencies.extend(mine)

    before = model_seconds(port)
    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    busy, images, calls = (a - b for a, b in zip(model_seconds(port), before))
    q = np.quantile(latencies, [0.5, 0.99]) if latencies else [float("nan")] * 2
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": errors[0],
        "seconds": wall,
        "throughput": len(latencies) / wall,
        "p50_ms": 1000 * q[0],
        "p99_ms": 1000 * q[1],
        "model_busy": busy / wall,
        "images_per_call": images / max(1, calls),
    }


def measure(args: argparse.Namespace) -> dict:
    import torch

    import res2net

    body = jpeg()
    out = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "device": args.device,
        "torch": torch.__version__,
        "load_average": os.getloadavg(),
        "runs": [],
    }
    if args.device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name(0)
    with tempfile.TemporaryDirectory() as tmp:
        model = res2net.create_model("res2net50_26w_4s")
        res2net.save_to_folder(model, tmp, arch="res2net50_26w_4s")
        for max_batch in args.max_batch:
            proc, port = start_server(Path(tmp) / "model.safetensors", args.device, max_batch)
            try:
                load(port, body, 2, args.warmup)  # warm-up: first calls, allocator, cudnn plans
                for clients in args.clients:
                    row = {"max_batch": max_batch, **load(port, body, clients, args.seconds)}
                    print(json.dumps(row), flush=True)
                    out["runs"].append(row)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    return out


def report(path: Path, png: Path | None) -> str:
    data = json.loads(path.read_text())
    lines = [
        "| max_batch | clients | img/s | p50 ms | p99 ms | images per model call | model busy "
        "| errors |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["runs"]:
        lines.append(
            f"| {r['max_batch']} | {r['clients']} | {r['throughput']:.1f} | {r['p50_ms']:.0f} | "
            f"{r['p99_ms']:.0f} | {r['images_per_call']:.1f} | {100 * r['model_busy']:.0f}% "
            f"| {r['errors']} |"
        )
    if png is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for max_batch in sorted({r["max_batch"] for r in data["runs"]}):
            rows = [r for r in data["runs"] if r["max_batch"] == max_batch]
            label = "micro-batching (16)" if max_batch > 1 else "one image per call"
            axes[0].plot(
                [r["clients"] for r in rows],
                [r["throughput"] for r in rows],
                marker="o",
                label=label,
            )
            axes[1].plot(
                [r["clients"] for r in rows],
                [r["p50_ms"] for r in rows],
                marker="o",
                label=f"{label} p50",
            )
            axes[1].plot(
                [r["clients"] for r in rows],
                [r["p99_ms"] for r in rows],
                marker="x",
                ls="--",
                label=f"{label} p99",
            )
        axes[0].set(
            title=f"throughput ({data['device']})", xlabel="concurrent clients", ylabel="images/s"
        )
        axes[1].set(title="latency", xlabel="concurrent clients", ylabel="ms")
        for ax in axes:
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(png, dpi=110)
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, help="write the measurements here (JSON)")
    p.add_argument("--report", type=Path, help="print the table of a measurement JSON")
    p.add_argument("--png", type=Path, help="with --report: write the plot here")
    p.add_argument("--device", default="cpu")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 32])
    p.add_argument("--max_batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=3.0)
    args = p.parse_args()
    if args.report:
        print(report(args.report, args.png))
        return
    result = measure(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
