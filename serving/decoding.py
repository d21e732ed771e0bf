"""Decoding uploads within budgets, so that a few expensive images cannot starve everyone else.

An image's cost is known before decoding it: its header declares width x height. Small uploads (most
requests) are decoded on the event loop, cheaper than a thread hop; JPEGs already at the model's size skip
Pillow (`bundle.preprocess.decode_plain_jpeg`). Bigger ones go to a small dedicated
pool, under a budget of declared pixels per request and per worker in flight; past the worker's budget a
request is refused at once (503) instead of queueing behind seconds of decoding. Decoding stops between
images when the request is gone (client disconnected or timed out). Large JPEGs are decoded at reduced
scale by the JPEG decoder itself (`bundle.preprocess`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import numpy as np
from PIL import Image

from bundle.preprocess import ImageError, decode_plain_jpeg, load_image, open_image
from serving.requests import RequestError, Upload

INLINE_DECODE_PIXELS = 64 * 64 * 16  # declared pixels per request decoded on the event loop (16 images of 64x64)


class RequestGone(Exception):
    """Decoding stopped because its request ended."""


class Decoder:
    """Uploads -> uint8 (N, H, W, 3) pixels at the contract's size, within the budgets (declared pixels)."""

    def __init__(
        self, contract: dict, *, max_pixels: int, max_request_pixels: int, max_pixels_in_flight: int, threads: int = 1
    ) -> None:
        self.contract = contract
        self.max_pixels = max_pixels
        self.max_request_pixels = max_request_pixels
        self.max_pixels_in_flight = max_pixels_in_flight
        self.in_flight = 0  # declared pixels being decoded in the pool (changed on the event loop only)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode")

    async def decode(self, uploads: list[Upload]) -> np.ndarray:
        """Raises ImageError (a bad image, 400), RequestError (over a budget), or RequestGone."""
        # Nearly every upload: a JPEG already at the model's size, ~9 us in one C call (too cheap to budget).
        pixels = [decode_plain_jpeg(upload.data, self.contract) for upload in uploads]
        rest = [i for i, decoded in enumerate(pixels) if decoded is None]
        if rest:
            others = await self._decode_within_budgets([uploads[i] for i in rest], plain=len(uploads) - len(rest))
            for i, decoded in zip(rest, others, strict=True):
                pixels[i] = decoded
        return np.stack(pixels)

    async def _decode_within_budgets(self, uploads: list[Upload], plain: int) -> np.ndarray:
        """`uploads` through Pillow; `plain` more images of the request were decoded already (at the model's size)."""
        # Headers only (sizes checked against max_pixels), before any budget is spent or pixel decoded.
        images = [open_image(upload.data, name=upload.name, max_pixels=self.max_pixels) for upload in uploads]
        _, _, height, width = self.contract["shape"]
        total = plain * height * width + sum(image.width * image.height for image in images)
        if total > self.max_request_pixels:
            raise RequestError(
                413,
                f"the {plain + len(uploads)} images declare {total:,} pixels in all; the limit per request is "
                f"{self.max_request_pixels:,} (send fewer or smaller images)",
            )
        if total <= INLINE_DECODE_PIXELS:
            return self._decode_all(images, uploads, None)
        if self.in_flight and self.in_flight + total > self.max_pixels_in_flight:
            raise RequestError(503, "the server is busy decoding other large images; retry shortly")
        self.in_flight += total
        stop = threading.Event()
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._pool, self._decode_all, images, uploads, stop)

        def release(done: asyncio.Future) -> None:
            self.in_flight -= total
            if not done.cancelled():
                done.exception()  # retrieved here, so that an abandoned request's error is not logged as lost

        future.add_done_callback(release)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            stop.set()  # the thread finishes its current image, then gives up
            raise

    def _decode_all(self, images: list[Image.Image], uploads: list[Upload], stop: threading.Event | None) -> np.ndarray:
        pixels = []
        for image, upload in zip(images, uploads, strict=True):
            if stop is not None and stop.is_set():
                raise RequestGone
            pixels.append(load_image(image, self.contract, name=upload.name))
        return np.stack(pixels)


__all__ = ["Decoder", "ImageError", "RequestGone"]
