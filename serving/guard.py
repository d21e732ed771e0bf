"""ASGI middleware that checks API requests before BentoML parses them.

It caps the body size (413), requires multipart uploads of real files in the
named field (415/400), caps the number of images (413), and refuses text
values in file fields: BentoML would otherwise download a URL given there,
and this service never fetches URLs for its callers. Errors are JSON
`{"error": ..., "status": ...}`; a request that passes is replayed unchanged.
"""

from __future__ import annotations

import json

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.bentoml_adapter import is_too_many_files


async def send_error(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": message, "status": status}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    def __init__(
        self,
        app: ASGIApp,
        *,
        api_paths: tuple[str, ...],
        upload_path: str,
        file_field: str,
        other_fields: tuple[str, ...],
        max_body_bytes: int,
        max_files: int,
    ) -> None:
        self.app = app
        self.api_paths = api_paths
        self.upload_path = upload_path
        self.file_field = file_field
        self.other_fields = other_fields
        self.max_body_bytes = max_body_bytes
        self.max_files = max_files

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.api_paths:
            return await self.app(scope, receive, send)
        limit_text = f"{self.max_body_bytes / 2**20:g} MiB"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return await send_error(
                send, 413, f"request body of {int(declared):,} bytes exceeds the {limit_text} limit"
            )
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                return await send_error(send, 413, f"request body exceeds the {limit_text} limit")
            if not message.get("more_body"):
                break
        replay = _replay(bytes(body), receive)
        if scope["path"] == self.upload_path:
            problem = await self._check_upload(scope, replay, bool(body))
            if problem:
                return await send_error(send, *problem)
            replay = _replay(bytes(body), receive)
        await self.app(scope, replay, send)

    async def _check_upload(self, scope: Scope, receive: Receive, has_body: bool) -> tuple[int, str] | None:
        field = self.file_field
        how = f"send multipart/form-data with one or more image files in the field {field!r}"
        content_type = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1")
        if not has_body:
            return 400, f"empty request body; {how}"
        if not content_type.startswith("multipart/form-data"):
            return 415, f"content type {content_type or 'none'!r} is not accepted; {how}"
        request = Request(scope, receive)
        try:
            form = await request.form(max_files=self.max_files, max_fields=len(self.other_fields) + 2)
        except (MultiPartException, HTTPException) as err:  # Starlette re-raises MultiPartException as HTTPException
            detail = str(getattr(err, "detail", err))
            if is_too_many_files(detail):
                return 413, f"too many images in one request: the limit is {self.max_files}"
            return 400, f"malformed multipart body ({detail}); {how}"
        try:
            unknown = sorted(set(form.keys()) - {field, *self.other_fields})
            if unknown:
                return 400, f"unknown form field(s) {unknown}; {how}"
            values = form.getlist(field)
            if not values:
                return 400, f"no images: {how}"
            for value in values:
                if not isinstance(value, UploadFile):
                    return 400, (
                        f"field {field!r} holds text ({str(value)[:60]!r}), not a file; upload the image bytes. "
                        "This service never fetches URLs."
                    )
                if value.size == 0:
                    return 400, f"image {value.filename!r} is an empty file"
            return None
        finally:
            await form.close()


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
