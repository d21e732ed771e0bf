"""The training loop and its parts: optimizer groups, lr schedule, weight averaging, one step, one epoch."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from trainer.config import TrainConfig
from trainer.distributed import Runtime, all_reduce_min, all_reduce_sum
from trainer.precision import autocast

log = logging.getLogger(__name__)
SYNC_EVERY = 10  # steps between host syncs (progress bar, non-finite check); each sync stalls a GPU
WARMUP_STEPS = 3  # steps run, then undone, before the timed training (kernel selection, compilation)


class NonFiniteLossError(RuntimeError):
    """Raised when the loss becomes NaN or infinite; names the step and the epoch."""

    def __init__(self, step: int, epoch: int) -> None:
        super().__init__(f"the training loss became NaN/inf at step {step} (epoch {epoch})")
        self.step, self.epoch = step, epoch


# ------------------------------------------------------------------ optimizer and schedule


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Param groups: BatchNorm shifts (lr x bias_lr_scale, same decay per step), the
    whitening bias (frozen after --whiten-bias-epochs), and everything else."""
    groups: dict[str, list[nn.Parameter]] = {"norm_bias": [], "whiten_bias": [], "other": []}
    norm_params = {
        id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for p in m.parameters()
    }
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith("whiten.bias"):
            groups["whiten_bias"].append(param)
        elif id(param) in norm_params:
            groups["norm_bias"].append(param)
        else:
            groups["other"].append(param)
    scale = config.bias_lr_scale
    settings = {
        "norm_bias": dict(lr=config.lr * scale, weight_decay=config.weight_decay / scale),
        "whiten_bias": dict(lr=config.lr, weight_decay=config.weight_decay),
        "other": dict(lr=config.lr, weight_decay=config.weight_decay),
    }
    param_groups = [
        dict(params=params, name=name, base_lr=settings[name]["lr"], **settings[name])
        for name, params in groups.items()
        if params
    ]
    if config.optimizer == "adam":
        return torch.optim.Adam(param_groups, betas=(config.momentum, 0.999))
    return torch.optim.SGD(param_groups, momentum=config.momentum, nesterov=config.momentum > 0)


def lr_factor(step: int, total_steps: int, config: TrainConfig) -> float:
    """Linear warm-up from start_lr_ratio to 1, then linear or cosine decay to final_lr_ratio."""
    warmup_steps = int(total_steps * config.warmup)
    if step < warmup_steps:
        frac = step / warmup_steps
        return config.start_lr_ratio + (1 - config.start_lr_ratio) * frac
    frac = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if config.schedule == "cosine":
        frac = 0.5 * (1 - math.cos(math.pi * frac))
    return 1 + (config.final_lr_ratio - 1) * frac


def set_lr(optimizer: torch.optim.Optimizer, factor: float, freeze_whiten_bias: bool) -> float:
    for group in optimizer.param_groups:
        frozen = freeze_whiten_bias and group["name"] == "whiten_bias"
        group["lr"] = 0.0 if frozen else group["base_lr"] * factor
    return factor * optimizer.param_groups[-1]["base_lr"]


# ------------------------------------------------------------------ weight averaging


class Lookahead:
    """airbench's lookahead: every 5 steps pull the weights (and BN statistics) towards
    a slow copy and continue from the blend. The blend weight grows as (t/T)^3, so
    early training is untouched and the end averages over its last few hundred steps."""

    every = 5

    def __init__(self, model: nn.Module):
        self.slow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int, total_steps: int) -> None:
        decay = 1.0 if step >= total_steps else 0.95**self.every * (step / total_steps) ** 3
        state = model.state_dict()
        for key, slow in self.slow.items():
            slow.lerp_(state[key], 1 - decay)
            state[key].copy_(slow)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.slow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for key, value in state.items():
            self.slow[key].copy_(value)


@dataclass
class TrainState:
    """Everything training changes; its state_dict goes into every checkpoint."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    lookahead: Lookahead | None = None
    ema: AveragedModel | None = None
    step: int = 0
    epoch: int = 0  # epochs completed

    @property
    def eval_model(self) -> nn.Module:
        """The weights to evaluate: the EMA copy when there is one."""
        return self.ema.module if self.ema else self.model

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema else None,
            "ema_n_averaged": int(self.ema.n_averaged) if self.ema else 0,
            "lookahead": self.lookahead.state_dict() if self.lookahead else None,
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lookahead:
            self.lookahead.load_state_dict(state["lookahead"])
        if self.ema:
            self.ema.module.load_state_dict(state["ema"])
            self.ema.n_averaged.fill_(state["ema_n_averaged"])
        self.step, self.epoch = state["step"], state["epoch"]


def build_train_state(model: nn.Module, config: TrainConfig) -> TrainState:
    lookahead = Lookahead(model) if config.averaging == "lookahead" else None
    ema = None
    if config.averaging == "ema":
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
    return TrainState(model, make_optimizer(model, config), lookahead, ema)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    device: torch.device,
    precision: str,
    label_smoothing: float,
    scaler: torch.amp.GradScaler | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step; returns the (detached) mean loss and the number correct."""
    with autocast(device, precision):
        logits = model(inputs)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss.detach(), (logits.detach().argmax(1) == labels).sum()


@dataclass(frozen=True)
class EpochStats:
    train_loss: float
    train_acc: float
    lr: float  # at the last step
    seconds: float
    images: int


class DeviceTimer:
    """Seconds of work between start() and stop(): CUDA events on a GPU (no host sync until stop; device time,
    as airbench measures it), the wall clock on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._start: torch.cuda.Event | float = 0.0

    def start(self) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def stop(self) -> float:
        if not self.cuda:
            return time.perf_counter() - self._start
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        end.synchronize()
        return self._start.elapsed_time(end) / 1000


@dataclass
class Loop:
    """How the steps of a run execute: the same for every epoch of the run."""

    config: TrainConfig
    runtime: Runtime
    precision: str  # fp32, bf16 or fp16 (trainer/precision.py)
    train_model: nn.Module  # the model as stepped: the state's model, or its DDP / compiled wrapper
    total_steps: int
    num_epochs: int
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    after_step: Callable[[int], None] | None = None  # called with the global step after each step (tests' hook)

    def step(self, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, labels: torch.Tensor, scaler=None):  # type: ignore[no-untyped-def]
        return train_step(
            self.train_model,
            optimizer,
            inputs,
            labels,
            device=self.runtime.device,
            precision=self.precision,
            label_smoothing=self.config.label_smoothing,
            scaler=scaler,
        )


# GradScaler halves its scale (from 65536) at every overflowing step and skips it; below this scale the
# fp16 run has overflowed over and over, i.e. diverged rather than met an occasional inf.
MIN_FP16_LOSS_SCALE = 1.0


def train_one_epoch(
    state: TrainState, loop: Loop, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], steps: int
) -> EpochStats:
    """Run `steps` training steps over `batches`, with progress bar, weight averaging and a divergence check
    every SYNC_EVERY steps (NonFiniteLossError names the step). With fp16's GradScaler an occasional
    non-finite loss is a step the scaler skips; only a collapsing loss scale counts as divergence."""
    config, device, total_steps = loop.config, loop.runtime.device, loop.total_steps
    timer = DeviceTimer(device)
    timer.start()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    first_bad = torch.full((), total_steps + 1, device=device)
    freeze_whiten_bias = state.epoch >= config.whiten_bias_epochs
    bar = tqdm(
        total=steps * config.batch_size,
        unit="img",
        unit_scale=True,
        leave=False,
        dynamic_ncols=True,
        desc=f"epoch {state.epoch + 1}/{loop.num_epochs}",
        disable=not loop.runtime.is_main,
    )
    lr = 0.0
    try:
        for i, (inputs, labels) in enumerate(batches):
            lr = set_lr(state.optimizer, lr_factor(state.step, total_steps, config), freeze_whiten_bias)
            loss, batch_correct = loop.step(state.optimizer, inputs, labels, loop.scaler)
            finite = torch.isfinite(loss)
            if loop.scaler is None:
                first_bad = torch.minimum(first_bad, torch.where(finite, total_steps + 1, state.step))
            loss_sum += torch.where(finite, loss, 0.0)
            correct += batch_correct
            state.step += 1
            if state.lookahead and (state.step % Lookahead.every == 0 or state.step == total_steps):
                state.lookahead.update(state.model, state.step, total_steps)
            if state.ema:
                state.ema.update_parameters(state.model)
            if loop.after_step:
                loop.after_step(state.step)
            if (i + 1) % SYNC_EVERY == 0 or i + 1 == steps:
                if loop.scaler is not None and loop.scaler.get_scale() < MIN_FP16_LOSS_SCALE:
                    first_bad = torch.minimum(first_bad, torch.tensor(state.step, device=device))
                bad_step = int(all_reduce_min(loop.runtime, first_bad).item())
                if bad_step <= total_steps:
                    raise NonFiniteLossError(bad_step, state.epoch + 1)
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.3g}", refresh=False)
                bar.update(config.batch_size * (i + 1) - bar.n)
    finally:
        bar.close()
    seconds = timer.stop()
    totals = all_reduce_sum(loop.runtime, torch.stack([loss_sum.float(), correct.float()]))
    state.epoch += 1
    return EpochStats(
        train_loss=totals[0].item() / (steps * loop.runtime.world_size),
        train_acc=totals[1].item() / (steps * config.batch_size),
        lr=lr,
        seconds=seconds,
        images=steps * config.batch_size,
    )


def warm_up(state: TrainState, loop: Loop, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Run WARMUP_STEPS real training steps (cuDNN's algorithm search, torch.compile's compilation, first-call
    allocations), then restore the model and optimizer: the timed training starts warm and unchanged."""
    start = time.perf_counter()
    saved_model = {k: v.clone() for k, v in state.model.state_dict().items()}
    saved_optimizer = _clone_optimizer_state(state.optimizer.state_dict())
    for _ in range(WARMUP_STEPS):
        loop.step(state.optimizer, *batch)
    state.model.load_state_dict(saved_model)
    state.optimizer.load_state_dict(saved_optimizer)
    if loop.runtime.device.type == "cuda":
        torch.cuda.synchronize(loop.runtime.device)
    return time.perf_counter() - start


def _clone_optimizer_state(state: dict) -> dict:
    def clone(value):
        return value.clone() if torch.is_tensor(value) else value

    return {
        "state": {key: {name: clone(v) for name, v in entry.items()} for key, entry in state["state"].items()},
        "param_groups": state["param_groups"],
    }
