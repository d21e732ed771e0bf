"""Export a checkpoint to ONNX, TorchScript and INT8 ONNX, behind parity gates, with a manifest and a model card.

    python -m trainer.export runs/my-run --out exported_models/my-model

Every artifact takes the input contract of `bundle.contract` and is checked against the eager PyTorch model
on real test images at several batch sizes before anything is written: fp32 artifacts must match the logits
within rtol/atol and agree on every top-1 label; the INT8 model must stay within 0.5 accuracy points of fp32.
Each ONNX file is then run in OpenVINO and OpenCV DNN too (trainer/portability.py; recorded in the manifest,
a gate with --strict-portability) and carries its class names and input contract in its own metadata. A
failed gate exits non-zero and leaves no partial files (artifacts are built in a temporary folder and renamed
at the end). The folder also gets MODEL_CARD.md and two pictures (trainer/model_card.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bundle.contract import IMAGE_HEIGHT, IMAGE_WIDTH, input_contract
from bundle.environment import library_versions
from bundle.manifest import artifact_entry, sha256_of, write_manifest
from bundle.preprocess import pixels_to_input
from bundle.runtime import FORMATS, Runner
from trainer.checkpoint import ModelCheckpoint, load_model_checkpoint
from trainer.data import load_dataset, split_validation
from trainer.formats import OPSET, describe_onnx, export_int8, export_onnx, export_pt2, export_torchscript
from trainer.model_card import write_model_card
from trainer.models import MODELS, build_model, count_parameters
from trainer.parity import ParityError, check_parity, reference_outputs, torch_runner
from trainer.portability import check_portability
from trainer.wrappers import MirrorAveraged, NormalizedModel

log = logging.getLogger("trainer.export")
FP32_RTOL, FP32_ATOL = 1e-3, 1e-4
INT8_MAX_ACCURACY_DROP = 0.005
PARITY_BATCH_SIZES = (1, 7, 64)


@dataclass(frozen=True)
class ExportOptions:
    """What to export and how much data the gates use; the CLI's defaults are these."""

    int8: bool = True
    pt2: bool = False
    parity_images: int = 1000  # real test images for the fp32 parity gates and the portability checks
    calibration_images: int = 512  # training images for INT8 calibration
    eval_images: int = 0  # test images for the accuracy figures; 0: the whole test set
    name: str | None = None
    tta: str = "none"  # "mirror": average the logits of the image and its mirror inside the graph (2x compute)
    strict_portability: bool = False  # a runtime that refuses or disagrees fails the export (exit 3)


@dataclass(frozen=True)
class ExportData:
    """The images the gates and figures use, in the contract's input form (float32 NCHW in [0, 1])."""

    parity_x: np.ndarray  # the first test images of a seeded shuffle (every class present)
    test_x: np.ndarray
    test_y: np.ndarray
    test_pixels: np.ndarray  # uint8 (N, H, W, 3) of test_x, for the model card's picture
    calibration: np.ndarray  # training images for INT8


def load_trained_model(checkpoint: str | Path) -> tuple[NormalizedModel, ModelCheckpoint, Path]:
    """Rebuild a run's model (inference weights, eval mode) wrapped to take the contract's input.

    `checkpoint` is a run folder, its checkpoint.pt or its weights-only model.pt; returns the model, the
    checkpoint and the file it came from."""
    state, path = load_model_checkpoint(checkpoint)
    name = state.model_name
    if name not in MODELS:
        raise ValueError(
            f"checkpoint {str(path)!r} holds architecture {name!r}, which this version does not know; "
            f"known: {', '.join(MODELS)}"
        )
    model = build_model(name, state.num_classes)
    try:
        result = model.load_state_dict(state.weights, strict=False)
    except RuntimeError as err:  # shape mismatches raise even with strict=False
        raise ValueError(f"checkpoint {str(path)!r} does not fit architecture {name!r}: {err}") from err
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"checkpoint {str(path)!r} does not fit architecture {name!r}: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]} (was it trained with another version of the model?)"
        )
    normalization = state.normalization
    return NormalizedModel(model, normalization["mean"], normalization["std"]).eval(), state, path


# ------------------------------------------------------------------ formats


def fp32_writers(options: ExportOptions) -> dict[str, Callable[[torch.nn.Module, Path], None]]:
    """The formats written from the trained module, by kind: each is gated by parity with the eager model,
    and bundle.runtime.FORMATS names its file and runs it. (INT8 is made from the fp32 ONNX file.)"""
    writers = {"onnx": export_onnx, "torchscript": export_torchscript}
    if options.pt2:
        writers["torch_export"] = export_pt2
    return writers


# ------------------------------------------------------------------ orchestration


def export_checkpoint(
    checkpoint: str | Path, out: Path, data: str | None, options: ExportOptions, force: bool, command: str
) -> dict:
    """Export, gate and write the artifacts, model card and manifest to `out` atomically; returns the manifest."""
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"output folder {str(out)!r} exists; pass --force to replace it")
    model, state, checkpoint_path = load_trained_model(checkpoint)
    data_source = data or state.config["data"]
    contract = input_contract(state.normalization["mean"], state.normalization["std"])
    images = _export_data(data_source, state, contract, options)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the exported folder is meant to be shared and served
    try:
        manifest, logits = _build_bundle(model, state, staging, images, contract, options, options.name or out.name)
        manifest["training"] = _training_record(state, checkpoint_path)
        manifest["commands"] = {"train": state.commands, "export": command}
        manifest["data"] = {"source": str(data_source), "test_images": len(images.test_y)}
        write_manifest(staging, manifest)  # validated, so the model card below reads a valid manifest
        manifest["documents"] = write_model_card(staging, manifest, images.test_pixels, images.test_y, logits)
        write_manifest(staging, manifest)
        _replace_folder(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _export_data(source: str, state: ModelCheckpoint, contract: dict, options: ExportOptions) -> ExportData:
    dataset = load_dataset(source)
    if list(dataset.class_names) != state.class_names:
        raise ValueError(f"data {source!r} has classes {dataset.class_names}, the checkpoint {state.class_names}")
    # The test set is stored class by class: subsets are drawn at random so every class is in them.
    order = np.random.default_rng(0).permutation(len(dataset.test_labels))
    if options.eval_images:
        order = order[: options.eval_images]
    pixels = dataset.test_images[order]
    test_x = pixels_to_input(pixels, contract)
    train_x, *_ = split_validation(dataset.train_images, dataset.train_labels, 0)
    return ExportData(
        parity_x=test_x[: options.parity_images],
        test_x=test_x,
        test_y=dataset.test_labels[order],
        test_pixels=pixels,
        calibration=calibration_inputs(train_x, options.calibration_images, contract),
    )


def calibration_inputs(train_images: np.ndarray, count: int, contract: dict) -> np.ndarray:
    """INT8 calibration data: `count` of the uint8 (N, H, W, 3) training images, drawn with a fixed seed, in the
    contract's input form."""
    chosen = np.random.default_rng(0).permutation(len(train_images))[:count]
    return pixels_to_input(train_images[chosen], contract)


def _build_bundle(
    model: NormalizedModel,
    state: ModelCheckpoint,
    folder: Path,
    data: ExportData,
    contract: dict,
    options: ExportOptions,
    name: str,
) -> tuple[dict, dict[str, np.ndarray]]:
    """Write and gate every artifact in `folder`; returns the manifest's model, artifact and accuracy entries, and
    each artifact's logits on the test images."""
    served = MirrorAveraged(model).eval() if options.tta == "mirror" else model
    metadata = _onnx_metadata(name, state, contract, options)
    logits = {"torch_eager": _batched(torch_runner(served), data.test_x)}
    if options.tta != "none":
        logits["torch_eager_without_tta"] = _batched(torch_runner(model), data.test_x)
    paths, parity, fp32_logits = _write_fp32(served, folder, data, options, metadata)
    logits.update(fp32_logits)
    if options.int8:
        paths["onnx_int8"] = folder / FORMATS["onnx_int8"].file
        log.info("quantising to INT8 (static QDQ, %d calibration images from the training set)", len(data.calibration))
        export_int8(paths["onnx"], paths["onnx_int8"], data.calibration)
        describe_onnx(paths["onnx_int8"], metadata)
        logits["onnx_int8"] = _batched(_load("onnx_int8", paths["onnx_int8"]), data.test_x)
        parity["onnx_int8"] = _int8_gate(logits, data.test_y)
    accuracy = {kind: float((values.argmax(1) == data.test_y).mean()) for kind, values in logits.items()}
    log.info(
        "test accuracy on %d images, every artifact measured here in fp32 (a training report measures at the "
        "training precision, e.g. bf16): %s",
        len(data.test_y),
        ", ".join(f"{kind} {100 * value:.2f}%" for kind, value in accuracy.items()),
    )
    manifest = {
        "name": name,
        "architecture": state.model_name,
        "parameters": count_parameters(model.model),
        "tta": options.tta,
        "class_names": state.class_names,
        "input": contract,
        "artifacts": {kind: artifact_entry(path) for kind, path in paths.items()},
        "test_accuracy": accuracy,
        "test_accuracy_note": "top-1 on the test set named in data, re-measured in fp32 for every artifact at "
        "export; with the manifest's tta inside the graph (torch_eager_without_tta: the plain model)",
        "per_class_test_accuracy": {kind: _per_class(logits[kind], data.test_y, state.class_names) for kind in paths},
        "parity": parity,
        "portability": _portability(paths, data.parity_x, options),
        "opset": OPSET,
        # torch.__version__ keeps the build's tag (e.g. +cu130), which the package metadata drops
        "versions": {**library_versions(("onnx", "onnxscript", "onnxruntime", "numpy")), "torch": torch.__version__},
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    return manifest, logits


def _write_fp32(
    served: torch.nn.Module, folder: Path, data: ExportData, options: ExportOptions, metadata: dict
) -> tuple[dict[str, Path], dict, dict[str, np.ndarray]]:
    """Write each fp32 artifact behind its parity gate against `served`: each one's path, parity record and
    logits on the test images."""
    paths, parity, logits = {}, {}, {}
    expected = reference_outputs(torch_runner(served), data.parity_x, PARITY_BATCH_SIZES)
    for kind, write in fp32_writers(options).items():
        paths[kind] = folder / FORMATS[kind].file
        log.info(
            "exporting %s (%s); parity gate on %d test images at batch sizes %s",
            kind,
            FORMATS[kind].description,
            len(data.parity_x),
            PARITY_BATCH_SIZES,
        )
        write(served, paths[kind])
        if paths[kind].suffix == ".onnx":
            describe_onnx(paths[kind], metadata)
        runner = _load(kind, paths[kind])
        parity[kind] = check_parity(kind, expected, runner, data.parity_x, rtol=FP32_RTOL, atol=FP32_ATOL)
        logits[kind] = _batched(runner, data.test_x)
    return paths, parity, logits


def _load(kind: str, path: Path) -> Runner:
    return FORMATS[kind].load(path, torch.get_num_threads())


def _batched(runner: Runner, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    return np.concatenate([runner(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def _per_class(logits: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict[str, float]:
    predicted = logits.argmax(1)
    return {
        name: float((predicted[labels == i] == i).mean()) for i, name in enumerate(class_names) if (labels == i).any()
    }


def _int8_gate(logits: dict[str, np.ndarray], labels: np.ndarray) -> dict:
    """INT8 within INT8_MAX_ACCURACY_DROP of fp32 ONNX, else ParityError."""
    fp32, int8 = (float((logits[k].argmax(1) == labels).mean()) for k in ("onnx", "onnx_int8"))
    drop = fp32 - int8
    if drop > INT8_MAX_ACCURACY_DROP:
        raise ParityError(
            f"onnx_int8: accuracy {100 * int8:.2f}% is {100 * drop:.2f} points below fp32 ONNX ({100 * fp32:.2f}%); "
            f"the limit is {100 * INT8_MAX_ACCURACY_DROP:.1f}"
        )
    return {
        "accuracy_drop": drop,
        "top1_agreement_with_fp32": float((logits["onnx"].argmax(1) == logits["onnx_int8"].argmax(1)).mean()),
        "max_accuracy_drop": INT8_MAX_ACCURACY_DROP,
        "passed": True,
    }


def _portability(paths: dict[str, Path], images: np.ndarray, options: ExportOptions) -> dict:
    """Each ONNX file in the other runtimes, against ONNX Runtime on the parity images (trainer/portability.py)."""
    results = {}
    for kind, path in paths.items():
        if path.suffix != ".onnx":
            continue
        reference = _batched(_load(kind, path), images)
        results[kind] = check_portability(path, images, reference, "int8" if kind == "onnx_int8" else "fp32")
        for runtime, result in results[kind].items():
            if result["status"] == "passed":
                continue
            detail = (
                result.get("error")
                or result.get("why")
                or f"top-1 agreement {result['top1_agreement']:.4f}, max |diff| {result['max_abs_logit_diff']:.3g}"
            )
            log.warning("portability: %s in %s: %s (%s)", kind, runtime, result["status"], detail)
            if options.strict_portability and result["status"] in ("failed", "refused"):
                raise ParityError(f"{kind}: {runtime} {result['status']} it ({detail}); --strict-portability")
    return results


def _onnx_metadata(name: str, state: ModelCheckpoint, contract: dict, options: ExportOptions) -> dict[str, str]:
    """What each ONNX file says about itself, from the facts the manifest records."""
    return {
        "name": name,
        "architecture": state.model_name,
        "class_names": json.dumps(state.class_names),
        "input_contract": json.dumps(contract),
        "tta": options.tta,
        "description": f"{len(state.class_names)}-class image classifier; input {contract['dtype']} "
        f"{contract['layout']} {contract['color_order']} {IMAGE_HEIGHT}x{IMAGE_WIDTH} in [0, 1] (pixel / "
        f"{contract['pixel_divisor']:g}), normalisation inside; output {contract['output']}",
    }


def _training_record(state: ModelCheckpoint, checkpoint_path: Path) -> dict:
    report_path = checkpoint_path.parent / "report.json"
    summary = None
    if report_path.exists():
        report = json.loads(report_path.read_text())
        summary = {k: report.get(k) for k in ("timing", "train_images_per_s", "environment", "evaluated_at")} | {
            "test_accuracy": report["test"]["accuracy"],
            "test_accuracy_tta": report["test_tta"]["accuracy"],
            "tta_level": report["test_tta"]["level"],
            "per_class_test_accuracy": report["test"].get("per_class_accuracy"),
        }
    return {
        "config": state.config,
        "steps": state.step,
        "checkpoint_file": checkpoint_path.name,
        "checkpoint_sha256": sha256_of(checkpoint_path),
        "report": summary,
    }


def _replace_folder(staging: Path, out: Path) -> None:
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)


def build_parser() -> argparse.ArgumentParser:
    defaults = ExportOptions()
    parser = argparse.ArgumentParser(
        prog="python -m trainer.export",
        description="Export a trained model to ONNX (fp32 and INT8) and TorchScript with parity gates, plus "
        "manifest.json and a model card. Nothing is written unless every gate passes. Exit status: 0 written, "
        "2 bad input, 3 a gate failed.",
    )
    parser.add_argument(
        "checkpoint", help="a run folder (its checkpoint.pt, else model.pt), a checkpoint.pt or a weights-only model.pt"
    )
    parser.add_argument("--out", required=True, help="output folder, e.g. exported_models/my-model")
    parser.add_argument(
        "--data", help="CIFAR-10 source for calibration, parity and accuracy (default: the one the run trained on)"
    )
    parser.add_argument("--name", help="model name in the manifest (default: the output folder's name)")
    parser.add_argument("--no-int8", dest="int8", action="store_false", help="skip the INT8 ONNX model")
    parser.add_argument("--pt2", action="store_true", help="also write model.pt2 (torch.export)")
    parser.add_argument(
        "--tta",
        choices=("none", "mirror"),
        default=defaults.tta,
        help="'mirror' averages the logits of each image and its mirror inside every artifact: more accurate, "
        f"2x the compute (default: {defaults.tta})",
    )
    parser.add_argument(
        "--strict-portability",
        action="store_true",
        help="fail (exit 3) when OpenVINO or OpenCV refuses an ONNX file or disagrees with ONNX Runtime beyond "
        "the tolerance (default: record it in the manifest and warn)",
    )
    for name, what in (
        ("parity_images", "real test images for the parity gates and portability checks"),
        ("calibration_images", "training images for INT8 calibration"),
        ("eval_images", "test images for the accuracy figures, 0 = all"),
    ):
        default = getattr(defaults, name)
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=int, default=default, help=f"{what} (default: {default})")
    parser.add_argument("--force", action="store_true", help="replace the output folder if it exists")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("trainer").setLevel(logging.INFO)
    for flag, value, low in (
        ("--parity-images", args.parity_images, 1),
        ("--calibration-images", args.calibration_images, 1),
        ("--eval-images", args.eval_images, 0),
    ):
        if value < low:
            log.error("error: %s must be at least %d, got %d", flag, low, value)
            return 2
    options = ExportOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ExportOptions)})
    command = shlex.join(["python", "-m", "trainer.export", *(sys.argv[1:] if argv is None else argv)])
    try:
        manifest = export_checkpoint(args.checkpoint, Path(args.out), args.data, options, args.force, command)
    except ParityError as err:
        log.error("parity gate failed, nothing written: %s", err)
        return 3
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        log.error("error: %s", err)
        return 2
    acc = manifest["test_accuracy"]
    log.info("wrote %s: %s", args.out, ", ".join(f"{k} {100 * v:.2f}%" for k, v in acc.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
