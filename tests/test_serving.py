"""Integration tests of the BentoML service: real `bentoml serve` processes fed real CIFAR-10 test images.

One server with the default settings (`server`, but a larger latency budget) is shared by most tests; a second one with small limits
(`limited`: long warm-up, low concurrency and latency budget, 1 MiB body limit from the environment) covers
readiness, overload and the body limit; a tampered model must stop `bentoml serve` at start. Answers are
compared with the offline predictor's (serving.predict) on the same bytes. Run: `pytest tests/test_serving.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import http.server
import io
import json
import re
import shutil
import socket
import struct
import subprocess
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import httpx
import numpy as np
import pytest
from helpers import ServedClassifier, image_bytes, read_test_images
from PIL import Image, ImageOps
from prometheus_client.parser import text_string_to_metric_families

from bundle.manifest import ExportedModel, ModelError, load_model_dir, verify_checksums
from bundle.preprocess import decode_image
from serving.classifier import Classifier
from serving.predict import predict_stream

TIMEOUT = 30  # seconds per request: a hang fails the test instead of blocking it
PROBABILITY_TOLERANCE = 1e-5
BATCH_LIMIT = 16  # max_batch_size of the shared `server`
slow = pytest.mark.slow


# ------------------------------------------------------------------ fixtures and helpers


@pytest.fixture(scope="module")
def model(default_model: Path) -> ExportedModel:
    return load_model_dir(default_model)


@pytest.fixture(scope="module")
def offline(model: ExportedModel):
    """The offline predictor's own path (serving.predict.predict_stream): [(name, bytes)] -> {name: probabilities}."""
    classifier = Classifier.load(model.folder, threads=1)

    def predict(items: list[tuple[str, bytes]]) -> dict[str, np.ndarray]:
        results = {}
        for name, probabilities, error in predict_stream(classifier, items, batch_size=64, total=None):
            assert error is None, error
            results[name] = probabilities
        return results

    return predict


@pytest.fixture(scope="module")
def test_images(shared_archive: Path) -> list[tuple[str, str, bytes]]:
    """300 test JPEGs (30 per class) as [(member name, class, bytes)], read straight from the shared tar."""
    return read_test_images(shared_archive, per_class=30)


@pytest.fixture(scope="module")
def server(default_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """`bentoml serve` with the default settings but a latency budget of 3 s and batches of at most 16 images,
    started once for this module.

    These tests judge answers and batching on a 2-core machine shared with other work, where the default
    budget (1 s) can shed part of a burst (shedding itself is tested on `limited`); with 16-image batches,
    every request of more than 16 images is split across batches and re-joined.
    """
    arguments = ("--arg", f"model={default_model}", "--arg", "max_latency_ms=3000")
    with _ready_server(
        tmp_path_factory.mktemp("server"), *arguments, "--arg", f"max_batch_size={BATCH_LIMIT}"
    ) as served:
        yield served


@contextlib.contextmanager
def _ready_server(folder: Path, *arguments: str) -> Iterator[ServedClassifier]:
    """`bentoml serve` with these arguments (home and log in `folder`), once it is ready."""
    with ServedClassifier(*arguments, home=folder / "home", log_path=folder / "server.log") as served:
        served.wait_ready()
        yield served


@pytest.fixture(scope="module")
def limited(default_model: Path, tmp_path_factory: pytest.TempPathFactory, test_images):
    """A server with small limits; its start is observed: [(seconds, /readyz status, classify answers)] in `.startup`."""
    folder = tmp_path_factory.mktemp("limited")
    served = ServedClassifier(
        *("--arg", f"model={default_model}", "--arg", "warmup_s=8", "--arg", "max_concurrency=8"),
        *("--arg", "max_latency_ms=10"),
        home=folder / "home",
        log_path=folder / "server.log",
        env={"CLASSIFIER_MAX_BODY_MB": "1"},  # the environment path of the settings
    )
    jpeg = test_images[0][2]
    with served:
        start, served.startup = time.monotonic(), []
        while time.monotonic() - start < 180 and served.process.poll() is None:
            status, early = served.readyz(), None
            if status == 503 and not any(answers for *_, answers in served.startup):
                early = (_post_images(served, [("a.jpg", jpeg)]), _post_pixels(served, np.zeros((1, 32, 32, 3), int)))
            served.startup.append((time.monotonic() - start, status, early))
            if status == 200:  # at once, on new connections, so they spread over both workers
                served.first_answers = [_post_images(served, [("a.jpg", jpeg)]) for _ in range(8)]
                break
            time.sleep(0.3)
        served.wait_ready(timeout=5)
        yield served


def _post_images(server: ServedClassifier, files: list[tuple[str, bytes]], **data: str) -> httpx.Response:
    return httpx.post(
        f"{server.url}/classify", files=[("images", (n, b, "image/jpeg")) for n, b in files], data=data, timeout=TIMEOUT
    )


def _post_pixels(server: ServedClassifier, pixels, k: int = 3) -> httpx.Response:
    pixels = pixels.tolist() if isinstance(pixels, np.ndarray) else pixels
    return httpx.post(f"{server.url}/classify_pixels", json={"pixels": pixels, "k": k}, timeout=TIMEOUT)


def _served_probabilities(answer: dict, class_names: list[str]) -> np.ndarray:
    """A /classify answer with k = number of classes -> the probability vector in class order."""
    by_label = {p["label"]: p["probability"] for p in answer["predictions"]}
    assert sorted(by_label) == sorted(class_names)
    return np.array([by_label[c] for c in class_names])


def _assert_same_answers(served: list[dict], expected: list[np.ndarray], class_names: list[str]) -> None:
    assert len(served) == len(expected)
    for answer, probabilities in zip(served, expected, strict=True):
        got = _served_probabilities(answer, class_names)
        assert answer["predictions"][0]["label"] == class_names[int(probabilities.argmax())]
        np.testing.assert_allclose(got, probabilities, rtol=0, atol=PROBABILITY_TOLERANCE)


def _assert_json_error(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text[:1000]
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert body.get("error"), body
    text = json.dumps(body).lower()
    for word in words:
        assert word.lower() in text, f"{word!r} not in {body}"


def _assert_still_serves(server: ServedClassifier, jpeg: bytes) -> None:
    response = _post_images(server, [("after.jpg", jpeg)])
    assert response.status_code == 200, response.text
    assert len(response.json()[0]["predictions"]) == 3


def _batch_histogram(server: ServedClassifier, unit: str = "requests") -> Counter[str]:
    """The service's adaptive-batching histogram (`unit`: requests or images per model batch) from /metrics,
    summed over its worker processes (they share one PROMETHEUS_MULTIPROC_DIR)."""
    text = httpx.get(f"{server.url}/metrics", timeout=TIMEOUT).text
    totals: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        if family.name == f"classifier_batch_{unit}":
            for sample in family.samples:
                totals[sample.name.removeprefix(family.name) + sample.labels.get("le", "")] += sample.value
    return totals


def _png_declaring(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR is rewritten to declare width x height (CRC fixed): a bomb by its header."""
    data = bytearray(image_bytes(Image.new("L", (1, 1)), "PNG"))
    ihdr = bytearray(data[12:29])  # b"IHDR" + 13 bytes of header fields
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


# ------------------------------------------------------------------ answers: same as the offline predictor


@slow
def test_classify_matches_offline_predictor(server, model, offline, test_images) -> None:
    items = [(Path(name).name.replace(".jpg", f"-{label}.jpg"), data) for name, label, data in test_images[::15]]
    response = _post_images(server, items, k=str(len(model.class_names)))
    assert response.status_code == 200, response.text
    answers = response.json()
    assert [a["file"] for a in answers] == [name for name, _ in items]
    assert {a["model"] for a in answers} == {model.name}
    expected = offline(items)
    _assert_same_answers(answers, [expected[name] for name, _ in items], model.class_names)


@slow
@pytest.mark.parametrize("content_type", ["image/jpeg", "image/png", "application/octet-stream"])
def test_classify_raw_image_body_matches_offline_predictor(server, model, offline, test_images, content_type) -> None:
    """One image as the whole body (`curl --data-binary @cat.jpg -H 'Content-Type: image/jpeg'`), k in the query."""
    for name, _, data in test_images[::60]:
        if content_type == "image/png":
            data = image_bytes(Image.open(io.BytesIO(data)), "PNG")
        response = httpx.post(
            f"{server.url}/classify?k={len(model.class_names)}",
            content=data,
            headers={"content-type": content_type},
            timeout=TIMEOUT,
        )
        assert response.status_code == 200, response.text
        (answer,) = response.json()
        assert answer["model"] == model.name and answer["file"] == "image"
        _assert_same_answers([answer], [offline([(name, data)])[name]], model.class_names)
    empty = httpx.post(f"{server.url}/classify", content=b"", headers={"content-type": "image/jpeg"}, timeout=TIMEOUT)
    _assert_json_error(empty, 400, "empty")
    bad_k = httpx.post(f"{server.url}/classify?k=0", content=data, headers={"content-type": "image/png"})
    _assert_json_error(bad_k, 400, "k must be between 1 and 10")


@slow
def test_classify_pixels_matches_classify(server, model, test_images) -> None:
    items = [(name, data) for name, _, data in test_images[::30]]
    pixels = np.stack([decode_image(data, model.contract) for _, data in items])
    by_pixels = _post_pixels(server, pixels, k=len(model.class_names))
    by_files = _post_images(server, items, k=str(len(model.class_names)))
    assert by_pixels.status_code == by_files.status_code == 200, (by_pixels.text, by_files.text)
    expected = [_served_probabilities(a, model.class_names) for a in by_files.json()]
    _assert_same_answers(by_pixels.json(), expected, model.class_names)


@slow
def test_classify_accuracy_matches_offline_predictor(server, model, offline, test_images) -> None:
    labels = [model.class_names.index(label) for _, label, _ in test_images]
    served_top1 = []
    for start in range(0, len(test_images), 50):
        response = _post_images(server, [(name, data) for name, _, data in test_images[start : start + 50]], k="1")
        assert response.status_code == 200, response.text
        served_top1 += [model.class_names.index(a["predictions"][0]["label"]) for a in response.json()]
    expected = offline([(name, data) for name, _, data in test_images])
    offline_top1 = [int(expected[name].argmax()) for name, _, _ in test_images]
    assert served_top1 == offline_top1
    # Against the labels, not the offline predictor (same decoding, so it would share a wrong rule): the bundled
    # model scores 91.6% (INT8) on the whole test set; a service that swapped channels,
    # normalised twice or mixed up images between requests would fall far below 85%.
    served_accuracy = np.mean(np.array(served_top1) == labels)
    assert served_accuracy >= 0.85, served_accuracy


@slow
def test_concurrent_requests_are_batched(server, test_images) -> None:
    before = _batch_histogram(server)  # empty if the model has not been called yet

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            return await asyncio.gather(
                *(
                    client.post(f"{server.url}/classify", files=[("images", (name, data, "image/jpeg"))])
                    for name, _, data in test_images[:32]
                )
            )

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 32
    after = _batch_histogram(server)
    assert after, "no classifier_batch_requests samples in /metrics"
    assert after["_sum"] - before["_sum"] == 32  # requests per batch: each request counted once
    # Measured over 12 such bursts (2 workers, the default on 2 cores): 2 to 4 model batches, i.e. 8 to 16
    # requests per batch. At most 8 batches (4 requests per batch on average) leaves a factor of 2; without
    # batching there would be 32 batches of one.
    batches = after["_count"] - before["_count"]
    assert batches <= 8, f"{batches} model batches for 32 concurrent requests: {after - before}"


@slow
def test_requests_larger_than_the_batch_limit_are_split_and_rejoined(server, model, offline, test_images) -> None:
    before = _batch_histogram(server, "images")
    unique = [(name.replace("/", "-"), data) for name, _, data in test_images]  # file names differ per class
    requests = [unique[i : i + 45] for i in (0, 100, 200)]  # 45 images each: 3 batches of <= 16 apiece

    async def send() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        f"{server.url}/classify",
                        files=[("images", (name, data, "image/jpeg")) for name, data in images],
                        data={"k": str(len(model.class_names))},
                    )
                    for images in requests
                )
            )

    responses = asyncio.run(send())
    after = _batch_histogram(server, "images")
    for images, response in zip(requests, responses, strict=True):
        assert response.status_code == 200, response.text
        expected = offline(images)
        assert [a["file"] for a in response.json()] == [name for name, _ in images]
        _assert_same_answers(response.json(), [expected[name] for name, _ in images], model.class_names)
    assert after["_sum"] - before["_sum"] == 3 * 45
    batches = after["_count"] - before["_count"]
    within_limit = after[f"_bucket{float(BATCH_LIMIT)}"] - before[f"_bucket{float(BATCH_LIMIT)}"]
    assert batches >= 3 * 45 / BATCH_LIMIT and within_limit == batches, (batches, within_limit)


@slow
def test_classify_sustained_concurrency_has_no_errors(server, test_images) -> None:
    """300 requests from 16 concurrent clients: all answered. (A former design called a separate model service
    through BentoML's client, which replaces its connection pool every 100 calls and failed calls in flight.)"""
    images = [(name, data) for name, _, data in test_images]

    async def clients() -> list[int]:
        queue = asyncio.Queue()
        for item in images:
            queue.put_nowait(item)
        statuses = []
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:

            async def one_client() -> None:
                while not queue.empty():
                    name, data = queue.get_nowait()
                    response = await client.post(
                        f"{server.url}/classify", files=[("images", (name, data, "image/jpeg"))]
                    )
                    statuses.append(response.status_code)

            await asyncio.gather(*(one_client() for _ in range(16)))
        return statuses

    statuses = asyncio.run(clients())
    assert Counter(statuses) == {200: len(images)}


# ------------------------------------------------------------------ accepted formats


def _format_cases(jpeg: bytes) -> dict[str, bytes]:
    base = Image.open(io.BytesIO(jpeg)).convert("RGB")
    large = base.resize((640, 480), Image.Resampling.BICUBIC)
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(base.size))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    gray16 = Image.fromarray(np.asarray(base.convert("L")).astype(np.uint16) * 257)
    return {
        "png": image_bytes(base, "PNG"),
        "jpeg": jpeg,
        "bmp": image_bytes(base, "BMP"),
        "gif_animated": image_bytes(base, "GIF", save_all=True, append_images=[ImageOps.invert(base)], duration=100),
        "webp": image_bytes(base, "WEBP", quality=90),
        "tiff": image_bytes(base, "TIFF"),
        "grayscale": image_bytes(base.convert("L"), "PNG"),
        "rgba": image_bytes(rgba, "PNG"),
        "palette": image_bytes(base.convert("P", palette=Image.Palette.ADAPTIVE, colors=64), "PNG"),
        "cmyk_jpeg": image_bytes(base.convert("CMYK"), "JPEG", quality=95),
        "png_16_bit": image_bytes(gray16, "PNG"),
        "exif_rotated_jpeg": image_bytes(large.transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif),
        "large_640x480": image_bytes(large, "JPEG", quality=90),
    }


FORMATS = list(_format_cases(image_bytes(Image.new("RGB", (32, 32)), "JPEG")))


@slow
@pytest.mark.parametrize("kind", FORMATS)
def test_classify_accepts_format(server, model, offline, test_images, kind: str) -> None:
    data = _format_cases(test_images[7][2])[kind]
    Image.open(io.BytesIO(data)).verify()  # the case really is a valid file of its kind
    response = _post_images(server, [(f"{kind}.img", data)], k=str(len(model.class_names)))
    assert response.status_code == 200, response.text
    _assert_same_answers(response.json(), [offline([(kind, data)])[kind]], model.class_names)


def test_decode_image_applies_exif_orientation_and_first_frame(model) -> None:
    upright = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = image_bytes(upright.transpose(Image.Transpose.ROTATE_90), "PNG", exif=exif)
    expected = decode_image(image_bytes(upright, "PNG"), model.contract)
    np.testing.assert_array_equal(decode_image(rotated, model.contract), expected)
    first, second = Image.new("RGB", (32, 32), (200, 30, 30)), Image.new("RGB", (32, 32), (30, 30, 200))
    gif = image_bytes(first, "GIF", save_all=True, append_images=[second])
    np.testing.assert_array_equal(decode_image(gif, model.contract)[0, 0], [200, 30, 30])


# ------------------------------------------------------------------ refused input: 4xx JSON naming the problem


@functools.cache
def _compressed_bomb() -> bytes:
    """A real, decodable 7000x7000 PNG (49 Mpixel) of a few KiB."""
    return image_bytes(Image.new("1", (7000, 7000), 1), "PNG", optimize=True)


def _bad_upload_cases(jpeg: bytes) -> dict[str, tuple[dict, int, tuple[str, ...]]]:
    png = image_bytes(Image.open(io.BytesIO(jpeg)), "PNG")
    one = lambda name, data: {"files": [("images", (name, data, "image/png"))]}
    multipart = "multipart/form-data; boundary=xyz"
    return {
        "not_an_image": (one("a.png", b"this is not an image " * 20), 400, ("a.png", "not a recognised image")),
        "truncated_jpeg": (one("t.jpg", jpeg[: len(jpeg) // 2]), 400, ("t.jpg", "truncated")),
        "truncated_png": (one("t.png", png[: len(png) // 2]), 400, ("t.png", "truncated")),
        "empty_body": ({"content": b"", "headers": {"content-type": multipart}}, 400, ("empty request body",)),
        "empty_file": (one("e.png", b""), 400, ("e.png", "empty file")),
        "bomb_header_20000x20000": (one("b.png", _png_declaring(20000, 20000)), 400, ("b.png", "bomb")),
        "bomb_header_7000x7000": (one("b.png", _png_declaring(7000, 7000)), 400, ("7000x7000", "limit")),
        "bomb_compressed_7000x7000": (one("b.png", _compressed_bomb()), 400, ("7000x7000", "limit")),
        "too_many_images": ({"files": [("images", (f"{i}.png", png, "image/png")) for i in range(65)]}, 413, ("64",)),
        "wrong_field": ({"files": [("image", ("a.png", png, "image/png"))]}, 400, ("unknown form field", "images")),
        "many_text_fields": ({**one("a.png", png), "data": {"a": "1", "b": "2", "c": "3"}}, 400, ("images",)),
        "json_body": ({"json": {"images": ["aGVsbG8="]}}, 415, ("application/json", "multipart/form-data")),
        "urlencoded": ({"data": {"images": "aGVsbG8="}}, 415, ("urlencoded", "multipart/form-data")),
        "no_content_type": ({"content": png}, 415, ("multipart/form-data",)),
        "k_zero": ({**one("a.png", png), "data": {"k": "0"}}, 400, ("k must be between 1 and 10",)),
        "k_eleven": ({**one("a.png", png), "data": {"k": "11"}}, 400, ("k must be between 1 and 10",)),
        "k_not_a_number": ({**one("a.png", png), "data": {"k": "three"}}, 400, ("integer",)),
    }


BAD_UPLOADS = list(_bad_upload_cases(image_bytes(Image.new("RGB", (32, 32)), "JPEG")))


@slow
@pytest.mark.parametrize("case", BAD_UPLOADS)
def test_classify_refuses_bad_upload(server, test_images, case: str) -> None:
    jpeg = test_images[0][2]
    request, status, words = _bad_upload_cases(jpeg)[case]
    _assert_json_error(httpx.post(f"{server.url}/classify", timeout=TIMEOUT, **request), status, *words)
    _assert_still_serves(server, jpeg)


BAD_PIXELS = {
    "height_31": (np.zeros((1, 31, 32, 3), int).tolist(), 3, 400, ("shape", "(1, 31, 32, 3)")),
    "channels_first": (np.zeros((1, 3, 32, 32), int).tolist(), 3, 400, ("shape", "(1, 3, 32, 32)")),
    "single_image_without_batch": (np.zeros((32, 32, 3), int).tolist(), 3, 400, ("shape", "(N, 32, 32, 3)")),
    "floats": (np.full((1, 32, 32, 3), 0.5).tolist(), 3, 400, ("integers", "float")),
    "booleans": (np.full((1, 32, 32, 3), True).tolist(), 3, 400, ("integers", "bool")),
    "value_300": (np.full((1, 32, 32, 3), 300).tolist(), 3, 400, ("0-255", "300")),
    "negative": (np.full((1, 32, 32, 3), -1).tolist(), 3, 400, ("0-255", "-1")),
    "ragged": ([[[[0, 0, 0]] * 32] * 31 + [[[0, 0]] * 32]], 3, 400, ("pixels",)),
    "strings": ([[[["a", "b", "c"]] * 32] * 32], 3, 400, ("integers",)),
    "empty": ([], 3, 400, ("shape",)),
    "too_many_images": (np.zeros((65, 32, 32, 3), int).tolist(), 3, 413, ("1 to 64", "65")),
    "k_zero": (np.zeros((1, 32, 32, 3), int).tolist(), 0, 400, ("k must be between 1 and 10",)),
    "k_eleven": (np.zeros((1, 32, 32, 3), int).tolist(), 11, 400, ("k must be between 1 and 10",)),
}


@slow
@pytest.mark.parametrize("case", list(BAD_PIXELS))
def test_classify_pixels_refuses_bad_array(server, test_images, case: str) -> None:
    pixels, k, status, words = BAD_PIXELS[case]
    _assert_json_error(_post_pixels(server, pixels, k=k), status, *words)
    _assert_still_serves(server, test_images[0][2])


@slow
def test_classify_pixels_refuses_missing_field_and_bad_json(server) -> None:
    _assert_json_error(httpx.post(f"{server.url}/classify_pixels", json={"pixel": []}, timeout=TIMEOUT), 400, "pixels")
    response = httpx.post(
        f"{server.url}/classify_pixels", content=b"{not json", headers={"content-type": "application/json"}
    )
    _assert_json_error(response, 400, "json")


class _CountingHandler(http.server.BaseHTTPRequestHandler):
    requests: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        type(self).requests.append(self.path)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *_args: object) -> None:
        pass


@slow
def test_classify_never_fetches_urls(server, test_images) -> None:
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CountingHandler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{web.server_address[1]}/cat.jpg"
    try:
        response = httpx.post(f"{server.url}/classify", data={"images": url}, files=[("k", (None, "3"))])
        _assert_json_error(response, 400, "never fetches urls", url)
        mixed = httpx.post(
            f"{server.url}/classify",
            files=[("images", ("a.jpg", test_images[0][2], "image/jpeg")), ("images", (None, url))],
        )
        _assert_json_error(mixed, 400, "never fetches urls")
        _assert_json_error(httpx.post(f"{server.url}/classify", json={"images": [url]}), 415, "multipart")
        _assert_json_error(_post_pixels(server, url), 400, "pixels")
        time.sleep(0.5)
        assert _CountingHandler.requests == [], "the service fetched a URL given as input"
    finally:
        web.shutdown()
        web.server_close()


# ------------------------------------------------------------------ model info, health, metrics, docs


@slow
def test_model_endpoint_returns_manifest(server, model) -> None:
    response = httpx.get(f"{server.url}/model", timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    info = response.json()
    for key in ("name", "class_names", "test_accuracy", "artifacts", "input", "architecture"):
        assert info[key] == model.manifest[key], key
    assert info["backend"] == "onnx_int8"  # auto: the bundle's INT8 model passed its export gate
    assert all(len(entry["sha256"]) == 64 for entry in info["artifacts"].values())


@slow
def test_service_answers_health_metrics_and_docs(server) -> None:
    for path in ("/healthz", "/livez", "/readyz"):
        assert httpx.get(f"{server.url}{path}", timeout=TIMEOUT).status_code == 200, path
    metrics = httpx.get(f"{server.url}/metrics", timeout=TIMEOUT)
    assert metrics.status_code == 200
    assert "bentoml_service_request_total" in metrics.text
    page = httpx.get(f"{server.url}/", timeout=TIMEOUT)
    assert page.status_code == 200 and "<title>CIFAR-10 classifier</title>" in page.text
    docs = httpx.get(f"{server.url}/docs", timeout=TIMEOUT)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    spec = httpx.get(f"{server.url}/docs.json", timeout=TIMEOUT).json()  # BentoML's, from the typed APIs
    assert {"/classify", "/classify_pixels"} <= set(spec["paths"]), spec["paths"]
    assert httpx.get(f"{server.url}/static_content/swagger-ui-bundle.js", timeout=TIMEOUT).status_code == 200


# ------------------------------------------------------------------ the hot path: direct routes, one write per answer


def _metric_samples(server: ServedClassifier, family_name: str) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} of one metric family in /metrics, summed over the workers."""
    text = httpx.get(f"{server.url}/metrics", timeout=TIMEOUT).text
    values: Counter[tuple] = Counter()
    for family in text_string_to_metric_families(text):
        if family.name == family_name:
            for sample in family.samples:
                values[(sample.name, tuple(sorted(sample.labels.items())))] += sample.value
    return dict(values)


def _answered(server: ServedClassifier, endpoint: str, status: int) -> float:
    samples = _metric_samples(server, "classifier_request_duration_seconds")
    key = ("classifier_request_duration_seconds_count", (("endpoint", endpoint), ("http_response_code", str(status))))
    return samples.get(key, 0.0)


def _bentoml_counted(server: ServedClassifier) -> dict[str, float]:
    """BentoML's own request counts (bentoml_service_request_total) of the classification routes."""
    counts: dict[str, float] = {}
    for (name, labels), value in _metric_samples(server, "bentoml_service_request").items():
        endpoint = dict(labels).get("endpoint")
        if name.endswith("_total") and endpoint in ("/classify", "/classify_pixels"):
            counts[endpoint] = counts.get(endpoint, 0.0) + value
    return counts


@slow
def test_classification_routes_skip_bentoml_middleware_and_keep_their_own_metrics(server, test_images) -> None:
    """/classify and /classify_pixels are called by the HTTP protocol directly (serving/bentoml_adapter.py, 5):
    BentoML's request metrics never see them, the service's own histogram counts them by status."""
    before = {status: _answered(server, "/classify", status) for status in (200, 400, 415)}
    pixels_before = _answered(server, "/classify_pixels", 200)
    bentoml_before = _bentoml_counted(server)
    assert _post_images(server, [("a.jpg", test_images[0][2])]).status_code == 200
    assert _post_images(server, [("a.jpg", b"not an image")]).status_code == 400
    assert httpx.post(f"{server.url}/classify", content=b"x", timeout=TIMEOUT).status_code == 415
    assert _post_pixels(server, np.zeros((2, 32, 32, 3), int)).status_code == 200
    for status in (200, 400, 415):
        assert _answered(server, "/classify", status) == before[status] + 1, status
    assert _answered(server, "/classify_pixels", 200) == pixels_before + 1
    # BentoML lists its declared routes in its metrics from the start (at 0): their counts must not move
    assert _bentoml_counted(server) == bentoml_before, (bentoml_before, _bentoml_counted(server))
    assert httpx.get(f"{server.url}/classify", timeout=TIMEOUT).status_code == 405  # other methods: BentoML's app


@slow
@pytest.mark.parametrize("method", ["GET /model", "POST /classify"])
def test_a_response_head_and_its_body_leave_in_one_write(server, test_images, method: str) -> None:
    """The head of an answer is held until its body is written (serving/bentoml_adapter.py): the first read
    of a plain socket gets the whole answer. uvicorn alone writes them apart, and 49 of 50 first reads
    then lacked the body."""
    body = b""
    headers = "Host: x\r\n"
    if method.startswith("POST"):
        request = httpx.Request("POST", f"{server.url}/classify", files=[("images", ("a.jpg", test_images[0][2]))])
        body = request.read()
        headers += f"Content-Type: {request.headers['content-type']}\r\nContent-Length: {len(body)}\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        incomplete = 0
        for _ in range(20):
            sock.sendall(f"{method} HTTP/1.1\r\n{headers}\r\n".encode() + body)
            head, _, answer = sock.recv(1 << 20).partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            length = int(re.search(rb"content-length: (\d+)", head, re.IGNORECASE).group(1))
            incomplete += len(answer) < length
            while len(answer) < length:
                answer += sock.recv(1 << 20)
        assert incomplete == 0, f"{incomplete} of 20 answers came in more than one read"
        sock.sendall(b"HEAD /model HTTP/1.1\r\nHost: x\r\n\r\n")  # a head without a body still leaves at once
        assert sock.recv(1 << 20).startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /model HTTP/1.1\r\nHost: x\r\n\r\n")  # and the connection goes on
        assert sock.recv(1 << 20).startswith(b"HTTP/1.1 200")


@pytest.fixture(scope="module")
def short_timeout(default_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """timeout_s=1 and pixel budgets large enough for requests whose decoding alone takes seconds."""
    budgets = ("--arg", "max_request_pixels=500000000", "--arg", "max_decode_pixels_in_flight=500000000")
    arguments = ("--arg", f"model={default_model}", "--arg", "timeout_s=1", *budgets)
    with _ready_server(tmp_path_factory.mktemp("short_timeout"), *arguments) as served:
        yield served


@slow
def test_work_past_timeout_s_gets_504_and_the_worker_goes_on(short_timeout, test_images) -> None:
    """Twelve 6000x6000 PNGs take seconds to decode (0.46 s each on the 2-core machine): the answer is a 504
    after timeout_s (1 s), the decoding stops, and the next request is answered."""
    big = image_bytes(Image.new("RGB", (6000, 6000), (10, 200, 30)), "PNG")
    start = time.monotonic()
    response = httpx.post(
        f"{short_timeout.url}/classify",
        files=[("images", (f"{i}.png", big, "image/png")) for i in range(12)],
        timeout=TIMEOUT,
    )
    assert response.status_code == 504, response.text
    assert response.json()["error"].startswith("not answered within 1 s"), response.text
    assert time.monotonic() - start < 12 * 0.46 * 0.75, "the answer waited for the decoding"
    assert _post_images(short_timeout, [("a.jpg", test_images[0][2])]).status_code == 200
    assert _answered(short_timeout, "/classify", 504) == 1


@slow
def test_the_access_log_lists_classification_requests(default_model: Path, tmp_path: Path, test_images) -> None:
    """With access_log on, the classification routes go through BentoML's application again (its access-log
    middleware is one of those the direct path skips), and each request is logged."""
    arguments = ("--arg", f"model={default_model}", "--arg", "access_log=true", "--arg", "workers=1")
    with _ready_server(tmp_path, *arguments) as served:
        assert _post_images(served, [("a.jpg", test_images[0][2])]).status_code == 200
        deadline = time.monotonic() + TIMEOUT
        while "/classify" not in served.log() and time.monotonic() < deadline:
            time.sleep(0.2)
        lines = [line for line in served.log().splitlines() if "/classify" in line]
    assert lines and "200" in lines[-1], served.log()[-2000:]


# ------------------------------------------------------------------ readiness, overload, body limit (`limited`)


@slow
def test_service_not_ready_while_warming_up(limited) -> None:
    statuses = [status for _, status, _ in limited.startup if status is not None]
    assert statuses[0] == 503 and statuses[-1] == 200, limited.startup
    assert statuses.index(200) > 0 and 503 not in statuses[statuses.index(200) :]
    images, pixels = next(answers for *_, answers in limited.startup if answers)
    for response in (images, pixels):
        _assert_json_error(response, 503, "warming up")
    assert [r.status_code for r in limited.first_answers] == [200] * 8, [r.text for r in limited.first_answers]


def test_readiness_waits_for_every_worker(tmp_path, monkeypatch) -> None:
    """/readyz is asked of whichever worker the port hands the request to: it must say 200 only when all of
    them have warmed up, and not while a killed worker's replacement is still warming up."""
    import bentoml

    from serving import bentoml_adapter

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    dead = subprocess.Popen(["true"])
    dead.wait()
    for index in (1, 2):
        monkeypatch.setattr(bentoml.server_context, "worker_index", index)
        assert not bentoml_adapter.all_workers_ready(2)
        bentoml_adapter.note_worker_ready()
    assert bentoml_adapter.all_workers_ready(2)
    (tmp_path / "worker-2.ready").write_text(str(dead.pid))  # worker 2 killed without shutting down
    assert not bentoml_adapter.all_workers_ready(2)
    bentoml_adapter.note_worker_ready()  # its replacement (this process, as worker 2) has warmed up
    assert bentoml_adapter.all_workers_ready(2)
    bentoml_adapter.note_worker_exit()  # a clean shutdown
    assert not bentoml_adapter.all_workers_ready(2) and bentoml_adapter.all_workers_ready(1)
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    assert bentoml_adapter.all_workers_ready(2)  # outside `bentoml serve` (an in-process test client)


@slow
def test_service_sheds_overload_with_clear_errors(limited, test_images) -> None:
    files = [("images", (name, data, "image/jpeg")) for name, _, data in test_images[:4]]

    async def flood() -> list[tuple[int, float, httpx.Response]]:
        async with httpx.AsyncClient(timeout=TIMEOUT, limits=httpx.Limits(max_connections=100)) as client:

            async def one() -> tuple[int, float, httpx.Response]:
                start = time.monotonic()
                response = await client.post(f"{limited.url}/classify", files=files)
                return response.status_code, time.monotonic() - start, response

            return await asyncio.gather(*(one() for _ in range(64)))

    results = asyncio.run(flood())  # a timeout would raise here: no request may hang
    counts = Counter(status for status, _, _ in results)
    assert set(counts) <= {200, 429, 503}, counts
    assert counts[429] + counts[503] >= 1, f"64 concurrent requests, max_concurrency=8, but no refusal: {counts}"
    for status, seconds, response in results:
        if status != 200:
            _assert_json_error(response, status)
            assert seconds < 10, f"a {status} took {seconds:.1f} s"
    _assert_still_serves(limited, test_images[0][2])


@slow
def test_classify_refuses_body_over_limit(limited, test_images) -> None:
    big = b"\xff" * (2 * 2**20)
    _assert_json_error(_post_images(limited, [("big.jpg", big)]), 413, "1 MiB")

    def chunks():  # no content-length: the limit must hold while streaming
        for _ in range(32):
            yield b"\x00" * 2**16

    response = httpx.post(
        f"{limited.url}/classify", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"}
    )
    _assert_json_error(response, 413, "1 MiB")
    _assert_json_error(_post_pixels(limited, np.zeros((100, 32, 32, 3), int) + 200), 413, "1 MiB")
    _assert_still_serves(limited, test_images[0][2])


# ------------------------------------------------------------------ tampered models


SERVED_FILE = "model.int8.onnx"  # the bundle's INT8 model passed its gate: `auto` serves it


def _copy_with_flipped_byte(model_dir: Path, target: Path, file: str = SERVED_FILE) -> Path:
    shutil.copytree(model_dir, target)
    data = bytearray((target / file).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (target / file).write_bytes(bytes(data))
    return target


@slow
def test_service_refuses_tampered_model(default_model: Path, tmp_path: Path) -> None:
    tampered = _copy_with_flipped_byte(default_model, tmp_path / "tampered")
    with ServedClassifier(
        "--arg", f"model={tampered}", home=tmp_path / "home", log_path=tmp_path / "server.log"
    ) as served:
        try:
            code = served.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            code = None
        log = served.log(20000)
    assert code not in (None, 0), f"bentoml serve kept running on a tampered model:\n{log[-3000:]}"
    assert f"{tampered / SERVED_FILE}" in log and "does not match its manifest" in log, log[-3000:]


def test_verify_checksums_accepts_intact_model(default_model: Path) -> None:
    verify_checksums(load_model_dir(default_model))


def test_verify_checksums_refuses_changed_file(default_model: Path, tmp_path: Path) -> None:
    tampered = load_model_dir(_copy_with_flipped_byte(default_model, tmp_path / "m", "model.onnx"))
    with pytest.raises(ModelError, match=r"model\.onnx.*does not match its manifest"):
        verify_checksums(tampered)
    with pytest.raises(ModelError, match="does not match"):
        verify_checksums(tampered, ["onnx"])
    verify_checksums(tampered, ["torchscript"])  # only the listed artifacts are checked


def test_verify_checksums_refuses_truncated_and_missing_files(default_model: Path, tmp_path: Path) -> None:
    copy = tmp_path / "m"
    shutil.copytree(default_model, copy)
    data = (copy / "model.onnx").read_bytes()
    (copy / "model.onnx").write_bytes(data[:-1])
    with pytest.raises(ModelError, match="does not match"):
        verify_checksums(load_model_dir(copy), ["onnx"])
    (copy / "model.onnx").unlink()
    with pytest.raises(ModelError, match=r"model\.onnx.*missing"):
        verify_checksums(load_model_dir(copy), ["onnx"])


# ------------------------------------------------------------------ the other backends; a worker whose model fails


@slow
@pytest.mark.parametrize("backend", ["onnx_int8", "torchscript"])
def test_int8_and_torchscript_backends_serve_answers_within_the_export_gates(
    backend, default_model, model, offline, test_images, tmp_path
):
    """Against the fp32 ONNX model: torchscript is gated like it at export (same logits within rtol 1e-3 /
    atol 1e-4, same top-1), INT8 within 0.5 accuracy points: the served answers must keep those terms."""
    items = [(f"{label}-{Path(name).name}", data) for name, label, data in test_images[::5]]  # 6 per class
    labels = [model.class_names.index(label) for _, label, _ in test_images[::5]]
    fp32 = Classifier.load(model.folder, backend="onnx", threads=1)
    expected = {name: p for name, p, _ in predict_stream(fp32, items, batch_size=64, total=None)}
    with ServedClassifier(
        "--arg", f"model={default_model}", "--arg", f"backend={backend}",
        home=tmp_path / "home", log_path=tmp_path / "server.log",
    ) as served:  # fmt: skip
        served.wait_ready()
        info = httpx.get(f"{served.url}/model", timeout=TIMEOUT).json()
        response = _post_images(served, items, k=str(len(model.class_names)))
    assert info["backend"] == backend and response.status_code == 200, response.text
    got = np.stack([_served_probabilities(a, model.class_names) for a in response.json()])
    want = np.stack([expected[name] for name, _ in items])
    if backend == "torchscript":
        assert (got.argmax(1) == want.argmax(1)).all()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
        assert not np.array_equal(got, want), "bit-identical to ONNX Runtime's: was TorchScript served?"
    else:
        accuracy_drop = (want.argmax(1) == labels).mean() - (got.argmax(1) == labels).mean()
        assert accuracy_drop <= 0.005 + 1 / len(items), accuracy_drop  # the gate's 0.5 pt, plus one image
        assert (got.argmax(1) == want.argmax(1)).mean() >= 0.95
        assert not np.allclose(got, want, atol=1e-6), "INT8 answers equal fp32's: was the INT8 model served?"


@slow
def test_a_model_that_fails_to_load_marks_the_worker_dead(default_model: Path, tmp_path: Path) -> None:
    """The ONNX file is replaced by bytes that are not a model, with a manifest that vouches for them (so the
    checksum passes at start): loading fails in the worker, which must say so on /healthz and never be ready."""
    folder = Path(shutil.copytree(default_model, tmp_path / "broken"))
    (folder / SERVED_FILE).write_bytes(b"not an onnx model" * 100)
    manifest = json.loads((folder / "manifest.json").read_text())
    data = (folder / SERVED_FILE).read_bytes()
    manifest["artifacts"]["onnx_int8"].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with ServedClassifier("--arg", f"model={folder}", home=tmp_path / "home", log_path=tmp_path / "s.log") as served:
        deadline = time.monotonic() + 120
        while "now reports the worker dead" not in served.log(20000):
            assert time.monotonic() < deadline and served.process.poll() is None, served.log()
            time.sleep(0.2)
        assert httpx.get(f"{served.url}/healthz", timeout=TIMEOUT).status_code == 503
        assert served.readyz() == 503
        _assert_json_error(_post_images(served, [("a.jpg", b"\xff\xd8")]), 503, "warming up")
