"""CIFAR-10 classification service: `bentoml serve` from the repository root.

Two BentoML services in one module: `Classifier` (the HTTP front: uploads,
validation, top-k answers) depends on `ImageModel` (the adaptive-batching
model runner), which runs as its own process so that batching and the
front's concurrency limit stay independent. Settings: `--arg name=value`
or CLASSIFIER_<NAME> (serving/settings.py); the model comes from its
manifest alone (serving/model.py).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import Annotated

import bentoml
import numpy as np
from bentoml.validators import DType, Shape
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from serving.guard import RequestGuard
from serving.model import load_backend, load_model_dir, verify_checksums
from serving.preprocess import ImageError, decode_image, pixels_to_input, softmax, top_k
from serving.settings import ServiceSettings

log = logging.getLogger("serving")
SETTINGS = bentoml.use_arguments(ServiceSettings)
MODEL = load_model_dir(SETTINGS.model or None)
# Checked at import so that `bentoml serve` itself fails (exit 1) on a tampered model: raised in a worker's
# __init__, the arbiter would restart the crashing worker forever while the front waits, never ready.
verify_checksums(MODEL, [SETTINGS.backend])
_, CHANNELS, HEIGHT, WIDTH = MODEL.contract["shape"]
# Only for the model service, which gets checked uint8 arrays from the front. These validators reshape and cast
# rather than check (NCHW input would be scrambled, 0.5 truncated to 0, 300 answer 500), so the front's
# classify_pixels takes a plain array and checks it itself.
PixelBatch = Annotated[np.ndarray, Shape((-1, HEIGHT, WIDTH, CHANNELS)), DType("uint8")]


@bentoml.service(
    name="cifar10_model",
    workers=SETTINGS.workers,
    traffic={"timeout": SETTINGS.timeout_s},
    # The front's client to this service replaces its aiohttp session every `max_requests` calls (default 100)
    # and closes the old one under the calls still in flight: under concurrency ~1 in 10 answers became 500s
    # (tests/test_serving.py::test_classify_sustained_concurrency_has_no_errors). A local socket needs no refresh.
    runner_connection={"max_requests": 2**31 - 1, "max_age": 1e9},
)
class ImageModel:
    """Runs the exported model on batches of uint8 (N, H, W, 3) pixels; answers probabilities."""

    def __init__(self) -> None:
        self.ready = False
        self.failed: str | None = None
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
        self.ready = True

    def __is_ready__(self) -> bool:
        return self.ready

    def __is_alive__(self) -> bool:
        return self.failed is None

    @bentoml.api(batchable=True, max_batch_size=SETTINGS.max_batch_size, max_latency_ms=SETTINGS.max_latency_ms)
    def predict(self, pixels: PixelBatch) -> np.ndarray:
        """Class probabilities (N, classes) of uint8 (N, H, W, 3) RGB pixels."""
        if not self.ready:
            raise bentoml.exceptions.ServiceUnavailable("the model is still warming up; retry shortly")
        return softmax(self.run(pixels_to_input(pixels, MODEL.contract))).astype(np.float32)


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
    name="cifar10_classifier", traffic={"timeout": SETTINGS.timeout_s, "max_concurrency": SETTINGS.max_concurrency}
)
@bentoml.asgi_app(Starlette(routes=[Route("/model", _model_info, methods=["GET"])]), path="/")
class Classifier:
    """POST /classify (multipart images) or /classify_pixels (uint8 arrays) -> top-k labels per image."""

    model = bentoml.depends(ImageModel)

    @bentoml.api(route="/classify")
    async def classify(self, images: list[Path], k: int = 3) -> list[dict]:
        """Classify uploaded image files (field `images`, repeatable); returns top-k labels per image."""
        if not 1 <= k <= len(MODEL.class_names):
            return _error(400, f"k must be between 1 and {len(MODEL.class_names)}, got {k}")
        try:
            pixels = await asyncio.to_thread(_decode_all, images)
        except ImageError as err:
            return _error(400, str(err))
        return await self._answer(pixels, k, [_upload_name(p) for p in images])

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

    async def _answer(self, pixels: np.ndarray, k: int, names: list[str] | None) -> list[dict]:
        try:
            probabilities = await self.model.to_async.predict(pixels)
        except bentoml.exceptions.BentoMLException as err:
            status = int(getattr(err, "error_code", 500))
            log.warning("model call failed (%s): %s", status, err)
            if status in (429, 503):
                return _error(503, "the model is busy (its queue is full) or still warming up; retry shortly")
            return _error(500, "internal error in the model service; see the server log")
        ranked = top_k(np.asarray(probabilities), MODEL.class_names, k)
        return [
            {"model": MODEL.name, **({"file": names[i]} if names else {}), "predictions": preds}
            for i, preds in enumerate(ranked)
        ]


def _upload_name(path: Path) -> str:
    # BentoML saves each upload as NamedTemporaryFile(suffix=<original name>): "tmp" + 8 random characters + name.
    return path.name[11:] if path.name.startswith("tmp") and len(path.name) > 11 else path.name


def _decode_all(files: list[Path]) -> np.ndarray:
    return np.stack(
        [
            decode_image(f.read_bytes(), MODEL.contract, name=_upload_name(f), max_pixels=SETTINGS.max_pixels)
            for f in files
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
