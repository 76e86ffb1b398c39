"""`res2net serve --ckpt_path FILE`: an HTTP API and a web page for a classifier."""

from __future__ import annotations

import argparse
import logging

from ..errors import ConfigError
from ..schema import PRECISIONS
from .predict import add_classes_flag, add_transform_flags

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")  # res2net.serve's, without importing it

HELP = (
    "serve a classifier over HTTP: POST images to /predict (top-k JSON, Grad-CAM), a web page at /"
)

log = logging.getLogger("res2net.serve")
MAX_TIMEOUT_S = 86_400  # a day, for a client's request head and each part of its body
MAX_WAIT_MS = 10_000  # a batch's wait for more images after its first


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ckpt_path",
        "--ckpt-path",
        help="weights in any format (the architecture from the file or --model)",
    )
    p.add_argument(
        "--model", help="architecture name, or hf-hub:ORG/NAME / local-dir:PATH (weights included)"
    )
    add_classes_flag(p)
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only)",
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1...")
    add_transform_flags(p)
    p.add_argument(
        "--max_batch",
        "--max-batch",
        type=int,
        default=16,
        help="images per model call (micro-batch)",
    )
    p.add_argument(
        "--max_wait_ms",
        "--max-wait-ms",
        type=float,
        default=5.0,
        help="how long a batch waits for more images after its first (0 to 10000)",
    )
    p.add_argument(
        "--max_body_mb",
        "--max-body-mb",
        type=float,
        default=16.0,
        help="largest request body (MiB)",
    )
    p.add_argument(
        "--max_batch_images",
        "--max-batch-images",
        type=int,
        default=32,
        help="most images per request",
    )
    p.add_argument(
        "--max_pixels", "--max-pixels", type=int, default=40_000_000, help="largest image (pixels)"
    )
    p.add_argument(
        "--max_concurrent",
        "--max-concurrent",
        type=int,
        default=64,
        help="requests answered at once once their body has arrived; more get 503",
    )
    p.add_argument(
        "--max_decoding",
        "--max-decoding",
        type=int,
        default=2,
        help="images decoded at once (each up to 4 bytes per pixel of --max_pixels)",
    )
    p.add_argument(
        "--max_connections",
        "--max-connections",
        type=int,
        default=1024,
        help="open connections; beyond, new requests get 503",
    )
    p.add_argument(
        "--max_queue",
        "--max-queue",
        type=int,
        default=256,
        help="images waiting for the model; more get 503",
    )
    p.add_argument(
        "--timeout_s",
        "--timeout-s",
        type=float,
        default=30.0,
        help="a client's time for its request line and headers, and between two parts of a "
        "body (at most 86400)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes on the port, each with its own model and batcher",
    )
    p.add_argument(
        "--allowed_hosts",
        "--allowed-hosts",
        nargs="+",
        default=[],
        metavar="NAME",
        help="Host names clients may use besides 127.0.0.1, localhost, ::1 and --host "
        "(others get 400: DNS rebinding); * allows any",
    )
    p.add_argument(
        "--allow_origin",
        "--allow-origin",
        nargs="+",
        default=[],
        metavar="ORIGIN",
        help="web pages of these origins (https://example.org) may call the API (CORS); "
        "by default only the server's own page may",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="serve predictions from optimize_for_inference at this precision (int8: x86 CPUs, "
        "needs --calibration)",
    )
    p.add_argument(
        "--calibration",
        help="with --precision int8: a folder of typical images to calibrate on",
    )


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from ..extras import require

    require("starlette", "serve", "res2net serve")
    require("uvicorn", "serve", "res2net serve")
    from ..serve import ServeLimits, ServeSettings, load_classifier, serve, with_precision

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: give 0..65535")
    counts = ("max_batch", "max_batch_images", "max_pixels", "max_concurrent", "max_decoding")
    for name in (*counts, "max_connections", "max_queue", "max_body_mb", "workers"):
        value = getattr(args, name)
        if not value > 0 or value == float("inf"):  # NaN fails `> 0` too
            raise ConfigError(f"--{name} {value}: give a positive number")
    # Waits the event loop and the batcher's queue can keep (they overflow near 1e10 s).
    if not 0 < args.timeout_s <= MAX_TIMEOUT_S:
        raise ConfigError(
            f"--timeout_s {args.timeout_s:g}: give a positive number up to {MAX_TIMEOUT_S}"
        )
    if not 0 <= args.max_wait_ms <= MAX_WAIT_MS:
        raise ConfigError(f"--max_wait_ms {args.max_wait_ms:g}: give 0 to {MAX_WAIT_MS}")
    max_body_bytes = int(args.max_body_mb * (1 << 20))
    if max_body_bytes < 1024:  # smaller than any image: every request would get a 413
        raise ConfigError(f"--max_body_mb {args.max_body_mb:g}: give at least 1 KiB (0.001)")
    if args.precision == "int8" and not args.calibration:
        raise ConfigError("--precision int8 needs --calibration DIR: a folder of typical images")
    model = {
        "ckpt_path": args.ckpt_path,
        "model_name": args.model,
        "classes": args.classes,
        "device": args.device,
        "image_resize": args.image_resize,
        "crop_pct": args.crop_pct,
    }
    # loaded here once: a bad checkpoint fails in one line before any worker starts
    classifier = with_precision(load_classifier(**model), args.precision, args.calibration)
    wildcard = args.host in ("0.0.0.0", "::", "")
    settings = ServeSettings(
        model=model,
        limits=ServeLimits(
            max_body_bytes=max_body_bytes,
            max_batch_images=args.max_batch_images,
            max_pixels=args.max_pixels,
            max_concurrent=args.max_concurrent,
            max_decoding=args.max_decoding,
            max_connections=args.max_connections,
            max_queue=args.max_queue,
            timeout_s=args.timeout_s,
        ),
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        allowed_hosts=[*LOOPBACK_HOSTS, *([] if wildcard else [args.host]), *args.allowed_hosts],
        allow_origins=args.allow_origin,
        precision=args.precision,
        calibration=args.calibration,
    )

    def ready(url: str) -> None:
        shown = f"{classifier.name} ({len(classifier.classes)} classes)"
        print(f"serving {shown} at {url}/", flush=True)

    serve(
        settings,
        host=args.host,
        port=args.port,
        workers=args.workers,
        classifier=classifier if args.workers == 1 else None,
        ready=ready,
    )
    return 0
