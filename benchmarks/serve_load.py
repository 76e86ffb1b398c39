"""Load test of `res2net serve`, side by side in one run: the server (Starlette on uvicorn), the
server it replaced (the standard library's `ThreadingHTTPServer`, taken from git history) and
the model called directly, each with N concurrent clients posting a JPEG for a while:
images/s and p50/p99 latency per number of clients.

Run by hand on a quiet machine (each server is a subprocess, so clients and server do not share
a GIL):

    python benchmarks/serve_load.py --out benchmarks/results/serve-cpu.json [--device cuda]
    python benchmarks/serve_load.py --report benchmarks/results/serve-cpu.json \
        --png docs/serving.png
    # the low-precision model of optimize_for_inference (new server and direct calls only)
    python benchmarks/serve_load.py --precision bf16 --out benchmarks/results/serve-bf16.json

The served model is Res2Net-50 (1000 classes, random weights: the speed does not depend on
them) at 224x224; the image is a 500x375 JPEG, ImageNet's typical size. "direct" runs the same
work without HTTP: each client thread decodes the JPEG, applies the eval transform and calls the
model (one call at a time, as the server's batcher does with `--max_batch 1`).
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from res2net.schema import PRECISIONS

REPO = Path(__file__).resolve().parents[1]
SERVERS = ("new", "old", "direct")
# starts the old server from its module (written by `old_server_module`) and prints its URL
OLD_LAUNCHER = """
import sys
sys.path.insert(0, sys.argv[1])
import res2net_serve_old as old
from res2net.serve import load_classifier  # today's loading: its Classifier has what old needs
classifier = load_classifier(ckpt_path=sys.argv[2], device=sys.argv[3])
server = old.Server(("127.0.0.1", 0), classifier, max_batch=int(sys.argv[4]), max_wait_ms=5)
print(f"serving at {server.url}/", flush=True)
old.serve_forever(server)
"""


def jpeg() -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 255, (375, 500, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def old_revision() -> str:
    """The last commit whose `serve.py` was the `ThreadingHTTPServer` one: the parent of the
    commit that removed it."""
    removed = subprocess.run(
        [
            "git",
            "log",
            "-1",
            "--format=%H",
            "-S",
            "ThreadingHTTPServer",
            "--",
            "src/res2net/serve.py",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not removed:
        raise SystemExit("no commit in this clone's history removed the old server: --old_rev")
    return f"{removed}^"


def old_server_module(revision: str, folder: Path) -> None:
    """`src/res2net/serve.py` at `revision`, as module `res2net_serve_old` in `folder` (its
    relative imports made absolute: the rest of the package is today's). Only its `Server`
    and `serve_forever` are used; the model is loaded as today, so the comparison is of the
    HTTP layers alone."""
    source = subprocess.run(
        ["git", "show", f"{revision}:src/res2net/serve.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    source = re.sub(r"^(\s*)from \.", r"\1from res2net.", source, flags=re.MULTILINE)
    (folder / "res2net_serve_old.py").write_text(source)


def start(cmd: list[str]) -> tuple[subprocess.Popen, int]:
    """A server subprocess and the port of the URL it prints."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None  # stdout=PIPE
    line = proc.stdout.readline()
    if "serving" not in line:
        proc.kill()
        raise RuntimeError(f"server did not start: {' '.join(cmd)}: {line!r}")
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


def http_client(port: int, body: bytes) -> Callable[[], Callable[[], bool]]:
    """A factory of clients, each with its own keep-alive connection; a call posts the image
    and says whether it was answered 200."""

    def connect() -> Callable[[], bool]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

        def call() -> bool:
            conn.request("POST", "/predict", body=body, headers={"Content-Type": "image/jpeg"})
            response = conn.getresponse()
            response.read()
            return response.status == 200

        return call

    return connect


def direct_client(classifier, body: bytes) -> Callable[[], Callable[[], bool]]:
    """Clients doing the server's work without HTTP: decode, transform, model, top-5."""
    from res2net.data import decode_image

    def connect() -> Callable[[], bool]:
        def call() -> bool:
            image = decode_image(body, "bench.jpg", 40_000_000, resize=classifier.resize)
            x = classifier.transform(image)
            classifier.probabilities(x.unsqueeze(0))[0].topk(5)
            return True

        return call

    return connect


def load(connect: Callable[[], Callable[[], bool]], clients: int, seconds: float) -> dict:
    """`clients` threads calling their client for `seconds`: throughput and latencies."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def run() -> None:
        call, mine, failed = connect(), [], 0
        while time.perf_counter() < stop:
            t = time.perf_counter()
            if call():
                mine.append(time.perf_counter() - t)
            else:
                failed += 1
        with lock:
            latencies.extend(mine)
            errors[0] += failed

    start = time.perf_counter()
    threads = [threading.Thread(target=run) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    q = np.quantile(latencies, [0.5, 0.99]) if latencies else [float("nan")] * 2
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": errors[0],
        "seconds": wall,
        "throughput": len(latencies) / wall,
        "p50_ms": 1000 * q[0],
        "p99_ms": 1000 * q[1],
    }


def served(port: int, connect, clients: int, seconds: float) -> dict:
    """`load` against a server, with its share of the wall time inside the model."""
    before = model_seconds(port)
    row = load(connect, clients, seconds)
    busy, images, calls = (a - b for a, b in zip(model_seconds(port), before))
    return {**row, "model_busy": busy / row["seconds"], "images_per_call": images / max(1, calls)}


def server_command(which: str, args: argparse.Namespace, weights: Path, tmp: Path) -> list[str]:
    if which == "old":
        return [
            sys.executable,
            "-c",
            OLD_LAUNCHER,
            str(tmp),
            str(weights),
            args.device,
            str(args.max_batch),
        ]
    cmd = [sys.executable, "-m", "res2net.cli.main", "serve", "--ckpt_path", str(weights)]
    cmd += ["--port", "0", "--device", args.device, "--max_batch", str(args.max_batch)]
    cmd += ["--workers", str(args.workers), "--precision", args.precision]
    return cmd + (["--calibration", str(args.calibration)] if args.calibration else [])


def measure(args: argparse.Namespace) -> dict:
    import torch

    import res2net
    from res2net.serve import load_classifier, with_precision

    body = jpeg()
    out = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "device": args.device,
        "torch": torch.__version__,
        "model": args.model,
        "image_size": args.image_size,
        "precision": args.precision,
        "load_average_before": os.getloadavg(),
        "runs": [],
    }
    if args.device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name(0)
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        res2net.save_to_folder(
            res2net.create_model(args.model),
            tmp / "model",
            arch=args.model,
            eval_args={"image_resize": args.image_size, "crop_pct": 0.875},
        )
        weights = tmp / "model" / "model.safetensors"
        if "old" in args.servers:
            old_server_module(args.old_rev or old_revision(), tmp)
        for which in args.servers:
            if which == "direct":
                classifier = load_classifier(ckpt_path=str(weights), device=args.device)
                classifier = with_precision(classifier, args.precision, args.calibration)
                connect, proc, port = direct_client(classifier, body), None, None
            else:
                proc, port = start(server_command(which, args, weights, tmp))
                connect = http_client(port, body)
            try:
                load(connect, 2, args.warmup)  # first calls, allocator, oneDNN/cuDNN plans
                for clients in args.clients:
                    if port is None:
                        row = load(connect, clients, args.seconds)
                    else:
                        row = served(port, connect, clients, args.seconds)
                    row = {"server": which, **row}
                    print(json.dumps(row), flush=True)
                    out["runs"].append(row)
            finally:
                if proc is not None:
                    proc.terminate()
                    proc.wait(timeout=60)
    out["load_average_after"] = os.getloadavg()
    return out


def report(path: Path, png: Path | None) -> str:
    data = json.loads(path.read_text())
    for r in data["runs"]:  # files of the old benchmark: the old server at one max_batch each
        r.setdefault("server", f"old (max_batch {r.get('max_batch')})")
    data.setdefault("precision", "fp32")
    lines = [
        "| server | clients | img/s | p50 ms | p99 ms | images per model call | model busy "
        "| errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["runs"]:
        per_call = f"{r['images_per_call']:.1f}" if "images_per_call" in r else "1"
        busy = f"{100 * r['model_busy']:.0f}%" if "model_busy" in r else "-"
        lines.append(
            f"| {r['server']} | {r['clients']} | {r['throughput']:.1f} | {r['p50_ms']:.0f} | "
            f"{r['p99_ms']:.0f} | {per_call} | {busy} | {r['errors']} |"
        )
    by = {(r["server"], r["clients"]): r["throughput"] for r in data["runs"]}
    overheads = [
        f"server overhead over the bare model at {clients} clients: "
        f"{100 * (1 - by[('new', clients)] / by[('direct', clients)]):.1f}%"
        for clients in sorted({r["clients"] for r in data["runs"]})
        if ("new", clients) in by and ("direct", clients) in by
    ]
    if overheads:
        lines += ["", *overheads]
    if png is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for i, which in enumerate(SERVERS):
            rows = [r for r in data["runs"] if r["server"] == which]
            if not rows:
                continue
            clients = [r["clients"] for r in rows]
            color = f"C{i}"  # one colour per server in both panels, p50 and p99 alike
            axes[0].plot(
                clients, [r["throughput"] for r in rows], marker="o", color=color, label=which
            )
            axes[1].plot(
                clients, [r["p50_ms"] for r in rows], marker="o", color=color, label=f"{which} p50"
            )
            axes[1].plot(
                clients,
                [r["p99_ms"] for r in rows],
                marker="x",
                ls="--",
                color=color,
                label=f"{which} p99",
            )
        axes[0].set(
            title=f"throughput ({data['device']}, {data['precision']})",
            xlabel="concurrent clients",
            ylabel="images/s",
        )
        axes[1].set(title="latency", xlabel="concurrent clients", ylabel="ms")
        counts = sorted({r["clients"] for r in data["runs"]})
        for ax in axes:
            ax.set_xscale("log", base=2)
            ax.set_xticks(counts, [str(c) for c in counts])
            ax.set_ylim(bottom=0)
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
    p.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--max_batch", type=int, default=1, help="the new server's micro-batch")
    p.add_argument("--workers", type=int, default=1, help="the new server's processes")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    p.add_argument("--calibration", type=Path, help="with --precision int8: a folder of images")
    p.add_argument("--model", default="res2net50_26w_4s")
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--old_rev", help="the commit of the old server (default: found in git log)")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=3.0)
    args = p.parse_args()
    if args.report:
        print(report(args.report, args.png))
        return
    if args.precision != "fp32" and "old" in args.servers:
        p.error("the old server serves fp32 only: --servers new direct with --precision")
    result = measure(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
