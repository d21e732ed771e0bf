"""Tests of the offline predictor, `python -m serving.predict`, run as a real process on real CIFAR-10 test images.

Output formats, path expansion, bad files, exit codes, `--evaluate` on class-folder trees and archives (one of them
rebuilt from the shared archive so that its accuracy must equal the manifest's), and that torch, BentoML and the
service are never imported. Run: `pytest tests/test_predict.py`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, read_test_images, run_module

from bundle.manifest import ExportedModel, load_model_dir
from bundle.runtime import resolve_backend
from serving.classifier import Classifier
from serving.predict import predict_stream

PER_CLASS = 3  # images per class in the small labelled tree
PROBABILITY_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def model(default_model: Path) -> ExportedModel:
    return load_model_dir(default_model)


@pytest.fixture(scope="module")
def tree(shared_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A labelled class-folder tree `<class>/NNNN.jpg` of PER_CLASS test images per class from the shared archive."""
    root = tmp_path_factory.mktemp("tree")
    for name, label, data in read_test_images(shared_archive, per_class=PER_CLASS):
        (root / label).mkdir(exist_ok=True)
        (root / label / Path(name).name).write_bytes(data)
    return root


@pytest.fixture(scope="module")
def expected(model: ExportedModel, tree: Path) -> dict[str, np.ndarray]:
    """Probabilities computed in this process with the predictor's library functions, by file path."""
    classifier = Classifier.load(model.folder, threads=1)
    items = [(str(f), f.read_bytes()) for f in sorted(tree.rglob("*.jpg"))]
    return {name: p for name, p, _ in predict_stream(classifier, items, batch_size=64, total=None)}


def _predict(model_dir: Path, *args: str, check: bool = True):
    return run_module("serving.predict", "--model", str(model_dir), *args, timeout=300, check=check)


def _make_unreadable(path: Path) -> None:
    """A file that exists but cannot be read. Root ignores permission bits, so it gets /proc/self/mem (EIO)."""
    if os.geteuid() == 0:
        path.symlink_to("/proc/self/mem")
    else:
        path.write_bytes(b"\xff\xd8\xff")
        path.chmod(0)


# ------------------------------------------------------------------ predictions and output formats


def test_predict_json_matches_library(default_model, model, tree, expected) -> None:
    files = sorted(str(f) for f in tree.rglob("*.jpg"))
    result = _predict(default_model, "--format", "json", "--top-k", "10", "--batch-size", "7", *files)
    assert result.returncode == 0 and "skipped" not in result.stderr
    answers = json.loads(result.stdout)
    assert [a["path"] for a in answers] == files
    for answer in answers:
        probabilities = expected[answer["path"]]
        labels = [p["label"] for p in answer["predictions"]]
        assert sorted(labels) == sorted(model.class_names)
        assert labels[0] == model.class_names[int(probabilities.argmax())]
        got = np.array([{p["label"]: p["probability"] for p in answer["predictions"]}[c] for c in model.class_names])
        np.testing.assert_allclose(got, probabilities, rtol=0, atol=PROBABILITY_TOLERANCE)


def test_predict_csv_and_table_formats(default_model, model, tree, expected) -> None:
    files = sorted(str(f) for f in tree.rglob("0000.jpg"))
    rows = list(csv.reader(io.StringIO(_predict(default_model, "--format", "csv", "--top-k", "3", *files).stdout)))
    assert rows[0] == ["path", "rank", "label", "probability"]
    assert len(rows) == 1 + 3 * len(files)
    for i, path in enumerate(files):
        block = rows[1 + 3 * i : 4 + 3 * i]
        assert [r[0] for r in block] == [path] * 3 and [r[1] for r in block] == ["1", "2", "3"]
        top3 = np.argsort(-expected[path], kind="stable")[:3]
        assert [r[2] for r in block] == [model.class_names[j] for j in top3]
        np.testing.assert_allclose([float(r[3]) for r in block], expected[path][top3], atol=1e-6)

    lines = _predict(default_model, "--top-k", "2", *files).stdout.splitlines()
    assert len(lines) == len(files)
    for line, path in zip(lines, files, strict=True):
        top = model.class_names[int(expected[path].argmax())]
        assert line.startswith(path) and f"  {top} " in line and line.count("%") == 2, line


def test_predict_expands_folders_and_globs(default_model, tree) -> None:
    everything = sorted(str(f) for f in tree.rglob("*.jpg"))
    by_folder = json.loads(_predict(default_model, "--format", "json", str(tree)).stdout)
    assert [a["path"] for a in by_folder] == everything
    pattern = str(tree / "*" / "0001.jpg")  # expanded by the predictor, not by a shell
    by_glob = json.loads(_predict(default_model, "--format", "json", pattern, everything[0]).stdout)
    assert [a["path"] for a in by_glob] == [*sorted(str(f) for f in tree.glob("*/0001.jpg")), everything[0]]


def test_predict_skips_bad_files_and_exits_1(default_model, tree, tmp_path: Path) -> None:
    good = sorted(str(f) for f in tree.rglob("0000.jpg"))[:2]
    (tmp_path / "text.jpg").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "half.jpg").write_bytes(Path(good[0]).read_bytes()[:200])
    _make_unreadable(tmp_path / "unreadable.jpg")
    (tmp_path / "no-images").mkdir()
    bad = [tmp_path / n for n in ("text.jpg", "empty.png", "half.jpg", "unreadable.jpg", "no-images", "missing.jpg")]
    result = _predict(default_model, "--format", "json", good[0], *map(str, bad), good[1], check=False)
    assert result.returncode == 1, result.stderr
    assert [a["path"] for a in json.loads(result.stdout)] == good  # the good files are still answered
    skipped = [line for line in result.stderr.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == len(bad), result.stderr
    for path, reason in zip(
        bad,
        ("not a recognised image", "empty", "truncated or corrupt", "cannot read", "no image files", "no such file"),
        strict=True,
    ):
        assert any(str(path) in line and reason in line for line in skipped), (path, reason, result.stderr)
    assert "Traceback" not in result.stderr


def test_predict_refuses_bad_usage_and_tampered_model(default_model, tree, tmp_path: Path) -> None:
    image = str(next(tree.rglob("*.jpg")))
    assert _predict(default_model, check=False).returncode == 2  # neither PATHs nor --evaluate
    missing = _predict(tmp_path / "nowhere", image, check=False)
    assert missing.returncode == 2 and "manifest.json" in missing.stderr
    tampered = tmp_path / "tampered"
    shutil.copytree(default_model, tampered)
    for file, backend in (("model.int8.onnx", "auto"), ("model.onnx", "onnx")):  # auto: the INT8 model
        data = bytearray((tampered / file).read_bytes())
        data[-100] ^= 0xFF
        (tampered / file).write_bytes(bytes(data))
        refused = _predict(tampered, "--backend", backend, image, check=False)
        assert refused.returncode == 2 and file in refused.stderr and "does not match" in refused.stderr


# ------------------------------------------------------------------ --evaluate


def test_predict_evaluate_class_tree_per_class(default_model, model, tree, expected) -> None:
    summary = json.loads(_predict(default_model, "--evaluate", str(tree), "--format", "json").stdout)
    assert summary["images"] == PER_CLASS * len(model.class_names) and summary["skipped"] == 0
    correct = {c: 0 for c in model.class_names}
    for path, probabilities in expected.items():
        label = Path(path).parent.name
        correct[label] += model.class_names[int(probabilities.argmax())] == label
    assert summary["per_class_accuracy"] == pytest.approx({c: n / PER_CLASS for c, n in correct.items()})
    assert summary["accuracy"] == pytest.approx(sum(correct.values()) / len(expected))

    text = _predict(default_model, "--evaluate", str(tree)).stdout.splitlines()
    assert f"over {summary['images']} images" in text[0] and f"{100 * summary['accuracy']:.2f}%" in text[0]
    assert [line.split()[0] for line in text[1:]] == model.class_names


def test_predict_evaluate_skips_bad_files_in_tree(default_model, model, tree, tmp_path: Path) -> None:
    copy = tmp_path / "tree"
    shutil.copytree(tree, copy)
    (copy / model.class_names[0] / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    _make_unreadable(copy / model.class_names[1] / "unreadable.jpg")
    result = _predict(default_model, "--evaluate", str(copy), "--format", "json", check=False)
    assert result.returncode == 1, result.stderr
    summary = json.loads(result.stdout)
    assert summary["images"] == PER_CLASS * len(model.class_names) and summary["skipped"] == 2
    assert "broken.jpg" in result.stderr and "unreadable.jpg" in result.stderr


def _manifest_test_subset(archive: Path, manifest: dict) -> list[tuple[str, bytes]]:
    """The test images the exporter scored (trainer.export): the test set sorted by (class, file name), then the
    first `data.test_images` of a numpy default_rng(0) permutation."""
    with tarfile.open(archive) as tar:
        members = {
            m.name: tar.extractfile(m).read()
            for m in tar
            if m.isfile() and len(Path(m.name).parts) == 3 and Path(m.name).parts[0] == "test"
        }
    index = {c: i for i, c in enumerate(manifest["class_names"])}
    ordered = sorted(members, key=lambda name: (index[Path(name).parts[1]], name))
    chosen = np.random.default_rng(0).permutation(len(ordered))[: manifest["data"]["test_images"]]
    return [(ordered[i], members[ordered[i]]) for i in chosen]


@pytest.mark.slow
def test_predict_evaluate_archive_matches_manifest_accuracy(default_model, model, shared_archive, tmp_path) -> None:
    data = model.manifest.get("data", {})
    if Path(data.get("source", "")).name != shared_archive.name:
        pytest.skip(f"the model was not scored on the shared archive: {data}")
    subset = _manifest_test_subset(shared_archive, model.manifest)
    archive = tmp_path / "subset.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, payload in [*subset, *((n.replace("test/", "train/", 1), p) for n, p in subset[:20])]:
            member = tarfile.TarInfo(name)  # the train/ copies must be ignored: --evaluate prefers test/
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
    summary = json.loads(_predict(default_model, "--evaluate", str(archive), "--format", "json").stdout)
    assert summary["images"] == len(subset) and summary["skipped"] == 0
    assert set(summary["per_class_accuracy"]) == set(model.class_names)
    # The same pixels and the same ONNX graph: equal up to an argmax tie flipped by batch-size numerics.
    expected = model.manifest["test_accuracy"][resolve_backend(model)]  # the backend the predictor runs
    assert abs(summary["accuracy"] - expected) <= 1 / len(subset) + 1e-12


# ------------------------------------------------------------------ no torch, no BentoML


def test_predict_never_imports_torch_or_the_service(default_model, tree) -> None:
    files = [str(f) for f in sorted(tree.rglob("0000.jpg"))]
    code = (
        "import sys, json\n"
        "from serving.predict import main\n"
        f"code = main(['--model', {str(default_model)!r}, '--format', 'json', *{files!r}])\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'bentoml', 'trainer')"
        " or m == 'serving.service')\n"
        "print(json.dumps({'code': code, 'heavy': heavy}), file=sys.stderr)\n"
    )
    probe = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )
    report = json.loads(probe.stderr.strip().splitlines()[-1])
    assert report == {"code": 0, "heavy": []}, probe.stderr[-3000:]

    timed = run_module("serving.predict", "--model", str(default_model), files[0], env={"PYTHONPROFILEIMPORTTIME": "1"})
    imported = {
        line.rsplit("|", 1)[-1].strip() for line in timed.stderr.splitlines() if line.startswith("import time:")
    }
    assert "onnxruntime" in imported  # the probe sees imports at all
    assert not {m for m in imported if m.split(".")[0] in ("torch", "bentoml", "trainer")}


@pytest.mark.parametrize(
    ("artifacts", "int8_gate", "chosen"),
    [
        (("onnx", "onnx_int8"), {"passed": True}, "onnx_int8"),
        (("onnx", "onnx_int8"), {"passed": False}, "onnx"),  # a bundle whose INT8 model lost accuracy
        (("onnx", "onnx_int8"), None, "onnx"),  # no gate recorded: not vouched for
        (("onnx",), {"passed": True}, "onnx"),  # no INT8 file
    ],
)
def test_auto_runs_the_int8_model_only_when_its_export_gate_passed(
    default_model: Path, tmp_path: Path, artifacts: tuple[str, ...], int8_gate: dict | None, chosen: str
) -> None:
    """The service and the predictor choose `auto` the same way (bundle.runtime.resolve_backend)."""
    folder = Path(shutil.copytree(default_model, tmp_path / "model"))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["artifacts"] = {kind: entry for kind, entry in manifest["artifacts"].items() if kind in artifacts}
    manifest["parity"].pop("onnx_int8", None)
    if int8_gate is not None:
        manifest["parity"]["onnx_int8"] = int8_gate
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert Classifier.load(folder, threads=1).backend == chosen
