"""The model card beside an exported model, written by the exporter from the manifest it has just validated.

MODEL_CARD.md says what the model is and is not for: data, recipe and commands, test accuracy overall and per
class (fp32 and INT8), the input contract, checks, how to use it, and the limits a user must know.
predictions.png shows test images with their true and predicted labels (mistakes marked), confusion.png the
served model's confusion matrix: pictures a person would rather look at than read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bundle.manifest import ExportedModel
from bundle.runtime import FORMATS, resolve_backend
from trainer.report import plot_confusion

CARD = "MODEL_CARD.md"
PREDICTIONS_PICTURE = "predictions.png"
CONFUSION_PICTURE = "confusion.png"
PER_CLASS_IN_PICTURE = 8
TTA_LEVELS = {0: "level 0: none", 1: "level 1: the mirror image", 2: "level 2: the mirror image and 1-pixel shifts"}


def write_model_card(
    folder: Path, manifest: dict, test_pixels: np.ndarray, test_labels: np.ndarray, logits: dict[str, np.ndarray]
) -> list[str]:
    """Write the card and its pictures into `folder`; returns their file names (the manifest's `documents`).
    `logits` are each artifact's on the test images; the pictures show the model a server runs by default
    (`auto`: INT8 when its gate passed)."""
    served = resolve_backend(ExportedModel(folder, manifest), "auto")
    predicted = logits[served].argmax(1)
    names = manifest["class_names"]
    _plot_predictions(test_pixels, test_labels, predicted, names, folder / PREDICTIONS_PICTURE, served)
    confusion = np.zeros((len(names), len(names)), dtype=int)
    np.add.at(confusion, (test_labels, predicted), 1)
    accuracy = np.trace(confusion) / confusion.sum()
    title = (
        f"{manifest['name']} ({FORMATS[served].description}): {100 * accuracy:.2f}% of {confusion.sum():,} test images"
    )
    plot_confusion(confusion.tolist(), names, folder / CONFUSION_PICTURE, title)
    (folder / CARD).write_text(card_text(manifest, served))
    return [CARD, PREDICTIONS_PICTURE, CONFUSION_PICTURE]


def card_text(manifest: dict, served: str) -> str:
    """MODEL_CARD.md from the manifest."""
    # Longer than a screen on purpose: one template that reads top to bottom in the order of the card it writes.
    names, contract = manifest["class_names"], manifest["input"]
    accuracy, artifacts = manifest["test_accuracy"], manifest["artifacts"]
    training = manifest.get("training", {})
    report = training.get("report") or {}
    config = training.get("config", {})
    _, _, height, width = contract["shape"]
    lines = [
        f"# {manifest['name']}: a {len(names)}-class image classifier ({manifest['architecture']})",
        "",
        f"{manifest['parameters']:,} parameters, trained on CIFAR-10; {100 * accuracy[served]:.2f}% top-1 on the "
        f"{manifest['data']['test_images']:,} test images with the model a server runs by default ({served}). "
        f"Classes: {', '.join(names)}. Written by `python -m trainer.export` on {manifest['created']}.",
        "",
        "## Use it",
        "",
        "```bash",
        f"bentoml serve --arg model=exported_models/{manifest['name']}           # HTTP: POST /classify",
        f"python -m serving.predict --model exported_models/{manifest['name']} cat.jpg",
        "```",
        "",
        "```python",
        "from serving import Classifier",
        "",  # a blank line after imports, as ruff formats the card's code block
        f'Classifier.load("exported_models/{manifest["name"]}").predict("cat.jpg", k=3)',
        "```",
        "",
        "Each `.onnx` file also carries the class names and the input contract in its metadata "
        "(`onnxruntime.InferenceSession(path).get_modelmeta().custom_metadata_map`).",
        "",
        "## Test accuracy",
        "",
        "| artifact | file | size | test accuracy |",
        "|---|---|---:|---:|",
        *(
            f"| {kind} | `{entry['file']}` | {entry['bytes'] / 2**20:.1f} MB | {100 * accuracy[kind]:.2f}% |"
            for kind, entry in artifacts.items()
        ),
        "",
        f"Measured in fp32 at export (every artifact) on the test set of `{manifest['data']['source']}`.",
    ]
    if report:
        lines += [
            f"The training report measured {100 * report['test_accuracy']:.2f}% at its training precision "
            f"({report.get('evaluated_at') or 'see the report'}), {100 * report['test_accuracy_tta']:.2f}% with "
            f"test-time augmentation ({TTA_LEVELS[report['tta_level']]}; not in the exported graph)."
        ]
    per_class = manifest.get("per_class_test_accuracy", {})
    shown = [kind for kind in ("onnx", "onnx_int8") if kind in per_class]
    if shown:
        lines += [
            "",
            "| class | " + " | ".join(shown) + " |",
            "|---|" + "---:|" * len(shown),
            *(f"| {name} | " + " | ".join(f"{100 * per_class[k][name]:.1f}%" for k in shown) + " |" for name in names),
        ]
    lines += [
        "",
        f"![test images with true and predicted labels]({PREDICTIONS_PICTURE})",
        "",
        f"![confusion matrix]({CONFUSION_PICTURE})",
        "",
        "## Data and training",
        "",
        f"Trained on `{config.get('data', 'see the manifest')}`: {_data_note(manifest)}",
        f"Recipe: {config.get('epochs', '?'):g} epochs, batch {config.get('batch_size')}, {config.get('optimizer')} "
        f"lr {config.get('lr')}, label smoothing {config.get('label_smoothing')}, weight averaging "
        f"{config.get('averaging')}, translate {config.get('translate')} px, flips {config.get('flip')}, cutout "
        f"{config.get('cutout')} px, validation split {config.get('val_size')} images, seed {config.get('seed')}.",
        _timing_note(report),
        "",
        "Commands:",
        "",
        "```bash",
        *manifest["commands"]["train"],
        manifest["commands"]["export"],
        "```",
        "",
        "## Input contract",
        "",
        f"float32 {contract['layout']} {contract['color_order']}, {height}x{width}, values in [0, 1] (pixel / "
        f"{contract['pixel_divisor']:g}); normalisation (mean {contract['normalization']['mean']}, std "
        f"{contract['normalization']['std']}) is inside the graph; output: {contract['output']}. Any image is "
        "brought to that by the manifest's rules: "
        + ", ".join(f"{k} {v}" for k, v in contract["preprocess"].items() if k != "note")
        + ".",
        "",
        "## Checks",
        "",
        *_checks(manifest),
        "",
        "## Limits",
        "",
        f"- Trained on {height}x{width} CIFAR-10 images of ten kinds of object. It always answers one of those ten "
        "classes: a photo of anything else (a face, a document, a landscape) still gets a label, often with high "
        "probability. It has no 'none of the above'.",
        f"- {_photo_note(height, width)}",
        "- The data set's images are JPEG-compressed (quality 75, 4:2:0 chroma), slightly smoother than the "
        "official release: accuracy on the official pixels may differ by a few tenths of a point.",
        f"- Weakest classes: {_weakest(per_class.get(served, {}))}; confusions are shown in the matrix above.",
        "",
    ]
    return "\n".join(line for line in lines if line is not None)


def _data_note(manifest: dict) -> str:
    config = manifest.get("training", {}).get("config", {})
    held_out = config.get("val_size", 0)
    train = 50_000 - held_out if config.get("train_subset", 0) == 0 else config["train_subset"]
    return (
        f"{train:,} training images{f' ({held_out:,} held out for validation)' if held_out else ''}; accuracy on "
        f"the {manifest['data']['test_images']:,} test images, which never chose anything."
    )


def _timing_note(report: dict) -> str | None:
    timing, environment = report.get("timing"), report.get("environment") or {}
    if not timing:
        return None
    return (
        f"Training took {timing['train_s'] / 60:.1f} minutes of training steps ({timing['wall_s'] / 60:.1f} minutes "
        f"from launch to exit) on {environment.get('device_name', 'an unrecorded device')} at "
        f"{environment.get('precision', '?')} precision, {report.get('train_images_per_s') or 0:,.0f} images/s."
    )


def _checks(manifest: dict) -> list[str]:
    parity, lines = manifest.get("parity", {}), []
    for kind, result in parity.items():
        if "batch_sizes" in result:
            worst = max(r["max_abs_diff"] for r in result["batch_sizes"].values())
            lines.append(
                f"- {kind}: same logits as eager PyTorch within rtol {result['rtol']:g} / atol {result['atol']:g} "
                f"(max |diff| {worst:.2g}) and the same top-1 label on every parity image, at batch sizes "
                f"{', '.join(result['batch_sizes'])}."
            )
        else:
            lines.append(
                f"- {kind}: accuracy {-100 * result['accuracy_drop']:+.2f} points against fp32 ONNX (the gate allows "
                f"down to -{100 * result['max_accuracy_drop']:.1f}), top-1 agreement with fp32 "
                f"{100 * result['top1_agreement_with_fp32']:.1f}%."
            )
    for kind, runtimes in manifest.get("portability", {}).items():
        for runtime, result in runtimes.items():
            figures = (
                f": top-1 agreement with ONNX Runtime {100 * result['top1_agreement']:.1f}%, max |logit diff| "
                f"{result['max_abs_logit_diff']:.2g}"
                if "top1_agreement" in result
                else f" ({result.get('error') or result.get('why')})"
            )
            lines.append(f"- {kind} in {runtime} {result.get('version') or ''}: {result['status']}{figures}.")
    return lines


def _photo_note(height: int, width: int) -> str:
    """What the contract's rules make of a 1024x768 photo."""
    side = min(1024, 768)
    return (
        f"A 1024x768 photo is cropped to its central {side}x{side} square (the {(1024 - side) // 2} pixels at "
        f"each side are dropped), then reduced {side // width}x to {width}x{height}: small objects and fine "
        "detail disappear, so frame the object large and centred."
    )


def _weakest(per_class: dict[str, float]) -> str:
    if not per_class:
        return "see the table"
    ranked = sorted(per_class.items(), key=lambda item: item[1])[:2]
    return " and ".join(f"{name} ({100 * value:.1f}%)" for name, value in ranked)


def _plot_predictions(
    pixels: np.ndarray, labels: np.ndarray, predicted: np.ndarray, names: list[str], path: Path, served: str
) -> None:
    """The first PER_CLASS_IN_PICTURE test images of each class (one row per class), true and predicted labels,
    mistakes framed in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [np.flatnonzero(labels == i)[:PER_CLASS_IN_PICTURE] for i in range(len(names))]
    fig, axes = plt.subplots(len(names), PER_CLASS_IN_PICTURE, figsize=(1.35 * PER_CLASS_IN_PICTURE, 1.5 * len(names)))
    for row, indices in enumerate(rows):
        for col in range(PER_CLASS_IN_PICTURE):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col >= len(indices):
                ax.axis("off")
                continue
            i = indices[col]
            wrong = predicted[i] != labels[i]
            ax.imshow(pixels[i], interpolation="nearest")
            ax.set_title(
                f"{names[predicted[i]]}" + (" ✗" if wrong else ""), fontsize=8, color="red" if wrong else "black"
            )
            for spine in ax.spines.values():
                spine.set_color("red" if wrong else "#cccccc")
                spine.set_linewidth(2.5 if wrong else 0.5)
            if col == 0:
                ax.set_ylabel(names[labels[i]], fontsize=8)
    mistakes = sum(int((predicted[r] != labels[r]).sum()) for r in rows)
    fig.suptitle(
        f"Test images by true class (rows) with the {served} model's answer; {mistakes} mistakes in red",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
