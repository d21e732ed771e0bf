"""The load benchmark's peers as managed subprocesses (serving/testing.py starts the service itself).

`ServedPeer` starts one of the peers the load benchmark compares the service
with, each from its row in `PEERS` (command, environment, readiness path):
the hand-written FastAPI peer (benchmarks/peer_fastapi.py, `uvicorn --workers
N`), BentoML as its examples write a service (benchmarks/peer_bentoml.py,
`bentoml serve`, its own BENTOML_HOME) and LitServe (benchmarks/peer_litserve.py).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from serving.testing import ServedProcess, free_port


@dataclass(frozen=True)
class Peer:
    """How to start one peer: the arguments after `python` ({port} and {workers} filled in), readiness path,
    the libraries whose versions the benchmark reports for it, and whether it needs a BENTOML_HOME."""

    label: str
    command: str
    ready_path: str
    libraries: tuple[str, ...]
    bentoml_home: bool = False


PEERS = {
    "fastapi": Peer(
        "FastAPI peer",
        "-m uvicorn benchmarks.peer_fastapi:app --host 127.0.0.1 --port {port} --workers {workers} --no-access-log",
        "/healthz",
        ("fastapi", "starlette", "uvicorn", "python-multipart", "onnxruntime"),
    ),
    "bentoml": Peer(
        "BentoML peer",
        "-m bentoml serve benchmarks.peer_bentoml:ImageClassifier --host 127.0.0.1 -p {port}",
        "/readyz",
        ("bentoml", "starlette", "uvicorn", "onnxruntime"),
        bentoml_home=True,
    ),
    "litserve": Peer(
        "LitServe peer",
        "-m benchmarks.peer_litserve --host 127.0.0.1 --port {port}",
        "/health",
        ("litserve", "fastapi", "starlette", "uvicorn", "pyzmq", "onnxruntime"),
    ),
}


class ServedPeer(ServedProcess):
    """The peer `name` (a key of PEERS; default the FastAPI peer) serving `model` with `workers` processes of
    `threads` ONNX Runtime threads each; where it batches, at most `max_batch_size` per batch and BentoML's
    `max_latency_ms` or LitServe's `batch_timeout_ms` (None: the peer's own default)."""

    def __init__(
        self,
        model: Path,
        *,
        workers: int,
        threads: int,
        log_path: Path,
        backend: str = "auto",
        name: str = "fastapi",
        max_batch_size: int | None = None,
        max_latency_ms: int | None = None,
        batch_timeout_ms: float | None = None,
    ) -> None:
        if name not in PEERS:
            raise ValueError(f"unknown peer {name!r}; choose one of: {', '.join(PEERS)}")
        peer = PEERS[name]
        port = free_port()
        command = [sys.executable, *peer.command.format(port=port, workers=workers).split()]
        env = {"CLASSIFIER_MODEL": str(model), "PEER_BACKEND": backend, "PEER_WORKERS": str(workers)}
        env["PEER_THREADS"] = str(threads)
        if max_batch_size:
            env["PEER_MAX_BATCH_SIZE"] = str(max_batch_size)
        if max_latency_ms:
            env["PEER_MAX_LATENCY_MS"] = str(max_latency_ms)
        if batch_timeout_ms is not None:
            env["PEER_BATCH_TIMEOUT_MS"] = str(batch_timeout_ms)
        if peer.bentoml_home:
            env |= {"BENTOML_HOME": str(log_path.parent / "bentoml-home"), "BENTOML_DO_NOT_TRACK": "1"}
        super().__init__(command, port, log_path, env)
        self.name = name
        self.ready_path = peer.ready_path
