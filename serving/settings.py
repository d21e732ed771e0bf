"""Service settings: `bentoml serve --arg name=value`, else $CLASSIFIER_<NAME>, else the default.

Every limit and default of the service is defined here once; the rest of serving/ reads it from the settings.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from bundle.environment import usable_cores
from bundle.preprocess import DEFAULT_MAX_PIXELS
from bundle.runtime import BACKEND_CHOICES


class ServiceSettings(BaseModel):
    # An exported model folder or a BentoML model-store tag (cifar10-classifier:latest); empty: the bundled
    # exported_models/default (serving/model_store.py: a folder is also imported into the store, for `bentoml build`).
    model: str = ""
    # auto: the INT8 model when its export gate passed (2.1-3.1x the fp32 model's images/s at batch 8-64, 0.05
    # point less test accuracy for the bundled model: benchmarks/README.md, benchmarks/inference_speed.py), else fp32.
    backend: Literal[*BACKEND_CHOICES] = "auto"
    # One worker process per usable core, one intra-op thread each: on 2 cores this served 46% more
    # requests/s at concurrency 32 than 1 worker x 2 threads, p99 230 vs 308 ms (2026-11-27, AVX2 machine,
    # `python -m benchmarks.load_test --compare-workers`): request parsing runs in parallel, and small batches
    # parallelise poorly in one process.
    workers: int = Field(0, ge=0)  # service worker processes; 0: one per usable core
    threads: int = Field(0, ge=0)  # ONNX Runtime intra-op threads per worker; 0: usable cores / workers
    max_batch_size: int = Field(64, ge=2)  # images per adaptive batch
    # A batch the model is expected to finish within this many milliseconds runs on the worker's event loop,
    # longer ones in a model thread (so that health checks stay answered meanwhile): on 2 cores, running
    # short batches on the loop served 10% more requests/s at concurrency 32 and 21% more at 8
    # (benchmarks/README.md, "Serving under load"). 0: every batch in the thread.
    inline_max_ms: float = Field(30.0, ge=0)
    # A request the model's queue would answer later than this is refused at once (503); 0: timeout_s.
    max_latency_ms: int = Field(0, ge=0)
    max_concurrency: int = Field(256, ge=1)  # requests being processed by the whole service; more get 429
    timeout_s: int = Field(10, ge=1)  # a request unanswered this long after its body arrived gets 504
    max_images: int = Field(64, ge=1)  # images per /classify request
    max_body_mb: float = Field(16.0, gt=0)  # per request (413 beyond)
    body_timeout_s: float = Field(5.0, gt=0)  # a body must arrive within this + its size at min_upload_kib_s (408)
    min_upload_kib_s: float = Field(64.0, gt=0)  # the slowest upload rate an honest client is granted
    max_buffered_mb: float = Field(256.0, gt=0)  # request bodies held in memory per worker (503 beyond)
    max_header_kb: int = Field(64, ge=1)  # request line + headers (431 beyond)
    header_timeout_s: float = Field(10.0, gt=0)  # headers must arrive within this after connecting (408)
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)  # declared width x height per image (decompression bombs)
    max_request_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)  # declared pixels of all images of a request (413)
    max_decode_pixels_in_flight: int = Field(2 * DEFAULT_MAX_PIXELS, ge=1)  # per worker, large images (503 beyond)
    # Body bytes read and discarded after an early answer (413) so that the client can read it; a bigger rest
    # closes the connection. 0: 4 x max_body_mb, at least 64 MiB.
    max_drain_mb: float = Field(0.0, ge=0)
    drain_timeout_s: float = Field(10.0, gt=0)  # how long that rest may take to arrive
    access_log: bool = False  # one log line per request (costs CPU under load; off by default)
    warmup_s: float = Field(0.0, ge=0)  # keep warming up at least this long (tests use it to observe /readyz)

    @model_validator(mode="before")
    @classmethod
    def _from_environment(cls, values: dict | None) -> dict:
        values = dict(values or {})
        for name in cls.model_fields:
            env = os.environ.get(f"CLASSIFIER_{name.upper()}")
            if name not in values and env is not None:
                values[name] = env
        return values

    @model_validator(mode="after")
    def _resolve_defaults(self) -> ServiceSettings:
        cores = usable_cores()
        self.workers = self.workers or cores
        self.threads = self.threads or max(1, cores // self.workers)
        self.max_latency_ms = self.max_latency_ms or self.timeout_s * 1000
        self.max_drain_mb = self.max_drain_mb or max(64.0, 4 * self.max_body_mb)
        return self

    @property
    def latency_budget_s(self) -> float:
        """Seconds from a request's arrival within which its answer is due (503 at once when it cannot be)."""
        return min(self.max_latency_ms / 1000, self.timeout_s)

    @property
    def worker_max_concurrency(self) -> int:
        """This worker's share of `max_concurrency` (a service-wide figure)."""
        return -(-self.max_concurrency // self.workers)
