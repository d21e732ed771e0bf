"""INT8 quantisation choices judged on a validation split, never on the test set.

    python -m benchmarks.int8_calibration EXPORTED_FOLDER [--variants ...]

EXPORTED_FOLDER is `trainer.export`'s output for a run trained with a validation split (`--val-size` > 0; its
manifest says which). Each variant re-quantises that folder's fp32 `model.onnx` with `trainer.formats.export_int8`
(the exporter's own function, only its keyword options changed), calibrated on the run's own training images,
and is scored on the run's validation images against the fp32 file: accuracy, the drop, top-1 agreement. The
exporter's defaults are the variant chosen here. Saves benchmarks/results/int8_calibration.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from bundle.environment import machine_info
from bundle.preprocess import pixels_to_input
from bundle.runtime import onnx_runner
from trainer.data import load_dataset, split_validation
from trainer.export import ExportOptions, calibration_inputs
from trainer.formats import export_int8

RESULTS = Path(__file__).parent / "results"
CALIBRATION_IMAGES = ExportOptions.calibration_images  # the exporter's default
VARIANTS: dict[str, tuple[str, dict]] = {  # name: (what it is, export_int8 options; "images": calibration size)
    "stem-int8": ("stem quantised (the exporter before 2026-12-06)", dict(stem_in_float=False)),
    "stem-int8-2048": ("stem quantised, 2048 calibration images", dict(stem_in_float=False, images=2048)),
    "stem-int8-percentile": (
        "stem quantised, percentile calibration",
        dict(stem_in_float=False, calibration_method="Percentile"),
    ),
    "stem-float": ("stem in float (the exporter's default)", dict()),
    "stem-head-float": ("stem and head in float", dict(head_in_float=True)),
}


def batched_logits(path: Path, x: np.ndarray, batch_size: int = 250) -> np.ndarray:
    run = onnx_runner(path, threads=0)
    return np.concatenate([run(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path, help="trainer.export output of a run trained with --val-size > 0")
    parser.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), help="default: all of them"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "int8_calibration.json")
    args = parser.parse_args()

    manifest = json.loads((args.folder / "manifest.json").read_text())
    config = manifest["training"]["config"]
    if not config["val_size"]:
        parser.error(f"{args.folder} was trained without a validation split: choosing on test images is not allowed")
    data = load_dataset(config["data"])
    train_x, _, val_x, val_y = split_validation(data.train_images, data.train_labels, config["val_size"])
    contract = manifest["input"]
    val_input = pixels_to_input(val_x, contract)
    fp32_top1 = batched_logits(args.folder / "model.onnx", val_input).argmax(1)
    fp32_accuracy = float(np.mean(fp32_top1 == val_y))
    print(f"fp32 ONNX on {len(val_y)} validation images: {fp32_accuracy:.2%}")

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.variants:
            description, options = VARIANTS[name][0], dict(VARIANTS[name][1])
            images = options.pop("images", CALIBRATION_IMAGES)
            started = time.perf_counter()
            path = Path(scratch) / "model.int8.onnx"
            export_int8(args.folder / "model.onnx", path, calibration_inputs(train_x, images, contract), **options)
            top1 = batched_logits(path, val_input).argmax(1)
            accuracy = float(np.mean(top1 == val_y))
            rows.append(
                dict(
                    variant=name,
                    description=description,
                    calibration_images=images,
                    accuracy=accuracy,
                    drop_points=100 * (fp32_accuracy - accuracy),
                    agreement=float(np.mean(top1 == fp32_top1)),
                    seconds=time.perf_counter() - started,
                )
            )
            print(
                f"{name}: {accuracy:.2%} (drop {rows[-1]['drop_points']:.2f} point, agreement {rows[-1]['agreement']:.2%})"
            )

    print(f"\n| INT8 variant | validation accuracy | drop against fp32 ({fp32_accuracy:.2%}) | top-1 agreement |")
    print("|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['description']} | {row['accuracy']:.2%} | {row['drop_points']:.2f} | {row['agreement']:.2%} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            dict(
                measured=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                folder=str(args.folder),
                architecture=manifest["architecture"],
                validation_images=len(val_y),
                fp32_accuracy=fp32_accuracy,
                variants=rows,
                environment=machine_info(("onnxruntime", "onnx", "numpy")),
            ),
            indent=2,
        )
        + "\n"
    )
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
