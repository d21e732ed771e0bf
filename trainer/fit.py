"""Train a CIFAR-10 classifier: `python -m trainer.fit --data PATH [--model NAME] [--out RUN_DIR]`.

One GPU, many GPUs (`torchrun --nproc_per_node=N -m trainer.fit ...`, DDP) or
a CPU. The run folder receives checkpoint.pt (atomically, every epoch),
config.json, metrics.jsonl, report.json, curves.png and confusion.png.
`--resume RUN_DIR` continues a run killed at any moment.
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

from trainer import report
from trainer.augment import normalize, train_batches
from trainer.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    load_checkpoint,
    restore_rng_states,
    rng_states,
    save_checkpoint,
)
from trainer.config import TrainConfig, build_parser, config_from_args, config_from_dict
from trainer.data import load_dataset, split_validation
from trainer.distributed import Runtime, barrier, init_runtime, shutdown
from trainer.engine import TrainState, build_train_state, resolve_precision, train_one_epoch, train_step
from trainer.evaluate import accuracy, classification_report, predict_logits
from trainer.models import apply_init, build_model, count_parameters

log = logging.getLogger("trainer.fit")


@dataclasses.dataclass
class Timer:
    """Seconds spent per phase; carried in the checkpoint so resumed runs add up."""

    data_load_s: float = 0.0
    compile_warmup_s: float = 0.0
    train_s: float = 0.0
    eval_s: float = 0.0
    wall_s: float = 0.0


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


def load_device_data(config: TrainConfig, device: torch.device, normalization: dict | None) -> DeviceData:
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
        pixels = torch.from_numpy(train_x).reshape(-1, 3).double() / 255
        mean, std = pixels.mean(0).float(), pixels.std(0).float()

    def images(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous().to(device)

    return DeviceData(
        images(train_x), torch.from_numpy(train_y).to(device), images(val_x), torch.from_numpy(val_y),
        images(data.test_images), torch.from_numpy(data.test_labels), mean.to(device), std.to(device),
        list(data.class_names), data.source,
    )  # fmt: skip


def build_model_state(
    config: TrainConfig, data: DeviceData, device: torch.device, resume_state: dict | None
) -> TrainState:
    torch.manual_seed(config.seed)
    model = build_model(config.model, len(data.class_names))
    apply_init(model, config.init)
    model.to(device)
    if hasattr(model, "init_from_data") and not resume_state:
        model.init_from_data(normalize(data.train_images[:5000], data.mean, data.std))
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    state = build_train_state(model, config)
    if resume_state:
        state.load_state_dict(resume_state)
        restore_rng_states(resume_state["rng"])
    return state


def _warm_up_compiled(
    train_model, state: TrainState, batch, config: TrainConfig, runtime: Runtime, precision: str
) -> float:
    """Trigger torch.compile's compilation on real shapes, then restore the untouched state."""
    start = time.perf_counter()
    saved = {k: v.clone() for k, v in state.model.state_dict().items()}
    optimizer_state = state.optimizer.state_dict()
    saved_optimizer = {
        "state": {k: {n: t.clone() if torch.is_tensor(t) else t for n, t in s.items()} for k, s in optimizer_state["state"].items()},
        "param_groups": optimizer_state["param_groups"],
    }  # fmt: skip
    for _ in range(3):
        train_step(train_model, state.optimizer, *batch, device=runtime.device, precision=precision,
                   label_smoothing=config.label_smoothing, scaler=None)  # fmt: skip
    state.model.load_state_dict(saved)
    state.optimizer.load_state_dict(saved_optimizer)
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)
    return time.perf_counter() - start


def run(config: TrainConfig, runtime: Runtime, out: Path, resume_state: dict | None, command: list[str]) -> dict | None:
    """Train (or continue) the run in `out`; returns the report on the main rank."""
    process_start = time.perf_counter()
    device = runtime.device
    if config.threads:
        torch.set_num_threads(config.threads)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    precision = resolve_precision(config.precision, device)
    timer = Timer(**resume_state["timer"]) if resume_state else Timer()
    wall_before = timer.wall_s

    t0 = time.perf_counter()
    data = load_device_data(config, device, resume_state["normalization"] if resume_state else None)
    timer.data_load_s += time.perf_counter() - t0
    if config.batch_size % runtime.world_size:
        raise ValueError(f"--batch-size {config.batch_size} must be divisible by the {runtime.world_size} ranks")
    steps_per_epoch = len(data.train_images) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"--batch-size {config.batch_size} exceeds the {len(data.train_images)} training images")
    total_steps = max(1, round(config.epochs * steps_per_epoch))
    num_epochs = math.ceil(total_steps / steps_per_epoch)

    state = build_model_state(config, data, device, resume_state)
    flip_bits = (torch.rand(len(data.train_images), generator=torch.Generator().manual_seed(config.seed)) < 0.5).to(
        device
    )
    train_model = state.model
    if runtime.distributed:
        train_model = DistributedDataParallel(state.model, device_ids=[device] if device.type == "cuda" else None)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    def batches(epoch: int, steps: int):
        return train_batches(
            data.train_images, data.train_labels, batch_size=config.batch_size, epoch=epoch, seed=config.seed,
            mean=data.mean, std=data.std, translate=config.translate, flip=config.flip, flip_bits=flip_bits,
            cutout_size=config.cutout, rank=runtime.rank, world_size=runtime.world_size, max_steps=steps,
            channels_last=config.channels_last,
        )  # fmt: skip

    def checkpoint(finished: bool) -> dict:
        return {
            "format": CHECKPOINT_FORMAT, "model_name": config.model, "num_classes": len(data.class_names),
            "class_names": data.class_names, "normalization": {"mean": data.mean.tolist(), "std": data.std.tolist()},
            **state.state_dict(), "total_steps": total_steps, "finished": finished, "rng": rng_states(),
            "config": dataclasses.asdict(config), "commands": command, "timer": dataclasses.asdict(timer),
        }  # fmt: skip

    metrics_path, checkpoint_path = out / "metrics.jsonl", out / CHECKPOINT_NAME
    if runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
        report.rewrite_metrics(
            metrics_path, [r for r in report.read_metrics(metrics_path) if r["epoch"] <= state.epoch]
        )
        log.info(
            "%s: %s params | %d train / %d val / %d test images | %d epochs x %d steps of %d | device %s x%d, %s%s",
            config.model, f"{count_parameters(state.model):,}", len(data.train_images), len(data.val_images),
            len(data.test_images), num_epochs, steps_per_epoch, config.batch_size, device, runtime.world_size,
            precision, ", compiled" if config.compile else "",
        )  # fmt: skip
    if config.compile:
        train_model = torch.compile(train_model)
        timer.compile_warmup_s += _warm_up_compiled(train_model, state, next(batches(0, 1)), config, runtime, precision)
        log.info("torch.compile warm-up: %.1f s (not counted as training time)", timer.compile_warmup_s)

    while state.epoch < num_epochs:
        steps = min(steps_per_epoch, total_steps - state.step)
        hint = (
            f"the last good checkpoint {str(checkpoint_path)!r} is left intact"
            if checkpoint_path.exists()
            else "no checkpoint was written"
        )
        stats = train_one_epoch(state, train_model, batches(state.epoch, steps), steps=steps, total_steps=total_steps, num_epochs=num_epochs,
                                config=config, runtime=runtime, precision=precision, scaler=scaler, checkpoint_hint=hint)  # fmt: skip
        timer.train_s += stats.seconds
        if runtime.is_main:
            t_eval = time.perf_counter()
            val_acc = None
            if len(data.val_images):
                logits, _ = predict_logits(state.eval_model, data.val_images, data.mean, data.std, tta=0,
                                           precision=precision, channels_last=config.channels_last)  # fmt: skip
                val_acc = accuracy(logits, data.val_labels)
            timer.eval_s += time.perf_counter() - t_eval
            timer.wall_s = wall_before + time.perf_counter() - process_start
            row = {
                "epoch": state.epoch, "step": state.step, "train_loss": stats.train_loss, "train_acc": stats.train_acc,
                "val_acc": val_acc, "lr": stats.lr, "epoch_time_s": stats.seconds, "train_time_s": timer.train_s,
                "wall_time_s": timer.wall_s, "images_per_s": stats.images / stats.seconds,
            }  # fmt: skip
            # Metrics first: a kill between the two leaves a row that --resume drops and redoes;
            # the other order would leave a checkpoint whose epoch has no row, ever.
            report.append_metrics(metrics_path, row)
            save_checkpoint(checkpoint(finished=False), checkpoint_path)
            log.info(
                "epoch %d/%d  train loss %.4f acc %.2f%%  %s  lr %.4g  %.0f img/s  elapsed %.0f s",
                state.epoch, num_epochs, stats.train_loss, 100 * stats.train_acc,
                f"val acc {100 * val_acc:.2f}%" if val_acc is not None else "no val split", stats.lr,
                row["images_per_s"], timer.wall_s,
            )  # fmt: skip
        barrier(runtime)

    if not runtime.is_main:
        return None
    result = final_evaluation(state, data, config, precision, timer)
    timer.wall_s = wall_before + time.perf_counter() - process_start
    result.update(
        timing=dataclasses.asdict(timer),
        train_images_per_s=state.step * config.batch_size / timer.train_s if timer.train_s else None,
        epochs=config.epochs, steps=state.step,
        environment=report.environment_info(device, torch.get_num_threads(), runtime.world_size, precision),
        data={"source": data.source, "train": len(data.train_images), "val": len(data.val_images), "test": len(data.test_images)},
        config=dataclasses.asdict(config), commands=command,
    )  # fmt: skip
    save_checkpoint(checkpoint(finished=True), checkpoint_path)
    report.write_json_atomic(out / "report.json", result)
    report.plot_curves(report.read_metrics(metrics_path), out / "curves.png")
    report.plot_confusion(result["test"]["confusion_matrix"], data.class_names, out / "confusion.png",
                          f"{config.model}: test accuracy {100 * result['test']['accuracy']:.2f}% (no TTA)")  # fmt: skip
    log.info(
        "test accuracy %.2f%% (TTA level %d: %.2f%%) | train %.0f s, eval %.0f s, wall %.0f s | %s",
        100 * result["test"]["accuracy"], config.tta, 100 * result["test_tta"]["accuracy"],
        timer.train_s, timer.eval_s, timer.wall_s, out,
    )  # fmt: skip
    return result


def final_evaluation(state: TrainState, data: DeviceData, config: TrainConfig, precision: str, timer: Timer) -> dict:
    """Test (and validation) accuracy with and without TTA. The test set is only reported, never used for a choice."""
    start = time.perf_counter()

    def logits(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return predict_logits(state.eval_model, images, data.mean, data.std, tta=config.tta, precision=precision,
                              channels_last=config.channels_last)  # fmt: skip

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
    timer.eval_s += time.perf_counter() - start
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    command = [shlex.join(["python", "-m", "trainer.fit", *(sys.argv[1:] if argv is None else argv)])]
    resume_state = None
    try:
        if args.resume:
            resume_state = load_checkpoint(args.resume)
            config = config_from_dict(resume_state["config"])
            out = Path(args.resume)
            command = resume_state["commands"] + command
            if resume_state["finished"] and (out / "report.json").exists():
                log.info("run %s already finished (%d steps); nothing to do", out, resume_state["step"])
                return 0
            log.info("resuming %s at epoch %d (step %d)", out, resume_state["epoch"], resume_state["step"])
        else:
            config = config_from_args(args)
            out = Path(config.out)
            if (out / CHECKPOINT_NAME).exists():
                raise ValueError(
                    f"run folder {str(out)!r} already holds a checkpoint: continue it with --resume {out} or choose another --out"
                )
    except (ValueError, FileNotFoundError) as err:
        log.error("error: %s", err)
        return 2
    runtime = init_runtime(config.device)
    if not runtime.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        run(config, runtime, out, resume_state, command)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        log.error("error: %s", err)
        return 1
    finally:
        shutdown(runtime)
    return 0


if __name__ == "__main__":
    sys.exit(main())
