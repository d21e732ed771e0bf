"""Smoke runs of the benchmarks that CI can afford: each runs end to end at toy size (no timing assertions).

The load benchmark starts the service and the hand-written FastAPI peer (benchmarks/peer_fastapi.py) in turn
and drives both with the same load; here for one second per level. Run: `pytest tests/test_benchmarks.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from conftest import run_module
from helpers import read_test_images

from benchmarks.served import ServedPeer
from bundle.manifest import load_model_dir
from bundle.runtime import load_backend
from serving.predict import predict_stream

pytestmark = pytest.mark.slow


def test_load_benchmark_runs_the_service_and_the_peer_side_by_side(shared_archive: Path, tmp_path: Path) -> None:
    out, plot = tmp_path / "load.json", tmp_path / "load.png"
    run_module(
        "benchmarks.load_test", "--data", str(shared_archive), "--levels", "1", "4", "--duration", "1",
        "--warmup", "0.5", "--rounds", "1", "--ort-seconds", "0.1", "--ort-batch-sizes", "1", "8", "--raw-body",
        "--out", str(out), "--plot", str(plot), timeout=600,
    )  # fmt: skip
    result = json.loads(out.read_text())
    kinds = [(run["kind"], run["raw"]) for run in result["runs"]]
    assert kinds == [("service", False), ("service", True), ("peer", False)], kinds
    for run in result["runs"]:
        assert [level["concurrency"] for level in run["levels"]] == [1, 4]
        assert all(level["ok"] > 0 and not level["errors"] for level in run["levels"]), run["levels"]
    assert len(result["comparison"]) == 4 and all(row["requests_per_s_ratio"] > 0 for row in result["comparison"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_peer_answers_like_the_service(default_model: Path, shared_archive: Path, tmp_path: Path) -> None:
    """The peer is a fair comparison only if it does the same work: same answer shape, same probabilities."""
    _, _, data = read_test_images(shared_archive, per_class=1)[0]
    with ServedPeer(default_model, workers=1, threads=1, log_path=tmp_path / "peer.log") as peer:
        peer.wait_ready()
        files = [("images", ("a.jpg", data, "image/jpeg"))]
        response = httpx.post(f"{peer.url}/classify", files=files, data={"k": "10"}, timeout=30)
    assert response.status_code == 200, response.text
    (answer,) = response.json()
    model = load_model_dir(default_model)
    ((_, expected, _),) = predict_stream(model, load_backend(model, "auto", threads=1), [("a.jpg", data)], 1, 1)
    got = {p["label"]: p["probability"] for p in answer["predictions"]}
    assert answer["file"] == "a.jpg" and answer["predictions"][0]["label"] == model.class_names[expected.argmax()]
    assert max(abs(got[name] - expected[i]) for i, name in enumerate(model.class_names)) < 1e-5


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
