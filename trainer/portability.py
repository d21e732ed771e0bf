"""Does an exported ONNX file run the same in the runtimes users load it in? OpenVINO (in f32) and OpenCV DNN,
beside ONNX Runtime, on the exporter's parity images.

Each runtime runs in a child process: a runtime that crashes on a file (OpenCV 4.12 and 5.x segfaulted in
`readNetFromONNX` on the opset-18 bundle) is reported as refused and the export goes on. A runtime that is not
installed is reported as not checked, never as passed. A file that loads is compared with ONNX Runtime's
logits of the same file on the same images: every logit within the bound stated for its kind of file (fp32 or
INT8), else the check failed. Top-1 agreement is recorded too; within the bound, labels can differ only where
ONNX Runtime's two best logits are closer than twice the bound (near ties, common in a weakly trained model).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import multiprocessing
import queue
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bundle.runtime import Runner

CHILD_TIMEOUT_S = 300  # load + run 1,000 images; OpenVINO compiles in about a second here


@dataclass(frozen=True)
class Tolerance:
    """How close another runtime must come to ONNX Runtime on the same file: every logit within this."""

    max_abs_logit_diff: float


# fp32: every runtime computes in f32; measured max |diff| 1e-5 here (OpenVINO f32, OpenCV 5.1) on logits of
# magnitude ~5, so 1e-3 leaves a margin of 100x while a wrong layout or a lost normalisation differs by >1.
# INT8: runtimes round and accumulate quantised values their own way: up to 0.25 apart on the earlier bundle
# (OpenVINO, 99.5% of labels equal; issue 20), hence 0.5.
TOLERANCES = {"fp32": Tolerance(1e-3), "int8": Tolerance(0.5)}


@dataclass(frozen=True)
class ForeignRuntime:
    """A runtime to check: its manifest key, the module that must import, its distribution names (for the
    version), and how to load a file into a Runner (called in the child process)."""

    name: str
    module: str
    distributions: tuple[str, ...]
    load: Callable[[Path], Runner]


def _openvino(path: Path) -> Runner:
    import openvino

    # f32: OpenVINO's CPU plugin otherwise runs bf16 where the CPU has it (99.3% top-1 agreement, issue 20).
    compiled = openvino.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return lambda batch: np.asarray(compiled(batch)[0])


def _opencv(path: Path) -> Runner:
    import cv2

    net = cv2.dnn.readNetFromONNX(str(path))

    def run(batch: np.ndarray) -> np.ndarray:
        net.setInput(batch)
        return np.asarray(net.forward())

    return run


RUNTIMES = (
    ForeignRuntime("openvino", "openvino", ("openvino",), _openvino),
    ForeignRuntime("opencv", "cv2", ("opencv-python-headless", "opencv-python", "opencv-contrib-python"), _opencv),
)


def check_portability(
    path: Path, images: np.ndarray, reference: np.ndarray, kind: str, runtimes: tuple[ForeignRuntime, ...] = RUNTIMES
) -> dict[str, dict]:
    """{runtime: result} for one ONNX file: `reference` is ONNX Runtime's logits for `images`; `kind` (fp32 or
    int8) chooses the tolerance. Each result has a `status`: passed, failed, refused or not checked."""
    return {runtime.name: judge(runtime, _run_isolated(runtime, path, images), reference, kind) for runtime in runtimes}


def judge(runtime: ForeignRuntime, outcome: np.ndarray | str | None, reference: np.ndarray, kind: str) -> dict:
    """One runtime's result: `outcome` is its logits, an error message (refused) or None (not installed)."""
    if outcome is None:
        return {"status": "not checked", "why": f"{runtime.module} is not installed"}
    version = _version(runtime)
    if isinstance(outcome, str):
        return {"status": "refused", "version": version, "error": outcome}
    tolerance = TOLERANCES[kind]
    if outcome.shape != reference.shape:
        return {
            "status": "failed",
            "version": version,
            "error": f"output shape {outcome.shape}, expected {reference.shape}",
        }
    diff = float(np.abs(outcome - reference).max())
    return {
        "status": "passed" if diff <= tolerance.max_abs_logit_diff else "failed",
        "version": version,
        "top1_agreement": float((outcome.argmax(1) == reference.argmax(1)).mean()),
        "max_abs_logit_diff": diff,
        "images": len(reference),
        "tolerance": asdict(tolerance),
    }


def _version(runtime: ForeignRuntime) -> str | None:
    for distribution in runtime.distributions:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _run_isolated(runtime: ForeignRuntime, path: Path, images: np.ndarray) -> np.ndarray | str | None:
    """The runtime's logits for `images` (batches of 50), computed in a child process; an error message when it
    refuses or crashes; None when it is not installed."""
    if importlib.util.find_spec(runtime.module) is None:
        return None
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch or thread state inherited
    answers = context.Queue()
    child = context.Process(target=_child, args=(runtime, path, images, answers), daemon=True)
    child.start()
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while True:
        try:
            kind, value = answers.get(timeout=1)
            break
        except queue.Empty:
            if child.is_alive() and time.monotonic() < deadline:
                continue
            child.kill()
            child.join()
            reason = f"timed out after {CHILD_TIMEOUT_S} s" if child.exitcode in (None, -9) else "crashed"
            return f"{runtime.name} {reason} (exit code {child.exitcode}) while loading or running {path.name}"
    child.join()
    return value if kind == "logits" else f"{runtime.name} refused {path.name}: {value}"


def _child(runtime: ForeignRuntime, path: Path, images: np.ndarray, answers) -> None:  # type: ignore[no-untyped-def]
    try:
        run = runtime.load(path)
        logits = np.concatenate([run(images[i : i + 50]) for i in range(0, len(images), 50)])
        answers.put(("logits", logits.astype(np.float32)))
    except Exception as err:  # every runtime words its refusals in its own exception types
        answers.put(("error", f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"))
