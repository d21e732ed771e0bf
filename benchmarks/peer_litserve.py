"""The LitServe peer: this model served as LitServe's documentation writes a server, for the load benchmark.

A `LitAPI` (ONNX Runtime loaded in `setup`, then `decode_request` -> `batch` -> `predict` -> `unbatch` ->
`encode_response`) under `LitServer` with dynamic batching (`max_batch_size`, `batch_timeout`), 2 inference
workers on the CPU (`workers_per_device`) and as many API server processes (LitServe's default), requests handed
over through ZeroMQ (`fast_queue`, which the LitServer docs advise above ~100 requests/s). The same model file,
input contract (bundle.preprocess), multipart field `images`, optional form field `k` and answer shape as
POST /classify of this project's service. benchmarks/load_test.py runs it side by side with the service:

    CLASSIFIER_MODEL=exported_models/default PEER_BACKEND=auto PEER_WORKERS=2 PEER_THREADS=1 \\
        python -m benchmarks.peer_litserve --port 3003

    curl -F images=@cat.jpg http://127.0.0.1:3003/classify
"""

# No `from __future__ import annotations` here: LitServe reads decode_request's `request` annotation and
# encode_response's return annotation at run time to type the FastAPI route, so they must stay real objects.
import argparse
import os
import sys

import litserve as ls
import numpy as np
import onnxruntime as ort
from fastapi import HTTPException

from bundle.manifest import load_model_dir
from bundle.preprocess import ImageError, decode_image, pixels_to_input, softmax, top_k
from bundle.runtime import resolve_backend
from serving.classifier import DEFAULT_K  # the service's default k

WORKERS = int(os.environ.get("PEER_WORKERS", "2"))  # inference worker processes, each with its own model
THREADS = int(os.environ.get("PEER_THREADS", "1"))  # ONNX Runtime intra-op threads per worker
MAX_BATCH_SIZE = int(os.environ.get("PEER_MAX_BATCH_SIZE", "64"))  # requests per batch; the service's default
# A worker waits this long for a batch to fill unless it is full before (LitAPI's `batch_timeout`, in s): the
# floor of every answer's latency under light load. 0 would skip the wait but makes the worker poll its queue
# without sleeping, which takes a whole core on this 2-core machine.
BATCH_TIMEOUT_S = float(os.environ.get("PEER_BATCH_TIMEOUT_MS", "5")) / 1000


class ImageClassifierAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.model = load_model_dir()  # $CLASSIFIER_MODEL or exported_models/default
        path = self.model.artifact_path(resolve_backend(self.model, os.environ.get("PEER_BACKEND", "auto")))
        options = ort.SessionOptions()
        options.intra_op_num_threads = THREADS  # ONNX Runtime ignores OMP_NUM_THREADS
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    # `request` unannotated: LitServe then passes a multipart request's `await request.form()` (Starlette's
    # FormData, uploads held in memory) from the API server to this worker.
    def decode_request(self, request, context: dict) -> np.ndarray:
        """One request's images -> uint8 (n, H, W, 3); the file names and k wait in the request's context."""
        uploads = request.getlist("images")
        if not uploads:
            raise HTTPException(400, "no image: send the files as the multipart field 'images'")
        try:
            # Pillow for every file, as the other peers (benchmarks/peer_fastapi.py) do.
            pixels = [
                decode_image(u.file.read(), self.model.contract, name=u.filename or "image", fast_jpeg=False)
                for u in uploads
            ]
            context["k"] = int(request.get("k", DEFAULT_K))
        except (ImageError, ValueError) as err:
            # LitServe answers this error to every request of the batch being decoded, not only to this one.
            raise HTTPException(400, str(err)) from err
        context["files"] = [u.filename for u in uploads]
        return np.stack(pixels)

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        # Requests may hold several images each: concatenate rather than stack (the default).
        return np.concatenate(inputs)

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        logits = self.session.run(None, {self.input_name: pixels_to_input(pixels, self.model.contract)})[0]
        return softmax(logits)

    def unbatch(self, probabilities: np.ndarray, context: list[dict]) -> list[np.ndarray]:
        bounds = np.cumsum([len(request["files"]) for request in context])[:-1]
        return np.split(probabilities, bounds)

    def encode_response(self, probabilities: np.ndarray, context: dict) -> list[dict]:
        ranked = top_k(probabilities, self.model.class_names, context["k"])
        return [
            {"model": self.model.name, "file": name, "predictions": predictions}
            for name, predictions in zip(context["files"], ranked, strict=True)
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    args = parser.parse_args(argv)
    api = ImageClassifierAPI(max_batch_size=MAX_BATCH_SIZE, batch_timeout=BATCH_TIMEOUT_S, api_path="/classify")
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=WORKERS, fast_queue=True)
    # No client.py written into the working directory; no access log line per request (as the other servers).
    server.run(host=args.host, port=args.port, generate_client_file=False, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
