"""HTTP load benchmark: the classification service side by side with what a user would pick instead.

Starts the service (`bentoml serve`) and its peers (`--peers`, default all three; benchmarks/served.py starts
each peer from its row in PEERS):
  fastapi   the server a user would write in twenty lines (benchmarks/peer_fastapi.py: FastAPI + ONNX Runtime,
            one image per forward pass, `uvicorn --workers N`);
  bentoml   BentoML as its examples write a service (benchmarks/peer_bentoml.py: `@bentoml.service`, one
            batchable API taking `list[PIL.Image]`, adaptive batching with the service's limits);
  litserve  LitServe as its docs write a server (benchmarks/peer_litserve.py: a LitAPI with batching, 2
            inference workers, ZeroMQ queue);
all with the same model file (`--backend`), the same workers x ONNX Runtime threads, the same input contract and
answer shape, and drives them with the same closed-loop load of real CIFAR-10 test JPEGs from the shared archive
(multipart, field `images`): at each concurrency level (default 1, 8, 32, 128) that many simulated users send one
request after another for `--duration` seconds, after `--warmup` seconds that are not counted. Levels are run
server after server, round after round (`--rounds`), so a machine whose speed drifts cannot favour any of them;
each figure is the median over the rounds. It reports the machine (CPU model, cores, load), each server's library
versions, requests/s, images/s, p50/p95/p99 latency of the answered (200) requests, errors by status code, the
requests per model batch (service, from /metrics), and the ratios service/peer of requests/s and of p99 for every
peer at every level. Before any server runs it measures the model alone in this process (`--ort-threads`
threads, several batch sizes): the bound.
`--raw-body` also measures the service's single-image raw-body form of POST /classify; `--compare-workers`
serves 1 worker x 2 threads and 2 workers x 1 thread. Results (config and machine included) go to
benchmarks/results/load_test.json, a plot to load_test.png.

Load generation: locust as a library (headless, FastHttpUser on gevent): a well-kept generator that costs little
CPU per request, which matters when the client shares 2 cores with the server; latencies are recorded exactly
from its request events. Needs the bench extra: `pip install -e ".[bench]"` (and litserve for its peer: a peer
whose library is not installed is left out, with a warning, unless `--peers` names it).

    python -m benchmarks.load_test                      # the service and the three peers, ~13 s per level each
    python -m benchmarks.load_test --peers fastapi --raw-body --backend onnx_int8
    python -m benchmarks.load_test --url http://127.0.0.1:3000 --no-peer --duration 5
"""

# ruff: noqa: E402 -- gevent must patch the standard library before anything imports socket, ssl or threading
from __future__ import annotations

from gevent import monkey

monkey.patch_all()  # locust's clients are greenlets; importing locust would patch too, but after urllib/ssl

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import ClassVar

import matplotlib.pyplot as plt
import numpy as np
from locust import FastHttpUser, constant, task
from locust.env import Environment
from matplotlib.ticker import NullLocator
from prometheus_client.parser import text_string_to_metric_families
from urllib3 import encode_multipart_formdata

from benchmarks.served import PEERS, ServedPeer
from bundle.class_tree import data_source, first_per_class
from bundle.environment import library_versions, machine_info
from bundle.manifest import default_model_dir, load_model_dir
from bundle.preprocess import decode_image, pixels_to_input
from bundle.runtime import load_backend
from serving.settings import ServiceSettings
from serving.testing import ServedClassifier, serve_arguments

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
ARCHIVE = data_source()
SHOWN_SETTINGS = ("workers", "threads", "max_batch_size", "max_latency_ms", "max_concurrency", "timeout_s")
log = logging.getLogger("load_test")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="target a running service instead of starting one (default: start one)")
    parser.add_argument(
        "--peer", action=argparse.BooleanOptionalAction, default=True, help="also run the peers (default: yes)"
    )
    parser.add_argument(
        "--peers",
        nargs="+",
        choices=tuple(PEERS),
        help=f"which peers to run (default: those of {' '.join(PEERS)} whose library is installed)",
    )
    parser.add_argument(
        "--litserve-batch-timeout-ms",
        type=float,
        default=5.0,
        help="LitServe's batch_timeout: how long its workers wait for a batch to fill (default: 5)",
    )
    parser.add_argument(
        "--raw-body", action="store_true", help="also send the service each image as a raw image/jpeg body"
    )
    parser.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "onnx", "onnx_int8"),
        help="model artifact for both; auto: INT8 when its gate passed, as the service (default: auto)",
    )
    parser.add_argument("--model", help="exported model folder (default: $CLASSIFIER_MODEL or exported_models/default)")
    parser.add_argument("--data", default=str(ARCHIVE), help=f"CIFAR-10 JPEG archive (default: {ARCHIVE})")
    parser.add_argument(
        "--levels", type=int, nargs="+", default=[1, 8, 32, 128], help="concurrency levels (default: 1 8 32 128)"
    )
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per level (default: 10)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds of every level on every server; medians reported (default: 3)"
    )
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each level (default: 3)")
    parser.add_argument("--images-per-request", type=int, default=1, help="images in each request (default: 1)")
    parser.add_argument("--workers", type=int, help="server workers (default: the service's default)")
    parser.add_argument("--threads", type=int, help="ONNX Runtime threads per worker (default: cores / workers)")
    parser.add_argument("--max-batch-size", type=int, help="adaptive batching limit (default: the service's)")
    parser.add_argument("--max-latency-ms", type=int, help="adaptive batching latency budget (default: the service's)")
    parser.add_argument(
        "--compare-workers", action="store_true", help="serve 1 worker x 2 threads, then 2 workers x 1 thread"
    )
    parser.add_argument(
        "--ort-threads",
        type=int,
        default=os.cpu_count(),
        help=f"threads of the in-process bound (default: {os.cpu_count()})",
    )
    parser.add_argument(
        "--ort-batch-sizes",
        type=int,
        nargs="+",
        default=[1, 8, 16, 32, 64, 128],
        help="batch sizes tried for the bound (default: 1 8 16 32 64 128)",
    )
    parser.add_argument("--ort-seconds", type=float, default=3.0, help="seconds per bound batch size (default: 3)")
    parser.add_argument("--timeout", type=float, default=60.0, help="client timeout per request in s (default: 60)")
    parser.add_argument(
        "--out",
        default=str(RESULTS / "load_test.json"),
        help="results JSON (default: benchmarks/results/load_test.json)",
    )
    parser.add_argument(
        "--plot", default=str(RESULTS / "load_test.png"), help="plot (default: benchmarks/results/load_test.png)"
    )
    return parser


# ------------------------------------------------------------------ machine, data, upper bound


LIBRARIES = ("bentoml", "onnxruntime", "numpy", "Pillow", "locust", "starlette", "uvicorn", "uvloop", "httptools")
SERVICE_LIBRARIES = ("bentoml", "starlette", "uvicorn", "onnxruntime")  # the service's own server stack


def select_peers(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    """The peers to run: none with --no-peer, else those --peers names (each must be installed), else every
    peer whose server library is installed (a warning for each left out). None either with --url."""
    if not args.peer or args.url:
        return []
    missing = [name for name, peer in PEERS.items() if library_versions(peer.libraries[:1])[peer.libraries[0]] is None]
    if args.peers:
        if wanted := [name for name in args.peers if name in missing]:
            parser.error(f"--peers {' '.join(wanted)}: not installed; pip install {' '.join(wanted)}")
        return list(dict.fromkeys(args.peers))
    for name in missing:
        log.warning("%s is not installed: its peer is left out (pip install %s)", name, PEERS[name].libraries[0])
    return [name for name in PEERS if name not in missing]


def read_images(archive: Path, count: int) -> list[tuple[str, bytes]]:
    """`count` test JPEGs, as many from each class, interleaved by class (the test split is read first)."""
    files = first_per_class(archive, "test", -(-count // 10))
    by_class: dict[str, list[tuple[str, bytes]]] = {}
    for file in files:
        by_class.setdefault(file.label, []).append((file.name.removeprefix(f"{archive}:"), file.read()))
    return [item for images in zip(*by_class.values(), strict=False) for item in images][:count]


def measure_ort(
    model, images: list[tuple[str, bytes]], threads: int, batch_sizes: list[int], seconds: float, backend: str
) -> dict:
    """Images/s of the model alone (decoded, preprocessed inputs) at each batch size; the best is the bound."""
    run = load_backend(model, backend, threads=threads)
    inputs = pixels_to_input(np.stack([decode_image(data, model.contract) for _, data in images]), model.contract)
    by_batch = {}
    for size in batch_sizes:
        batch = np.resize(inputs, (size, *inputs.shape[1:]))
        run(batch)  # first call allocates
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            run(batch)
            done += size
        by_batch[size] = done / (time.perf_counter() - start)
        log.info("in-process ONNX Runtime, batch %d: %.0f images/s", size, by_batch[size])
    best = max(by_batch, key=by_batch.get)
    return {
        "threads": threads,
        "images_per_s_by_batch": by_batch,
        "best_batch": best,
        "best_images_per_s": by_batch[best],
    }


# ------------------------------------------------------------------ the server


def batch_histogram(url: str) -> tuple[float, float]:
    """(requests, batches) the service's adaptive batching has run so far, summed over its workers, from
    /metrics (the classifier_batch_requests histogram: requests per model batch)."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    totals = Counter()
    for family in text_string_to_metric_families(text):
        if family.name == "classifier_batch_requests":
            for sample in family.samples:
                if not sample.name.endswith("_bucket"):
                    totals[sample.name.rsplit("_", 1)[-1]] += sample.value
    return totals["sum"], totals["count"]


# ------------------------------------------------------------------ load generation (locust)


class ClassifyUser(FastHttpUser):
    """One closed-loop client: POST `path`, then again at once."""

    wait_time = constant(0)
    bodies: ClassVar[list[tuple[bytes, str]]] = []  # prebuilt bodies and content types: the client does little work
    path: ClassVar[str] = "/classify"
    network_timeout = connection_timeout = 60.0

    def on_start(self) -> None:
        self.turn = id(self) % len(self.bodies)

    @task
    def classify(self) -> None:
        body, content_type = self.bodies[self.turn]
        self.turn = (self.turn + 1) % len(self.bodies)
        self.client.post(self.path, data=body, headers={"content-type": content_type}, name="/classify")


def run_level(url: str, concurrency: int, warmup: float, duration: float, with_batches: bool) -> dict:
    """Start `concurrency` users, wait `warmup` s, then return what completed in the next `duration` s."""
    records: list[tuple[float, float, str]] = []  # (end time, latency ms, outcome)

    def on_request(response_time: float, start_time: float, response=None, exception=None, **_: object) -> None:
        status = getattr(response, "status_code", 0) or 0
        outcome = str(status) if status else type(exception).__name__
        records.append((start_time + response_time / 1000, response_time, outcome))

    env = Environment(user_classes=[ClassifyUser], host=url)
    env.events.request.add_listener(on_request)
    runner = env.create_local_runner()
    load_average = os.getloadavg()[0]  # the machine may be shared: record how busy it was
    before = batch_histogram(url) if with_batches else (0.0, 0.0)
    runner.start(user_count=concurrency, spawn_rate=min(concurrency, 100))
    while runner.user_count < concurrency:
        time.sleep(0.05)
    time.sleep(warmup)
    window_start = time.time()
    time.sleep(duration)
    window_end = time.time()
    runner.quit()
    after = batch_histogram(url) if with_batches else (0.0, 0.0)
    measured = [(latency, outcome) for end, latency, outcome in records if window_start <= end < window_end]
    latencies = np.array([latency for latency, outcome in measured if outcome == "200"])
    errors = Counter(outcome for _, outcome in measured if outcome != "200")
    percentiles = np.percentile(latencies, [50, 95, 99]) if len(latencies) else [float("nan")] * 3
    requests, batches = after[0] - before[0], after[1] - before[1]
    return {
        "concurrency": concurrency,
        "seconds": window_end - window_start,
        "requests": len(measured),
        "ok": len(latencies),
        "requests_per_s": len(measured) / (window_end - window_start),
        "ok_requests_per_s": len(latencies) / (window_end - window_start),
        "p50_ms": percentiles[0],
        "p95_ms": percentiles[1],
        "p99_ms": percentiles[2],
        "errors": dict(errors),
        "requests_per_batch": requests / batches if batches else None,
        "client_cpu_over_90_percent": runner.cpu_warning_emitted,
        "load_average_1m_before": load_average,
    }


# ------------------------------------------------------------------ report


def print_level(level: dict, images_per_request: int, bound: float, label: str = "") -> None:
    images_per_s = level["ok_requests_per_s"] * images_per_request
    batch = f"{level['requests_per_batch']:9.1f}" if level["requests_per_batch"] else "        -"
    print(
        f"  {label:<40} {level['concurrency']:>5} {level['requests_per_s']:9.1f} {images_per_s:9.1f} "
        f"{100 * images_per_s / bound:6.1f}% "
        f"{level['p50_ms']:8.1f} {level['p95_ms']:8.1f} {level['p99_ms']:8.1f}  {batch}  {level['errors'] or '-'}"
    )


def plot(result: dict, path: Path) -> None:
    """Images/s and latency percentiles against concurrency, one colour per server (p50 solid, p99 dotted), with
    the in-process bound."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    n = result["config"]["images_per_request"]
    levels = result["config"]["levels"]
    for run in result["runs"]:
        (line,) = left.plot(
            levels, [level["ok_requests_per_s"] * n for level in run["levels"]], "o-", label=run["label"]
        )
        for key, style in (("p50_ms", "o-"), ("p99_ms", "^:")):
            right.plot(levels, [level[key] for level in run["levels"]], style, color=line.get_color())
    bound = result["onnxruntime"]["best_images_per_s"]
    left.axhline(bound, color="gray", linestyle="--", label=f"model alone, in process ({bound:.0f}/s)")
    left.set(xscale="log", xlabel="concurrent clients", ylabel="images/s answered (200)", title="Throughput")
    right.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="latency (ms)", title="Latency of 200s")
    right.plot([], [], "ko-", label="p50")
    right.plot([], [], "k^:", label="p99")
    for axis in (left, right):
        axis.set_xticks(levels, [str(level) for level in levels])
        axis.xaxis.set_minor_locator(NullLocator())
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
    env = result["environment"]
    fig.suptitle(
        f"{env['cpu']} ({env['cores']} cores), {n} image(s)/request, {result['config']['duration']:g} s/level, "
        f"backend {result['config']['backend']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def multipart_bodies(images: list[tuple[str, bytes]], per_request: int) -> list[tuple[bytes, str]]:
    """Multipart bodies (and their content types) of `per_request` images each, built once."""
    groups = [images[i : i + per_request] for i in range(0, len(images) - per_request + 1, per_request)]
    return [encode_multipart_formdata([("images", (Path(n).name, d, "image/jpeg")) for n, d in g]) for g in groups]


def targets(args: argparse.Namespace, model_dir: Path) -> list[dict]:
    """The servers to measure, in order: label, kind (service | peer | external), settings (the same for the
    service and its peers: compare() pairs them by it), request form; for peers, which one and its batching."""
    if args.url:
        return [{"label": "external", "kind": "external", "settings": None, "raw": False}]
    base = {"model": str(model_dir.resolve()), "backend": args.backend}
    base |= {k: v for k, v in (("max_batch_size", args.max_batch_size), ("max_latency_ms", args.max_latency_ms)) if v}
    defaults = ServiceSettings(**base)  # what the server resolves (usable cores, CLASSIFIER_* included)
    if args.compare_workers:
        shapes = [(1, 2), (2, 1)]
    else:
        shapes = [(args.workers or defaults.workers, args.threads or defaults.threads)]
    # The batching peers get the service's limits; LitServe waits a fixed time for a batch instead of a budget.
    batching = {
        "fastapi": {},
        "bentoml": {"max_batch_size": defaults.max_batch_size, "max_latency_ms": defaults.max_latency_ms},
        "litserve": {"max_batch_size": defaults.max_batch_size, "batch_timeout_ms": args.litserve_batch_timeout_ms},
    }
    found = []
    for workers, threads in shapes:
        shape = f"{workers} worker{'s' * (workers > 1)} x {threads} thread{'s' * (threads > 1)}"
        settings = {**base, "workers": workers, "threads": threads}
        found.append({"label": f"service, {shape}", "kind": "service", "settings": settings, "raw": False})
        if args.raw_body:
            found.append({"label": f"service raw body, {shape}", "kind": "service", "settings": settings, "raw": True})
        for name in args.peers:
            label = f"{PEERS[name].label}, {shape}"
            peer = {"peer": name, "peer_settings": batching[name]}
            found.append({"label": label, "kind": "peer", "settings": settings, "raw": False, **peer})
    return found


def start_server(target: dict, home: Path) -> ServedClassifier | ServedPeer | None:
    """The target's server, started and ready (None for an external --url)."""
    settings, kind = target["settings"], target["kind"]
    if kind == "service":
        server = ServedClassifier(*serve_arguments(settings), home=home, log_path=home / "server.log")
    elif kind == "peer":
        server = ServedPeer(
            Path(settings["model"]),
            workers=settings["workers"],
            threads=settings["threads"],
            log_path=home / "server.log",
            backend=settings["backend"],
            name=target["peer"],
            **target["peer_settings"],
        )
    else:
        return None
    server.start().wait_ready(timeout=300)
    return server


def use_requests(target: dict, images: list, per_request: int) -> None:
    """Make the load generator send the target's request form: multipart, or one image as the raw body."""
    if target["raw"]:
        ClassifyUser.bodies, ClassifyUser.path = [(data, "image/jpeg") for _, data in images], "/classify?k=3"
    else:
        ClassifyUser.bodies, ClassifyUser.path = multipart_bodies(images, per_request), "/classify"


def benchmark(args: argparse.Namespace, found: list[dict], images: list, bound: float) -> list[dict]:
    """All servers up at once (idle ones cost nothing), then, round after round, each concurrency level is run
    against every target in turn: a paired comparison that a machine drifting between runs cannot skew.
    Each target's figure per level is the median over the rounds."""
    home = Path(tempfile.mkdtemp(prefix="load-test-"))
    servers = []
    try:
        for i, target in enumerate(found):
            servers.append(start_server(target, home / f"server-{i}"))
        urls = [server.url if server else args.url.rstrip("/") for server in servers]
        measured: list[dict[int, list[dict]]] = [{level: [] for level in args.levels} for _ in found]
        for round_index in range(args.rounds):
            print(f"\nround {round_index + 1} of {args.rounds}")
            print(f"  {'server':<40} {'conc':>5} {'req/s':>9} {'img/s':>9} {'bound':>7} {'p50 ms':>8} {'p95 ms':>8} "
                  f"{'p99 ms':>8} req/batch  errors")  # fmt: skip
            for concurrency in args.levels:
                for i, target in enumerate(found):
                    use_requests(target, images, args.images_per_request)
                    level = run_level(urls[i], concurrency, args.warmup, args.duration, target["kind"] != "peer")
                    measured[i][concurrency].append(level)
                    print_level(level, args.images_per_request, bound, target["label"])
    finally:
        for server in servers:
            if server:
                server.stop()
        shutil.rmtree(home, ignore_errors=True)
    runs = []
    for target, by_level in zip(found, measured, strict=True):
        levels = [median_level(by_level[level]) for level in args.levels]
        best = max(level["ok_requests_per_s"] for level in levels) * args.images_per_request
        runs.append({**target, "levels": levels, "best_images_per_s": best, "fraction_of_bound": best / bound})
    return runs


def median_level(rounds: list[dict]) -> dict:
    """One level's figures, each the median over the rounds (errors summed); the rounds kept beside them."""
    keys = ("requests_per_s", "ok_requests_per_s", "p50_ms", "p95_ms", "p99_ms")
    merged = {key: float(np.median([r[key] for r in rounds])) for key in keys}
    batch = [r["requests_per_batch"] for r in rounds if r["requests_per_batch"]]
    errors = Counter()
    for r in rounds:
        errors.update(r["errors"])
    return {
        **rounds[0],
        **merged,
        "requests_per_batch": float(np.median(batch)) if batch else None,
        "errors": dict(errors),
        "requests": sum(r["requests"] for r in rounds),
        "ok": sum(r["ok"] for r in rounds),
        "rounds": rounds,
    }


def compare(runs: list[dict]) -> list[dict]:
    """Per workers x threads, peer and level: each service run's req/s and p99 against the peer's (ratios
    service / peer: above 1 in requests/s and below 1 in p99 favour the service)."""
    rows = []
    for service in (run for run in runs if run["kind"] == "service"):
        for peer in (r for r in runs if r["kind"] == "peer" and r["settings"] == service["settings"]):
            for ours, theirs in zip(service["levels"], peer["levels"], strict=True):
                ratio = ours["ok_requests_per_s"] / theirs["ok_requests_per_s"] if theirs["ok_requests_per_s"] else None
                rows.append(
                    {
                        "service": service["label"],
                        "peer": peer["label"],
                        "peer_name": peer["peer"],
                        "concurrency": ours["concurrency"],
                        "requests_per_s_ratio": ratio,
                        "p99_ratio": ours["p99_ms"] / theirs["p99_ms"] if theirs["p99_ms"] > 0 else None,
                        "p99_ms": (ours["p99_ms"], theirs["p99_ms"]),
                        "errors": (ours["errors"], theirs["errors"]),
                    }
                )
    return rows


def print_ratios(comparison: list[dict]) -> None:
    """One line per (service, peer) pair: requests/s and p99 ratios at every level."""
    if not comparison:
        return
    print("\nservice / peer, at each concurrency: requests/s ratio (p99 ratio)")
    pairs: dict[tuple[str, str], list[str]] = {}
    for row in comparison:
        ratio, p99 = row["requests_per_s_ratio"], row["p99_ratio"]
        shown = f"c={row['concurrency']} {f'{ratio:.2f}x' if ratio else '-'} ({f'{p99:.2f}x' if p99 else '-'})"
        pairs.setdefault((row["service"], PEERS[row["peer_name"]].label), []).append(shown)
    for (service, peer), cells in pairs.items():
        print(f"  {service} / {peer}: " + "  ".join(cells))


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("locust").setLevel(logging.WARNING)  # not "Ramping to ..." at every level
    args.peers = select_peers(args, parser)
    model = load_model_dir(args.model or default_model_dir())
    images = read_images(Path(args.data), 200)
    ClassifyUser.network_timeout = args.timeout
    env = machine_info(LIBRARIES)
    print(
        f"machine: {env['cpu']}, {env['cores']} cores ({env['usable_cores']} usable), {env['memory_gib']} GiB, "
        f"load average {env['load_average_1m']:.2f}"
    )
    print("versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))
    found = targets(args, model.folder)
    for target in found:
        libraries = PEERS[target["peer"]].libraries if target["kind"] == "peer" else SERVICE_LIBRARIES
        target["versions"] = {k: v for k, v in library_versions(libraries).items() if k != "python"}
        if target["kind"] != "external":
            print(f"  {target['label']}: " + ", ".join(f"{k} {v}" for k, v in target["versions"].items()))
    print(
        f"model: {model.name} ({model.manifest.get('architecture')}, backend {args.backend}), {len(images)} test "
        f"images, {args.images_per_request} per request, {args.duration:g} s per level after {args.warmup:g} s warm-up"
    )

    bound = measure_ort(model, images, args.ort_threads, args.ort_batch_sizes, args.ort_seconds, args.backend)
    best_bound = bound["best_images_per_s"]
    print(
        f"upper bound, the model in process ({bound['threads']} threads): {best_bound:.0f} images/s "
        f"at batch {bound['best_batch']}"
    )
    runs = benchmark(args, found, images, best_bound)
    comparison = compare(runs)
    print()
    for run in runs:
        print(
            f"{run['label']}: best {run['best_images_per_s']:.0f} images/s over HTTP = "
            f"{100 * run['fraction_of_bound']:.0f}% of the in-process bound ({best_bound:.0f}/s)"
        )
    print_ratios(comparison)

    result = {
        "config": {**vars(args), "images": len(images)},
        "environment": env,
        "onnxruntime": bound,
        "runs": runs,
        "comparison": comparison,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    out, plot_path = Path(args.out), Path(args.plot)
    for path in (out, plot_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    plot(result, plot_path)
    print(f"wrote {out} and {plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
