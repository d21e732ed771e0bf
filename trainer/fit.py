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
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from trainer import report
from trainer.augment import normalize
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
from trainer.distributed import Runtime, all_reduce_sum, barrier, init_runtime, shutdown
from trainer.engine import (
    Lookahead,
    NonFiniteLossError,
    lr_factor,
    make_optimizer,
    resolve_precision,
    set_lr,
    train_step,
)
from trainer.evaluate import accuracy, classification_report, predict_logits
from trainer.models import apply_init, build_model, count_parameters

log = logging.getLogger("trainer.fit")
SYNC_EVERY = 10  # steps between host syncs (progress bar, non-finite check); each sync stalls a GPU


@dataclasses.dataclass
class Timer:
    """Seconds spent per phase; carried in the checkpoint so resumed runs add up."""

    data_load_s: float = 0.0
    compile_warmup_s: float = 0.0
    train_s: float = 0.0
    eval_s: float = 0.0
    wall_s: float = 0.0


def _to_device_nchw(images, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _warm_up_compiled(train_model, model, optimizer, batch, config, runtime, precision) -> float:
    """Trigger torch.compile's compilation on real shapes, then restore the untouched state."""
    start = time.perf_counter()
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = optimizer.state_dict()
    saved_opt = {"state": {k: {n: t.clone() if torch.is_tensor(t) else t for n, t in s.items()} for k, s in saved_opt["state"].items()},
                 "param_groups": saved_opt["param_groups"]}  # fmt: skip
    for _ in range(3):
        train_step(train_model, optimizer, *batch, device=runtime.device, precision=precision,
                   label_smoothing=config.label_smoothing, scaler=None)  # fmt: skip
    model.load_state_dict(saved_model)
    optimizer.load_state_dict(saved_opt)
    _synchronize(runtime.device)
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

    # ---- data: the whole set as uint8 tensors on the device
    t0 = time.perf_counter()
    data = load_dataset(config.data, Path(config.cache_dir) if config.cache_dir else None, download=config.download)
    train_x, train_y, val_x, val_y = split_validation(data.train_images, data.train_labels, config.val_size)
    if config.train_subset:
        keep = np.sort(np.random.default_rng(config.seed).permutation(len(train_x))[: config.train_subset])
        train_x, train_y = train_x[keep], train_y[keep]
    if resume_state:
        mean, std = (torch.tensor(resume_state["normalization"][k]) for k in ("mean", "std"))
    else:
        pixels = torch.from_numpy(train_x).reshape(-1, 3).double() / 255
        mean, std = pixels.mean(0).float(), pixels.std(0).float()
    mean, std = mean.to(device), std.to(device)
    train_images, train_labels = _to_device_nchw(train_x, device), torch.from_numpy(train_y).to(device)
    val_images, val_labels = _to_device_nchw(val_x, device), torch.from_numpy(val_y)
    test_images, test_labels = _to_device_nchw(data.test_images, device), torch.from_numpy(data.test_labels)
    timer.data_load_s += time.perf_counter() - t0

    if config.batch_size % runtime.world_size:
        raise ValueError(f"--batch-size {config.batch_size} must be divisible by the {runtime.world_size} ranks")
    steps_per_epoch = len(train_images) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"--batch-size {config.batch_size} exceeds the {len(train_images)} training images")
    total_steps = max(1, round(config.epochs * steps_per_epoch))
    num_epochs = math.ceil(total_steps / steps_per_epoch)

    # ---- model, optimizer, averaging
    torch.manual_seed(config.seed)
    model = build_model(config.model, data.num_classes)
    apply_init(model, config.init)
    model.to(device)
    if hasattr(model, "init_from_data") and not resume_state:
        model.init_from_data(normalize(train_images[:5000], mean, std))
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, config)
    lookahead = Lookahead(model) if config.averaging == "lookahead" else None
    ema = (
        AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
        if config.averaging == "ema"
        else None
    )
    flip_bits = torch.rand(len(train_images), generator=torch.Generator().manual_seed(config.seed)) < 0.5
    flip_bits = flip_bits.to(device)
    step, start_epoch = 0, 0
    if resume_state:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        if lookahead:
            lookahead.load_state_dict(resume_state["lookahead"])
        if ema:
            ema.module.load_state_dict(resume_state["ema"])
            ema.n_averaged.fill_(resume_state["ema_n_averaged"])
        step, start_epoch = resume_state["step"], resume_state["epoch"]
        restore_rng_states(resume_state["rng"])
    eval_model = ema.module if ema else model
    train_model = (
        DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        if runtime.distributed
        else model
    )
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    metrics_path, checkpoint_path = out / "metrics.jsonl", out / CHECKPOINT_NAME
    if runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
        report.rewrite_metrics(
            metrics_path, [r for r in report.read_metrics(metrics_path) if r["epoch"] <= start_epoch]
        )
        log.info(
            "%s: %s params | %d train / %d val / %d test images | %d epochs x %d steps of %d | device %s x%d, %s%s",
            config.model, f"{count_parameters(model):,}", len(train_images), len(val_images), len(test_images),
            num_epochs, steps_per_epoch, config.batch_size, device, runtime.world_size, precision,
            ", compiled" if config.compile else "",
        )  # fmt: skip

    if config.compile:
        train_model = torch.compile(train_model)
        batch = next(iter(_epoch_batches(train_images, train_labels, config, runtime, flip_bits, mean, std, 0, 1)))
        timer.compile_warmup_s += _warm_up_compiled(train_model, model, optimizer, batch, config, runtime, precision)
        log.info("torch.compile warm-up: %.1f s (not counted as training time)", timer.compile_warmup_s)

    def checkpoint_state(epoch: int, finished: bool) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "model_name": config.model,
            "num_classes": data.num_classes,
            "class_names": list(data.class_names),
            "normalization": {"mean": mean.tolist(), "std": std.tolist()},
            "model": model.state_dict(),
            "ema": ema.module.state_dict() if ema else None,
            "ema_n_averaged": int(ema.n_averaged) if ema else 0,
            "lookahead": lookahead.state_dict() if lookahead else None,
            "optimizer": optimizer.state_dict(),
            "step": step,
            "epoch": epoch,
            "total_steps": total_steps,
            "finished": finished,
            "rng": rng_states(),
            "config": dataclasses.asdict(config),
            "commands": command,
            "timer": dataclasses.asdict(timer),
        }

    # ---- training
    for epoch in range(start_epoch, num_epochs):
        epoch_steps = min(steps_per_epoch, total_steps - step)
        _synchronize(device)
        epoch_start = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        first_bad = torch.full((), total_steps + 1, device=device)
        bar = tqdm(total=epoch_steps * config.batch_size, unit="img", unit_scale=True, leave=False,
                   desc=f"epoch {epoch + 1}/{num_epochs}", disable=not runtime.is_main, dynamic_ncols=True)  # fmt: skip
        batches = _epoch_batches(train_images, train_labels, config, runtime, flip_bits, mean, std, epoch, epoch_steps)
        lr = 0.0
        for i, (inputs, labels) in enumerate(batches):
            lr = set_lr(
                optimizer, lr_factor(step, total_steps, config), freeze_whiten_bias=epoch >= config.whiten_bias_epochs
            )
            loss, batch_correct = train_step(train_model, optimizer, inputs, labels, device=device, precision=precision,
                                             label_smoothing=config.label_smoothing, scaler=scaler)  # fmt: skip
            first_bad = torch.where(
                torch.isfinite(loss), first_bad, torch.minimum(first_bad, torch.tensor(step, device=device))
            )
            loss_sum += loss
            correct += batch_correct
            step += 1
            if lookahead and (step % Lookahead.every == 0 or step == total_steps):
                lookahead.update(model, step, total_steps)
            if ema:
                ema.update_parameters(model)
            if (i + 1) % SYNC_EVERY == 0 or i + 1 == epoch_steps:
                _check_finite(runtime, first_bad, total_steps, epoch, checkpoint_path)
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.3g}", refresh=False)
                bar.update(config.batch_size * (i + 1) - bar.n)
        bar.close()
        _synchronize(device)
        epoch_time = time.perf_counter() - epoch_start
        timer.train_s += epoch_time
        totals = all_reduce_sum(runtime, torch.stack([loss_sum.float(), correct.float()]))
        train_loss = totals[0].item() / (epoch_steps * runtime.world_size)
        train_acc = totals[1].item() / (epoch_steps * config.batch_size)

        t_eval = time.perf_counter()
        val_acc = None
        if runtime.is_main and len(val_images):
            val_logits, _ = predict_logits(
                eval_model, val_images, mean, std, tta=0, precision=precision, channels_last=config.channels_last
            )
            val_acc = accuracy(val_logits, val_labels)
        timer.eval_s += time.perf_counter() - t_eval
        timer.wall_s = wall_before + time.perf_counter() - process_start
        if runtime.is_main:
            row = {
                "epoch": epoch + 1, "step": step, "train_loss": train_loss, "train_acc": train_acc, "val_acc": val_acc,
                "lr": lr, "epoch_time_s": epoch_time, "train_time_s": timer.train_s, "wall_time_s": timer.wall_s,
                "images_per_s": epoch_steps * config.batch_size / epoch_time,
            }  # fmt: skip
            # Metrics first: a kill between the two leaves a row that --resume drops and redoes;
            # the other order would leave a checkpoint whose epoch has no row, ever.
            report.append_metrics(metrics_path, row)
            save_checkpoint(checkpoint_state(epoch + 1, finished=False), checkpoint_path)
            val_text = f"val acc {100 * val_acc:.2f}%" if val_acc is not None else "no val split"
            log.info(
                "epoch %d/%d  train loss %.4f acc %.2f%%  %s  lr %.4g  %.0f img/s  elapsed %.0f s",
                epoch + 1, num_epochs, train_loss, 100 * train_acc, val_text, lr, row["images_per_s"], timer.wall_s,
            )  # fmt: skip
        barrier(runtime)

    if not runtime.is_main:
        return None
    # ---- final evaluation; the test set is only reported, never used for a choice
    t_eval = time.perf_counter()
    test_plain, test_tta = predict_logits(
        eval_model, test_images, mean, std, tta=config.tta, precision=precision, channels_last=config.channels_last
    )
    result = {
        "model": config.model,
        "parameters": count_parameters(model),
        "class_names": list(data.class_names),
        "test": classification_report(test_plain, test_labels, list(data.class_names)),
        "test_tta": {"level": config.tta, **classification_report(test_tta, test_labels, list(data.class_names))},
    }
    if len(val_images):
        val_plain, val_tta = predict_logits(
            eval_model, val_images, mean, std, tta=config.tta, precision=precision, channels_last=config.channels_last
        )
        result["val"] = {"accuracy": accuracy(val_plain, val_labels), "accuracy_tta": accuracy(val_tta, val_labels)}
    timer.eval_s += time.perf_counter() - t_eval
    timer.wall_s = wall_before + time.perf_counter() - process_start
    images_seen = step * config.batch_size
    result.update(
        timing=dataclasses.asdict(timer),
        train_images_per_s=images_seen / timer.train_s if timer.train_s else None,
        epochs=config.epochs, steps=step,
        environment=report.environment_info(device, torch.get_num_threads(), runtime.world_size, precision),
        data={"source": data.source, "train": len(train_images), "val": len(val_images), "test": len(test_images)},
        config=dataclasses.asdict(config), commands=command,
    )  # fmt: skip
    save_checkpoint(checkpoint_state(num_epochs, finished=True), checkpoint_path)
    report.write_json_atomic(out / "report.json", result)
    report.plot_curves(report.read_metrics(metrics_path), out / "curves.png")
    report.plot_confusion(result["test"]["confusion_matrix"], list(data.class_names), out / "confusion.png",
                          f"{config.model}: test accuracy {100 * result['test']['accuracy']:.2f}% (no TTA)")  # fmt: skip
    log.info(
        "test accuracy %.2f%% (TTA level %d: %.2f%%) | train %.0f s, eval %.0f s, wall %.0f s | %s",
        100 * result["test"]["accuracy"], config.tta, 100 * result["test_tta"]["accuracy"],
        timer.train_s, timer.eval_s, timer.wall_s, out,
    )  # fmt: skip
    return result


def _epoch_batches(images, labels, config: TrainConfig, runtime: Runtime, flip_bits, mean, std, epoch: int, steps: int):
    from trainer.augment import train_batches

    for inputs, targets in train_batches(
        images, labels, batch_size=config.batch_size, epoch=epoch, seed=config.seed, mean=mean, std=std,
        translate=config.translate, flip=config.flip, flip_bits=flip_bits, cutout_size=config.cutout,
        rank=runtime.rank, world_size=runtime.world_size, max_steps=steps,
    ):  # fmt: skip
        if config.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        yield inputs, targets


def _check_finite(runtime: Runtime, first_bad: torch.Tensor, total_steps: int, epoch: int, checkpoint: Path) -> None:
    if runtime.distributed:
        import torch.distributed as dist

        dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
    bad_step = int(first_bad.item())
    if bad_step <= total_steps:
        kept = (
            f"the last good checkpoint {str(checkpoint)!r} is left intact"
            if checkpoint.exists()
            else "no checkpoint was written"
        )
        raise NonFiniteLossError(
            f"the training loss became NaN/inf at step {bad_step} (epoch {epoch + 1}); {kept}. "
            f"Lower --lr or use --precision fp32."
        )


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
