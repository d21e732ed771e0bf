"""Offline prediction with ONNX Runtime (no torch): `python -m serving.predict [--model DIR] PATH...`.

PATHs are image files, folders (searched recursively) or glob patterns.
`--evaluate SOURCE` instead scores a labelled class-folder tree (`<class>/*`
or `test/<class>/*`, as a folder or .tar/.tar.gz such as the shared CIFAR-10
archive) and prints accuracy and per-class accuracy. Unreadable files are
reported on stderr and skipped. Exit status: 0 all good, 1 some files skipped,
2 bad usage or model.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bundle.class_tree import iter_labelled_files
from bundle.manifest import ModelError
from bundle.preprocess import DEFAULT_MAX_FILE_BYTES, IMAGE_SUFFIXES, ImageError, read_image_file, top_k
from bundle.runtime import TORCH_FREE_BACKENDS
from serving.classifier import DEFAULT_K, Classifier


def expand_paths(patterns: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files, folders (recursive, image suffixes only; symbolic links to folders are not followed) and globs
    -> (files, [(pattern, problem)]). Entries that are not readable regular files (FIFOs, dangling or looping
    links) are kept: reading them reports why, so nothing is skipped silently."""
    files, problems = [], []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            found = sorted(
                Path(folder) / name
                for folder, _, names in os.walk(path)
                for name in names
                if Path(name).suffix.lower() in IMAGE_SUFFIXES
            )
            files += found
            if not found:
                problems.append((pattern, "folder holds no image files"))
        elif path.exists() or path.is_symlink():
            files.append(path)  # a regular file, or a FIFO or broken link that reading will report
        elif glob.has_magic(pattern):
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if not Path(p).is_dir())
            files += matches
            if not matches:
                problems.append((pattern, "pattern matches no files"))
        else:
            problems.append((pattern, "no such file or folder"))
    return files, problems


def labelled_items(source: Path, class_names: list[str]) -> list[tuple[str, int, bytes | Path]]:
    """(name, label, bytes or file) of a class-folder tree or archive; its test/ split if it has split folders.
    Listed whole first (an archive's images are read into memory), so that progress can show a total."""
    index = {name: i for i, name in enumerate(class_names)}
    items = []
    for file in iter_labelled_files(source, "test"):
        if file.label not in index:
            raise ValueError(
                f"folder {file.label!r} in {str(source)!r} is not a class of this model ({', '.join(class_names)})"
            )
        items.append((file.name, index[file.label], file.content))  # files are read by predict_stream
    return items


def predict_stream(
    classifier: Classifier,
    items: Iterable[tuple[str, bytes | Path]],
    batch_size: int,
    total: int | None,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> Iterator[tuple[str, np.ndarray | None, str | None]]:
    """Yield (name, probabilities or None, error or None) in input order, inferring in batches.

    Items hold image bytes or a file to read; a file that cannot be read (not a regular file, a broken or
    looping link, larger than `max_file_bytes`) is an error, like a bad image."""
    pending: list[tuple[str, np.ndarray]] = []

    def flush() -> Iterator[tuple[str, np.ndarray, None]]:
        probabilities = classifier.probabilities(np.stack([p for _, p in pending]))
        for (name, _), row in zip(pending, probabilities, strict=True):
            yield name, row, None
        pending.clear()

    for name, data in tqdm(items, total=total, unit="img", desc="predicting", disable=None, file=sys.stderr):
        try:
            data = read_image_file(data, max_file_bytes) if isinstance(data, Path) else data
            pending.append((name, classifier.pixels(data, name=name)))
        except ImageError as err:
            yield name, None, str(err)
        if len(pending) >= batch_size:
            yield from flush()
    if pending:
        yield from flush()


def _print_results(results: list[tuple[str, np.ndarray]], class_names: list[str], k: int, fmt: str) -> None:
    ranked = top_k(np.stack([p for _, p in results]), class_names, k) if results else []
    if fmt == "json":
        json.dump(
            [{"path": name, "predictions": preds} for (name, _), preds in zip(results, ranked, strict=True)],
            sys.stdout,
            indent=2,
        )
        print()
    elif fmt == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(["path", "rank", "label", "probability"])
        for (name, _), preds in zip(results, ranked, strict=True):
            for rank, p in enumerate(preds, 1):
                writer.writerow([name, rank, p["label"], f"{p['probability']:.6f}"])
    else:  # columns: the name, then label and probability per rank, each column as wide as its widest entry
        width = max((len(name) for name, _ in results), default=4)
        label_width = max(map(len, class_names))
        for (name, _), preds in zip(results, ranked, strict=True):
            cells = (f"{p['label']:<{label_width}} {100 * p['probability']:5.1f}%" for p in preds)
            print(f"{name:<{width}}  " + "  ".join(cells))


def evaluate(
    classifier: Classifier, source: Path, batch_size: int, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
) -> tuple[dict, int]:
    """Accuracy and per-class accuracy on a labelled source; returns (summary, files skipped). Raises
    ValueError when the source holds no labelled image that could be scored."""
    class_names = classifier.class_names
    listed = labelled_items(source, class_names)
    labels = {name: label for name, label, _ in listed}
    k = len(class_names)
    confusion = np.zeros((k, k), dtype=np.int64)
    skipped = 0
    items = [(name, data) for name, _, data in listed]
    for name, probabilities, error in predict_stream(classifier, items, batch_size, len(items), max_file_bytes):
        if error:
            print(f"skipped {error}", file=sys.stderr)
            skipped += 1
        else:
            confusion[labels[name], int(probabilities.argmax())] += 1
    total = int(confusion.sum())
    if total == 0:
        raise ValueError(
            f"no labelled image could be scored in {str(source)!r} ({skipped} skipped): expected <class>/<image> "
            f"or test/<class>/<image> with class folders named {', '.join(class_names)}"
        )
    per_class = {c: float(confusion[i, i] / max(1, confusion[i].sum())) for i, c in enumerate(class_names)}
    return {
        "images": total,
        "skipped": skipped,
        "accuracy": float(np.trace(confusion) / max(1, total)),
        "per_class_accuracy": per_class,
    }, skipped


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m serving.predict",
        description=__doc__.split("\n\n")[0],
        epilog="Exit status: 0 all good, 1 some files skipped, 2 bad usage or model.",
    )
    parser.add_argument("paths", nargs="*", metavar="PATH", help="image files, folders or glob patterns")
    parser.add_argument(
        "--model",
        help="exported model folder or BentoML model tag (default: $CLASSIFIER_MODEL or exported_models/default)",
    )
    parser.add_argument(
        "--backend",
        choices=TORCH_FREE_BACKENDS,
        default="auto",
        help="ONNX Runtime fp32 or INT8; auto: INT8 when its export gate passed, as the service (default: auto)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per inference batch (default: 64)")
    parser.add_argument("--top-k", type=int, default=DEFAULT_K, help=f"labels shown per image (default: {DEFAULT_K})")
    parser.add_argument(
        "--format", choices=("table", "csv", "json"), default="table", help="output format (default: table)"
    )
    parser.add_argument("--evaluate", metavar="SOURCE", help="score a labelled class-folder tree or .tar(.gz) instead")
    parser.add_argument(
        "--threads", type=int, default=0, help="ONNX Runtime intra-op threads (default: 0 = the usable cores)"
    )
    parser.add_argument(
        "--max-file-mb",
        type=float,
        default=DEFAULT_MAX_FILE_BYTES / 2**20,
        help=f"image files larger than this are skipped unread (default: {DEFAULT_MAX_FILE_BYTES / 2**20:g})",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if bool(args.paths) == bool(args.evaluate):
        parser.error("give image PATHs or --evaluate SOURCE (one of the two)")
    for flag, value, ok, rule in (
        ("--batch-size", args.batch_size, args.batch_size >= 1, "at least 1"),
        ("--top-k", args.top_k, args.top_k >= 1, "at least 1"),
        ("--threads", args.threads, args.threads >= 0, "0 (the usable cores) or more"),
        ("--max-file-mb", args.max_file_mb, args.max_file_mb > 0, "more than 0"),
    ):
        if not ok:
            parser.error(f"{flag} must be {rule}, got {value:g}")
    max_file_bytes = int(args.max_file_mb * 2**20)
    try:
        classifier = Classifier.load(args.model, backend=args.backend, threads=args.threads)
    except (ModelError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    if args.evaluate:
        source = Path(args.evaluate)
        if not source.exists():
            print(f"error: {str(source)!r} does not exist", file=sys.stderr)
            return 2
        try:
            summary, skipped = evaluate(classifier, source, args.batch_size, max_file_bytes)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        if args.format == "json":
            print(json.dumps({"model": classifier.name, "source": str(source), **summary}, indent=2))
        else:
            skipped_text = f" ({skipped} skipped)" if skipped else ""
            print(
                f"{classifier.name} on {source}: accuracy {100 * summary['accuracy']:.2f}% over {summary['images']} images{skipped_text}"
            )
            for name, acc in summary["per_class_accuracy"].items():
                print(f"  {name:<12} {100 * acc:6.2f}%")
        return 1 if skipped else 0

    files, problems = expand_paths(args.paths)
    for pattern, problem in problems:
        print(f"skipped {pattern}: {problem}", file=sys.stderr)
    results, skipped = [], len(problems)
    items = ((str(f), f) for f in files)
    for name, probabilities, error in predict_stream(classifier, items, args.batch_size, len(files), max_file_bytes):
        if error:
            print(f"skipped {error}", file=sys.stderr)
            skipped += 1
        else:
            results.append((name, probabilities))
    _print_results(results, classifier.class_names, args.top_k, args.format)
    return 1 if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
