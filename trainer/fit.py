"""Train a CIFAR-10 classifier: `python -m trainer.fit --data PATH [--model NAME] [--out RUN_DIR]`.

One GPU, many GPUs (`torchrun --nproc_per_node=N -m trainer.fit ...`, DDP) or
a CPU. The run folder receives checkpoint.pt (atomically, every epoch),
model.pt (the weights alone, for export), config.json, metrics.jsonl,
report.json, curves.png and confusion.png. `--resume RUN_DIR` continues a run
killed at any moment, on this device or another one.

`run` reads top to bottom: load the data, build the model and its training
state, warm up, then per epoch train, validate and save; finally evaluate on
the test set and write the report.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from trainer import report
from trainer.augment import Augmentation, normalize, train_batches
from trainer.checkpoint import (
    CHECKPOINT_NAME,
    MODEL_CHECKPOINT_NAME,
    TrainingCheckpoint,
    load_training_checkpoint,
    restore_rng_states,
    rng_states,
    save_checkpoint,
)
from trainer.config import TrainConfig, build_parser, config_from_args, resume_config
from trainer.data import DeviceData, load_data
from trainer.distributed import Runtime, barrier, init_runtime, shutdown
from trainer.engine import (
    WARMUP_STEPS,
    EpochStats,
    Loop,
    NonFiniteLossError,
    TrainState,
    build_train_state,
    train_one_epoch,
    warm_up,
)
from trainer.evaluate import final_evaluation, validate
from trainer.models import apply_init, build_model, count_parameters
from trainer.precision import resolve_precision

log = logging.getLogger("trainer.fit")
WHITENING_IMAGES = 5000  # training images whose 2x2 patches set the whitening stem (airbench94 uses 5,000)


@dataclasses.dataclass
class Timer:
    """Seconds per phase; carried in the checkpoint so that a resumed run adds up. `train_s` counts training
    steps only (on a GPU, device time from CUDA events); set-up, evaluation and writing are apart."""

    data_load_s: float = 0.0
    warmup_s: float = 0.0  # the undone warm-up steps, torch.compile's compilation included
    train_s: float = 0.0
    eval_s: float = 0.0
    save_s: float = 0.0  # checkpoints, report and plots
    wall_s: float = 0.0  # the process (or processes, over resumes) from launch to exit


# ------------------------------------------------------------------ the steps of a run


def whitening_sample(images: torch.Tensor, seed: int, count: int = WHITENING_IMAGES) -> torch.Tensor:
    """A seeded random sample of `count` training images drawn across the whole split: class-folder data
    decodes in class order, so the first images would be (nearly) all one class."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    return images[order[:count].to(images.device)]


def build_state(
    config: TrainConfig, data: DeviceData, device: torch.device, resume: TrainingCheckpoint | None
) -> TrainState:
    """The model (initialised, or restored from `resume`) with its optimizer and weight averaging, on `device`."""
    torch.manual_seed(config.seed)
    model = build_model(config.model, len(data.class_names))
    apply_init(model, config.init)
    model.to(device)
    if hasattr(model, "init_from_data") and resume is None:
        model.init_from_data(normalize(whitening_sample(data.train_images, config.seed), data.mean, data.std))
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    state = build_train_state(model, config)
    if resume is not None:
        state.load_state_dict(resume.train_state())
        restore_rng_states(resume.rng)
    return state


def make_checkpoint(
    state: TrainState,
    data: DeviceData,
    config: TrainConfig,
    *,
    total_steps: int,
    finished: bool,
    commands: list[str],
    timer: Timer,
) -> TrainingCheckpoint:
    return TrainingCheckpoint(
        model_name=config.model,
        class_names=data.class_names,
        normalization={"mean": data.mean.tolist(), "std": data.std.tolist()},
        **state.state_dict(),
        total_steps=total_steps,
        finished=finished,
        rng=rng_states(),
        config=dataclasses.asdict(config),
        commands=commands,
        timer=dataclasses.asdict(timer),
    )


def write_outputs(out: Path, result: dict, checkpoint: TrainingCheckpoint, class_names: list[str]) -> None:
    """The finished run's checkpoint, model.pt, report.json and plots."""
    save_checkpoint(checkpoint, out / CHECKPOINT_NAME)
    save_checkpoint(checkpoint.model_checkpoint(), out / MODEL_CHECKPOINT_NAME)
    report.write_json_atomic(out / "report.json", result)
    report.plot_curves(report.read_metrics(out / "metrics.jsonl"), out / "curves.png")
    title = f"{result['model']}: test accuracy {100 * result['test']['accuracy']:.2f}% (no TTA)"
    report.plot_confusion(result["test"]["confusion_matrix"], class_names, out / "confusion.png", title)


# ------------------------------------------------------------------ the run


@dataclasses.dataclass
class Run:
    """One run's fixed parts, as `run` sets them up: where it writes, its data, how it steps and augments."""

    config: TrainConfig
    runtime: Runtime
    out: Path
    commands: list[str]
    data: DeviceData
    loop: Loop
    augmentation: Augmentation
    steps_per_epoch: int
    timer: Timer
    started: float  # time.perf_counter() at the start of this process

    def batches(self, epoch: int, steps: int):
        return train_batches(
            self.data.train_images, self.data.train_labels, self.augmentation, epoch=epoch, max_steps=steps
        )

    def elapsed_wall(self, wall_before: float) -> float:
        return wall_before + time.perf_counter() - self.started

    def checkpoint(self, state: TrainState, finished: bool) -> TrainingCheckpoint:
        return make_checkpoint(
            state, self.data, self.config, total_steps=self.loop.total_steps, finished=finished,
            commands=self.commands, timer=self.timer,
        )  # fmt: skip


def run(
    config: TrainConfig,
    runtime: Runtime,
    out: Path,
    resume: TrainingCheckpoint | None,
    commands: list[str],
    after_step: Callable[[int], None] | None = None,
) -> dict | None:
    """Train (or continue) the run in `out`: set up, warm up, then per epoch train, validate and save; finally
    evaluate on the test set and write the report. Returns the report on the main rank."""
    job, state = set_up(config, runtime, out, resume, commands, after_step)
    wall_before = job.timer.wall_s
    job.timer.warmup_s += warm_up(state, job.loop, next(job.batches(0, 1)))
    log.info(
        "warm-up (%d steps, undone%s): %.1f s",
        WARMUP_STEPS,
        ", compilation" if config.compile else "",
        job.timer.warmup_s,
    )
    while state.epoch < job.loop.num_epochs:
        steps = min(job.steps_per_epoch, job.loop.total_steps - state.step)
        stats = train_one_epoch(state, job.loop, job.batches(state.epoch, steps), steps)
        job.timer.train_s += stats.seconds
        if runtime.is_main:
            end_epoch(job, state, stats, wall_before)
        barrier(runtime)
    return final_report(job, state, wall_before) if runtime.is_main else None


def set_up(
    config: TrainConfig,
    runtime: Runtime,
    out: Path,
    resume: TrainingCheckpoint | None,
    commands: list[str],
    after_step: Callable[[int], None] | None,
) -> tuple[Run, TrainState]:
    """Threads and determinism, the data on the device, the model and its training state, the run folder."""
    started, device = time.perf_counter(), runtime.device
    precision = resolve_precision(config.precision, device)
    if config.compile and device.type == "cpu" and precision == "bf16":
        # Measured with torch 2.14.1 on a Zen 4 (fast_resnet_320, 2 cores): inductor's backward through
        # GELU -> amax under bf16 autocast gives non-finite gradients at the first step (the amax-gradient bug
        # of pytorch/pytorch#186799), and the compiled step is slower than eager anyway (266 vs 300 img/s).
        raise ValueError(
            "--compile with bf16 autocast on the CPU is refused: torch's compiled gradients through fast_resnet's "
            "GELU -> amax head go non-finite (pytorch/pytorch#186799) and compiled CPU training measured slower "
            "than eager; train without --compile, or add --precision fp32"
        )
    if config.threads:
        torch.set_num_threads(config.threads)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels once
    timer = Timer(**resume.timer) if resume else Timer()
    data = load_data(config, device, resume.normalization if resume else None)
    timer.data_load_s += time.perf_counter() - started
    if config.batch_size % runtime.world_size:
        raise ValueError(f"--batch-size {config.batch_size} must be divisible by the {runtime.world_size} ranks")
    steps_per_epoch = len(data.train_images) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"--batch-size {config.batch_size} exceeds the {len(data.train_images)} training images")
    total_steps = max(1, round(config.epochs * steps_per_epoch))

    state = build_state(config, data, device, resume)
    train_model = state.model
    if runtime.distributed:
        train_model = DistributedDataParallel(state.model, device_ids=[device] if device.type == "cuda" else None)
    if config.compile:
        train_model = torch.compile(train_model)
    loop = Loop(
        config, runtime, precision, train_model, total_steps, math.ceil(total_steps / steps_per_epoch),
        scaler=torch.amp.GradScaler("cuda") if precision == "fp16" else None, after_step=after_step,
    )  # fmt: skip
    flip_bits = torch.rand(len(data.train_images), generator=torch.Generator().manual_seed(config.seed)) < 0.5
    augmentation = Augmentation(
        batch_size=config.batch_size, seed=config.seed, mean=data.mean, std=data.std, translate=config.translate,
        flip=config.flip, flip_bits=flip_bits.to(device), cutout_size=config.cutout, rank=runtime.rank,
        world_size=runtime.world_size, channels_last=config.channels_last,
    )  # fmt: skip
    job = Run(config, runtime, out, commands, data, loop, augmentation, steps_per_epoch, timer, started)
    if runtime.is_main:
        _prepare_run_folder(job, state)
    return job, state


def _prepare_run_folder(job: Run, state: TrainState) -> None:
    config, data, loop = job.config, job.data, job.loop
    job.out.mkdir(parents=True, exist_ok=True)
    (job.out / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    metrics_path = job.out / "metrics.jsonl"
    kept = [row for row in report.read_metrics(metrics_path) if row["epoch"] <= state.epoch]
    report.rewrite_metrics(metrics_path, kept)  # a resumed run drops rows written after its checkpoint
    group = f" ({job.runtime.backend} process group, DDP)" if job.runtime.distributed else ""
    log.info(
        f"{config.model}: {count_parameters(state.model):,} params | {len(data.train_images)} train / "
        f"{len(data.val_images)} val / {len(data.test_images)} test images | {loop.num_epochs} epochs x "
        f"{job.steps_per_epoch} steps of {config.batch_size} | device {job.runtime.device} x"
        f"{job.runtime.world_size}{group}, {loop.precision}{', compiled' if config.compile else ''}"
    )


def end_epoch(job: Run, state: TrainState, stats: EpochStats, wall_before: float) -> None:
    """Validate, record the epoch's metrics, save the checkpoint (main rank)."""
    config, timer = job.config, job.timer
    t0 = time.perf_counter()
    val_acc = validate(state, job.data, config, job.loop.precision)
    timer.eval_s += time.perf_counter() - t0
    row = {
        "epoch": state.epoch,
        "step": state.step,
        "train_loss": stats.train_loss,
        "train_acc": stats.train_acc,
        "val_acc": val_acc,
        "lr": stats.lr,
        "epoch_time_s": stats.seconds,
        "train_time_s": timer.train_s,
        "wall_time_s": job.elapsed_wall(wall_before),
        "images_per_s": stats.images / stats.seconds,
    }
    # Metrics first: a kill between the two leaves a row that --resume drops and redoes;
    # the other order would leave a checkpoint whose epoch has no row, ever.
    report.append_metrics(job.out / "metrics.jsonl", row)
    t0 = time.perf_counter()
    timer.wall_s = job.elapsed_wall(wall_before)
    saved = job.checkpoint(state, finished=False)
    save_checkpoint(saved, job.out / CHECKPOINT_NAME)
    if config.keep_epoch_weights:  # for time-to-accuracy curves, scored after the run
        save_checkpoint(saved.model_checkpoint(), job.out / "epochs" / f"epoch-{state.epoch:03d}.pt")
    timer.save_s += time.perf_counter() - t0
    log.info(
        "epoch %d/%d  train loss %.4f acc %.2f%%  %s  lr %.4g  %.0f img/s  elapsed %.0f s",
        state.epoch,
        job.loop.num_epochs,
        stats.train_loss,
        100 * stats.train_acc,
        f"val acc {100 * val_acc:.2f}%" if val_acc is not None else "no val split",
        stats.lr,
        row["images_per_s"],
        row["wall_time_s"],
    )


def final_report(job: Run, state: TrainState, wall_before: float) -> dict:
    """Test (and validation) accuracy with and without TTA, the report, the plots and the last checkpoint."""
    config, timer, data, precision = job.config, job.timer, job.data, job.loop.precision
    t0 = time.perf_counter()
    result = final_evaluation(state, data, config, precision)
    timer.eval_s += time.perf_counter() - t0
    t0 = time.perf_counter()
    result.update(
        epochs=config.epochs,
        steps=state.step,
        train_images_per_s=state.step * config.batch_size / timer.train_s if timer.train_s else None,
        evaluated_at=precision,
        environment=report.environment_info(
            job.runtime.device, torch.get_num_threads(), job.runtime.world_size, precision, job.runtime.backend
        ),
        data={
            "source": data.source,
            "train": len(data.train_images),
            "val": len(data.val_images),
            "test": len(data.test_images),
        },
        config=dataclasses.asdict(config),
        commands=job.commands,
    )
    result["timing"] = dataclasses.asdict(timer)  # updated below, once everything is written
    write_outputs(job.out, result, job.checkpoint(state, finished=True), data.class_names)
    timer.save_s += time.perf_counter() - t0
    timer.wall_s = job.elapsed_wall(wall_before)
    result["timing"] = dataclasses.asdict(timer)
    report.write_json_atomic(job.out / "report.json", result)
    log.info(
        "test accuracy %.2f%% (TTA level %d: %.2f%%), evaluated at the training precision %s "
        "(trainer.export re-measures in fp32) | train %.1f s, warm-up %.1f s, eval %.1f s, wall %.0f s | %s",
        100 * result["test"]["accuracy"],
        config.tta,
        100 * result["test_tta"]["accuracy"],
        precision,
        timer.train_s,
        timer.warmup_s,
        timer.eval_s,
        timer.wall_s,
        job.out,
    )
    return result


# Fault injection for the resume tests: with TRAINER_KILL_AFTER_STEP=N set, the process SIGKILLs itself right
# after global step N (no handler runs, nothing is flushed), as a crash or an OOM kill would stop it, at a point
# a test can choose and reproduce. Unset in normal use.
KILL_AFTER_STEP_ENV = "TRAINER_KILL_AFTER_STEP"


def _kill_after_step_hook() -> Callable[[int], None] | None:
    kill_step = int(os.environ.get(KILL_AFTER_STEP_ENV) or 0)
    if not kill_step:
        return None

    def kill_at(step: int) -> None:
        if step == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)

    return kill_at


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    commands = [shlex.join(["python", "-m", "trainer.fit", *(sys.argv[1:] if argv is None else argv)])]
    try:
        config, out, resume = _resolve_run(args, commands)
        if config is None:
            return 0
        runtime = init_runtime(config.device)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        log.error("error: %s", err)
        return 2
    if not runtime.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        run(config, runtime, out, resume, resume.commands + commands if resume else commands, _kill_after_step_hook())
    except NonFiniteLossError as err:
        checkpoint = out / CHECKPOINT_NAME
        hint = (
            f"the last good checkpoint {str(checkpoint)!r} is left intact"
            if checkpoint.exists()
            else "no checkpoint was written"
        )
        advice = "Lower --lr or use --precision fp32"
        if config.compile:
            advice += ", or train without --compile (pytorch/pytorch#186799: wrong amax gradients when compiled)"
        log.error("error: %s; %s. %s.", err, hint, advice)
        return 1
    except (ValueError, FileNotFoundError) as err:  # the message says what and how to fix it
        log.error("error: %s", err)
        return 1
    except Exception:  # anything else (CUDA errors included): keep the whole traceback in the log
        log.exception("training failed")
        return 1
    finally:
        shutdown(runtime)
    return 0


def _resolve_run(args, commands: list[str]) -> tuple[TrainConfig | None, Path, TrainingCheckpoint | None]:  # type: ignore[no-untyped-def]
    """The config, run folder and checkpoint to continue from; config None: the run had finished already."""
    if not args.resume:
        config = config_from_args(args)
        out = Path(config.out)
        if (out / CHECKPOINT_NAME).exists():
            raise ValueError(
                f"run folder {str(out)!r} already holds a checkpoint: continue it with --resume {out} "
                "or choose another --out"
            )
        return config, out, None
    resume = load_training_checkpoint(args.resume)
    config = resume_config(resume.config, args)
    out = Path(args.resume)
    if resume.finished and (out / "report.json").exists():
        log.info("run %s already finished (%d steps); nothing to do", out, resume.step)
        return None, out, resume
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"run {str(out)!r} trained with --device cuda, but CUDA is not available here; "
            f"continue it on this machine with --resume {out} --device cpu"
        )
    log.info("resuming %s at epoch %d (step %d) on %s", out, resume.epoch, resume.step, config.device)
    return config, out, resume


if __name__ == "__main__":
    sys.exit(main())
