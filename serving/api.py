"""The service's HTTP API: how the requests of each route are read, refused and answered.

    POST /classify          multipart form (field `images`, repeatable; optional `k`), or one image as the raw
                            body (Content-Type image/*): top-k labels per image
    POST /classify_pixels   JSON {"pixels": N x H x W x 3 integers 0-255, "k": 3}: the same answers
    GET  /model             the model's manifest: name, classes, accuracy, input contract, checksums
    GET  /, /docs           a page to try the model; the API reference (BentoML's OpenAPI at /docs.json)

The two classification routes are declared to BentoML in serving/service.py, typed, so that /schema.json,
/docs.json and `bentoml.SyncHTTPClient` know them. Their HTTP requests are read here (READERS, one per
declared API), never by BentoML's generic request parsing (which would write uploads to temporary files and
download URLs given in file fields): `RouteTable` puts these handlers in front of BentoML's routes, and the
parsed input goes to the same service methods that a Python caller of the API reaches.

Requests are read in memory under limits (bytes, time, a per-worker byte budget), then take one of the
worker's share of `max_concurrency` only once their body has arrived, so slow uploads never hold a slot.
`k` may come in the query string (`?k=2`) or in the body (form field or JSON key), for every route; given in
both with different values it is refused. Errors are JSON {"error": message, "status": code}; every answer
carries `X-Content-Type-Options: nosniff`. Work stops when the client disconnects. The handlers are complete
on their own (their own request metrics through `on_answer`, 504 past `timeout_s`, 500 on a bug), so the
server may call them without BentoML's middleware (serving/bentoml_adapter.py).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.types import ASGIApp

from bundle.preprocess import ImageError
from serving.batching import WouldMissDeadline
from serving.decoding import RequestGone
from serving.requests import (
    JSON_INLINE_BYTES,
    BodyLimits,
    BufferBudget,
    ClientGone,
    RequestError,
    Upload,
    error_body,
    json_body_limit,
    parse_multipart,
    parse_pixels,
    query_value,
    read_body,
    resolve_k,
)
from serving.settings import ServiceSettings

if TYPE_CHECKING:
    from bundle.manifest import ExportedModel

log = logging.getLogger("serving")
STATIC = Path(__file__).parent / "static"
WATCH_FROM_BYTES = 256 * 1024  # bodies from this size may hold large images: always watch for the client leaving
Send = Callable[[dict], Awaitable[None]]
Receive = Callable[[], Awaitable[dict]]
Handler = Callable[[dict, Receive, Send], Awaitable[None]]
Reader = Callable[[dict, bytes, float], Awaitable[list[dict]]]  # (scope, body, arrival) -> answers
MODEL_INFO_KEYS = (
    "name",
    "architecture",
    "parameters",
    "class_names",
    "input",
    "test_accuracy",
    "artifacts",
    "parity",
    "portability",
    "versions",
    "created",
)
_COMMON_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"cache-control", b"no-store")]


class Worker(Protocol):
    """What the API needs of the worker's service instance (serving/service.py)."""

    ready: bool

    @property
    def busy(self) -> bool: ...  # a new request would wait for the model

    async def answer_uploads(self, uploads: list[Upload], k: int, deadline: float) -> list[dict]: ...

    async def answer_pixels(self, pixels: np.ndarray, k: int, deadline: float) -> list[dict]: ...


async def send_json(send: Send, status: int, payload: object, *, close: bool = False) -> None:
    await _send_body(send, status, json.dumps(payload).encode(), b"application/json", close=close)


async def send_error(send: Send, status: int, message: str, *, close: bool = False) -> None:
    await _send_body(send, status, error_body(status, message), b"application/json", close=close)


async def _send_body(send: Send, status: int, body: bytes, content_type: bytes, *, close: bool = False) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *_COMMON_HEADERS]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _header(scope: dict, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


def _media_type(scope: dict) -> tuple[str, str]:
    """(media type in lower case, the whole Content-Type header as sent)."""
    content_type = (_header(scope, b"content-type") or b"").decode("latin-1")
    return content_type.split(";")[0].strip().lower(), content_type


class Api:
    """The HTTP endpoints of one worker. The worker's service instance, created by BentoML after this object,
    binds itself (`bind`) when it starts."""

    def __init__(
        self,
        settings: ServiceSettings,
        model: ExportedModel,
        backend: str,
        on_answer: Callable[[str, int, float], None] = lambda path, status, seconds: None,
    ) -> None:
        self.settings = settings
        self.model = model
        self.backend = backend
        self.on_answer = on_answer  # (path, status, seconds) of each answered classification request
        self.worker: Worker | None = None
        _, channels, height, width = model.contract["shape"]
        self.pixel_shape = (height, width, channels)
        self.num_classes = len(model.class_names)
        self.slots_in_use = 0
        self.buffer = BufferBudget(int(settings.max_buffered_mb * 2**20))
        rate = settings.min_upload_kib_s * 1024
        self.upload_limits = BodyLimits(int(settings.max_body_mb * 2**20), settings.body_timeout_s, rate)
        json_limit = json_body_limit(settings.max_images, height, width, channels)
        self.json_limits = BodyLimits(min(self.upload_limits.max_bytes, json_limit), settings.body_timeout_s, rate)
        # The request reader of each API that serving/service.py declares, by the API's name.
        self.readers: dict[str, Callable[[dict], tuple[BodyLimits, Reader]]] = {
            "classify": self._upload_reader,
            "classify_pixels": self._pixels_reader,
        }

    def bind(self, worker: Worker) -> None:
        self.worker = worker

    def handlers(self, apis: dict[str, Any]) -> dict[tuple[str, str], Handler]:
        """(POST, route) -> handler for each declared API ({name: BentoML API method}) that has a reader here. An API without one is left to
        BentoML's own request parsing, which is refused for APIs that take files (it writes uploads to disk
        and downloads URLs given in file fields): those must be read here."""
        unread = sorted(name for name, api in apis.items() if name not in self.readers and _takes_files(api))
        if unread:
            raise RuntimeError(f"API(s) {unread} take files but serving/api.py has no request reader for them")
        return {
            ("POST", api.route): functools.partial(self._handle, self.readers[name])
            for name, api in apis.items()
            if name in self.readers
        }

    def pages(self) -> Starlette:
        """The routes beside the API: the page, the API reference and the model's manifest."""
        return Starlette(
            routes=[
                Route("/", _Endpoint(self.page), methods=["GET"]),
                Route("/docs", _Endpoint(self.docs), methods=["GET"]),
                Route("/model", _Endpoint(self.model_info), methods=["GET"]),
            ]
        )

    # -------------------------------------------------------------- one classification request

    async def _handle(
        self, reader: Callable[[dict], tuple[BodyLimits, Reader]], scope: dict, receive: Receive, send: Send
    ) -> None:
        """Answers the request, then reports its status and seconds to `on_answer` (nothing if the client left)."""
        start = time.monotonic()
        try:
            limits, read = reader(scope)
            status, payload = 200, await self._answer(scope, receive, limits, read, start)
        except RequestError as err:
            status = err.status
            await send_error(send, status, err.message, close=err.close)
        except (ClientGone, RequestGone):
            return
        except Exception:  # a bug, not the request's fault: logged, answered as JSON like every other error
            log.exception("%s %s failed", scope["method"], scope["path"])
            status = 500
            await send_error(send, status, "internal error; the server's log has the details")
        else:
            await send_json(send, status, payload)
        self.on_answer(scope["path"], status, time.monotonic() - start)

    async def _answer(self, scope: dict, receive: Receive, limits: BodyLimits, read: Reader, start: float) -> list:
        """Body, slot, then the work: abandoned if the client disconnects, 504 past `timeout_s` (counted from
        the end of the body, which has its own time limit)."""
        worker = self.worker
        if worker is None or not worker.ready:
            raise RequestError(503, "the model is still warming up; retry shortly (GET /readyz says when)")
        declared = _header(scope, b"content-length")
        body = await read_body(receive, int(declared) if declared and declared.isdigit() else None, limits, self.buffer)
        try:
            limit = self.settings.worker_max_concurrency
            if self.slots_in_use >= limit:
                raise RequestError(
                    429,
                    f"too many requests in flight: this worker takes {limit} at a time (its share of the service's "
                    f"max_concurrency {self.settings.max_concurrency}); retry shortly",
                )
            self.slots_in_use += 1
            try:
                async with asyncio.timeout(self.settings.timeout_s):
                    if not worker.busy and len(body) <= WATCH_FROM_BYTES:
                        return await read(scope, body, start)  # no wait ahead: nothing to abandon
                    # it may wait (a queue, large images): stop if the client leaves meanwhile
                    answer = await _unless_client_leaves(receive, read(scope, body, start))
                    if answer is None:
                        raise ClientGone
                    return answer
            finally:
                self.slots_in_use -= 1
        except TimeoutError:
            raise RequestError(504, f"not answered within {self.settings.timeout_s} s; retry later") from None
        except ImageError as err:
            raise RequestError(400, str(err)) from None
        except WouldMissDeadline as err:
            raise RequestError(503, f"the model is busy: {err}; retry shortly") from None
        finally:
            self.buffer.release(len(body))

    # -------------------------------------------------------------- readers, by content type

    def _upload_reader(self, scope: dict) -> tuple[BodyLimits, Reader]:
        kind, content_type = _media_type(scope)
        if kind == "multipart/form-data":
            return self.upload_limits, self._read_form
        if kind.startswith("image/") or kind == "application/octet-stream":
            return self.upload_limits, self._read_raw_image
        raise RequestError(
            415,
            f"content type {content_type or 'none'!r} is not accepted; send multipart/form-data with "
            "image files in the field 'images', or one image as the body with Content-Type image/*",
        )

    def _pixels_reader(self, scope: dict) -> tuple[BodyLimits, Reader]:
        kind, content_type = _media_type(scope)
        if kind == "application/json":
            return self.json_limits, self._read_pixels
        raise RequestError(
            415,
            f"content type {content_type or 'none'!r} is not accepted; send application/json "
            '{"pixels": [...], "k": 3}',
        )

    def _k(self, scope: dict, in_body: str | bytes | None) -> int:
        return resolve_k(query_value(scope.get("query_string", b""), "k"), in_body, self.num_classes)

    def _deadline(self, start: float) -> float:
        return start + self.settings.latency_budget_s

    async def _read_form(self, scope: dict, body: bytes, start: float) -> list[dict]:
        uploads, fields = parse_multipart(body, _media_type(scope)[1], max_files=self.settings.max_images)
        k = self._k(scope, fields.get("k"))
        return await self.worker.answer_uploads(uploads, k, self._deadline(start))

    async def _read_raw_image(self, scope: dict, body: bytes, start: float) -> list[dict]:
        if not body:
            raise RequestError(400, "empty request body; send the image bytes as the body")
        k = self._k(scope, None)
        return await self.worker.answer_uploads([Upload("image", body)], k, self._deadline(start))

    async def _read_pixels(self, scope: dict, body: bytes, start: float) -> list[dict]:
        options = {"max_images": self.settings.max_images, "shape": self.pixel_shape}
        if len(body) <= JSON_INLINE_BYTES:
            pixels, k = parse_pixels(body, **options)
        else:  # parsing megabytes of JSON takes tens of milliseconds: not on the event loop
            pixels, k = await asyncio.to_thread(parse_pixels, body, **options)
        if k is not None and (isinstance(k, bool) or not isinstance(k, int)):
            raise RequestError(400, f"k must be an integer between 1 and {self.num_classes}, got {k!r}")
        k = self._k(scope, None if k is None else str(k))
        return await self.worker.answer_pixels(pixels, k, self._deadline(start))

    # -------------------------------------------------------------- the model, the page, the docs

    async def model_info(self, scope: dict, receive: Receive, send: Send) -> None:
        info = {key: self.model.manifest.get(key) for key in MODEL_INFO_KEYS}
        await send_json(send, 200, info | {"backend": self.backend})

    async def page(self, scope: dict, receive: Receive, send: Send) -> None:
        await _send_body(send, 200, (STATIC / "index.html").read_bytes(), b"text/html; charset=utf-8")

    async def docs(self, scope: dict, receive: Receive, send: Send) -> None:
        await _send_body(send, 200, (STATIC / "docs.html").read_bytes(), b"text/html; charset=utf-8")


def _takes_files(api: Any) -> bool:  # a BentoML API method: its input spec lists its file fields
    return bool(getattr(api.input_spec, "multipart_fields", None))


class RouteTable:
    """ASGI middleware: HTTP requests whose (method, path) is in `routes` go to their handler, all others to
    `app`. The service adds it with BentoML's `add_asgi_middleware`, and serving/bentoml_adapter.py puts it in
    front of BentoML's whole application when the per-request middleware is skipped."""

    def __init__(self, app: ASGIApp, routes: dict[tuple[str, str], Handler]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        handler = self.routes.get((scope["method"], scope["path"])) if scope["type"] == "http" else None
        await (handler or self.app)(scope, receive, send)


async def _unless_client_leaves(receive: Receive, work: Awaitable[list]) -> list | None:
    """`work`'s result, or None when the client disconnected first (the work is then cancelled). The work
    runs in this task; one watcher task cancels it if the client leaves."""
    this = asyncio.current_task()
    left = False

    def client_left(watch: asyncio.Future) -> None:
        nonlocal left
        if not watch.cancelled():  # receive() completes after the body only with http.disconnect
            left = True
            this.cancel()

    watch = asyncio.ensure_future(receive())
    watch.add_done_callback(client_left)
    try:
        return await work
    except asyncio.CancelledError:
        if left and this.uncancel() == 0:
            return None
        raise
    finally:
        watch.remove_done_callback(client_left)
        watch.cancel()


class _Endpoint:
    """An ASGI callable for Starlette's Route (a bound method would be taken for a request handler)."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        await self.handler(scope, receive, send)
