"""Time for benchmarks.gpu_run: the budget left, and how long a `trainer.fit` run will take on this machine.

The GPU machine is lent for minutes, so the run decides before each training run whether it still fits, from
the runs it has already measured on the same GPU: a run that would not fit is skipped (or, for the ceiling,
shortened) and recorded as such, rather than killed at its timeout with nothing to show.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time

CIFAR10_TRAIN_IMAGES = 50_000


@dataclasses.dataclass
class Budget:
    """Seconds allowed for the whole run, counted from its creation."""

    total_s: float
    start: float = dataclasses.field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def remaining(self) -> float:
        return self.total_s - self.elapsed()


def resolve_config(args: list[str]):
    """The TrainConfig that `python -m trainer.fit ARGS` would train with (recipe defaults applied)."""
    from trainer.config import build_parser, config_from_args

    return config_from_args(build_parser().parse_args(args))


def steps_of(config, train_total: int = CIFAR10_TRAIN_IMAGES) -> int:
    """Training steps of a run, as trainer.fit counts them."""
    images = train_total - config.val_size
    if config.train_subset:
        images = min(images, config.train_subset)
    return max(1, round(config.epochs * (images // config.batch_size)))


@functools.cache
def forward_gflops(model_name: str) -> float:
    """Forward GFLOPs of one 32x32 image (torch's FlopCounterMode, on the CPU): the models' relative cost."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from bundle.contract import CHANNELS, IMAGE_HEIGHT, IMAGE_WIDTH
    from trainer.models import build_model

    model = build_model(model_name).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, CHANNELS, IMAGE_HEIGHT, IMAGE_WIDTH))
    return counter.get_total_flops() / 1e9


class CostModel:
    """Seconds of a run = its process overhead + steps x seconds per step, learnt from the runs measured so far.

    Seconds per step = a + b x GFLOPs per step (batch size x forward GFLOPs per image): `a` stands for the launch
    and synchronisation overhead of small kernels, `b` for the arithmetic. Fitted by least squares once two
    different step sizes were measured; from one, a = 0 (proportional), which over-estimates bigger models, the
    safe side. The process overhead (start-up, data, warm-up, evaluation, writing) is the largest measured."""

    def __init__(self) -> None:
        self.steps: list[tuple[float, float]] = []  # (GFLOPs per step, seconds per step)
        self.overheads: list[float] = []

    def observe(self, config, steps: int, train_s: float, wall_s: float) -> None:
        if steps > 0 and train_s > 0:
            self.steps.append((config.batch_size * forward_gflops(config.model), train_s / steps))
        self.overheads.append(max(0.0, wall_s - train_s))

    def step_seconds(self, config) -> float | None:
        if not self.steps:
            return None
        flops = config.batch_size * forward_gflops(config.model)
        xs, ys = zip(*self.steps, strict=True)
        if len(set(xs)) > 1:
            slope = statistics.covariance(xs, ys) / statistics.variance(xs)
            intercept = statistics.mean(ys) - slope * statistics.mean(xs)
            if slope > 0 and intercept >= 0:
                return intercept + slope * flops
        return flops * max(y / x for x, y in self.steps)

    def estimate(self, config, train_total: int = CIFAR10_TRAIN_IMAGES) -> float | None:
        """Seconds for a whole `trainer.fit` process with `config`; None before any run was measured."""
        per_step = self.step_seconds(config)
        if per_step is None:
            return None
        return max(self.overheads) + steps_of(config, train_total) * per_step

    def epochs_within(self, config, seconds: float, train_total: int = CIFAR10_TRAIN_IMAGES) -> int | None:
        """The most whole epochs of `config` that fit in `seconds` (None before any run was measured)."""
        per_step = self.step_seconds(config)
        if per_step is None:
            return None
        one_epoch = steps_of(dataclasses.replace(config, epochs=1.0), train_total) * per_step
        return max(0, int((seconds - max(self.overheads)) // one_epoch))

    def describe(self) -> dict:
        return {
            "measured_runs": len(self.overheads),
            "step_points": [{"gflops_per_step": round(x, 3), "seconds_per_step": round(y, 5)} for x, y in self.steps],
            "process_overhead_s": round(max(self.overheads), 2) if self.overheads else None,
        }
