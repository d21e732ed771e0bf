"""The one-command GPU measurement (benchmarks.gpu_run), proven on the CPU: its dry run end to end, and its parts.

The dry run runs all six steps at toy size on the CPU (a real pytest, trainer.fit processes, torchrun with gloo,
airbench94's data and patched copy) and must write the same files a GPU run writes; about 2-3 minutes on 2
busy cores. The parts: the peer's patching and output parsing, its data files, the budget and run-time
estimates, the step machinery (skips, failures, timeouts that end a whole process group).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_module

from benchmarks import airbench_peer
from benchmarks.gpu_budget import Budget, CostModel, forward_gflops, resolve_config
from benchmarks.gpu_session import (
    FAILED,
    PASSED,
    SKIPPED,
    Deadline,
    Session,
    Step,
    StepFailed,
    run_command,
    setup_logging,
)
from trainer.models import build_model

PEER = REPO.parent / "shared" / "peers" / "airbench" / "airbench94.py"
STEP_NAMES = ["1_environment", "2_smoke", "3_versus_airbench94", "4_ceiling", "5_bundle", "6_nccl"]


@pytest.fixture(scope="module")
def peer() -> Path:
    if not PEER.is_file():
        pytest.skip(f"the airbench94 peer is not at {PEER}")
    return PEER


# ------------------------------------------------------------------ the dry run, end to end


@pytest.fixture(scope="module")
def dry_run(shared_archive: Path, peer: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("gpu-dry") / "out"
    result = run_module(
        "benchmarks.gpu_run", "--dry-run", "--out", str(out), "--data", str(shared_archive), "--peer", str(peer),
        timeout=900, env={"PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert "done in" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
    return out, json.loads((out / "gpu_results.json").read_text())


@pytest.mark.slow
def test_gpu_run_dry_run_passes_every_step_and_writes_the_gpu_files(dry_run: tuple[Path, dict]) -> None:
    out, results = dry_run
    assert list(results["steps"]) == STEP_NAMES
    assert {name: step["status"] for name, step in results["steps"].items()} == dict.fromkeys(STEP_NAMES, PASSED)
    for step in results["steps"].values():
        assert step["seconds"] > 0 and step["started_utc"]
    assert results["dry_run"] and results["finished_utc"] and results["inputs"]["data"]["sha256"]

    files = results["out_files"]
    assert files["within_limits"] and files["count"] <= 8, files
    on_disk = {p.name: p.stat().st_size for p in out.iterdir()}
    assert set(on_disk) == {"gpu_run.log", "gpu_results.json", "bundle_model.pt", "bundle_report.json"}
    assert all(size <= 16_000_000 for size in on_disk.values()), on_disk

    log = (out / "gpu_run.log").read_text()
    for number in range(1, 7):  # each step's start, then its end with its time
        start, end = log.find(f"=== step {number}: "), log.find(f"=== step {number}: passed in ")
        assert 0 <= start < end and re.match(r"=== step \d: passed in [\d.]+ s", log[end:]), number
    assert "3 skipped" in log or "skipped in" in log, "pytest -m gpu should run (and skip without CUDA)"


@pytest.mark.slow
def test_gpu_run_dry_run_records_each_step(dry_run: tuple[Path, dict]) -> None:
    out, results = dry_run
    steps = results["steps"]
    assert steps["1_environment"]["pytest"]["returncode"] == 0
    assert steps["2_smoke"]["load_on_cpu"]["cuda_visible"] is False and steps["2_smoke"]["load_on_cpu"]["finished"]

    peer = steps["3_versus_airbench94"]["airbench94"]
    assert peer["status"] == "not_run" and "CUDA" in peer["reason"]
    assert len(peer["prepared"]["changes"]) == 2 and peer["prepared"]["data"]["train"]["images"] == 1000
    project = steps["3_versus_airbench94"]["project"]
    assert project["train_s"]["n"] == results["plan"]["seeds"] == 2 and project["test_tta_pct"]["mean"] > 0
    assert results["summary"]["fast_vs_airbench94"]["measured"] is False

    bundle = steps["5_bundle"]
    assert [c["epochs"] for c in bundle["candidates"]] == [1.0, 2.0]
    assert all(c["val_pct"] is not None and c["val_images"] == 1000 for c in bundle["candidates"])
    assert bundle["chosen_epochs"] in (1.0, 2.0) and "validation" in bundle["chosen_by"]
    assert bundle["run"]["val_images"] == 0 and bundle["run"]["epochs"] == bundle["chosen_epochs"]
    summary = results["summary"]["bundle"]
    assert summary["onnx_within_16mb"] and summary["ceiling_test_pct"] == results["summary"]["ceiling"]["test_pct"]
    assert summary["target_met"] is None  # toy figures judge nothing
    slim = torch.load(out / "bundle_model.pt", weights_only=True)
    build_model(slim["model_name"], slim["num_classes"]).load_state_dict(slim["weights"])

    nccl = steps["6_nccl"]["run"]
    assert (nccl["process_group"], nccl["world_size"]) == ("gloo", 1)


def test_gpu_run_without_data_names_gpu_prepare(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_module(
        "benchmarks.gpu_run", "--dry-run", "--out", str(out), "--data", str(tmp_path / "missing.tar.gz"),
        check=False, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2 and "benchmarks/gpu_prepare.sh" in result.stdout, result.stdout[-2000:]
    results = json.loads((out / "gpu_results.json").read_text())
    assert "gpu_prepare.sh" in results["error"] and results["steps"]["1_environment"]["status"] == "pending"


def test_gpu_run_stopped_by_sigterm_ends_its_run_and_keeps_its_results(shared_archive: Path, tmp_path: Path) -> None:
    """A caller's timeout (SIGTERM) mid-step: the trainer it started is ended, the results say how far it got."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "benchmarks.gpu_run", "--dry-run", "--steps", "2", "--out", str(out),
               "--data", str(shared_archive), "--peer", str(PEER)]  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log, deadline = out / "gpu_run.log", time.monotonic() + 120
    while not (log.is_file() and (match := re.search(r"trainer\.fit .*\(pid (\d+),", log.read_text()))):
        assert process.poll() is None and time.monotonic() < deadline, "the smoke run never started"
        time.sleep(0.05)
    process.terminate()
    assert process.wait(60) == 128 + 15
    trainer = int(match[1])
    deadline = time.monotonic() + 30
    while _alive(trainer):
        assert time.monotonic() < deadline, "the trainer outlived the orchestrator"
        time.sleep(0.05)
    results = json.loads((out / "gpu_results.json").read_text())
    assert results["finished_utc"] and results["steps"]["2_smoke"]["status"] == "interrupted"
    assert results["steps"]["1_environment"]["status"] == "skipped"


def test_gpu_run_help_states_every_default() -> None:
    result = run_module("benchmarks.gpu_run", "--help", timeout=120)
    options = re.split(r"\n  (?=-)", result.stdout.split("\noptions:\n", 1)[1])
    for entry in options:
        flag = entry.split()[0]
        if flag not in ("-h,", "--out"):
            assert "default:" in " ".join(entry.split()), f"{flag} does not state its default"
    assert "gpu_prepare.sh" in result.stdout and "--dry-run" in result.stdout


# ------------------------------------------------------------------ the airbench94 peer


def _peer_row(run: str, epoch: str, acc: float | None, tta: float | None, seconds: float) -> str:
    """One row of airbench94's table, in its format ('|  cell  ' per column, cells right-justified)."""
    cells = [
        run.rjust(6),
        epoch.rjust(5),
        "2.1000".rjust(10),
        "0.5000".rjust(9),
        "" if acc is None else f"{acc:.4f}".rjust(7),
        "" if tta is None else f"{tta:.4f}".rjust(11),
        f"{seconds:.4f}".rjust(18),
    ]
    return "".join(f"|  {cell}  " for cell in cells) + "|"


PEER_HEADER = "".join(
    f"|  {c}  " for c in ["run   ", "epoch", "train_loss", "train_acc", "val_acc", "tta_val_acc", "total_time_seconds"]
)


def _peer_output(runs: dict[str, tuple[float, float, float]]) -> str:
    lines = ["-" * 40, PEER_HEADER + "|", "-" * 40]
    for run, (tta, train_s, total_s) in runs.items():
        lines.append(_peer_row(run, "0", 0.5, None, train_s / 2))
        lines.append(_peer_row("", "1", 0.9, None, train_s))
        lines.append("UserWarning: something printed in between")
        lines.append(_peer_row("", "eval", 0.9, tta, total_s))
        lines.append("-" * 40)
    return "\n".join(lines)


def test_peer_output_parsing_leaves_out_the_warmup_run() -> None:
    text = _peer_output({"warmup": (0.1, 9.0, 9.5), "0": (0.94, 3.0, 3.4), "1": (0.9350, 3.2, 3.6)})
    text += "\nMean: 0.9375    Std: 0.0035\n/tmp/logs/x/log.pt\n"
    parsed = airbench_peer.parse_output(text)
    assert [r["run"] for r in parsed["runs"]] == ["0", "1"]
    assert [r["tta_val_acc"] for r in parsed["runs"]] == [0.94, 0.935]
    assert [r["train_s"] for r in parsed["runs"]] == [3.0, 3.2] and [r["total_s"] for r in parsed["runs"]] == [3.4, 3.6]
    assert parsed["runs"][0]["epochs"] == 2
    assert (parsed["printed_mean"], parsed["printed_std"]) == (0.9375, 0.0035)


def test_peer_output_parsing_drops_a_run_cut_off_before_its_eval_row() -> None:
    text = _peer_output({"0": (0.94, 3.0, 3.4)}) + "\n" + _peer_row("1", "0", 0.5, None, 1.0)
    parsed = airbench_peer.parse_output(text)
    assert [r["run"] for r in parsed["runs"]] == ["0"] and parsed["printed_mean"] is None


def test_peer_patch_sets_the_run_count_and_its_warmup(peer: Path, tmp_path: Path) -> None:
    patched = airbench_peer.write_patched_script(peer, tmp_path, runs=5)
    text = Path(patched["script"]).read_text()
    assert "for run in range(5)" in text and "range(25)" not in text
    assert re.search(r"^\s*main\('warmup'\)", text, re.MULTILINE) and len(patched["changes"]) == 2
    with pytest.raises(ValueError, match="found 0"):
        airbench_peer.patch_source("print('no loop here')", runs=5)
    with pytest.raises(ValueError, match="found 2"):
        airbench_peer.patch_source("for run in range(25): pass\nfor run in range(25): pass\n", runs=5, warmup=False)


def test_peer_data_files_are_shuffled_hwc_uint8(shared_archive: Path, tmp_path: Path) -> None:
    written = airbench_peer.write_data(str(shared_archive), None, tmp_path, seed=0, limit=2000)
    train = torch.load(written["train"]["file"], weights_only=True)
    test = torch.load(written["test"]["file"], weights_only=True)
    assert train["images"].shape == (2000, 32, 32, 3) and train["images"].dtype == torch.uint8
    assert train["labels"].dtype == torch.int64 and len(train["classes"]) == 10
    # The class-folder copy decodes in class order; the peer whitens from its first images: all classes there.
    assert train["labels"][:500].unique().numel() == 10
    assert test["images"].shape == (2000, 32, 32, 3)


# ------------------------------------------------------------------ budget and estimates


def test_cost_model_fits_overhead_per_step_and_per_flop() -> None:
    cost = CostModel()
    small = resolve_config(["--model", "fast_resnet", "--epochs", "2", "--val-size", "0"])
    big = resolve_config(["--model", "fast_resnet_512", "--epochs", "40", "--val-size", "0"])
    assert cost.estimate(small) is None and cost.epochs_within(small, 100) is None
    # Steps that truly take 5 ms of launch overhead plus arithmetic in proportion to their FLOPs.
    flops_small, flops_big = (c.batch_size * forward_gflops(c.model) for c in (small, big))
    per_flop = 0.005 / flops_small
    true_small, true_big = 0.005 + per_flop * flops_small, 0.005 + per_flop * flops_big
    cost.observe(small, 100, train_s=100 * true_small, wall_s=100 * true_small + 8)
    proportional = cost.step_seconds(big)  # one point: no overhead term, so a bigger model is over-estimated
    assert proportional == pytest.approx(true_small * flops_big / flops_small) and proportional > true_big
    cost.observe(big, 50, train_s=50 * true_big, wall_s=50 * true_big + 10)
    assert cost.step_seconds(big) == pytest.approx(true_big)
    steps_per_epoch = 50_000 // big.batch_size
    assert cost.estimate(big) == pytest.approx(10 + 40 * steps_per_epoch * true_big)  # the largest overhead
    epochs = cost.epochs_within(big, 180)
    assert 10 + epochs * steps_per_epoch * true_big <= 180 < 10 + (epochs + 1) * steps_per_epoch * true_big


def _session(tmp_path: Path, steps: tuple[Step, ...], total_s: float) -> Session:
    return Session(tmp_path, "results.json", {}, steps, Budget(total_s))


def test_session_skips_a_step_that_does_not_fit_and_records_failures(tmp_path: Path) -> None:
    steps = (
        Step(1, "one", "first", reserve_s=1, cap_s=50),
        Step(2, "two", "second", reserve_s=1000, cap_s=2000),
        Step(3, "three", "third", reserve_s=20, cap_s=50),
    )
    session = _session(tmp_path, steps, total_s=60)
    # Step one may take what leaves the later steps their reserves (60 - 1000 - 20 < 0): its own reserve.
    session.run_step(steps[0], lambda record, deadline: record.update(allowed_at_most=deadline.left() <= 1))
    session.run_step(steps[1], lambda record, deadline: None)

    def fail(record: dict, deadline: Deadline) -> None:
        raise StepFailed("it broke")

    session.run_step(steps[2], fail)
    saved = json.loads((tmp_path / "results.json").read_text())["steps"]
    assert saved["one"]["status"] == PASSED and saved["one"]["allowed_at_most"] and saved["one"]["allowed_s"] == 1
    assert saved["two"]["status"] == SKIPPED and "needs at least 1000 s" in saved["two"]["reason"]
    assert saved["three"]["allowed_s"] <= 50
    assert saved["three"]["status"] == FAILED and saved["three"]["reason"] == "it broke"


def test_run_command_timeout_ends_the_whole_process_group(tmp_path: Path) -> None:
    setup_logging(tmp_path / "log.txt")
    child = "import time; time.sleep(120)"
    parent = (
        f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', {child!r}]); "
        "print(p.pid, flush=True); time.sleep(120)"
    )
    completed = run_command([sys.executable, "-c", parent], timeout_s=5, env=dict(os.environ), cwd=tmp_path)
    assert completed.timed_out and completed.returncode is None
    grandchild = int(completed.output.split()[0])
    deadline = time.monotonic() + 30
    while _alive(grandchild):
        assert time.monotonic() < deadline, "the grandchild outlived the timeout"
        time.sleep(0.05)
    assert str(grandchild) in (tmp_path / "log.txt").read_text()


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_gpu_checks_result_line_and_a_missing_run() -> None:
    from benchmarks.gpu_checks import RESULT_PREFIX, parse_result

    assert parse_result(f"noise\n{RESULT_PREFIX}{json.dumps({'a': 1})}\nmore noise") == {"a": 1}
    assert parse_result("no result") is None
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_checks", "load-on-cpu", "/nonexistent"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert result.returncode == 1 and "no checkpoint" in result.stderr, result.stderr[-2000:]
