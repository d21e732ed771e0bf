"""One command for the whole GPU measurement (issue 8): six steps, each logged with its time, all results in --out.

On the CPU machine, copy the data and the peer into the git-ignored .data/ (the GPU machine sees only the
repository, not ../shared), then run on the GPU machine (torch, no network, no installs) from the repository
root, carrying .data; at most --budget-s seconds (7 minutes):

    benchmarks/gpu_prepare.sh
    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 -m benchmarks.gpu_run --out "$OUT"

The same steps on a CPU at toy size, to prove the script before a GPU is available (CI runs it through
tests/test_gpu_run.py; 1-3 minutes on 2 cores):

    PYTHONUNBUFFERED=1 PYTHONPATH=. python -m benchmarks.gpu_run --dry-run --out /tmp/gpu-dry

Steps (each a subprocess with a timeout from what is left of the budget; a step or run that no longer fits is
skipped and recorded with the reason; estimates come from the runs already measured on the same machine):
1. environment: versions, GPU name and memory; the data decoded once into the cache; `pytest -m gpu`.
2. smoke: a 2-epoch CUDA run; its checkpoint.pt and model.pt must load in a process that cannot see CUDA.
   A failure stops the run here.
3. versus airbench94: the peer on the same JPEG copy, --seeds runs with its own timing, then the project's
   fastest recipe with as many seeds: mean and sd of accuracy (with TTA) and train_s, their ratio.
4. ceiling: the most accurate recipe that fits about 3 minutes (shortened to fit, at least half its epochs).
5. bundle: the most accurate model whose fp32 ONNX is at most 16 MB, its epochs chosen on the validation split,
   retrained on all 50,000 images; its weights-only model.pt to --out.
6. NCCL: one rank through torchrun (which joins a process group and wraps DDP even alone).

--out receives gpu_run.log (everything, as it happens), gpu_results.json (rewritten after every step: self-
describing, every number with its unit), bundle_model.pt and bundle_report.json: at most 8 files of 16 MB.
A rerun of some steps: --steps 3 4 5 6 (step 2's stop rule then does not apply). Exit status: 0 when every
step passed, was partial or was skipped for time; 1 when one failed, timed out, raised or was interrupted;
2 for missing inputs or bad options.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from benchmarks import gpu_steps
from benchmarks.gpu_budget import Budget
from benchmarks.gpu_session import ERROR, FAILED, INTERRUPTED, TIMEOUT, Session, Step, setup_logging, utc_now
from benchmarks.gpu_steps import Plan

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA, DEFAULT_PEER = REPO / ".data" / "cifar10-jpeg.tar.gz", REPO / ".data" / "peers" / "airbench94.py"
LOG_NAME, RESULTS_NAME = "gpu_run.log", "gpu_results.json"
MAX_OUT_FILES, MAX_OUT_BYTES = 8, 16_000_000  # what one GPU run can bring back (shared notes, gpu.md)
log = logging.getLogger("gpu_run")


GPU_PLAN = Plan(
    device="cuda",
    toy_args=(),
    smoke_args=("--model", "fast_resnet", "--epochs", "2"),
    fast_args=("--model", "fast_resnet_256", "--epochs", "10", "--val-size", "0", "--tta", "2"),
    seeds=5,
    ceiling_args=("--model", "fast_resnet_512", "--epochs", "40", "--val-size", "0"),
    bundle_args=("--model", "fast_resnet_256"),  # fp32 ONNX ~8 MB; fast_resnet_512's ~24 MB is over 16 MB
    bundle_epochs=(20.0, 30.0, 40.0),
    bundle_val_size=5000,
    nccl_args=("--model", "fast_resnet", "--epochs", "1"),
    peer_runs=True,
    peer_images=0,
)
# The same steps on a CPU at toy size: the seed notebook's small CNN (the fastest model to train and evaluate
# on 2 cores) on 512 images, no TTA, fp32; every file is written as on the GPU.
DRY_PLAN = Plan(
    device="cpu",
    toy_args=("--train-subset", "512", "--batch-size", "128", "--precision", "fp32", "--tta", "0", "--threads", "2"),
    smoke_args=("--model", "baseline_cnn", "--epochs", "1"),
    fast_args=("--model", "baseline_cnn", "--epochs", "1", "--val-size", "0"),
    seeds=2,
    ceiling_args=("--model", "baseline_cnn", "--epochs", "2", "--val-size", "0"),
    bundle_args=("--model", "baseline_cnn"),
    bundle_epochs=(1.0, 2.0),
    bundle_val_size=1000,
    nccl_args=("--model", "baseline_cnn", "--epochs", "1"),
    peer_runs=False,
    peer_images=1000,
)
STEPS = (
    Step(1, "1_environment", "versions, GPU, data decoded once, pytest -m gpu", reserve_s=20, cap_s=160),
    Step(2, "2_smoke", "2-epoch CUDA run; its checkpoint loads on a CPU", reserve_s=25, cap_s=100),
    Step(3, "3_versus_airbench94", "airbench94 and the fast recipe, same GPU, same seeds", reserve_s=60, cap_s=240),
    Step(4, "4_ceiling", "the data's ceiling: the most accurate recipe in about 3 minutes", reserve_s=45, cap_s=200),
    Step(5, "5_bundle", "the bundle: ONNX <= 16 MB, epochs chosen on validation, then all 50,000", 60, 240),
    Step(6, "6_nccl", "one NCCL rank through torchrun", reserve_s=20, cap_s=90),
)


def _flags(text: str) -> tuple[str, ...]:
    return tuple(shlex.split(text))


def get_args_parser() -> argparse.ArgumentParser:
    def shown(name: str) -> str:
        def as_text(value) -> str:
            if isinstance(value, tuple):
                return " ".join(v if isinstance(v, str) else f"{v:g}" for v in value)
            return str(value)

        return f"(default: {as_text(getattr(GPU_PLAN, name))}; with --dry-run: {as_text(getattr(DRY_PLAN, name))})"

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="FLAGS options take one quoted string, e.g. --fast-args='--model fast_resnet_256 --epochs 12'.",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the log, results JSON and bundle ($OUT)")
    parser.add_argument("--dry-run", action="store_true", help="every step on the CPU at toy size (default: off)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="seconds for the whole run (default: 420)")
    parser.add_argument(
        "--data", default=DEFAULT_DATA, help=f"the CIFAR-10 JPEG copy (default: {DEFAULT_DATA.relative_to(REPO)})"
    )
    parser.add_argument(
        "--peer", default=DEFAULT_PEER, help=f"the airbench94 peer script (default: {DEFAULT_PEER.relative_to(REPO)})"
    )
    parser.add_argument(
        "--work-dir", type=Path, help="run folders (a new subfolder per invocation), the peer's data and the data "
        "cache (default: a temporary folder, removed at the end)",
    )  # fmt: skip
    parser.add_argument(
        "--cache-dir", help="the trainer's decoded-data cache (default: WORK_DIR/cache/resnet-cifar; with --dry-run "
        "the trainer's own default, ~/.cache/resnet-cifar, which the test suite fills)",
    )  # fmt: skip
    parser.add_argument(
        "--steps", type=int, nargs="+", choices=range(1, 7), default=list(range(1, 7)),
        help="the steps to run, e.g. --steps 3 4 5 for a rerun (default: 1 2 3 4 5 6)",
    )  # fmt: skip
    parser.add_argument("--seeds", type=int, help=f"step 3: runs of airbench94 and of the fast recipe {shown('seeds')}")
    for name, what in (
        ("smoke_args", "step 2: trainer.fit flags of the smoke run"),
        ("fast_args", "step 3: trainer.fit flags of the project's fastest recipe"),
        ("ceiling_args", "step 4: trainer.fit flags of the ceiling recipe (shortened to fit)"),
        ("bundle_args", "step 5: trainer.fit flags of the bundle, without --epochs/--val-size"),
        ("nccl_args", "step 6: trainer.fit flags of the torchrun run"),
    ):
        parser.add_argument("--" + name.replace("_", "-"), type=_flags, metavar="FLAGS", help=f"{what} {shown(name)}")
    parser.add_argument(
        "--bundle-epochs", type=float, nargs="+", help=f"step 5: candidate epochs {shown('bundle_epochs')}"
    )
    parser.add_argument(
        "--bundle-val-size", type=int, help=f"step 5: validation images while choosing {shown('bundle_val_size')}"
    )
    return parser


def build_plan(args: argparse.Namespace) -> Plan:
    """The dry or GPU plan, with the options given on the command line."""
    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    given = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(Plan)}
    given = {name: value for name, value in given.items() if value is not None}
    if "bundle_epochs" in given:
        given["bundle_epochs"] = tuple(given["bundle_epochs"])
        if min(given["bundle_epochs"]) <= 0:
            raise ValueError(f"--bundle-epochs must be > 0, got {args.bundle_epochs}")
    if given.get("seeds", 1) < 1:
        raise ValueError(f"--seeds must be >= 1, got {given['seeds']}")
    if given.get("bundle_val_size", 1) < 1:
        raise ValueError(f"--bundle-val-size must be >= 1 (epochs are chosen on it), got {given['bundle_val_size']}")
    return dataclasses.replace(plan, **given)


def check_inputs(args: argparse.Namespace) -> None:
    """Clear errors, naming gpu_prepare.sh, when the data or the peer is missing."""
    for flag, path, what in (("--data", args.data, "CIFAR-10 JPEG copy"), ("--peer", args.peer, "airbench94 peer")):
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"no {what} at {path!r} ({flag}): run benchmarks/gpu_prepare.sh on the CPU machine first (it copies "
                f"../shared/datasets/cifar10-jpeg.tar.gz and ../shared/peers/airbench/airbench94.py into .data/), "
                f'carry .data to the GPU run (carry: [".data"]), or pass {flag}'
            )


def check_out_files(out: Path) -> dict:
    """Every file in --out with its size, against what a GPU run can bring back."""
    files = sorted(p for p in out.rglob("*") if p.is_file())
    sizes = {str(p.relative_to(out)): p.stat().st_size for p in files}
    too_big = [name for name, size in sizes.items() if size > MAX_OUT_BYTES]
    return {
        "bytes": sizes,
        "count": len(files),
        "max_count": MAX_OUT_FILES,
        "max_bytes_each": MAX_OUT_BYTES,
        "within_limits": len(files) <= MAX_OUT_FILES and not too_big,
        "too_big": too_big,
    }


def new_results(args: argparse.Namespace, plan: Plan) -> dict:
    return {
        "schema": "benchmarks.gpu_run/1",
        "issue": "8: one command for the whole GPU measurement",
        "units": "accuracies *_pct in percent (test: the 10,000 test images; val: the held-out validation split); "
        "times *_s in seconds (train_s: training steps only, CUDA events on a GPU); sizes *_bytes in bytes",
        "started_utc": utc_now(),
        "finished_utc": None,
        "dry_run": args.dry_run,
        "budget_s": args.budget_s,
        "command": shlex.join(["python", "-m", "benchmarks.gpu_run", *sys.argv[1:]]),
        "plan": dataclasses.asdict(plan),
        "summary": {},
    }


def _stop(signum: int, frame) -> None:
    """SIGTERM (a caller's timeout): unwind, so that the running subprocess group is ended and results written."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    try:
        plan = build_plan(args)
    except ValueError as err:
        parser.error(str(err))
    signal.signal(signal.SIGTERM, _stop)
    budget = Budget(args.budget_s)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    setup_logging(args.out / LOG_NAME)
    results = new_results(args, plan)
    session = Session(args.out, RESULTS_NAME, results, STEPS, budget)
    session.selected = set(args.steps)
    try:
        check_inputs(args)
    except FileNotFoundError as err:
        log.error("error: %s", err)
        results.update(error=str(err), finished_utc=utc_now())
        session.write()
        return 2
    base = args.work_dir or Path(tempfile.mkdtemp(prefix="gpu_run-"))
    work = base / f"run-{results['started_utc'].replace(':', '')}"  # a reused --work-dir gets fresh run folders
    cache_dir = args.cache_dir or (None if args.dry_run else str(base / "cache" / "resnet-cifar"))
    context = gpu_steps.Context(
        session=session,
        plan=plan,
        repo=REPO,
        out=args.out,
        work=work,
        data=str(Path(args.data).resolve()),
        peer=Path(args.peer).resolve(),
        cache_dir=cache_dir,
    )
    results.update(inputs=gpu_steps.describe_inputs(context), work_dir=str(work))
    log.info(
        "gpu_run: %s, budget %.0f s, out %s, work %s",
        "DRY RUN (CPU, toy size)" if args.dry_run else "GPU",
        args.budget_s,
        args.out,
        work,
    )
    try:
        for step, function in zip(STEPS, gpu_steps.STEP_FUNCTIONS, strict=True):
            session.run_step(step, lambda record, deadline, function=function: function(context, record, deadline))
    finally:
        results.update(finished_utc=utc_now(), total_s=round(budget.elapsed(), 1), cost_model=context.cost.describe())
        results["out_files"] = check_out_files(args.out)
        session.write()
        results["out_files"] = check_out_files(args.out)  # again, with the results file's final size
        session.write()
        if args.work_dir is None:
            shutil.rmtree(base, ignore_errors=True)
    statuses = {name: step["status"] for name, step in results["steps"].items()}
    log.info("done in %.0f s: %s; results in %s", budget.elapsed(), statuses, args.out / RESULTS_NAME)
    broken = [name for name, status in statuses.items() if status in (FAILED, TIMEOUT, ERROR, INTERRUPTED)]
    return 1 if broken or not results["out_files"]["within_limits"] else 0


if __name__ == "__main__":
    sys.exit(main())
