"""The one-command GPU measurement (benchmarks.gpu_run), proven on the CPU: its dry run, its plan, its parts.

The dry run runs every step at toy size on the CPU (trainer.fit processes, torchrun with gloo, a real pytest,
airbench94's data and patched copy, and a stand-in for its CUDA-only runs, one of which hangs until killed)
and must write the files a GPU run writes; about 2 minutes on 2 busy cores. The plan is computed without
running anything. The parts: the cost model, the comparisons and their verdicts, the peer's patching and
parsing, timeouts that end a whole process group, SIGTERM.
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
from helpers import REPO, run_module

from benchmarks import airbench_peer, gpu_run
from benchmarks.gpu_session import CostModel, Costs, run_command, setup_logging
from trainer.models import build_model

PEER = REPO.parent / "shared" / "peers" / "airbench" / "airbench94.py"
STEP_NAMES = ["prepare", "versus", "ceiling", "bundle", "nccl", "pytest"]


@pytest.fixture(scope="module")
def peer() -> Path:
    if not PEER.is_file():
        pytest.skip(f"the airbench94 peer is not at {PEER}")
    return PEER


# ------------------------------------------------------------------ the dry run, end to end


@pytest.fixture(scope="module")
def dry_run(shared_archive: Path, peer: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    out = tmp_path_factory.mktemp("gpu-dry") / "out"
    result = run_module(
        "benchmarks.gpu_run", "--dry-run", "--out", str(out), "--data", str(shared_archive), "--peer", str(peer),
        timeout=900, env={"PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert "done in" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
    return out, json.loads((out / "gpu_results.json").read_text()), (out / "gpu_run.log").read_text()


@pytest.mark.slow
def test_dry_run_runs_every_step_in_order_of_value_and_writes_the_gpu_files(dry_run: tuple[Path, dict, str]) -> None:
    out, results, log = dry_run
    assert list(results["steps"]) == STEP_NAMES
    statuses = {name: step["status"] for name, step in results["steps"].items()}
    assert statuses == {**dict.fromkeys(STEP_NAMES, "passed"), "versus": "timeout"}  # its stalled round, below
    starts = [log.index(f"=== {name}: {gpu_run.STEPS[name]}") for name in STEP_NAMES]
    assert starts == sorted(starts)
    assert results["plan_at_start"][0].startswith("plan: dry run") and log.index("plan: dry run") < starts[0]
    assert results["rerun"] == "python -m benchmarks.gpu_run --dry-run --out OUT --steps versus --budget-s 240"
    assert results["finished_utc"] and results["gpu"] is None  # no GPU here: none is named

    on_disk = {p.name: p.stat().st_size for p in out.iterdir()}
    assert set(on_disk) == {"gpu_run.log", "gpu_results.json", "bundle_model.pt", "bundle_report.json"}
    assert results["out_files"]["within_limits"] and all(size <= 16_000_000 for size in on_disk.values())


@pytest.mark.slow
def test_dry_run_interleaves_the_rounds_and_keeps_those_finished_when_a_run_is_killed(
    dry_run: tuple[Path, dict, str],
) -> None:
    _, results, log = dry_run
    versus = results["steps"]["versus"]
    order = [(run["side"], run["round"], run["status"]) for run in versus["runs"]]
    assert order == [
        ("airbench94", 0, "passed"), ("fast", 0, "passed"), ("airbench94", 1, "passed"), ("fast", 1, "passed"),
        ("airbench94", 2, "timeout"),  # the stand-in that hangs: killed at 3 x its estimate + 15 s
    ]  # fmt: skip
    launched = re.findall(r"\$ \S+ (?:\S+stand_in\.py|-m trainer\.fit .*--seed (\d))", log)
    assert launched[:5] == ["", "0", "", "1", ""], launched
    assert "killed at its timeout" in versus["reason"] and "kept" in versus["reason"]
    comparison = results["summary"]["versus"]
    assert comparison["complete_rounds"] == 2 and comparison["planned_rounds"] == 3
    assert comparison["airbench94"]["train_s"]["n"] == comparison["fast"]["train_s"]["n"] == 2
    assert comparison["airbench94"]["test_tta_pct"]["mean"] == 10.0  # the stand-in's chance accuracy
    assert comparison["verdict"].startswith("not judged")


@pytest.mark.slow
def test_dry_run_records_each_step(dry_run: tuple[Path, dict, str]) -> None:
    out, results, _ = dry_run
    steps, summary = results["steps"], results["summary"]
    prepared = steps["prepare"]["runs"][0]["result"]
    assert prepared["gpus"] == [] and prepared["versions"]["torch"] and prepared["peer"]["data"]["train"]["images"]
    assert len(prepared["peer"]["changes"]) == 2  # its run count and its warm-up run

    assert summary["ceiling"]["complete"] and summary["ceiling"]["epochs"] == 2
    bundle = steps["bundle"]
    assert [run.get("candidate") for run in bundle["runs"]] == [1, 2, None, None]  # candidates, bundle, load
    assert all(run["val_images"] == 1000 for run in bundle["runs"][:2]) and bundle["runs"][2]["val_images"] == 0
    assert bundle["chosen_epochs"] == bundle["runs"][2]["epochs"] and summary["bundle"]["verdict"].startswith("not")
    slim = torch.load(out / "bundle_model.pt", weights_only=True)
    build_model(slim["model_name"], slim["num_classes"]).load_state_dict(slim["weights"])

    assert (summary["nccl"]["process_group"], summary["nccl"]["world_size"]) == ("gloo", 1)
    assert "skipped" in summary["pytest"]  # no CUDA here
    measured = results["costs"]["measured"]
    assert {"process_s", "epoch_extra_s", "launcher_s", "peer_process_s", "pytest_s"} <= set(measured)
    assert set(measured["epoch_s"]) == {"baseline_cnn"}


@pytest.mark.slow
def test_plan_under_the_dry_runs_measured_costs(dry_run: tuple[Path, dict, str]) -> None:
    out, _, _ = dry_run
    printed = run_module("benchmarks.gpu_run", "--dry-run", "--plan", "--costs", str(out / "gpu_results.json")).stdout
    assumed, measured = printed.split("\n\n")
    assert "costs assumed" in assumed and f"costs measured by {out / 'gpu_results.json'}" in measured
    for plan in (assumed, measured):
        assert re.search(r"^versus +3 of 3 rounds ", plan, re.MULTILINE), plan


# ------------------------------------------------------------------ the plan


def _plan(budget_s: float, steps: list[str] | None = None) -> dict[str, str]:
    """{step: what fits} as --plan prints it for the GPU plan with its assumed costs."""
    selected = ["prepare", *(steps or gpu_run.STEPS)]
    printed = gpu_run.format_plan(gpu_run.GPU, budget_s, selected, CostModel(gpu_run.GPU.costs), "assumed")
    rows = [line.split(None, 1) for line in printed.splitlines()[2:] if line.split()[0] in gpu_run.STEPS]
    return {name: re.split(r" {2,}", rest)[0] for name, rest in rows}


def test_plan_of_the_default_gpu_run_fits_every_step_in_its_budget() -> None:
    assert _plan(gpu_run.BUDGET_S) == {
        "prepare": "yes", "versus": "5 of 5 rounds", "ceiling": "20 of 20 epochs", "bundle": "2 of 2 candidates",
        "nccl": "yes", "pytest": "yes",
    }  # fmt: skip


def test_plan_cuts_the_least_valuable_first_when_the_budget_is_short() -> None:
    # 250 s: every round, then a ceiling shortened to what is left (reported so), nothing after it.
    assert _plan(250) == {
        "prepare": "yes", "versus": "5 of 5 rounds", "ceiling": "12 of 20 epochs", "bundle": "skipped",
        "nccl": "skipped", "pytest": "skipped",
    }  # fmt: skip
    assert _plan(120)["versus"] == "2 of 5 rounds"
    assert _plan(gpu_run.RERUN_BUDGET_S, ["nccl", "pytest"])["pytest"] == "yes"  # a rerun of the last two fits


def test_costs_count_each_epochs_checkpoint_and_are_learnt_from_a_run() -> None:
    assumed = Costs(process_s=10, epoch_extra_s=0.5, launcher_s=5, peer_process_s=8, peer_run_s=3, prepare_s=20,
                    check_s=5, pytest_s=30, epoch_s={"fast_resnet_256": 1.0, "fast_resnet_512": 3.0})  # fmt: skip
    costs = CostModel(assumed)
    assert costs.fit_s("fast_resnet_512", 40, 50_000) == 10 + 40 * (3.0 + 0.5)  # the checkpoints grow with epochs
    assert costs.epochs_within("fast_resnet_512", 50_000, 10 + 7 * 3.5) == 7
    # A measured run: 4 epochs of 2 s training; 0.25 s between epochs besides; 30 s in all.
    rows = [{"epoch": e, "epoch_time_s": 2.0, "wall_time_s": 5 + 2.25 * e} for e in range(1, 5)]
    report = {"model": "fast_resnet_256", "epochs": 4.0, "data": {"train": 25_000}, "timing": {"train_s": 8.0}}
    costs.observe_fit(report, rows, process_s=30.0, launcher=False)
    assert costs.get("epoch_extra_s") == 0.25  # measured replaces assumed
    assert costs.measured["epoch_s"]["fast_resnet_256"] == 4.0  # per epoch of 50,000 images
    assert costs.get("process_s") == 30 - 8 - 4 * 0.25
    assert costs.epoch_seconds("fast_resnet_512", 50_000) == 12.0  # unmeasured: scaled as 256 was off (x4)


def test_compare_counts_complete_rounds_only() -> None:
    def run(side: str, round_: int, status: str = "passed") -> dict:
        return {"side": side, "round": round_, "status": status, "test_tta_pct": 94.0, "train_s": 3.0}

    rounds = [run("airbench94", 0), run("fast", 0), run("airbench94", 1), run("fast", 1), run("airbench94", 2)]
    cut = gpu_run.compare([*rounds, run("fast", 2, "timeout")], planned=3, dry=False)
    assert cut["complete_rounds"] == 2 and cut["airbench94"]["train_s"]["n"] == cut["fast"]["train_s"]["n"] == 2
    assert cut["verdict"] == "not judged: 2 of 3 rounds complete"
    assert gpu_run.compare([*rounds, run("fast", 2)], planned=3, dry=False)["verdict"] == "met"  # ratio 1, same acc


def test_bundle_is_judged_only_against_a_complete_ceiling() -> None:
    final = {"model": "m", "epochs": 20, "test_pct": 93.0, "test_tta_pct": 93.5, "train_s": 20, "device_name": "H"}
    loaded = {"fp32_weight_bytes": 8_000_000, "model_pt_bytes": 8_100_000}
    ceiling = {"test_pct": 93.4, "epochs": 20.0, "planned_epochs": 20, "complete": True}
    assert gpu_run.judge_bundle(final, loaded, ceiling, all_tried=True, dry=False)["verdict"] == "met"
    shortened = {**ceiling, "epochs": 12.0, "complete": False}
    verdict = gpu_run.judge_bundle(final, loaded, shortened, all_tried=True, dry=False)["verdict"]
    assert verdict == "not judged: the ceiling was shortened to 12 of 20 epochs"
    assert gpu_run.judge_bundle(final, loaded, ceiling, all_tried=False, dry=False)["verdict"].startswith("not judged")


# ------------------------------------------------------------------ the command


def test_gpu_run_without_data_names_gpu_prepare(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_module(
        "benchmarks.gpu_run", "--dry-run", "--out", str(out), "--data", str(tmp_path / "missing.tar.gz"),
        check=False, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2 and "benchmarks/gpu_prepare.sh" in result.stdout, result.stdout[-2000:]
    results = json.loads((out / "gpu_results.json").read_text())
    assert "gpu_prepare.sh" in results["error"] and "status" not in results["steps"]["prepare"]


def test_gpu_run_stopped_by_sigterm_ends_its_run_and_keeps_its_results(shared_archive: Path, tmp_path: Path) -> None:
    """A caller's timeout (SIGTERM) mid-step: the trainer it started is ended, the results say how far it got."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "benchmarks.gpu_run", "--dry-run", "--steps", "ceiling", "--out", str(out),
               "--data", str(shared_archive), "--peer", str(PEER)]  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log, deadline = out / "gpu_run.log", time.monotonic() + 120
    while not (log.is_file() and (match := re.search(r"trainer\.fit .*\(pid (\d+),", log.read_text()))):
        assert process.poll() is None and time.monotonic() < deadline, "the ceiling run never started"
        time.sleep(0.05)
    process.terminate()
    assert process.wait(60) == 128 + 15
    deadline = time.monotonic() + 30
    while _alive(int(match[1])):
        assert time.monotonic() < deadline, "the trainer outlived the orchestrator"
        time.sleep(0.05)
    results = json.loads((out / "gpu_results.json").read_text())
    assert results["finished_utc"] and results["steps"]["ceiling"]["status"] == "interrupted"
    assert results["steps"]["prepare"]["status"] == "passed" and results["steps"]["versus"]["status"] == "skipped"


def test_gpu_run_help_states_every_default() -> None:
    result = run_module("benchmarks.gpu_run", "--help", timeout=120)
    options = re.split(r"\n  (?=-)", result.stdout.split("\noptions:\n", 1)[1])
    for entry in options:
        flag = entry.split()[0]
        if flag not in ("-h,", "--out"):
            assert "default:" in " ".join(entry.split()), f"{flag} does not state its default"
    assert "gpu_prepare.sh" in result.stdout and "--dry-run" in result.stdout


def test_run_command_timeout_ends_the_whole_process_group(tmp_path: Path) -> None:
    setup_logging(tmp_path / "log.txt")
    child = "import time; time.sleep(120)"
    parent = (
        f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', {child!r}]); "
        "print(p.pid, flush=True); time.sleep(120)"
    )
    completed = run_command([sys.executable, "-c", parent], timeout_s=5, env=dict(os.environ), cwd=tmp_path)
    assert completed.returncode is None  # killed at its timeout
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
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )  # fmt: skip
    assert result.returncode == 1 and "no checkpoint" in result.stderr, result.stderr[-2000:]


# ------------------------------------------------------------------ the airbench94 peer


def _peer_row(run: str, epoch: str, acc: float | None, tta: float | None, seconds: float) -> str:
    """One row of airbench94's table, in its format ('|  cell  ' per column, cells right-justified)."""
    cells = [run.rjust(6), epoch.rjust(5), "2.1000".rjust(10), "0.5000".rjust(9),
             "" if acc is None else f"{acc:.4f}".rjust(7), "" if tta is None else f"{tta:.4f}".rjust(11),
             f"{seconds:.4f}".rjust(18)]  # fmt: skip
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


def test_peer_stand_in_prints_one_run_the_parser_reads(tmp_path: Path) -> None:
    script = airbench_peer.write_stand_in(tmp_path)
    printed = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60).stdout
    [run] = airbench_peer.parse_output(printed)["runs"]
    assert (run["tta_val_acc"], run["epochs"], run["train_s"]) == (0.1, 2, 0.02)


def test_peer_patch_sets_the_run_count_and_its_warmup(peer: Path, tmp_path: Path) -> None:
    patched = airbench_peer.write_patched_script(peer, tmp_path, runs=1)
    text = Path(patched["script"]).read_text()
    assert "for run in range(1)" in text and "range(25)" not in text
    assert re.search(r"^\s*main\('warmup'\)", text, re.MULTILINE) and len(patched["changes"]) == 2
    with pytest.raises(ValueError, match="found 0"):
        airbench_peer.patch_source("print('no loop here')", runs=5)
    with pytest.raises(ValueError, match="found 2"):
        airbench_peer.patch_source("for run in range(25): pass\nfor run in range(25): pass\n", runs=5, warmup=False)


def test_peer_data_files_are_shuffled_hwc_uint8(shared_archive: Path, tmp_path: Path) -> None:
    from trainer.data import load_dataset

    written = airbench_peer.write_data(load_dataset(str(shared_archive)), tmp_path, seed=0, limit=2000)
    train = torch.load(written["train"]["file"], weights_only=True)
    test = torch.load(written["test"]["file"], weights_only=True)
    assert train["images"].shape == (2000, 32, 32, 3) and train["images"].dtype == torch.uint8
    assert train["labels"].dtype == torch.int64 and len(train["classes"]) == 10
    # The class-folder copy decodes in class order; the peer whitens from its first images: all classes there.
    assert train["labels"][:500].unique().numel() == 10
    assert test["images"].shape == (2000, 32, 32, 3)
