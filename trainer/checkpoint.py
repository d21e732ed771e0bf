"""Checkpoints, defined once: the full training checkpoint and the slim model checkpoint.

- `checkpoint.pt` (`TrainingCheckpoint`): everything `--resume` needs (weights, optimizer and averaging
  state, step/epoch, RNG state, config, timings), written atomically after every epoch.
- `model.pt` (`ModelCheckpoint`): what the exporter needs and nothing else (inference weights, architecture,
  classes, normalisation, config, commands): a quarter of the size, with tensors on the CPU, so a model trained
  on a GPU machine comes back through a small file.

Both are plain dicts of tensors, numbers, strings and lists, loadable with `torch.load(weights_only=True)`
(no code runs on load), with the flat keys listed by `TrainingCheckpoint` / `ModelCheckpoint` fields.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

CHECKPOINT_NAME = "checkpoint.pt"
MODEL_CHECKPOINT_NAME = "model.pt"
CHECKPOINT_FORMAT = 1
StateDict = dict[str, torch.Tensor]


@dataclass
class ModelCheckpoint:
    """A trained model for export: architecture, inference weights, classes and normalisation."""

    model_name: str
    class_names: list[str]
    normalization: dict[str, list[float]]  # {"mean": [...], "std": [...]}, in [0, 1] pixel units
    weights: StateDict  # the EMA copy when the run kept one
    config: dict  # the TrainConfig, as a dict
    commands: list[str]  # the commands that produced it (resumes included)
    step: int
    format: int = CHECKPOINT_FORMAT
    kind: str = "model"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict:
        return {**_fields(self), "num_classes": self.num_classes}


@dataclass
class TrainingCheckpoint:
    """Everything a run needs to continue exactly where it stopped."""

    model_name: str
    class_names: list[str]
    normalization: dict[str, list[float]]
    # the training state (trainer.engine.TrainState.state_dict)
    model: StateDict
    ema: StateDict | None
    ema_n_averaged: int
    lookahead: StateDict | None
    optimizer: dict
    step: int
    epoch: int  # epochs completed
    total_steps: int
    finished: bool
    rng: dict
    config: dict
    commands: list[str]
    timer: dict  # trainer.fit.Timer, so that resumed runs add their times up
    format: int = CHECKPOINT_FORMAT
    kind: str = "training"

    TRAIN_STATE_KEYS = ("model", "ema", "ema_n_averaged", "lookahead", "optimizer", "step", "epoch")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def train_state(self) -> dict:
        return {key: getattr(self, key) for key in self.TRAIN_STATE_KEYS}

    def inference_weights(self) -> StateDict:
        """The weights to evaluate or export: the EMA copy when the run kept one, else the model's."""
        return self.ema if self.ema is not None else self.model

    def model_checkpoint(self) -> ModelCheckpoint:
        weights = {k: v.detach().cpu() for k, v in self.inference_weights().items()}
        return ModelCheckpoint(
            self.model_name, self.class_names, self.normalization, weights, self.config, self.commands, self.step
        )

    def to_dict(self) -> dict:
        return {**_fields(self), "num_classes": self.num_classes}


def _fields(checkpoint: object) -> dict:
    return {f.name: getattr(checkpoint, f.name) for f in dataclasses.fields(checkpoint)}


def save_checkpoint(checkpoint: TrainingCheckpoint | ModelCheckpoint, path: Path) -> None:
    """Write `checkpoint` to `path` so that a reader (or a crash) sees the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint.to_dict(), f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a run folder is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def resolve_checkpoint_path(run_or_file: str | Path, prefer: tuple[str, ...] = (CHECKPOINT_NAME,)) -> Path:
    """A checkpoint file, or the first of `prefer` inside a run folder; a clear error when there is none."""
    path = Path(run_or_file).expanduser()
    if path.is_dir():
        found = [path / name for name in prefer if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(
                f"no {' or '.join(prefer)} in {str(path)!r}: pass a run folder written by trainer.fit or the file itself"
            )
        return found[0]
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}: pass a run folder or a checkpoint file")
    return path


def _read(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ... on bad files
        raise ValueError(f"cannot read checkpoint {str(path)!r}: {err}") from err
    if not isinstance(state, dict) or "model_name" not in state or not ({"model", "weights"} & state.keys()):
        raise ValueError(f"{str(path)!r} is not a trainer checkpoint (no 'model_name' and weights)")
    if state.get("format", 0) > CHECKPOINT_FORMAT:
        raise ValueError(
            f"checkpoint {str(path)!r} has format {state['format']}; this version reads <= {CHECKPOINT_FORMAT}"
        )
    return state


def _build(cls: type, state: dict, path: Path):
    names = {f.name for f in dataclasses.fields(cls)}
    missing = sorted(names - state.keys() - {"format", "kind"})
    if missing:
        raise ValueError(f"checkpoint {str(path)!r} lacks {missing}")
    if "num_classes" in state and state["num_classes"] != len(state["class_names"]):
        raise ValueError(f"checkpoint {str(path)!r}: num_classes {state['num_classes']} but {state['class_names']}")
    return cls(**{k: v for k, v in state.items() if k in names})


def load_training_checkpoint(run_or_file: str | Path) -> TrainingCheckpoint:
    """The full checkpoint of a run (for --resume), loaded safely onto the CPU."""
    path = resolve_checkpoint_path(run_or_file)
    state = _read(path)
    if "weights" in state:
        raise ValueError(
            f"{str(path)!r} is a weights-only {MODEL_CHECKPOINT_NAME}: it can be exported but not resumed; "
            f"resume from the run's {CHECKPOINT_NAME}"
        )
    return _build(TrainingCheckpoint, state, path)


def load_model_checkpoint(run_or_file: str | Path) -> tuple[ModelCheckpoint, Path]:
    """The model of a run folder (its checkpoint.pt, else model.pt), a checkpoint.pt or a model.pt, for export.
    Returns the model and the file it came from."""
    path = resolve_checkpoint_path(run_or_file, prefer=(CHECKPOINT_NAME, MODEL_CHECKPOINT_NAME))
    state = _read(path)
    if "weights" in state:
        return _build(ModelCheckpoint, state, path), path
    return _build(TrainingCheckpoint, state, path).model_checkpoint(), path


def rng_states() -> dict:
    """The CPU generator's state, and the current CUDA device's when CUDA is in use."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def restore_rng_states(states: dict) -> None:
    """Restore what `rng_states` saved; a CUDA state is skipped on a machine without CUDA (a GPU run resumed
    on a CPU). Older checkpoints hold one CUDA state per device: the first is used, whatever the GPU count."""
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda[0] if isinstance(cuda, list | tuple) else cuda)
