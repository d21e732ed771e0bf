"""The service as a managed subprocess, for tests and benchmarks (as Starlette's TestClient is in-process).

`ServedClassifier` starts `bentoml serve` from the repository root (which reads the service from pyproject.toml's
[tool.bentoml.build]) on a free loopback port in a new session: BentoML's arbiter (circus) then starts the
service's workers as processes of their own, each in its own session too, so stopping ends the arbiter's group
and then any worker still alive. `ServedProcess` is the same for any server command (benchmarks/served.py
starts the load benchmark's peers with it).

    with ServedClassifier("--arg", "model=exported_models/default", home=tmp / "home", log_path=tmp / "log") as s:
        s.wait_ready()
        httpx.post(f"{s.url}/classify", files=...)
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TypeVar

REPO = Path(__file__).resolve().parent.parent
Served = TypeVar("Served", bound="ServedProcess")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_arguments(settings: dict[str, object]) -> list[str]:
    """`--arg name=value` for each service setting."""
    return [item for name, value in settings.items() for item in ("--arg", f"{name}={value}")]


class ServedProcess:
    """A server subprocess in its own session, ready when GET `ready_path` answers 200; a context manager
    that always ends it and every process it started on exit."""

    ready_path = "/readyz"

    def __init__(
        self, command: list[str], port: int, log_path: Path, env: dict[str, str] | None = None, cwd: Path = REPO
    ) -> None:
        self.port = port
        self.cwd = cwd
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.command = command
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None

    def start(self: Served) -> Served:
        """Start the process group (not waiting for readiness)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command, cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self

    def log(self, tail: int = 6000) -> str:
        """The last `tail` characters of the server's combined stdout/stderr."""
        return self.log_path.read_text(errors="replace")[-tail:] if self.log_path.exists() else ""

    def readyz(self) -> int | None:
        """Status code of GET `ready_path`, or None when nothing answers yet."""
        try:
            with urllib.request.urlopen(f"{self.url}{self.ready_path}", timeout=5) as response:
                return response.status
        except urllib.error.HTTPError as err:
            return err.code
        except OSError:
            return None

    def wait_ready(self, timeout: float = 180) -> None:
        """Poll `ready_path` until 200; raise (with the log) if the process exits or the time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.command[2:4]} exited with {self.process.returncode}:\n{self.log()}")
            if self.readyz() == 200:
                return
            time.sleep(0.2)
        raise RuntimeError(f"{self.command[2:4]} not ready after {timeout:.0f} s:\n{self.log()}")

    def stop(self) -> None:
        """End the process group and every process it started, gracefully first (SIGTERM, 15 s)."""
        if self.process is None:
            return
        import psutil  # with bentoml; imported here so that test helpers load where it is absent (the GPU machine)

        # circus (bentoml serve) starts each worker with setsid, so they are not in the group: list them first.
        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)  # the arbiter (or uvicorn) stops its workers on SIGTERM
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=15)
        _, alive = psutil.wait_procs(children, timeout=5)
        for process in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=5)

    def __enter__(self: Served) -> Served:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


class ServedClassifier(ServedProcess):
    """`bentoml serve` in the repository root (the service pyproject.toml names), extra `args` such as
    `--arg name=value`, BENTOML_HOME=home."""

    def __init__(self, *args: str, home: Path, log_path: Path, env: dict[str, str] | None = None) -> None:
        port = free_port()
        serve = ["-m", "bentoml", "serve", "--host", "127.0.0.1", "-p", str(port), *args]
        env = {"BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "1", **(env or {})}
        super().__init__([sys.executable, *serve], port, log_path, env)
        self.home = home
