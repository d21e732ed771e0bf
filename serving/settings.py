"""Service settings: `bentoml serve --arg name=value`, else $CLASSIFIER_<NAME>, else the default."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from bundle.environment import usable_cores
from bundle.preprocess import DEFAULT_MAX_PIXELS


class ServiceSettings(BaseModel):
    model: str = ""  # exported model folder; empty: $CLASSIFIER_MODEL or exported_models/default
    backend: Literal["onnx", "onnx_int8", "torchscript"] = "onnx"
    # One worker process per usable core, one intra-op thread each: on 2 cores this served 46% more
    # requests/s at concurrency 32 than 1 worker x 2 threads, p99 230 vs 308 ms (README, load benchmark
    # `--compare-workers`): request parsing runs in parallel, and small batches parallelise poorly in one process.
    workers: int = Field(0, ge=0)  # service worker processes; 0: one per usable core
    threads: int = Field(0, ge=0)  # ONNX Runtime intra-op threads per worker; 0: usable cores / workers
    max_batch_size: int = Field(64, ge=2)  # images per adaptive batch
    max_latency_ms: int = Field(1000, ge=1)  # the dispatcher refuses work it expects to take longer (503)
    max_concurrency: int = Field(256, ge=1)  # requests in flight per worker; more get 429 (bounded queue)
    timeout_s: int = Field(10, ge=1)
    max_images: int = Field(64, ge=1)  # images per /classify request
    max_body_mb: float = Field(16.0, gt=0)
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)  # declared width x height per image (decompression bombs)
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
        return self
