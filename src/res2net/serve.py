"""`res2net serve`: a classifier behind HTTP, with dynamic micro-batching and a web page.

Built on the standard library's `ThreadingHTTPServer` (one thread per connection) rather than a
web framework: the work is the model's, which one `MicroBatcher` thread runs on batches gathered
from all connections, so the server only parses small requests; no dependency is added.
docs/serving.md has the measurements.

Endpoints:
* `POST /predict[?topk=5&cam=1]` (`topk` at most `max_topk`, and the number of classes): the
  body is one encoded image (any `Content-Type`), or JSON
  `{"images": ["<base64>", ...]}` for a batch. Answers `{"top": [{"class", "index", "prob"}...]}`
  (a batch: `{"results": [{"top": ...}, ...]}`); with `cam=1` (one image) also `cam_png`, the
  Grad-CAM overlay of the top class as a base64 PNG.
* `GET /health`: `{"status": "ok", ...}`; `GET /metrics`: Prometheus text counters.
* `GET /`: the web page (drop an image, see the top-5 and the CAM overlay).

Every request is untrusted: bodies need a `Content-Length` and are capped (`max_body_bytes`),
batches are capped (`max_batch_images`), images are decoded by the project's `decode_image`
(allowed formats only, `max_pixels` read from the header before decoding), sockets time out,
requests must arrive in bounded time (the head within `head_timeout_s`, a body at a minimum
rate), open connections are bounded (one thread each; more wait to be accepted), concurrent
requests and queued images are bounded (503 beyond), and every failure is a JSON error with a
4xx/5xx status, never a traceback.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import logging
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

import torch
from PIL import Image
from torch import nn

from .data import DataError, decode_image
from .errors import ConfigError

log = logging.getLogger("res2net.serve")


@dataclass
class ServeLimits:
    """Bounds on what one client can make the server do."""

    max_body_bytes: int = 16 << 20
    max_batch_images: int = 32
    max_pixels: int = 40_000_000
    max_topk: int = 20
    max_concurrent: int = 64  # requests being handled; more get 503
    max_connections: int = 256  # open connections, one thread each; more wait to be accepted
    head_timeout_s: float = 30.0  # the request line and headers, in all
    min_upload_bytes_per_s: float = 100_000  # a body's average rate, after socket_timeout_s
    max_queue: int = 256  # images waiting for the model; more get 503
    socket_timeout_s: float = 30.0
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
        self._stop.set()
        self._thread.join(timeout=5)


@dataclass
class Classifier:
    """A model in eval mode with its class names and eval transform."""

    model: nn.Module
    classes: Sequence[str]
    transform: Callable[[Image.Image], torch.Tensor]
    name: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mean: Sequence[float] = (0.485 * 255, 0.456 * 255, 0.406 * 255)
    std: Sequence[float] = (0.229 * 255, 0.224 * 255, 0.225 * 255)
    lock: threading.Lock = field(
        default_factory=threading.Lock
    )  # the model runs one call at a time

    @torch.no_grad()
    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        with self.lock:
            return self.model(batch.to(self.device)).float().softmax(dim=1).cpu()

    def cam_png(self, x: torch.Tensor) -> bytes:
        """The Grad-CAM overlay of `x`'s top class over the pixels the model saw, as PNG."""
        from .cam import denormalize, grad_cam, overlay

        with self.lock:
            maps, _ = grad_cam(self.model, x.unsqueeze(0).to(self.device))
        picture = denormalize(x.unsqueeze(0), self.mean, self.std)[0]
        buffer = io.BytesIO()
        Image.fromarray(overlay(picture, maps[0])).save(buffer, format="PNG")
        return buffer.getvalue()


class RequestError(Exception):
    """A client error: HTTP `status` with a one-line `message`."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class Metrics:
    """Counters for `GET /metrics`, in Prometheus' text format."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.responses: dict[int, int] = {}
        self.latency_sum = 0.0
        self.predict_requests = 0

    def record(self, status: int, latency: float | None) -> None:
        with self.lock:
            self.responses[status] = self.responses.get(status, 0) + 1
            if latency is not None:
                self.predict_requests += 1
                self.latency_sum += latency

    def text(self, batcher: MicroBatcher) -> str:
        with self.lock:
            lines = ["# TYPE res2net_responses_total counter"]
            lines += [
                f'res2net_responses_total{{code="{c}"}} {n}'
                for c, n in sorted(self.responses.items())
            ]
            lines += [
                "# TYPE res2net_predict_seconds summary",
                f"res2net_predict_seconds_sum {self.latency_sum:.6f}",
                f"res2net_predict_seconds_count {self.predict_requests}",
            ]
        lines += [
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


def _static(name: str) -> bytes:
    return resources.files("res2net").joinpath("static").joinpath(name).read_bytes()


PAGES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; "
    "style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; connect-src 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class Server(ThreadingHTTPServer):
    """The HTTP server, holding the classifier, the batcher, the limits and the metrics."""

    daemon_threads = True
    request_queue_size = 128  # the listen backlog: connections waiting for a slot

    def __init__(
        self,
        address: tuple[str, int],
        classifier: Classifier,
        *,
        limits: ServeLimits | None = None,
        max_batch: int = 16,
        max_wait_ms: float = 5.0,
    ) -> None:
        self.classifier = classifier
        self.limits = limits or ServeLimits()
        self.batcher = MicroBatcher(
            classifier.probabilities,
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            max_queue=self.limits.max_queue,
        )
        self.metrics = Metrics()
        self.slots = threading.BoundedSemaphore(self.limits.max_concurrent)
        self.connections = threading.BoundedSemaphore(self.limits.max_connections)
        self.lock = threading.Lock()
        self.open: set[Any] = set()  # accepted connections, each holding one of `connections`
        self.deadlines: dict[Any, float] = {}  # connection -> when its request must be in
        super().__init__(address, Handler)

    def get_request(self) -> tuple[Any, Any]:
        """Accepts a connection while fewer than `max_connections` are open. At the cap the
        connection waits in the listen backlog until one closes: clients wait rather than being
        refused, and idle ones cannot make the server start threads without bound."""
        if not self.connections.acquire(timeout=0.05):
            raise OSError("max_connections are open")  # socketserver: nothing accepted this round
        try:
            request, address = super().get_request()
        except BaseException:
            self.connections.release()
            raise
        with self.lock:
            self.open.add(request)
        return request, address

    def shutdown_request(self, request: Any) -> None:
        """Closes a connection and gives its slot back, once, whichever path closes it."""
        super().shutdown_request(request)
        with self.lock:
            held = request in self.open
            self.open.discard(request)
            self.deadlines.pop(request, None)
        if held:
            self.connections.release()

    def read_by(self, request: Any, deadline: float | None) -> None:
        """The `time.monotonic()` by which what the connection is sending must have arrived
        (None: not reading)."""
        with self.lock:
            if deadline is None:
                self.deadlines.pop(request, None)
            else:
                self.deadlines[request] = deadline

    def service_actions(self) -> None:
        """Between polls of `serve_forever`: a connection past its deadline has its reading side
        shut, and its handler sees the input end. A socket timeout alone bounds each read, not
        a request: a client sending a byte every few seconds would hold its thread for hours."""
        now = time.monotonic()
        with self.lock:
            late = [request for request, deadline in self.deadlines.items() if deadline < now]
            for request in late:
                del self.deadlines[request]
        for request in late:
            with contextlib.suppress(OSError):
                request.shutdown(socket.SHUT_RD)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that failed: a client gone while it was answered is a debug line, any
        other error is logged with its traceback (socketserver would print it to stderr)."""
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            log.debug("%s: connection lost (%s)", client_address, error)
        else:
            log.exception("connection from %s failed", client_address)

    def server_close(self) -> None:
        super().server_close()
        self.batcher.close()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        assert isinstance(host, str)  # an AF_INET/AF_INET6 address
        return f"http://{host}:{port}"


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"
    server_version = "res2net-serve"
    sys_version = ""

    def setup(self) -> None:
        super().setup()
        # every read and write of the socket (what the base class does with a `timeout` class
        # attribute, here per server)
        self.connection.settimeout(self.server.limits.socket_timeout_s)

    def handle_one_request(self) -> None:
        # the request line and headers (an idle keep-alive connection's wait included) within
        # head_timeout_s in all; `parse_request` ends it, `_read_body` sets the body's
        self.server.read_by(self.connection, time.monotonic() + self.server.limits.head_timeout_s)
        try:
            super().handle_one_request()
        finally:
            self.server.read_by(self.connection, None)

    def parse_request(self) -> bool:
        parsed = super().parse_request()  # reads the headers
        self.server.read_by(self.connection, None)
        return parsed

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    # --- responses -------------------------------------------------------------------------
    def _send(
        self, status: int, body: bytes, content_type: str, latency: float | None = None
    ) -> None:
        self.server.metrics.record(status, latency)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for key, value in SECURITY_HEADERS.items():
            self.send_header(key, value)
        if status >= 400:
            self.send_header("Connection", "close")
            self.close_connection = True
        try:
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except (ConnectionError, TimeoutError):  # the client left or stopped reading
            log.debug("%s: client gone before the answer was sent", self.address_string())
            self.close_connection = True

    def _json(self, status: int, obj: Any, latency: float | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json", latency)

    def _error(self, status: HTTPStatus, message: str) -> None:
        self._json(status, {"error": message, "status": int(status)})

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, headers too long...) as JSON too."""
        self._error(HTTPStatus(code), message or HTTPStatus(code).phrase)

    # --- routes ----------------------------------------------------------------------------
    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path in PAGES:
            name, content_type = PAGES[path]
            self._send(HTTPStatus.OK, _static(name), content_type)
        elif path == "/health":
            c = self.server.classifier
            self._json(
                HTTPStatus.OK,
                {
                    "status": "ok",
                    "model": c.name,
                    "classes": len(c.classes),
                    "device": str(c.device),
                },
            )
        elif path == "/metrics":
            text = self.server.metrics.text(self.server.batcher)
            self._send(HTTPStatus.OK, text.encode(), "text/plain; version=0.0.4")
        elif path == "/favicon.ico":
            self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon")
        elif path == "/predict":
            self._error(HTTPStatus.METHOD_NOT_ALLOWED, "POST an image to /predict")
        else:
            self._error(
                HTTPStatus.NOT_FOUND, f"no page {path!r}; try /, /predict, /health or /metrics"
            )

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_POST(self) -> None:
        start = time.perf_counter()
        url = urlsplit(self.path)
        if url.path != "/predict":
            self._error(HTTPStatus.NOT_FOUND, f"no endpoint {url.path!r}; POST images to /predict")
            return
        if not self.server.slots.acquire(blocking=False):
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, "too many requests at once; retry shortly")
            return
        try:
            answer = self._predict(self._read_body(), parse_qs(url.query))
            self._json(HTTPStatus.OK, answer, time.perf_counter() - start)
        except RequestError as e:
            self._error(e.status, str(e))
        except Overloaded as e:
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, f"server busy ({e}); retry shortly")
        except TimeoutError:
            self._error(
                HTTPStatus.SERVICE_UNAVAILABLE, "the model did not answer in time; retry shortly"
            )
        except Exception:  # a bug, not the client's fault: logged, and one line for the client
            log.exception("request failed")
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error; see the server's log")
        finally:
            self.server.slots.release()

    # --- the work --------------------------------------------------------------------------
    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise RequestError(
                HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length, not chunked"
            )
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required")
        n, cap = int(length), self.server.limits.max_body_bytes
        if n > cap:
            raise RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body of {n} bytes; the limit is {cap}"
            )
        if n == 0:
            raise RequestError(HTTPStatus.BAD_REQUEST, "empty body: POST an image file")
        limits = self.server.limits
        allowed = limits.socket_timeout_s + n / limits.min_upload_bytes_per_s
        deadline = time.monotonic() + allowed
        self.server.read_by(self.connection, deadline)  # `Server.service_actions` enforces it
        try:
            body = self.rfile.read(n)
        except TimeoutError:
            raise RequestError(
                HTTPStatus.REQUEST_TIMEOUT,
                f"the body did not arrive within {limits.socket_timeout_s:g} s",
            ) from None
        finally:
            self.server.read_by(self.connection, None)
        if len(body) < n and time.monotonic() >= deadline:
            raise RequestError(
                HTTPStatus.REQUEST_TIMEOUT,
                f"the body did not arrive within {allowed:.0f} s (a body must arrive at "
                f"{limits.min_upload_bytes_per_s:g} bytes/s after {limits.socket_timeout_s:g} s)",
            )
        if len(body) < n:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"body ended after {len(body)} of {n} bytes")
        return body

    def _option(
        self, query: dict[str, list[str]], key: str, default: int, low: int, high: int
    ) -> int:
        raw = query.get(key, [str(default)])[-1]
        if not raw.isdigit() or not low <= int(raw) <= high:
            raise RequestError(
                HTTPStatus.BAD_REQUEST, f"{key}={raw!r}: give an integer in {low}..{high}"
            )
        return int(raw)

    def _images(self, body: bytes) -> list[bytes]:
        if self.headers.get("Content-Type", "").split(";")[0].strip().lower() != "application/json":
            return [body]
        try:
            payload = json.loads(body)
            images = payload["images"]
            if not isinstance(images, list) or not all(isinstance(s, str) for s in images):
                raise TypeError
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise RequestError(
                HTTPStatus.BAD_REQUEST, 'JSON bodies must be {"images": ["<base64>", ...]}'
            ) from None
        cap = self.server.limits.max_batch_images
        if not 0 < len(images) <= cap:
            raise RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE if images else HTTPStatus.BAD_REQUEST,
                f"{len(images)} images in the batch; send 1..{cap}",
            )
        try:
            return [base64.b64decode(s, validate=True) for s in images]
        except (binascii.Error, ValueError):
            raise RequestError(
                HTTPStatus.BAD_REQUEST, "an image of the batch is not valid base64"
            ) from None

    def _predict(self, body: bytes, query: dict[str, list[str]]) -> dict[str, Any]:
        c, limits = self.server.classifier, self.server.limits
        topk = min(self._option(query, "topk", 5, 1, limits.max_topk), len(c.classes))
        want_cam = self._option(query, "cam", 0, 0, 1) == 1
        images = self._images(body)
        batch = len(images) > 1 or self.headers.get("Content-Type", "").startswith(
            "application/json"
        )
        if want_cam and len(images) > 1:
            raise RequestError(HTTPStatus.BAD_REQUEST, "cam=1 takes one image per request")
        tensors = []
        for i, data in enumerate(images):
            name = f"image {i}" if batch else "the image"
            try:
                tensors.append(c.transform(decode_image(data, name, limits.max_pixels)))
            except DataError as e:
                status = (
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE
                    if "decompression bomb" in str(e)
                    else HTTPStatus.UNSUPPORTED_MEDIA_TYPE
                )
                raise RequestError(status, str(e)) from None
        futures = [self.server.batcher.submit(x) for x in tensors]
        results: list[dict[str, Any]] = []
        for future in futures:
            probs = future.result(timeout=limits.result_timeout_s)
            p, idx = probs.topk(topk)
            results.append(
                {
                    "top": [
                        {"class": c.classes[i], "index": i, "prob": round(float(v), 6)}
                        for v, i in zip(p.tolist(), idx.tolist())
                    ]
                }
            )
        if batch:
            return {"results": results}
        answer = results[0]
        if want_cam:
            answer["cam_png"] = base64.b64encode(c.cam_png(tensors[0])).decode()
        return answer


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
    from .hub import is_hub_name
    from .inference import model_classes_and_transform, trained_model
    from .weights.loading import read_metadata

    if model_name and is_hub_name(model_name):
        arch = model_name
    else:
        if not ckpt_path:
            raise ConfigError("give the weights with --ckpt_path FILE (or --model hf-hub:ORG/NAME)")
        arch = model_name or read_metadata(ckpt_path).get("arch") or ""
        if not arch:
            raise ConfigError(f"{ckpt_path} does not name its architecture; pass --model NAME")
    model = trained_model(arch, ckpt_path=ckpt_path)  # a classifier that fits, or an error
    names, spec = model_classes_and_transform(
        model,
        arch,
        ckpt_path=ckpt_path,
        classes=classes,
        image_resize=image_resize,
        crop_pct=crop_pct,
    )
    mean = tuple(255 * m for m in spec.mean)
    std = tuple(255 * s for s in spec.std)
    transform = spec.transform()
    dev = torch.device(device)
    model = model.to(dev).eval()
    return Classifier(
        model, list(names), transform, model_name or ckpt_path or "model", dev, mean, std
    )


def serve_forever(server: Server) -> None:
    """Serve until SIGTERM/SIGINT; in-flight requests finish, then the port is closed."""
    import signal

    def stop(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        threading.Thread(target=server.shutdown, daemon=True).start()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.server_close()
