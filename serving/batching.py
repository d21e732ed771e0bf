"""Adaptive batching: the images of requests that arrive while the model is busy run together in its next batch.

One batch is in flight per worker. The moment the model is free, everything
queued (up to `max_batch_size` images; a bigger request is split across
consecutive batches and re-joined in order) goes in one call. Under light
load a request runs alone at once; under heavy load batches grow by
themselves; nothing ever waits on a timer, so latency returns to normal the
moment a burst ends (the approach of Triton's dynamic batcher with no queue
delay, and of continuous batching in LLM servers).

A batch the cost model expects to take less than `inline_max_seconds` runs on
the event loop itself; requests that arrive meanwhile wait in the socket
buffers and form the next batch. Longer batches run in a model thread, so that
health checks and new connections are answered while they run.

A request is refused up front (`WouldMissDeadline`, answered 503) only when
the model's measured cost says it would finish after its deadline: the queue
ahead of it, at the recent seconds per image and per batch, plus its own images.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

RunBatch = Callable[[np.ndarray], np.ndarray]  # uint8 pixels (N, H, W, 3) -> float32 probabilities (N, classes)


class WouldMissDeadline(RuntimeError):
    """The model's queue would not reach this request before its deadline."""


@dataclass
class _Job:
    pixels: np.ndarray
    deadline: float  # time.monotonic() by which the answer is due
    future: asyncio.Future
    next_row: int = 0  # first row not yet handed to a batch
    results: list[np.ndarray] = field(default_factory=list)

    @property
    def remaining(self) -> int:
        return len(self.pixels) - self.next_row


class CostModel:
    """Seconds per model call as `per_batch + per_image * n`, a least-squares line through recent batches
    (exponentially weighted sums, so each update is O(1) and old load conditions fade)."""

    def __init__(self, decay: float = 0.97) -> None:
        self.decay = decay
        self.w = self.n = self.t = self.nn = self.nt = 0.0  # weighted sums of 1, n, t, n^2, n*t
        self.per_batch, self.per_image = 0.0, 0.0

    def record(self, images: int, seconds: float) -> None:
        d = self.decay
        self.w, self.n, self.t = d * self.w + 1, d * self.n + images, d * self.t + seconds
        self.nn, self.nt = d * self.nn + images * images, d * self.nt + images * seconds
        variance = self.w * self.nn - self.n * self.n
        if variance > 1e-9 * self.w * self.nn:  # several batch sizes seen: fit the line
            self.per_image = max((self.w * self.nt - self.n * self.t) / variance, 0.0)
            self.per_batch = max((self.t - self.per_image * self.n) / self.w, 0.0)
        else:  # one batch size so far: charge it all per image
            self.per_image, self.per_batch = self.t / self.n, 0.0

    def seconds(self, images: int, batches: int) -> float:
        return self.per_image * images + self.per_batch * batches


class AdaptiveBatcher:
    """Runs `run_batch` (a blocking function: on the event loop for short batches, else in one dedicated
    thread) on batches gathered across concurrent `submit` calls. `on_batch(images, requests)` is told the
    size of every batch."""

    def __init__(
        self,
        run_batch: RunBatch,
        *,
        max_batch_size: int,
        on_batch: Callable[[int, int], None] | None = None,
        inline_max_seconds: float = 0.03,
    ) -> None:
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.on_batch = on_batch
        self.inline_max_seconds = inline_max_seconds
        self.cost = CostModel()
        self._queue: collections.deque[_Job] = collections.deque()
        self._queued_images = 0
        self._in_flight_until = 0.0  # expected end of the batch being run
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    @property
    def busy(self) -> bool:
        """Whether a batch is running or requests are queued (a new request would wait)."""
        return bool(self._queue) or self._in_flight_until > 0.0

    async def submit(self, pixels: np.ndarray, deadline: float) -> np.ndarray:
        """Probabilities for `pixels` (one request's images), in order. Raises WouldMissDeadline when the
        queue ahead cannot be cleared in time; cancelling the caller withdraws its images from the queue."""
        if self._loop_task is None or self._loop_task.done():
            self._wakeup = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run_forever(), name="adaptive-batcher")
        expected = self.expected_finish(len(pixels))
        if expected > deadline and (self._queue or self._in_flight_until > time.monotonic()):
            raise WouldMissDeadline(
                f"the model's queue would answer in {expected - time.monotonic():.2f} s, after this request's deadline"
            )
        job = _Job(pixels, deadline, asyncio.get_running_loop().create_future())
        self._queue.append(job)
        self._queued_images += len(pixels)
        self._wakeup.set()
        try:
            return await job.future
        finally:
            if not job.future.done():  # the caller was cancelled: withdraw what has not run yet
                self._withdraw(job)

    def expected_finish(self, images: int) -> float:
        """When a request of `images` submitted now would be answered, by the cost model."""
        start = max(time.monotonic(), self._in_flight_until)
        total = self._queued_images + images
        batches = -(-total // self.max_batch_size)
        return start + self.cost.seconds(total, batches)

    def _withdraw(self, job: _Job) -> None:
        if job in self._queue:
            self._queue.remove(job)
            self._queued_images -= job.remaining

    def _take_batch(self) -> list[tuple[_Job, int, int]]:
        """Up to max_batch_size images from the head of the queue, as (job, first row, end row)."""
        parts, room = [], self.max_batch_size
        while self._queue and room:
            job = self._queue[0]
            if job.future.done():  # answered or cancelled elsewhere
                self._queue.popleft()
                self._queued_images -= job.remaining
                continue
            take = min(room, job.remaining)
            parts.append((job, job.next_row, job.next_row + take))
            job.next_row += take
            self._queued_images -= take
            room -= take
            if job.remaining == 0:
                self._queue.popleft()
        return parts

    async def _run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while parts := self._take_batch():
                pixels = np.concatenate([job.pixels[a:b] for job, a, b in parts])
                if self.on_batch:
                    self.on_batch(len(pixels), len({id(job) for job, _, _ in parts}))
                start = time.monotonic()
                expected = self.cost.seconds(len(pixels), 1)
                self._in_flight_until = start + expected
                try:
                    if expected < self.inline_max_seconds:
                        # A short batch runs right here: the hand-off to the model thread and back, and the two
                        # threads taking turns at the interpreter, cost more than the loop's pause while it runs
                        # (benchmarks/README.md, "Serving under load": 10% more requests/s at concurrency 32 on 2 cores).
                        probabilities = self.run_batch(pixels)
                    else:
                        probabilities = await loop.run_in_executor(self._thread, self.run_batch, pixels)
                except Exception as err:  # the model failed: every request in the batch gets the error
                    for job, _, _ in parts:
                        if not job.future.done():
                            job.future.set_exception(err)
                            self._withdraw(job)
                    continue
                finally:
                    self._in_flight_until = 0.0
                self.cost.record(len(pixels), time.monotonic() - start)
                offset = 0
                for job, a, b in parts:
                    rows = probabilities[offset : offset + b - a]
                    offset += b - a
                    if job.future.done():
                        continue
                    job.results.append(rows)
                    if job.next_row == len(job.pixels) and sum(map(len, job.results)) == len(job.pixels):
                        job.future.set_result(np.concatenate(job.results))
