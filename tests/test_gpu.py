"""What only a GPU proves about the CUDA training path (skipped without CUDA; `pytest -m gpu` selects these).

A short real run in each autocast precision (bf16; fp16 with its GradScaler, which only CUDA uses): its report
says where and how it trained, and its weights-only model.pt and full checkpoint.pt load on the CPU. The rest
is proven elsewhere: the export runs on the CPU (test_export.py), a CUDA checkpoint resumes on a CPU
(test_training.py), and benchmarks.gpu_run's bundle step loads a GPU-trained model where CUDA is hidden.
benchmarks.gpu_run runs this file last, in about 30 s; by hand, on the GPU machine:
`PYTHONPATH=. python3 -m pytest -m gpu tests/test_gpu.py` (this file only: the serving tests import bentoml,
which the GPU machine lacks).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import run_module

from trainer.checkpoint import load_training_checkpoint
from trainer.models import build_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
PRECISIONS = ("bf16", "fp16")


@pytest.fixture(scope="module")
def cuda_runs(shared_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 2-epoch fast_resnet run on 4,096 images on the GPU in each autocast precision: {precision: run folder}."""
    runs = {}
    for precision in PRECISIONS:
        runs[precision] = tmp_path_factory.mktemp("cuda") / precision
        run_module(
            "trainer.fit", "--data", str(shared_archive), "--model", "fast_resnet", "--train-subset", "4096",
            "--val-size", "1000", "--epochs", "2", "--batch-size", "256", "--device", "cuda", "--precision",
            precision, "--tta", "1", "--seed", "0", "--out", str(runs[precision]), timeout=300,
        )  # fmt: skip
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

    checkpoint = load_training_checkpoint(run)  # onto the CPU, whatever device saved it
    assert checkpoint.config["device"] == "cuda" and checkpoint.finished
    assert all(t.device.type == "cpu" for t in checkpoint.model.values())
