"""The hand-written peer: the server a user would write in twenty lines instead of using this project's service.

FastAPI + ONNX Runtime, one image per forward pass, no batching, `uvicorn --workers N`; the same model file,
the same input contract (bundle.preprocess) and the same answer shape as POST /classify of the service.
benchmarks/load_test.py runs it side by side with the service:

    CLASSIFIER_MODEL=exported_models/default PEER_BACKEND=auto PEER_THREADS=1 \\
        python -m uvicorn benchmarks.peer_fastapi:app --workers 2 --port 3001
"""

from __future__ import annotations

import os

from fastapi import FastAPI, Form, HTTPException, UploadFile

from bundle.manifest import load_model_dir
from bundle.preprocess import ImageError, decode_image, pixels_to_input, softmax, top_k
from bundle.runtime import load_backend

MODEL = load_model_dir()  # $CLASSIFIER_MODEL or exported_models/default
RUN = load_backend(MODEL, os.environ.get("PEER_BACKEND", "auto"), threads=int(os.environ.get("PEER_THREADS", "1")))
app = FastAPI()


@app.get("/healthz")
def healthz() -> dict:
    return {"ok": True}


@app.post("/classify")
async def classify(images: list[UploadFile], k: int = Form(3)) -> list[dict]:
    answers = []
    for upload in images:
        try:
            # Pillow for every file, as a hand-written server would (the service decodes plain JPEGs with
            # libjpeg-turbo directly: same pixels, less work per file).
            data = await upload.read()
            pixels = decode_image(data, MODEL.contract, name=upload.filename or "image", fast_jpeg=False)
        except ImageError as err:
            raise HTTPException(400, str(err)) from err
        probabilities = softmax(RUN(pixels_to_input(pixels[None], MODEL.contract)))
        predictions = top_k(probabilities, MODEL.class_names, k)[0]
        answers.append({"model": MODEL.name, "file": upload.filename, "predictions": predictions})
    return answers
