"""Run-folder outputs beside the checkpoint: metrics.jsonl, report.json, curves.png, confusion.png."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from bundle.environment import machine_info


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def rewrite_metrics(path: Path, rows: list[dict]) -> None:
    """Replace metrics.jsonl with `rows` (used on resume to drop epochs after the checkpoint)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def append_metrics(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def environment_info(
    device: torch.device, threads: int, world_size: int, precision: str, process_group: str | None = None
) -> dict:
    """Where a run trained: device, threads, ranks and their process group (None: no launcher), precision,
    machine and library versions."""
    machine = machine_info(("torch", "torchvision", "numpy"))
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else machine["cpu"],
        "cpu_count": machine["cores"],
        "torch_threads": threads,
        "world_size": world_size,
        "process_group": process_group,
        "precision": precision,
        "platform": machine["platform"],
        **machine["versions"],
        "torch": torch.__version__,  # with the build's tag (e.g. +cu130), which the package metadata drops
    }


SHORT_RUN_EPOCHS = 5  # runs this short get each point's value written beside it


def plot_curves(rows: list[dict], path: Path) -> None:
    """Loss, accuracy and learning rate per epoch."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(epochs, [r["train_loss"] for r in rows], marker="o")
    axes[0].set(title="training loss", xlabel="epoch")
    axes[1].plot(epochs, [100 * r["train_acc"] for r in rows], marker="o", label="train (augmented)")
    if any(r.get("val_acc") is not None for r in rows):
        axes[1].plot(
            epochs,
            [100 * r["val_acc"] if r.get("val_acc") is not None else np.nan for r in rows],
            marker="o",
            label="validation",
        )
    axes[1].set(title="accuracy (%)", xlabel="epoch")
    axes[1].legend()
    axes[2].plot(epochs, [r["lr"] for r in rows], marker="o")
    axes[2].set(title="learning rate at epoch end", xlabel="epoch")
    for ax in axes:
        ax.grid(alpha=0.3)
        # From epoch 0, whole epochs: a short run's few points keep their place instead of filling a tiny range.
        ax.set_xlim(0, max(epochs, default=1) + 0.5)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        if len(rows) <= SHORT_RUN_EPOCHS:  # so few points: write each value beside it
            for line in ax.get_lines():
                for x, y in zip(*line.get_data(), strict=True):
                    if np.isfinite(y):
                        ax.annotate(f"{y:.3g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(confusion: list[list[int]], class_names: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    image = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    threshold = matrix.max() / 2
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center", fontsize=7, color="white" if value > threshold else "black")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
