"""Training targets on this machine: accuracy against wall time of real `python -m trainer.fit` runs.

    python -m benchmarks.train_targets [--seeds 0 1 2] [--budgets 300 1800] [--device cpu|cuda]

Each run is a `trainer.fit` subprocess timed from launch to exit (interpreter start, data loading, warm-up,
training, the final evaluation and the report all count), on all 50,000 training images (`--val-size 0`:
every choice of recipe was made earlier on a 5,000-image validation split; the test set is only reported).

- the default recipe, one run per seed, and the previous default recipe (`--old-recipe`) for comparison;
- time-to-accuracy: every run keeps its weights at each epoch's end (`--keep-epoch-weights`); after the run,
  outside its timing, each is scored on the test set (with the run's TTA). The curve is accuracy against the
  process wall time at that epoch's end; the time to 85% / 88% is where the mean curve first reaches it. The
  test set is never used to stop, select or tune anything;
- budgets: the default recipe with its epochs scaled to fill each budget (`--budgets`, seconds), one seed:
  the best accuracy reached within 5 and 30 minutes.

Saves benchmarks/results/train_targets.json (config and machine beside the results), the plot
benchmarks/results/cpu_time_to_accuracy.png (or gpu_...), and prints Markdown tables for the README.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bundle.environment import machine_info
from trainer.checkpoint import load_model_checkpoint
from trainer.config import RECIPES
from trainer.data import load_dataset
from trainer.evaluate import predict_logits
from trainer.models import DEFAULT_MODEL, build_model

RESULTS = Path(__file__).parent / "results"
# The default recipe before this benchmark's round of work (README history): fast_resnet, 5 epochs.
OLD_RECIPE = ["--model", "fast_resnet", "--epochs", "5"]
TARGETS = (0.85, 0.88, 0.90)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", default="../shared/datasets/cifar10-jpeg.tar.gz", help="CIFAR-10 source (default: %(default)s)"
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="(default: cpu)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds per recipe (default: 0 1 2)")
    parser.add_argument(
        "--extra", default="", help="extra trainer.fit flags for every run, as one string (e.g. --extra=--compile)"
    )
    parser.add_argument(
        "--old-recipe", action=argparse.BooleanOptionalAction, default=True,
        help=f"also run the previous default recipe ({' '.join(OLD_RECIPE)}) (default: yes)",
    )  # fmt: skip
    parser.add_argument(
        "--budgets", type=float, nargs="*", default=[300, 1800],
        help="wall-time budgets in seconds for single runs of the default recipe, epochs scaled to fit (default: 300 1800)",
    )  # fmt: skip
    parser.add_argument("--runs-dir", default="runs/benchmark", help="where the run folders go (default: %(default)s)")
    parser.add_argument(
        "--tag",
        help="name prefix of this benchmark's run folders (default: device and time); give an interrupted "
        "benchmark's tag to reuse its finished runs (with the wall times measured then) and redo the rest",
    )
    parser.add_argument(
        "--out", default=str(RESULTS / "train_targets.json"), help="results JSON (default: %(default)s)"
    )
    parser.add_argument(
        "--plot", help="time-to-accuracy plot (default: benchmarks/results/<device>_time_to_accuracy.png)"
    )
    return parser


# ------------------------------------------------------------------ one run


def run_fit(
    out: Path, args: argparse.Namespace, flags: list[str], test: tuple[torch.Tensor, torch.Tensor], with_curve: bool
) -> dict:
    """One trainer.fit process to completion, then (with_curve) its per-epoch test accuracy, after the fact."""
    command = [sys.executable, "-m", "trainer.fit", "--data", args.data, "--device", args.device, "--out", str(out),
               "--val-size", "0", "--keep-epoch-weights", *args.extra.split(), *flags]  # fmt: skip
    print("$", " ".join(["python", *command[1:]]), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    measured = out / "benchmark_wall.json"  # written once the run has finished: a rerun with --tag reuses it
    if measured.exists():
        wall = json.loads(measured.read_text())["process_wall_s"]
        print(f"  (finished in an earlier invocation with this --tag: {wall:.0f} s wall, reused)", flush=True)
    else:
        if out.exists():  # cut off in an earlier invocation: its timing is lost, so it runs again from the start
            print(f"  (unfinished in an earlier invocation: {out} removed, run again)", flush=True)
            shutil.rmtree(out)
        log_path = out.parent / f"{out.name}.log"  # the run's own log and progress bars
        with open(log_path, "w") as log:
            start = time.perf_counter()
            code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
            wall = time.perf_counter() - start
        if code != 0:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-5:])
            raise SystemExit(f"trainer.fit exited with status {code}; the end of its log ({log_path}):\n{tail}")
        measured.write_text(json.dumps({"process_wall_s": wall}) + "\n")
    report = json.loads((out / "report.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curve = epoch_curve(out, metrics, report, test, args.device) if with_curve else []
    row = {
        "command": " ".join(["python", *command[1:]]),
        "model": report["model"],
        "seed": report["config"]["seed"],
        "epochs": report["epochs"],
        "test_accuracy": report["test"]["accuracy"],
        "test_accuracy_tta": report["test_tta"]["accuracy"],
        "tta_level": report["test_tta"]["level"],
        "process_wall_s": wall,
        "timing": report["timing"],
        "train_images_per_s": report["train_images_per_s"],
        "precision": report["environment"]["precision"],
        "environment": report["environment"],
        "curve": curve,
    }
    print(
        f"  -> test {100 * row['test_accuracy']:.2f}% (TTA {100 * row['test_accuracy_tta']:.2f}%), {wall:.0f} s wall, "
        f"{row['timing']['train_s']:.0f} s training, {row['train_images_per_s']:.0f} train img/s",
        flush=True,
    )
    return row


def epoch_curve(out: Path, metrics: list[dict], report: dict, test, device: str) -> list[dict]:
    """Test accuracy (plain and with the run's TTA) of the weights kept at each epoch's end, against the wall
    time at that epoch's end; the last point's weights and accuracy are the finished run's (its report), at the
    end of its last epoch (the final evaluation and the report take the process about half a minute more)."""
    images, labels = test
    tta = report["test_tta"]["level"]
    precision = report["environment"]["precision"]  # as the run's own evaluation, so the last point is its report
    points = []
    for row in metrics:
        weights_file = out / "epochs" / f"epoch-{row['epoch']:03d}.pt"
        state, _ = load_model_checkpoint(weights_file)
        model = build_model(state.model_name, state.num_classes)
        model.load_state_dict(state.weights)
        mean, std = (torch.tensor(state.normalization[k]) for k in ("mean", "std"))
        plain, with_tta = predict_logits(
            model.to(device), images.to(device), mean.to(device), std.to(device), tta=tta, precision=precision
        )
        points.append(
            {
                "epoch": row["epoch"],
                "wall_s": row["wall_time_s"],
                "test_accuracy": float((plain.argmax(1) == labels).float().mean()),
                "test_accuracy_tta": float((with_tta.argmax(1) == labels).float().mean()),
            }
        )
    return points


# ------------------------------------------------------------------ summaries


def mean_curve(rows: list[dict]) -> list[dict]:
    """Epoch by epoch, the mean over seeds of wall time and accuracy."""
    epochs = min(len(r["curve"]) for r in rows)
    return [
        {
            "epoch": rows[0]["curve"][i]["epoch"],
            "wall_s": statistics.mean(r["curve"][i]["wall_s"] for r in rows),
            "test_accuracy": statistics.mean(r["curve"][i]["test_accuracy"] for r in rows),
            "test_accuracy_tta": statistics.mean(r["curve"][i]["test_accuracy_tta"] for r in rows),
        }
        for i in range(epochs)
    ]


def time_to(curve: list[dict], target: float, key: str = "test_accuracy_tta") -> float | None:
    return next((point["wall_s"] for point in curve if point[key] >= target), None)


def summarize(rows: list[dict]) -> dict:
    def stats(key: str) -> dict:
        values = [r[key] for r in rows]
        return {
            "mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values,
        }

    curve = mean_curve(rows)
    summary = {k: stats(k) for k in ("test_accuracy", "test_accuracy_tta", "process_wall_s", "train_images_per_s")}
    summary["train_s"] = stats_of([r["timing"]["train_s"] for r in rows])
    summary["mean_curve"] = curve
    summary["time_to_tta_s"] = {f"{t:.2f}": time_to(curve, t) for t in TARGETS}
    return summary


def stats_of(values: list[float]) -> dict:
    return {
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 5))
    for name, style in (("default", "o-"), ("old_recipe", "s--")):
        if name not in payload:
            continue
        block = payload[name]
        curve = block["summary"]["mean_curve"]
        n = len(block["runs"])
        label = f"{block['label']} (mean of {n} seed{'s' * (n > 1)}, TTA)"
        ax.plot([p["wall_s"] / 60 for p in curve], [100 * p["test_accuracy_tta"] for p in curve], style, label=label)
    for run in payload.get("budgets", []):
        ax.plot(
            run["process_wall_s"] / 60,
            100 * run["test_accuracy_tta"],
            "D",
            markersize=8,
            label=f"{run['model']} {run['epochs']:g} epochs, {run['budget_s'] / 60:g}-minute budget (seed 0)",
        )
    ax.axhline(90, color="gray", linestyle=":", linewidth=1)
    ax.axvline(15, color="gray", linestyle=":", linewidth=1)
    ax.text(15.2, ax.get_ylim()[0] + 1, "15 min", color="gray", fontsize=8)
    ax.set(
        xlabel="wall time from launch (minutes)",
        ylabel="test accuracy with TTA (%)",
        title=f"CIFAR-10 (JPEG copy) on {payload['environment']['cpu']}, {payload['environment']['cores']} cores",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_tables(payload: dict) -> None:
    env = payload["environment"]
    print(f"\n{payload['date']}, {env['cpu']}, {env['cores']} cores, torch {payload['torch']}\n")
    print("| run | epochs | test acc | test acc (TTA) | wall time | training time | train img/s | to 85% | to 88% |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in ("default", "old_recipe"):
        if name not in payload:
            continue
        block = payload[name]
        s, first = block["summary"], block["runs"][0]
        reach = [s["time_to_tta_s"][f"{t:.2f}"] for t in TARGETS[:2]]
        print(
            f"| {block['label']}, mean ± sd of {len(block['runs'])} seeds | {first['epochs']:g} "
            f"| {100 * s['test_accuracy']['mean']:.2f} ± {100 * s['test_accuracy']['std']:.2f}% "
            f"| {100 * s['test_accuracy_tta']['mean']:.2f} ± {100 * s['test_accuracy_tta']['std']:.2f}% "
            f"| {s['process_wall_s']['mean']:.0f} s | {s['train_s']['mean']:.0f} s | {s['train_images_per_s']['mean']:.0f} "
            + "".join(f"| {r:.0f} s " if r is not None else "| - " for r in reach)
            + "|"
        )
    for run in payload.get("budgets", []):
        print(
            f"| {run['model']}, {run['budget_s'] / 60:g}-minute budget, seed 0 | {run['epochs']:g} "
            f"| {100 * run['test_accuracy']:.2f}% | {100 * run['test_accuracy_tta']:.2f}% | {run['process_wall_s']:.0f} s "
            f"| {run['timing']['train_s']:.0f} s | {run['train_images_per_s']:.0f} | | |"
        )


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    runs = Path(args.runs_dir)
    tag = args.tag or f"{args.device}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    data = load_dataset(args.data)
    test = (torch.from_numpy(data.test_images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(data.test_labels))
    payload = {
        "date": datetime.date.today().isoformat(),
        "config": vars(args),
        "environment": machine_info(("torch", "numpy")),
        "torch": torch.__version__,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every run, so that an interrupted benchmark keeps what it measured
        out.write_text(json.dumps(payload, indent=2) + "\n")

    recipes = [("default", f"{DEFAULT_MODEL} (default)", [])]
    if args.old_recipe:
        recipes.append(("old_recipe", "fast_resnet, 5 epochs (previous default)", OLD_RECIPE))
    for name, label, flags in recipes:
        rows = []
        for seed in args.seeds:
            rows.append(run_fit(runs / f"{tag}-{name}-seed{seed}", args, [*flags, "--seed", str(seed)], test, True))
            payload[name] = {"label": label, "flags": flags, "runs": rows, "summary": summarize(rows)}
            save()

    # Budgets: the default recipe's epochs scaled by its measured seconds per epoch (set-up time taken off).
    default_runs = payload["default"]["runs"]
    epochs = RECIPES.get(DEFAULT_MODEL, {}).get("epochs", 10.0)
    fixed_s = statistics.mean(
        r["process_wall_s"] - r["timing"]["train_s"] - r["timing"]["eval_s"] for r in default_runs
    )
    per_epoch_s = statistics.mean((r["timing"]["train_s"] + r["timing"]["eval_s"]) / r["epochs"] for r in default_runs)
    payload["budgets"] = []
    for budget in args.budgets:
        budget_epochs = max(1, int((budget - fixed_s) / per_epoch_s * 0.97))  # a small margin for noise
        flags = ["--epochs", str(budget_epochs), "--seed", "0"]
        row = run_fit(runs / f"{tag}-budget-{budget:g}s", args, flags, test, False)  # its end point is what counts
        payload["budgets"].append({**row, "budget_s": budget, "scaled_from_epochs": epochs})
        save()

    plot_path = Path(args.plot or RESULTS / f"{args.device}_time_to_accuracy.png")
    plot(payload, plot_path)
    print_tables(payload)
    print(f"saved {out} and {plot_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
