"""The service's HTTP API as plain ASGI endpoints: what each route reads, refuses and answers.

    POST /classify          multipart form (field `images`, repeatable; optional `k`), or one image as the
                            raw body (Content-Type image/*, `?k=3`): top-k labels per image
    POST /classify_pixels   JSON {"pixels": N x H x W x 3 integers 0-255, "k": 3}: the same answers
    GET  /model             the model's manifest: name, classes, accuracy, input contract, checksums
    GET  /, /docs           a page to try the model; the API reference (OpenAPI at /docs.json)

Requests are read in memory under limits (bytes, time, a per-worker byte budget), then take one of the
worker's `max_concurrency` slots only once their body has arrived, so slow uploads never hold a slot.
Errors are JSON {"error": message, "status": code}; every answer carries `X-Content-Type-Options:
nosniff`. Work stops when the client disconnects.

The two classification routes (`Api.hot_routes`) are complete on their own: they count their answers
(`on_answer`: the service's request histogram), answer 504 past `timeout_s` and 500 on a bug, so the server
calls them without BentoML's middleware (serving/bentoml_adapter.py, 5).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

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
    json_body_limit,
    parse_k,
    parse_multipart,
    parse_pixels,
    query_k,
    read_body,
)
from serving.settings import ServiceSettings

if TYPE_CHECKING:
    from bundle.manifest import ExportedModel

log = logging.getLogger("serving")
STATIC = Path(__file__).parent / "static"
WATCH_FROM_BYTES = 256 * 1024  # bodies from this size may hold large images: always watch for the client leaving
ROUTES = ("/", "/docs", "/docs.json", "/model", "/classify", "/classify_pixels")
Send = Callable[[dict], Awaitable[None]]
Receive = Callable[[], Awaitable[dict]]
Reader = Callable[[dict, bytes, float], Awaitable[tuple[int, object]]]  # (scope, body, arrival) -> (status, answer)
MODEL_INFO_KEYS = (
    "name",
    "architecture",
    "parameters",
    "class_names",
    "input",
    "test_accuracy",
    "artifacts",
    "parity",
    "versions",
    "created",
)
_COMMON_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"cache-control", b"no-store")]


async def send_json(send: Send, status: int, payload: object, *, close: bool = False) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *_COMMON_HEADERS]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, status: int, message: str, *, close: bool = False) -> None:
    await send_json(send, status, {"error": message, "status": status}, close=close)


def _header(scope: dict, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


class SlotLimit:
    """At most `limit` requests of this worker past their body at once; the rest are answered 429 at once."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0


class Api:
    """The API endpoints of one worker. `service()` is the worker's Classifier instance (created by BentoML
    after this app), which owns the model, the batcher and the decoder."""

    def __init__(
        self,
        settings: ServiceSettings,
        model: ExportedModel,
        backend: str,
        service: Callable[[], object],
        on_answer: Callable[[str, int, float], None] = lambda path, status, seconds: None,
    ) -> None:
        self.settings = settings
        self.on_answer = on_answer  # (path, status, seconds) of each answered /classify or /classify_pixels
        self.model = model
        self.backend = backend
        self.service = service
        _, channels, height, width = model.contract["shape"]
        self.pixel_shape = (height, width, channels)
        self.num_classes = len(model.class_names)
        self.latency_budget = min(settings.max_latency_ms / 1000, settings.timeout_s)  # seconds, from arrival
        per_worker = -(-settings.max_concurrency // settings.workers)  # max_concurrency is per service
        self.slots = SlotLimit(per_worker)
        self.buffer = BufferBudget(int(settings.max_buffered_mb * 2**20))
        self.upload_limits = BodyLimits(int(settings.max_body_mb * 2**20), settings.body_timeout_s, 64 * 1024)
        json_limit = min(self.upload_limits.max_bytes, json_body_limit(settings.max_images, height, width, channels))
        self.json_limits = BodyLimits(json_limit, settings.body_timeout_s, 64 * 1024)

    def hot_routes(self) -> dict[tuple[str, str], Callable[[dict, Receive, Send], Awaitable[None]]]:
        """The classification routes, which keep their own request metrics (`on_answer`), time limit (504) and
        error answers, so that the server may call them directly, without a framework's middleware."""
        return {("POST", "/classify"): self.classify, ("POST", "/classify_pixels"): self.classify_pixels}

    def app(self) -> Starlette:
        endpoints = {
            "/classify": (self.classify, "POST"),
            "/classify_pixels": (self.classify_pixels, "POST"),
            "/model": (self.model_info, "GET"),
            "/": (self.page, "GET"),
            "/docs": (self.docs, "GET"),
            "/docs.json": (self.openapi, "GET"),
        }
        routes = [Route(path, _Endpoint(handler), methods=[method]) for path, (handler, method) in endpoints.items()]
        return _RoutesOnly(routes=routes)

    # -------------------------------------------------------------- the API

    async def classify(self, scope: dict, receive: Receive, send: Send) -> None:
        await self._handle(scope, receive, send, self._upload_reader)

    async def classify_pixels(self, scope: dict, receive: Receive, send: Send) -> None:
        await self._handle(scope, receive, send, self._pixels_reader)

    def _upload_reader(self, scope: dict) -> tuple[BodyLimits, Reader]:
        content_type = (_header(scope, b"content-type") or b"").decode("latin-1")
        kind = content_type.split(";")[0].strip().lower()
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
        content_type = (_header(scope, b"content-type") or b"").decode("latin-1")
        if content_type.split(";")[0].strip().lower() == "application/json":
            return self.json_limits, self._read_pixels
        raise RequestError(
            415,
            f"content type {content_type or 'none'!r} is not accepted; send application/json "
            '{"pixels": [...], "k": 3}',
        )

    async def _handle(
        self, scope: dict, receive: Receive, send: Send, reader: Callable[[dict], tuple[BodyLimits, Reader]]
    ) -> None:
        """Answers the request, then reports its status and seconds to `on_answer` (nothing if the client left)."""
        start = time.monotonic()
        try:
            limits, read = reader(scope)
            status, payload = await self._answer(scope, receive, limits, read, start)
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

    async def _answer(
        self, scope: dict, receive: Receive, limits: BodyLimits, read: Reader, start: float
    ) -> tuple[int, object]:
        """Body, slot, then the work: abandoned if the client disconnects, 504 past `timeout_s` (counted from
        the end of the body, which has its own time limit)."""
        service = self.service()
        if not service.ready:
            raise RequestError(503, "the model is still warming up; retry shortly (GET /readyz says when)")
        declared = _header(scope, b"content-length")
        body = await read_body(receive, int(declared) if declared and declared.isdigit() else None, limits, self.buffer)
        try:
            if self.slots.active >= self.slots.limit:
                raise RequestError(429, f"too many requests in flight (limit {self.settings.max_concurrency})")
            self.slots.active += 1
            try:
                async with asyncio.timeout(self.settings.timeout_s):
                    if not service.batcher.busy and len(body) <= WATCH_FROM_BYTES:
                        return await read(scope, body, start)  # no wait ahead: nothing to abandon
                    # it may wait (a queue, large images): stop if the client leaves meanwhile
                    answer = await _unless_client_leaves(receive, read(scope, body, start))
                    if answer is None:
                        raise ClientGone
                    return answer
            finally:
                self.slots.active -= 1
        except TimeoutError:
            raise RequestError(504, f"not answered within {self.settings.timeout_s} s; retry later") from None
        except ImageError as err:
            raise RequestError(400, str(err)) from None
        except WouldMissDeadline as err:
            raise RequestError(503, f"the model is busy: {err}; retry shortly") from None
        finally:
            self.buffer.used -= len(body)

    async def _read_form(self, scope: dict, body: bytes, start: float) -> tuple[int, object]:
        content_type = (_header(scope, b"content-type") or b"").decode("latin-1")
        uploads, fields = parse_multipart(body, content_type, max_files=self.settings.max_images)
        k = parse_k(fields.get("k"), self.num_classes)
        return 200, await self.service().classify(uploads, k, deadline=start + self.latency_budget)

    async def _read_raw_image(self, scope: dict, body: bytes, start: float) -> tuple[int, object]:
        if not body:
            raise RequestError(400, "empty request body; send the image bytes as the body")
        k = query_k(scope.get("query_string", b""), self.num_classes)
        return 200, await self.service().classify([Upload("image", body)], k, deadline=start + self.latency_budget)

    async def _read_pixels(self, scope: dict, body: bytes, start: float) -> tuple[int, object]:
        options = {"max_images": self.settings.max_images, "shape": self.pixel_shape}
        if len(body) <= JSON_INLINE_BYTES:
            pixels, k = parse_pixels(body, **options)
        else:  # parsing megabytes of JSON takes tens of milliseconds: not on the event loop
            pixels, k = await asyncio.to_thread(parse_pixels, body, **options)
        if isinstance(k, bool) or not isinstance(k, int | type(None)):
            raise RequestError(400, f"k must be an integer between 1 and {self.num_classes}, got {k!r}")
        k = parse_k(None if k is None else str(k), self.num_classes)
        return 200, await self.service().classify_pixels(pixels, k, deadline=start + self.latency_budget)

    # -------------------------------------------------------------- the model, the page, the docs

    async def model_info(self, scope: dict, receive: Receive, send: Send) -> None:
        info = {key: self.model.manifest.get(key) for key in MODEL_INFO_KEYS}
        await send_json(send, 200, info | {"backend": self.backend})

    async def page(self, scope: dict, receive: Receive, send: Send) -> None:
        await _send_file(send, STATIC / "index.html", b"text/html; charset=utf-8")

    async def docs(self, scope: dict, receive: Receive, send: Send) -> None:
        await _send_file(send, STATIC / "docs.html", b"text/html; charset=utf-8")

    async def openapi(self, scope: dict, receive: Receive, send: Send) -> None:
        from serving.openapi import openapi_spec

        await send_json(send, 200, openapi_spec(self.model, self.settings))


async def _unless_client_leaves(receive: Receive, work: Awaitable[tuple[int, object]]) -> tuple[int, object] | None:
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


class _RoutesOnly(Starlette):
    """Starlette (which BentoML's mount needs to match routes passively) without its own error and exception
    middleware: BentoML's application around it has them, and every layer costs each request."""

    def build_middleware_stack(self) -> ASGIApp:
        return self.router


class _Endpoint:
    """An ASGI callable for Starlette's Route (a bound method would be taken for a request handler)."""

    def __init__(self, handler: Callable[[dict, Receive, Send], Awaitable[None]]) -> None:
        self.handler = handler

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        await self.handler(scope, receive, send)


async def _send_file(send: Send, path: Path, content_type: bytes) -> None:
    body = path.read_bytes()
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *_COMMON_HEADERS]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
