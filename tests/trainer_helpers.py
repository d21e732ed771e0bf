"""Helpers for the trainer and exporter tests: `trainer.fit` as a background process, checkpoint comparison.

The tiny configuration trains the seed's small CNN on 1,000 shared images with one
thread, so a whole run costs seconds even on two busy cores, while still going
through lookahead averaging, alternating flips, translation and a validation split.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from helpers import REPO

TINY_EPOCHS = 4
TINY_STEPS_PER_EPOCH = 10


def tiny_fit_args(data: Path, out: Path, *extra: str) -> list[str]:
    """`trainer.fit` flags for a deterministic 4-epoch run of 10 steps each (CPU, one thread)."""
    return [
        "--data", str(data), "--model", "baseline_cnn", "--train-subset", "1000", "--val-size", "500",
        "--epochs", str(TINY_EPOCHS), "--batch-size", "100", "--optimizer", "adam", "--lr", "2e-3",
        "--averaging", "lookahead", "--translate", "2", "--flip", "alternating", "--tta", "0",
        "--device", "cpu", "--precision", "fp32", "--threads", "1", "--seed", "3", "--out", str(out), *extra,
    ]  # fmt: skip


class FitProcess:
    """`python -m trainer.fit ARGS` started in the background, its output going to a log file."""

    def __init__(
        self, args: list[str], log_path: Path, module: list[str] | None = None, env: dict[str, str] | None = None
    ) -> None:
        self.log_path = log_path
        self._log = log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", *(module or ["trainer.fit"]), *args],
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        )

    def running(self) -> bool:
        return self.process.poll() is None

    def wait(self, timeout: float = 600) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        """SIGKILL: no handler runs, nothing is flushed or cleaned up, as in a crash or an OOM kill."""
        self.process.send_signal(signal.SIGKILL)
        self.wait()

    def log(self, tail: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]

    def wait_for(self, condition, what: str, timeout: float = 300) -> None:
        """Poll `condition()` every 20 ms while the process runs."""
        deadline = time.monotonic() + timeout
        while not condition():
            if not self.running():
                raise AssertionError(f"the run exited ({self.process.returncode}) before {what}\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"timed out waiting for {what}\n{self.log()}")
            time.sleep(0.02)


def file_identity(path: Path) -> tuple[int, int] | None:
    """(inode, mtime_ns): changes whenever an atomic save replaces the file."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_state(run: Path) -> dict:
    return torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)


def tensors_in(value, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor inside nested dicts/lists, keyed by its path."""
    if torch.is_tensor(value):
        return {prefix: value}
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list | tuple) else []
    found: dict[str, torch.Tensor] = {}
    for key, item in items:
        found.update(tensors_in(item, f"{prefix}/{key}"))
    return found


def assert_bitwise_equal(a: dict, b: dict, what: str) -> None:
    ta, tb = tensors_in(a), tensors_in(b)
    assert ta.keys() == tb.keys(), f"{what}: different entries {sorted(ta.keys() ^ tb.keys())[:5]}"
    assert ta, f"{what}: no tensors"
    differing = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not differing, f"{what}: {len(differing)} of {len(ta)} tensors differ, e.g. {differing[:5]}"
