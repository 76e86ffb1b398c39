"""`res2net serve`: a classifier behind HTTP, with dynamic micro-batching and a web page.

Built on Starlette and uvicorn (the `serve` extra): the framework parses HTTP, each connection is
a coroutine of one event loop (a slow client costs a coroutine, not a thread), and the CPU work
runs in threads: decoding in a bounded pool, the model in one `MicroBatcher` thread that runs
batches gathered from all connections. `--workers N` starts N processes on one port, each with
its own model and batcher. docs/serving.md has the design and the measurements.

Endpoints:
* `POST /predict[?topk=5&cam=1]` (`topk` at most `max_topk`, and the number of classes): the
  body is one encoded image (any `Content-Type`), or JSON
  `{"images": ["<base64>", ...]}` for a batch. Answers `{"top": [{"class", "index", "prob"}...]}`
  (a batch: `{"results": [{"top": ...}, ...]}`); with `cam=1` (one image) also `cam_png`, the
  Grad-CAM overlay of the top class as a base64 PNG.
* `GET /health`: `{"status": "ok", "model", "classes", "device"}` (the model's name, never a
  file path); `GET /metrics`: Prometheus text counters.
* `GET /`: the web page (drop an image, see the top-5 and the CAM overlay).

Every request is untrusted: the `Host` must be one of `allowed_hosts` (DNS rebinding), a request
from another origin is refused unless `allow_origins` names it (then CORS answers it), bodies are
capped (`max_body_bytes`) and must arrive in bounded time (`timeout_s` between reads, and
`min_upload_bytes_per_s` on average), request heads too (`HeadDeadlineProtocol`), batches are
capped (`max_batch_images`), images are decoded by the project's `decode_image` (allowed formats,
`max_pixels` read from the header; decoded straight to the model's input size, see
docs/serving.md for the memory) at most `max_decoding` at a time, requests past their body and
queued images are bounded (503 beyond), and every failure is a JSON error with a 4xx/5xx status,
never a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import json
import logging
import os
import queue
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any

import anyio
import h11
import torch
import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send
from torch import nn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .data import DataError, ImageTooLarge, ResizeCrop, decode_image
from .errors import ConfigError

log = logging.getLogger("res2net.serve")

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
SETTINGS_ENV = "RES2NET_SERVE_SETTINGS"  # what each `--workers` process loads (JSON)
WORKER_START_S = 120  # how long a `--workers` process may take to start, or to answer a ping


@dataclass
class ServeLimits:
    """Bounds on what one client can make the server do."""

    max_body_bytes: int = 16 << 20
    max_batch_images: int = 32
    max_pixels: int = 40_000_000
    max_topk: int = 20
    max_concurrent: int = 64  # requests past their body (decoding, queued, in the model)
    max_decoding: int = 2  # images decoded at once: each takes up to 4 bytes per pixel
    max_connections: int = 1024  # open connections; beyond, new requests get 503
    max_buffered_bytes: int = 256 << 20  # bodies held in memory, all requests together; 503
    max_queue: int = 256  # images waiting for the model; more get 503
    timeout_s: float = 30.0  # a request head in all; the wait between two reads of a body
    min_upload_bytes_per_s: float = 100_000  # a body's average rate, after timeout_s
    result_timeout_s: float = 60.0


class Overloaded(Exception):
    """The queue is full: the client should retry later (503)."""


class MicroBatcher:
    """Runs `fn` on batches of the tensors submitted from any thread: the first waiting tensor
    starts a batch, which takes whatever else arrives within `max_wait_ms`, up to `max_batch`."""

    def __init__(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        *,
        max_batch: int = 16,
        max_wait_ms: float = 5.0,
        max_queue: int = 256,
    ) -> None:
        self.fn, self.max_batch, self.max_wait = fn, max_batch, max_wait_ms / 1000
        self.queue: queue.Queue[tuple[torch.Tensor, Future]] = queue.Queue(maxsize=max_queue)
        self.batches = self.images = 0
        self.busy_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="res2net-batcher", daemon=True)
        self._thread.start()

    def submit(self, x: torch.Tensor) -> Future:
        future: Future = Future()
        try:
            self.queue.put_nowait((x, future))
        except queue.Full:
            raise Overloaded(f"{self.queue.maxsize} images are already waiting") from None
        return future

    def _gather(self) -> list[tuple[torch.Tensor, Future]]:
        try:
            items = [self.queue.get(timeout=0.1)]
        except queue.Empty:
            return []
        deadline = time.monotonic() + self.max_wait
        while len(items) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                items.append(
                    self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait()
                )
            except queue.Empty:
                break
        return items

    def _loop(self) -> None:
        while not self._stop.is_set():
            items = self._gather()
            if not items:
                continue
            start = time.perf_counter()
            try:
                out = self.fn(torch.stack([x for x, _ in items]))
                for (_, future), row in zip(items, out):
                    future.set_result(row)
            except Exception as e:  # reported to every waiting request, the loop goes on
                log.exception("inference failed")
                for _, future in items:
                    if not future.done():
                        future.set_exception(e)
            self.busy_s += time.perf_counter() - start
            self.batches += 1
            self.images += len(items)

    def close(self) -> None:
        """Stop after the batch in hand; joined, so no thread runs the model at exit."""
        self._stop.set()
        self._thread.join(timeout=60)


@dataclass
class Classifier:
    """A model in eval mode with its class names and eval transform. `resize` is that
    transform's geometry: images are decoded straight to it (`decode_image`), so that a request
    never holds a full-size RGB copy. `fast` (a low-precision copy from
    `optimize_for_inference`) answers predictions when set; Grad-CAM needs the gradients of
    `model`."""

    model: nn.Module
    classes: Sequence[str]
    transform: Callable[[Image.Image], torch.Tensor]
    name: str  # the model's name, shown to clients: never a file path
    resize: ResizeCrop | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mean: Sequence[float] = (0.485 * 255, 0.456 * 255, 0.406 * 255)
    std: Sequence[float] = (0.229 * 255, 0.224 * 255, 0.225 * 255)
    fast: nn.Module | None = None
    precision: str = "fp32"
    lock: threading.Lock = field(default_factory=threading.Lock)  # one model call at a time

    @torch.no_grad()
    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        model = self.fast if self.fast is not None else self.model
        with self.lock:
            return model(batch.to(self.device)).float().softmax(dim=1).cpu()

    def cam_png(self, x: torch.Tensor) -> bytes:
        """The Grad-CAM overlay of `x`'s top class over the pixels the model saw, as PNG."""
        from .cam import denormalize, grad_cam, overlay

        with self.lock:
            maps, _ = grad_cam(self.model, x.unsqueeze(0).to(self.device))
        picture = denormalize(x.unsqueeze(0), self.mean, self.std)[0]
        buffer = io.BytesIO()
        Image.fromarray(overlay(picture, maps[0])).save(buffer, format="PNG")
        return buffer.getvalue()


def load_classifier(
    *,
    ckpt_path: str | None = None,
    model_name: str | None = None,
    classes: str | None = None,
    device: str = "cpu",
    image_resize: int | None = None,
    crop_pct: float | None = None,
) -> Classifier:
    """The model of `ckpt_path` (any format; the architecture from the file or `model_name`) or
    of `model_name` alone (`hf-hub:...`, `local-dir:...`), with its class names and the eval
    transform stored with it (`image_resize`/`crop_pct` override it)."""
    from .inference import model_classes_and_transform, trained_model
    from .weights.hubfolder import is_hub_name
    from .weights.loading import read_checkpoint

    if model_name and is_hub_name(model_name):
        arch, checkpoint = model_name, read_checkpoint(model_name)
    else:
        if not ckpt_path:
            raise ConfigError("give the weights with --ckpt_path FILE (or --model hf-hub:ORG/NAME)")
        checkpoint = read_checkpoint(ckpt_path, model=model_name)  # the one read of the file
        arch = model_name or checkpoint.arch or ""
        if not arch:
            raise ConfigError(f"{ckpt_path} does not name its architecture; pass --model NAME")
    model = trained_model(arch, checkpoint)  # a classifier that fits, or an error
    names, spec = model_classes_and_transform(
        model, checkpoint, classes=classes, image_resize=image_resize, crop_pct=crop_pct
    )
    dev = torch.device(device)
    return Classifier(
        model=model.to(dev).eval(),
        classes=list(names),
        transform=spec.transform(),
        resize=spec.resize_crop(),
        name=_shown_name(arch, model),
        device=dev,
        mean=tuple(255 * m for m in spec.mean),
        std=tuple(255 * s for s in spec.std),
    )


def _shown_name(arch: str, model: nn.Module) -> str:
    """The name clients see: the architecture, or the Hub repository; a `local-dir:` folder is
    a path on this machine, so its model shows as its architecture."""
    hub_config = getattr(model, "hub_config", None)
    if arch.startswith("local-dir:") and isinstance(hub_config, dict):
        return str(hub_config.get("architecture", "model"))
    return arch


def with_precision(
    classifier: Classifier, precision: str, calibration: str | None = None
) -> Classifier:
    """`classifier` answering predictions with `optimize_for_inference(precision=...)` (bf16, or
    int8 calibrated on the images of the `calibration` folder); fp32 serves the model as it is."""
    if precision == "fp32":
        return classifier
    from .inference import optimize_for_inference
    from .lowprec import calibration_batches

    image_size = int(classifier.transform(Image.new("RGB", (64, 64))).shape[-1])
    batches = (
        calibration_batches(calibration, image_size=image_size)
        if precision == "int8" and calibration
        else None
    )
    classifier.fast = optimize_for_inference(
        classifier.model, precision=precision, calibration=batches
    )
    classifier.precision = precision
    return classifier


class RequestError(Exception):
    """A client error: HTTP `status` with a one-line `message`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Metrics:
    """Counters for `GET /metrics`, in Prometheus' text format."""

    def __init__(self) -> None:
        self.responses: dict[int, int] = {}
        self.latency_sum = 0.0
        self.predict_requests = 0

    def record(self, status: int, latency: float | None = None) -> None:
        self.responses[status] = self.responses.get(status, 0) + 1
        if latency is not None:
            self.predict_requests += 1
            self.latency_sum += latency

    def text(self, batcher: MicroBatcher) -> str:
        lines = ["# TYPE res2net_responses_total counter"]
        lines += [
            f'res2net_responses_total{{code="{c}"}} {n}' for c, n in sorted(self.responses.items())
        ]
        lines += [
            "# TYPE res2net_predict_seconds summary",
            f"res2net_predict_seconds_sum {self.latency_sum:.6f}",
            f"res2net_predict_seconds_count {self.predict_requests}",
            "# TYPE res2net_images_total counter",
            f"res2net_images_total {batcher.images}",
            "# TYPE res2net_batches_total counter",
            f"res2net_batches_total {batcher.batches}",
            "# TYPE res2net_inference_seconds_total counter",
            f"res2net_inference_seconds_total {batcher.busy_s:.6f}",
            "# TYPE res2net_queue_images gauge",
            f"res2net_queue_images {batcher.queue.qsize()}",
        ]
        return "\n".join(lines) + "\n"


SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data: blob:; connect-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}


def error(status: int, message: str) -> JSONResponse:
    """The JSON error every refusal answers with: one line saying what is wrong and what to do."""
    return JSONResponse({"error": message, "status": status}, status, headers=SECURITY_HEADERS)


class Guard:
    """ASGI middleware in front of everything: the `Host` must be an allowed name (a page of
    another site whose name resolves to this machine, i.e. DNS rebinding, sends its own), and a
    browser request from another origin (its `Origin` header) is refused unless `origins` allows
    it, since a cross-origin `text/plain` POST needs no preflight and would be classified."""

    def __init__(self, app: ASGIApp, *, hosts: Sequence[str], origins: Sequence[str]) -> None:
        self.app = app
        self.hosts = {_bare_host(h) for h in hosts}
        self.any_host = "*" in hosts
        self.origins = set(origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if not self.any_host and _bare_host(host) not in self.hosts:
            allowed = ", ".join(sorted(self.hosts))
            response = error(
                400,
                f"Host {host[:100]!r} is not served here (allowed: {allowed}); "
                "the server's --allowed_hosts adds names",
            )
            await response(scope, receive, send)
            return
        origin = headers.get("origin")
        if origin is not None and origin != f"{scope['scheme']}://{host}":
            if "*" not in self.origins and origin not in self.origins:
                response = error(
                    403,
                    f"requests from the page of {origin[:100]!r} are refused; "
                    "the server's --allow_origin allows an origin",
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _bare_host(host: str) -> str:
    """A Host header's name without its port, lower case: `[::1]:8000` -> `::1`."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


_INTEGER = re.compile(r"[0-9]{1,6}")  # ASCII digits only: str.isdigit() accepts "²"


def _option(request: Request, key: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(key, str(default))
    if not _INTEGER.fullmatch(raw) or not low <= int(raw) <= high:
        raise RequestError(400, f"{key}={raw[:20]!r}: give an integer in {low}..{high}")
    return int(raw)


class BodyBudget:
    """The bytes of request bodies held in memory, all requests together: a part beyond
    `limit` gets its request a 503. Counts what arrived, not what was declared, so clients that
    announce large bodies and send nothing hold nothing."""

    def __init__(self, limit: int) -> None:
        self.limit, self.held = limit, 0

    def take(self, n: int) -> None:
        if self.held + n > self.limit:
            raise RequestError(503, f"{self.held} bytes of uploads are already held; retry shortly")
        self.held += n

    def give(self, n: int) -> None:
        self.held -= n


async def read_body(request: Request, limits: ServeLimits, budget: BodyBudget) -> bytes:
    """The body, at most `max_body_bytes`, each part within `timeout_s` of the last and all of
    it by `timeout_s` + its length at `min_upload_bytes_per_s`. Waiting costs a coroutine. The
    bytes are taken from `budget`; the caller gives them back once the body is dropped."""
    declared = request.headers.get("content-length")
    cap = limits.max_body_bytes
    size = int(declared) if declared is not None else cap  # uvicorn checked it is digits
    if size > cap:
        raise RequestError(413, f"body of {size} bytes; the limit is {cap}")
    allowed = limits.timeout_s + size / limits.min_upload_bytes_per_s
    deadline = time.monotonic() + allowed
    parts: list[bytes] = []
    received = 0
    stream = request.stream().__aiter__()
    try:
        while True:
            wait = min(limits.timeout_s, deadline - time.monotonic())
            try:
                part = await asyncio.wait_for(stream.__anext__(), timeout=max(wait, 0))
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise RequestError(
                    408,
                    f"the body did not arrive in time: each part within {limits.timeout_s:g} s, "
                    f"and all of it at {limits.min_upload_bytes_per_s:g} bytes/s after "
                    f"{limits.timeout_s:g} s; send it faster",
                ) from None
            if received + len(part) > cap:
                raise RequestError(413, f"body of more than {cap} bytes; the limit is {cap}")
            budget.take(len(part))
            received += len(part)
            parts.append(part)
        if received == 0:
            raise RequestError(400, "empty body: POST an image file")
    except BaseException:  # refused, or the client left (cancelled): nothing is kept
        budget.give(received)
        raise
    return b"".join(parts)


def encoded_images(body: bytes, content_type: str, limits: ServeLimits) -> list[bytes] | None:
    """The images of a JSON batch body (None: the body is one image)."""
    if content_type.split(";")[0].strip().lower() != "application/json":
        return None
    try:
        payload = json.loads(body)
        images = payload["images"]
        if not isinstance(images, list) or not all(isinstance(s, str) for s in images):
            raise TypeError
    except (ValueError, KeyError, TypeError, RecursionError):  # JSONDecodeError, UnicodeError
        raise RequestError(400, 'JSON bodies must be {"images": ["<base64>", ...]}') from None
    cap = limits.max_batch_images
    if not 0 < len(images) <= cap:
        status = 413 if images else 400
        raise RequestError(status, f"{len(images)} images in the batch; send 1..{cap}")
    try:
        return [base64.b64decode(s, validate=True) for s in images]
    except (binascii.Error, ValueError):
        raise RequestError(400, "an image of the batch is not valid base64") from None


def decode_all(
    images: list[bytes], classifier: Classifier, limits: ServeLimits, batch: bool
) -> list[torch.Tensor]:
    """Model inputs of the encoded images, one decoded at a time, straight to the model's input
    size (`Classifier.resize`), or a 413/415 `RequestError` naming the image. The images of a
    request have at most `max_pixels` pixels together: a batch of 32 images at the cap took 36 s
    of CPU. Each entry of `images` is dropped once decoded (a batch's bytes go as it goes)."""
    tensors: list[torch.Tensor] = []
    used = 0
    for i in range(len(images)):
        name = f"image {i}" if batch else "the image"
        data, images[i] = images[i], b""
        try:
            image = decode_image(data, name, limits.max_pixels - used, resize=classifier.resize)
            del data
        except DataError as e:
            if not isinstance(e, ImageTooLarge):
                raise RequestError(415, str(e)) from None
            if used:
                e = DataError(
                    f"{name}: the images of one request may have {limits.max_pixels} pixels "
                    f"together, and those before it have {used}; send fewer or smaller images"
                )
            raise RequestError(413, str(e)) from None
        width, height = image.info.get("source_size", image.size)
        used += width * height
        tensors.append(classifier.transform(image))
    return tensors


class Service:
    """The state behind the routes: the classifier, its batcher, the limits and the counters."""

    def __init__(
        self,
        classifier: Classifier,
        *,
        limits: ServeLimits,
        max_batch: int = 16,
        max_wait_ms: float = 5.0,
    ) -> None:
        self.classifier, self.limits = classifier, limits
        self.batcher = MicroBatcher(
            classifier.probabilities,
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            max_queue=limits.max_queue,
        )
        self.metrics = Metrics()
        self.active = 0  # requests past their body
        self.budget = BodyBudget(limits.max_buffered_bytes)
        self.decoders = anyio.CapacityLimiter(limits.max_decoding)

    async def predict(self, request: Request) -> Response:
        start = time.perf_counter()
        limits, c = self.limits, self.classifier
        topk = min(_option(request, "topk", 5, 1, limits.max_topk), len(c.classes))
        want_cam = _option(request, "cam", 0, 0, 1) == 1
        body = await read_body(request, limits, self.budget)
        try:
            if self.active >= limits.max_concurrent:
                raise RequestError(503, f"{self.active} requests are being answered; retry shortly")
            self.active += 1
            try:
                content_type = request.headers.get("content-type", "")
                answer = await self._answer(body, content_type, topk, want_cam)
            finally:
                self.active -= 1
        finally:
            self.budget.give(len(body))
        self.metrics.record(200, time.perf_counter() - start)
        return JSONResponse(answer, headers=SECURITY_HEADERS)

    async def _answer(self, body: bytes, content_type: str, topk: int, want_cam: bool) -> Any:
        c, limits = self.classifier, self.limits
        batch = await anyio.to_thread.run_sync(encoded_images, body, content_type, limits)
        if want_cam and batch is not None:
            raise RequestError(400, "cam=1 takes one image per request, not a JSON batch")
        tensors = await anyio.to_thread.run_sync(
            decode_all, batch or [body], c, limits, batch is not None, limiter=self.decoders
        )
        futures = [self.batcher.submit(x) for x in tensors]
        results: list[dict[str, Any]] = []
        try:
            with anyio.fail_after(limits.result_timeout_s):
                for future in futures:
                    probs = await asyncio.wrap_future(future)
                    p, idx = probs.topk(topk)
                    top = [
                        {"class": c.classes[i], "index": i, "prob": round(float(v), 6)}
                        for v, i in zip(p.tolist(), idx.tolist())
                    ]
                    results.append({"top": top})
        except TimeoutError:
            raise RequestError(503, "the model did not answer in time; retry shortly") from None
        if batch is not None:
            return {"results": results}
        if want_cam:
            png = await anyio.to_thread.run_sync(c.cam_png, tensors[0])
            results[0]["cam_png"] = base64.b64encode(png).decode()
        return results[0]

    async def health(self, request: Request) -> Response:
        c = self.classifier
        return JSONResponse(
            {
                "status": "ok",
                "model": c.name,
                "classes": len(c.classes),
                "device": str(c.device),
                "precision": c.precision,
            },
            headers=SECURITY_HEADERS,
        )

    async def metrics_text(self, request: Request) -> Response:
        text = self.metrics.text(self.batcher)
        return Response(text, media_type="text/plain; version=0.0.4", headers=SECURITY_HEADERS)

    async def static(self, request: Request) -> Response:
        name, media_type = STATIC[request.url.path]
        data = resources.files("res2net").joinpath("static").joinpath(name).read_bytes()
        return Response(data, media_type=media_type, headers=SECURITY_HEADERS)

    async def favicon(self, request: Request) -> Response:
        return Response(status_code=204, headers=SECURITY_HEADERS)


def create_app(
    classifier: Classifier,
    *,
    limits: ServeLimits | None = None,
    max_batch: int = 16,
    max_wait_ms: float = 5.0,
    allowed_hosts: Sequence[str] = LOOPBACK_HOSTS,
    allow_origins: Sequence[str] = (),
) -> Starlette:
    """The ASGI app serving `classifier`; its batcher stops when the app's lifespan ends
    (uvicorn's shutdown, after in-flight requests are answered). `app.state.service` holds the
    batcher and the counters."""
    service = Service(
        classifier, limits=limits or ServeLimits(), max_batch=max_batch, max_wait_ms=max_wait_ms
    )

    async def refused(request: Request, exc: Exception) -> Response:
        status = exc.status if isinstance(exc, RequestError) else 500
        if isinstance(exc, HTTPException):
            status = exc.status_code
            message = {
                404: f"no page {request.url.path[:100]!r}; try /, /predict, /health or /metrics",
                405: f"{request.method} is not served at {request.url.path}; POST images to "
                "/predict",
            }.get(status, str(exc.detail))
        elif isinstance(exc, Overloaded):
            status, message = 503, f"server busy ({exc}); retry shortly"
        elif isinstance(exc, ClientDisconnect):
            status, message = 400, "the client closed the connection"
        elif status == 500:
            log.error("request failed", exc_info=exc)
            message = "internal error; see the server's log"
        else:
            message = str(exc)
        service.metrics.record(status)
        return error(status, message)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            service.batcher.close()

    routes = [Route(path, service.static, methods=["GET", "HEAD"]) for path in STATIC]
    routes += [
        Route("/predict", service.predict, methods=["POST"]),
        Route("/health", service.health, methods=["GET", "HEAD"]),
        Route("/metrics", service.metrics_text, methods=["GET", "HEAD"]),
        Route("/favicon.ico", service.favicon, methods=["GET", "HEAD"]),
    ]
    middleware = [Middleware(Guard, hosts=allowed_hosts, origins=allow_origins)]
    if allow_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(allow_origins),
                allow_methods=["GET", "POST"],
                allow_headers=["Content-Type"],
            )
        )
    handlers: dict[Any, Any] = {
        exc: refused for exc in (HTTPException, RequestError, Overloaded, ClientDisconnect)
    }
    handlers[Exception] = refused
    app = Starlette(
        routes=routes, middleware=middleware, exception_handlers=handlers, lifespan=lifespan
    )
    app.state.service = service
    return app


class HeadDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol with two additions: the request line and headers must arrive
    within `config.head_timeout_s` of the connection's start or of its last answer (uvicorn's
    keep-alive timer stops at the first byte, so a client sending a header line every few
    seconds would hold its connection forever), and a request h11 cannot parse in a way it
    does not report as a protocol error (a `Content-Length` of more than 4,300 digits makes
    Python's `int` raise ValueError) gets a 400 like any other malformed request."""

    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._expect_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._expect_head()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def _expect_head(self) -> None:
        """(Re)start this connection's head timer: a response completed, or it just opened."""
        if self._head_timer is not None:
            self._head_timer.cancel()
        timeout = getattr(self.config, "head_timeout_s", 30.0)
        self._head_timer = self.loop.call_later(timeout, self._head_late)

    def _head_late(self) -> None:
        """No answer completed on this connection since the timer started, and h11 still waits
        for a request's head: close."""
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.debug("closing a connection whose request head did not arrive in time")
            self.transport.close()

    def handle_events(self) -> None:
        try:
            super().handle_events()
        except ValueError:
            self.send_400_response("Invalid HTTP request received.")


class ServeConfig(uvicorn.Config):
    """uvicorn's settings plus the request head's deadline (read by `HeadDeadlineProtocol`)."""

    def __init__(self, app: Any, *, head_timeout_s: float = 30.0, **kwargs: Any) -> None:
        super().__init__(app, http=HeadDeadlineProtocol, **kwargs)
        self.head_timeout_s = head_timeout_s


@dataclass
class ServeSettings:
    """Everything a server process needs to build its app: `--workers` processes read it from
    the environment (`SETTINGS_ENV`), each loading its own model."""

    model: dict[str, Any]  # `load_classifier`'s keyword arguments
    limits: ServeLimits
    max_batch: int = 16
    max_wait_ms: float = 5.0
    allowed_hosts: Sequence[str] = LOOPBACK_HOSTS
    allow_origins: Sequence[str] = ()
    precision: str = "fp32"
    calibration: str | None = None

    def app(self, classifier: Classifier | None = None) -> Starlette:
        if classifier is None:
            classifier = with_precision(
                load_classifier(**self.model), self.precision, self.calibration
            )
        return create_app(
            classifier,
            limits=self.limits,
            max_batch=self.max_batch,
            max_wait_ms=self.max_wait_ms,
            allowed_hosts=self.allowed_hosts,
            allow_origins=self.allow_origins,
        )


def app_from_environment() -> Starlette:
    """The app of one `--workers` process (uvicorn's factory), from `SETTINGS_ENV`."""
    raw = json.loads(os.environ[SETTINGS_ENV])
    raw["limits"] = ServeLimits(**raw["limits"])
    return ServeSettings(**raw).app()


def serve(
    settings: ServeSettings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    classifier: Classifier | None = None,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT: uvicorn stops accepting, answers the requests in flight
    (up to `result_timeout_s`), the batcher stops, and this returns. `ready(url)` is called
    once the port is bound (port 0: the one the system chose)."""
    import signal

    config = ServeConfig(
        settings.app(classifier) if workers == 1 else "res2net.serve:app_from_environment",
        factory=workers > 1,
        head_timeout_s=settings.limits.timeout_s,
        host=host,
        port=port,
        workers=workers,
        limit_concurrency=settings.limits.max_connections,
        timeout_graceful_shutdown=int(settings.limits.result_timeout_s),
        # a worker answers the supervisor's pings only once it has imported torch and the
        # package: at uvicorn's 5 s, a busy machine kills and restarts workers while they start
        timeout_worker_healthcheck=WORKER_START_S,
        log_level="warning",
        access_log=False,
        server_header=False,
    )
    sock = config.bind_socket()
    sock.listen(config.backlog)  # clients told the URL queue until the server accepts them
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    if ready is not None:
        ready(f"http://{shown}:{bound_port}")
    # uvicorn raises the signal again once it has shut down, for the default action (death by
    # the signal); a handler that does nothing lets the process end with status 0 instead.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        if workers > 1:
            from uvicorn.supervisors import Multiprocess

            raw = asdict(settings)
            os.environ[SETTINGS_ENV] = json.dumps(raw)
            Multiprocess(config, sockets=[sock]).run()
        else:
            uvicorn.Server(config).run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
