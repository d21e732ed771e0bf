"""Inference speed on this CPU: torch eager, TorchScript, ONNX Runtime fp32 and INT8.

    python -m benchmarks.inference_speed [--threads 2] [--seconds 2] [--repeats 5]

Measures images/s at batch sizes 1, 8, 64 and 256 for the bundled default
model (exported_models/default; its eager model is its architecture with the
weights of --bundle-checkpoint, else model.pt2's when the folder has one, else
random ones) and for a CIFAR ResNet-18 (from --resnet18-checkpoint, or randomly
initialised): speed does not depend on the weights. The ResNet-18 artifacts
are exported in a temporary folder with the same code and gates as
`python -m trainer.export`. Prints a table (median of --repeats timed runs of
--seconds each) and saves benchmarks/results/inference_speed.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bundle.environment import library_versions
from bundle.manifest import load_model_dir
from bundle.preprocess import pixels_to_input
from bundle.runtime import load_backend, onnx_runner, torchscript_runner
from trainer.data import load_dataset
from trainer.export import export_int8, export_onnx, export_torchscript, load_trained_model
from trainer.models import build_model
from trainer.parity import check_parity, measure_accuracy, reference_outputs, torch_runner
from trainer.report import environment_info
from trainer.wrappers import MirrorAveraged, NormalizedModel

BACKENDS = ("torch_eager", "torchscript", "onnx", "onnx_int8")
RESULTS = Path(__file__).parent / "results"


def eager_from_bundle(folder: Path, checkpoint: str | None = None) -> torch.nn.Module:
    """The bundled model as an nn.Module: the manifest's architecture with the training run's weights
    (`checkpoint`), else model.pt2's when exported with --pt2, else random ones (the bundle ships no eager
    weights: its TorchScript is frozen; speed does not depend on the weights)."""
    if checkpoint:
        return load_trained_model(checkpoint)[0].eval()
    model = load_model_dir(folder)
    contract = model.contract
    net = build_model(model.manifest["architecture"], len(model.class_names))
    module = NormalizedModel(net, contract["normalization"]["mean"], contract["normalization"]["std"])
    if model.manifest.get("tta") == "mirror":
        module = MirrorAveraged(module)
    if "torch_export" in model.manifest["artifacts"]:
        module.load_state_dict(torch.export.load(str(model.artifact_path("torch_export"))).state_dict)
    return module.eval()


def resnet18_artifacts(
    folder: Path, checkpoint: str | None, normalization: dict, calibration: np.ndarray, check_images: np.ndarray
) -> tuple[torch.nn.Module, dict[str, Path]]:
    """Export a ResNet-18 (trained checkpoint, or random init with the bundle's normalisation) to every format,
    behind the parity gates."""
    if checkpoint:
        model, _, _ = load_trained_model(checkpoint)
    else:
        torch.manual_seed(0)
        model = NormalizedModel(build_model("resnet18"), normalization["mean"], normalization["std"]).eval()
    paths = {"onnx": folder / "model.onnx", "torchscript": folder / "model.ts", "onnx_int8": folder / "model.int8.onnx"}
    export_onnx(model, paths["onnx"])
    export_torchscript(model, paths["torchscript"])
    export_int8(paths["onnx"], paths["onnx_int8"], calibration)
    expected = reference_outputs(torch_runner(model), check_images, (1, 7, 64))
    check_parity("resnet18 onnx", expected, onnx_runner(paths["onnx"]), check_images, rtol=1e-3, atol=1e-4)
    return model, paths


def images_per_second(
    run: Callable[[np.ndarray], np.ndarray], batch: np.ndarray, seconds: float, repeats: int
) -> list[float]:
    for _ in range(3):
        run(batch)
    rates = []
    for _ in range(repeats):
        count, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            run(batch)
            count += len(batch)
        rates.append(count / elapsed)
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model-dir", default="exported_models/default", help="bundled model folder (default: %(default)s)"
    )
    parser.add_argument(
        "--bundle-checkpoint", help="the bundle's training run, for its eager model's weights (default: none)"
    )
    parser.add_argument("--resnet18-checkpoint", help="a trained ResNet-18 run (default: random weights)")
    parser.add_argument(
        "--data", default="../shared/datasets/cifar10-jpeg.tar.gz", help="CIFAR-10 source (default: %(default)s)"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--threads", type=int, default=2, help="threads for torch and ONNX Runtime (default: 2)")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one timed run (default: 2)")
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed runs per cell; the median is reported (default: 5)"
    )
    parser.add_argument("--out", default=str(RESULTS / "inference_speed.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    bundle = load_model_dir(args.model_dir)
    data = load_dataset(args.data)
    contract = bundle.contract
    test_x = pixels_to_input(data.test_images, contract)
    sample = np.random.default_rng(0).permutation(len(data.train_images))[:512]
    calibration = pixels_to_input(data.train_images[sample], contract)

    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        r18_model, r18_paths = resnet18_artifacts(
            Path(tmp), args.resnet18_checkpoint, contract["normalization"], calibration, test_x[:256]
        )
        models = {
            bundle.name: {
                "torch_eager": torch_runner(eager_from_bundle(bundle.folder, args.bundle_checkpoint)),
                "torchscript": load_backend(bundle, "torchscript", threads=args.threads),
                "onnx": load_backend(bundle, "onnx", threads=args.threads),
                "onnx_int8": load_backend(bundle, "onnx_int8", threads=args.threads),
            },
            "resnet18" + ("" if args.resnet18_checkpoint else " (random weights)"): {
                "torch_eager": torch_runner(r18_model),
                "torchscript": torchscript_runner(r18_paths["torchscript"]),
                "onnx": onnx_runner(r18_paths["onnx"], threads=args.threads),
                "onnx_int8": onnx_runner(r18_paths["onnx_int8"], threads=args.threads),
            },
        }
        for name, runners in models.items():
            results[name] = {"images_per_s": {}, "test_accuracy": {}}
            for backend, run in runners.items():
                cells = {}
                for batch_size in args.batch_sizes:
                    rates = images_per_second(run, test_x[:batch_size], args.seconds, args.repeats)
                    cells[str(batch_size)] = {"median": statistics.median(rates), "runs": rates}
                    print(
                        f"{name:<28} {backend:<12} batch {batch_size:>3}: {statistics.median(rates):8.0f} img/s",
                        flush=True,
                    )
                results[name]["images_per_s"][backend] = cells
                if backend.startswith("onnx"):
                    results[name]["test_accuracy"][backend] = measure_accuracy(run, test_x, data.test_labels)

    env = environment_info(torch.device("cpu"), args.threads, 1, "fp32")
    env["onnxruntime"] = library_versions(("onnxruntime",))["onnxruntime"]
    payload = {"date": datetime.date.today().isoformat(), "config": vars(args), "environment": env, "results": results}
    _print_table(payload)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"saved {args.out}")
    return 0


def _print_table(payload: dict) -> None:
    env = payload["environment"]
    print(
        f"\n{payload['date']}, {env['device_name']} ({env['cpu_count']} cores, {payload['config']['threads']} "
        f"threads), torch {env['torch']}, onnxruntime {env['onnxruntime']}, Python {env['python']}; "
        f"median img/s of {payload['config']['repeats']} runs\n"
    )
    sizes = payload["config"]["batch_sizes"]
    print("| model | backend | " + " | ".join(f"batch {b}" for b in sizes) + " | test acc |")
    print("|---|---|" + "---:|" * len(sizes) + "---:|")
    for name, result in payload["results"].items():
        for backend, cells in result["images_per_s"].items():
            acc = result["test_accuracy"].get(backend)
            acc_text = f"{100 * acc:.2f}%" if acc is not None and "random" not in name else "-"
            print(
                f"| {name} | {backend} | "
                + " | ".join(f"{cells[str(b)]['median']:,.0f}" for b in sizes)
                + f" | {acc_text} |"
            )
        eager, int8 = result["images_per_s"]["torch_eager"], result["images_per_s"]["onnx_int8"]
        if "64" in eager:
            print(f"| {name} | INT8 / eager at batch 64 | {int8['64']['median'] / eager['64']['median']:.2f}x |")


if __name__ == "__main__":
    raise SystemExit(main())
