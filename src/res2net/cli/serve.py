"""`res2net serve --ckpt_path FILE`: an HTTP API and a web page for a classifier."""

from __future__ import annotations

import argparse
import logging

HELP = (
    "serve a classifier over HTTP: POST images to /predict (top-k JSON, Grad-CAM), a web page at /"
)

log = logging.getLogger("res2net.serve")


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ckpt_path",
        "--ckpt-path",
        help="weights in any format (the architecture from the file or --model)",
    )
    p.add_argument(
        "--model", help="architecture name, or hf-hub:ORG/NAME / local-dir:PATH (weights included)"
    )
    p.add_argument("--classes", help="class names: a training folder or a text file, one per line")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only)",
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1...")
    p.add_argument(
        "--image_resize", "--image-resize", type=int, help="override the stored eval image size"
    )
    p.add_argument(
        "--crop_pct", "--crop-pct", type=float, help="override the stored eval crop fraction"
    )
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
        help="how long a batch waits for more images after its first",
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


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from ..serve import ServeLimits, Server, load_classifier, serve_forever

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}: give 0..65535")
    if (
        args.max_batch < 1
        or args.max_batch_images < 1
        or args.max_pixels < 1
        or args.max_body_mb <= 0
    ):
        raise ValueError(
            "--max_batch, --max_batch_images, --max_pixels and --max_body_mb must be positive"
        )
    classifier = load_classifier(
        ckpt_path=args.ckpt_path,
        model_name=args.model,
        classes=args.classes,
        device=args.device,
        image_resize=args.image_resize,
        crop_pct=args.crop_pct,
    )
    limits = ServeLimits(
        max_body_bytes=int(args.max_body_mb * (1 << 20)),
        max_batch_images=args.max_batch_images,
        max_pixels=args.max_pixels,
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
