"""The machinery behind benchmarks.gpu_run: the budget's clock, the cost model, the runs, the results file.

- One code path plans and runs: with --plan the clock is virtual and a run only advances it by its estimate,
  so the plan printed before a run takes the decisions the run will take (with the costs then known).
- A run starts only if 1.1 x its estimate fits in what is left of the budget. It is killed at 3 x its
  estimate + the plan's slack, or at the end of the budget: its whole process group (SIGTERM, then SIGKILL),
  so a killed pytest or torchrun leaves nothing on the GPU. A killed run ends its step; the step's finished
  runs stay in the results.
- Every finished run teaches the cost model what it measured, and the results file is rewritten (atomically)
  the moment anything is recorded: a run cut off at any point keeps everything it measured.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import itertools
import json
import logging
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks import airbench_peer
from benchmarks.gpu_checks import parse_result

if TYPE_CHECKING:
    from benchmarks.gpu_run import Plan

log = logging.getLogger("gpu_run")
REPO = Path(__file__).resolve().parent.parent
CIFAR10_TRAIN_IMAGES = 50_000
FIT_MARGIN = 1.1  # a run starts only if 1.1 x its estimate fits in what is left of the budget
TIMEOUT_FACTOR = 3  # a run is killed at 3 x its estimate + the plan's slack (or at the end of the budget)
KILL_GRACE_S = 10  # after SIGTERM, before SIGKILL
# A run's or a step's status. PARTIAL: passed, but some of its runs did not fit; TIMEOUT: a run was killed at
# its timeout (the step's finished runs are kept); PLANNED: --plan, it fits.
PLANNED, RUNNING, PASSED, PARTIAL, TIMEOUT, FAILED, SKIPPED, ERROR, INTERRUPTED = (
    "planned", "running", "passed", "partial", "timeout", "failed", "skipped", "error", "interrupted",
)  # fmt: skip


class StepSkipped(Exception):
    """The step (or the rest of it) does not fit or cannot run here; the message says why."""


class StepFailed(Exception):
    """A run did not do what it should; the message says what."""


class StepTimeout(Exception):
    """A run was killed at its timeout; its step's finished runs are kept."""


@dataclasses.dataclass(frozen=True)
class Costs:
    """The seconds a run is planned with (gpu_run's plan lists the assumed values; runs measure them)."""

    process_s: float  # a trainer.fit process beside its epochs: imports, CUDA, data, warm-up, final TTA, plots
    epoch_s: dict[str, float]  # training steps of one epoch of 50,000 images, per model
    epoch_extra_s: float  # each epoch beside training: validation and the fsync'ed checkpoint
    launcher_s: float  # torchrun and the process group's start
    peer_process_s: float  # an airbench94 process: imports, data to the GPU, its untimed warm-up run
    peer_run_s: float  # one airbench94 run: training and its TTA evaluation
    prepare_s: float  # the prepare check: versions, data decoded once, airbench94's data
    check_s: float  # a small check (a model loaded on the CPU)
    pytest_s: float  # pytest -m gpu


class CostModel:
    """Costs assumed until measured. Overheads: the largest measured (the safe side); a model's seconds per
    epoch: its last run; an unmeasured model's: its assumed value scaled as the measured models' were off."""

    def __init__(self, assumed: Costs, measured: dict | None = None) -> None:
        self.assumed = assumed
        self.measured: dict = {"epoch_s": {}, **(measured or {})}

    def get(self, name: str) -> float:
        return self.measured.get(name, getattr(self.assumed, name))

    def observe(self, name: str, seconds: float) -> None:
        """A measured overhead: it replaces the assumed one, and only a larger measurement replaces it."""
        self.measured[name] = max(seconds, 0.0, self.measured.get(name, 0.0))

    def epoch_seconds(self, model: str, images: int) -> float:
        """Training seconds of one epoch of `images` images of `model`."""
        measured, assumed = self.measured["epoch_s"], self.assumed.epoch_s
        if model not in measured and model not in assumed:
            raise ValueError(f"no assumed seconds per epoch for {model!r} (known: {', '.join(assumed)}): add it")
        ratios = [measured[m] / assumed[m] for m in measured if m in assumed]
        per_epoch = measured.get(model) or assumed[model] * (statistics.mean(ratios) if ratios else 1.0)
        return per_epoch * images / CIFAR10_TRAIN_IMAGES

    def fit_s(self, model: str, epochs: float, images: int, launcher: bool = False) -> float:
        """Seconds of a whole trainer.fit process (through torchrun with `launcher`)."""
        epoch = self.epoch_seconds(model, images)
        start = self.get("process_s") + (self.get("launcher_s") if launcher else 0.0)
        return start + epochs * epoch + math.ceil(epochs) * self.get("epoch_extra_s")

    def epochs_within(self, model: str, images: int, seconds: float) -> int:
        """The most whole epochs of `model` whose process fits in `seconds`."""
        per_epoch = self.epoch_seconds(model, images) + self.get("epoch_extra_s")
        return max(0, int((seconds - self.get("process_s")) // per_epoch))

    def observe_fit(self, report: dict, metrics: list[dict], process_s: float, launcher: bool) -> None:
        """Learn from a finished trainer run: its report, its metrics.jsonl rows and its process's seconds."""
        train_s, epochs, images = report["timing"]["train_s"], report["epochs"], report["data"]["train"]
        # Between two epochs' rows: the first one's checkpoint, then training and validation of the next.
        extras = [b["wall_time_s"] - a["wall_time_s"] - b["epoch_time_s"] for a, b in itertools.pairwise(metrics)]
        if extras:
            self.observe("epoch_extra_s", statistics.mean(extras))
        self.measured["epoch_s"][report["model"]] = train_s / epochs * CIFAR10_TRAIN_IMAGES / images
        extra = statistics.mean(extras) if extras else self.get("epoch_extra_s")
        outside = process_s - train_s - len(metrics) * extra
        if launcher:
            self.observe("launcher_s", outside - self.get("process_s"))
        else:
            self.observe("process_s", outside)

    def observe_peer(self, process_s: float, run_s: float) -> None:
        self.measured["peer_run_s"] = run_s
        self.observe("peer_process_s", process_s - run_s)

    def now(self) -> dict:
        """Every cost as it stands, measured where measured."""
        costs = {f.name: self.get(f.name) for f in dataclasses.fields(Costs)}
        costs["epoch_s"] = {**self.assumed.epoch_s, **self.measured["epoch_s"]}
        return {name: _rounded(value) for name, value in costs.items()}


def _rounded(value):
    return {k: round(v, 3) for k, v in value.items()} if isinstance(value, dict) else round(value, 3)


class Clock:
    """The budget's seconds, counted from creation; virtual (--plan): only `spend` advances it."""

    def __init__(self, total_s: float, virtual: bool = False) -> None:
        self.total_s, self.virtual = total_s, virtual
        self.start, self.spent = time.monotonic(), 0.0

    def elapsed(self) -> float:
        return self.spent if self.virtual else time.monotonic() - self.start

    def left(self) -> float:
        return self.total_s - self.elapsed()

    def spend(self, seconds: float) -> None:
        self.spent += seconds


@dataclasses.dataclass
class Completed:
    """A finished (or killed) subprocess."""

    returncode: int | None  # None: killed at its timeout
    seconds: float
    output: str

    def describe(self) -> str:
        if self.returncode is None:
            return f"killed at its timeout after {self.seconds:.0f} s"
        return f"exit status {self.returncode} after {self.seconds:.0f} s"


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def setup_logging(log_path: Path) -> None:
    """Everything to stdout and to `log_path` (a tee), line by line: a run cut off keeps its log."""
    formatter = logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(log_path, mode="a")):
        handler.setFormatter(formatter)
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def _end_group(process: subprocess.Popen) -> None:
    """SIGTERM to the whole group the subprocess leads, SIGKILL to what is left of it after KILL_GRACE_S."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        deadline = time.monotonic() + KILL_GRACE_S
        try:
            os.killpg(process.pid, sig)
            while time.monotonic() < deadline:
                process.poll()  # reap the leader: a zombie still counts in its group
                os.killpg(process.pid, 0)
                time.sleep(0.05)
        except ProcessLookupError:
            return


def run_command(command: list[str], *, timeout_s: float, env: dict, cwd: Path) -> Completed:
    """Run `command`, streaming its merged output into the log; end its process group at the timeout."""
    start, kept = time.monotonic(), collections.deque(maxlen=20_000)
    process = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, errors="replace",
                               start_new_session=True)  # fmt: skip
    log.info("$ %s   (pid %d, timeout %.0f s)", " ".join(command), process.pid, timeout_s)

    def pump() -> None:
        for line in process.stdout:
            kept.append(line.rstrip("\n"))
            log.info("  | %s", kept[-1])

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        returncode = process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        log.warning("timeout: %.0f s passed; ending %s", timeout_s, " ".join(command[:4]))
        returncode = None
    finally:
        _end_group(process)  # at a timeout, at SIGTERM of gpu_run, and whatever a finished run left behind
        process.wait()
    reader.join(KILL_GRACE_S)
    completed = Completed(returncode, time.monotonic() - start, "\n".join(kept))
    log.info("  -> %s", completed.describe())
    return completed


def last_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1][-300:] if lines else "(no output)"


@dataclasses.dataclass
class Session:
    """One gpu_run invocation (or its plan): inputs, folders, clock, costs and the results being written."""

    plan: Plan
    clock: Clock
    costs: CostModel
    results: dict
    results_path: Path | None = None  # None: --plan, nothing written
    work: Path = Path("/nonexistent")
    data: str = ""
    peer_script: Path = Path("airbench94.py")

    @property
    def planning(self) -> bool:
        return self.clock.virtual

    def write(self) -> None:
        if self.results_path is None:
            return
        tmp = self.results_path.with_name(f".{self.results_path.name}.tmp")
        costs = {"assumed": dataclasses.asdict(self.costs.assumed), "measured": self.costs.measured}
        costs["now"] = self.costs.now()
        tmp.write_text(json.dumps({**self.results, "costs": costs}, indent=2, default=str) + "\n")
        os.replace(tmp, self.results_path)

    def fits(self, seconds: float) -> bool:
        return FIT_MARGIN * seconds <= self.clock.left()

    def process(self, record: dict, name: str, command: list[str], estimate_s: float, *, cwd: Path | None = None,
                env: dict | None = None, **fields) -> tuple[dict, Completed | None]:  # fmt: skip
        """One subprocess of a step, recorded in its "runs"; the Completed is None when planned or skipped."""
        run = {"name": name, **fields, "estimate_s": round(estimate_s, 1)}
        record.setdefault("runs", []).append(run)
        left = self.clock.left()
        if not self.fits(estimate_s):
            run.update(status=SKIPPED, reason=f"needs ~{estimate_s:.0f} s, {max(left, 0):.0f} s of the budget left")
            self.write()
            return run, None
        if self.planning:
            self.clock.spend(estimate_s)
            run["status"] = PLANNED
            return run, None
        timeout = min(left, TIMEOUT_FACTOR * estimate_s + self.plan.slack_s)
        run.update(status=RUNNING, started_utc=utc_now(), timeout_s=round(timeout))
        self.write()
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_MININTERVAL": "30", "PYTHONPATH": path, **(env or {})}
        completed = run_command(command, timeout_s=timeout, env=env, cwd=cwd or REPO)
        run.update(process_s=round(completed.seconds, 2), status=PASSED)
        if completed.returncode != 0:
            reason = f"{completed.describe()}: {last_line(completed.output)}"
            run.update(status=TIMEOUT if completed.returncode is None else FAILED, reason=reason)
            self.write()
            raise (StepTimeout if completed.returncode is None else StepFailed)(f"{name}: {reason}")
        return run, completed

    def trainer_args(self, name: str, args: tuple[str, ...] | list[str], seed: int = 0) -> list[str]:
        """trainer.fit flags of run `name`: the step's, then the plan's toy flags, then where and what."""
        out = self.work / "runs" / re.sub(r"\W+", "-", name)
        return [*args, *self.plan.toy, "--data", self.data, "--device", self.plan.device, "--seed", str(seed),
                "--out", str(out)]  # fmt: skip

    def fit_estimate(self, args: list[str], launcher: bool = False) -> float:
        config = resolve_config(self.trainer_args("estimate", args))
        return self.costs.fit_s(config.model, config.epochs, train_images(config), launcher)

    def fit(self, record: dict, name: str, args, *, seed: int = 0, launcher: tuple[str, ...] = (), **fields) -> dict:
        """One trainer.fit process (through `launcher`, e.g. torchrun): its run record, with its figures."""
        argv = self.trainer_args(name, args, seed)
        estimate = self.fit_estimate(args, bool(launcher))
        run, completed = self.process(record, name, [sys.executable, *launcher, "-m", "trainer.fit", *argv],
                                      estimate, **fields)  # fmt: skip
        if completed is None:
            return run
        out = Path(argv[argv.index("--out") + 1])
        if not (out / "report.json").is_file():
            run.update(status=FAILED, reason=f"no report.json in {out}")
            raise StepFailed(f"{name}: {run['reason']}")
        report = json.loads((out / "report.json").read_text())
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        self.costs.observe_fit(report, metrics, completed.seconds, bool(launcher))
        run.update(run_dir=str(out), **summarize_report(report))
        self.write()
        return run

    def peer(self, record: dict, name: str, script: Path, args: list[str], **fields) -> dict:
        """One airbench94 process of one run (after its warm-up run), parsed from its printed table."""
        estimate = self.costs.get("peer_process_s") + self.costs.get("peer_run_s")
        command = [sys.executable, str(script), *args]
        run, completed = self.process(record, name, command, estimate, cwd=script.parent, **fields)
        if completed is None:
            return run
        runs = [r for r in airbench_peer.parse_output(completed.output)["runs"] if r["train_s"] is not None]
        if len(runs) != 1 or runs[0]["tta_val_acc"] is None:
            run.update(status=FAILED, reason=f"expected one run in its table, parsed {len(runs)}")
            raise StepFailed(f"{name}: {run['reason']}")
        peer = runs[0]  # airbench94 calls the test set "val"
        self.costs.observe_peer(completed.seconds, peer["total_s"])
        run.update(test_tta_pct=_pct(peer["tta_val_acc"]), test_pct=_pct(peer["val_acc"]), train_s=peer["train_s"],
                   train_and_tta_s=peer["total_s"], epochs=peer["epochs"])  # fmt: skip
        self.write()
        return run

    def check(self, record: dict, name: str, args: list[str], cost: str, env: dict | None = None) -> dict:
        """`python -m benchmarks.gpu_checks ARGS`: its run record, with its JSON result."""
        command = [sys.executable, "-m", "benchmarks.gpu_checks", *args]
        run, completed = self.process(record, name, command, self.costs.get(cost), env=env)
        if completed is None:
            return run
        run["result"] = parse_result(completed.output)
        if run["result"] is None:
            run.update(status=FAILED, reason=f"no result line: {last_line(completed.output)}")
            raise StepFailed(f"{name}: {run['reason']}")
        self.costs.observe(cost, completed.seconds)
        self.write()
        return run

    def run_step(self, name: str, function: Callable[[Session, dict], None], stop_reason: str | None) -> dict:
        """Run `function(session, record)` as step `name` and record its outcome and seconds, whatever happens."""
        record = self.results["steps"][name]
        if stop_reason:
            record.update(status=SKIPPED, reason=stop_reason)
            self.write()
            return record
        start = self.clock.elapsed()
        record.update(status=RUNNING, started_s=round(start, 1))
        if not self.planning:
            log.info("=== %s: %s (%.0f s of the budget left)", name, record["title"], self.clock.left())
        self.write()
        try:
            function(self, record)
            runs = [run["status"] for run in record.get("runs", [])]
            if record["status"] == RUNNING:
                done = PLANNED if self.planning else PASSED
                record["status"] = done if SKIPPED not in runs else PARTIAL if done in runs else SKIPPED
        except StepSkipped as err:
            record.update(status=SKIPPED, reason=str(err))
        except StepTimeout as err:
            record.update(status=TIMEOUT, reason=f"{err}; the runs it finished are kept")
        except StepFailed as err:
            record.update(status=FAILED, reason=str(err))
        except Exception as err:  # a bug or an unexpected environment: keep the traceback, go on
            log.exception("step %s raised", name)
            record.update(status=ERROR, reason=f"{type(err).__name__}: {err}")
        except BaseException as err:  # SIGTERM (SystemExit), Ctrl-C: record, then stop
            record.update(status=INTERRUPTED, reason=f"the run was stopped ({type(err).__name__} {err})")
            raise
        finally:
            record["seconds"] = round(self.clock.elapsed() - start, 1)
            if not self.planning:
                reason = f" ({record['reason']})" if record.get("reason") else ""
                log.info("=== %s: %s in %.1f s%s", name, record["status"], record["seconds"], reason)
            self.write()
        return record


def resolve_config(args: list[str]):
    """The TrainConfig that `python -m trainer.fit ARGS` trains with (recipe defaults applied)."""
    from trainer.config import build_parser, config_from_args

    return config_from_args(build_parser().parse_args(args))


def train_images(config) -> int:
    images = CIFAR10_TRAIN_IMAGES - config.val_size
    return min(images, config.train_subset) if config.train_subset else images


def _pct(fraction: float | None) -> float | None:
    return None if fraction is None else round(100 * fraction, 3)


def summarize_report(report: dict) -> dict:
    """A trainer report's figures, in the results' units (percent, seconds)."""
    env = report["environment"]
    return {
        "model": report["model"], "seed": report["config"]["seed"], "epochs": report["epochs"],
        "train_images": report["data"]["train"], "val_images": report["data"]["val"],
        "test_pct": _pct(report["test"]["accuracy"]), "test_tta_pct": _pct(report["test_tta"]["accuracy"]),
        "tta_level": report["test_tta"]["level"], "val_pct": _pct(report.get("val", {}).get("accuracy")),
        **{key: round(value, 3) for key, value in report["timing"].items()},
        "device_name": env["device_name"], "precision": env["precision"], "world_size": env["world_size"],
        "process_group": env.get("process_group"),
    }  # fmt: skip


def mean_sd(values: list[float]) -> dict:
    return {
        "n": len(values),
        "mean": round(statistics.mean(values), 3) if values else None,
        "sd": round(statistics.stdev(values), 3) if len(values) > 1 else None,
    }
