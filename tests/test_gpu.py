"""The CUDA training path, end to end (skipped without a CUDA device; `pytest -m gpu` selects these).

For bf16 and fp16 autocast: a short real run on the GPU whose report says where and how it trained; its
weights-only model.pt loads on a machine without CUDA (tensors saved on the CPU); its full checkpoint.pt
loads onto the CPU. The bf16 run's model.pt goes through the exporter (which runs on the CPU): ONNX and
TorchScript pass the parity gates against the eager model rebuilt from model.pt (INT8 is CPU-only code,
tested in test_export.py). A CUDA run killed mid-way finishes on the CPU.
Run on the GPU machine: `CIFAR10_JPEG=.data/cifar10-jpeg.tar.gz PYTHONPATH=. python3 -m pytest -m gpu tests/test_gpu.py`
(collect only this file there: the serving tests import bentoml, which the GPU machine lacks). About 2 minutes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_module

from trainer.checkpoint import load_training_checkpoint
from trainer.models import build_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _fit_args(data: Path, out: Path, precision: str, epochs: int, tta: int = 2) -> list[str]:
    return [
        "--data", str(data), "--model", "fast_resnet", "--train-subset", "4096", "--val-size", "1000",
        "--epochs", str(epochs), "--batch-size", "256", "--device", "cuda", "--precision", precision,
        "--tta", str(tta), "--seed", "0", "--out", str(out),
    ]  # fmt: skip


PRECISIONS = ("bf16", "fp16")


@pytest.fixture(scope="module")
def cuda_runs(shared_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 2-epoch fast_resnet run on the GPU in each autocast precision: {precision: run folder}."""
    runs = {}
    for precision in PRECISIONS:
        runs[precision] = tmp_path_factory.mktemp("cuda") / precision
        run_module("trainer.fit", *_fit_args(shared_archive, runs[precision], precision, epochs=2), timeout=900)
    return runs


@pytest.mark.parametrize("precision", PRECISIONS)
def test_cuda_run_reports_its_device_and_reloads_on_cpu(precision: str, cuda_runs: dict[str, Path]) -> None:
    run = cuda_runs[precision]
    report = json.loads((run / "report.json").read_text())
    assert report["environment"]["device"].startswith("cuda") and report["environment"]["precision"] == precision
    assert report["environment"]["process_group"] is None  # a plain run joins no process group
    assert report["timing"]["train_s"] > 0 and report["timing"]["warmup_s"] > 0
    # fast_resnet on 4,096 images for 2 epochs reaches ~45% on CPU (fp32); chance is 10%, a broken run ~10-20%.
    assert report["test"]["accuracy"] > 0.3, report["test"]["accuracy"]

    slim = torch.load(run / "model.pt", weights_only=True)  # no map_location: must not need CUDA
    assert all(t.device.type == "cpu" for t in slim["weights"].values())
    build_model(slim["model_name"], slim["num_classes"]).load_state_dict(slim["weights"])
    assert (run / "model.pt").stat().st_size < (run / "checkpoint.pt").stat().st_size

    checkpoint = load_training_checkpoint(run)  # onto the CPU, whatever device saved it
    assert checkpoint.config["device"] == "cuda" and checkpoint.finished
    assert all(t.device.type == "cpu" for t in checkpoint.model.values())


def test_cuda_model_pt_exports_with_parity(cuda_runs: dict[str, Path], shared_archive: Path, tmp_path: Path) -> None:
    exported = tmp_path / "exported"
    run_module(
        "trainer.export", str(cuda_runs["bf16"] / "model.pt"), "--out", str(exported), "--data", str(shared_archive),
        "--no-int8", "--parity-images", "200", "--eval-images", "2000", timeout=900,
    )  # fmt: skip
    manifest = json.loads((exported / "manifest.json").read_text())
    assert manifest["parity"]["onnx"]["passed"] and manifest["parity"]["torchscript"]["passed"]
    assert manifest["training"]["checkpoint_file"] == "model.pt"


def test_cuda_run_killed_mid_way_finishes_on_the_cpu(shared_archive: Path, tmp_path: Path) -> None:
    from trainer_helpers import FitProcess

    run = tmp_path / "moved"
    # TTA off: the resumed run's final evaluation runs on the CPU.
    fit = FitProcess(_fit_args(shared_archive, run, "bf16", epochs=10, tta=0), tmp_path / "gpu.log")
    fit.wait_for(lambda: (run / "checkpoint.pt").exists(), "the first checkpoint", timeout=600)
    fit.kill()
    saved = load_training_checkpoint(run)
    assert not saved.finished and saved.epoch < 10

    refused = run_module("trainer.fit", "--resume", str(run), check=False, env={"CUDA_VISIBLE_DEVICES": ""})
    assert refused.returncode == 2 and f"--resume {run} --device cpu" in refused.stderr
    result = run_module(
        "trainer.fit", "--resume", str(run), "--device", "cpu", "--precision", "fp32", timeout=3600,
        env={"CUDA_VISIBLE_DEVICES": ""},
    )  # fmt: skip
    report = json.loads((run / "report.json").read_text())
    assert report["environment"]["device"] == "cpu" and report["steps"] == saved.total_steps, result.stderr[-2000:]
