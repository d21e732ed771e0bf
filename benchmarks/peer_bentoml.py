"""The BentoML peer: this model served as BentoML's own examples write a service, for the load benchmark.

One `@bentoml.service` class, the model loaded in `__init__` (ONNX Runtime, threads set explicitly), one typed
batchable API taking `list[PIL.Image.Image]` (the repeated multipart field `images`) under BentoML's adaptive
batching; the same model file, input contract (bundle.preprocess) and answer shape as POST /classify of this
project's service, without its hand-built hot path. benchmarks/load_test.py runs it side by side with the service:

    CLASSIFIER_MODEL=exported_models/default PEER_BACKEND=auto PEER_WORKERS=2 PEER_THREADS=1 \\
        BENTOML_HOME=/tmp/bentoml-peer bentoml serve benchmarks.peer_bentoml:ImageClassifier --port 3002

    curl -F images=@cat.jpg http://127.0.0.1:3002/classify

Two things the idiomatic form cannot carry, unlike POST /classify: the file name (BentoML hands the API a
`PIL.Image` opened from the upload's stream, which has no name), so answers have no "file" key; and `k` (a
batchable API takes exactly one parameter besides the context: docs "Adaptive batching"), so answers hold the
service's default top 3.
"""

from __future__ import annotations

import os

import bentoml
import numpy as np
import onnxruntime as ort
from PIL.Image import Image

from bundle.manifest import load_model_dir
from bundle.preprocess import load_image, pixels_to_input, softmax, top_k
from bundle.runtime import resolve_backend
from serving.classifier import DEFAULT_K  # the service's default k

WORKERS = int(os.environ.get("PEER_WORKERS", "2"))  # processes, each with its own model and batching queue
THREADS = int(os.environ.get("PEER_THREADS", "1"))  # ONNX Runtime intra-op threads per worker
MAX_BATCH_SIZE = int(os.environ.get("PEER_MAX_BATCH_SIZE", "64"))  # images per batch; the service's default
# The dispatcher answers 503 to a request it expects to wait longer than this, so keep it well below the
# traffic timeout (60 s, answered 504); 10 s is the service's own budget.
MAX_LATENCY_MS = int(os.environ.get("PEER_MAX_LATENCY_MS", "10000"))


@bentoml.service(
    workers=WORKERS,
    traffic={"timeout": 60},
    # One log line per request costs CPU under load; the service and the other peers log none either.
    logging={"access": {"enabled": False}},
)
class ImageClassifier:
    def __init__(self) -> None:
        self.model = load_model_dir()  # $CLASSIFIER_MODEL or exported_models/default
        path = self.model.artifact_path(resolve_backend(self.model, os.environ.get("PEER_BACKEND", "auto")))
        options = ort.SessionOptions()
        # New-style BentoML services set no thread variables, and ONNX Runtime ignores OMP_NUM_THREADS anyway.
        options.intra_op_num_threads = THREADS
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
    def classify(self, images: list[Image]) -> list[dict]:
        """Top-k (DEFAULT_K) labels for each image; BentoML gathers the images of concurrent requests into one call and
        splits the answers back by request."""
        contract = self.model.contract
        pixels = np.stack([load_image(image, contract) for image in images])
        logits = self.session.run(None, {self.input_name: pixels_to_input(pixels, contract)})[0]
        ranked = top_k(softmax(logits), self.model.class_names, DEFAULT_K)
        return [{"model": self.model.name, "predictions": predictions} for predictions in ranked]
