"""Reading API requests: bodies with size and time limits, uploads parsed in memory, pixel arrays from JSON.

Everything here refuses bad input with a `RequestError` (status + message) before any model work: a body
over the limit (413), one that arrives too slowly (408), a wrong content type (415), a malformed or
ambiguous form (400). Nothing is written to disk: uploads are parsed from the body in memory.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import parse_qs

import numpy as np
from python_multipart.multipart import MultipartParser, parse_options_header

from serving.classifier import DEFAULT_K

Receive = Callable[[], Awaitable[dict]]
FILE_FIELD = "images"
JSON_INLINE_BYTES = 64 * 1024  # JSON bodies up to this size are parsed on the event loop; bigger in a thread


class RequestError(Exception):
    """A request this service refuses; `status` is the HTTP status, the message says why and what to do."""

    def __init__(self, status: int, message: str, *, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close  # answer with Connection: close (the rest of the body was not read)


def error_body(status: int, message: str) -> bytes:
    """The JSON body of every refusal: {"error": message, "status": code}."""
    return json.dumps({"error": message, "status": status}).encode()


class ClientGone(Exception):
    """The client disconnected before its body arrived."""


@dataclass(frozen=True)
class BodyLimits:
    max_bytes: int  # per request
    timeout_s: float  # the whole body must arrive within timeout_s + its size / min_rate
    min_rate: float  # bytes per second that a slow but honest client still reaches


class BufferBudget:
    """Bytes of request bodies held in memory by one worker at a time. Slow clients hold few bytes each, so
    they cannot exhaust it; an upload that would pass it is refused (503) instead of growing the worker."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used = 0

    def take(self, n: int) -> None:
        if self.used + n > self.max_bytes:
            raise RequestError(503, "the server is receiving too many large uploads at once; retry shortly", close=True)
        self.used += n

    def release(self, n: int) -> None:
        self.used -= n


async def read_body(receive: Receive, declared: int | None, limits: BodyLimits, budget: BufferBudget) -> bytes:
    """The request body, refused (413) past `limits.max_bytes`, (408) when it arrives too slowly, (503) when
    the worker holds too many bodies already. The caller gives the bytes back with `budget.release(len(body))`."""
    if declared is not None and declared > limits.max_bytes:
        raise RequestError(413, f"request body of {declared:,} bytes exceeds the {_size(limits.max_bytes)} limit")
    allowed = limits.timeout_s + (declared if declared is not None else limits.max_bytes) / limits.min_rate
    chunks: list[bytes] = []
    size = 0
    try:
        # One timer for the whole body (asyncio.wait_for per message would wrap each receive() in a task).
        async with asyncio.timeout(allowed):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientGone
                chunk = message.get("body", b"")
                if size + len(chunk) > limits.max_bytes:
                    raise RequestError(413, f"request body exceeds the {_size(limits.max_bytes)} limit", close=True)
                budget.take(len(chunk))
                size += len(chunk)
                chunks.append(chunk)
                if not message.get("more_body"):
                    return b"".join(chunks)
    except TimeoutError:
        budget.release(size)
        raise RequestError(
            408, f"the request body did not arrive within {allowed:.0f} s ({_size(size)} received)", close=True
        ) from None
    except BaseException:
        budget.release(size)
        raise


def _size(n: float) -> str:
    return f"{n / 2**20:g} MiB" if n >= 2**20 else f"{n / 2**10:g} KiB" if n >= 2**10 else f"{n:g} bytes"


# ------------------------------------------------------------------ /classify


@dataclass(frozen=True)
class Upload:
    name: str
    data: bytes


def parse_k(text: str | bytes, num_classes: int) -> int:
    """The `k` parameter (top-k labels per image): an integer from 1 to the number of classes."""
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    try:
        k = int(text)
    except ValueError:
        raise RequestError(400, f"k must be an integer between 1 and {num_classes}, got {text[:20]!r}") from None
    if not 1 <= k <= num_classes:
        raise RequestError(400, f"k must be between 1 and {num_classes}, got {k}")
    return k


def resolve_k(in_query: str | None, in_body: str | bytes | None, num_classes: int) -> int:
    """`k` from the query string (`?k=2`) or the body (form field, JSON key), the same rule for every route:
    either place, or both with the same value; DEFAULT_K (at most the number of classes) when neither."""
    if in_query is None and in_body is None:
        return min(DEFAULT_K, num_classes)
    values = {parse_k(text, num_classes) for text in (in_query, in_body) if text is not None}
    if len(values) > 1:
        body = in_body.decode("latin-1") if isinstance(in_body, bytes) else in_body
        raise RequestError(
            400, f"k is given twice with different values (?k={in_query} and k={body} in the body); give it once"
        )
    return values.pop()


def query_value(query_string: bytes, name: str) -> str | None:
    """The last value of `name` in a query string, or None."""
    values = parse_qs(query_string.decode("latin-1")).get(name)
    return values[-1] if values else None


def parse_multipart(body: bytes, content_type: str, *, max_files: int) -> tuple[list[Upload], dict[str, bytes]]:
    """The files of field `images` and the plain form fields of a multipart/form-data body, in memory."""
    how = f"send multipart/form-data with one or more image files in the field {FILE_FIELD!r}"
    if not body:
        raise RequestError(400, f"empty request body; {how}")
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise RequestError(400, f"multipart body without a boundary; {how}")
    parts = _multipart_parts(body, boundary, max_files, how)
    uploads, fields = [], {}
    for part in parts:
        disposition = part["headers"].get(b"content-disposition")
        if disposition is None:
            raise RequestError(400, f"a multipart part has no Content-Disposition header; {how}")
        _, params = parse_options_header(disposition)
        name = params.get(b"name", b"").decode("utf-8", "replace")
        data = b"".join(part["data"])
        if name == FILE_FIELD:
            if b"filename" not in params:
                raise RequestError(
                    400,
                    f"field {FILE_FIELD!r} holds text ({data[:60].decode('utf-8', 'replace')!r}), not a file; upload "
                    "the image bytes. This service never fetches URLs.",
                )
            filename = params[b"filename"].decode("utf-8", "replace") or "image"
            if not data:
                raise RequestError(400, f"image {filename!r} is an empty file")
            uploads.append(Upload(filename, data))
        elif name == "k":
            if b"filename" in params:
                raise RequestError(400, "k must be a plain form field (a number), not a file")
            fields["k"] = data
        else:
            raise RequestError(400, f"unknown form field {name!r}; {how} (and optionally k)")
    if not uploads:
        raise RequestError(400, f"no images: {how}")
    if len(uploads) > max_files:
        raise RequestError(413, f"too many images in one request: {len(uploads)}, the limit is {max_files}")
    return uploads, fields


def _multipart_parts(body: bytes, boundary: bytes, max_files: int, how: str) -> list[dict]:
    """Each part's headers (lower-cased names) and data chunks, from python-multipart's streaming callbacks."""
    parts: list[dict] = []
    current: dict = {}
    header_field, header_value = bytearray(), bytearray()

    def on_part_begin() -> None:
        nonlocal current
        current = {"headers": {}, "data": []}
        if len(parts) >= max_files + 2:  # a few text fields beside the files
            raise RequestError(413, f"too many parts in one request: the limit is {max_files} images")
        parts.append(current)

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_field.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        current["headers"][bytes(header_field).lower()] = bytes(header_value)
        header_field.clear()
        header_value.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        current["data"].append(data[start:end])

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_part_data": on_part_data,
    }
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except RequestError:
        raise
    except Exception as err:  # python-multipart raises several types on malformed input
        raise RequestError(400, f"malformed multipart body ({err}); {how}") from None
    return parts


# ------------------------------------------------------------------ /classify_pixels
def json_body_limit(max_images: int, height: int, width: int, channels: int) -> int:
    """The largest sensible JSON body of `max_images` pixel arrays: at most 6 characters per value ("255, "
    plus its share of brackets and line breaks), and room for `k`."""
    return 6 * max_images * height * width * channels + 4096


def parse_pixels(body: bytes, *, max_images: int, shape: tuple[int, int, int]) -> tuple[np.ndarray, object]:
    """`{"pixels": N x H x W x 3 integers 0-255, "k": int}` -> (uint8 array, raw k). CPU-bound for big
    bodies: callers run it in a thread."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(400, f"the body is not valid JSON ({err})") from None
    if not isinstance(payload, dict) or "pixels" not in payload:
        raise RequestError(400, 'send a JSON object {"pixels": [...], "k": 3} with pixels of shape (N, H, W, 3)')
    unknown = sorted(set(payload) - {"pixels", "k"})
    if unknown:
        raise RequestError(400, f"unknown JSON field(s) {unknown}; expected 'pixels' and optionally 'k'")
    height, width, channels = shape
    try:
        pixels = np.asarray(payload["pixels"])
    except (ValueError, TypeError):
        raise RequestError(400, f"pixels must be a regular N x {height} x {width} x {channels} array") from None
    if pixels.ndim != 4 or pixels.shape[1:] != shape:
        raise RequestError(400, f"pixels must have shape (N, {height}, {width}, {channels}); got {pixels.shape}")
    if len(pixels) == 0 or len(pixels) > max_images:
        raise RequestError(413 if len(pixels) else 400, f"send 1 to {max_images} images per request, got {len(pixels)}")
    if pixels.dtype.kind not in "iu":
        raise RequestError(400, f"pixels must be integers 0-255 (uint8 RGB); got {pixels.dtype} values")
    if pixels.min() < 0 or pixels.max() > 255:
        raise RequestError(400, f"pixel values must be 0-255; got values from {pixels.min()} to {pixels.max()}")
    return pixels.astype(np.uint8), payload.get("k")
