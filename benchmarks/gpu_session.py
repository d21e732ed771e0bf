"""The machinery of benchmarks.gpu_run: steps with time limits, subprocesses with timeouts, the log and the results.

- Every subprocess runs in a session of its own and is streamed line by line into the log (and stdout) as it
  runs; at its timeout its whole process group is ended (SIGTERM, then SIGKILL), so a killed pytest or torchrun
  leaves no trainer behind on the GPU.
- Each step gets what is left of the budget minus what the steps after it hold in reserve (but at least its
  own reserve), at most its cap; a step whose reserve no longer fits in the budget is skipped with the reason.
- The results JSON is rewritten (atomically) whenever something is recorded, so a run cut off at any moment
  still leaves its results in the output folder.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.gpu_budget import Budget

log = logging.getLogger("gpu_run")

# A step's status; PARTIAL: it ran and passed, but some of its runs did not fit the budget (see its record);
# INTERRUPTED: the run itself was stopped (SIGTERM, Ctrl-C) during the step.
PENDING, RUNNING, PASSED, PARTIAL, FAILED, TIMEOUT, SKIPPED, ERROR, NOT_RUN, INTERRUPTED = (
    "pending",
    "running",
    "passed",
    "partial",
    "failed",
    "timeout",
    "skipped",
    "error",
    "not_run",
    "interrupted",
)
KILL_GRACE_S = 15  # after SIGTERM, before SIGKILL
LEFTOVER_WAIT_S = 5  # for the end of a finished subprocess's output; longer: a process it left behind holds it
OUTPUT_KEPT_LINES = 20_000  # of a subprocess's output, for parsing (all of it goes to the log as it comes)


class StepSkipped(Exception):
    """The step (or the rest of it) does not fit, or cannot run here; the message says why."""


class StepFailed(Exception):
    """The step ran and did not do what it should; the message says what."""


@dataclasses.dataclass(frozen=True)
class Step:
    number: int
    name: str
    title: str
    reserve_s: float  # held back from the steps before it; the least it needs to be worth starting
    cap_s: float  # the most it may take


@dataclasses.dataclass
class Completed:
    """A finished (or killed) subprocess."""

    command: list[str]
    returncode: int | None  # None: killed at its timeout
    seconds: float
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def timed_out(self) -> bool:
        return self.returncode is None

    def describe(self) -> str:
        if self.timed_out:
            return f"killed at its timeout after {self.seconds:.0f} s"
        return f"exit status {self.returncode} after {self.seconds:.0f} s"


class Deadline:
    """The end of a step's time."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def setup_logging(log_path: Path) -> None:
    """Everything to stdout and to `log_path` (a tee), flushed line by line: a run cut off keeps its log."""
    formatter = logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(log_path, mode="a")):
        handler.setFormatter(formatter)
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def _end_group(process: subprocess.Popen) -> None:
    """SIGTERM to the subprocess's group (it leads its own session), SIGKILL after KILL_GRACE_S."""
    for sig, wait_s in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, KILL_GRACE_S)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_command(command: list[str], *, timeout_s: float, env: dict, cwd: Path) -> Completed:
    """Run `command`, streaming its merged stdout/stderr into the log; end it (and its children) at the timeout."""
    if timeout_s <= 1:
        raise StepSkipped(f"no time left to run {' '.join(command[:4])} ...")
    start = time.monotonic()
    kept: collections.deque[str] = collections.deque(maxlen=OUTPUT_KEPT_LINES)
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
        bufsize=1,
        start_new_session=True,
    )
    log.info("$ %s   (pid %d, timeout %.0f s, in %s)", " ".join(command), process.pid, timeout_s, cwd)

    def pump() -> None:
        for line in process.stdout:
            line = line.rstrip("\n")
            kept.append(line)
            log.info("  | %s", line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    returncode: int | None
    try:
        returncode = process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        log.warning("timeout: %.0f s passed; ending %s", timeout_s, " ".join(command[:4]))
        _end_group(process)
        returncode = None
    finally:
        if process.poll() is None:  # the orchestrator itself is being stopped
            _end_group(process)
    reader.join(LEFTOVER_WAIT_S)
    if reader.is_alive():  # it exited, but processes it started still hold its output: they go too
        log.warning("processes left behind by %s hold its output; ending its process group", " ".join(command[:4]))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        reader.join(KILL_GRACE_S)
    completed = Completed(command, returncode, time.monotonic() - start, "\n".join(kept))
    log.info("  -> %s", completed.describe())
    return completed


class Session:
    """The output folder, the results JSON, the budget and the order of steps."""

    def __init__(self, out: Path, results_name: str, results: dict, steps: tuple[Step, ...], budget: Budget) -> None:
        self.out = out
        self.results_path = out / results_name
        self.results = results
        self.steps = steps
        self.budget = budget
        self.selected = {step.number for step in steps}
        self.stop_reason: str | None = None
        results["steps"] = {
            step.name: {"title": step.title, "status": PENDING, "reserve_s": step.reserve_s, "cap_s": step.cap_s}
            for step in steps
        }
        self.write()

    def write(self) -> None:
        tmp = self.results_path.with_name(f".{self.results_path.name}.tmp")
        tmp.write_text(json.dumps(self.results, indent=2, default=str) + "\n")
        os.replace(tmp, self.results_path)

    def held_for_later(self, step: Step) -> float:
        return sum(s.reserve_s for s in self.steps if s.number > step.number and s.number in self.selected)

    def run_step(self, step: Step, function: Callable[[dict, Deadline], None]) -> None:
        """Run `function(record, deadline)` as `step`, if it fits; record its outcome and seconds either way."""
        record = self.results["steps"][step.name]
        remaining, held = self.budget.remaining(), self.held_for_later(step)
        # At least its reserve (while the budget has it; steps run in order), at most what leaves the later
        # steps theirs, and never more than its cap.
        available = min(step.cap_s, max(remaining - held, step.reserve_s))
        if self.stop_reason or step.number not in self.selected or remaining < step.reserve_s:
            if self.stop_reason:
                reason = self.stop_reason
            elif step.number not in self.selected:
                reason = "not selected (--steps)"
            else:
                reason = f"needs at least {step.reserve_s:.0f} s; {remaining:.0f} s of the budget left"
            record.update(status=SKIPPED, reason=reason)
            log.info("=== step %d (%s) skipped: %s", step.number, step.title, reason)
            self.write()
            return
        record.update(status=RUNNING, started_utc=utc_now(), allowed_s=round(available, 1))
        log.info(
            "=== step %d: %s (up to %.0f s; %.0f s of the budget left)", step.number, step.title, available, remaining
        )
        self.write()
        start = time.monotonic()
        try:
            function(record, Deadline(available))
            if record["status"] == RUNNING:
                record["status"] = PASSED
        except StepSkipped as err:
            record.update(status=SKIPPED, reason=str(err))
        except StepFailed as err:
            record.update(status=FAILED, reason=str(err))
        except Exception as err:  # a bug or an unexpected environment: keep the traceback, go on with the next step
            log.exception("step %d raised", step.number)
            record.update(status=ERROR, reason=f"{type(err).__name__}: {err}")
        except BaseException as err:  # SystemExit from SIGTERM, KeyboardInterrupt: record, then stop
            record.update(status=INTERRUPTED, reason=f"the run was stopped ({type(err).__name__} {err})")
            raise
        finally:
            record["seconds"] = round(time.monotonic() - start, 2)
            log.info(
                "=== step %d: %s in %.1f s%s",
                step.number,
                record["status"],
                record["seconds"],
                f" ({record['reason']})" if record.get("reason") else "",
            )
            self.write()
