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
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from bundle.contract import PIXEL_DIVISOR
from trainer import report
from trainer.augment import normalize, train_batches
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
from trainer.data import load_dataset, split_validation
from trainer.distributed import Runtime, barrier, init_runtime, shutdown
from trainer.engine import (
    WARMUP_STEPS,
    DeviceTimer,
    NonFiniteLossError,
    TrainState,
    build_train_state,
    train_one_epoch,
    warm_up,
)
from trainer.evaluate import accuracy, classification_report, predict_logits
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


@dataclasses.dataclass(frozen=True)
class DeviceData:
    """The splits as uint8 (N, 3, H, W) tensors on the training device, plus what describes them."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    class_names: list[str]
    source: str


# ------------------------------------------------------------------ the steps of a run


def load_data(config: TrainConfig, device: torch.device, normalization: dict | None) -> DeviceData:
    """Decode (or read from cache), split off validation, and move everything to `device` once.

    The normalisation is measured on the training split, unless a resumed run brings its own.
    """
    data = load_dataset(config.data, Path(config.cache_dir) if config.cache_dir else None, download=config.download)
    train_x, train_y, val_x, val_y = split_validation(data.train_images, data.train_labels, config.val_size)
    if config.train_subset:
        keep = np.sort(np.random.default_rng(config.seed).permutation(len(train_x))[: config.train_subset])
        train_x, train_y = train_x[keep], train_y[keep]
    if normalization:
        mean, std = torch.tensor(normalization["mean"]), torch.tensor(normalization["std"])
    else:
        pixels = torch.from_numpy(train_x).reshape(-1, train_x.shape[-1]).double() / PIXEL_DIVISOR
        mean, std = pixels.mean(0).float(), pixels.std(0).float()

    def on_device(images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)

    return DeviceData(
        train_images=on_device(train_x),
        train_labels=torch.from_numpy(train_y).to(device),
        val_images=on_device(val_x),
        val_labels=torch.from_numpy(val_y),
        test_images=on_device(data.test_images),
        test_labels=torch.from_numpy(data.test_labels),
        mean=mean.to(device),
        std=std.to(device),
        class_names=list(data.class_names),
        source=data.source,
    )


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


def validate(state: TrainState, data: DeviceData, config: TrainConfig, precision: str) -> float | None:
    """Accuracy of the evaluated weights on the validation split (None without one); no TTA."""
    if not len(data.val_images):
        return None
    logits, _ = predict_logits(
        state.eval_model,
        data.val_images,
        data.mean,
        data.std,
        tta=0,
        precision=precision,
        channels_last=config.channels_last,
    )
    return accuracy(logits, data.val_labels)


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


def final_evaluation(state: TrainState, data: DeviceData, config: TrainConfig, precision: str) -> dict:
    """Test (and validation) accuracy with and without TTA. The test set is only reported, never used for a choice."""

    def logits(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return predict_logits(
            state.eval_model,
            images,
            data.mean,
            data.std,
            tta=config.tta,
            precision=precision,
            channels_last=config.channels_last,
        )

    test_plain, test_tta = logits(data.test_images)
    result = {
        "model": config.model,
        "parameters": count_parameters(state.model),
        "class_names": data.class_names,
        "test": classification_report(test_plain, data.test_labels, data.class_names),
        "test_tta": {"level": config.tta, **classification_report(test_tta, data.test_labels, data.class_names)},
    }
    if len(data.val_images):
        val_plain, val_tta = logits(data.val_images)
        result["val"] = {
            "accuracy": accuracy(val_plain, data.val_labels),
            "accuracy_tta": accuracy(val_tta, data.val_labels),
        }
    return result


def write_outputs(out: Path, result: dict, checkpoint: TrainingCheckpoint, class_names: list[str]) -> None:
    """The finished run's checkpoint, model.pt, report.json and plots."""
    save_checkpoint(checkpoint, out / CHECKPOINT_NAME)
    save_checkpoint(checkpoint.model_checkpoint(), out / MODEL_CHECKPOINT_NAME)
    report.write_json_atomic(out / "report.json", result)
    report.plot_curves(report.read_metrics(out / "metrics.jsonl"), out / "curves.png")
    title = f"{result['model']}: test accuracy {100 * result['test']['accuracy']:.2f}% (no TTA)"
    report.plot_confusion(result["test"]["confusion_matrix"], class_names, out / "confusion.png", title)


# ------------------------------------------------------------------ the run


def run(
    config: TrainConfig, runtime: Runtime, out: Path, resume: TrainingCheckpoint | None, commands: list[str]
) -> dict | None:
    """Train (or continue) the run in `out`; returns the report on the main rank."""
    process_start = time.perf_counter()
    device = runtime.device
    if config.threads:
        torch.set_num_threads(config.threads)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels once
    precision = resolve_precision(config.precision, device)
    timer = Timer(**resume.timer) if resume else Timer()
    wall_before = timer.wall_s

    def elapsed_wall() -> float:
        return wall_before + time.perf_counter() - process_start

    # data
    t0 = time.perf_counter()
    data = load_data(config, device, resume.normalization if resume else None)
    timer.data_load_s += time.perf_counter() - t0
    if config.batch_size % runtime.world_size:
        raise ValueError(f"--batch-size {config.batch_size} must be divisible by the {runtime.world_size} ranks")
    steps_per_epoch = len(data.train_images) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"--batch-size {config.batch_size} exceeds the {len(data.train_images)} training images")
    total_steps = max(1, round(config.epochs * steps_per_epoch))
    num_epochs = math.ceil(total_steps / steps_per_epoch)

    # model and training state
    state = build_state(config, data, device, resume)
    flip_bits = torch.rand(len(data.train_images), generator=torch.Generator().manual_seed(config.seed)) < 0.5
    flip_bits = flip_bits.to(device)
    train_model = state.model
    if runtime.distributed:
        train_model = DistributedDataParallel(state.model, device_ids=[device] if device.type == "cuda" else None)
    if config.compile:
        train_model = torch.compile(train_model)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    augmentation = {
        "batch_size": config.batch_size, "seed": config.seed, "mean": data.mean, "std": data.std,
        "translate": config.translate, "flip": config.flip, "flip_bits": flip_bits, "cutout_size": config.cutout,
        "rank": runtime.rank, "world_size": runtime.world_size, "channels_last": config.channels_last,
    }  # fmt: skip

    def batches(epoch: int, steps: int):
        return train_batches(data.train_images, data.train_labels, epoch=epoch, max_steps=steps, **augmentation)

    def checkpoint(finished: bool) -> TrainingCheckpoint:
        return make_checkpoint(
            state, data, config, total_steps=total_steps, finished=finished, commands=commands, timer=timer
        )

    metrics_path, checkpoint_path = out / "metrics.jsonl", out / CHECKPOINT_NAME
    if runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
        kept = [row for row in report.read_metrics(metrics_path) if row["epoch"] <= state.epoch]
        report.rewrite_metrics(metrics_path, kept)  # a resumed run drops rows written after its checkpoint
        group = f" ({runtime.backend} process group, DDP)" if runtime.distributed else ""
        log.info(
            f"{config.model}: {count_parameters(state.model):,} params | {len(data.train_images)} train / "
            f"{len(data.val_images)} val / {len(data.test_images)} test images | {num_epochs} epochs x "
            f"{steps_per_epoch} steps of {config.batch_size} | device {device} x{runtime.world_size}{group}, "
            f"{precision}{', compiled' if config.compile else ''}"
        )

    # warm-up, outside the timed training
    warmup_s = warm_up(train_model, state, next(batches(0, 1)), config, runtime, precision)
    timer.warmup_s += warmup_s
    log.info("warm-up (%d steps, undone%s): %.1f s", WARMUP_STEPS, ", compilation" if config.compile else "", warmup_s)

    # train, validate, save: one epoch at a time
    train_timer = DeviceTimer(device)
    while state.epoch < num_epochs:
        steps = min(steps_per_epoch, total_steps - state.step)
        hint = (
            f"the last good checkpoint {str(checkpoint_path)!r} is left intact"
            if checkpoint_path.exists()
            else "no checkpoint was written"
        )
        stats = train_one_epoch(
            state,
            train_model,
            batches(state.epoch, steps),
            steps=steps,
            total_steps=total_steps,
            num_epochs=num_epochs,
            config=config,
            runtime=runtime,
            precision=precision,
            scaler=scaler,
            checkpoint_hint=hint,
            timer=train_timer,
        )
        timer.train_s += stats.seconds
        if runtime.is_main:
            t0 = time.perf_counter()
            val_acc = validate(state, data, config, precision)
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
                "wall_time_s": elapsed_wall(),
                "images_per_s": stats.images / stats.seconds,
            }
            # Metrics first: a kill between the two leaves a row that --resume drops and redoes;
            # the other order would leave a checkpoint whose epoch has no row, ever.
            report.append_metrics(metrics_path, row)
            t0 = time.perf_counter()
            timer.wall_s = elapsed_wall()
            saved = checkpoint(finished=False)
            save_checkpoint(saved, checkpoint_path)
            if config.keep_epoch_weights:  # for time-to-accuracy curves, scored after the run
                save_checkpoint(saved.model_checkpoint(), out / "epochs" / f"epoch-{state.epoch:03d}.pt")
            timer.save_s += time.perf_counter() - t0
            log.info(
                "epoch %d/%d  train loss %.4f acc %.2f%%  %s  lr %.4g  %.0f img/s  elapsed %.0f s",
                state.epoch,
                num_epochs,
                stats.train_loss,
                100 * stats.train_acc,
                f"val acc {100 * val_acc:.2f}%" if val_acc is not None else "no val split",
                stats.lr,
                row["images_per_s"],
                row["wall_time_s"],
            )
        barrier(runtime)

    if not runtime.is_main:
        return None

    # the final report
    t0 = time.perf_counter()
    result = final_evaluation(state, data, config, precision)
    timer.eval_s += time.perf_counter() - t0
    t0 = time.perf_counter()
    result.update(
        epochs=config.epochs,
        steps=state.step,
        train_images_per_s=state.step * config.batch_size / timer.train_s if timer.train_s else None,
        environment=report.environment_info(
            device, torch.get_num_threads(), runtime.world_size, precision, runtime.backend
        ),
        data={
            "source": data.source,
            "train": len(data.train_images),
            "val": len(data.val_images),
            "test": len(data.test_images),
        },
        config=dataclasses.asdict(config),
        commands=commands,
    )
    result["timing"] = dataclasses.asdict(timer)  # updated below, once everything is written
    write_outputs(out, result, checkpoint(finished=True), data.class_names)
    timer.save_s += time.perf_counter() - t0
    timer.wall_s = elapsed_wall()
    result["timing"] = dataclasses.asdict(timer)
    report.write_json_atomic(out / "report.json", result)
    log.info(
        "test accuracy %.2f%% (TTA level %d: %.2f%%) | train %.1f s, warm-up %.1f s, eval %.1f s, wall %.0f s | %s",
        100 * result["test"]["accuracy"],
        config.tta,
        100 * result["test_tta"]["accuracy"],
        timer.train_s,
        timer.warmup_s,
        timer.eval_s,
        timer.wall_s,
        out,
    )
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    commands = [shlex.join(["python", "-m", "trainer.fit", *(sys.argv[1:] if argv is None else argv)])]
    resume = None
    try:
        if args.resume:
            resume = load_training_checkpoint(args.resume)
            config = resume_config(resume.config, args)
            out = Path(args.resume)
            commands = resume.commands + commands
            if resume.finished and (out / "report.json").exists():
                log.info("run %s already finished (%d steps); nothing to do", out, resume.step)
                return 0
            if config.device == "cuda" and not torch.cuda.is_available():
                raise ValueError(
                    f"run {str(out)!r} trained with --device cuda, but CUDA is not available here; "
                    f"continue it on this machine with --resume {out} --device cpu"
                )
            log.info("resuming %s at epoch %d (step %d) on %s", out, resume.epoch, resume.step, config.device)
        else:
            config = config_from_args(args)
            out = Path(config.out)
            if (out / CHECKPOINT_NAME).exists():
                raise ValueError(
                    f"run folder {str(out)!r} already holds a checkpoint: continue it with --resume {out} "
                    "or choose another --out"
                )
        runtime = init_runtime(config.device)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        log.error("error: %s", err)
        return 2
    if not runtime.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        run(config, runtime, out, resume, commands)
    except (ValueError, FileNotFoundError, NonFiniteLossError) as err:  # the message says what and how to fix it
        log.error("error: %s", err)
        return 1
    except Exception:  # anything else (CUDA errors included): keep the whole traceback in the log
        log.exception("training failed")
        return 1
    finally:
        shutdown(runtime)
    return 0


if __name__ == "__main__":
    sys.exit(main())
