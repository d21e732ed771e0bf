"""Exported models in BentoML's model store: import a folder, find a tag, and resolve the service's `model`.

    python -m serving.model_store import exported_models/default     # -> cifar10-classifier:<version>
    bentoml models list                                              # shows it, with its labels

An exported folder becomes `cifar10-classifier:<version>`, the version derived from its content (the same
bundle always gets the same tag, so importing again changes nothing). Labels carry what a user picks a model
by (architecture, test accuracy, input contract version); the store's copy holds the manifest, the model card
and only the artifacts that run without torch (the ONNX models), so a Bento that packs it carries nothing it
cannot run. The service imports the folder it serves the same way at start, and declares the tag, so that
`bentoml build` packs that model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import bentoml
from bentoml.exceptions import BentoMLException, NotFound

from bundle.manifest import (
    MANIFEST_NAME,
    ExportedModel,
    ModelError,
    default_model_dir,
    load_model_dir,
    verify_checksums,
    write_manifest,
)
from serving.classifier import is_store_tag

STORE_NAME = "cifar10-classifier"
# Artifact kinds that serving runs without torch: the only ones a store copy (and so a Bento) holds.
TORCH_FREE_ARTIFACTS = ("onnx", "onnx_int8")
log = logging.getLogger("serving")


@dataclass(frozen=True)
class ModelSource:
    """Where the service reads its model from, and the model-store tag that `bentoml build` packs."""

    folder: Path
    tag: str


def resolve_model(setting: str) -> ModelSource:
    """The service's `model` setting -> its source. A folder is served from the folder and imported into the
    store (so that it is listed and packed); a tag is served from the store; nothing said is the bundled
    default folder, or, where there is none (inside a Bento), the store's latest STORE_NAME."""
    if setting and is_store_tag(setting):
        return ModelSource(stored_model_folder(setting), _full_tag(setting))
    folder = Path(setting) if setting else default_model_dir()
    if setting or (folder / MANIFEST_NAME).is_file():
        return ModelSource(folder, import_folder(folder))
    latest = f"{STORE_NAME}:latest"
    return ModelSource(stored_model_folder(latest), _full_tag(latest))


def import_folder(folder: str | Path) -> str:
    """Validate an exported model folder and copy it into the model store; returns its tag (the existing one
    when this content is there already). Raises ModelError for a bad or tampered folder."""
    model = load_model_dir(folder)
    kept = {kind: entry for kind, entry in model.manifest["artifacts"].items() if kind in TORCH_FREE_ARTIFACTS}
    if not kept:
        raise ModelError(
            f"model {str(model.folder)!r} has no ONNX model ({', '.join(TORCH_FREE_ARTIFACTS)}); serving needs one"
        )
    verify_checksums(model, list(kept))
    tag = f"{STORE_NAME}:{_content_version(model, kept)}"
    if _exists(tag):
        return tag
    try:
        with bentoml.models.create(tag, labels=model_labels(model), metadata=_metadata(model)) as stored:
            _copy_torch_free(model, kept, Path(stored.path))
    except BentoMLException:
        if not _exists(tag):  # another process imported the same content meanwhile: that is fine
            raise
    log.info("model folder %s is %s in BentoML's model store", model.folder, tag)
    return tag


def stored_model_folder(tag: str) -> Path:
    """The folder of a model-store tag (`name`, `name:latest` or `name:version`). Raises ModelError."""
    try:
        return Path(bentoml.models.get(tag).path)
    except (NotFound, BentoMLException, ValueError) as err:
        raise ModelError(
            f"no model {tag!r} in BentoML's model store ({err}); import an exported folder with "
            "`python -m serving.model_store import FOLDER`, or pass the folder itself"
        ) from None


def model_labels(model: ExportedModel) -> dict[str, str]:
    """What `bentoml models list` and a user pick a model by (BentoML labels are strings)."""
    accuracy = model.manifest.get("test_accuracy", {})
    labels = {
        "bundle": model.name,
        "architecture": str(model.manifest.get("architecture")),
        "classes": str(len(model.class_names)),
        "contract_version": str(model.contract["version"]),
    }
    for kind in TORCH_FREE_ARTIFACTS:
        if kind in accuracy:
            labels[f"test_accuracy_{kind}"] = f"{accuracy[kind]:.4f}"
    return labels


def _metadata(model: ExportedModel) -> dict:
    """The manifest's summary (BentoML metadata holds no None: the full manifest travels as a file)."""
    height, width = model.input_hw
    keys = ("class_names", "test_accuracy", "created")
    summary = {key: model.manifest[key] for key in keys if key in model.manifest}
    return summary | {"input_size": f"{width}x{height}", "source": str(model.folder)}


def _content_version(model: ExportedModel, kept: dict[str, dict]) -> str:
    content = json.dumps([model.name, sorted((kind, entry["sha256"]) for kind, entry in kept.items())])
    return hashlib.sha256(content.encode()).hexdigest()[:16]


def _copy_torch_free(model: ExportedModel, kept: dict[str, dict], target: Path) -> None:
    """The kept artifacts, the documents the manifest lists (model card, pictures) and a manifest of just those."""
    documents = [name for name in model.manifest.get("documents", []) if (model.folder / name).is_file()]
    for name in [entry["file"] for entry in kept.values()] + documents:
        shutil.copy2(model.folder / name, target / name)
    left_out = sorted(set(model.manifest["artifacts"]) - set(kept))
    manifest = {key: value for key, value in model.manifest.items() if key != "format_version"}
    manifest["artifacts"] = kept
    if left_out:
        manifest["left_out_of_store"] = {"artifacts": left_out, "why": "they need torch, which serving does not"}
    write_manifest(target, manifest)


def _exists(tag: str) -> bool:
    try:
        bentoml.models.get(tag)
    except NotFound:
        return False
    return True


def _full_tag(tag: str) -> str:
    return str(bentoml.models.get(tag).tag)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serving.model_store",
        description="Import exported model folders into BentoML's model store (as "
        f"{STORE_NAME}:<version>, labelled); `bentoml models list` then shows them.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("import", help="import exported model folders (written by python -m trainer.export)")
    add.add_argument("folders", nargs="+", metavar="FOLDER")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    status = 0
    for folder in args.folders:
        try:
            print(f"{folder}: {import_folder(folder)}")
        except ModelError as err:
            print(f"error: {err}", file=sys.stderr)
            status = 2
    return status


if __name__ == "__main__":
    sys.exit(main())
