"""The six steps of benchmarks.gpu_run, one function each, and the trainer runs they are made of.

Each step function takes the run's Context, the step's record in the results (it fills it in) and its
Deadline; it raises StepFailed or StepSkipped with the reason. Accuracies are recorded in percent, times in
seconds, sizes in bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks import airbench_peer
from benchmarks.gpu_budget import CostModel, resolve_config
from benchmarks.gpu_checks import parse_result
from benchmarks.gpu_session import (
    FAILED,
    NOT_RUN,
    PARTIAL,
    PASSED,
    SKIPPED,
    TIMEOUT,
    Completed,
    Deadline,
    Session,
    StepFailed,
    StepSkipped,
    run_command,
)

BUNDLE_NAME, BUNDLE_REPORT_NAME = "bundle_model.pt", "bundle_report.json"
SIZE_LIMIT_BYTES = 16_000_000  # issue 8: the bundle's fp32 ONNX file; also what one file a GPU run returns may hold
PEER_CAP_S = 150  # airbench94: 5 runs of ~3-4 s, its warm-up run, start-up and data loading, with room to spare
FIT_MARGIN = 0.9  # a run is started only if its estimate fits in this fraction of the time left
CEILING_MIN_FRACTION = 0.5  # the ceiling may be shortened to fit, down to half its epochs
CEILING_TOLERANCE_PTS = 0.5  # issue 8: the bundle within 0.5 point of the ceiling (test accuracy, no TTA)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What each step trains. Flags are trainer.fit's; a run gets [step flags, toy flags, --data, --device, --seed,
    --out, --cache-dir], so the toy flags (the dry run's sizes) override the step's."""

    device: str
    toy_args: tuple[str, ...]
    smoke_args: tuple[str, ...]
    fast_args: tuple[str, ...]  # step 3: the project's fastest recipe
    seeds: int  # step 3: runs of each side
    ceiling_args: tuple[str, ...]
    bundle_args: tuple[str, ...]  # step 5, without --epochs and --val-size
    bundle_epochs: tuple[float, ...]  # step 5: the candidates, chosen on the validation split
    bundle_val_size: int  # step 5: validation images held out while choosing
    nccl_args: tuple[str, ...]
    peer_runs: bool  # airbench94 runs only on CUDA
    peer_images: int  # images per split in the peer's data files, 0 = all


@dataclasses.dataclass
class Context:
    """One gpu_run invocation: its plan, folders and inputs, and the run-time estimates learnt so far."""

    session: Session
    plan: Plan
    repo: Path
    out: Path
    work: Path  # run folders and the peer's folder
    data: str
    peer: Path
    cache_dir: str | None
    cost: CostModel = dataclasses.field(default_factory=CostModel)

    def env(self, extra: dict | None = None) -> dict:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_MININTERVAL": "30"}  # few progress-bar lines in the log
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(self.repo), os.environ.get("PYTHONPATH")) if p)
        if self.cache_dir and Path(self.cache_dir).name == "resnet-cifar":  # pytest -m gpu's runs share the decode
            env["XDG_CACHE_HOME"] = str(Path(self.cache_dir).parent)
        return {**env, **(extra or {})}

    def run(
        self,
        command: list[str],
        deadline: Deadline,
        *,
        cwd: Path | None = None,
        env: dict | None = None,
        cap_s: float | None = None,
    ) -> Completed:
        timeout = deadline.left() if cap_s is None else min(cap_s, deadline.left())
        return run_command(command, timeout_s=timeout, env=self.env(env), cwd=cwd or self.repo)

    def cache_flags(self) -> list[str]:
        return ["--cache-dir", self.cache_dir] if self.cache_dir else []

    def check(self, args: list[str], deadline: Deadline, env: dict | None = None) -> dict:
        """`python -m benchmarks.gpu_checks ARGS` and its JSON result; StepFailed when it fails."""
        completed = self.run([sys.executable, "-m", "benchmarks.gpu_checks", *args], deadline, env=env)
        result = parse_result(completed.output) if completed.ok else None
        if result is None:
            raise StepFailed(f"gpu_checks {args[0]}: {completed.describe()}: {_last_line(completed.output)}")
        return result

    def fit_config(self, name: str, step_args: tuple[str, ...] | list[str], seed: int = 0):
        """The trainer.fit flags of run `name` and the config they resolve to."""
        args = [*step_args, *self.plan.toy_args, "--data", self.data, "--device", self.plan.device,
                "--seed", str(seed), "--out", str(self.work / "runs" / name), *self.cache_flags()]  # fmt: skip
        return args, resolve_config(args)

    def estimate(self, name: str, step_args, seed: int = 0) -> float | None:
        return self.cost.estimate(self.fit_config(name, step_args, seed)[1])

    def fit(self, name: str, step_args, deadline: Deadline, seed: int = 0, launcher: tuple[str, ...] = ()) -> dict:
        """One trainer.fit process (through `launcher`, e.g. torchrun): its figures, or its status and reason."""
        args, config = self.fit_config(name, step_args, seed)
        command = [sys.executable, *launcher, "-m", "trainer.fit", *args]
        run = {"name": name, "command": shlex.join(["python", *command[1:]])}
        try:
            completed = self.run(command, deadline)
        except StepSkipped as err:
            return {**run, "status": SKIPPED, "reason": str(err)}
        run["process_s"] = round(completed.seconds, 2)
        report_path = Path(config.out) / "report.json"
        if not completed.ok or not report_path.is_file():
            status = TIMEOUT if completed.timed_out else FAILED
            return {**run, "status": status, "reason": f"{completed.describe()}: {_last_line(completed.output)}"}
        report = json.loads(report_path.read_text())
        self.cost.observe(config, report["steps"], report["timing"]["train_s"], completed.seconds)
        return {**run, "status": PASSED, "run_dir": str(report_path.parent), **summarize_report(report)}


def _last_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1][-300:] if lines else "(no output)"


def _pct(fraction: float | None) -> float | None:
    return None if fraction is None else round(100 * fraction, 3)


def summarize_report(report: dict) -> dict:
    """A trainer report's figures, in the results' units."""
    env, timing = report["environment"], report["timing"]
    summary = {
        "model": report["model"],
        "parameters": report["parameters"],
        "seed": report["config"]["seed"],
        "epochs": report["epochs"],
        "steps": report["steps"],
        "batch_size": report["config"]["batch_size"],
        "train_images": report["data"]["train"],
        "val_images": report["data"]["val"],
        "test_pct": _pct(report["test"]["accuracy"]),
        "test_tta_pct": _pct(report["test_tta"]["accuracy"]),
        "tta_level": report["test_tta"]["level"],
        "val_pct": _pct(report["val"]["accuracy"]) if "val" in report else None,
        **{key: round(value, 3) for key, value in timing.items()},
        "train_images_per_s": report["train_images_per_s"],
        "device": env["device"],
        "device_name": env["device_name"],
        "precision": env["precision"],
        "world_size": env["world_size"],
        "process_group": env.get("process_group"),
    }
    return summary


def mean_sd(values: list[float]) -> dict:
    return {
        "n": len(values),
        "mean": statistics.mean(values) if values else None,
        "sd": statistics.stdev(values) if len(values) > 1 else None,
        "values": values,
    }


def describe_inputs(ctx: Context) -> dict:
    """What the run read: paths, sizes and sha256 of the data and the peer, and the commit gpu_prepare.sh saw."""

    def describe(path: Path) -> dict:
        if not path.is_file():
            return {"path": str(path), "missing": True}
        return {
            "path": str(path),
            "bytes": path.stat().st_size,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        }

    prepared = ctx.repo / ".data" / "revision.txt"
    return {
        "data": describe(Path(ctx.data)),
        "peer": describe(ctx.peer),
        "git_commit": _git_commit(ctx.repo),  # None on the GPU machine, which gets a copy of the tree without .git
        "prepared_at": prepared.read_text().strip() if prepared.is_file() else None,  # written by gpu_prepare.sh
    }


def _git_commit(repo: Path) -> str | None:
    try:
        result = subprocess.run(["git", "-C", str(repo), "describe", "--always", "--dirty"], capture_output=True,
                                text=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


# ------------------------------------------------------------------ 1. environment


def _pytest_summary(output: str) -> str:
    found = re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped|errors?|deselected)\b.*?)\s*=*$", output, re.MULTILINE)
    return found[-1] if found else _last_line(output)


def step_environment(ctx: Context, record: dict, deadline: Deadline) -> None:
    environment = ctx.check(["environment"], deadline)
    ctx.session.results["environment"] = environment
    gpu = environment["gpus"][0] if environment["gpus"] else None
    record.update(gpu=gpu, versions=environment["versions"])
    ctx.session.results["summary"]["machine"] = {
        "gpu": gpu["name"] if gpu else None,
        "gpu_memory_gib": gpu["memory_gib"] if gpu else None,
        "cpu": environment["cpu"],
        "cpu_cores": environment["cpu_cores"],
        **{name: environment["versions"][name] for name in ("python", "torch", "cuda", "cudnn")},
    }
    ctx.session.write()
    if ctx.plan.device == "cuda" and not environment["cuda_available"]:
        raise StepFailed("CUDA is not available here (torch.cuda.is_available() is False)")
    record["decode"] = ctx.check(["decode", "--data", ctx.data, *ctx.cache_flags()], deadline)
    ctx.session.write()
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q", "-rA", "-p", "no:cacheprovider"]
    tests = ctx.run(command, deadline, env={"CIFAR10_JPEG": ctx.data})
    record["pytest"] = {
        "command": shlex.join(["python", *command[1:]]),
        "returncode": tests.returncode,
        "seconds": round(tests.seconds, 2),
        "summary": _pytest_summary(tests.output),
    }
    if not tests.ok:
        raise StepFailed(f"pytest -m gpu: {tests.describe()}: {record['pytest']['summary']}")


# ------------------------------------------------------------------ 2. smoke


def step_smoke(ctx: Context, record: dict, deadline: Deadline) -> None:
    try:
        run = record["run"] = ctx.fit("smoke", ctx.plan.smoke_args, deadline)
        if run["status"] != PASSED:
            raise StepFailed(f"the smoke run did not finish: {run['reason']}")
        record["load_on_cpu"] = ctx.check(["load-on-cpu", run["run_dir"]], deadline, env={"CUDA_VISIBLE_DEVICES": ""})
    except (StepFailed, StepSkipped) as err:
        ctx.session.stop_reason = f"step 2 (smoke) did not pass: {err}"
        raise StepFailed(str(err)) from err


# ------------------------------------------------------------------ 3. versus airbench94


def run_peer(ctx: Context, runs: int, deadline: Deadline) -> dict:
    """airbench94 on the same JPEG copy: its data and patched copy, then (on CUDA) its runs, parsed."""
    work = ctx.work / "airbench94"
    prepare = ["peer-prepare", "--peer", str(ctx.peer), "--data", ctx.data, *ctx.cache_flags(), "--work", str(work),
               "--runs", str(runs), "--limit", str(ctx.plan.peer_images)]  # fmt: skip
    result = {"prepared": ctx.check(prepare, deadline)}
    if not ctx.plan.peer_runs:
        return {**result, "status": NOT_RUN, "reason": "needs CUDA: data written, script patched and byte-compiled"}
    completed = ctx.run([sys.executable, result["prepared"]["script"]], deadline, cwd=work, cap_s=PEER_CAP_S)
    parsed = airbench_peer.parse_output(completed.output)
    peer_runs = [run for run in parsed["runs"] if run["tta_val_acc"] is not None and run["train_s"] is not None]
    result.update(
        status=PASSED if completed.ok and len(peer_runs) == runs else (TIMEOUT if completed.timed_out else FAILED),
        command=f"cd {work} && python {Path(result['prepared']['script']).name}",
        process_s=round(completed.seconds, 2),
        runs=[{**run, "tta_val_acc": _pct(run["tta_val_acc"]), "val_acc": _pct(run["val_acc"])} for run in peer_runs],
        printed_mean_pct=_pct(parsed["printed_mean"]),
        printed_std_pct=_pct(parsed["printed_std"]),
        accuracy_tta_pct=mean_sd([_pct(run["tta_val_acc"]) for run in peer_runs]),
        train_s=mean_sd([run["train_s"] for run in peer_runs]),
        train_and_tta_eval_s=mean_sd([run["total_s"] for run in peer_runs]),
        timing="its own CUDA events: train_s = total_time_seconds at the last epoch (whitening set-up and "
        "training; evaluation excluded), train_and_tta_eval_s = at its eval row (plus its TTA evaluation)",
    )
    if result["status"] != PASSED:
        result["reason"] = f"{completed.describe()}; {len(peer_runs)} of {runs} runs parsed"
    return result


def compare(peer: dict, project: dict) -> dict:
    """The fast recipe against airbench94: train_s ratio and accuracy difference (both with TTA), and the target."""
    if peer.get("status") != PASSED or not project["train_s"]["n"]:
        reason = (
            f"airbench94 {peer.get('status')} ({peer.get('reason', '')}), {project['train_s']['n']} fast-recipe runs"
        )
        return {"measured": False, "reason": reason}
    ratio = project["train_s"]["mean"] / peer["train_s"]["mean"]
    difference = project["test_tta_pct"]["mean"] - peer["accuracy_tta_pct"]["mean"]
    seeds = min(project["train_s"]["n"], peer["train_s"]["n"])
    return {
        "measured": True,
        "train_s_ratio": round(ratio, 4),
        "accuracy_tta_difference_pts": round(difference, 3),
        "seeds": seeds,
        "target": "ratio <= 1.0 and difference >= 0, mean of >= 5 seeds",
        "target_met": ratio <= 1.0 and difference >= 0 and seeds >= 5,
    }


def step_versus_airbench(ctx: Context, record: dict, deadline: Deadline) -> None:
    seeds = ctx.plan.seeds
    peer = record["airbench94"] = run_peer(ctx, seeds, deadline)
    ctx.session.write()
    runs: list[dict] = []
    record["project"] = {"flags": list(ctx.plan.fast_args), "runs": runs}
    for seed in range(seeds):
        name = f"fast-seed{seed}"
        estimate = ctx.estimate(name, ctx.plan.fast_args, seed)
        if estimate is not None and estimate > FIT_MARGIN * deadline.left():
            runs.append(
                {"name": name, "status": SKIPPED, "reason": f"estimated {estimate:.0f} s, {deadline.left():.0f} s left"}
            )
            break
        runs.append(ctx.fit(name, ctx.plan.fast_args, deadline, seed=seed))
        ctx.session.write()
    done = [run for run in runs if run["status"] == PASSED]
    if len(done) < seeds and all(run["status"] in (PASSED, SKIPPED) for run in runs):
        record.update(status=PARTIAL, reason=f"{len(done)} of {seeds} fast-recipe runs fitted the budget")
    record["project"].update(
        test_tta_pct=mean_sd([run["test_tta_pct"] for run in done]),
        test_pct=mean_sd([run["test_pct"] for run in done]),
        train_s=mean_sd([run["train_s"] for run in done]),
    )
    record["comparison"] = ctx.session.results["summary"]["fast_vs_airbench94"] = compare(peer, record["project"])
    if len(done) < seeds and record["status"] != PARTIAL:
        raise StepFailed(f"{len(done)} of {seeds} fast-recipe runs finished: {[run['status'] for run in runs]}")
    if peer["status"] not in (PASSED, NOT_RUN):
        raise StepFailed(f"airbench94: {peer.get('reason')}")


# ------------------------------------------------------------------ 4. ceiling


def step_ceiling(ctx: Context, record: dict, deadline: Deadline) -> None:
    args = list(ctx.plan.ceiling_args)
    config = ctx.fit_config("ceiling", args)[1]
    fitting = ctx.cost.epochs_within(config, FIT_MARGIN * deadline.left())
    record.update(requested_epochs=config.epochs, fitting_epochs=fitting)
    if fitting is not None and fitting < config.epochs:
        if fitting < CEILING_MIN_FRACTION * config.epochs:
            raise StepSkipped(
                f"only {fitting} of {config.epochs:g} epochs of {config.model} fit in the {deadline.left():.0f} s left"
            )
        args += ["--epochs", str(fitting)]
        reason = f"shortened from {config.epochs:g} to {fitting} epochs to fit the {deadline.left():.0f} s left"
        record.update(status=PARTIAL, reason=reason)
    run = record["run"] = ctx.fit("ceiling", args, deadline)
    if run["status"] != PASSED:
        raise StepFailed(f"the ceiling run did not finish: {run['reason']}")
    ctx.session.results["summary"]["ceiling"] = {
        key: run[key] for key in ("model", "epochs", "test_pct", "test_tta_pct", "train_s", "device_name")
    }


# ------------------------------------------------------------------ 5. bundle


def choose_epochs(candidates: list[dict]) -> dict:
    """The candidate with the best validation accuracy (never the test set); the fewer epochs on a tie."""
    done = [c for c in candidates if c["status"] == PASSED and c.get("val_pct") is not None]
    if not done:
        raise StepFailed("no candidate run finished with a validation accuracy")
    return max(done, key=lambda c: (c["val_pct"], -c["epochs"]))


def step_bundle(ctx: Context, record: dict, deadline: Deadline) -> None:
    plan = ctx.plan
    candidates: list[dict] = []
    record.update(flags=list(plan.bundle_args), val_size=plan.bundle_val_size, candidates=candidates)
    for epochs in sorted(plan.bundle_epochs):
        select = [*plan.bundle_args, "--epochs", f"{epochs:g}", "--val-size", str(plan.bundle_val_size)]
        final = [*plan.bundle_args, "--epochs", f"{epochs:g}", "--val-size", "0"]
        name = f"bundle-select-{epochs:g}ep"
        estimates = (ctx.estimate(name, select), ctx.estimate("bundle", final))
        if None not in estimates and sum(estimates) > FIT_MARGIN * deadline.left():
            candidates.append(
                {
                    "name": name,
                    "epochs": epochs,
                    "status": SKIPPED,
                    "reason": f"it and its retraining need ~{sum(estimates):.0f} s, {deadline.left():.0f} s left",
                }
            )
            break
        candidates.append({"epochs": epochs, **ctx.fit(name, select, deadline)})
        ctx.session.write()
    if all(c["status"] == SKIPPED for c in candidates):
        raise StepSkipped(f"no candidate fits: {candidates[0]['reason']}")
    chosen = choose_epochs(candidates)
    if any(c["status"] == SKIPPED for c in candidates):
        record.update(status=PARTIAL, reason="chosen among the candidates that fitted the budget")
    record["chosen_epochs"] = chosen["epochs"]
    record["chosen_by"] = f"best validation accuracy (no TTA) on {plan.bundle_val_size} held-out training images"
    final = [*plan.bundle_args, "--epochs", f"{chosen['epochs']:g}", "--val-size", "0"]
    run = record["run"] = ctx.fit("bundle", final, deadline)
    if run["status"] != PASSED:
        raise StepFailed(f"the bundle's run on all training images did not finish: {run['reason']}")
    loaded = record["load_on_cpu"] = ctx.check(["load-on-cpu", run["run_dir"]], deadline, {"CUDA_VISIBLE_DEVICES": ""})
    if loaded["model_pt_bytes"] > SIZE_LIMIT_BYTES:
        raise StepFailed(f"model.pt is {loaded['model_pt_bytes']:,} bytes, over the {SIZE_LIMIT_BYTES:,} a run returns")
    shutil.copyfile(Path(run["run_dir"]) / "model.pt", ctx.out / BUNDLE_NAME)
    shutil.copyfile(Path(run["run_dir"]) / "report.json", ctx.out / BUNDLE_REPORT_NAME)
    ceiling = ctx.session.results["summary"].get("ceiling")
    difference = run["test_pct"] - ceiling["test_pct"] if ceiling else None
    summary = ctx.session.results["summary"]["bundle"] = {
        "model": run["model"],
        "epochs": run["epochs"],
        "test_pct": run["test_pct"],
        "test_tta_pct": run["test_tta_pct"],
        "onnx_fp32_bytes_estimate": loaded["fp32_weight_bytes"],
        "onnx_within_16mb": loaded["fp32_weight_bytes"] <= SIZE_LIMIT_BYTES,
        "model_pt_bytes": loaded["model_pt_bytes"],
        "file": BUNDLE_NAME,
        "ceiling_test_pct": ceiling["test_pct"] if ceiling else None,
        "difference_to_ceiling_pts": None if difference is None else round(difference, 3),
        "target": f"test accuracy (no TTA) within {CEILING_TOLERANCE_PTS} point of the ceiling, ONNX <= 16 MB",
        "target_met": None
        if difference is None or ctx.plan.device != "cuda"  # a dry run's toy figures judge nothing
        else difference >= -CEILING_TOLERANCE_PTS and loaded["fp32_weight_bytes"] <= SIZE_LIMIT_BYTES,
    }
    if not summary["onnx_within_16mb"]:
        raise StepFailed(f"{run['model']}'s fp32 weights are {loaded['fp32_weight_bytes']:,} bytes, over 16 MB")


# ------------------------------------------------------------------ 6. NCCL


def step_nccl(ctx: Context, record: dict, deadline: Deadline) -> None:
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1")
    run = record["run"] = ctx.fit("nccl", ctx.plan.nccl_args, deadline, launcher=launcher)
    if run["status"] != PASSED:
        raise StepFailed(f"the torchrun run did not finish: {run['reason']}")
    expected = "nccl" if ctx.plan.device == "cuda" else "gloo"
    if run["process_group"] != expected or run["world_size"] != 1:
        raise StepFailed(
            f"expected one rank in a {expected} group, the report says {run['world_size']} rank(s), "
            f"process group {run['process_group']!r}"
        )


STEP_FUNCTIONS = (step_environment, step_smoke, step_versus_airbench, step_ceiling, step_bundle, step_nccl)
