"""CIFAR-10 classification service: `bentoml serve` from the repository root.

One BentoML service. Each worker process parses uploads, decodes them with the
preprocessing the offline predictor uses (bundle/preprocess.py), and hands the
pixels to BentoML's adaptive batching (serving/bentoml_adapter.py), which runs
the exported model (bundle/runtime.py) on batches gathered across concurrent
requests. Settings: `--arg name=value` or CLASSIFIER_<NAME>
(serving/settings.py); the model comes from its manifest alone.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import bentoml
import numpy as np
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from bundle.manifest import load_model_dir, verify_checksums
from bundle.preprocess import ImageError, declared_pixels, decode_images, pixels_to_input, softmax, top_k
from bundle.runtime import load_backend
from serving.bentoml_adapter import adaptive_batcher, upload_name
from serving.guard import RequestGuard
from serving.settings import ServiceSettings

log = logging.getLogger("serving")
SETTINGS = bentoml.use_arguments(ServiceSettings)
MODEL = load_model_dir(SETTINGS.model or None)
# Checked at import so that `bentoml serve` itself fails (exit 1) on a tampered model: raised in a worker's
# __init__, the arbiter would restart the crashing worker forever, never ready.
verify_checksums(MODEL, [SETTINGS.backend])
_, CHANNELS, HEIGHT, WIDTH = MODEL.contract["shape"]
# Uploads of at most this many pixels in all are decoded on the event loop, which costs less than a thread
# hop; bigger ones go to a thread so that the worker keeps serving while they decode.
INLINE_DECODE_PIXELS = 64 * 64 * 16
_BATCH_BUCKETS = [
    *(n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if n < SETTINGS.max_batch_size),
    SETTINGS.max_batch_size,
]
BATCH_IMAGES = bentoml.metrics.Histogram(
    name="classifier_batch_images",
    documentation="Images per model batch formed by adaptive batching",
    buckets=_BATCH_BUCKETS,
)
BATCH_REQUESTS = bentoml.metrics.Histogram(
    name="classifier_batch_requests",
    documentation="Requests (or parts of split requests) per model batch formed by adaptive batching",
    buckets=_BATCH_BUCKETS,
)


class ModelBusy(bentoml.exceptions.ServiceUnavailable):
    """The dispatcher dropped the request: its expected wait passed max_latency_ms."""


def _model_busy() -> NoReturn:
    raise ModelBusy("the model's queue is full")


def _model_info(_request) -> JSONResponse:
    keys = (
        "name",
        "architecture",
        "parameters",
        "class_names",
        "input",
        "test_accuracy",
        "artifacts",
        "parity",
        "versions",
        "created",
    )
    return JSONResponse({k: MODEL.manifest.get(k) for k in keys} | {"backend": SETTINGS.backend})


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


@bentoml.service(
    name="cifar10_classifier",
    workers=SETTINGS.workers,
    traffic={"timeout": SETTINGS.timeout_s, "max_concurrency": SETTINGS.max_concurrency},
)
@bentoml.asgi_app(Starlette(routes=[Route("/model", _model_info, methods=["GET"])]), path="/")
class Classifier:
    """POST /classify (multipart images) or /classify_pixels (uint8 arrays) -> top-k labels per image."""

    def __init__(self) -> None:
        self.ready = False
        self.failed: str | None = None
        # async: uint8 (N, H, W, 3) -> (N, classes), batched across concurrent requests
        self.probabilities = adaptive_batcher(
            self._run_batch,
            max_batch_size=SETTINGS.max_batch_size,
            max_latency_ms=SETTINGS.max_latency_ms,
            on_shed=_model_busy,
        )
        threading.Thread(target=self._load_and_warm_up, name="warm-up", daemon=True).start()

    def _load_and_warm_up(self) -> None:
        try:
            self._warm_up()
        except Exception as err:  # any load failure must surface as "not alive", not a silent hang
            self.failed = f"{type(err).__name__}: {err}"
            log.exception("loading model %s failed; /healthz now reports the worker dead", MODEL.folder)

    def _warm_up(self) -> None:
        self.run = load_backend(MODEL, SETTINGS.backend, threads=SETTINGS.threads)
        start = time.monotonic()
        while True:  # every batch size a request can bring, at least once
            for n in (1, 2, 4, 8, 16, 32, SETTINGS.max_batch_size):
                self.run(np.zeros((min(n, SETTINGS.max_batch_size), CHANNELS, HEIGHT, WIDTH), np.float32))
            if time.monotonic() - start >= SETTINGS.warmup_s:
                break
        log.info(
            "model %s (%s, %d threads) warmed up in %.1f s",
            MODEL.name,
            SETTINGS.backend,
            SETTINGS.threads,
            time.monotonic() - start,
        )
        # Everything loaded so far (BentoML, pydantic, ONNX Runtime) moves to the permanent generation, so the
        # collector stops re-walking it: p99 at concurrency 32 fell from ~260 to ~200 ms (load benchmark).
        gc.collect()
        gc.freeze()
        self.ready = True

    def __is_ready__(self) -> bool:
        return self.ready

    def __is_alive__(self) -> bool:
        return self.failed is None

    async def _run_batch(self, parts: Sequence[np.ndarray]) -> list[np.ndarray]:
        """One model call on the pixels of several requests; the dispatcher gives each its own rows back."""
        pixels = np.concatenate(parts)
        BATCH_IMAGES.observe(len(pixels))
        BATCH_REQUESTS.observe(len(parts))
        batch = pixels_to_input(pixels, MODEL.contract)
        probabilities = softmax(await asyncio.to_thread(self.run, batch)).astype(np.float32)
        return np.split(probabilities, np.cumsum([len(part) for part in parts])[:-1])

    @bentoml.api(route="/classify")
    async def classify(self, images: list[Path], k: int = 3) -> list[dict]:
        """Classify uploaded image files (field `images`, repeatable); returns top-k labels per image."""
        if not 1 <= k <= len(MODEL.class_names):
            return _error(400, f"k must be between 1 and {len(MODEL.class_names)}, got {k}")
        names = [upload_name(path) for path in images]
        blobs = [path.read_bytes() for path in images]
        args = (blobs, names, MODEL.contract, SETTINGS.max_pixels)
        try:
            if sum(map(declared_pixels, blobs)) <= INLINE_DECODE_PIXELS:
                pixels = decode_images(*args)
            else:
                pixels = await asyncio.to_thread(decode_images, *args)
        except ImageError as err:
            return _error(400, str(err))
        return await self._answer(pixels, k, names)

    @bentoml.api(route="/classify_pixels")
    async def classify_pixels(self, pixels: np.ndarray, k: int = 3) -> list[dict]:
        """Classify RGB pixel arrays of shape (N, H, W, 3), integers 0-255; same answers as /classify."""
        if not 1 <= k <= len(MODEL.class_names):
            return _error(400, f"k must be between 1 and {len(MODEL.class_names)}, got {k}")
        if pixels.ndim != 4 or pixels.shape[1:] != (HEIGHT, WIDTH, CHANNELS):
            return _error(400, f"pixels must have shape (N, {HEIGHT}, {WIDTH}, {CHANNELS}); got {pixels.shape}")
        if len(pixels) == 0 or len(pixels) > SETTINGS.max_images:
            return _error(
                413 if len(pixels) else 400, f"send 1 to {SETTINGS.max_images} images per request, got {len(pixels)}"
            )
        if pixels.dtype.kind not in "iu":
            return _error(400, f"pixels must be integers 0-255 (uint8 RGB); got {pixels.dtype} values")
        if pixels.min() < 0 or pixels.max() > 255:
            return _error(400, f"pixel values must be 0-255; got values from {pixels.min()} to {pixels.max()}")
        return await self._answer(pixels.astype(np.uint8), k, None)

    async def _answer(self, pixels: np.ndarray, k: int, names: list[str] | None) -> JSONResponse:
        if not self.ready:
            return _error(503, "the model is still warming up; retry shortly (GET /readyz says when it is ready)")
        try:
            probabilities = await self.probabilities(pixels)
        except ModelBusy:
            return _error(503, "the model is busy: its queue would take longer than max_latency_ms; retry shortly")
        ranked = top_k(probabilities, MODEL.class_names, k)
        # A plain JSONResponse: BentoML's own output encoding rebuilds a JSON schema for every answer.
        return JSONResponse(
            [
                {"model": MODEL.name, **({"file": names[i]} if names else {}), "predictions": preds}
                for i, preds in enumerate(ranked)
            ]
        )


Classifier.add_asgi_middleware(
    RequestGuard,
    api_paths=("/classify", "/classify_pixels"),
    upload_path="/classify",
    file_field="images",
    other_fields=("k",),
    max_body_bytes=int(SETTINGS.max_body_mb * 2**20),
    max_files=SETTINGS.max_images,
)
