"""The one place that relies on non-public behaviour of BentoML and uvicorn (versions checked at import).

What it relies on, for bentoml >= 1.4.40, < 1.5 and uvicorn >= 0.30, < 0.60 (outside those ranges the
import fails with a clear error; tests/test_serving.py and tests/test_hardening.py cover each point):

1. `bentoml serve` imports the service module in its main process before it creates the Prometheus
   multiprocess folder from `BentoMLContainer.prometheus_multiproc_dir` (BENTOML_HOME/
   prometheus_multiproc_dir, emptied at every start), and hands that folder to its workers as
   $PROMETHEUS_MULTIPROC_DIR. `use_private_prometheus_dir` points it at a folder of this server's own, so a
   second server on the machine no longer wipes the first one's metrics.
2. BentoML's `RunnerTrafficMetricsMiddleware` labels its request metrics with the raw request path, one
   label value per path ever requested. `collapse_unknown_route_metrics` relabels paths outside the
   service's routes as one value before that middleware sees them.
3. Each worker receives that folder as $PROMETHEUS_MULTIPROC_DIR and its index in
   `bentoml.server_context.worker_index`; `note_worker_start` keeps a pid file per worker index there, so a
   worker that replaces one killed without shutting down (SIGKILL, out of memory) says so in the log, and
   a ready file per warmed-up worker, so that /readyz answers for the whole server (`all_workers_ready`).
4. The worker builds `uvicorn.Config` with the default `http="auto"`, resolved through
   `uvicorn.config.HTTP_PROTOCOLS` when the worker starts, after it imported the service module.
   `install_http_limits` maps it to `GuardedHttpToolsProtocol`, uvicorn's httptools protocol with limits
   on header size and header time, a cap on the body bytes discarded after an early answer, a lingering
   close, and the head of each answer written together with its body (its `connection_made` transport,
   `data_received`, `on_message_begin`, `on_headers_complete`, `on_message_complete`, `on_response_complete`,
   and the request cycle's `send`, `transport`, `response_complete`, `more_body` are used; the cycle writes
   a response's head and then its body through `transport.write`).
5. `HttpToolsProtocol.__init__` takes the worker's whole ASGI application (BentoML's, with its middleware)
   from `config.loaded_app` into `self.app`, which the request cycles call. `serve_routes_directly` puts the
   service's route table (serving/api.py `RouteTable`, which the service also adds through BentoML's public
   `add_asgi_middleware`) in front of it: the classification routes then skip BentoML's per-request middleware
   (request metrics, tracing, timeout, request context, error pages: 0.13 ms of CPU per request, a seventh of a
   whole /classify request with the INT8 model; measured side by side, benchmarks/README.md). The routes do
   those jobs themselves (serving/api.py: their own metrics, timeout, error answers).

What BentoML's public settings do not cover, and so still needs this module (bentoml 1.4.40): a Prometheus
folder per server, bounded metric labels, limits on request headers and their arrival time, a bounded drain
after an early answer, and skipping the per-request middleware on the hot routes.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar

import bentoml
import uvicorn
from starlette.types import ASGIApp

from serving.api import RouteTable
from serving.requests import error_body

SUPPORTED = {"bentoml": ((1, 4, 40), (1, 5)), "uvicorn": ((0, 30), (0, 60))}  # [lowest, first unsupported)


def _check_version(package: str, found: str) -> None:
    numbers = tuple(int(part) for part in found.split("+")[0].split(".")[:3] if part.isdigit())
    low, high = SUPPORTED[package]
    if not low <= numbers < high:
        raise RuntimeError(
            f"{package} {found} is installed, but serving/bentoml_adapter.py relies on internals of {package} "
            f">= {'.'.join(map(str, low))}, < {'.'.join(map(str, high))}: install a version in that range "
            "(pip install -e .) or port the adapter"
        )


_check_version("bentoml", bentoml.__version__)
_check_version("uvicorn", uvicorn.__version__)

# Only after the version checks: these are the internals the module docstring lists.
import uvicorn.config  # noqa: E402
from bentoml._internal.configuration.containers import BentoMLContainer  # noqa: E402
from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware  # noqa: E402
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol  # noqa: E402

UNKNOWN_ROUTE = "/(unknown-route)"
# Routes that BentoML 1.4 serves itself (besides the service's own): health, metrics, its schema and OpenAPI.
BENTOML_ROUTES = ("/livez", "/healthz", "/readyz", "/metrics", "/schema.json", "/docs.json")
BENTOML_ROUTE_PREFIXES = ("/static_content/",)


# ------------------------------------------------------------------ 1 and 3. a Prometheus folder per server, workers noted in it


def use_private_prometheus_dir() -> Path | None:
    """In the `bentoml serve` main process, give this server its own Prometheus multiprocess folder (removed
    at exit; folders left by servers that died are removed at the next start). Workers keep the folder their
    server passed them. Returns the folder, or None in a worker."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None
    shared = Path(BentoMLContainer.prometheus_multiproc_dir.get())
    root = shared.parent / "prometheus_multiproc_dirs"
    root.mkdir(parents=True, exist_ok=True)
    for folder in root.iterdir():
        if folder.name.isdigit() and not _pid_alive(int(folder.name)):
            shutil.rmtree(folder, ignore_errors=True)
    own = root / str(os.getpid())
    BentoMLContainer.prometheus_multiproc_dir.set(str(own))
    atexit.register(shutil.rmtree, own, ignore_errors=True)
    return own


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _server_folder() -> Path | None:
    """The folder this server handed its workers (see 1 and 3 above); None outside `bentoml serve`."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return Path(folder) if folder else None


def _worker_pid_file() -> Path | None:
    """worker-<index>.pid in the server's own folder; None outside `bentoml serve`."""
    folder = _server_folder()
    return folder / f"worker-{bentoml.server_context.worker_index or 0}.pid" if folder else None


def note_worker_start(log: logging.Logger) -> None:
    """Log a worker that replaces one that died without shutting down, and drop the dead worker's live gauges
    from /metrics; then record this worker's pid (see 3 above)."""
    pid_file = _worker_pid_file()
    if pid_file is None:
        return
    try:
        previous = int(pid_file.read_text())
    except (OSError, ValueError):
        previous = None
    if previous and previous != os.getpid():
        index = bentoml.server_context.worker_index
        log.warning(
            "worker %s (pid %d) ended without shutting down (killed or crashed); pid %d replaces it",
            index,
            previous,
            os.getpid(),
        )
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(previous)
    try:
        pid_file.write_text(str(os.getpid()))
    except OSError as err:
        log.warning("cannot record the worker's pid in %s (%s)", pid_file, err)


def note_worker_exit() -> None:
    """A clean shutdown: the next worker with this index is not a replacement."""
    if pid_file := _worker_pid_file():
        pid_file.unlink(missing_ok=True)
        pid_file.with_suffix(".ready").unlink(missing_ok=True)


def note_worker_ready() -> None:
    """Record that this worker has warmed up (worker-<index>.ready holds its pid)."""
    if pid_file := _worker_pid_file():
        with contextlib.suppress(OSError):
            pid_file.with_suffix(".ready").write_text(str(os.getpid()))


def all_workers_ready(workers: int) -> bool:
    """Whether `workers` live workers of this server have warmed up; True outside `bentoml serve`.

    BentoML asks each worker's `__is_ready__` for GET /readyz, and the port spreads requests over the workers:
    with per-worker readiness, /readyz said 200 while another worker still answered 503 "warming up" (a test
    saw it in CI). A worker killed without shutting down leaves a ready file with a dead pid, which does not
    count, so the server is not ready again until its replacement has warmed up."""
    folder = _server_folder()
    if folder is None:
        return True
    ready = 0
    for path in folder.glob("worker-*.ready"):
        with contextlib.suppress(OSError, ValueError):
            ready += _pid_alive(int(path.read_text()))
    return ready >= workers


# ------------------------------------------------------------------ 2. one metrics label for unknown paths


def collapse_unknown_route_metrics(service_paths: Iterable[str]) -> None:
    """Requests to paths other than the service's and BentoML's own reach BentoML's request metrics, and the
    404 handler, as one path, UNKNOWN_ROUTE: the metrics keep a bounded number of label values."""
    known, known_prefixes = frozenset([*service_paths, *BENTOML_ROUTES]), BENTOML_ROUTE_PREFIXES
    original = RunnerTrafficMetricsMiddleware.__call__
    if getattr(original, "_collapses_unknown_routes", False):
        return

    async def call(self, scope, receive, send):  # type: ignore[no-untyped-def]
        path = scope.get("path", "")
        if scope["type"] == "http" and path not in known and not path.startswith(known_prefixes):
            scope = {**scope, "path": UNKNOWN_ROUTE, "raw_path": UNKNOWN_ROUTE.encode()}
        return await original(self, scope, receive, send)

    call._collapses_unknown_routes = True
    RunnerTrafficMetricsMiddleware.__call__ = call


# ------------------------------------------------------------------ 4. HTTP limits below the application


def _refusal(status: int, reason: str, message: str) -> bytes:
    body = error_body(status, message)
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "x-content-type-options: nosniff\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class _LingeringTransport:
    """The connection's transport, except that `close()` while the request body is still arriving waits for the
    rest of it (discarded, up to the protocol's drain limit and linger time) before closing: closing a socket
    with unread data makes the kernel send a reset, and a client that writes its whole body before reading
    (urllib, requests) would see "connection reset" instead of the early answer (a 413)."""

    def __init__(self, transport, protocol: GuardedHttpToolsProtocol) -> None:  # type: ignore[no-untyped-def]
        self._transport = transport
        self._protocol = protocol
        self._closing = False
        self._held = b""  # a response head waiting to leave with its body
        self._hold_next = False

    def hold_next_write(self) -> None:
        """Keep the next write (a response head) until the following write, flush() or close(): a head and its
        body then leave in one system call and one TCP segment."""
        self._hold_next = True

    def write(self, data: bytes) -> None:
        if self._hold_next:
            self._hold_next = False
            self._held = data
            return
        if self._held:
            data, self._held = self._held + data, b""
        self._transport.write(data)

    def flush(self) -> None:
        self._hold_next = False
        if self._held:
            data, self._held = self._held, b""
            self._transport.write(data)

    def close(self) -> None:
        self.flush()
        if self._closing:
            return
        self._closing = True
        if self._protocol.body_arriving():
            self._protocol.linger(self._transport.close)
        else:
            self._transport.close()

    def is_closing(self) -> bool:
        return self._closing or self._transport.is_closing()

    def __getattr__(self, name: str):  # everything else is the transport's
        return getattr(self._transport, name)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus: request line and headers limited in size (431) and in time (408,
    also for a connection that sends nothing); body bytes that keep arriving after the answer was sent (an
    early 413) discarded up to `max_drain_bytes` and `linger_s`, before the connection closes or is reused."""

    # Set by install_http_limits from the service's settings (serving/settings.py).
    max_header_bytes: ClassVar[int]
    header_timeout_s: ClassVar[float]
    max_drain_bytes: ClassVar[int]
    linger_s: ClassVar[float]
    direct_routes: ClassVar[dict[tuple[str, str], ASGIApp]] = {}  # (method, path) -> handler (see 5 above)

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        if self.direct_routes:
            self.app = RouteTable(self.app, self.direct_routes)

    def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
        super().connection_made(_LingeringTransport(transport, self))
        self._header_bytes = 0
        self._headers_pending = True  # no request, or one whose headers are incomplete
        self._drained = 0
        self._refused = False
        self._lingering = None  # (timer, close) while waiting for the rest of a body before closing
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        if self._lingering:
            self._lingering[0].cancel()
        super().connection_lost(exc)

    def body_arriving(self) -> bool:
        """True when the current request has been answered but its body has not all arrived."""
        return self.cycle is not None and self.cycle.response_complete and self.cycle.more_body

    def linger(self, close) -> None:  # type: ignore[no-untyped-def]
        self._lingering = (self.loop.call_later(self.linger_s, close), close)
        self.flow.resume_reading()  # uvicorn paused reading while the unread body piled up

    def _stop_lingering(self) -> None:
        timer, close = self._lingering
        self._lingering = None
        timer.cancel()
        close()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self.body_arriving():
            self._drained += len(data)  # the body of a request already answered
            if self._drained > self.max_drain_bytes:
                if self._lingering:
                    self._stop_lingering()
                else:
                    self.transport.close()
                return
        if self._headers_pending:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)
            allowance = self.max_header_bytes - self._header_bytes
            if len(data) > allowance:  # feed what the limit allows; refuse if the headers are still not complete
                head, data = data[:allowance], data[allowance:]
                self._header_bytes += len(head)
                super().data_received(head)
                if self._headers_pending:
                    limit = f"{self.max_header_bytes // 1024} KiB"
                    self._refuse(431, "Request Header Fields Too Large", f"request line and headers exceed {limit}")
                    return
                if not data:
                    return
            else:
                self._header_bytes += len(data)
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._headers_pending = True
        self._drained = 0

    def on_headers_complete(self) -> None:
        self._headers_pending = False
        self._header_bytes = 0
        self._cancel_header_timer()
        super().on_headers_complete()
        if self.cycle is not None:
            self.cycle.send = _head_with_body(self.cycle.send, self.transport)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self.cycle is not None and self.cycle.response_complete:
            self._headers_pending = True  # the end of a body drained after an early answer
            if self._lingering:
                self._stop_lingering()

    def on_response_complete(self) -> None:
        self.transport.flush()  # a head whose body was never written (HEAD requests, empty bodies)
        super().on_response_complete()
        if self.cycle is None or not self.cycle.more_body:
            self._headers_pending = True  # the next bytes are a new request's

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self._headers_pending and not self.transport.is_closing():
            if self._header_bytes:
                self._refuse(408, "Request Timeout", f"headers not received within {self.header_timeout_s:g} s")
            elif self.cycle is None or self.cycle.response_complete:
                self.transport.close()  # an idle connection that never sent a request

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _refuse(self, status: int, reason: str, message: str) -> None:
        self._refused = True
        self._cancel_header_timer()
        with contextlib.suppress(RuntimeError):
            self.transport.write(_refusal(status, reason, message))
        self.transport.close()


def _head_with_body(send, transport: _LingeringTransport):  # type: ignore[no-untyped-def]
    """The request cycle's ASGI `send`, except that the head of a response of known length leaves together with
    its body (uvicorn writes each at once: two system calls, and two wake-ups of the client, per answer)."""

    async def send_head_with_body(message: dict) -> None:
        if message["type"] == "http.response.start" and any(
            name.lower() == b"content-length" for name, _ in message.get("headers", ())
        ):
            transport.hold_next_write()
        await send(message)

    return send_head_with_body


def serve_routes_directly(routes: dict[tuple[str, str], ASGIApp]) -> None:
    """Requests with these exact (method, path) skip BentoML's application and middleware in this worker (see
    5 above); their handlers keep their own metrics, time limits and error answers. An empty dict undoes it."""
    GuardedHttpToolsProtocol.direct_routes = dict(routes)


def install_http_limits(
    *, max_header_bytes: int, header_timeout_s: float, max_drain_bytes: int, linger_s: float
) -> None:
    """Make uvicorn (in this worker) use GuardedHttpToolsProtocol with these limits (see 4 above)."""
    GuardedHttpToolsProtocol.max_header_bytes = max_header_bytes
    GuardedHttpToolsProtocol.header_timeout_s = header_timeout_s
    GuardedHttpToolsProtocol.max_drain_bytes = max_drain_bytes
    GuardedHttpToolsProtocol.linger_s = linger_s
    name = f"{__name__}:GuardedHttpToolsProtocol"
    uvicorn.config.HTTP_PROTOCOLS["auto"] = name
    uvicorn.config.HTTP_PROTOCOLS["httptools"] = name
