"""`res2net serve --ckpt_path FILE`: an HTTP API and a web page for a classifier."""

from __future__ import annotations

import argparse
import logging

from ..errors import ConfigError
from .predict import add_classes_flag, add_transform_flags

HELP = (
    "serve a classifier over HTTP: POST images to /predict (top-k JSON, Grad-CAM), a web page at /"
)

log = logging.getLogger("res2net.serve")
MAX_TIMEOUT_S = 86_400  # a day, for a client's reads and writes
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
        help="requests handled at once; more get 503",
    )
    p.add_argument(
        "--max_connections",
        "--max-connections",
        type=int,
        default=256,
        help="open connections (one thread each); more wait to be accepted",
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
        help="a client's time for each socket read or write, and for its request line and "
        "headers in all (at most 86400)",
    )


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from ..serve import ServeLimits, Server, load_classifier, serve_forever

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: give 0..65535")
    counts = ("max_batch", "max_batch_images", "max_pixels", "max_concurrent", "max_connections")
    for name in (*counts, "max_queue", "max_body_mb"):
        value = getattr(args, name)
        if not value > 0 or value == float("inf"):  # NaN fails `> 0` too
            raise ConfigError(f"--{name} {value}: give a positive number")
    # Waits the threading and socket layers can keep (they overflow near 1e10 s); a batch
    # waiting longer than a request's 60 s for its result would answer nothing.
    if not 0 < args.timeout_s <= MAX_TIMEOUT_S:
        raise ConfigError(
            f"--timeout_s {args.timeout_s:g}: give a positive number up to {MAX_TIMEOUT_S}"
        )
    if not 0 <= args.max_wait_ms <= MAX_WAIT_MS:
        raise ConfigError(f"--max_wait_ms {args.max_wait_ms:g}: give 0 to {MAX_WAIT_MS}")
    max_body_bytes = int(args.max_body_mb * (1 << 20))
    if max_body_bytes < 1024:  # smaller than any image: every request would get a 413
        raise ConfigError(f"--max_body_mb {args.max_body_mb:g}: give at least 1 KiB (0.001)")
    classifier = load_classifier(
        ckpt_path=args.ckpt_path,
        model_name=args.model,
        classes=args.classes,
        device=args.device,
        image_resize=args.image_resize,
        crop_pct=args.crop_pct,
    )
    limits = ServeLimits(
        max_body_bytes=max_body_bytes,
        max_batch_images=args.max_batch_images,
        max_pixels=args.max_pixels,
        max_concurrent=args.max_concurrent,
        max_connections=args.max_connections,
        max_queue=args.max_queue,
        socket_timeout_s=args.timeout_s,
        head_timeout_s=args.timeout_s,
    )
    server = Server(
        (args.host, args.port),
        classifier,
        limits=limits,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
    )
    print(
        f"serving {classifier.name} ({len(classifier.classes)} classes) at {server.url}/",
        flush=True,
    )
    serve_forever(server)
    return 0
