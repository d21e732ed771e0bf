"""`manifest.json`: what an exported model folder holds, read and validated whole, or written atomically.

The manifest names the model, its classes, the input contract
(`bundle.contract`), and every model file with its size and sha256. Readers
validate it completely before they use it, so a malformed or foreign folder is
refused at start with a message that names the problem, never half-served.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from bundle.contract import contract_problems

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1  # written by this version
SUPPORTED_MANIFEST_FORMATS = (1,)  # read by this version
MODEL_ENV = "CLASSIFIER_MODEL"  # the default model folder for the service and the predictor
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ModelError(RuntimeError):
    """The model folder is missing, unreadable, inconsistent or tampered with."""


@dataclass(frozen=True)
class ExportedModel:
    """A validated model folder: its path and its manifest."""

    folder: Path
    manifest: dict

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def class_names(self) -> list[str]:
        return self.manifest["class_names"]

    @property
    def contract(self) -> dict:
        return self.manifest["input"]

    @property
    def input_hw(self) -> tuple[int, int]:
        """(height, width) of the model's input."""
        _, _, height, width = self.contract["shape"]
        return height, width

    def artifact_path(self, kind: str) -> Path:
        artifacts = self.manifest["artifacts"]
        if kind not in artifacts:
            raise ModelError(f"model {str(self.folder)!r} has no {kind!r} artifact; it has: {', '.join(artifacts)}")
        return self.folder / artifacts[kind]["file"]


def default_model_dir() -> Path:
    """$CLASSIFIER_MODEL, else exported_models/default in the working directory or in this repository."""
    if os.environ.get(MODEL_ENV):
        return Path(os.environ[MODEL_ENV])
    for root in (Path.cwd(), Path(__file__).resolve().parent.parent):
        if (root / "exported_models" / "default" / MANIFEST_NAME).is_file():
            return root / "exported_models" / "default"
    return Path("exported_models") / "default"


def load_model_dir(folder: str | Path | None = None) -> ExportedModel:
    """Read and validate the manifest of an exported model folder (default: `default_model_dir()`)."""
    folder = Path(folder) if folder else default_model_dir()
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ModelError(f"no {MANIFEST_NAME} in {str(folder)!r}: pass a folder written by `python -m trainer.export`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"cannot read {str(path)!r}: {err}") from err
    problems = manifest_problems(manifest)
    if problems:
        raise ModelError(f"{str(path)!r} is not a valid model manifest: " + "; ".join(problems))
    return ExportedModel(folder, manifest)


def manifest_problems(manifest: object) -> list[str]:
    """Everything wrong with a manifest (empty when valid): format version, required fields, the input
    contract, and artifact entries (plain file names inside the folder, with size and sha256)."""
    if not isinstance(manifest, dict):
        return [f"the manifest must be a JSON object, got {type(manifest).__name__}"]
    version = manifest.get("format_version")
    if version not in SUPPORTED_MANIFEST_FORMATS:
        return [
            f"format_version {version!r} is not one this version reads "
            f"({', '.join(map(str, SUPPORTED_MANIFEST_FORMATS))}); upgrade, or re-export the model with this version"
        ]
    missing = [key for key in ("name", "class_names", "input", "artifacts") if key not in manifest]
    if missing:
        return [f"it lacks {missing}"]
    problems = []
    if not isinstance(manifest["name"], str) or not manifest["name"]:
        problems.append(f"'name' must be a non-empty string, got {manifest['name']!r}")
    names = manifest["class_names"]
    if not (isinstance(names, list) and len(names) >= 2 and all(isinstance(n, str) and n for n in names)):
        problems.append("'class_names' must list at least two non-empty strings")
    elif len(set(names)) != len(names):
        problems.append(f"'class_names' has duplicates: {names}")
    problems += contract_problems(manifest["input"])
    artifacts = manifest["artifacts"]
    if not isinstance(artifacts, dict) or not artifacts:
        return [*problems, "'artifacts' must be a non-empty object"]
    for kind, entry in artifacts.items():
        if not isinstance(entry, dict) or not {"file", "bytes", "sha256"} <= entry.keys():
            problems.append(f"artifact {kind!r} must have 'file', 'bytes' and 'sha256'")
            continue
        file = entry["file"]
        if not isinstance(file, str) or not _is_plain_name(file):
            problems.append(f"artifact {kind!r} names {file!r}: only a file name inside the model folder is allowed")
        if not isinstance(entry["bytes"], int) or entry["bytes"] < 0:
            problems.append(f"artifact {kind!r} has a bad size {entry['bytes']!r}")
        if not isinstance(entry["sha256"], str) or not _SHA256.fullmatch(entry["sha256"]):
            problems.append(f"artifact {kind!r} has a bad sha256 {entry['sha256']!r}")
    return problems


def _is_plain_name(file: str) -> bool:
    path = PurePosixPath(file)
    return len(path.parts) == 1 and file not in (".", "..") and "\\" not in file and "\x00" not in file


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def artifact_entry(path: Path) -> dict:
    """The manifest entry of a model file: its name, size and sha256."""
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256_of(path)}


def verify_checksums(model: ExportedModel, kinds: list[str] | None = None) -> None:
    """Raise ModelError unless every (or each listed) artifact matches its manifest sha256 and size."""
    for kind, entry in model.manifest["artifacts"].items():
        if kinds is not None and kind not in kinds:
            continue
        path = model.folder / entry["file"]
        if not path.is_file():
            raise ModelError(f"model file {str(path)!r} listed in the manifest is missing")
        actual = sha256_of(path)
        if actual != entry["sha256"] or path.stat().st_size != entry["bytes"]:
            raise ModelError(
                f"model file {str(path)!r} does not match its manifest: sha256 {actual} "
                f"(expected {entry['sha256']}); the file was modified or corrupted — re-export the model"
            )


def write_manifest(folder: Path, manifest: dict) -> Path:
    """Validate `manifest` and write it to `folder/manifest.json` atomically."""
    manifest = {"format_version": MANIFEST_FORMAT, **manifest}
    problems = manifest_problems(manifest)
    if problems:
        raise ValueError("refusing to write an invalid manifest: " + "; ".join(problems))
    path = folder / MANIFEST_NAME
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)
    return path
