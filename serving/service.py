"""CIFAR-10 classification service: `bentoml serve` from the repository root (bentofile.yaml).

One BentoML service, `Classifier`, one worker process per core. Each worker reads requests (serving/api.py),
decodes uploads with the preprocessing the offline predictor uses (bundle/preprocess.py, budgeted by
serving/decoding.py) and runs the exported model (bundle/runtime.py) on adaptive batches gathered across
concurrent requests (serving/batching.py). Settings: `--arg name=value` or CLASSIFIER_<NAME>
(serving/settings.py); everything about the model comes from its manifest.
"""

from __future__ import annotations

import gc
import logging
import threading
import time

import bentoml
import numpy as np

from bundle.manifest import load_model_dir, verify_checksums
from bundle.preprocess import pixels_to_input, softmax, top_k
from bundle.runtime import load_backend, resolve_backend
from serving import bentoml_adapter
from serving.api import ROUTES, Api
from serving.batching import AdaptiveBatcher
from serving.decoding import Decoder
from serving.requests import Upload
from serving.settings import ServiceSettings

log = logging.getLogger("serving")
log.setLevel(logging.INFO)  # BentoML leaves the root logger at WARNING: keep the worker's start-up lines

# Done at import, so that `bentoml serve` itself fails at once on a bad or tampered model folder (raised in
# a worker, the arbiter would restart the crashing worker forever, never ready), and so that the HTTP limits
# are in place before the worker builds its server.
SETTINGS = bentoml.use_arguments(ServiceSettings)
MODEL = load_model_dir(SETTINGS.model or None)
BACKEND = resolve_backend(MODEL, SETTINGS.backend)
verify_checksums(MODEL, [BACKEND])
bentoml_adapter.use_private_prometheus_dir()
bentoml_adapter.collapse_unknown_route_metrics(
    [*ROUTES, "/livez", "/healthz", "/readyz", "/metrics", "/schema.json"], ["/static_content/"]
)
bentoml_adapter.install_http_limits(
    max_header_bytes=SETTINGS.max_header_kb * 1024,
    header_timeout_s=SETTINGS.header_timeout_s,
    max_drain_bytes=max(64 * 2**20, 4 * int(SETTINGS.max_body_mb * 2**20)),
)

_BUCKETS = [
    *(n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if n < SETTINGS.max_batch_size),
    SETTINGS.max_batch_size,
]
BATCH_IMAGES = bentoml.metrics.Histogram(
    name="classifier_batch_images", documentation="Images per model batch formed by adaptive batching", buckets=_BUCKETS
)
BATCH_REQUESTS = bentoml.metrics.Histogram(
    name="classifier_batch_requests",
    documentation="Requests (or parts of split requests) per model batch formed by adaptive batching",
    buckets=_BUCKETS,
)
REQUEST_SECONDS = bentoml.metrics.Histogram(
    name="classifier_request_duration_seconds",
    documentation="Seconds from a classification request's arrival to its answer, by route and status",
    labelnames=["endpoint", "http_response_code"],
    buckets=[0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
)
API = Api(
    SETTINGS,
    MODEL,
    BACKEND,
    bentoml.get_current_service,
    on_answer=lambda path, status, seconds: REQUEST_SECONDS.labels(path, status).observe(seconds),
)
# The classification routes skip BentoML's per-request middleware (0.13 ms of CPU per request, README
# "Serving"), unless the access log, one of those middlewares, is asked for.
if not SETTINGS.access_log:
    bentoml_adapter.serve_routes_directly(API.hot_routes())


@bentoml.service(
    name="cifar10_classifier",
    workers=SETTINGS.workers,
    traffic={"timeout": SETTINGS.timeout_s},  # other routes; /classify* time themselves (serving/api.py)
    logging={"access": {"enabled": SETTINGS.access_log}},
    tracing={"excluded_urls": ["/classify", "/classify_pixels"]},  # no per-request spans on the hot path
)
@bentoml.asgi_app(API.app(), path="/")
class Classifier:
    """Classifies images: uploads or pixel arrays -> top-k labels per image (routes in serving/api.py)."""

    def __init__(self) -> None:
        self.ready = False
        self.failed: str | None = None
        self.run = None
        self.batcher = AdaptiveBatcher(
            self._probabilities,
            max_batch_size=SETTINGS.max_batch_size,
            on_batch=_observe,
            inline_max_seconds=SETTINGS.inline_max_ms / 1000,
        )
        self.decoder = Decoder(
            MODEL.contract,
            max_pixels=SETTINGS.max_pixels,
            max_request_pixels=SETTINGS.max_request_pixels,
            max_pixels_in_flight=SETTINGS.max_decode_pixels_in_flight,
        )
        bentoml_adapter.note_worker_start(log)
        threading.Thread(target=self._load_and_warm_up, name="warm-up", daemon=True).start()

    def _load_and_warm_up(self) -> None:
        try:
            self._warm_up()
        except Exception as err:  # any load failure must surface as "not alive", not a silent hang
            self.failed = f"{type(err).__name__}: {err}"
            log.exception("loading model %s failed; /healthz now reports the worker dead", MODEL.folder)

    def _warm_up(self) -> None:
        self.run = load_backend(MODEL, BACKEND, threads=SETTINGS.threads)
        height, width = MODEL.input_hw
        start = time.monotonic()
        while True:  # every batch size a request can bring, at least once; the timings seed the cost model
            for n in sorted({1, 2, 4, 8, 16, 32, SETTINGS.max_batch_size}):
                pixels = np.zeros((min(n, SETTINGS.max_batch_size), height, width, 3), np.uint8)
                t0 = time.monotonic()
                probabilities = self._probabilities(pixels)
                self.batcher.cost.record(len(pixels), time.monotonic() - t0)
            if probabilities.shape[1] != len(MODEL.class_names):
                raise RuntimeError(
                    f"the model answers {probabilities.shape[1]} classes, its manifest names {len(MODEL.class_names)}"
                )
            if time.monotonic() - start >= SETTINGS.warmup_s:
                break
        log.info(
            "model %s (%s, %d threads) warmed up in %.1f s",
            MODEL.name,
            BACKEND,
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

    @bentoml.on_shutdown
    def _note_clean_exit(self) -> None:
        bentoml_adapter.note_worker_exit()

    def _probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) -> float32 (N, classes); runs in the batcher's model thread."""
        return softmax(self.run(pixels_to_input(pixels, MODEL.contract))).astype(np.float32)

    async def classify(self, uploads: list[Upload], k: int, deadline: float) -> list[dict]:
        """Top-k labels for each uploaded image file, named by its file name."""
        pixels = await self.decoder.decode(uploads)
        probabilities = await self.batcher.submit(pixels, deadline)
        ranked = top_k(probabilities, MODEL.class_names, k)
        return [{"model": MODEL.name, "file": u.name, "predictions": p} for u, p in zip(uploads, ranked, strict=True)]

    async def classify_pixels(self, pixels: np.ndarray, k: int, deadline: float) -> list[dict]:
        """Top-k labels for each uint8 (H, W, 3) pixel array."""
        probabilities = await self.batcher.submit(pixels, deadline)
        return [{"model": MODEL.name, "predictions": p} for p in top_k(probabilities, MODEL.class_names, k)]


def _observe(images: int, requests: int) -> None:
    BATCH_IMAGES.observe(images)
    BATCH_REQUESTS.observe(requests)
