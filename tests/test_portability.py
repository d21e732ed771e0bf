"""The portability check (trainer/portability.py): other runtimes than ONNX Runtime, each in a child process.

A runtime whose answers differ from ONNX Runtime's beyond the tolerance fails; one that raises or crashes on a
file is reported as refused (and the checker goes on); one that is not installed is not checked, never passed;
the real OpenVINO and OpenCV pass a small real model. The runtimes below are defined at module level because
the child process imports them. Run: `pytest tests/test_portability.py`.
"""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bundle.runtime import onnx_runner
from trainer.export import export_onnx
from trainer.portability import RUNTIMES, ForeignRuntime, check_portability
from trainer.wrappers import NormalizedModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _ort(path: Path):  # type: ignore[no-untyped-def]
    return onnx_runner(path, threads=1)


def _ort_nudged(path: Path):  # type: ignore[no-untyped-def]
    """ONNX Runtime, but every logit moved by 0.01: a runtime that disagrees a little."""
    run = onnx_runner(path, threads=1)
    return lambda batch: run(batch) + np.float32(0.01)


def _refuses(path: Path):  # type: ignore[no-untyped-def]
    raise RuntimeError(f"cannot parse {path.name}: unsupported operator Gelu")


def _crashes(path: Path):  # type: ignore[no-untyped-def]
    ctypes.string_at(0)  # reads address 0: the child dies of SIGSEGV, as OpenCV did on opset-18 GELU


SAME = ForeignRuntime("same", "numpy", ("numpy",), _ort)
NUDGED = ForeignRuntime("nudged", "numpy", ("numpy",), _ort_nudged)
REFUSING = ForeignRuntime("refusing", "numpy", ("numpy",), _refuses)
CRASHING = ForeignRuntime("crashing", "numpy", ("numpy",), _crashes)
ABSENT = ForeignRuntime("absent", "no_such_runtime_module", ("no-such-runtime",), _ort)


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.GELU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )
    path = tmp_path_factory.mktemp("portability") / "model.onnx"
    export_onnx(NormalizedModel(net, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]).eval(), path)
    return path


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).random((60, 3, 32, 32), dtype=np.float32)


def test_the_same_answers_pass_and_a_small_disagreement_fails(onnx_file: Path, images: np.ndarray) -> None:
    reference = _ort(onnx_file)(images)
    results = check_portability(onnx_file, images, reference, "fp32", runtimes=(SAME, NUDGED))
    assert results["same"]["status"] == "passed" and results["same"]["max_abs_logit_diff"] == 0
    nudged = results["nudged"]
    assert nudged["status"] == "failed" and nudged["max_abs_logit_diff"] == pytest.approx(0.01, rel=1e-3), nudged
    assert nudged["top1_agreement"] == 1.0  # the labels agree: the logit bound alone fails it
    # INT8's looser bound accepts the same nudge
    assert check_portability(onnx_file, images, reference, "int8", runtimes=(NUDGED,))["nudged"]["status"] == "passed"


def test_a_runtime_that_raises_or_crashes_is_reported_as_refused(onnx_file: Path, images: np.ndarray) -> None:
    reference = _ort(onnx_file)(images)
    results = check_portability(onnx_file, images, reference, "fp32", runtimes=(REFUSING, CRASHING, SAME))
    assert results["refusing"] == {
        "status": "refused",
        "version": results["refusing"]["version"],
        "error": "refusing refused model.onnx: RuntimeError: cannot parse model.onnx: unsupported operator Gelu",
    }
    assert results["crashing"]["status"] == "refused" and "crashed (exit code -11)" in results["crashing"]["error"]
    assert results["same"]["status"] == "passed"  # the checker went on after the crash


def test_a_runtime_that_is_not_installed_is_not_checked(onnx_file: Path, images: np.ndarray) -> None:
    results = check_portability(onnx_file, images, _ort(onnx_file)(images), "fp32", runtimes=(ABSENT,))
    assert results == {"absent": {"status": "not checked", "why": "no_such_runtime_module is not installed"}}


@pytest.mark.parametrize("runtime", RUNTIMES, ids=[r.name for r in RUNTIMES])
def test_the_real_runtimes_pass_a_small_model(runtime: ForeignRuntime, onnx_file: Path, images: np.ndarray) -> None:
    if importlib.util.find_spec(runtime.module) is None:
        pytest.skip(f"{runtime.module} is not installed")
    (result,) = check_portability(onnx_file, images, _ort(onnx_file)(images), "fp32", runtimes=(runtime,)).values()
    assert result["status"] == "passed" and result["version"], result
    assert result["max_abs_logit_diff"] < 1e-4 and result["images"] == len(images)


def _swapped(path: Path):  # type: ignore[no-untyped-def]
    """ONNX Runtime, but the two best classes of the very first image swapped (their logits exchanged)."""
    run, calls = onnx_runner(path, threads=1), []

    def run_swapped(batch: np.ndarray) -> np.ndarray:
        logits = run(batch)
        if not calls:  # the checker runs batches of 50: only the first batch's first image
            first, second = np.argsort(logits[0])[-1], np.argsort(logits[0])[-2]
            logits[0, [first, second]] = logits[0, [second, first]]
        calls.append(len(batch))
        return logits

    return run_swapped


SWAPPED = ForeignRuntime("swapped", "numpy", ("numpy",), _swapped)


def test_labels_may_swap_only_between_near_ties_within_the_bound(onnx_file: Path, images: np.ndarray) -> None:
    """The check bounds logits, not labels: two classes closer than the bound may swap (a near tie, common in
    a weakly trained model), a swap beyond it fails."""
    reference = _ort(onnx_file)(images)
    margin = float(np.diff(np.sort(reference[0])[-2:])[0])  # the swap moves each of the two logits by this
    (tolerant,) = judge_with_bound(onnx_file, images, reference, margin * 1.01).values()
    assert tolerant["status"] == "passed" and tolerant["top1_agreement"] == 1 - 1 / len(images), tolerant
    (strict,) = judge_with_bound(onnx_file, images, reference, margin * 0.99).values()
    assert strict["status"] == "failed" and strict["max_abs_logit_diff"] == pytest.approx(margin, rel=1e-5)


def judge_with_bound(onnx_file: Path, images: np.ndarray, reference: np.ndarray, bound: float) -> dict:
    import trainer.portability as portability

    saved = portability.TOLERANCES["fp32"]
    portability.TOLERANCES["fp32"] = portability.Tolerance(bound)
    try:
        return check_portability(onnx_file, images, reference, "fp32", runtimes=(SWAPPED,))
    finally:
        portability.TOLERANCES["fp32"] = saved
