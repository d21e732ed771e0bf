"""Hostile clients and hostile files, each attack reproduced for real (loopback only, bounded in time and count).

The service tests run against one `bentoml serve` with small limits (`guarded`: 64 requests in flight, 2 s to
send headers or a body, 16 KiB of headers, 2 MiB bodies, its own TMPDIR); a normal client must keep getting
answers while each attack runs. The loader tests feed `trainer.fit` and `serving.predict` crafted archives,
special files and broken links. Run: `pytest tests/test_hardening.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import pickle
import re
import shutil
import signal
import socket
import struct
import tarfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from helpers import ServedClassifier, image_bytes, read_test_images, run_module
from PIL import Image

pytestmark = pytest.mark.slow
TIMEOUT = 30
LIMITS = {"max_concurrency": 64, "body_timeout_s": 2, "header_timeout_s": 2, "max_header_kb": 16, "max_body_mb": 2}


# ------------------------------------------------------------------ the guarded server and a normal client


@pytest.fixture(scope="module")
def guarded(default_model: Path, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("guarded")
    (folder / "tmp").mkdir()
    arguments = [item for name, value in LIMITS.items() for item in ("--arg", f"{name}={value}")]
    served = ServedClassifier(
        "--arg",
        f"model={default_model}",
        *arguments,
        home=folder / "home",
        log_path=folder / "server.log",
        env={"TMPDIR": str(folder / "tmp")},
    )
    served.tmp = folder / "tmp"
    with served:
        served.wait_ready()
        yield served


@pytest.fixture(scope="module")
def jpeg(shared_archive: Path) -> bytes:
    return read_test_images(shared_archive, per_class=1)[3][2]  # a cat


def _classify(server: ServedClassifier, data: bytes, name: str = "cat.jpg", **kwargs) -> httpx.Response:
    files = [("images", (name, data, "image/jpeg"))]
    return httpx.post(f"{server.url}/classify", files=files, timeout=TIMEOUT, **kwargs)


class NormalClient:
    """Classifies one image after another in a thread, recording every status, until stopped."""

    def __init__(self, server: ServedClassifier, data: bytes) -> None:
        self.server, self.data, self.statuses = server, data, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=TIMEOUT) as client:
            while not self._stop.is_set():
                files = [("images", ("cat.jpg", self.data, "image/jpeg"))]
                try:
                    self.statuses.append(client.post(f"{self.server.url}/classify", files=files).status_code)
                except httpx.HTTPError as err:
                    self.statuses.append(type(err).__name__)

    def __enter__(self) -> NormalClient:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT + 5)


def _assert_all_answered(client: NormalClient, what: str) -> None:
    counts = Counter(client.statuses)
    assert client.statuses and set(counts) == {200}, f"a normal client during {what}: {counts}"


def _connect(server: ServedClassifier) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_status(sock: socket.socket) -> int | None:
    """The status code of the response on `sock`, or None if the server closed it without one."""
    data = b""
    try:
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                return None
            data += chunk
    except (ConnectionResetError, TimeoutError):
        return None
    return int(data.split(b" ", 2)[1])


# ------------------------------------------------------------------ 1. slow bodies


def test_slow_uploads_do_not_hold_the_slots_of_normal_clients(guarded, jpeg) -> None:
    """150 clients (more than the 64 slots) send headers and 100 bytes of a 10 KB body, then a byte now and
    then: before bodies were read ahead of taking a slot, they held every slot and normal clients got 429."""
    head = b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 10000\r\n\r\n"
    slow = [_connect(guarded) for _ in range(150)]
    for sock in slow:
        sock.sendall(head + b"\xff" * 100)
    with NormalClient(guarded, jpeg) as client:
        deadline = time.monotonic() + 4  # past the 2 s body limit: the slow ones are cut off meanwhile
        while time.monotonic() < deadline:
            for sock in slow:
                with contextlib.suppress(OSError):
                    sock.send(b"\x00")
            time.sleep(0.5)
    _assert_all_answered(client, "150 slow uploads")
    statuses = Counter(_read_status(sock) for sock in slow)
    assert statuses[408] == len(slow), f"the slow uploads were not refused with 408: {statuses}"
    for sock in slow:
        sock.close()


# ------------------------------------------------------------------ 2. unknown paths in /metrics


def test_unknown_paths_collapse_into_one_metrics_label(guarded) -> None:
    with httpx.Client(timeout=TIMEOUT) as client:
        for i in range(300):
            assert client.get(f"{guarded.url}/probe-{i}-{os.urandom(4).hex()}").status_code == 404
        metrics = client.get(f"{guarded.url}/metrics").text
    endpoints = set(re.findall(r'endpoint="([^"]*)"', metrics))
    assert not any("probe-" in e for e in endpoints), sorted(endpoints)[:10]
    assert "/(unknown-route)" in endpoints and len(endpoints) < 20, sorted(endpoints)


# ------------------------------------------------------------------ 3. large JSON bodies


def test_oversized_json_is_refused_before_parsing(guarded, jpeg) -> None:
    """250 images of compact JSON (1.5 MB): under the 2 MiB body limit, over what 64 images can take (~1.2 MB).
    It must be refused by its size, before any parsing (before, the service parsed it on the event loop and
    only then counted the images)."""
    body = json.dumps({"pixels": np.zeros((250, 32, 32, 3), int).tolist()}, separators=(",", ":")).encode()
    assert 1.4e6 < len(body) < 2 * 2**20
    with NormalClient(guarded, jpeg) as client:
        for _ in range(8):
            headers = {"content-type": "application/json"}
            response = httpx.post(f"{guarded.url}/classify_pixels", content=body, headers=headers, timeout=TIMEOUT)
            assert response.status_code == 413, response.text[:300]
            assert "exceeds" in response.json()["error"], response.text[:300]  # the size, not the image count
    _assert_all_answered(client, "oversized JSON bodies")
    # The largest valid body (64 images, with spaces) is parsed off the event loop and answered.
    big = {"pixels": np.full((64, 32, 32, 3), 255).tolist(), "k": 1}
    response = httpx.post(f"{guarded.url}/classify_pixels", json=big, timeout=TIMEOUT)
    assert response.status_code == 200 and len(response.json()) == 64


# ------------------------------------------------------------------ 4. decode amplification


def _gif_declaring(width: int, height: int) -> bytes:
    """A tiny GIF (one pixel of data) whose screen and image descriptors declare width x height."""
    data = bytearray(image_bytes(Image.new("P", (1, 1)), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)  # logical screen
    at = data.index(b",")  # image descriptor
    data[at + 5 : at + 9] = struct.pack("<HH", width, height)
    return bytes(data)


def test_images_that_declare_huge_sizes_cannot_starve_others(guarded, jpeg) -> None:
    gif = _gif_declaring(6324, 6324)  # 40.0 M pixels declared, under the per-image limit
    assert len(gif) < 100
    six = [("images", (f"{i}.gif", gif, "image/gif")) for i in range(6)]
    one = [("images", ("big.gif", gif, "image/gif"))]

    async def attack() -> list[int]:
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            requests = [client.post(f"{guarded.url}/classify", files=six) for _ in range(6)]
            requests += [client.post(f"{guarded.url}/classify", files=one) for _ in range(12)]
            return [r.status_code for r in await asyncio.gather(*requests)]

    with NormalClient(guarded, jpeg) as client:
        statuses = asyncio.run(attack())
    _assert_all_answered(client, "huge declared images")
    assert statuses[:6] == [413] * 6, statuses  # six of them pass the per-request budget of declared pixels
    # The worker's decode budget refuses the rest at once (503); the admitted ones are decoded.
    assert set(statuses[6:]) <= {200, 400, 503} and 503 in statuses[6:], statuses


# ------------------------------------------------------------------ 6. headers: size and time


def test_oversized_headers_get_431(guarded) -> None:
    sock = _connect(guarded)
    sock.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n")
    try:
        for i in range(2000):  # 2,000 header lines of ~24 bytes: 48 KB, over the 16 KiB limit
            sock.sendall(f"X-Padding-{i:05d}: aaaaaaaa\r\n".encode())
    except OSError:
        pass  # the server answered and closed while headers were still being sent
    assert _read_status(sock) == 431
    sock.close()


def test_idle_and_half_sent_connections_are_closed(guarded) -> None:
    idle = _connect(guarded)
    partial = _connect(guarded)
    partial.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-")
    assert _read_status(partial) == 408  # after header_timeout_s (2 s)
    idle.settimeout(TIMEOUT)
    assert idle.recv(1) == b"", "an idle connection stayed open"
    idle.close()
    partial.close()


# ------------------------------------------------------------------ 7. after an overload


def test_service_answers_normally_right_after_an_overload(guarded, jpeg) -> None:
    async def overload() -> Counter:
        async with httpx.AsyncClient(timeout=TIMEOUT, limits=httpx.Limits(max_connections=256)) as client:
            stop = time.monotonic() + 3

            async def user() -> list[int]:
                statuses = []
                while time.monotonic() < stop:
                    files = [("images", ("cat.jpg", jpeg, "image/jpeg"))]
                    statuses.append((await client.post(f"{guarded.url}/classify", files=files)).status_code)
                return statuses

            return Counter(s for statuses in await asyncio.gather(*(user() for _ in range(128))) for s in statuses)

    counts = asyncio.run(overload())
    assert set(counts) <= {200, 429, 503}, counts
    with httpx.Client(timeout=TIMEOUT) as client:
        for _ in range(20):
            assert (
                client.post(f"{guarded.url}/classify", files=[("images", ("c.jpg", jpeg, "image/jpeg"))]).status_code
                == 200
            )


# ------------------------------------------------------------------ 8. no upload left on disk; a killed worker


def test_uploads_never_touch_the_disk_and_a_killed_worker_is_logged(guarded, jpeg) -> None:
    files = [("images", (f"{i}.jpg", jpeg, "image/jpeg")) for i in range(8)]
    assert httpx.post(f"{guarded.url}/classify", files=files, timeout=TIMEOUT).status_code == 200
    workers = [
        p for p in psutil.Process(guarded.process.pid).children(recursive=True) if "worker" in " ".join(p.cmdline())
    ]
    victim = workers[0]
    warmed_up = guarded.log(10**7).count(" warmed up in ")
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    deadline = time.monotonic() + 120
    while f"pid {victim.pid}) ended without shutting down" not in guarded.log(50000):
        assert time.monotonic() < deadline, guarded.log()
        time.sleep(0.2)
    while guarded.log(10**7).count(" warmed up in ") <= warmed_up:  # the replacement loads the model
        assert time.monotonic() < deadline, guarded.log()
        time.sleep(0.2)
    guarded.wait_ready(timeout=60)  # every worker again, the replacement included (later tests use the server)
    left = [f for f in guarded.tmp.rglob("*") if f.is_file() and jpeg[:256] in f.read_bytes()]
    assert left == [], "uploads were left in the server's temporary folder"


# ------------------------------------------------------------------ 9. two servers on one machine


def test_a_second_server_leaves_the_first_ones_metrics_alone(guarded, default_model, jpeg, tmp_path) -> None:
    def classify_count(server: ServedClassifier) -> float:
        text = httpx.get(f"{server.url}/metrics", timeout=TIMEOUT).text
        return sum(float(v) for v in re.findall(r"^classifier_batch_images_count\S* (\S+)$", text, re.MULTILINE))

    for _ in range(3):
        assert _classify(guarded, jpeg).status_code == 200
    before = classify_count(guarded)
    with ServedClassifier(
        "--arg", f"model={default_model}", home=guarded.home, log_path=tmp_path / "second.log"
    ) as second:  # the same BENTOML_HOME, so the same default Prometheus folder
        second.wait_ready()
        assert classify_count(guarded) >= before >= 3


# ------------------------------------------------------------------ 10. odd but legal-looking requests: 4xx, not 500


def test_odd_requests_get_4xx_not_500(guarded, jpeg) -> None:
    long_name = "x" * 300 + ".jpg"
    response = _classify(guarded, jpeg, name=long_name)
    assert response.status_code == 200 and response.json()[0]["file"] == long_name
    files = [("images", ("a.jpg", jpeg, "image/jpeg")), ("k", ("k.txt", b"3"))]
    k_file = httpx.post(f"{guarded.url}/classify", files=files, timeout=TIMEOUT)
    assert k_file.status_code == 400 and "not a file" in k_file.json()["error"]
    multipart_pixels = httpx.post(f"{guarded.url}/classify_pixels", files=[("pixels", ("p", b"[]"))], timeout=TIMEOUT)
    assert multipart_pixels.status_code == 415, multipart_pixels.text


# ------------------------------------------------------------------ 12. only the documented formats


def test_formats_beyond_the_documented_ones_are_refused(guarded) -> None:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\n0 0 moveto 32 32 lineto stroke\nshowpage\n"
    ico = image_bytes(Image.new("RGB", (32, 32)), "ICO")
    for name, data in (("a.eps", eps), ("a.ico", ico)):
        response = _classify(guarded, data, name=name)
        assert response.status_code == 400 and "not a recognised image format" in response.json()["error"], name


# ------------------------------------------------------------------ 14. a large upload from a client that reads late


def test_an_oversized_upload_gets_a_readable_413(guarded) -> None:
    body = b"\x00" * (64 * 2**20)  # urllib writes all of it before reading the answer
    request = urllib.request.Request(
        f"{guarded.url}/classify", data=body, headers={"Content-Type": "image/jpeg"}, method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=TIMEOUT)
    assert info.value.code == 413 and "limit" in json.loads(info.value.read())["error"]


# ------------------------------------------------------------------ 15. offline pages, nosniff


def test_pages_load_nothing_from_the_internet_and_answers_are_nosniff(guarded, jpeg) -> None:
    for path in ("/", "/docs"):
        response = httpx.get(f"{guarded.url}{path}", timeout=TIMEOUT)
        assert response.status_code == 200 and response.headers["x-content-type-options"] == "nosniff"
        sources = re.findall(r'(?:src|href)="([^"]+)"', response.text)
        assert sources == [s for s in sources if s.startswith("/")], f"{path} loads {sources}"
        assert "googletagmanager" not in response.text
    error = _classify(guarded, b"not an image", name="<script>.jpg")
    assert error.status_code == 400 and error.headers["x-content-type-options"] == "nosniff"
    assert error.headers["content-type"] == "application/json"


# ------------------------------------------------------------------ 11. malformed manifests


def _model_copy(default_model: Path, tmp_path: Path, edit) -> Path:
    folder = Path(shutil.copytree(default_model, tmp_path / "model"))
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("no_preprocess", "'input' lacks ['preprocess']"),
        ("no_shape", "'input' lacks ['shape']"),
        ("outside_folder", "only a file name inside the model folder"),
        ("unknown_contract", "input contract version 99"),
        ("unknown_format", "format_version 7"),
    ],
)
def test_service_refuses_a_malformed_manifest_at_start(case, words, default_model, tmp_path) -> None:
    edits = {
        "no_preprocess": lambda m: m["input"].pop("preprocess"),
        "no_shape": lambda m: m["input"].pop("shape"),
        "outside_folder": lambda m: m["artifacts"]["onnx"].update(file="../../etc/passwd"),
        "unknown_contract": lambda m: m["input"].update(version=99),
        "unknown_format": lambda m: m.update(format_version=7),
    }
    folder = _model_copy(default_model, tmp_path, edits[case])
    with ServedClassifier("--arg", f"model={folder}", home=tmp_path / "home", log_path=tmp_path / "s.log") as served:
        code = served.process.wait(timeout=120)
        log = served.log(20000)
    assert code != 0 and words in log, log[-3000:]


def test_a_model_answering_the_wrong_class_count_never_becomes_ready(default_model, tmp_path) -> None:
    folder = _model_copy(default_model, tmp_path, lambda m: m.update(class_names=m["class_names"][:9]))
    with ServedClassifier("--arg", f"model={folder}", home=tmp_path / "home", log_path=tmp_path / "s.log") as served:
        # Each worker answers /healthz for itself and fails on its own schedule: one can still be warming up
        # (alive) after the other has logged its failure. So wait for a run of "dead" answers from whichever
        # worker takes the request; ready must never be reported meanwhile.
        deadline, dead_in_a_row = time.monotonic() + 120, 0
        while dead_in_a_row < 10:
            assert time.monotonic() < deadline, served.log()
            assert served.readyz() != 200, served.log()
            try:
                dead = httpx.get(f"{served.url}/healthz", timeout=TIMEOUT).status_code != 200
            except httpx.TransportError:  # not listening yet
                dead = False
            dead_in_a_row = dead_in_a_row + 1 if dead else 0
            time.sleep(0.1)
        assert "answers 10 classes, its manifest names 9" in served.log(20000)
        assert served.readyz() != 200


# ------------------------------------------------------------------ 5 and 13. hostile files for the loaders


def _official_archive(path: Path, batch: object) -> Path:
    """A cifar-10-python.tar.gz whose data_batch_1 is `batch` (the other members are valid)."""
    good = {b"data": np.zeros((10, 3072), np.uint8), b"labels": list(range(10))}
    members = {f"data_batch_{i}": good for i in range(2, 6)} | {"test_batch": good, "data_batch_1": batch}
    members["batches.meta"] = {b"label_names": [f"c{i}".encode() for i in range(10)]}
    with tarfile.open(path, "w:gz") as tar:
        for name, value in members.items():
            data = pickle.dumps(value, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # what an attacker puts in a pickle: code that runs on load
        return (os.system, (f"touch {self.marker}",))


def test_fit_refuses_a_pickle_that_would_run_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    archive = _official_archive(tmp_path / "cifar-10-python.tar.gz", {b"data": _Payload(marker), b"labels": []})
    cache = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    result = run_module("trainer.fit", "--data", str(archive), "--out", str(tmp_path / "run"), check=False, env=cache)
    assert result.returncode != 0 and not marker.exists(), "the crafted batch ran its code"
    assert "refusing CIFAR-10 batch" in result.stderr and "posix.system" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_fit_and_predict_name_a_truncated_archive(shared_archive: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(shared_archive.read_bytes()[: 3 * 2**20])
    cache = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    fit = run_module("trainer.fit", "--data", str(truncated), "--out", str(tmp_path / "run"), check=False, env=cache)
    predict = run_module("serving.predict", "--evaluate", str(truncated), check=False)
    for result in (fit, predict):
        assert result.returncode != 0 and str(truncated) in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr


def test_fit_and_predict_refuse_special_files_without_hanging(tmp_path: Path) -> None:
    fit = ["trainer.fit", "--data", "/dev/zero", "--out", str(tmp_path / "run")]
    for args in (fit, ["serving.predict", "--evaluate", "/dev/zero"]):
        result = run_module(*args, check=False, timeout=60)
        assert result.returncode != 0 and "neither a folder nor a regular file" in result.stderr, result.stderr[-2000:]


def test_predict_reports_links_fifos_and_huge_files(default_model: Path, jpeg: bytes, tmp_path: Path) -> None:
    folder = tmp_path / "photos" / "cat"
    folder.mkdir(parents=True)
    (folder / "good.jpg").write_bytes(jpeg)
    os.mkfifo(folder / "fifo.jpg")
    (folder / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (folder / "loop.jpg").symlink_to(folder / "loop.jpg")
    with open(folder / "huge.jpg", "wb") as f:  # sparse: 2 GB declared, nothing written
        f.truncate(2 * 2**30)
    expected = {
        "fifo.jpg": "not a regular file",
        "dangling.jpg": "dangling symbolic link",
        "loop.jpg": "symbolic links",
        "huge.jpg": "over the limit",
    }
    for args in ([str(tmp_path / "photos")], ["--evaluate", str(tmp_path / "photos")]):
        result = run_module("serving.predict", "--model", str(default_model), *args, check=False, timeout=120)
        assert result.returncode == 1, result.stderr[-2000:]
        for name, words in expected.items():
            assert any(name in line and words in line for line in result.stderr.splitlines()), (name, result.stderr)
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_module("serving.predict", "--model", str(default_model), "--evaluate", str(empty), check=False)
    assert result.returncode == 2 and "no labelled image" in result.stderr
