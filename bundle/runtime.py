"""The model formats of an exported folder, and how each one runs: a function from a contract-shaped float32
batch to float32 logits.

FORMATS is the one table of formats: its kind names the manifest entry and the backend, its file the name in
the folder, its runner how to run it. The exporter writes these (trainer/export.py keys its writers by kind),
the service and the predictor run them. ONNX Runtime runs the ONNX formats; the torch formats import torch
only when chosen.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bundle.environment import usable_cores
from bundle.manifest import ExportedModel

Runner = Callable[[np.ndarray], np.ndarray]  # float32 NCHW batch -> float32 logits


@dataclass(frozen=True)
class ModelFormat:
    kind: str  # manifest key of the artifact, and the backend's name
    file: str  # file name inside an exported folder
    load: Callable[[Path, int], Runner]  # (file, intra-op threads) -> Runner
    needs_torch: bool
    description: str


def onnx_runner(path: Path, threads: int | None = None, allow_cuda: bool = False) -> Runner:
    """An ONNX Runtime session as a function; threads set explicitly (intra-op = threads, default: the usable
    cores; inter-op = 1): ONNX Runtime ignores OMP_NUM_THREADS."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or usable_cores()
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
    return _torch_module_runner(module)


def exported_program_runner(path: Path, threads: int | None = None) -> Runner:
    """A torch.export program (.pt2) as a Runner (imports torch). It was exported in eval mode, and its
    module refuses .eval()."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    return _torch_module_runner(torch.export.load(str(path)).module())


def _torch_module_runner(module) -> Runner:  # type: ignore[no-untyped-def]
    import torch

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(batch)).float().numpy()

    return run


FORMATS: dict[str, ModelFormat] = {
    f.kind: f
    for f in (
        ModelFormat("onnx", "model.onnx", lambda p, t: onnx_runner(p, t, allow_cuda=True), False, "fp32 ONNX"),
        ModelFormat("onnx_int8", "model.int8.onnx", onnx_runner, False, "INT8 ONNX (static QDQ)"),
        ModelFormat("torchscript", "model.ts", torchscript_runner, True, "TorchScript (frozen trace)"),
        ModelFormat("torch_export", "model.pt2", exported_program_runner, True, "torch.export program"),
    )
}
BACKEND_CHOICES = ("auto", *FORMATS)  # what --backend / the service's `backend` setting accept
TORCH_FREE_BACKENDS = ("auto", *(kind for kind, f in FORMATS.items() if not f.needs_torch))


def resolve_backend(model: ExportedModel, backend: str = "auto") -> str:
    """`auto` is the INT8 ONNX model when the bundle has one whose export gate passed (accuracy within the
    gate's limit of fp32), else the fp32 ONNX model; any other name is checked and returned."""
    if backend == "auto":
        gate = model.manifest.get("parity", {}).get("onnx_int8", {})
        return "onnx_int8" if "onnx_int8" in model.manifest["artifacts"] and gate.get("passed") is True else "onnx"
    if backend not in FORMATS:
        raise ValueError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKEND_CHOICES)}")
    return backend


def load_backend(model: ExportedModel, backend: str = "auto", threads: int | None = None) -> Runner:
    """The model's `backend` artifact (see resolve_backend) as a Runner, on `threads` intra-op threads
    (default: the usable cores)."""
    kind = resolve_backend(model, backend)
    return FORMATS[kind].load(model.artifact_path(kind), threads or usable_cores())
