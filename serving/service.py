"""CIFAR-10 classification service: `bentoml serve` from the repository root ([tool.bentoml.build] in pyproject.toml).

One BentoML service, `ClassifierService`, one worker process per core, with two typed APIs (`classify`,
`classify_pixels`) that BentoML's schema, OpenAPI (/docs.json) and clients (`bentoml.SyncHTTPClient`) know.
Each worker reads their HTTP requests itself (serving/api.py), decodes uploads within budgets
(serving/decoding.py) and runs the exported model on adaptive batches gathered across concurrent requests
(serving/batching.py). The model is a folder or a BentoML model-store tag (`--arg model=...`, default: the
bundled exported_models/default), declared to BentoML so that `bentoml build` packs it; everything about it
comes from its manifest. Settings: `--arg name=value` or CLASSIFIER_<NAME> (serving/settings.py).
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from pathlib import Path
from typing import Annotated

import bentoml
import numpy as np
from bentoml.validators import ContentType, DType, Shape
from pydantic import Field
from typing_extensions import TypedDict

from bundle.manifest import load_model_dir, verify_checksums
from bundle.preprocess import top_k
from bundle.runtime import resolve_backend
from serving import bentoml_adapter
from serving.api import Api, RouteTable
from serving.batching import AdaptiveBatcher
from serving.classifier import DEFAULT_K, Classifier, Prediction
from serving.decoding import Decoder
from serving.model_store import resolve_model
from serving.requests import Upload
from serving.settings import ServiceSettings

log = logging.getLogger("serving")
log.setLevel(logging.INFO)  # BentoML leaves the root logger at WARNING: keep the worker's start-up lines

# Done at import, so that `bentoml serve` itself fails at once on a bad or tampered model (raised in a worker,
# the arbiter would restart the crashing worker forever, never ready), and so that `bentoml build`, which
# imports this module, packs the model the service declares (below).
SETTINGS = bentoml.use_arguments(ServiceSettings)
SOURCE = resolve_model(SETTINGS.model)  # validated and checksummed; a folder is also imported into the store
MODEL = load_model_dir(SOURCE.folder)
BACKEND = resolve_backend(MODEL, SETTINGS.backend)
verify_checksums(MODEL, [BACKEND])
HEIGHT, WIDTH = MODEL.input_hw

# The API's types: what /schema.json, /docs.json and BentoML's clients show.
ImageFile = Annotated[Path, ContentType("image/*")]
Pixels = Annotated[np.ndarray, Shape((-1, HEIGHT, WIDTH, 3)), DType("uint8")]
TopK = Annotated[int, Field(ge=1, le=len(MODEL.class_names), description="labels per image, most probable first")]


class ImageAnswer(TypedDict):
    model: str
    file: str  # the uploaded file's name
    predictions: list[Prediction]


class PixelsAnswer(TypedDict):
    model: str
    predictions: list[Prediction]


BATCH_BUCKETS = sorted(
    {*(n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if n < SETTINGS.max_batch_size)} | {SETTINGS.max_batch_size}
)
BATCH_IMAGES = bentoml.metrics.Histogram(
    name="classifier_batch_images",
    documentation="Images per model batch formed by adaptive batching",
    buckets=BATCH_BUCKETS,
)
BATCH_REQUESTS = bentoml.metrics.Histogram(
    name="classifier_batch_requests",
    documentation="Requests (or parts of split requests) per model batch formed by adaptive batching",
    buckets=BATCH_BUCKETS,
)
REQUEST_SECONDS = bentoml.metrics.Histogram(
    name="classifier_request_duration_seconds",
    documentation="Seconds from a classification request's arrival to its answer, by route and status",
    labelnames=["endpoint", "http_response_code"],
    buckets=[0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
)
API = Api(SETTINGS, MODEL, BACKEND, on_answer=lambda path, status, s: REQUEST_SECONDS.labels(path, status).observe(s))
PAGES = API.pages()


@bentoml.service(
    name="cifar10_classifier",
    workers=SETTINGS.workers,
    traffic={"timeout": SETTINGS.timeout_s},  # other routes; the classification routes time themselves (api.py)
    logging={"access": {"enabled": SETTINGS.access_log}},
)
@bentoml.asgi_app(PAGES, path="/")
class ClassifierService:
    """Classifies images into the model's classes. Any image is brought to the model's input as its manifest
    says (EXIF orientation, alpha on white, centre crop, bicubic resize). `GET /model` answers the manifest
    (classes, accuracy, input contract, checksums); `GET /` is a page to try it. Errors are JSON
    {"error": message, "status": code}."""

    model_ref = bentoml.models.BentoModel(SOURCE.tag)  # the model `bentoml build` packs into the Bento

    def __init__(self) -> None:
        self.ready = False
        self.failed: str | None = None
        self.classifier: Classifier | None = None
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
        API.bind(self)
        bentoml_adapter.note_worker_start(log)
        threading.Thread(target=self._load_and_warm_up, name="warm-up", daemon=True).start()

    # -------------------------------------------------------------- the API (HTTP requests: serving/api.py)

    @bentoml.api(route="/classify")
    async def classify(self, images: list[ImageFile], k: TopK = DEFAULT_K) -> list[ImageAnswer]:
        """Top-k labels for each image file (PNG, JPEG, BMP, GIF, WebP, TIFF; any size), named by its file name.
        Over HTTP: a multipart form with the files in the field `images` (repeatable) and optionally `k`, or
        one image as the raw body with `Content-Type: image/*` and `?k=` in the query string."""
        uploads = [Upload(Path(image).name, Path(image).read_bytes()) for image in images]
        return await self.answer_uploads(uploads, k, time.monotonic() + SETTINGS.latency_budget_s)

    @bentoml.api(route="/classify_pixels")
    async def classify_pixels(self, pixels: Pixels, k: TopK = DEFAULT_K) -> list[PixelsAnswer]:
        """Top-k labels for each uint8 RGB pixel array of the model's input size, (N, H, W, 3), as JSON
        {"pixels": [...], "k": 3}."""
        return await self.answer_pixels(np.asarray(pixels), k, time.monotonic() + SETTINGS.latency_budget_s)

    async def answer_uploads(self, uploads: list[Upload], k: int, deadline: float) -> list[ImageAnswer]:
        pixels = await self.decoder.decode(uploads)
        ranked = top_k(await self.batcher.submit(pixels, deadline), MODEL.class_names, k)
        return [{"model": MODEL.name, "file": u.name, "predictions": p} for u, p in zip(uploads, ranked, strict=True)]

    async def answer_pixels(self, pixels: np.ndarray, k: int, deadline: float) -> list[PixelsAnswer]:
        ranked = top_k(await self.batcher.submit(pixels, deadline), MODEL.class_names, k)
        return [{"model": MODEL.name, "predictions": p} for p in ranked]

    @property
    def busy(self) -> bool:
        return self.batcher.busy

    # -------------------------------------------------------------- life cycle

    def _load_and_warm_up(self) -> None:
        try:
            self._warm_up()
        except Exception as err:  # any load failure must surface as "not alive", not a silent hang
            self.failed = f"{type(err).__name__}: {err}"
            log.exception("loading model %s failed; /healthz now reports the worker dead", MODEL.folder)

    def _warm_up(self) -> None:
        self.classifier = Classifier.load(MODEL.folder, backend=BACKEND, threads=SETTINGS.threads)
        start = time.monotonic()
        while True:  # every batch size a request can bring, at least once; the timings seed the cost model
            for n in sorted({1, 2, 4, 8, 16, 32, SETTINGS.max_batch_size}):
                pixels = np.zeros((min(n, SETTINGS.max_batch_size), HEIGHT, WIDTH, 3), np.uint8)
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
        bentoml_adapter.note_worker_ready()

    def _probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) -> float32 (N, classes); run by the batcher."""
        return self.classifier.probabilities(pixels)

    def __is_ready__(self) -> bool:  # GET /readyz: 200 once every worker has warmed up, not just this one
        return self.ready and bentoml_adapter.all_workers_ready(SETTINGS.workers)

    def __is_alive__(self) -> bool:
        return self.failed is None

    @bentoml.on_shutdown
    def _note_clean_exit(self) -> None:
        bentoml_adapter.note_worker_exit()


def _observe(images: int, requests: int) -> None:
    BATCH_IMAGES.observe(images)
    BATCH_REQUESTS.observe(requests)


# HTTP requests to the declared APIs are read by serving/api.py, never by BentoML's generic parsing (which
# writes uploads to disk and fetches URLs): BentoML's documented middleware hook puts the handlers in front.
ROUTES = API.handlers(ClassifierService.apis)
ClassifierService.add_asgi_middleware(RouteTable, routes=ROUTES)
# The adapter's patches act when the worker builds its HTTP server, after importing this module: they are
# installed here, at import, because no BentoML hook runs between the two.
bentoml_adapter.use_private_prometheus_dir()
bentoml_adapter.collapse_unknown_route_metrics(
    [api.route for api in ClassifierService.apis.values()] + [route.path for route in PAGES.routes]
)
bentoml_adapter.install_http_limits(
    max_header_bytes=SETTINGS.max_header_kb * 1024,
    header_timeout_s=SETTINGS.header_timeout_s,
    max_drain_bytes=int(SETTINGS.max_drain_mb * 2**20),
    linger_s=SETTINGS.drain_timeout_s,
)
if not SETTINGS.access_log:  # skip BentoML's per-request middleware (0.13 ms of CPU per request, measured)
    bentoml_adapter.serve_routes_directly(ROUTES)
