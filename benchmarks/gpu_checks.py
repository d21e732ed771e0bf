"""The two checks benchmarks.gpu_run runs in processes of their own; each prints one JSON result line.

    python -m benchmarks.gpu_checks prepare --data PATH --peer airbench94.py --work DIR [--peer-images N]
                                             [--stand-in]
    CUDA_VISIBLE_DEVICES= python -m benchmarks.gpu_checks load-on-cpu RUN_DIR

prepare: versions, the GPU's name and memory, the CPU; the data decoded once into the trainer's cache;
airbench94's data files and patched copy in --work (with --stand-in, also its CPU stand-in, for dry runs).
load-on-cpu: a GPU run's checkpoint.pt and model.pt loaded where CUDA is hidden, with finite logits; sizes.
In processes of their own so that gpu_run itself never initialises CUDA, and each check has a timeout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

RESULT_PREFIX = "GPU_CHECKS_RESULT "


def environment() -> dict:
    """Python, torch, CUDA, cuDNN and library versions; each GPU's name and memory (torch.cuda); the CPU."""
    import torch

    from bundle.environment import cpu_name, library_versions, usable_cores

    libraries = ("torch", "torchvision", "numpy", "onnx", "onnxscript", "onnxruntime", "pytest")
    gpus = range(torch.cuda.device_count())
    smi = None
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,power.limit", "--format=csv,noheader"]
        smi = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip()
    return {
        "versions": library_versions(libraries) | {"python": sys.version.split()[0], "torch": torch.__version__,
                                                   "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()},
        "cpu": cpu_name(),
        "cpu_cores": usable_cores(),
        "cuda_available": torch.cuda.is_available(),
        "gpus": [{"name": torch.cuda.get_device_name(i), "compute_capability": torch.cuda.get_device_capability(i),
                  "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 2)} for i in gpus],
        "nvidia_smi": smi,
    }  # fmt: skip


def prepare(data: str, peer: Path, work: Path, peer_images: int, stand_in: bool) -> dict:
    """The environment, the data decoded once (later runs start in a second), airbench94's files in `work`."""
    from benchmarks import airbench_peer
    from trainer.data import load_dataset

    start = time.perf_counter()
    dataset = load_dataset(data)
    decoded = {"source": dataset.source, "train": len(dataset.train_images), "test": len(dataset.test_images),
               "seconds": round(time.perf_counter() - start, 2)}  # fmt: skip
    if not peer.is_file():
        raise FileNotFoundError(f"no peer script at {str(peer)!r}: run benchmarks/gpu_prepare.sh or pass --peer")
    work.mkdir(parents=True, exist_ok=True)
    peer_files = {
        **airbench_peer.write_patched_script(peer, work, runs=1),
        "data": airbench_peer.write_data(dataset, work, limit=peer_images),
    }
    if stand_in:
        peer_files["stand_in"] = str(airbench_peer.write_stand_in(work))
    return {**environment(), "decoded": decoded, "peer": peer_files}


def load_on_cpu(run: Path) -> dict:
    """checkpoint.pt and model.pt of a run, each rebuilt on the CPU (CUDA must be hidden) with finite logits;
    model.pt's size and the fp32 bytes of its weights (what an fp32 ONNX file holds, plus a few kB of graph)."""
    import torch

    from bundle.contract import CHANNELS, IMAGE_HEIGHT, IMAGE_WIDTH
    from trainer.checkpoint import MODEL_CHECKPOINT_NAME, load_model_checkpoint, load_training_checkpoint
    from trainer.models import build_model

    if torch.cuda.is_available():
        raise RuntimeError("CUDA is visible to this check; run it with CUDA_VISIBLE_DEVICES= (empty)")
    training = load_training_checkpoint(run)
    slim, _ = load_model_checkpoint(run / MODEL_CHECKPOINT_NAME)
    images = torch.randn(4, CHANNELS, IMAGE_HEIGHT, IMAGE_WIDTH, generator=torch.Generator().manual_seed(0))
    logits = []
    for name, weights in (("checkpoint.pt", training.model), (MODEL_CHECKPOINT_NAME, slim.weights)):
        model = build_model(training.model_name, len(training.class_names))
        model.load_state_dict(weights)  # strict: every key, every shape
        with torch.no_grad():
            logits.append(model.eval()(images))
        if not torch.isfinite(logits[-1]).all():
            raise RuntimeError(f"{name} of {run}: logits not all finite")
    return {
        "model": training.model_name,
        "trained_on": training.config["device"],
        "finished": training.finished,
        "model_pt_bytes": (run / MODEL_CHECKPOINT_NAME).stat().st_size,
        "fp32_weight_bytes": sum(4 * t.numel() for t in slim.weights.values() if t.is_floating_point()),
        "same_logits": bool(torch.allclose(*logits)),
    }


def parse_result(output: str) -> dict | None:
    """The JSON result in a check's output (None when it printed none)."""
    lines = [line for line in output.splitlines() if line.startswith(RESULT_PREFIX)]
    return json.loads(lines[-1][len(RESULT_PREFIX) :]) if lines else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_checks", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prepare_parser = commands.add_parser("prepare", help="environment, data decoded once, airbench94's files")
    prepare_parser.add_argument("--data", required=True, help="CIFAR-10 source, as trainer.fit --data")
    prepare_parser.add_argument("--peer", type=Path, required=True, help="the peer script (airbench94.py)")
    prepare_parser.add_argument("--work", type=Path, required=True, help="the peer's working folder")
    prepare_parser.add_argument("--peer-images", type=int, default=0, help="images per split, 0 = all (default: 0)")
    prepare_parser.add_argument("--stand-in", action="store_true", help="also the peer's CPU stand-in (default: off)")
    load_parser = commands.add_parser("load-on-cpu", help="load a run's checkpoint.pt and model.pt without CUDA")
    load_parser.add_argument("run", type=Path, help="a run folder written by trainer.fit")
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            result = prepare(args.data, args.peer, args.work, args.peer_images, args.stand_in)
        else:
            result = load_on_cpu(args.run)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
