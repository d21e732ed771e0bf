"""Shared fixtures: the shared CIFAR-10 copy, one short real training run, and its export.

The data set is read from $CIFAR10_DATA or ../shared/datasets/cifar10-jpeg.tar.gz
beside the repository; tests that need it are skipped (with the reason) when
it is missing. Device: $TEST_DEVICE (default cpu).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import REPO, TEST_DEVICE, run_module

from bundle.class_tree import DATA_ENV, data_source

SHARED_ARCHIVE = data_source()
DEFAULT_MODEL = REPO / "exported_models" / "default"


@pytest.fixture(scope="session")
def shared_archive() -> Path:
    if not SHARED_ARCHIVE.is_file():
        pytest.skip(f"shared CIFAR-10 copy not found at {SHARED_ARCHIVE} (set {DATA_ENV})")
    return SHARED_ARCHIVE


@pytest.fixture(scope="session")
def trained_run(shared_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (short) ResNet-20 run on 10,000 training images: a few minutes on 2 idle cores."""
    out = tmp_path_factory.mktemp("runs") / "resnet20"
    run_module(
        "trainer.fit", "--data", str(shared_archive), "--model", "resnet20", "--train-subset", "10000",
        "--val-size", "1000", "--epochs", "4", "--batch-size", "128", "--lr", "0.2", "--tta", "1",
        "--device", TEST_DEVICE, "--out", str(out), timeout=1800,  # generous: CI machines are shared
    )  # fmt: skip
    return out


@pytest.fixture(scope="session")
def exported_model(trained_run: Path, shared_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The short run exported with every artifact (fp32 ONNX, TorchScript, INT8, pt2)."""
    out = tmp_path_factory.mktemp("exported") / "resnet20-test"
    run_module(
        "trainer.export", str(trained_run), "--out", str(out), "--data", str(shared_archive), "--pt2",
        "--parity-images", "300", timeout=1800,
    )  # fmt: skip
    return out


@pytest.fixture(scope="session")
def default_model() -> Path:
    if not (DEFAULT_MODEL / "manifest.json").is_file():
        pytest.fail(f"the bundled default model is missing from {DEFAULT_MODEL}")
    return DEFAULT_MODEL


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """In-process torch work on one thread: on two shared cores, OpenMP spinning makes two threads slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def _isolated_bentoml_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ.setdefault("BENTOML_HOME", str(tmp_path_factory.mktemp("bentoml-home")))
    os.environ["BENTOML_DO_NOT_TRACK"] = "1"
