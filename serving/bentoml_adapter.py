"""The one place that relies on non-public BentoML and Starlette behaviour (checked at import).

What it relies on, for bentoml >= 1.4.40, < 1.5 (`SUPPORTED_BENTOML`; outside that range the import fails
with a clear error, and the batching, splitting and shedding tests in tests/test_serving.py cover the rest):

1. `bentoml._internal.marshal.dispatcher.CorkDispatcher(max_latency_in_ms, max_batch_size, fallback=...,
   get_batch_size=...)`, the adaptive-batching dispatcher behind `@bentoml.api(batchable=True)`. Applied to
   an async function of a sequence of inputs, it returns an async function of one input that is batched with
   concurrent calls; an input larger than the batch limit is split along axis 0 and re-joined. When it expects
   a call to wait past `max_latency_in_ms` it cancels that call, and the wrapper then returns `fallback()`
   (our fallback raises, so the caller sees an exception). Called in process: a batchable API is only reached
   over HTTP, one request per call, which cost a second HTTP hop per request (half the throughput, README).
2. BentoML saves a multipart upload bound to a `Path` parameter as `NamedTemporaryFile(suffix=<upload
   name>)`: the file name is "tmp", 8 random characters, then the name the client sent.
3. Starlette raises `MultiPartException` (re-raised as `HTTPException`) with "files" in its text when a form
   has more files than `max_files`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import NoReturn, TypeVar

import bentoml

SUPPORTED_BENTOML = ((1, 4, 40), (1, 5))  # [lowest, first unsupported)


def _check_bentoml_version(found: str) -> None:
    numbers = tuple(int(part) for part in found.split("+")[0].split(".")[:3] if part.isdigit())
    low, high = SUPPORTED_BENTOML
    if not low <= numbers < high:
        raise RuntimeError(
            f"bentoml {found} is installed, but serving/bentoml_adapter.py relies on internals of bentoml "
            f">= {'.'.join(map(str, low))}, < {'.'.join(map(str, high))}: install a version in that range "
            "(pip install -e .) or port the adapter"
        )


_check_bentoml_version(bentoml.__version__)
from bentoml._internal.marshal.dispatcher import CorkDispatcher  # noqa: E402 -- only after the version check

In = TypeVar("In")
Out = TypeVar("Out")
_UPLOAD_PREFIX_LENGTH = len("tmp") + 8


def adaptive_batcher(
    run_batch: Callable[[Sequence[In]], Awaitable[Sequence[Out]]],
    *,
    max_batch_size: int,
    max_latency_ms: int,
    on_shed: Callable[[], NoReturn],
    size_of: Callable[[In], int] = len,
) -> Callable[[In], Awaitable[Out]]:
    """BentoML's adaptive batching around `run_batch` (see 1 above); `on_shed` raises for a shed call."""
    dispatcher = CorkDispatcher(
        max_latency_in_ms=max_latency_ms, max_batch_size=max_batch_size, fallback=on_shed, get_batch_size=size_of
    )
    return dispatcher(run_batch)


def upload_name(path: Path) -> str:
    """The name the client gave an uploaded file, from BentoML's temporary file (see 2 above)."""
    name = path.name
    return name[_UPLOAD_PREFIX_LENGTH:] if name.startswith("tmp") and len(name) > _UPLOAD_PREFIX_LENGTH else name


def is_too_many_files(detail: str) -> bool:
    """Whether Starlette's multipart error `detail` says the form had too many files (see 3 above)."""
    return "files" in detail.lower()
