"""`res2net serve`: answers checked against the model run directly, micro-batching, the bounds
on hostile requests, a clean stop on SIGTERM, and the web page in a real headless Chromium."""

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

import numpy as np
import pytest
import torch
from PIL import Image

import res2net
from res2net.cam import denormalize, grad_cam, overlay
from res2net.serve import MicroBatcher, Overloaded, ServeLimits, Server, load_classifier

pytestmark = pytest.mark.usefixtures("single_thread")
CLASSES = ["cat", "dog", "<b>bird</b>"]  # markup in a name must show as text on the page
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


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
def server(weights):
    classifier = load_classifier(model_name=f"local-dir:{weights}")
    limits = ServeLimits(
        max_body_bytes=200_000, max_batch_images=4, max_pixels=250_000, socket_timeout_s=1.0
    )
    srv = Server(("127.0.0.1", 0), classifier, limits=limits, max_batch=8, max_wait_ms=300)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def request(srv, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, (
        json.loads(data) if response.getheader("Content-Type") == "application/json" else data
    )


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


def test_concurrent_requests_are_micro_batched(server):
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
    assert request(server, "GET", "/health") == (
        200,
        {"status": "ok", "model": server.classifier.name, "classes": 3, "device": "cpu"},
    )


def bomb() -> bytes:  # 1000 x 1000 pixels (over the 250,000 cap) in a small PNG
    buffer = io.BytesIO()
    Image.new("RGB", (1000, 1000)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "path, body, headers, status, message",
    [
        ("/predict", b"not an image", {}, 415, "cannot read image"),
        ("/predict", bomb(), {}, 413, "decompression bomb"),
        ("/predict", b"x" * 200_001, {}, 413, "limit is 200000"),
        ("/predict", b"", {}, 400, "empty body"),
        ("/predict?topk=21", png(), {}, 400, "topk"),
        ("/predict?cam=yes", png(), {}, 400, "cam"),
        ("/predict", b'{"images": "x"}', {"Content-Type": "application/json"}, 400, "JSON bodies"),
        ("/predict", b'{"images": ["%%%"]}', {"Content-Type": "application/json"}, 400, "base64"),
        (
            "/predict",
            json.dumps({"images": ["aGk="] * 5}).encode(),
            {"Content-Type": "application/json"},
            413,
            "1..4",
        ),
        ("/elsewhere", png(), {}, 404, "no endpoint"),
    ],
)
def test_bad_requests_get_clear_4xx(server, path, body, headers, status, message):
    got, answer = request(server, "POST", path, body, headers)
    assert got == status and message in answer["error"]


def test_missing_length_and_slow_clients_are_cut_off(server):
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        assert b" 411 " in s.recv(4096).split(b"\r\n")[0]
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\npartial")
        start = time.monotonic()
        answer = b""
        while chunk := s.recv(4096):  # the server gives up after its socket timeout (1 s)
            answer += chunk
        assert time.monotonic() - start < 8 and b" 408 " in answer.split(b"\r\n")[0]
    assert request(server, "GET", "/health")[0] == 200  # still serving


@contextlib.contextmanager
def serving(weights, **limits):
    """A server with these `ServeLimits`, polling often (deadlines are checked between polls)."""
    classifier = load_classifier(model_name=f"local-dir:{weights}")
    srv = Server(("127.0.0.1", 0), classifier, limits=ServeLimits(**limits))
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def test_connections_beyond_the_cap_wait_and_start_no_thread(weights):
    """Idle clients hold a thread each until their head deadline: beyond `max_connections`
    the server accepts nothing more, so later clients wait (they are not refused or reset)."""
    with serving(weights, max_connections=2, head_timeout_s=30) as srv:
        threads = threading.active_count()
        idle = [socket.create_connection(srv.server_address[:2], timeout=10) for _ in range(2)]
        time.sleep(0.3)  # both accepted, each by its handler thread
        waiting = socket.create_connection(srv.server_address[:2], timeout=0.5)
        waiting.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        with pytest.raises(TimeoutError):
            waiting.recv(100)  # not accepted while both slots are held
        assert threading.active_count() <= threads + 2
        for s in idle:
            s.close()
        waiting.settimeout(10)
        assert waiting.recv(100).startswith(b"HTTP/1.1 200 ")
        waiting.close()


def test_a_trickling_head_or_body_is_cut_at_its_deadline(weights):
    """A socket timeout bounds each read; a client sending a byte at a time stays inside it.
    The head must arrive within `head_timeout_s`, a body at `min_upload_bytes_per_s`."""
    limits = dict(max_connections=1, socket_timeout_s=1.0, head_timeout_s=1.0)
    with serving(weights, **limits, min_upload_bytes_per_s=1000) as srv:
        host, port = srv.server_address[:2]
        with socket.create_connection((host, port), timeout=10) as slow:
            slow.sendall(b"GET /health HTTP/1.1\r\n")
            start = time.monotonic()
            with ThreadPoolExecutor(1) as pool:  # another client, waiting for the one slot
                other = pool.submit(lambda: (request(srv, "GET", "/health")[0], time.monotonic()))
                with contextlib.suppress(OSError):
                    while time.monotonic() - start < 6:
                        slow.sendall(b"X-a: b\r\n")  # never the blank line ending the head
                        time.sleep(0.3)
                status, answered = other.result()
            assert status == 200 and answered - start < 4  # served while the trickle went on
        with socket.create_connection((host, port), timeout=10) as slow:
            slow.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n")
            start = time.monotonic()
            answer = b""
            with contextlib.suppress(OSError):
                while time.monotonic() - start < 8 and not answer:
                    slow.sendall(b"x" * 50)  # 167 bytes/s: under the 1000 asked for
                    time.sleep(0.3)
                    slow.settimeout(0.01)
                    with contextlib.suppress(TimeoutError):
                        answer = slow.recv(4096)
            assert b" 408 " in answer.split(b"\r\n")[0] and time.monotonic() - start < 6
            assert b"1000 bytes/s" in answer


def test_a_large_upload_waiting_for_a_slot_is_answered_not_reset(weights):
    with serving(weights, max_connections=1, head_timeout_s=1.0) as srv:
        idle = socket.create_connection(srv.server_address[:2], timeout=10)  # holds the slot
        time.sleep(0.3)
        status, answer = request(srv, "POST", "/predict", body=b"\0" * 3_000_000)
        assert status == 415 and "image" in answer["error"]  # served once the idle one was cut
        idle.close()


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


def test_cli_limit_flags_reach_the_server(weights, monkeypatch):
    import res2net.serve as serving
    from res2net.cli.main import main as cli_main

    seen = {}

    class NoServer:
        url = "http://127.0.0.1:0"

        def __init__(self, address, classifier, *, limits, max_batch, max_wait_ms):
            seen.update(limits=limits, max_batch=max_batch)

    monkeypatch.setattr(serving, "Server", NoServer)
    monkeypatch.setattr(serving, "serve_forever", lambda server: None)
    flags = ["--max_concurrent", "3", "--max_connections", "5", "--max_queue", "7"]
    argv = ["serve", "--model", f"local-dir:{weights}", *flags, "--timeout_s", "2.5"]
    assert cli_main(argv) == 0
    limits = seen["limits"]
    assert (limits.max_concurrent, limits.max_connections, limits.max_queue) == (3, 5, 7)
    assert limits.socket_timeout_s == limits.head_timeout_s == 2.5


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--max_wait_ms", "inf", "--max_wait_ms inf: give 0 to 10000"),
        ("--max_wait_ms", "1e13", "--max_wait_ms 1e+13: give 0 to 10000"),
        ("--max_wait_ms", "nan", "--max_wait_ms nan: give 0 to 10000"),
        ("--timeout_s", "1e10", "--timeout_s 1e+10: give a positive number up to 86400"),
    ],
)
def test_cli_refuses_waits_the_server_cannot_keep(
    weights, monkeypatch, capsys, flag, value, message
):
    """A wait beyond what the threading and socket layers accept (about 1e10 s) would stop the
    batcher thread at the first request (every request then times out) or fail every
    connection: refused in one line before the model is loaded."""
    import res2net.serve as serving
    from res2net.cli.main import main as cli_main

    def never(*args, **kwargs):
        raise AssertionError("started with a wait it cannot keep")

    monkeypatch.setattr(serving, "Server", never)
    monkeypatch.setattr(serving, "load_classifier", never)
    assert cli_main(["serve", "--model", f"local-dir:{weights}", flag, value]) == 2
    assert capsys.readouterr().err == f"res2net serve: error: {message}\n"


def test_cli_serves_and_stops_on_sigterm(weights, tmp_path):
    ckpt = weights / "model.safetensors"  # the architecture and eval transform come from the file
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "res2net.cli.main",
            "serve",
            "--ckpt_path",
            str(ckpt),
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        assert "serving" in line, proc.stderr.read()
        port = int(line.rsplit(":", 1)[1].strip("/\n"))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/predict", body=png())
        answer = json.loads(conn.getresponse().read())
        assert answer["top"][0]["class"] in {"0", "1", "2"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        proc.kill()
        proc.wait()


def test_web_page_in_headless_chromium(server, tmp_path):
    """The page loads, an image is chosen, the top classes and the CAM overlay appear."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the browser test needs python's playwright: pip install 'res2net[dev]'")
    if not os.path.exists(CHROMIUM):
        pytest.skip(
            "the browser test needs Debian's chromium: apt-get install -y chromium "
            "(.ci/run does it)"
        )
    (tmp_path / "pic.png").write_bytes(png(seed=3))
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
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/")
            page.wait_for_selector("#model:has-text('3 classes')")
            page.set_input_files("#file", str(tmp_path / "pic.png"))
            page.wait_for_selector(".class-row >> nth=2", timeout=30_000)
            names = page.locator(".class-name").all_text_contents()
            assert sorted(names) == sorted(CLASSES)  # the markup shows as text
            page.wait_for_function(
                "document.getElementById('cam').naturalWidth === 32", timeout=30_000
            )
            assert page.locator("#cam").get_attribute("src").startswith("data:image/png;base64,")
            assert not errors
        finally:
            browser.close()
