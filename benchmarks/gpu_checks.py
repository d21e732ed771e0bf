"""Small checks that benchmarks.gpu_run runs in their own processes (each prints one JSON result line).

    python -m benchmarks.gpu_checks environment                # versions, GPU name and memory, CPU
    python -m benchmarks.gpu_checks decode --data PATH [--cache-dir DIR]     # decode once into the cache
    CUDA_VISIBLE_DEVICES= python -m benchmarks.gpu_checks load-on-cpu RUN_DIR   # a GPU run's files on a CPU
    python -m benchmarks.gpu_checks peer-prepare --peer airbench94.py --data PATH --work DIR --runs 5

A process of its own for each, so that the orchestrator never initialises CUDA and each check has a timeout.
The result is the last stdout line, prefixed with RESULT_PREFIX.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bundle.contract import CHANNELS, IMAGE_HEIGHT, IMAGE_WIDTH

RESULT_PREFIX = "GPU_CHECKS_RESULT "


def environment() -> dict:
    """Python, torch, CUDA, cuDNN and library versions; GPU name, memory and driver; CPU."""
    import torch

    from bundle.environment import cpu_name, library_versions, usable_cores

    info = {
        "versions": library_versions(("torch", "torchvision", "numpy", "onnx", "onnxscript", "onnxruntime", "pytest"))
        | {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()},
        "cpu": cpu_name(),
        "cpu_cores": usable_cores(),
        "cuda_available": torch.cuda.is_available(),
        "gpus": [],
    }
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        info["gpus"].append(
            {
                "name": props.name,
                "memory_gib": round(props.total_memory / 2**30, 2),
                "compute_capability": f"{props.major}.{props.minor}",
                "multiprocessors": props.multi_processor_count,
            }
        )
    info["nvidia_smi"] = _nvidia_smi()
    return info


def _nvidia_smi() -> str | None:
    """Driver and GPU as nvidia-smi reports them (None where it is not installed)."""
    if shutil.which("nvidia-smi") is None:
        return None
    query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,power.limit", "--format=csv,noheader"]
    try:
        result = subprocess.run(query, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"failed: {err}"
    return result.stdout.strip() or result.stderr.strip()


def decode(data: str, cache_dir: str | None) -> dict:
    """Decode the data set into the trainer's cache (the later runs then start in about a second)."""
    from trainer.data import load_dataset

    start = time.perf_counter()
    dataset = load_dataset(data, Path(cache_dir) if cache_dir else None)
    return {
        "source": dataset.source,
        "train_images": len(dataset.train_images),
        "test_images": len(dataset.test_images),
        "classes": list(dataset.class_names),
        "seconds": time.perf_counter() - start,
    }


def load_on_cpu(run: Path) -> dict:
    """Load a run's checkpoint.pt and model.pt in this process, which must not see CUDA: both rebuild their model
    on the CPU and give finite logits. Also reports model.pt's size and the fp32 bytes of its weights (what an
    fp32 ONNX file holds, plus a few kB of graph)."""
    import torch

    from trainer.checkpoint import MODEL_CHECKPOINT_NAME, load_model_checkpoint, load_training_checkpoint
    from trainer.models import build_model

    if torch.cuda.is_available():
        raise RuntimeError("CUDA is visible to this check; run it with CUDA_VISIBLE_DEVICES= (empty)")
    training = load_training_checkpoint(run)
    slim, _ = load_model_checkpoint(run / MODEL_CHECKPOINT_NAME)
    logits, parameters = {}, 0
    for name, model_name, weights in (
        ("checkpoint.pt", training.model_name, training.model),
        (MODEL_CHECKPOINT_NAME, slim.model_name, slim.weights),
    ):
        model = build_model(model_name, len(training.class_names))
        model.load_state_dict(weights)  # strict: every key, every shape
        with torch.no_grad():
            out = model.eval()(
                torch.randn(4, CHANNELS, IMAGE_HEIGHT, IMAGE_WIDTH, generator=torch.Generator().manual_seed(0))
            )
        if out.shape != (4, len(training.class_names)) or not torch.isfinite(out).all():
            raise RuntimeError(f"{name} of {run}: logits of shape {tuple(out.shape)}, not all finite or wrong shape")
        logits[name], parameters = out, sum(p.numel() for p in model.parameters())
    return {
        "cuda_visible": False,
        "model": training.model_name,
        "trained_on": training.config["device"],
        "finished": training.finished,
        "step": training.step,
        "checkpoint_bytes": (run / "checkpoint.pt").stat().st_size,
        "model_pt_bytes": (run / MODEL_CHECKPOINT_NAME).stat().st_size,
        "fp32_weight_bytes": sum(4 * t.numel() for t in slim.weights.values() if t.is_floating_point()),
        "parameters": parameters,
        "same_logits": bool(torch.allclose(logits["checkpoint.pt"], logits[MODEL_CHECKPOINT_NAME])),
    }


def peer_prepare(peer: Path, data: str, cache_dir: str | None, work: Path, runs: int, warmup: bool, limit: int) -> dict:
    """The peer's data files and its patched, byte-compiled copy in `work` (see benchmarks.airbench_peer)."""
    from benchmarks.airbench_peer import write_data, write_patched_script

    if not peer.is_file():
        raise FileNotFoundError(f"no peer script at {str(peer)!r}: run benchmarks/gpu_prepare.sh or pass --peer")
    work.mkdir(parents=True, exist_ok=True)
    return {**write_patched_script(peer, work, runs, warmup), "data": write_data(data, cache_dir, work, limit=limit)}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_checks", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("environment", help="versions, GPU name and memory, CPU")
    decode_parser = commands.add_parser("decode", help="decode the data set into the trainer's cache")
    decode_parser.add_argument("--data", required=True, help="CIFAR-10 source, as trainer.fit --data")
    decode_parser.add_argument("--cache-dir", help="the trainer's cache folder (default: the trainer's default)")
    load_parser = commands.add_parser("load-on-cpu", help="load a run's checkpoint.pt and model.pt without CUDA")
    load_parser.add_argument("run", type=Path, help="a run folder written by trainer.fit")
    peer_parser = commands.add_parser("peer-prepare", help="airbench94's data files and its patched copy")
    peer_parser.add_argument("--peer", type=Path, required=True, help="the peer script (airbench94.py)")
    peer_parser.add_argument("--data", required=True, help="CIFAR-10 source, as trainer.fit --data")
    peer_parser.add_argument("--cache-dir", help="the trainer's cache folder (default: the trainer's default)")
    peer_parser.add_argument("--work", type=Path, required=True, help="the peer's working folder")
    peer_parser.add_argument("--runs", type=int, default=5, help="timed runs (default: 5)")
    peer_parser.add_argument("--no-warmup", dest="warmup", action="store_false", help="leave its warm-up run off")
    peer_parser.add_argument("--limit", type=int, default=0, help="images per split, 0 = all (default: 0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        if args.command == "environment":
            result = environment()
        elif args.command == "decode":
            result = decode(args.data, args.cache_dir)
        elif args.command == "load-on-cpu":
            result = load_on_cpu(args.run)
        else:
            result = peer_prepare(args.peer, args.data, args.cache_dir, args.work, args.runs, args.warmup, args.limit)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


def parse_result(output: str) -> dict | None:
    """The JSON result in a check's output (None when it printed none)."""
    lines = [line for line in output.splitlines() if line.startswith(RESULT_PREFIX)]
    return json.loads(lines[-1][len(RESULT_PREFIX) :]) if lines else None


if __name__ == "__main__":
    sys.exit(main())
