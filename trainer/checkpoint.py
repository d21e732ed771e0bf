"""Checkpoints: written atomically, loadable with `torch.load(weights_only=True)`.

A checkpoint is a plain dict of tensors, numbers, strings and lists:
weights, optimizer and averaging state, step/epoch, RNG states, the config,
class names and the normalisation, so that both `--resume` and the exporter
can rebuild everything from it alone.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 1


def save_checkpoint(state: dict, path: Path) -> None:
    """Write `state` to `path` so that a reader (or a crash) sees the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def resolve_checkpoint_path(run_or_file: str | Path) -> Path:
    """Accept a run folder or a checkpoint file; raise a clear error when there is none."""
    path = Path(run_or_file).expanduser()
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {str(path)!r}: pass a run folder holding {CHECKPOINT_NAME} or the file itself"
        )
    return path


def load_checkpoint(run_or_file: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint (a run folder or a file) safely, with weights_only=True."""
    path = resolve_checkpoint_path(run_or_file)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ... on bad files
        raise ValueError(f"cannot read checkpoint {str(path)!r}: {err}") from err
    if not isinstance(state, dict) or "model" not in state or "model_name" not in state:
        raise ValueError(f"{str(path)!r} is not a trainer checkpoint (no 'model'/'model_name' entries)")
    if state.get("format", 0) > CHECKPOINT_FORMAT:
        raise ValueError(
            f"checkpoint {str(path)!r} has format {state['format']}; this version reads <= {CHECKPOINT_FORMAT}"
        )
    return state


def inference_weights(state: dict) -> dict[str, torch.Tensor]:
    """The weights to evaluate or export: the EMA copy when the run kept one, else the model's."""
    return state.get("ema") or state["model"]


def rng_states() -> dict:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
