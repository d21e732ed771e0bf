"""The adaptive batcher (serving/batching.py) in process, with a model whose calls the test controls.

The model stand-in records every batch and can be held (a threading.Event) so that requests pile up while
it is busy, as they do under load. No timing assertions: order and batch contents are checked.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from serving.batching import AdaptiveBatcher, CostModel, WouldMissDeadline


class Model:
    """Returns each image's first pixel value as its "probability"; records batch sizes and the thread that
    ran each batch; can be held (in the batcher's model thread: never hold a batch run on the event loop)."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.threads: list[str] = []
        self.release = threading.Event()
        self.release.set()
        self.started = threading.Event()

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        self.started.set()
        self.release.wait(10)
        self.batches.append([int(p) for p in pixels[:, 0, 0, 0]])
        self.threads.append(threading.current_thread().name)
        return pixels[:, 0, 0, :1].astype(np.float32)


def images(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.uint8).reshape(-1, 1, 1, 1).repeat(3, axis=3)


def far() -> float:
    return time.monotonic() + 60


def test_batcher_runs_a_lone_request_at_once_in_a_batch_of_its_own() -> None:
    model = Model()
    batcher = AdaptiveBatcher(model, max_batch_size=64)
    result = asyncio.run(batcher.submit(images(7, 8), far()))
    assert result[:, 0].tolist() == [7, 8] and model.batches == [[7, 8]]


def test_batcher_runs_short_batches_on_the_event_loop_and_long_ones_in_its_model_thread() -> None:
    """A batch the cost model expects to take less than `inline_max_seconds` runs right on the event loop (no
    hand-off to the model thread and back); a longer one in the thread, so that the loop keeps answering."""
    model = Model()
    batcher = AdaptiveBatcher(model, max_batch_size=64, inline_max_seconds=0.025)
    for n in (1, 2, 4):
        batcher.cost.record(n, 0.01 * n)  # 10 ms per image: 2 images are expected to take 20 ms, 3 take 30 ms

    async def scenario() -> str:
        await batcher.submit(images(1, 2), far())  # 20 ms: on the loop
        await batcher.submit(images(3, 4, 5), far())  # 30 ms: in the thread
        await asyncio.gather(*(batcher.submit(images(v), far()) for v in (6, 7)))  # gathered, 20 ms: on the loop
        return threading.current_thread().name

    loop_thread = asyncio.run(scenario())
    assert model.batches == [[1, 2], [3, 4, 5], [6, 7]]
    assert model.threads[0] == loop_thread == model.threads[2], model.threads
    assert model.threads[1].startswith("model"), model.threads


def test_batcher_gathers_requests_that_arrive_while_the_model_is_busy() -> None:
    model = Model()
    batcher = AdaptiveBatcher(model, max_batch_size=64, inline_max_seconds=0)  # held in its thread

    async def scenario() -> list[np.ndarray]:
        model.release.clear()
        first = asyncio.ensure_future(batcher.submit(images(1), far()))
        while not model.started.is_set():
            await asyncio.sleep(0)
        rest = [asyncio.ensure_future(batcher.submit(images(v), far())) for v in range(2, 12)]
        await asyncio.sleep(0)  # every request is queued behind the busy model
        model.release.set()
        return await asyncio.gather(first, *rest)

    results = asyncio.run(scenario())
    assert [int(r[0, 0]) for r in results] == list(range(1, 12))  # each caller gets its own rows back
    assert model.batches == [[1], list(range(2, 12))]  # the ten waiting requests ran as one batch


def test_batcher_splits_a_request_larger_than_a_batch_and_rejoins_it_in_order() -> None:
    model = Model()
    batcher = AdaptiveBatcher(model, max_batch_size=4)

    async def scenario() -> list[np.ndarray]:
        return await asyncio.gather(batcher.submit(images(*range(10)), far()), batcher.submit(images(50), far()))

    big, small = asyncio.run(scenario())
    assert big[:, 0].tolist() == list(range(10)) and small[:, 0].tolist() == [50]
    assert all(len(batch) <= 4 for batch in model.batches)
    assert [v for batch in model.batches for v in batch] == [*range(10), 50]


def test_batcher_refuses_at_once_what_its_queue_cannot_serve_before_the_deadline() -> None:
    model = Model()
    batcher = AdaptiveBatcher(model, max_batch_size=8, inline_max_seconds=0)
    batcher.cost.record(8, 1.0)  # the model is known to take 1/8 s per image

    async def scenario() -> tuple[list, BaseException | None]:
        model.release.clear()
        busy = asyncio.ensure_future(batcher.submit(images(*range(8)), far()))  # 1 s of work in flight
        while not model.started.is_set():
            await asyncio.sleep(0)
        refused = None
        try:
            await batcher.submit(images(9), time.monotonic() + 0.1)  # due in 0.1 s: cannot be met
        except WouldMissDeadline as err:
            refused = err
        model.release.set()
        return [await busy], refused

    _, refused = asyncio.run(scenario())
    assert refused is not None and "deadline" in str(refused)
    assert model.batches == [list(range(8))]  # the refused request never reached the model


def test_batcher_never_refuses_when_idle_even_a_slow_request() -> None:
    model = Model()
    batcher = AdaptiveBatcher(model, max_batch_size=8)
    batcher.cost.record(8, 8.0)  # one second per image: a 3-image request "takes" 3 s
    result = asyncio.run(batcher.submit(images(1, 2, 3), time.monotonic() + 0.5))
    assert result[:, 0].tolist() == [1, 2, 3]


def test_batcher_withdraws_the_queued_images_of_a_cancelled_request() -> None:
    model = Model()
    batcher = AdaptiveBatcher(model, max_batch_size=64, inline_max_seconds=0)

    async def scenario() -> None:
        model.release.clear()
        first = asyncio.ensure_future(batcher.submit(images(1), far()))
        while not model.started.is_set():
            await asyncio.sleep(0)
        gone = asyncio.ensure_future(batcher.submit(images(2), far()))
        kept = asyncio.ensure_future(batcher.submit(images(3), far()))
        await asyncio.sleep(0)
        gone.cancel()  # the client disconnected while waiting
        await asyncio.sleep(0)
        model.release.set()
        await asyncio.gather(first, kept)

    asyncio.run(scenario())
    assert model.batches == [[1], [3]]


def test_batcher_answers_normally_right_after_a_burst_without_any_timer(monkeypatch) -> None:
    """After hundreds of queued requests, a lone request runs in a batch of its own with no waiting: the
    batcher has no timer (asyncio.sleep is made to fail), so nothing learned under load can delay it."""
    model = Model()
    batcher = AdaptiveBatcher(model, max_batch_size=32)

    async def forbidden_sleep(*_: object) -> None:
        raise AssertionError("the batcher waited on a timer")

    async def scenario() -> np.ndarray:
        await asyncio.gather(*(batcher.submit(images(i % 200), far()) for i in range(500)))
        monkeypatch.setattr(asyncio, "sleep", forbidden_sleep)
        return await batcher.submit(images(42), far())

    assert asyncio.run(scenario())[0, 0] == 42
    assert model.batches[-1] == [42] and max(map(len, model.batches)) == 32


def test_batcher_gives_every_request_of_a_failed_batch_the_error() -> None:
    def broken(pixels: np.ndarray) -> np.ndarray:
        raise RuntimeError("the model failed")

    batcher = AdaptiveBatcher(broken, max_batch_size=8)

    async def scenario() -> list:
        return await asyncio.gather(*(batcher.submit(images(i), far()) for i in range(3)), return_exceptions=True)

    results = asyncio.run(scenario())
    assert all(isinstance(r, RuntimeError) and "failed" in str(r) for r in results)


@pytest.mark.parametrize(("per_batch", "per_image"), [(0.002, 0.0005), (0.0, 0.001), (0.01, 0.0)])
def test_cost_model_recovers_a_linear_cost(per_batch: float, per_image: float) -> None:
    cost = CostModel()
    for n in (1, 2, 4, 8, 16, 32, 64) * 3:
        cost.record(n, per_batch + per_image * n)
    assert cost.per_batch == pytest.approx(per_batch, abs=1e-9)
    assert cost.per_image == pytest.approx(per_image, abs=1e-9)
    assert cost.seconds(10, 2) == pytest.approx(2 * per_batch + 10 * per_image)
