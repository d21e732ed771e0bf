"""Parity gates: compare an exported artifact with the eager model, batch size by batch size."""

from __future__ import annotations

import numpy as np
import torch

from bundle.runtime import Runner

__all__ = ["ParityError", "check_parity", "measure_accuracy", "reference_outputs", "torch_runner"]


class ParityError(RuntimeError):
    """An artifact's outputs differ from the eager model's beyond the tolerance."""


def _module_runner(module: torch.nn.Module) -> Runner:
    @torch.no_grad()
    def run(batch: np.ndarray) -> np.ndarray:
        return module(torch.from_numpy(batch)).float().numpy()

    return run


def torch_runner(module: torch.nn.Module) -> Runner:
    module.eval()
    return _module_runner(module)


def _batched(runner: Runner, images: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([runner(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def reference_outputs(reference: Runner, images: np.ndarray, batch_sizes: tuple[int, ...]) -> dict[int, np.ndarray]:
    """The eager model's logits at every batch size (kernels may differ slightly between sizes)."""
    return {b: _batched(reference, images, b) for b in batch_sizes}


def check_parity(
    name: str,
    expected_by_batch: dict[int, np.ndarray],
    candidate: Runner,
    images: np.ndarray,
    *,
    rtol: float,
    atol: float,
) -> dict:
    """Run `candidate` on `images` at every batch size of `expected_by_batch`; raise ParityError
    unless all logits satisfy |candidate - reference| <= atol + rtol * |reference| and every
    top-1 label agrees."""
    results = {}
    for batch_size, expected in expected_by_batch.items():
        got = _batched(candidate, images, batch_size)
        if got.shape != expected.shape:
            raise ParityError(f"{name}: batch size {batch_size}: output shape {got.shape}, expected {expected.shape}")
        diff = np.abs(got - expected)
        excess = diff - (atol + rtol * np.abs(expected))
        agreement = float((got.argmax(1) == expected.argmax(1)).mean())
        results[str(batch_size)] = {
            "max_abs_diff": float(diff.max()),
            "worst_excess_over_tolerance": float(excess.max()),
            "top1_agreement": agreement,
            "images": len(images),
        }
        if excess.max() > 0 or not np.isfinite(got).all():
            i = np.unravel_index(np.nanargmax(excess), excess.shape)
            raise ParityError(
                f"{name}: batch size {batch_size}: logits differ by up to {diff.max():.3g} (image {i[0]}, class {i[1]}: "
                f"{got[i]:.6g} vs {expected[i]:.6g}), beyond atol {atol:g} + rtol {rtol:g} x |reference|"
            )
        if agreement < 1.0:
            raise ParityError(
                f"{name}: batch size {batch_size}: top-1 labels agree on only {100 * agreement:.2f}% of images"
            )
    return {"rtol": rtol, "atol": atol, "batch_sizes": results, "passed": True}


def measure_accuracy(runner: Runner, images: np.ndarray, labels: np.ndarray, batch_size: int = 256) -> float:
    return float((_batched(runner, images, batch_size).argmax(1) == labels).mean())
