"""Training (`python -m trainer.fit`) as real subprocesses on the shared CIFAR-10 copy.

The CLI's help; the short ResNet-20 run of conftest (`trained_run`): accuracy and run
folder; resume after SIGKILL reproducing an uninterrupted run bit for bit, for the small
CNN (killed at a moment) and for the default fast_resnet with lookahead or EMA (killed
after a seeded step by the trainer's TRAINER_KILL_AFTER_STEP hook); a diverging loss
stopping the run with the last checkpoint intact; refusing to overwrite a run; a
two-process gloo DDP run that must train what one process does on the whole batch, and a
one-process torchrun run in a gloo group; --compile training the same weights as eager.
Tiny runs use the small CNN on 1,000 images (trainer_helpers). Run:
`pytest tests/test_training.py` (a few minutes on two busy cores plus the shared run).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, SHORT_RUN_MIN_ACCURACY, run_module
from trainer_helpers import (
    TINY_EPOCHS,
    TINY_STEPS_PER_EPOCH,
    FitProcess,
    assert_bitwise_equal,
    file_identity,
    load_state,
    sha256_file,
    tiny_fit_args,
)

from bundle.class_tree import first_per_class
from trainer.checkpoint import CHECKPOINT_FORMAT
from trainer.config import TrainConfig
from trainer.fit import KILL_AFTER_STEP_ENV
from trainer.models import MODEL_NAMES, build_model

pytestmark = pytest.mark.slow

CHECKPOINT_KEYS = {
    "format",
    "model_name",
    "num_classes",
    "class_names",
    "normalization",
    "model",
    "ema",
    "ema_n_averaged",
    "lookahead",
    "optimizer",
    "step",
    "epoch",
    "total_steps",
    "finished",
    "rng",
    "config",
    "commands",
    "timer",
}
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------ CLI help


def _help_entries(help_text: str) -> dict[str, str]:
    """The options section of argparse's help as {first flag: its whole entry}."""
    options = help_text.split("\noptions:\n", 1)[1].split("\n\n", 1)[0]
    entries = re.split(r"\n  (?=-)", "\n" + options)
    return {entry.split()[0].rstrip(","): " ".join(entry.split()) for entry in entries if entry.strip()}


def test_fit_help_documents_every_option() -> None:
    result = run_module("trainer.fit", "--help", timeout=120)
    entries = _help_entries(result.stdout)
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        assert flag in entries, f"{flag} is missing from --help"
        assert re.search(r"\(default: [^)]+\)", entries[flag]), f"{flag} does not state its default: {entries[flag]}"
    assert "--resume" in entries and "RUN_DIR" in entries["--resume"]
    assert all(name in entries["--model"] for name in MODEL_NAMES)
    assert "torchrun" in result.stdout, "the help should say how to run on several GPUs"


# ------------------------------------------------------------------ the shared short run


def test_fit_short_run_learns_and_writes_the_run_folder(trained_run: Path) -> None:
    for name in ("checkpoint.pt", "metrics.jsonl", "report.json", "config.json", "curves.png", "confusion.png"):
        assert (trained_run / name).is_file(), f"{name} missing from the run folder"
    for image in ("curves.png", "confusion.png"):
        assert (trained_run / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(trained_run.glob(".*tmp*")), "temporary files were left behind"

    report = json.loads((trained_run / "report.json").read_text())
    assert report["test"]["accuracy"] >= SHORT_RUN_MIN_ACCURACY, report["test"]["accuracy"]
    assert report["model"] == "resnet20" and report["class_names"] == CLASSES
    assert set(report["test"]["per_class_accuracy"]) == set(CLASSES)
    confusion = torch.tensor(report["test"]["confusion_matrix"])
    assert confusion.shape == (10, 10) and confusion.sum(1).tolist() == [1000] * 10
    assert confusion.diag().sum().item() / 10000 == pytest.approx(report["test"]["accuracy"], abs=1e-6)
    for name, accuracy in report["test"]["per_class_accuracy"].items():
        i = CLASSES.index(name)
        assert accuracy == pytest.approx(confusion[i, i].item() / 1000, abs=1e-6)
    assert report["test_tta"]["level"] == 1
    assert (report["data"]["train"], report["data"]["val"], report["data"]["test"]) == (10000, 1000, 10000)

    rows = _metrics(trained_run)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert all(r["val_acc"] is not None for r in rows)
    config = json.loads((trained_run / "config.json").read_text())
    assert config == report["config"]
    assert config["model"] == "resnet20" and config["epochs"] == 4 and config["train_subset"] == 10000


def test_fit_checkpoint_loads_safely_with_the_documented_keys(trained_run: Path) -> None:
    state = load_state(trained_run)  # weights_only=True: no arbitrary code on load
    assert state.keys() >= CHECKPOINT_KEYS, sorted(CHECKPOINT_KEYS - state.keys())
    assert state["format"] == CHECKPOINT_FORMAT and state["model_name"] == "resnet20"
    assert (
        state["finished"] is True
        and state["epoch"] == 4
        and state["step"] == state["total_steps"] == 4 * (10000 // 128)
    )
    assert state["class_names"] == CLASSES and state["num_classes"] == 10
    assert len(state["normalization"]["mean"]) == len(state["normalization"]["std"]) == 3
    assert TrainConfig(**state["config"]).model == "resnet20"
    assert any("trainer.fit" in command for command in state["commands"])
    model = build_model(state["model_name"], state["num_classes"])
    model.load_state_dict(state["model"])  # strict: the saved weights are the bare model's (no DDP prefix)


# ------------------------------------------------------------------ resume after SIGKILL


@pytest.fixture(scope="module")
def interrupted_run(shared_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run SIGKILLed right after its first checkpoint (epoch 1 of 4). Tests copy it before use."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    fit = FitProcess(tiny_fit_args(shared_archive, out), out.parent / "first.log")
    fit.wait_for(lambda: (out / "checkpoint.pt").exists(), "the first checkpoint")
    assert fit.running(), "the run ended before it could be interrupted"
    fit.kill()
    state = load_state(out)
    assert not state["finished"] and 1 <= state["epoch"] < TINY_EPOCHS, state["epoch"]
    assert not (out / "report.json").exists()
    return out


def _copy_run(run: Path, tmp_path: Path, name: str = "run") -> Path:
    return Path(shutil.copytree(run, tmp_path / name))


def test_fit_resume_after_sigkill_matches_an_uninterrupted_run(
    interrupted_run: Path, shared_archive: Path, tmp_path: Path
) -> None:
    # The uninterrupted reference trains at the same time (one thread each).
    reference = tmp_path / "reference"
    reference_fit = FitProcess(tiny_fit_args(shared_archive, reference), tmp_path / "reference.log")
    run = _copy_run(interrupted_run, tmp_path)
    killed_at = load_state(run)["epoch"]

    # Resume, and kill again at a random moment after the next checkpoint: mid-epoch, mid-evaluation
    # or mid-save; whatever it hits, the next resume must continue from a consistent checkpoint.
    before = file_identity(run / "checkpoint.pt")
    second = FitProcess(["--resume", str(run)], tmp_path / "second.log")
    second.wait_for(lambda: file_identity(run / "checkpoint.pt") != before, "the resumed run's next checkpoint")
    epoch_time = _metrics(run)[-1]["epoch_time_s"]
    delay = random.Random(7).uniform(0, epoch_time)  # seeded; where it lands still depends on the machine's speed
    time.sleep(delay)
    assert second.running(), f"the resumed run finished within {delay:.2f} s; it cannot be interrupted"
    second.kill()
    state = load_state(run)
    assert not state["finished"] and killed_at < state["epoch"] < TINY_EPOCHS, (killed_at, state["epoch"])

    final = FitProcess(["--resume", str(run)], tmp_path / "final.log")
    assert final.wait() == 0, final.log()
    assert reference_fit.wait() == 0, reference_fit.log()

    got, want = load_state(run), load_state(reference)
    assert got["finished"] and got["step"] == want["step"] == TINY_EPOCHS * TINY_STEPS_PER_EPOCH
    for key in ("model", "lookahead", "optimizer"):
        assert_bitwise_equal(got[key], want[key], f"{key} after resume (killed at {delay:.2f} s into an epoch)")
    # Every epoch replayed exactly: the logged losses are equal as floats, one row per epoch.
    for row, expected in zip(_metrics(run), _metrics(reference), strict=True):
        assert (row["epoch"], row["train_loss"], row["val_acc"]) == (
            expected["epoch"],
            expected["train_loss"],
            expected["val_acc"],
        )
    report, expected_report = (json.loads((r / "report.json").read_text()) for r in (run, reference))
    assert report["test"] == expected_report["test"]
    assert len(got["commands"]) == 3 and all("trainer.fit" in c for c in got["commands"])


def test_fit_resume_of_a_gpu_run_on_a_cpu_needs_device_cpu_and_then_finishes(
    interrupted_run: Path, tmp_path: Path
) -> None:
    """A checkpoint saved by a 4-GPU CUDA run (config device "cuda", one CUDA RNG state per GPU), resumed
    here without CUDA: refused with the command that works, which then finishes the run."""
    run = _copy_run(interrupted_run, tmp_path)
    state = load_state(run)
    state["config"]["device"] = "cuda"
    state["rng"]["cuda"] = [torch.get_rng_state()] * 4
    torch.save(state, run / "checkpoint.pt")

    refused = run_module("trainer.fit", "--resume", str(run), check=False, env={"CUDA_VISIBLE_DEVICES": ""})
    assert refused.returncode == 2 and f"--resume {run} --device cpu" in refused.stderr, refused.stderr[-2000:]
    changed = run_module("trainer.fit", "--resume", str(run), "--epochs", "9", check=False)
    assert changed.returncode == 2 and "--epochs cannot change" in changed.stderr, changed.stderr[-2000:]

    run_module("trainer.fit", "--resume", str(run), "--device", "cpu", env={"CUDA_VISIBLE_DEVICES": ""})
    final = load_state(run)
    assert final["finished"] and final["step"] == TINY_EPOCHS * TINY_STEPS_PER_EPOCH
    assert final["config"]["device"] == "cpu" and "--device cpu" in final["commands"][-1]
    report = json.loads((run / "report.json").read_text())
    assert report["environment"]["device"] == "cpu"


# ------------------------------------------------------------------ resume of the default model family


FAST_EPOCHS, FAST_STEPS_PER_EPOCH = 3, 5  # 250 training images (300 less 50 for validation) in batches of 50


@pytest.fixture(scope="module")
def small_tree(shared_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A class-folder tree of 30 training and 10 test JPEGs per class, copied from the shared archive: a
    data set on which a whole fast_resnet run costs seconds."""
    root = tmp_path_factory.mktemp("small-tree")
    for split, per_class in (("train", 30), ("test", 10)):
        for file in first_per_class(shared_archive, split, per_class):
            folder = root / split / file.label
            folder.mkdir(parents=True, exist_ok=True)
            (folder / Path(file.name).name).write_bytes(file.read())
    return root


def _fast_resnet_args(data: Path, out: Path, averaging: str) -> list[str]:
    """The default model with its recipe (BatchNorm with shifts at 64x lr, the data-set whitening stem whose
    bias freezes after epoch 1 here, Nesterov SGD, label smoothing, alternating flips, translation) and
    `averaging` (the recipe's lookahead, or EMA), on the small tree: CPU, one thread, deterministic."""
    return [
        "--data", str(data), "--cache-dir", str(out.parent / "cache"), "--model", "fast_resnet",
        "--val-size", "50", "--epochs", str(FAST_EPOCHS), "--batch-size", "50", "--whiten-bias-epochs", "1",
        "--averaging", averaging, "--tta", "0", "--device", "cpu", "--precision", "fp32", "--threads", "1",
        "--seed", "5", "--out", str(out),
    ]  # fmt: skip


@pytest.mark.parametrize("averaging", ["lookahead", "ema"])
def test_fit_fast_resnet_resume_after_sigkill_at_a_seeded_step_is_bitwise_exact(
    averaging: str, small_tree: Path, tmp_path: Path
) -> None:
    """Killed (SIGKILL, by the trainer's test hook) right after a seeded global step of epoch 2 or 3, then
    resumed from the last checkpoint: every tensor of the finished run equals the uninterrupted run's."""
    total = FAST_EPOCHS * FAST_STEPS_PER_EPOCH
    kill_step = random.Random(f"resume-{averaging}").randint(FAST_STEPS_PER_EPOCH + 1, total - 1)
    reference, run = tmp_path / "reference", tmp_path / "run"
    reference_fit = FitProcess(_fast_resnet_args(small_tree, reference, averaging), tmp_path / "reference.log")
    killed = FitProcess(
        _fast_resnet_args(small_tree, run, averaging),
        tmp_path / "killed.log",
        env={KILL_AFTER_STEP_ENV: str(kill_step)},
    )
    assert killed.wait() == -signal.SIGKILL, f"expected a SIGKILL after step {kill_step}\n{killed.log()}"
    state = load_state(run)
    assert not state["finished"] and state["step"] == state["epoch"] * FAST_STEPS_PER_EPOCH < kill_step
    assert state["epoch"] == (kill_step - 1) // FAST_STEPS_PER_EPOCH, (kill_step, state["epoch"])

    resumed = FitProcess(["--resume", str(run)], tmp_path / "resumed.log")
    assert resumed.wait() == 0, resumed.log()
    assert reference_fit.wait() == 0, reference_fit.log()

    got, want = load_state(run), load_state(reference)
    assert got["finished"] and got["step"] == want["step"] == total
    kept = ["model", "optimizer", averaging]
    assert (
        all(want[key] is not None for key in kept) and want["ema" if averaging == "lookahead" else "lookahead"] is None
    )
    for key in kept:
        assert_bitwise_equal(got[key], want[key], f"{key} after a kill at step {kill_step} and a resume")
    assert got["ema_n_averaged"] == want["ema_n_averaged"] == (total if averaging == "ema" else 0)
    for row, expected in zip(_metrics(run), _metrics(reference), strict=True):
        assert (row["epoch"], row["train_loss"], row["val_acc"]) == (
            expected["epoch"],
            expected["train_loss"],
            expected["val_acc"],
        )
    report, expected_report = (json.loads((r / "report.json").read_text()) for r in (run, reference))
    assert report["test"] == expected_report["test"]


# ------------------------------------------------------------------ non-finite loss


def test_fit_nonfinite_loss_stops_with_the_step_and_keeps_the_checkpoint(interrupted_run: Path, tmp_path: Path) -> None:
    run = _copy_run(interrupted_run, tmp_path)
    # Continue the run with an absurd learning rate (as --lr 1e30 would have): Adam steps
    # of ~1e30 overflow the logits to inf within a step or two.
    state = load_state(run)
    state["config"]["lr"] = 1e30
    for group in state["optimizer"]["param_groups"]:
        group["base_lr"] = group["lr"] = 1e30
    torch.save(state, run / "checkpoint.pt")
    checkpoint_hash = sha256_file(run / "checkpoint.pt")
    epochs_done = state["epoch"]

    result = run_module("trainer.fit", "--resume", str(run), check=False, timeout=300)
    assert result.returncode != 0, result.stderr[-3000:]
    match = re.search(r"loss became NaN/inf at step (\d+) \(epoch (\d+)\)", result.stderr)
    assert match, result.stderr[-3000:]
    first_step = epochs_done * TINY_STEPS_PER_EPOCH
    assert first_step <= int(match[1]) < first_step + TINY_STEPS_PER_EPOCH and int(match[2]) == epochs_done + 1
    assert "left intact" in result.stderr
    assert sha256_file(run / "checkpoint.pt") == checkpoint_hash, "the last good checkpoint was overwritten"
    assert not (run / "report.json").exists()
    assert [r["epoch"] for r in _metrics(run)] == list(range(1, epochs_done + 1))


def test_fit_nonfinite_loss_in_the_first_epoch_writes_no_checkpoint(shared_archive: Path, tmp_path: Path) -> None:
    out = tmp_path / "diverging"
    args = tiny_fit_args(shared_archive, out)
    args[args.index("--lr") + 1] = "1e30"  # Adam's first step moves every weight by ~1e30: inf logits at step 1
    result = run_module("trainer.fit", *args, check=False, timeout=300, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 1, result.stderr[-3000:]
    match = re.search(r"loss became NaN/inf at step (\d+) \(epoch 1\); no checkpoint was written", result.stderr)
    assert match and int(match[1]) < TINY_STEPS_PER_EPOCH, result.stderr[-3000:]
    assert not (out / "checkpoint.pt").exists() and not (out / "report.json").exists()


def test_fit_unexpected_error_keeps_its_traceback_in_the_log(interrupted_run: Path, tmp_path: Path) -> None:
    """An error the trainer does not expect (here a weight of the wrong shape, as a CUDA error would be) exits 1
    with its whole traceback in the log, not a one-line message that hides where it came from."""
    run = _copy_run(interrupted_run, tmp_path)
    state = load_state(run)
    state["model"]["fc3.weight"] = state["model"]["fc3.weight"][:, :5]
    torch.save(state, run / "checkpoint.pt")
    result = run_module("trainer.fit", "--resume", str(run), check=False, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "training failed" in result.stderr and "Traceback (most recent call last)" in result.stderr
    assert "size mismatch" in result.stderr and "trainer/fit.py" in result.stderr, result.stderr[-3000:]


# ------------------------------------------------------------------ refusing to overwrite


def test_fit_refuses_to_overwrite_a_run_without_resume(
    interrupted_run: Path, shared_archive: Path, tmp_path: Path
) -> None:
    run = _copy_run(interrupted_run, tmp_path)
    checkpoint_hash = sha256_file(run / "checkpoint.pt")
    result = run_module("trainer.fit", *tiny_fit_args(shared_archive, run), check=False, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "already holds a checkpoint" in result.stderr and f"--resume {run}" in result.stderr
    assert sha256_file(run / "checkpoint.pt") == checkpoint_hash


# ------------------------------------------------------------------ DDP


def _ddp_args(data: Path, out: Path) -> list[str]:
    """A model without BatchNorm (the small CNN), no augmentation and plain SGD: two ranks on half batches
    compute the same mean gradient as one process on the whole batch, up to float summation order."""
    args = tiny_fit_args(data, out, "--translate", "0", "--flip", "none", "--optimizer", "sgd", "--momentum", "0.9")
    args[args.index("--epochs") + 1] = "2"
    args[args.index("--lr") + 1] = "0.05"
    return args


# Measured (2 epochs, 20 steps): one process vs two synchronised ranks differ by at most 8e-7 in any weight;
# each weight tensor moves 3.5e-3 to 3.5e-2 from its initial value; with the DDP wrapper removed (each rank
# training alone on its half batches) rank 0's weights are 1.1e-3 to 4e-2 away from the single process's.
DDP_ATOL = 1e-5
MIN_MOVEMENT = 1e-3


def test_fit_two_process_gloo_ddp_synchronises_gradients(shared_archive: Path, tmp_path: Path) -> None:
    """2 ranks x half batch train exactly what 1 process x full batch does, and every rank ends with the same
    weights: the gradients really are averaged across ranks."""
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    ddp = FitProcess(
        _ddp_args(shared_archive, ddp_out), tmp_path / "ddp.log",
        module=["torch.distributed.run", "--standalone", "--nproc_per_node=2", "tests/fit_saving_rank_weights.py"],
        env={"PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])},
    )  # fmt: skip
    single = FitProcess(_ddp_args(shared_archive, single_out), tmp_path / "single.log")
    assert ddp.wait(timeout=400) == 0, ddp.log()
    assert single.wait(timeout=400) == 0, single.log()

    report = json.loads((ddp_out / "report.json").read_text())
    assert report["environment"]["world_size"] == 2, report["environment"]
    assert report["environment"]["process_group"] == "gloo", report["environment"]
    assert report["steps"] == 2 * TINY_STEPS_PER_EPOCH
    assert [r["epoch"] for r in _metrics(ddp_out)] == [1, 2], "only rank 0 may write metrics"
    state = load_state(ddp_out)
    assert state["finished"] and state["step"] == 2 * TINY_STEPS_PER_EPOCH
    build_model("baseline_cnn").load_state_dict(state["model"])  # no "module." prefix from DDP

    ranks = [torch.load(ddp_out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert_bitwise_equal(ranks[0], ranks[1], "rank 0 and rank 1 final weights")
    assert_bitwise_equal(ranks[0], state["model"], "rank 0 weights and the checkpoint")

    torch.manual_seed(3)  # the run's --seed: the initial weights every rank and the single process start from
    initial = build_model("baseline_cnn").state_dict()
    reference = load_state(single_out)["model"]
    for key, want in reference.items():
        got = state["model"][key]
        assert (want - initial[key]).abs().max() > MIN_MOVEMENT, f"{key} barely trained: the check would be vacuous"
        worst = (got - want).abs().max().item()
        assert worst <= DDP_ATOL, f"{key}: 2 ranks x half batch differ from 1 process x full batch by {worst:.3g}"


def test_fit_one_process_torchrun_joins_a_gloo_group(shared_archive: Path, tmp_path: Path) -> None:
    """A one-rank torchrun run goes through the process group and DDP (as the GPU benchmark's NCCL check relies
    on), and its checkpoint holds the bare model's weights; a plain run stays out of any group."""
    out = tmp_path / "torchrun1"
    args = tiny_fit_args(shared_archive, out)
    args[args.index("--epochs") + 1] = "1"
    result = run_module(
        "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "trainer.fit", *args,
        timeout=400, env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    environment = json.loads((out / "report.json").read_text())["environment"]
    assert environment["world_size"] == 1 and environment["process_group"] == "gloo", environment
    assert "(gloo process group, DDP)" in result.stderr, result.stderr[-3000:]
    build_model("baseline_cnn").load_state_dict(load_state(out)["model"])  # no "module." prefix from DDP


# ------------------------------------------------------------------ torch.compile (the GPU path, exercised on the CPU)


# Measured on the tiny run (40 steps): compiled and eager final weights differ by at most 7.6e-6 (kernel-level
# float differences); keeping the 3 warm-up steps instead of undoing them (the restore removed from
# trainer.engine.warm_up) moves every weight tensor by 9.4e-3 to 3.5e-2. The tolerance sits between, a factor of
# ~13 above the first and ~90 below the second.
COMPILED_ATOL = 1e-4


def test_fit_compile_trains_the_same_weights_as_eager(shared_archive: Path, tmp_path: Path) -> None:
    """--compile warms up (compiling on a real batch), undoes the warm-up and trains the model's own weights:
    the compiled run ends where the eager run does, up to kernel-level float differences. (That the warm-up is
    undone on every path, bit for bit, is tests/test_engine.py's warm-up test.)"""
    eager_run, compiled_run = tmp_path / "eager", tmp_path / "compiled"
    run_module("trainer.fit", *tiny_fit_args(shared_archive, eager_run))
    run_module("trainer.fit", *tiny_fit_args(shared_archive, compiled_run, "--compile"), timeout=900)
    report = json.loads((compiled_run / "report.json").read_text())
    assert report["config"]["compile"] is True and report["timing"]["warmup_s"] > 0
    assert report["steps"] == TINY_EPOCHS * TINY_STEPS_PER_EPOCH
    eager, compiled = load_state(eager_run)["model"], load_state(compiled_run)["model"]
    for key, value in eager.items():
        worst = (compiled[key] - value).abs().max().item()
        assert worst <= COMPILED_ATOL, f"{key}: compiled and eager weights differ by {worst:.3g}"


def test_fit_refuses_compile_with_bf16_on_the_cpu(shared_archive: Path, tmp_path: Path) -> None:
    """--compile with bf16 on the CPU trains nothing (non-finite gradients at step 1 under torch 2.14.1):
    refused before any run folder exists, with the reason and the two ways out."""
    out = tmp_path / "compiled-bf16"
    args = tiny_fit_args(shared_archive, out, "--compile")
    args[args.index("--precision") + 1] = "bf16"
    result = run_module("trainer.fit", *args, check=False, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "--compile with bf16 autocast on the CPU is refused" in result.stderr, result.stderr[-3000:]
    assert "pytorch/pytorch#186799" in result.stderr and "--precision fp32" in result.stderr
    assert not (out / "checkpoint.pt").exists() and not (out / "config.json").exists()


# ------------------------------------------------------------------ per-epoch weights (time-to-accuracy curves)


def test_fit_keep_epoch_weights_writes_each_epochs_evaluation_weights(shared_archive: Path, tmp_path: Path) -> None:
    from trainer.checkpoint import load_model_checkpoint

    out = tmp_path / "kept"
    run_module("trainer.fit", *tiny_fit_args(shared_archive, out, "--keep-epoch-weights"))
    files = sorted((out / "epochs").glob("epoch-*.pt"))
    assert [f.name for f in files] == [f"epoch-{e:03d}.pt" for e in range(1, TINY_EPOCHS + 1)]
    first, _ = load_model_checkpoint(files[0])
    last, _ = load_model_checkpoint(files[-1])
    final = load_state(out)
    assert first.step == TINY_STEPS_PER_EPOCH and last.step == final["step"]
    assert_bitwise_equal(last.weights, final["model"], "the last epoch's kept weights and the final model")
    assert not torch.equal(first.weights["fc3.weight"], last.weights["fc3.weight"])
