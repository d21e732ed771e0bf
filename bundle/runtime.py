"""Run an exported model: a function from a contract-shaped float32 batch to float32 logits.

ONNX Runtime for the ONNX artifacts (fp32 and INT8); the TorchScript artifact
needs torch, imported only when that backend is chosen.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bundle.manifest import ExportedModel

Runner = Callable[[np.ndarray], np.ndarray]  # float32 NCHW batch -> float32 logits
BACKENDS = {"onnx": "onnx", "onnx_int8": "onnx_int8", "torchscript": "torchscript"}  # backend -> artifact kind


def resolve_backend(model: ExportedModel, backend: str = "auto") -> str:
    """`auto` is the INT8 ONNX model when the bundle has one whose export gate passed (accuracy within 0.5
    point of fp32), else the fp32 ONNX model; any other name is checked and returned."""
    if backend == "auto":
        gate = model.manifest.get("parity", {}).get("onnx_int8", {})
        return "onnx_int8" if "onnx_int8" in model.manifest["artifacts"] and gate.get("passed") is True else "onnx"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of: auto, {', '.join(BACKENDS)}")
    return backend


def load_backend(model: ExportedModel, backend: str = "auto", threads: int | None = None) -> Runner:
    """The model's `backend` artifact (see resolve_backend) as a Runner, on `threads` intra-op threads
    (default: all cores)."""
    backend = resolve_backend(model, backend)
    path = model.artifact_path(BACKENDS[backend])
    threads = threads or os.cpu_count() or 1
    if backend == "torchscript":
        return torchscript_runner(path, threads)
    return onnx_runner(path, threads, allow_cuda=backend == "onnx")


def onnx_runner(path: Path, threads: int | None = None, allow_cuda: bool = False) -> Runner:
    """An ONNX Runtime session as a function; threads set explicitly (intra-op = threads, inter-op = 1):
    ONNX Runtime ignores OMP_NUM_THREADS."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.inter_op_num_threads = 1
    providers = ["CPUExecutionProvider"]
    if allow_cuda and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(str(path), options, providers=providers)
    input_name = session.get_inputs()[0].name
    return lambda batch: session.run(None, {input_name: batch})[0]


def torchscript_runner(path: Path, threads: int | None = None) -> Runner:
    """A TorchScript artifact as a Runner (imports torch); `threads` sets torch's intra-op threads."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..*deprecated.*", category=FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu").eval()

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(batch)).float().numpy()

    return run
