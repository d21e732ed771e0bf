"""Smoke runs of the benchmarks that CI can afford: each runs end to end at toy size (no timing assertions).

The load benchmark starts the service and its three peers (benchmarks/peer_*.py: hand-written FastAPI, BentoML
as its examples write it, LitServe) and drives them in turn with the same load; here for one second per level.
Each peer must answer the same JPEGs with the service's labels and probabilities. Run:
`pytest tests/test_benchmarks.py`.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import read_test_images, run_module

from benchmarks.served import ServedPeer
from bundle.manifest import load_model_dir
from bundle.preprocess import decode_image, pixels_to_input, softmax
from bundle.runtime import load_backend

pytestmark = pytest.mark.slow


def test_load_benchmark_runs_the_service_and_every_peer_side_by_side(shared_archive: Path, tmp_path: Path) -> None:
    out, plot = tmp_path / "load.json", tmp_path / "load.png"
    result = run_module(
        "benchmarks.load_test", "--data", str(shared_archive), "--levels", "1", "4", "--duration", "1",
        "--warmup", "0.5", "--rounds", "1", "--ort-seconds", "0.1", "--ort-batch-sizes", "1", "8", "--raw-body",
        "--out", str(out), "--plot", str(plot), timeout=600,
    )  # fmt: skip
    report = json.loads(out.read_text())
    kinds = [(run["kind"], run["raw"], run.get("peer")) for run in report["runs"]]
    assert kinds == [
        ("service", False, None), ("service", True, None),
        ("peer", False, "fastapi"), ("peer", False, "bentoml"), ("peer", False, "litserve"),
    ], kinds  # fmt: skip
    for run in report["runs"]:
        assert [level["concurrency"] for level in run["levels"]] == [1, 4]
        assert all(level["ok"] > 0 and not level["errors"] for level in run["levels"]), (run["label"], run["levels"])
        server_library = "bentoml" if run["kind"] == "service" else run["peer"]
        assert run["versions"][server_library] and run["versions"]["onnxruntime"], run["versions"]
    comparison = report["comparison"]
    assert len(comparison) == 2 * 3 * 2, comparison  # (multipart, raw body) x peers x levels
    assert {row["peer_name"] for row in comparison} == {"fastapi", "bentoml", "litserve"}
    assert all(row["requests_per_s_ratio"] > 0 and row["p99_ratio"] > 0 for row in comparison), comparison
    assert f"machine: {report['environment']['cpu']}" in result.stdout and "service / peer" in result.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("peer", ["fastapi", "bentoml", "litserve"])
def test_peer_answers_like_the_service(peer: str, default_model: Path, shared_archive: Path, tmp_path: Path) -> None:
    """A peer is a fair comparison only if it does the same work: same answer shape, same probabilities as the
    service's pipeline, each image's answer in its place. Three requests of 2, 1 and 3 images (six classes) are
    sent at once, so that the batching peers gather them into one batch and must split the answers back."""
    images = [data for _, _, data in read_test_images(shared_archive, per_class=1)[:6]]
    requests = [[0, 1], [2], [3, 4, 5]]  # indices into images
    log_path = tmp_path / "peer.log"
    # LitServe waits 50 ms for a batch to fill (the other peers batch what is queued, or not at all).
    with ServedPeer(default_model, workers=1, threads=1, log_path=log_path, name=peer, batch_timeout_ms=50) as server:
        server.wait_ready()

        def post(indices: list[int]) -> httpx.Response:
            files = [("images", (f"{i}.jpg", images[i], "image/jpeg")) for i in indices]
            return httpx.post(f"{server.url}/classify", files=files, data={"k": "10"}, timeout=30)

        with ThreadPoolExecutor(len(requests)) as pool:
            responses = list(pool.map(post, requests))
    model = load_model_dir(default_model)
    run = load_backend(model, "auto", threads=1)  # the service's default backend, its decoding and preprocessing
    expected = softmax(
        run(pixels_to_input(np.stack([decode_image(d, model.contract) for d in images]), model.contract))
    )
    # BentoML's idiomatic API cannot carry k nor the file name (benchmarks/peer_bentoml.py): top 3, no "file".
    k = 3 if peer == "bentoml" else 10
    for indices, response in zip(requests, responses, strict=True):
        assert response.status_code == 200, response.text
        answers = response.json()
        assert len(answers) == len(indices), answers
        for i, answer in zip(indices, answers, strict=True):
            assert answer["model"] == model.name and answer.get("file") == (None if peer == "bentoml" else f"{i}.jpg")
            order = np.argsort(-expected[i], kind="stable")[:k]
            assert [p["label"] for p in answer["predictions"]] == [model.class_names[j] for j in order], (i, answer)
            got = np.array([p["probability"] for p in answer["predictions"]])
            assert np.abs(got - expected[i][order]).max() < 1e-5, (i, got, expected[i][order])


def test_train_targets_runs_every_recipe_and_reuses_finished_runs(shared_archive: Path, tmp_path: Path) -> None:
    """Toy size: one seed per recipe on 256 training images, a budget run, the curve and plot; then the same
    --tag again reuses every finished run (and its measured wall time) instead of training again."""
    out, plot = tmp_path / "targets.json", tmp_path / "targets.png"
    args = [
        "--data", str(shared_archive), "--seeds", "0", "--budgets", "30", "--tag", "smoke",
        "--extra", "--train-subset 256 --batch-size 128 --epochs 2 --tta 0", "--runs-dir", str(tmp_path / "runs"),
        "--out", str(out), "--plot", str(plot),
    ]  # fmt: skip
    run_module("benchmarks.train_targets", *args, timeout=900)
    first = json.loads(out.read_text())
    (default,), (old,) = first["default"]["runs"], first["old_recipe"]["runs"]
    assert [p["epoch"] for p in default["curve"]] == [1, 2] and len(old["curve"]) == old["epochs"] == 5
    for run in (default, old):  # the curve's last point is the finished run's own report
        assert run["curve"][-1]["test_accuracy"] == pytest.approx(run["test_accuracy"], abs=1e-6)
        assert run["curve"][-1]["wall_s"] <= run["process_wall_s"]
    (budget,) = first["budgets"]
    assert budget["budget_s"] == 30 and budget["curve"] == []
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = run_module("benchmarks.train_targets", *args, timeout=900)
    assert again.stdout.count("reused") == 3, again.stdout
    second = json.loads(out.read_text())
    assert second["default"]["runs"][0]["process_wall_s"] == default["process_wall_s"]
    assert second["budgets"][0]["epochs"] == budget["epochs"]


def test_int8_calibration_judges_variants_on_the_validation_split_only(
    exported_model: Path, default_model: Path, shared_archive: Path, tmp_path: Path
) -> None:
    """Each variant is scored on the run's validation images (the manifest's --val-size), against the fp32 file;
    a model trained without a validation split is refused (no choosing on test images)."""
    out = tmp_path / "int8.json"
    args = ["--variants", "stem-int8", "stem-float", "--out", str(out)]
    run_module("benchmarks.int8_calibration", str(exported_model), *args, timeout=900)
    result = json.loads(out.read_text())
    manifest = json.loads((exported_model / "manifest.json").read_text())
    assert result["validation_images"] == manifest["training"]["config"]["val_size"] > 0
    assert [row["variant"] for row in result["variants"]] == ["stem-int8", "stem-float"]
    for row in result["variants"]:
        assert row["drop_points"] == pytest.approx(100 * (result["fp32_accuracy"] - row["accuracy"]))
        assert 0.5 < row["agreement"] <= 1 and row["calibration_images"] == 512
    refused = run_module("benchmarks.int8_calibration", str(default_model), "--out", str(out), check=False)
    assert refused.returncode == 2 and "without a validation split" in refused.stderr, refused.stderr[-2000:]
