"""Training targets: accuracy and wall time of `python -m trainer.fit` runs, mean over seeds.

    python -m benchmarks.train_targets [--seeds 0 1 2] [--device cpu|cuda]

Rows (each a real `trainer.fit` subprocess, timed from launch to exit, so
interpreter start, data loading, training and the final evaluation all count):

- the default model with its recipe on all 50,000 training images
  (hyper-parameters were chosen on a 5,000-image validation split; the test
  set is only reported), one run per seed;
- time-to-90%: the same recipe at shorter budgets (--budget-epochs), one seed,
  the shortest whose test accuracy (with TTA) reaches 90%;
- comparison rows at a short schedule: the seed notebook's baseline CNN and
  ResNet-18 (--comparison-epochs).

Saves benchmarks/results/train_targets.json (config beside the results) and
prints a Markdown table for the README.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def run_fit(out: Path, data: str, device: str, extra: list[str]) -> dict:
    """Run trainer.fit to completion in a subprocess; return its report plus the process wall time."""
    command = [sys.executable, "-m", "trainer.fit", "--data", data, "--device", device, "--out", str(out), *extra]
    print("$", " ".join(command[1:]), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.log", "w") as log:  # the run's own log and progress bars
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - start
    report = json.loads((out / "report.json").read_text())
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
        "environment": report["environment"],
    }
    print(f"  -> test {100 * row['test_accuracy']:.2f}% (TTA {100 * row['test_accuracy_tta']:.2f}%), "
          f"{wall:.0f} s wall, {row['train_images_per_s']:.0f} train img/s", flush=True)  # fmt: skip
    return row


def summarize(rows: list[dict]) -> dict:
    def stats(key: str) -> dict:
        values = [r[key] for r in rows]
        return {
            "mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values,
        }

    return {k: stats(k) for k in ("test_accuracy", "test_accuracy_tta", "process_wall_s", "train_images_per_s")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", default="../shared/datasets/cifar10-jpeg.tar.gz", help="CIFAR-10 source (default: %(default)s)"
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--extra", default="", help="extra trainer.fit flags for the default-model runs (e.g. '--compile')"
    )
    parser.add_argument(
        "--budget-epochs", type=float, nargs="*", default=[], help="shorter budgets for time-to-90%% (one seed)"
    )
    parser.add_argument(
        "--comparison-epochs", type=float, default=1.0, help="epochs for the baseline CNN and ResNet-18 rows"
    )
    parser.add_argument("--skip-comparison", action="store_true")
    parser.add_argument("--runs-dir", default="runs/benchmark", help="where the run folders go (default: %(default)s)")
    parser.add_argument("--out", default=str(RESULTS / "train_targets.json"))
    args = parser.parse_args(argv)
    runs = Path(args.runs_dir)
    tag = f"{args.device}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    common = ["--val-size", "0", *args.extra.split()]

    default_rows = [
        run_fit(runs / f"{tag}-default-seed{s}", args.data, args.device, [*common, "--seed", str(s)])
        for s in args.seeds
    ]
    budget_rows = [
        run_fit(runs / f"{tag}-default-{e:g}ep", args.data, args.device, [*common, "--epochs", str(e)])
        for e in args.budget_epochs
    ]
    reaching = [r for r in [*budget_rows, default_rows[0]] if r["test_accuracy_tta"] >= 0.90]
    comparison = []
    if not args.skip_comparison:
        for model in ("baseline_cnn", "resnet18"):
            flags = [
                "--val-size",
                "0",
                "--model",
                model,
                "--epochs",
                str(args.comparison_epochs),
                "--tta",
                "1",
                "--seed",
                "0",
            ]
            comparison.append(run_fit(runs / f"{tag}-{model}", args.data, args.device, flags))

    payload = {
        "date": datetime.date.today().isoformat(),
        "config": vars(args),
        "default": {"runs": default_rows, "summary": summarize(default_rows)},
        "time_to_90": min(reaching, key=lambda r: r["process_wall_s"]) if reaching else None,
        "budget_runs": budget_rows,
        "comparison": comparison,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    print_table(payload)
    print(f"saved {args.out}")
    return 0


def print_table(payload: dict) -> None:
    s = payload["default"]["summary"]
    env = payload["default"]["runs"][0]["environment"]
    n = len(payload["default"]["runs"])
    print(f"\n{payload['date']}, {env['device_name']}, {env['precision']}, torch {env['torch']}\n")
    print("| run | epochs | test acc | test acc (TTA) | wall time | train img/s |")
    print("|---|---:|---:|---:|---:|---:|")
    first = payload["default"]["runs"][0]
    print(f"| {first['model']}, mean of {n} seeds | {first['epochs']:g} | {100 * s['test_accuracy']['mean']:.2f} ± {100 * s['test_accuracy']['std']:.2f}% "
          f"| {100 * s['test_accuracy_tta']['mean']:.2f} ± {100 * s['test_accuracy_tta']['std']:.2f}% "
          f"| {s['process_wall_s']['mean']:.0f} s | {s['train_images_per_s']['mean']:.0f} |")  # fmt: skip
    for r in [*payload["budget_runs"], *payload["comparison"]]:
        print(f"| {r['model']}, seed {r['seed']} | {r['epochs']:g} | {100 * r['test_accuracy']:.2f}% | {100 * r['test_accuracy_tta']:.2f}% "
              f"| {r['process_wall_s']:.0f} s | {r['train_images_per_s']:.0f} |")  # fmt: skip
    if payload["time_to_90"]:
        t = payload["time_to_90"]
        print(f"\ntime to 90% (TTA): {t['process_wall_s']:.0f} s ({t['epochs']:g} epochs)")
    else:
        print("\ntime to 90% (TTA): not reached by any run")


if __name__ == "__main__":
    raise SystemExit(main())
