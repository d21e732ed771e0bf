"""An exported model on disk: its manifest, checksum verification, and an inference backend.

Everything the service and the offline predictor know about a model (class
names, input contract, accuracy) comes from `manifest.json`; nothing here
imports the trainer. Only the TorchScript backend imports torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MANIFEST_NAME = "manifest.json"
SUPPORTED_MANIFEST_FORMAT = 1
BACKENDS = {"onnx": "onnx", "onnx_int8": "onnx_int8", "torchscript": "torchscript"}  # backend -> artifact kind
MODEL_ENV = "CLASSIFIER_MODEL"


class ModelError(RuntimeError):
    """The model folder is missing, unreadable, inconsistent or tampered with."""


def default_model_dir() -> Path:
    """$CLASSIFIER_MODEL, else exported_models/default in the working directory or beside this package."""
    if os.environ.get(MODEL_ENV):
        return Path(os.environ[MODEL_ENV])
    for root in (Path.cwd(), Path(__file__).resolve().parent.parent):
        if (root / "exported_models" / "default" / MANIFEST_NAME).is_file():
            return root / "exported_models" / "default"
    return Path("exported_models") / "default"


@dataclass(frozen=True)
class ExportedModel:
    folder: Path
    manifest: dict

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def class_names(self) -> list[str]:
        return self.manifest["class_names"]

    @property
    def contract(self) -> dict:
        return self.manifest["input"]

    def artifact_path(self, kind: str) -> Path:
        artifacts = self.manifest["artifacts"]
        if kind not in artifacts:
            raise ModelError(f"model {str(self.folder)!r} has no {kind!r} artifact; it has: {', '.join(artifacts)}")
        return self.folder / artifacts[kind]["file"]


def load_model_dir(folder: str | Path | None = None) -> ExportedModel:
    """Read and sanity-check the manifest of an exported model folder."""
    folder = Path(folder) if folder else default_model_dir()
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ModelError(f"no {MANIFEST_NAME} in {str(folder)!r}: pass a folder written by `python -m trainer.export`")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"cannot read {str(manifest_path)!r}: {err}") from err
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != SUPPORTED_MANIFEST_FORMAT:
        raise ModelError(
            f"{str(manifest_path)!r} has format_version {version!r}; this version reads {SUPPORTED_MANIFEST_FORMAT}"
        )
    missing = {"name", "class_names", "input", "artifacts"} - manifest.keys()
    if missing:
        raise ModelError(f"{str(manifest_path)!r} lacks {sorted(missing)}")
    return ExportedModel(folder, manifest)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_checksums(model: ExportedModel, kinds: list[str] | None = None) -> None:
    """Raise ModelError unless every (or each listed) artifact matches its manifest sha256 and size."""
    for kind, entry in model.manifest["artifacts"].items():
        if kinds is not None and kind not in kinds:
            continue
        path = model.folder / entry["file"]
        if not path.is_file():
            raise ModelError(f"model file {str(path)!r} listed in the manifest is missing")
        actual = sha256_of(path)
        if actual != entry["sha256"] or path.stat().st_size != entry["bytes"]:
            raise ModelError(
                f"model file {str(path)!r} does not match its manifest: sha256 {actual} "
                f"(expected {entry['sha256']}); the file was modified or corrupted — re-export the model"
            )


def load_backend(
    model: ExportedModel, backend: str = "onnx", threads: int | None = None
) -> Callable[[np.ndarray], np.ndarray]:
    """A function from a contract-shaped float32 batch to float32 logits."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    path = model.artifact_path(BACKENDS[backend])
    threads = threads or os.cpu_count() or 1
    if backend == "torchscript":
        return _torchscript_backend(path, threads)
    return onnx_runner(path, threads, allow_cuda=backend == "onnx")


def onnx_runner(path: Path, threads: int | None = None, allow_cuda: bool = False) -> Callable[[np.ndarray], np.ndarray]:
    """An ONNX Runtime session as a function; threads set explicitly (intra-op = threads, inter-op = 1)."""
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


def _torchscript_backend(path: Path, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    import warnings

    import torch  # only this backend needs torch

    torch.set_num_threads(threads)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..*deprecated.*", category=FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu").eval()

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(batch)).float().numpy()

    return run
