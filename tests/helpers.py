"""Helpers for the serving tests: `bentoml serve` as a real process group (benchmarks.served), test images."""

from __future__ import annotations

import io
from pathlib import Path

from benchmarks.served import REPO, ServedClassifier, free_port
from bundle.class_tree import first_per_class

__all__ = ["REPO", "ServedClassifier", "free_port", "image_bytes", "read_test_images"]


def read_test_images(archive: Path, per_class: int) -> list[tuple[str, str, bytes]]:
    """The first `per_class` test images of each class, straight from the tar: [(member name, class, bytes)]."""
    return [
        (f.name.removeprefix(f"{archive}:"), f.label, f.read()) for f in first_per_class(archive, "test", per_class)
    ]


def image_bytes(image, fmt: str, **params) -> bytes:
    """A Pillow image saved to bytes in format `fmt`."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()
