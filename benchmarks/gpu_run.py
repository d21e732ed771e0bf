"""The GPU measurement in one command, most valuable first (issues 8 and 22): the whole plan is on one screen below.

On the CPU machine, copy the data and the airbench94 peer into the git-ignored .data/ (the GPU machine sees
only the repository) and print the plan; then run it on the GPU machine, from the repository root, carrying .data:

    benchmarks/gpu_prepare.sh && python -m benchmarks.gpu_run --plan            # CPU machine; runs nothing
    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 -m benchmarks.gpu_run --out "$OUT"   # GPU machine, carry [".data"]

--dry-run runs every step on the CPU at toy size (CI: tests/test_gpu_run.py). --out receives gpu_run.log,
gpu_results.json (rewritten the moment anything is measured), bundle_model.pt and bundle_report.json.
Exit status: 0 when no step failed (what the budget cut is in the results' "rerun" command); 1 when a step
failed or raised, or the run was stopped; 2 for missing inputs or bad options.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from benchmarks import gpu_session as gs
from benchmarks.airbench_peer import STAND_IN_NAME
from bundle.class_tree import DATA_ENV

# ================================================================== THE PLAN
# A device session: 15 minutes of device time in all, the machine's start (1-2 minutes) included; a command
# runs 10 minutes at most. Start (120 s) + BUDGET_S + writing and fetching the results (60 s) fit one 600-s
# command; the session's other 300 s hold a rerun of what failed or did not fit (the results' "rerun").
BUDGET_S, RERUN_BUDGET_S = 420.0, 240.0
# The steps in order of value. A run starts only if its estimate (+10%) fits in what is left of the budget, and
# its results are written when it ends; a run killed at its timeout ends its step, whose finished runs stay.
STEPS = {  # name: what it measures
    "prepare": "the GPU's name, versions; the data decoded once; airbench94's data",
    "versus": "airbench94 vs the fast recipe, one run each per round: test acc (TTA), train_s",
    "ceiling": "the data's ceiling: the most accurate recipe's test acc (if shortened, nothing is judged)",
    "bundle": "ONNX <= 16 MB, epochs chosen on validation, then all 50,000: vs the ceiling",
    "nccl": "one NCCL rank through torchrun: its process group and DDP",
    "pytest": "pytest -m gpu, what only a GPU proves: fp16/bf16 CUDA runs, model.pt on a CPU",
}


@dataclasses.dataclass(frozen=True)
class Plan:
    """What each step runs: trainer.fit flags; a run gets [step flags, toy, --data, --device, --seed, --out]."""

    device: str
    seeds: int  # versus: rounds of (one airbench94 run, one fast seed), so a cut run compares equal numbers
    fast: tuple[str, ...]  # versus: the project's fast recipe
    ceiling: tuple[str, ...]  # without --epochs
    ceiling_epochs: int  # shortened to fit (not below half): reported so, and nothing is judged against it
    bundle: tuple[str, ...]  # without --epochs and --val-size
    bundle_epochs: tuple[int, ...]  # the candidates, trained with bundle_val_size images held out
    bundle_val_size: int
    nccl: tuple[str, ...]
    costs: gs.Costs  # assumed until measured: each finished run replaces what it measured
    slack_s: float  # a run is killed at 3 x its estimate + this, or at the end of the budget
    toy: tuple[str, ...] = ()  # after each run's flags: the dry run's toy size
    peer_images: int = 0  # airbench94's images per split, 0 = all
    stall_round: int | None = None  # dry run: this round's airbench94 stand-in hangs, to be killed mid-step


# fmt: off
GPU = Plan(
    device="cuda", slack_s=60,
    seeds=5, fast=("--model", "fast_resnet_256", "--epochs", "10", "--val-size", "0", "--tta", "2"),
    ceiling=("--model", "fast_resnet_512", "--val-size", "0"), ceiling_epochs=20,
    bundle=("--model", "fast_resnet_256"), bundle_epochs=(10, 20), bundle_val_size=5000,  # fp32 ONNX ~8 MB
    nccl=("--model", "fast_resnet", "--epochs", "1"),
    # Guesses for an H100, until measured. A trainer process: imports ~2 s, CUDA ~1 s, warm-up with cuDNN's
    # search ~3 s, final TTA ~1 s, report and plots ~3 s. An epoch: airbench94 trains fast_resnet_256's widths
    # in ~0.35 s (A100, fp16 weights); ours adds bf16 autocast, batch 512, residual adds, no compile.
    costs=gs.Costs(process_s=12, epoch_extra_s=0.3, launcher_s=10, peer_process_s=10, peer_run_s=3.5,
                   prepare_s=20, check_s=8, pytest_s=30,
                   epoch_s={"fast_resnet": 0.5, "fast_resnet_256": 0.8, "fast_resnet_512": 2.2}),
)
# The same steps on a CPU at toy size (the seed notebook's small CNN, 512 images, fp32, no TTA). airbench94
# needs CUDA: its rounds run a stand-in printing its table, and round 2's hangs until killed at its timeout.
DRY = Plan(
    device="cpu", slack_s=15,
    seeds=3, fast=("--model", "baseline_cnn", "--epochs", "1", "--val-size", "0"),
    ceiling=("--model", "baseline_cnn", "--val-size", "0"), ceiling_epochs=2,
    bundle=("--model", "baseline_cnn"), bundle_epochs=(1, 2), bundle_val_size=1000,
    nccl=("--model", "baseline_cnn", "--epochs", "1"),
    costs=gs.Costs(process_s=15, epoch_extra_s=0.5, launcher_s=5, peer_process_s=1, peer_run_s=0.1,
                   prepare_s=20, check_s=8, pytest_s=15, epoch_s={"baseline_cnn": 40}),
    toy=("--train-subset", "512", "--batch-size", "128", "--precision", "fp32", "--tta", "0", "--threads", "2"),
    peer_images=1000, stall_round=2,
)
# fmt: on
# ================================================================== END OF THE PLAN

DEFAULT_DATA, DEFAULT_PEER = gs.REPO / ".data/cifar10-jpeg.tar.gz", gs.REPO / ".data/peers/airbench94.py"
RESULTS_NAME, BUNDLE_NAME, BUNDLE_REPORT_NAME = "gpu_results.json", "bundle_model.pt", "bundle_report.json"
MAX_OUT_FILES, MAX_OUT_BYTES = 8, 16_000_000  # what one GPU run brings back (shared notes, gpu.md)
SIZE_LIMIT_BYTES = 16_000_000  # the bundle's fp32 ONNX file (issue 8)
CEILING_TOLERANCE_PTS = 0.5  # the bundle's test accuracy (no TTA) within 0.5 point of the ceiling's
TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1")


# ------------------------------------------------------------------ the steps


def step_prepare(s: gs.Session, record: dict) -> None:
    stand_in = ["--stand-in"] if s.plan.device == "cpu" else []
    args = ["prepare", "--data", s.data, "--peer", str(s.peer_script), "--work", str(s.work / "airbench94"),
            "--peer-images", str(s.plan.peer_images), *stand_in]  # fmt: skip
    run = s.check(record, "prepare", args, "prepare_s")
    if run["status"] != gs.PASSED:
        return
    env, gpu = run["result"], (run["result"]["gpus"] or [{}])[0]
    s.results["gpu"] = gpu.get("name")  # torch.cuda's name: an H100, or an H200 when no H100 was free
    s.results["summary"]["machine"] = {"gpu": gpu.get("name"), "gpu_memory_gib": gpu.get("memory_gib"),
                                       "cpu": env["cpu"], "cpu_cores": env["cpu_cores"], **env["versions"]}  # fmt: skip
    if s.plan.device == "cuda" and not env["cuda_available"]:
        raise gs.StepFailed("CUDA is not available here (torch.cuda.is_available() is False)")


def step_versus(s: gs.Session, record: dict) -> None:
    """Rounds of one airbench94 run and one fast seed while a whole round fits; a failed peer stops its side."""
    plan, peer_failed = s.plan, None
    script = s.work / "airbench94" / (STAND_IN_NAME if plan.device == "cpu" else s.peer_script.name)
    try:
        for seed in range(plan.seeds):
            peer_s = 0 if peer_failed else s.costs.get("peer_process_s") + s.costs.get("peer_run_s")
            needed = peer_s + s.fit_estimate(plan.fast)
            if not s.fits(needed):
                reason = f"rounds {seed} on do not fit: ~{needed:.0f} s each, {s.clock.left():.0f} s left"
                record.update(status=gs.PARTIAL if seed else gs.SKIPPED, reason=reason)
                break
            stall = ["--stall"] if seed == plan.stall_round else []
            try:
                if not peer_failed:
                    s.peer(record, f"airbench94 run {seed}", script, stall, side="airbench94", round=seed)
            except gs.StepFailed as err:  # the fast recipe's GPU figures are still worth having
                peer_failed = str(err)
            s.fit(record, f"fast seed {seed}", plan.fast, seed=seed, side="fast", round=seed)
    finally:  # also when a run was killed: the rounds finished are compared
        runs = record.get("runs", [])
        rounds = sum(run["status"] in (gs.PASSED, gs.PLANNED) for run in runs if run["side"] == "fast")
        record["fits"] = f"{rounds} of {plan.seeds} rounds"
        comparison = compare(runs, plan.seeds, dry=plan.device != "cuda")
        record["comparison"] = s.results["summary"]["versus"] = {"gpu": s.results["gpu"], **comparison}
    if peer_failed:
        raise gs.StepFailed(f"{peer_failed} (the fast recipe's runs went on)")


def compare(runs: list[dict], planned: int, dry: bool) -> dict:
    """The fast recipe against airbench94 over the complete rounds only, so that both count the same runs."""
    done = {side: {r["round"]: r for r in runs if r.get("side") == side and r["status"] == gs.PASSED}
            for side in ("airbench94", "fast")}  # fmt: skip
    rounds = sorted(done["airbench94"].keys() & done["fast"].keys())
    result = {"complete_rounds": len(rounds), "planned_rounds": planned}
    for side, by_round in done.items():
        result[side] = {key: gs.mean_sd([by_round[k][key] for k in rounds]) for key in ("test_tta_pct", "train_s")}
    if rounds:
        ratio = result["fast"]["train_s"]["mean"] / result["airbench94"]["train_s"]["mean"]
        difference = result["fast"]["test_tta_pct"]["mean"] - result["airbench94"]["test_tta_pct"]["mean"]
        result.update(train_s_ratio=round(ratio, 4), accuracy_tta_difference_pts=round(difference, 3))
    result["target"] = "train_s ratio <= 1.0 at >= airbench94's accuracy with TTA, over all planned rounds"
    if dry:
        result["verdict"] = "not judged: a dry run (toy size, airbench94's stand-in)"
    elif len(rounds) < planned:
        result["verdict"] = f"not judged: {len(rounds)} of {planned} rounds complete"
    else:
        result["verdict"] = "met" if ratio <= 1.0 and difference >= 0 else "not met"
    return result


def step_ceiling(s: gs.Session, record: dict) -> None:
    """The ceiling recipe for its epochs, or shortened to what fits (down to half; skipped below)."""
    planned = s.plan.ceiling_epochs
    config = gs.resolve_config(s.trainer_args("ceiling", [*s.plan.ceiling, "--epochs", str(planned)]))
    seconds = s.clock.left() / gs.FIT_MARGIN
    fitting = min(planned, s.costs.epochs_within(config.model, gs.train_images(config), seconds))
    record["fits"] = f"{fitting} of {planned} epochs"
    if fitting < planned / 2:
        raise gs.StepSkipped(f"only {fitting} of {planned} epochs fit in the {s.clock.left():.0f} s left")
    if fitting < planned:
        record.update(status=gs.PARTIAL, reason=f"shortened to {fitting} of {planned} epochs to fit: not the ceiling")
    run = s.fit(record, "ceiling", [*s.plan.ceiling, "--epochs", str(fitting)])
    if run["status"] == gs.PASSED:
        figures = {key: run[key] for key in ("model", "epochs", "test_pct", "test_tta_pct", "train_s", "device_name")}
        s.results["summary"]["ceiling"] = {**figures, "planned_epochs": planned, "complete": fitting == planned}


def step_bundle(s: gs.Session, record: dict) -> None:
    """Candidates while each fits with its retraining, the best on validation retrained on all images, loaded
    on a CPU; its model.pt and report to --out."""
    plan = s.plan

    def flags(epochs: int, val_size: int) -> list[str]:
        return [*plan.bundle, "--epochs", str(epochs), "--val-size", str(val_size)]

    for epochs in plan.bundle_epochs:
        needed = sum(s.fit_estimate(flags(epochs, val)) for val in (plan.bundle_val_size, 0)) + s.costs.get("check_s")
        if not s.fits(needed):
            record.update(status=gs.PARTIAL, reason=f"candidate {epochs} epochs and its retraining: ~{needed:.0f} s")
            break
        s.fit(record, f"candidate {epochs} epochs", flags(epochs, plan.bundle_val_size), candidate=epochs)
    candidates = [run for run in record.get("runs", []) if "candidate" in run]
    record["fits"] = f"{len(candidates)} of {len(plan.bundle_epochs)} candidates"
    if not candidates:
        raise gs.StepSkipped(record.pop("reason", "no candidate fits"))
    # The best validation accuracy (never the test set), the fewer epochs on a tie; --plan: the longest.
    chosen = max(candidates, key=lambda r: r["candidate"] if s.planning else (r["val_pct"], -r["candidate"]))
    record["chosen_epochs"] = chosen["candidate"]
    final = s.fit(record, "bundle", flags(chosen["candidate"], 0))
    if final["status"] == gs.SKIPPED:
        raise gs.StepSkipped(f"the retraining on all images: {final['reason']}")
    hidden = {"CUDA_VISIBLE_DEVICES": ""}
    loaded = s.check(record, "load on a CPU", ["load-on-cpu", final.get("run_dir", "-")], "check_s", env=hidden)
    if s.planning:
        return
    for source, target in (("model.pt", BUNDLE_NAME), ("report.json", BUNDLE_REPORT_NAME)):
        shutil.copyfile(Path(final["run_dir"]) / source, s.results_path.parent / target)
    ceiling, all_tried = s.results["summary"].get("ceiling"), len(candidates) == len(plan.bundle_epochs)
    s.results["summary"]["bundle"] = judge_bundle(final, loaded["result"], ceiling, all_tried, plan.device != "cuda")


def judge_bundle(final: dict, loaded: dict, ceiling: dict | None, all_tried: bool, dry: bool) -> dict:
    """The bundle's figures, and its target judged only on complete evidence."""
    onnx_ok = loaded["fp32_weight_bytes"] <= SIZE_LIMIT_BYTES
    difference = round(final["test_pct"] - ceiling["test_pct"], 3) if ceiling else None
    if dry:
        verdict = "not judged: a dry run (toy size)"
    elif ceiling is None:
        verdict = "not judged: no ceiling was measured"
    elif not ceiling["complete"]:
        verdict = (
            f"not judged: the ceiling was shortened to {ceiling['epochs']:g} of {ceiling['planned_epochs']} epochs"
        )
    elif not all_tried:
        verdict = "not judged: not every candidate number of epochs was tried"
    else:
        verdict = "met" if difference >= -CEILING_TOLERANCE_PTS and onnx_ok else "not met"
    return {
        **{key: final[key] for key in ("model", "epochs", "test_pct", "test_tta_pct", "train_s", "device_name")},
        "onnx_fp32_bytes_estimate": loaded["fp32_weight_bytes"], "model_pt_bytes": loaded["model_pt_bytes"],
        "ceiling_test_pct": ceiling["test_pct"] if ceiling else None, "difference_to_ceiling_pts": difference,
        "target": f"test accuracy (no TTA) within {CEILING_TOLERANCE_PTS} point of the ceiling, ONNX <= 16 MB",
        "verdict": verdict,
    }  # fmt: skip


def step_nccl(s: gs.Session, record: dict) -> None:
    run = s.fit(record, "torchrun", s.plan.nccl, launcher=TORCHRUN)
    expected = ("nccl" if s.plan.device == "cuda" else "gloo", 1)
    if run["status"] == gs.PASSED:
        s.results["summary"]["nccl"] = {key: run[key] for key in ("process_group", "world_size", "device_name")}
        if (run["process_group"], run["world_size"]) != expected:
            raise gs.StepFailed(f"expected {expected}, the report says {(run['process_group'], run['world_size'])}")


def step_pytest(s: gs.Session, record: dict) -> None:
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q", "-rA", "-p", "no:cacheprovider"]
    data = {DATA_ENV: s.data}  # the tests read the data set from it
    run, completed = s.process(record, "pytest -m gpu", command, s.costs.get("pytest_s"), env=data)
    if completed is not None:
        run["summary"] = s.results["summary"]["pytest"] = gs.last_line(completed.output)
        s.costs.observe("pytest_s", completed.seconds)


RUNNERS = {"prepare": step_prepare, "versus": step_versus, "ceiling": step_ceiling, "bundle": step_bundle,
           "nccl": step_nccl, "pytest": step_pytest}  # fmt: skip
assert list(RUNNERS) == list(STEPS)


# ------------------------------------------------------------------ plan, run, results


def run_steps(session: gs.Session, selected: list[str]) -> None:
    """Every step in order: the selected ones run (or are planned); nothing runs after a failed prepare."""
    stop = None
    for name in STEPS:
        record = session.run_step(name, RUNNERS[name], stop or (None if name in selected else "not selected"))
        if name == "prepare" and record["status"] not in (gs.PASSED, gs.PLANNED) and not stop:
            stop = f"prepare did not pass: {record.get('reason')}"


def new_results(plan: Plan, budget_s: float) -> dict:
    return {
        "schema": "benchmarks.gpu_run/2",
        "units": "accuracies *_pct in percent (test: the 10,000 test images; val: the held-out split); times *_s "
        "in seconds (train_s: training steps only, CUDA events on a GPU); sizes *_bytes in bytes",
        "started_utc": gs.utc_now(), "finished_utc": None, "dry_run": plan.device == "cpu", "budget_s": budget_s,
        "gpu": None, "command": shlex.join(["python", "-m", "benchmarks.gpu_run", *sys.argv[1:]]),
        "plan": dataclasses.asdict(plan), "summary": {}, "steps": {n: {"title": t} for n, t in STEPS.items()},
    }  # fmt: skip


def format_plan(plan: Plan, budget_s: float, selected: list[str], costs: gs.CostModel, label: str) -> str:
    """What would run and fit if every run took its estimate: the run's own decisions, on a virtual clock."""
    session = gs.Session(plan, gs.Clock(budget_s, virtual=True), costs, new_results(plan, budget_s))
    run_steps(session, selected)
    where = "GPU (an H100, or an H200 when none is free)" if plan.device == "cuda" else "dry run (CPU, toy size)"
    lines = [f"plan: {where}, budget {budget_s:.0f} s, costs {label}",
             f"{'step':8} {'fits':20} {'s':>4} {'ends':>4}  measures"]  # fmt: skip
    end = 0.0
    for name, record in session.results["steps"].items():
        end += record.get("seconds", 0.0)
        fits = record.get("fits", "yes") if record["status"] in (gs.PLANNED, gs.PARTIAL) else record["status"]
        lines.append(f"{name:8} {fits:20} {record.get('seconds', 0):4.0f} {end:4.0f}  {STEPS[name]}")
        lines += [f"{'':8} ({record['reason']})"] if record.get("reason") else []
    now = costs.now()
    named = {**{f"epoch_s[{model}]": value for model, value in now.pop("epoch_s").items()}, **now}
    lines.append(f"{budget_s - end:.0f} s of {budget_s:.0f} left. Costs (s): ")
    lines[-1] += ", ".join(f"{name} {value:g}" for name, value in named.items())
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--out", type=Path, help="folder for the log, results and bundle ($OUT; needed to run)")
    parser.add_argument(
        "--plan", action="store_true", help="print which steps and seeds fit, run nothing (default: off)"
    )
    parser.add_argument("--dry-run", action="store_true", help="every step on the CPU at toy size (default: off)")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S,
                        help=f"seconds for it all (default: {BUDGET_S:g}; {RERUN_BUDGET_S:g} for a rerun)")  # fmt: skip
    parser.add_argument("--steps", nargs="+", choices=list(STEPS)[1:], default=list(STEPS)[1:], metavar="STEP",
                        help=f"the steps to run after prepare (default: {' '.join(list(STEPS)[1:])})")  # fmt: skip
    parser.add_argument("--seeds", type=int, help=f"versus: rounds (default: {GPU.seeds}; dry run {DRY.seeds})")
    parser.add_argument("--costs", type=Path, help=f"start from the costs an earlier run measured, its {RESULTS_NAME} "
                        "(default: the plan's assumed costs)")  # fmt: skip
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the CIFAR-10 JPEG copy (default: "
                        f"{DEFAULT_DATA.relative_to(gs.REPO)})")  # fmt: skip
    parser.add_argument("--peer", type=Path, default=DEFAULT_PEER,
                        help=f"airbench94.py (default: {DEFAULT_PEER.relative_to(gs.REPO)})")  # fmt: skip
    return parser


def check_out_files(out: Path) -> dict:
    """Every file in --out with its size, against what a GPU run can bring back."""
    sizes = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    within = len(sizes) <= MAX_OUT_FILES and max(sizes.values(), default=0) <= MAX_OUT_BYTES
    return {"bytes": sizes, "within_limits": within, "limits": f"{MAX_OUT_FILES} files of {MAX_OUT_BYTES:,} bytes"}


def _stop(signum: int, frame) -> None:
    """SIGTERM (a caller's timeout): unwind, so that the running process group is ended and results written."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    plan = DRY if args.dry_run else GPU
    if args.seeds is not None and args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    plan = dataclasses.replace(plan, seeds=args.seeds or plan.seeds)
    measured = json.loads(args.costs.read_text())["costs"]["measured"] if args.costs else None
    selected = ["prepare", *args.steps]
    if args.plan:
        print(format_plan(plan, args.budget_s, selected, gs.CostModel(plan.costs), "assumed (the plan's)"))
        if measured:
            costs = gs.CostModel(plan.costs, measured)
            print("\n" + format_plan(plan, args.budget_s, selected, costs, f"measured by {args.costs}"))
        return 0
    if args.out is None:
        parser.error("--out is required to run (or --plan, to print the plan)")
    signal.signal(signal.SIGTERM, _stop)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    gs.setup_logging(out / "gpu_run.log")
    costs = gs.CostModel(plan.costs, measured)
    results = new_results(plan, args.budget_s)
    planned = format_plan(plan, args.budget_s, selected, costs, f"measured by {args.costs}" if measured else "assumed")
    results["plan_at_start"] = planned.splitlines()
    for line in results["plan_at_start"]:
        gs.log.info(line)
    missing = [f"{flag} {path}" for flag, path in (("--data", args.data), ("--peer", args.peer)) if not path.is_file()]
    if missing:
        results["error"] = (f"missing {', '.join(missing)}: run benchmarks/gpu_prepare.sh on the CPU machine "
                            'first and carry .data to the GPU run (carry: [".data"]), or pass the path')  # fmt: skip
        gs.log.error("error: %s", results["error"])
        gs.Session(plan, gs.Clock(args.budget_s), costs, results, out / RESULTS_NAME).write()
        return 2
    work = Path(tempfile.mkdtemp(prefix="gpu_run-"))  # run folders, the peer's; the data cache is the trainer's
    session = gs.Session(plan, gs.Clock(args.budget_s), costs, results, out / RESULTS_NAME, work,
                         str(args.data.resolve()), args.peer.resolve())  # fmt: skip
    try:
        run_steps(session, selected)
    finally:
        rerun = [name for name in args.steps if results["steps"][name]["status"] != gs.PASSED]
        dry = " --dry-run" if args.dry_run else ""
        results.update(finished_utc=gs.utc_now(), total_s=round(session.clock.elapsed(), 1), rerun=None)
        if rerun:
            results["rerun"] = (
                f"python -m benchmarks.gpu_run{dry} --out OUT --steps {' '.join(rerun)} --budget-s {RERUN_BUDGET_S:g}"
            )
        session.write()
        results["out_files"] = check_out_files(out)
        session.write()
        shutil.rmtree(work, ignore_errors=True)
    statuses = {name: step["status"] for name, step in results["steps"].items()}
    gs.log.info("done in %.0f s on %s: %s; rerun: %s", session.clock.elapsed(), results["gpu"] or "no GPU",
                statuses, results["rerun"])  # fmt: skip
    broken = set(statuses.values()) & {gs.FAILED, gs.ERROR, gs.INTERRUPTED}
    return 1 if broken or not results["out_files"]["within_limits"] else 0


if __name__ == "__main__":
    sys.exit(main())
