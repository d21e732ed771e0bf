"""The airbench94 peer, run beside the project's trainer (benchmarks.gpu_run, step versus): its data, runs, output.

The peer (Keller Jordan's airbench94.py, ../shared/peers/airbench/, MIT) is never copied into the repository
or imported: it runs as its own program, from a patched copy in a scratch folder. This module

- writes the data it reads, `cifar10/train.pt` and `cifar10/test.pt` in its working folder (dicts of `images`
  uint8 N x 32 x 32 x 3 HWC RGB, `labels` int64, `classes`), from the same JPEG copy the trainer reads, with the
  project's own loader. The training images are shuffled with a fixed seed first: the peer computes its
  whitening filters from the first 5,000, and the class-folder copy decodes in class order;
- patches a copy of the script: its run count (`for run in range(25)`; gpu_run starts one process of one
  run per round), and its own warm-up run (`#main('warmup')`, commented out upstream) switched on, so that its
  timed run does not carry cuDNN's algorithm search and kernel loading (the project's train_s excludes its
  warm-up too);
- parses its per-run table (`total_time_seconds` at the last epoch row: training, whitening set-up included,
  evaluation excluded; at the `eval` row: plus its TTA evaluation) and its final `Mean: ... Std: ...` line;
- writes a stand-in for dry runs on a CPU (airbench94 needs CUDA): no training, one run in the table's format.
"""

from __future__ import annotations

import py_compile
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainer.data import Dataset

RUN_LOOP = re.compile(r"for run in range\((\d+)\)")
WARMUP_CALL = re.compile(r"^(\s*)#\s*main\('warmup'\)", re.MULTILINE)
MEAN_LINE = re.compile(r"Mean:\s*([-+0-9.eE]+|nan)\s+Std:\s*([-+0-9.eE]+|nan)")
TIME_COLUMN = "total_time_seconds"
STAND_IN_NAME = "airbench94_stand_in.py"


def patch_source(source: str, runs: int, warmup: bool = True) -> tuple[str, list[str]]:
    """The peer's code with `runs` timed runs (and its warm-up run switched on); returns it and what changed.
    Each pattern must match exactly once, so that a changed upstream script fails loudly instead of silently."""
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    patched, count = RUN_LOOP.subn(f"for run in range({runs})", source)
    if count != 1:
        raise ValueError(f"expected one `for run in range(N)` in the peer script, found {count}: has it changed?")
    changes = [f"runs: `for run in range(N)` -> range({runs})"]
    if warmup:
        patched, count = WARMUP_CALL.subn(r"\1main('warmup')", patched)
        if count != 1:
            raise ValueError(f"expected one `#main('warmup')` in the peer script, found {count}: has it changed?")
        changes.append("warm-up: `#main('warmup')` uncommented (one untimed run on random labels first)")
    return patched, changes


def write_patched_script(peer: Path, work: Path, runs: int, warmup: bool = True) -> dict:
    """A patched copy of `peer` in `work`, byte-compiled to prove it parses; returns its path and the changes."""
    source = peer.read_text()
    patched, changes = patch_source(source, runs, warmup)
    script = work / peer.name
    script.write_text(patched)
    py_compile.compile(str(script), cfile=str(work / f"{peer.stem}.pyc"), doraise=True)
    return {"script": str(script), "changes": changes}


def write_data(dataset: Dataset, work: Path, seed: int = 0, limit: int = 0) -> dict:
    """Write `work/cifar10/{train,test}.pt` from a decoded trainer.data.Dataset; `limit` > 0 keeps that many
    images of each split (dry runs). Returns the files and their image counts."""
    import numpy as np
    import torch

    order = np.random.default_rng(seed).permutation(len(dataset.train_images))
    splits = {
        "train": (dataset.train_images[order], dataset.train_labels[order]),
        "test": (dataset.test_images, dataset.test_labels),
    }
    folder = work / "cifar10"
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, (images, labels) in splits.items():
        if limit:
            images, labels = images[:limit], labels[:limit]
        path = folder / f"{split}.pt"
        torch.save(
            {
                "images": torch.from_numpy(np.ascontiguousarray(images)),
                "labels": torch.from_numpy(labels.astype(np.int64)),
                "classes": list(dataset.class_names),
            },
            path,
        )
        written[split] = {"file": str(path), "images": len(images)}
    return {"source": dataset.source, "shuffle_seed": seed, **written}


STAND_IN = """\"\"\"airbench94's stand-in for dry runs on a CPU (written by benchmarks.airbench_peer): no training,
one run in its table's format at chance accuracy; with --stall it hangs after its first row.\"\"\"
import sys
import time

COLUMNS = ["run   ", "epoch", "train_loss", "train_acc", "val_acc", "tta_val_acc", "total_time_seconds"]


def row(cells):
    print("".join("|  %s  " % cell.rjust(len(col)) for cell, col in zip(cells, COLUMNS)) + "|", flush=True)


row(COLUMNS)
row(["0", "0", "2.3026", "0.1000", "0.1000", "", "0.0100"])
if "--stall" in sys.argv:
    time.sleep(3600)
row(["", "1", "2.3026", "0.1000", "0.1000", "", "0.0200"])
row(["", "eval", "2.3026", "0.1000", "0.1000", "0.1000", "0.0300"])
"""


def write_stand_in(work: Path) -> Path:
    """airbench94's CPU stand-in (STAND_IN) in `work`: what a dry run runs in its place, CUDA being absent."""
    script = work / STAND_IN_NAME
    script.write_text(STAND_IN)
    return script


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_output(text: str) -> dict:
    """The runs in the peer's printed table and its final mean/std line.

    Returns {"runs": [{"run", "epochs", "tta_val_acc", "val_acc", "train_s", "total_s"}], "printed_mean",
    "printed_std"}; accuracies are fractions, times seconds; the warm-up run is left out. A run cut off before
    its `eval` row is not listed."""
    columns: list[str] | None = None
    runs: list[dict] = []
    current: dict | None = None
    for line in text.splitlines():
        if not line.lstrip().startswith("|"):
            continue
        cells = _cells(line)
        if "tta_val_acc" in cells and "run" in cells:
            columns = cells
            continue
        if columns is None or len(cells) != len(columns):
            continue
        row = dict(zip(columns, cells, strict=True))
        if row["run"]:
            current = {"run": row["run"], "epochs": 0, "train_s": None}
        if current is None:
            continue
        if row["epoch"] == "eval":
            current.update(
                tta_val_acc=_number(row["tta_val_acc"]),
                val_acc=_number(row["val_acc"]),
                total_s=_number(row[TIME_COLUMN]),
            )
            if current["run"] != "warmup":
                runs.append(current)
            current = None
        elif row["epoch"].isdigit():
            current["epochs"] = int(row["epoch"]) + 1
            current["train_s"] = _number(row[TIME_COLUMN])
    means = MEAN_LINE.findall(text)
    mean, std = (float(means[-1][0]), float(means[-1][1])) if means else (None, None)
    return {"runs": runs, "printed_mean": mean, "printed_std": std}
