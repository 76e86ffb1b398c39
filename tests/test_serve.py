"""`res2net serve`: answers checked against the model run directly, micro-batching, every
hostile client of issue 28's table answered in bounded time, a clean stop on SIGTERM, and the web
page in a real headless Chromium, screenshots included."""

import base64
import contextlib
import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import res2net
from res2net.cam import denormalize, grad_cam, overlay

pytest.importorskip("starlette", reason="serve needs the serve extra: pip install 'res2net[serve]'")
import uvicorn  # noqa: E402

from res2net.serve import (  # noqa: E402
    MicroBatcher,
    Overloaded,
    ServeConfig,
    ServeLimits,
    create_app,
    load_classifier,
)

pytestmark = pytest.mark.usefixtures("single_thread")
CLASSES = ["cat", "dog", "<b>bird</b>"]  # markup in a name must show as text on the page
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOTS = Path(os.environ.get("RES2NET_SCREENSHOTS", "/tmp/res2net-serve-screenshots"))


def png(size=(40, 30), seed=0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = res2net.create_model("res2net50_14w_8s", num_classes=3).eval()
    torch.nn.init.normal_(model.fc.weight, std=0.05)
    root = tmp_path_factory.mktemp("serve")
    res2net.save_to_folder(
        model,
        root / "folder",
        arch="res2net50_14w_8s",
        classes=CLASSES,
        eval_args={"image_resize": 32, "crop_pct": 1.0},
    )
    return root / "folder"


@pytest.fixture(scope="module")
def classifier(weights):
    return load_classifier(model_name=f"local-dir:{weights}")


@dataclass
class Running:
    """A server on a loopback port, run by uvicorn in a thread."""

    host: str
    port: int
    app: object

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def service(self):
        return self.app.state.service

    @property
    def batcher(self):
        return self.service.batcher

    @property
    def classifier(self):
        return self.service.classifier


@contextlib.contextmanager
def running(classifier, *, max_connections=1024, max_batch=8, max_wait_ms=5.0, **options):
    """`create_app(classifier, ...)` served by uvicorn as `res2net.serve.serve` configures it."""
    limits = options.pop("limits", ServeLimits())
    app = create_app(
        classifier, limits=limits, max_batch=max_batch, max_wait_ms=max_wait_ms, **options
    )
    config = ServeConfig(
        app,
        head_timeout_s=limits.timeout_s,
        host="127.0.0.1",
        port=0,
        limit_concurrency=max_connections,
        log_level="warning",
        timeout_graceful_shutdown=5,
        server_header=False,
    )
    sock = config.bind_socket()
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    try:
        yield Running("127.0.0.1", sock.getsockname()[1], app)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def server(classifier):
    limits = ServeLimits(
        max_body_bytes=200_000, max_batch_images=4, max_pixels=250_000, timeout_s=1.0
    )
    with running(classifier, limits=limits, max_batch=8, max_wait_ms=300) as srv:
        yield srv


def request(srv, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, (
        json.loads(data) if response.getheader("Content-Type") == "application/json" else data
    )


def raw(srv, data: bytes, *, timeout=10.0) -> bytes:
    """The answer to `data` sent as is: its head and `Content-Length` bytes of body, or what
    came before the server closed (at most `timeout`)."""
    with socket.create_connection((srv.host, srv.port), timeout=timeout) as s:
        s.sendall(data)
        answer = b""
        with contextlib.suppress(TimeoutError, ConnectionError):
            while chunk := s.recv(65536):
                answer += chunk
                head, _, body = answer.partition(b"\r\n\r\n")
                length = [
                    int(line.split(b":")[1])
                    for line in head.lower().split(b"\r\n")
                    if line.startswith(b"content-length:")
                ]
                if length and len(body) >= length[0]:
                    break
        return answer


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0


def direct(srv, data: bytes) -> torch.Tensor:
    c = srv.classifier
    with torch.no_grad():
        return c.model(
            c.transform(Image.open(io.BytesIO(data)).convert("RGB")).unsqueeze(0)
        ).softmax(1)[0]


def test_predict_matches_the_model_and_batches_equal_singles(server):
    images = [png(seed=i) for i in range(3)]
    status, single = request(
        server, "POST", "/predict?topk=3", images[0], {"Content-Type": "image/png"}
    )
    assert status == 200
    probs = direct(server, images[0])
    assert [t["index"] for t in single["top"]] == probs.argsort(descending=True).tolist()
    assert [t["prob"] for t in single["top"]] == pytest.approx(
        probs.sort(descending=True).values.tolist(), abs=1e-5
    )
    assert {t["class"] for t in single["top"]} == set(CLASSES)
    batch = json.dumps({"images": [base64.b64encode(b).decode() for b in images]})
    status, answer = request(
        server, "POST", "/predict?topk=2", batch, {"Content-Type": "application/json"}
    )
    assert status == 200 and len(answer["results"]) == 3
    assert answer["results"][0]["top"] == single["top"][:2]


def test_cam_png_is_the_grad_cam_overlay(server):
    data = png(seed=5)
    status, answer = request(server, "POST", "/predict?cam=1", data)
    assert status == 200
    c = server.classifier
    x = c.transform(Image.open(io.BytesIO(data)).convert("RGB")).unsqueeze(0)
    maps, _ = grad_cam(c.model, x)
    expected = overlay(denormalize(x, c.mean, c.std)[0], maps[0])
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["cam_png"]))))
    assert got.shape == (32, 32, 3) and np.abs(got.astype(int) - expected).max() <= 1


def test_concurrent_requests_are_micro_batched(server, weights):
    before = server.batcher.batches, server.batcher.images
    with ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(lambda i: request(server, "POST", "/predict", png(seed=i)), range(8))
        )
    assert all(status == 200 for status, _ in answers)
    batches, images = server.batcher.batches - before[0], server.batcher.images - before[1]
    assert images == 8 and batches < 8  # several requests shared a model call
    status, text = request(server, "GET", "/metrics")
    assert status == 200 and f"res2net_images_total {server.batcher.images}" in text.decode()


def test_health_names_the_model_never_a_path(server, weights):
    status, health = request(server, "GET", "/health")
    assert (status, health) == (
        200,
        {
            "status": "ok",
            "model": "res2net50_14w_8s",
            "classes": 3,
            "device": "cpu",
            "precision": "fp32",
        },
    )
    page = request(server, "GET", "/")[1] + request(server, "GET", "/app.js")[1]
    for answer in (json.dumps(health).encode(), page):
        assert str(weights).encode() not in answer and b"/tmp" not in answer


def bomb() -> bytes:  # 1000 x 1000 pixels (over the 250,000 cap) in a small PNG
    buffer = io.BytesIO()
    Image.new("RGB", (1000, 1000)).save(buffer, format="PNG")
    return buffer.getvalue()


def nested_json(depth: int) -> bytes:
    return b'{"images": ' + b"[" * depth + b"]" * depth + b"}"


JSON = {"Content-Type": "application/json"}


@pytest.mark.parametrize(
    "path, body, headers, status, message",
    [
        ("/predict", b"not an image", {}, 415, "cannot read image"),
        ("/predict", bomb(), {}, 413, "decompression bomb"),
        ("/predict", b"x" * 200_001, {}, 413, "limit is 200000"),
        ("/predict", b"", {}, 400, "empty body"),
        ("/predict?topk=21", png(), {}, 400, "topk"),
        ("/predict?topk=%C2%B2", png(), {}, 400, "topk='²'"),  # "²".isdigit() is True
        ("/predict?cam=%C2%B9", png(), {}, 400, "cam='¹'"),
        ("/predict?cam=yes", png(), {}, 400, "cam"),
        ("/predict?topk=" + "9" * 5000, png(), {}, 400, "topk"),
        ("/predict", b'{"images": "x"}', JSON, 400, "JSON bodies"),
        ("/predict", nested_json(99_000), JSON, 400, "JSON bodies"),  # RecursionError
        ("/predict", b'{"images": ["%%%"]}', JSON, 400, "base64"),
        ("/predict", json.dumps({"images": ["aGk="] * 5}).encode(), JSON, 413, "1..4"),
        ("/predict?cam=1", json.dumps({"images": ["aGk="]}).encode(), JSON, 400, "cam=1"),
        ("/elsewhere", png(), {}, 404, "no page"),
    ],
)
def test_bad_requests_get_clear_4xx(server, path, body, headers, status, message):
    start = time.monotonic()
    got, answer = request(server, "POST", path, body, headers)
    assert got == status and message in answer["error"] and time.monotonic() - start < 10


def test_the_images_of_a_batch_share_the_pixel_cap(server):
    """250,000 pixels per request: two 300 x 300 images pass, a third is refused by name."""
    plain = io.BytesIO()
    Image.new("RGB", (300, 300), (10, 120, 200)).save(plain, format="PNG")
    image = base64.b64encode(plain.getvalue()).decode()
    status, answer = request(server, "POST", "/predict", json.dumps({"images": [image] * 2}), JSON)
    assert status == 200 and len(answer["results"]) == 2
    status, answer = request(server, "POST", "/predict", json.dumps({"images": [image] * 3}), JSON)
    assert status == 413 and answer["error"].startswith("image 2: the images of one request")


def test_get_on_predict_says_to_post(server):
    status, answer = request(server, "GET", "/predict")
    assert status == 405 and "POST images to /predict" in answer["error"]


@pytest.mark.parametrize(
    "length",
    [
        "\N{SUPERSCRIPT TWO}".encode("latin-1"),  # isdigit() true, int() fails
        b"9" * 5000,  # more digits than Python's int() takes from a string
        b"-1",
        b"12, 13",
    ],
)
def test_odd_content_lengths_get_400_in_bounded_time(server, length):
    start = time.monotonic()
    answer = raw(
        server,
        b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: " + length + b"\r\n\r\n",
    )
    assert status_of(answer) == 400 and time.monotonic() - start < 5
    assert request(server, "GET", "/health")[0] == 200  # still serving


def test_chunked_bodies_are_read_and_capped(server):
    def chunked(data: bytes) -> bytes:
        head = b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
        head += b"Connection: close\r\n\r\n"
        parts = [data[i : i + 50_000] for i in range(0, len(data), 50_000)]
        return head + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"

    assert status_of(raw(server, chunked(png()))) == 200
    assert status_of(raw(server, chunked(b"x" * 300_000))) == 413


def test_a_stalled_or_trickling_body_gets_408(classifier):
    limits = ServeLimits(timeout_s=1.0, min_upload_bytes_per_s=1000)
    with running(classifier, limits=limits) as srv:
        start = time.monotonic()
        answer = raw(
            srv, b"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\nab"
        )
        assert status_of(answer) == 408 and time.monotonic() - start < 5  # stalled: 1 s
        with socket.create_connection((srv.host, srv.port), timeout=10) as slow:
            slow.sendall(
                b"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2000\r\n\r\n"
            )
            start, answer = time.monotonic(), b""
            with contextlib.suppress(OSError):
                # 160 bytes/s (12.5 s for the body), each part well within 1 s: cut after
                # 1 s + 2000 / 1000 s
                while time.monotonic() - start < 10 and not answer:
                    slow.sendall(b"x" * 40)
                    slow.settimeout(0.25)
                    with contextlib.suppress(TimeoutError):
                        answer = slow.recv(4096)
            assert status_of(answer) == 408 and time.monotonic() - start < 5
            assert b"1000 bytes/s" in answer


def test_a_trickling_head_is_closed_at_its_deadline(classifier):
    """uvicorn's keep-alive timer stops at a connection's first byte: a client sending a header
    line every 0.3 s would hold its connection for ever; it is closed after `timeout_s`, while
    other connections are answered meanwhile."""
    with running(classifier, limits=ServeLimits(timeout_s=1.0)) as srv:
        with socket.create_connection((srv.host, srv.port), timeout=10) as slow:
            slow.sendall(b"GET /health HTTP/1.1\r\n")
            start, closed = time.monotonic(), False
            with contextlib.suppress(OSError):  # a send after the close may be reset
                while not closed and time.monotonic() - start < 6:
                    slow.sendall(b"X-a: b\r\n")  # never the blank line ending the head
                    assert request(srv, "GET", "/health")[0] == 200  # others are answered
                    slow.settimeout(0.3)
                    with contextlib.suppress(TimeoutError):
                        closed = slow.recv(100) == b""
            assert time.monotonic() - start < 3
        assert request(srv, "GET", "/health")[0] == 200


def test_64_slow_bodies_do_not_delay_a_normal_client(classifier):
    """64 connections that declared 16 MB bodies and send a byte now and then hold a coroutine
    each and no request slot: a normal client is answered at once (issue 28: every other
    /predict got 503 and a slot was held for minutes)."""
    limits = ServeLimits(max_body_bytes=16 << 20, timeout_s=30.0)
    with running(classifier, limits=limits, max_wait_ms=0) as srv:
        assert request(srv, "POST", "/predict", png())[0] == 200  # warm: first model call
        head = (
            b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
            b"Content-Length: 16777216\r\n\r\n"
        )
        slow = [socket.create_connection((srv.host, srv.port), timeout=10) for _ in range(64)]
        try:
            for s in slow:
                s.sendall(head + b"\x89")
            for _ in range(3):  # bounded: three rounds of one more byte each
                start = time.monotonic()
                status, answer = request(srv, "POST", "/predict", png(seed=1))
                assert status == 200 and answer["top"]
                assert time.monotonic() - start < 2.0
                for s in slow:
                    s.sendall(b"P")
            assert srv.service.active == 0  # none of the 64 holds a slot
        finally:
            for s in slow:
                s.close()


def test_bodies_held_in_memory_are_bounded_together(classifier):
    """What arrived counts, not what was declared: a half-sent 200 kB body holds 150 kB of the
    300 kB budget, a small image still passes, a 200 kB one gets 503; all is given back."""
    limits = ServeLimits(max_body_bytes=200_000, max_buffered_bytes=300_000)
    with running(classifier, limits=limits) as srv:
        with socket.create_connection((srv.host, srv.port), timeout=10) as slow:
            slow.sendall(
                b"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Length: 200000\r\n\r\n"
                + b"x" * 150_000
            )
            deadline = time.monotonic() + 10
            while srv.service.budget.held < 150_000 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert request(srv, "POST", "/predict", png())[0] == 200
            status, answer = request(srv, "POST", "/predict", b"x" * 199_000)
            assert status == 503 and "uploads" in answer["error"]
        deadline = time.monotonic() + 10
        while srv.service.budget.held and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.service.budget.held == 0


def test_host_allow_list_refuses_dns_rebinding(classifier, server):
    for host in (b"attacker.example", b"attacker.example:8000", b"127.0.0.1.attacker.example"):
        answer = raw(server, b"GET /health HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        assert status_of(answer) == 400 and b"--allowed_hosts" in answer
        assert b"res2net50" not in answer
    for host in ("127.0.0.1", f"localhost:{server.port}", f"[::1]:{server.port}"):
        assert request(server, "GET", "/health", headers={"Host": host})[0] == 200
    with running(classifier, allowed_hosts=["127.0.0.1", "classifier.lan"]) as srv:
        got = request(srv, "GET", "/health", headers={"Host": "classifier.lan:8000"})
        assert got[0] == 200
        assert request(srv, "GET", "/health", headers={"Host": "localhost"})[0] == 400


def test_cross_origin_posts_are_refused_unless_allowed(classifier, server):
    text = {"Content-Type": "text/plain", "Origin": "http://evil.example"}
    status, answer = request(server, "POST", "/predict", png(), text)
    assert status == 403 and "--allow_origin" in answer["error"]
    same = {"Origin": f"http://127.0.0.1:{server.port}", "Content-Type": "image/png"}
    status, answer = request(server, "POST", "/predict", png(), same)
    assert status == 200
    status, _ = request(server, "GET", "/health", headers={"Origin": "http://evil.example"})
    assert status == 403
    with running(classifier, allow_origins=["https://ok.example"]) as srv:
        conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
        ok = {"Origin": "https://ok.example", "Content-Type": "image/png"}
        conn.request("POST", "/predict", body=png(), headers=ok)
        response = conn.getresponse()
        response.read()
        assert response.status == 200
        assert response.getheader("Access-Control-Allow-Origin") == "https://ok.example"
        preflight = {
            "Origin": "https://ok.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        }
        conn.request("OPTIONS", "/predict", headers=preflight)
        response = conn.getresponse()
        response.read()
        assert response.status == 200
        conn.close()
        assert request(srv, "POST", "/predict", png(), text)[0] == 403


def high_bit_gray(fmt: str, side: int) -> bytes:
    values = np.tile(np.arange(side, dtype=np.int64) * 131 % 65536, (side, 1))  # compresses
    buffer = io.BytesIO()
    if fmt == "PNG":
        Image.frombytes("I;16", (side, side), values.astype("<u2").tobytes()).save(buffer, "PNG")
    else:
        im = Image.frombytes("I", (side, side), values.astype("<i4").tobytes(), "raw", "I")
        im.save(buffer, "TIFF", compression="tiff_deflate")
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_high_bit_depth_images_at_the_pixel_cap_are_classified(server, fmt):
    """500 x 500 = the test server's pixel cap; tests/test_decode_resized.py measures the memory
    of every mode at the cap."""
    status, answer = request(server, "POST", "/predict", high_bit_gray(fmt, 500))
    assert status == 200 and len(answer["top"]) == 3


def test_an_image_whose_decoder_takes_more_memory_gets_413(server):
    """PIL decodes a 16-bit RGB PNG whole, in 4 bytes per pixel: at the pixel cap that and its
    body pass 4 bytes per pixel of the cap. Refused from its header in one line saying what to
    do; a smaller one is classified."""
    from tests.test_decode_resized import png16

    flat = np.full((500, 500, 3), (10, 120, 200), dtype=np.uint8)  # compresses
    status, answer = request(server, "POST", "/predict", png16(flat))
    assert status == 413 and "16-bit RGB PNG" in answer["error"]
    assert answer["error"].endswith("convert it to 8 bits per channel")
    status, answer = request(server, "POST", "/predict", png16(flat[:400, :400]))
    assert status == 200 and len(answer["top"]) == 3


@pytest.mark.parametrize("size", [(1, 250_000), (250_000, 1)])
def test_a_long_thin_image_is_classified_in_bounded_time(server, size):
    """A 1 x 250,000 strip (the test server's pixel cap): resized whole to the model's 32
    pixels it would be 32 x 8,000,000 pixels (1 GB of RGB); decoded for the eval transform,
    only what its center crop keeps is resized."""
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 120, 200)).save(buffer, format="PNG")
    start = time.monotonic()
    status, answer = request(server, "POST", "/predict", buffer.getvalue())
    assert status == 200 and len(answer["top"]) == 3 and time.monotonic() - start < 10


def test_bf16_serves_the_optimized_model(weights):
    """`--precision bf16`: predictions from `optimize_for_inference`'s bfloat16 copy, close to
    fp32's; Grad-CAM still runs on the fp32 model (it needs gradients)."""
    from res2net.lowprec import bf16_supported
    from res2net.serve import with_precision

    if not bf16_supported():
        pytest.skip("this CPU has no native bfloat16 (AVX-512 BF16 or AMX)")
    fp32 = load_classifier(model_name=f"local-dir:{weights}")
    bf16 = with_precision(load_classifier(model_name=f"local-dir:{weights}"), "bf16")
    assert bf16.fast is not None and bf16.fast is not bf16.model
    with running(bf16) as srv:
        assert request(srv, "GET", "/health")[1]["precision"] == "bf16"
        status, answer = request(srv, "POST", "/predict?topk=3&cam=1", png(seed=7))
        assert status == 200 and answer["cam_png"]
    expected = fp32.probabilities(fp32.transform(Image.open(io.BytesIO(png(seed=7)))).unsqueeze(0))
    got = {t["index"]: t["prob"] for t in answer["top"]}
    assert [got[i] for i in range(3)] == pytest.approx(expected[0].tolist(), abs=0.05)


def test_int8_calibrates_on_the_folder_at_the_model_input_size(weights, tmp_path, monkeypatch):
    """`--precision int8 --calibration DIR` hands `optimize_for_inference` batches of the
    folder's images at the served model's input size (the int8 compile itself takes minutes
    and is covered by tests/test_lowprec.py)."""
    import res2net.inference
    from res2net.serve import with_precision

    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(png(size=(48, 40), seed=i))
    seen = {}

    def fake(model, *, precision, calibration):
        seen.update(precision=precision, shapes=[tuple(b.shape) for b in calibration])
        return model

    monkeypatch.setattr(res2net.inference, "optimize_for_inference", fake)
    classifier = with_precision(
        load_classifier(model_name=f"local-dir:{weights}"), "int8", str(tmp_path)
    )
    assert classifier.precision == "int8" and classifier.fast is not None
    assert seen == {"precision": "int8", "shapes": [(3, 3, 32, 32)]}


def test_batcher_refuses_beyond_its_queue():
    release = threading.Event()
    batcher = MicroBatcher(
        lambda x: (release.wait(5), x)[1], max_batch=1, max_wait_ms=0, max_queue=2
    )
    try:
        first = batcher.submit(torch.zeros(1))
        time.sleep(0.3)  # the loop holds the first item, blocked in fn
        batcher.submit(torch.zeros(1))
        batcher.submit(torch.zeros(1))
        with pytest.raises(Overloaded):
            batcher.submit(torch.zeros(1))
        release.set()
        assert first.result(timeout=5).shape == (1,)
    finally:
        release.set()
        batcher.close()


def test_a_full_queue_answers_503(classifier):
    limits = ServeLimits(max_queue=1)
    with running(classifier, limits=limits, max_batch=1, max_wait_ms=0) as srv:
        release = threading.Event()
        srv.batcher.fn = lambda x: (release.wait(10), classifier.probabilities(x))[1]
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(request, srv, "POST", "/predict", png())
            time.sleep(0.5)  # in the model, blocked
            second = pool.submit(request, srv, "POST", "/predict", png(seed=1))
            time.sleep(0.5)  # waiting in the queue
            status, answer = request(srv, "POST", "/predict", png(seed=2))
            release.set()
            assert status == 503 and "retry" in answer["error"]
            assert first.result()[0] == second.result()[0] == 200


def test_cli_flags_reach_the_server(weights, monkeypatch):
    import res2net.serve as serving
    from res2net.cli.main import main as cli_main

    seen = {}

    def fake_serve(settings, *, host, port, workers, classifier, ready):
        seen.update(settings=settings, host=host, workers=workers, classifier=classifier)

    monkeypatch.setattr(serving, "serve", fake_serve)
    flags = ["--max_concurrent", "3", "--max_connections", "5", "--max_queue", "7"]
    flags += ["--allowed_hosts", "box.lan", "--allow_origin", "https://ok.example"]
    flags += ["--host", "10.1.2.3", "--workers", "2", "--max_decoding", "4"]
    argv = ["serve", "--model", f"local-dir:{weights}", *flags, "--timeout_s", "2.5"]
    assert cli_main(argv) == 0
    settings = seen["settings"]
    limits = settings.limits
    assert (limits.max_concurrent, limits.max_connections, limits.max_queue) == (3, 5, 7)
    assert limits.timeout_s == 2.5 and limits.max_decoding == 4
    assert set(settings.allowed_hosts) == {"127.0.0.1", "localhost", "::1", "10.1.2.3", "box.lan"}
    assert settings.allow_origins == ["https://ok.example"]
    assert seen["workers"] == 2 and seen["classifier"] is None  # each worker loads its own


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--max_wait_ms", "inf", "--max_wait_ms inf: give 0 to 10000"),
        ("--max_wait_ms", "1e13", "--max_wait_ms 1e+13: give 0 to 10000"),
        ("--max_wait_ms", "nan", "--max_wait_ms nan: give 0 to 10000"),
        ("--timeout_s", "1e10", "--timeout_s 1e+10: give a positive number up to 86400"),
        ("--workers", "0", "--workers 0: give a positive number"),
        (
            "--precision",
            "int8",
            "--precision int8 needs --calibration DIR: a folder of typical images",
        ),
    ],
)
def test_cli_refuses_waits_the_server_cannot_keep(
    weights, monkeypatch, capsys, flag, value, message
):
    """Refused in one line before the model is loaded."""
    import res2net.serve as serving
    from res2net.cli.main import main as cli_main

    def never(*args, **kwargs):
        raise AssertionError("started with settings it cannot keep")

    monkeypatch.setattr(serving, "serve", never)
    monkeypatch.setattr(serving, "load_classifier", never)
    assert cli_main(["serve", "--model", f"local-dir:{weights}", flag, value]) == 2
    assert capsys.readouterr().err == f"res2net serve: error: {message}\n"


def start_cli(weights, *extra):
    ckpt = weights / "model.safetensors"  # the architecture and eval transform come from the file
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "res2net.cli.main", "serve", "--ckpt_path", str(ckpt)]
    proc = subprocess.Popen(
        [*argv, "--port", "0", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    line = proc.stdout.readline()
    assert "serving res2net50_14w_8s (3 classes) at http://127.0.0.1:" in line, proc.stderr.read()
    return proc, int(line.rsplit(":", 1)[1].strip("/\n"))


def test_cli_serves_and_sigterm_drains_in_flight_requests(weights):
    """A request whose body is half sent when SIGTERM arrives is still answered; then the
    process exits 0 and prints nothing (issue 28: once `terminate called without an active
    exception`)."""
    proc, port = start_cli(weights)
    try:
        body = png()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(
                b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body) + body[:100]
            )
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            s.sendall(body[100:])
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        assert status_of(answer) == 200 and b'"class":"' in answer
        assert proc.wait(timeout=30) == 0
        assert proc.stdout.read() == ""
        # the one line of the start (where the eval transform came from), nothing at the stop
        assert [line.split(":")[0] for line in proc.stderr.read().splitlines()] == [
            "eval transform"
        ]
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_cli_workers_share_the_port(weights):
    """Two processes, each with its model: both answer on one port; SIGTERM stops all, 0.
    Slow: each worker is a fresh interpreter importing torch and loading the model."""
    proc, port = start_cli(weights, "--workers", "2")
    srv = Running("127.0.0.1", port, None)
    try:
        deadline, status = time.monotonic() + 300, 0
        while status != 200 and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                status = request(srv, "GET", "/health")[0]
            time.sleep(0.5)
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda i: request(srv, "POST", "/predict", png()), range(8)))
        assert [status for status, _ in answers] == [200] * 8
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        proc.terminate()  # SIGTERM: the workers stop with it (SIGKILL would orphan them)
        proc.wait(timeout=120)


BOXES = """(selectors) => {
  const boxes = [];
  for (const selector of selectors) {
    for (const el of document.querySelectorAll(selector)) {
      const r = el.getBoundingClientRect();
      if (el.checkVisibility() && r.width > 0 && r.height > 0) {
        boxes.push({selector, left: r.left, top: r.top, right: r.right, bottom: r.bottom});
      }
    }
  }
  return boxes;
}"""
IMAGES = """() => [...document.images].filter((img) => img.checkVisibility()).map((img) => ({
  id: img.id, natural: img.naturalWidth, complete: img.complete,
  shown: img.getBoundingClientRect().width, rendering: getComputedStyle(img).imageRendering,
}))"""
LAYOUT = ["h1", "#model", "#drop", "#status", "#error", "#result figure", "#top"]


def overlaps(page) -> list[tuple[str, str]]:
    boxes = page.evaluate(BOXES, LAYOUT)
    return [
        (a["selector"], b["selector"])
        for i, a in enumerate(boxes)
        for b in boxes[i + 1 :]
        if min(a["right"], b["right"]) - max(a["left"], b["left"]) > 0.5
        and min(a["bottom"], b["bottom"]) - max(a["top"], b["top"]) > 0.5
    ]


def check_layout(page) -> None:
    """Nothing overlaps, nothing sticks out sideways, no visible image is broken."""
    assert overlaps(page) == []
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    for img in page.evaluate(IMAGES):
        assert img["complete"] and img["natural"] > 0, img


@pytest.mark.parametrize("width", [1280, 390])
def test_web_page_in_headless_chromium(server, tmp_path, width):
    """The page before an upload, after a good one and after a bad one, at a desktop and a
    phone width: what shows, where, and screenshots (in SCREENSHOTS) to look at."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the browser test needs python's playwright: pip install 'res2net[dev]'")
    if not os.path.exists(CHROMIUM):
        pytest.skip(
            "the browser test needs Debian's chromium: apt-get install -y chromium "
            "(.ci/run does it)"
        )
    good, bad = tmp_path / "cat.png", tmp_path / "notes.png"
    good.write_bytes(png(size=(32, 24), seed=3))  # a small input: shown enlarged, pixelated
    bad.write_bytes(b"not an image at all")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-sync",
    ]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=flags)
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: m.type == "error" and errors.append(m.text))  # CSP too
            page.goto(server.url + "/")
            page.wait_for_selector("#model:has-text('3 classes')")
            assert page.inner_text("#model") == "res2net50_14w_8s: 3 classes"  # no path
            assert not page.is_visible("#result") and not page.is_visible("#error")
            check_layout(page)
            page.screenshot(path=SCREENSHOTS / f"before-{width}.png", full_page=True)

            # the drop zone is the file input's label, reached with the keyboard
            assert page.get_by_label("Drop an image here").get_attribute("id") == "file"
            page.keyboard.press("Tab")
            assert page.evaluate("document.activeElement.id") == "file"
            outline = page.eval_on_selector("#drop", "e => getComputedStyle(e).outlineStyle")
            assert outline != "none"  # the focus shows on the drop zone

            page.set_input_files("#file", str(good))
            page.wait_for_selector(".class-row >> nth=2", timeout=30_000)
            page.wait_for_function(
                "document.getElementById('cam').naturalWidth === 32", timeout=30_000
            )
            names = page.locator(".class-name").all_text_contents()
            assert sorted(names) == sorted(CLASSES)  # the markup shows as text
            images = {img["id"]: img for img in page.evaluate(IMAGES)}
            assert set(images) == {"preview", "cam"}
            for img in images.values():  # 32-pixel images shown at 4x or more, as pixels
                assert img["shown"] >= 4 * img["natural"] and img["rendering"] == "pixelated"
            check_layout(page)
            page.screenshot(path=SCREENSHOTS / f"good-{width}.png", full_page=True)

            page.set_input_files("#file", str(bad))
            page.wait_for_selector("#error:visible", timeout=30_000)
            assert "notes.png: cannot read image" in page.inner_text("#error")
            assert not page.is_visible("#result")  # the previous answer is gone
            assert page.locator(".class-row").count() == 0
            check_layout(page)
            page.screenshot(path=SCREENSHOTS / f"bad-{width}.png", full_page=True)
            # the console reports the 415 itself; nothing else (no script or CSP error)
            assert [e for e in errors if "status of 415" not in e] == []
        finally:
            browser.close()


@pytest.mark.slow
def test_serve_load_benchmark_runs_all_three_side_by_side(tmp_path):
    """benchmarks/serve_load.py with a small input: the new server, the old one rebuilt from
    git history and direct model calls each answer every request; the report has their rows."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_load.py"
    flags = ["--model", "res2net50_14w_8s", "--image_size", "32", "--clients", "1", "2"]
    flags += ["--seconds", "1", "--warmup", "0.5", "--out", str(tmp_path / "run.json")]
    subprocess.run([sys.executable, str(script), *flags], check=True, capture_output=True)
    runs = json.loads((tmp_path / "run.json").read_text())["runs"]
    assert [(r["server"], r["clients"]) for r in runs] == [
        (server, clients) for server in ("new", "old", "direct") for clients in (1, 2)
    ]
    assert all(r["requests"] > 0 and r["errors"] == 0 for r in runs)
    table = subprocess.run(
        [sys.executable, str(script), "--report", str(tmp_path / "run.json")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "| old | 2 |" in table and "overhead over the bare model at 2 clients" in table
