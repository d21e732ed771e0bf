"""Export (`python -m trainer.export`): artifacts, manifest, parity, gates and errors.

Most tests read conftest's `exported_model` (the short ResNet-20 run exported with
every artifact) and recompute its parity with ONNX Runtime, torch.jit and torch.export
at batch sizes 1, 7 and 64. The gate and error tests export a tiny CNN run in-process
(cheap), loosening the gates with pytest's monkeypatch to make them fail.
Run: `pytest tests/test_export.py`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import SHORT_RUN_MIN_ACCURACY, run_module
from onnx import numpy_helper
from torch import nn
from trainer_helpers import tiny_fit_args

import trainer.export as export
from bundle.contract import input_contract
from bundle.manifest import MANIFEST_FORMAT
from bundle.preprocess import pixels_to_input
from bundle.runtime import onnx_runner
from trainer.data import load_dataset
from trainer.parity import ParityError, check_parity, reference_outputs, torch_runner
from trainer.wrappers import NormalizedModel

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FP32_KINDS = ("onnx", "torchscript", "torch_export")
BATCH_SIZES = (1, 7, 64)
ARTIFACT_FILES = {
    "onnx": "model.onnx",
    "torchscript": "model.ts",
    "onnx_int8": "model.int8.onnx",
    "torch_export": "model.pt2",
}
Runner = Callable[[np.ndarray], np.ndarray]


@pytest.fixture(scope="module")
def manifest(exported_model: Path) -> dict:
    return json.loads((exported_model / "manifest.json").read_text())


@pytest.fixture(scope="module")
def eager(trained_run: Path) -> nn.Module:
    model, _, _ = export.load_trained_model(trained_run)
    return model


@pytest.fixture(scope="module")
def inputs(shared_archive: Path, manifest: dict) -> dict[str, np.ndarray]:
    """70 real test images (so batch 64 leaves a partial batch) and 70 random inputs, in the contract's form."""
    data = load_dataset(shared_archive)
    chosen = np.random.default_rng(1).choice(len(data.test_images), 70, replace=False)
    real = pixels_to_input(data.test_images[chosen], manifest["input"])
    noise = np.random.default_rng(2).random((70, 3, 32, 32), dtype=np.float32)
    return {"real": real, "random": noise}


def _torchscript(path: Path) -> Runner:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch_runner(torch.jit.load(str(path)))


def _exported_program(path: Path) -> Runner:
    module = torch.export.load(str(path)).module()  # exported in eval mode; .eval() is refused
    return lambda batch: module(torch.from_numpy(batch)).detach().numpy()


@pytest.fixture(scope="module")
def runners(exported_model: Path) -> dict[str, Runner]:
    """Each artifact loaded the way a user would, independently of trainer.parity's loaders."""
    return {
        "onnx": onnx_runner(exported_model / "model.onnx", threads=1),
        "onnx_int8": onnx_runner(exported_model / "model.int8.onnx", threads=1),
        "torchscript": _torchscript(exported_model / "model.ts"),
        "torch_export": _exported_program(exported_model / "model.pt2"),
    }


def _batched(runner: Runner, images: np.ndarray, batch_size: int) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([runner(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------ the exported folder and its manifest


def test_export_folder_holds_exactly_the_listed_artifacts(exported_model: Path, manifest: dict) -> None:
    documents = ["MODEL_CARD.md", "predictions.png", "confusion.png"]
    assert manifest["documents"] == documents
    assert {p.name for p in exported_model.iterdir()} == {"manifest.json", *ARTIFACT_FILES.values(), *documents}
    assert not list(exported_model.parent.glob(".*")), "staging or backup folders were left beside the output"
    assert {kind: entry["file"] for kind, entry in manifest["artifacts"].items()} == ARTIFACT_FILES
    for kind, entry in manifest["artifacts"].items():
        path = exported_model / entry["file"]
        assert entry["bytes"] == path.stat().st_size, kind
        assert entry["sha256"] == _sha256(path), kind


def test_export_manifest_has_the_documented_fields(manifest: dict, trained_run: Path, exported_model: Path) -> None:
    import onnxruntime

    state = torch.load(trained_run / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert manifest["format_version"] == MANIFEST_FORMAT == 1
    assert manifest["name"] == exported_model.name and manifest["architecture"] == "resnet20"
    assert manifest["class_names"] == CLASSES
    assert manifest["input"] == input_contract(state["normalization"]["mean"], state["normalization"]["std"])
    assert manifest["input"]["shape"] == [None, 3, 32, 32] and manifest["input"]["normalization_in_graph"] is True

    accuracy = manifest["test_accuracy"]
    assert {"torch_eager", *ARTIFACT_FILES} <= accuracy.keys()
    for kind in FP32_KINDS:  # same logits: same accuracy up to an exact tie
        assert accuracy[kind] == pytest.approx(accuracy["torch_eager"], abs=1e-3), kind
    assert accuracy["torch_eager"] >= SHORT_RUN_MIN_ACCURACY
    for kind in FP32_KINDS:
        parity = manifest["parity"][kind]
        assert parity["passed"] is True and (parity["rtol"], parity["atol"]) == (export.FP32_RTOL, export.FP32_ATOL)
        assert set(parity["batch_sizes"]) == {"1", "7", "64"}
        for result in parity["batch_sizes"].values():
            assert result["top1_agreement"] == 1.0 and result["images"] == 300
            assert result["worst_excess_over_tolerance"] <= 0 and result["max_abs_diff"] < 1e-2
    int8 = manifest["parity"]["onnx_int8"]
    assert int8["passed"] is True and int8["accuracy_drop"] <= int8["max_accuracy_drop"]
    assert int8["accuracy_drop"] == pytest.approx(accuracy["onnx"] - accuracy["onnx_int8"])

    opset = next(
        o.version for o in onnx.load(str(exported_model / "model.onnx")).opset_import if o.domain in ("", "ai.onnx")
    )
    assert manifest["opset"] == opset >= 18
    versions = manifest["versions"]
    assert (versions["torch"], versions["onnx"], versions["onnxruntime"]) == (
        torch.__version__,
        onnx.__version__,
        onnxruntime.__version__,
    )
    training = manifest["training"]
    assert training["config"] == state["config"] and training["steps"] == state["step"]
    assert training["checkpoint_sha256"] == _sha256(trained_run / "checkpoint.pt")
    report = json.loads((trained_run / "report.json").read_text())
    assert training["report"]["test_accuracy"] == report["test"]["accuracy"]
    assert any("trainer.fit" in c for c in manifest["commands"]["train"])
    assert "trainer.export" in manifest["commands"]["export"] and "--pt2" in manifest["commands"]["export"]
    assert manifest["data"]["test_images"] == 10000


def test_export_onnx_passes_the_full_checker_with_a_dynamic_batch(exported_model: Path) -> None:
    path = exported_model / "model.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    graph = onnx.load(str(path)).graph
    (image,), (logits,) = graph.input, graph.output
    assert (image.name, logits.name) == ("image", "logits")
    batch, *rest = image.type.tensor_type.shape.dim
    assert batch.dim_param and not batch.HasField("dim_value"), "the batch dimension must be symbolic"
    assert [d.dim_value for d in rest] == [3, 32, 32]
    onnx.checker.check_model(str(exported_model / "model.int8.onnx"), full_check=True)


@pytest.mark.parametrize("batch_size", [3, 100])
def test_export_onnx_runs_at_batch_sizes_it_was_not_traced_with(
    runners: dict[str, Runner], eager: nn.Module, batch_size: int
) -> None:
    x = np.random.default_rng(batch_size).random((batch_size, 3, 32, 32), dtype=np.float32)
    got = runners["onnx"](x)
    assert got.shape == (batch_size, 10)
    np.testing.assert_allclose(got, torch_runner(eager)(x), rtol=export.FP32_RTOL, atol=export.FP32_ATOL)


# ------------------------------------------------------------------ parity, recomputed here


@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("source", ["real", "random"])
@pytest.mark.parametrize("kind", FP32_KINDS)
def test_export_artifact_matches_eager_model(
    runners: dict[str, Runner], eager: nn.Module, inputs: dict[str, np.ndarray], kind: str, source: str, batch_size: int
) -> None:
    x = inputs[source]
    want = _batched(torch_runner(eager), x, batch_size)
    got = _batched(runners[kind], x, batch_size)
    assert got.shape == want.shape == (len(x), 10)
    np.testing.assert_allclose(
        got, want, rtol=export.FP32_RTOL, atol=export.FP32_ATOL, err_msg=f"{kind} at batch {batch_size}"
    )
    assert (got.argmax(1) == want.argmax(1)).all()


@pytest.mark.parametrize("batch_size", BATCH_SIZES)
def test_export_int8_agrees_with_eager_model_on_real_images(
    runners: dict[str, Runner], eager: nn.Module, inputs: dict[str, np.ndarray], batch_size: int
) -> None:
    x = inputs["real"]
    want = _batched(torch_runner(eager), x, batch_size).argmax(1)
    got = _batched(runners["onnx_int8"], x, batch_size)
    assert got.shape == (len(x), 10) and np.isfinite(got).all()
    assert (got.argmax(1) == want).mean() >= 0.85


# ------------------------------------------------------------------ the parity gate itself


def _perturbed_onnx(source: Path, target: Path, relative: float) -> str:
    """Copy the ONNX model with its largest weight tensor nudged by `relative` x its std; returns its name."""
    model = onnx.load(str(source))
    initializer = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    weights = numpy_helper.to_array(initializer)
    noise = np.random.default_rng(0).standard_normal(weights.shape).astype(weights.dtype)
    initializer.CopyFrom(numpy_helper.from_array(weights + relative * weights.std() * noise, initializer.name))
    onnx.save(model, str(target))
    return initializer.name


def test_check_parity_fails_on_an_onnx_with_nudged_weights(
    exported_model: Path, eager: nn.Module, inputs: dict[str, np.ndarray], tmp_path: Path
) -> None:
    x = inputs["real"]
    expected = reference_outputs(torch_runner(eager), x, BATCH_SIZES)
    perturbed = tmp_path / "perturbed.onnx"
    _perturbed_onnx(exported_model / "model.onnx", perturbed, relative=0.05)
    candidate = onnx_runner(perturbed, threads=1)
    worst = float(np.abs(_batched(candidate, x, 1) - expected[1]).max())
    with pytest.raises(ParityError) as info:
        check_parity("onnx_perturbed", expected, candidate, x, rtol=export.FP32_RTOL, atol=export.FP32_ATOL)
    message = str(info.value)
    assert message.startswith("onnx_perturbed: batch size 1: logits differ by up to "), message
    reported = float(re.search(r"differ by up to ([\d.e+-]+)", message)[1])
    assert reported == pytest.approx(worst, rel=5e-3), message  # printed with 3 significant digits
    assert f"atol {export.FP32_ATOL:g}" in message and f"rtol {export.FP32_RTOL:g}" in message


def test_check_parity_passes_a_nudge_far_below_the_tolerance(
    exported_model: Path, eager: nn.Module, inputs: dict[str, np.ndarray], tmp_path: Path
) -> None:
    x = inputs["real"]
    expected = reference_outputs(torch_runner(eager), x, BATCH_SIZES)
    perturbed = tmp_path / "nudged.onnx"
    _perturbed_onnx(exported_model / "model.onnx", perturbed, relative=1e-7)
    result = check_parity(
        "onnx_nudged", expected, onnx_runner(perturbed, threads=1), x, rtol=export.FP32_RTOL, atol=export.FP32_ATOL
    )
    assert result["passed"] and set(result["batch_sizes"]) == {"1", "7", "64"}


# ------------------------------------------------------------------ gates in the exporter, errors, eval mode


@pytest.fixture(scope="module")
def cnn_run(shared_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny real run (small CNN, one epoch): cheap to export in-process."""
    out = tmp_path_factory.mktemp("cnn") / "run"
    args = tiny_fit_args(shared_archive, out)
    args[args.index("--epochs") + 1] = "1"
    run_module("trainer.fit", *args, timeout=300, env={"OMP_NUM_THREADS": "1"})
    return out


def _leftovers(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}."))


def _cheap_options(**changes) -> export.ExportOptions:
    return export.ExportOptions(
        **{"int8": False, "parity_images": 8, "calibration_images": 32, "eval_images": 100, **changes}
    )


REAL_WRITERS = {"onnx": export.export_onnx, "torchscript": export.export_torchscript}  # before any monkeypatch


def _write_then_nudge_onnx(model: nn.Module, path: Path) -> None:
    """The real ONNX writer, then the file's largest weight tensor nudged by 5% of its std (in place)."""
    REAL_WRITERS["onnx"](model, path)
    _perturbed_onnx(path, path, relative=0.05)


def _write_torchscript_with_a_changed_buffer(model: nn.Module, path: Path) -> None:
    """The real TorchScript writer, given the model with its normalisation mean (a buffer) off by 0.02."""
    altered = copy.deepcopy(model)
    with torch.no_grad():
        altered.mean.add_(0.02)
    REAL_WRITERS["torchscript"](altered, path)


ALTERED_WRITERS = {
    "onnx": ("export_onnx", _write_then_nudge_onnx),
    "torchscript": ("export_torchscript", _write_torchscript_with_a_changed_buffer),
}


@pytest.mark.parametrize("kind", sorted(ALTERED_WRITERS))
def test_export_main_exits_3_when_an_artifact_differs_from_the_eager_model(
    kind: str,
    cnn_run: Path,
    shared_archive: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The gate loads each artifact as written and compares it with the eager model: an artifact that differs
    (ONNX weights nudged after writing; TorchScript with a changed buffer) fails the export with exit status 3,
    naming the artifact and the batch size, and nothing is written."""
    name, altered_writer = ALTERED_WRITERS[kind]
    monkeypatch.setattr(export, name, altered_writer)
    out = tmp_path / "model"
    argv = [str(cnn_run), "--out", str(out), "--data", str(shared_archive), "--no-int8", "--parity-images", "8",
            "--eval-images", "100"]  # fmt: skip
    with caplog.at_level(logging.ERROR, logger="trainer.export"):
        assert export.main(argv) == 3, caplog.text
    assert f"parity gate failed, nothing written: {kind}: batch size 1: logits differ by up to" in caplog.text
    assert not out.exists()
    assert _leftovers(tmp_path, "model") == [], "the staging folder was left behind"


def test_export_checkpoint_failed_fp32_gate_keeps_the_existing_folder(
    cnn_run: Path, shared_archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "manifest.json").write_text('{"previous": true}')
    monkeypatch.setattr(export, "export_onnx", _write_then_nudge_onnx)
    with pytest.raises(ParityError, match=r"^onnx: batch size 1: logits differ by up to"):
        export.export_checkpoint(cnn_run, out, str(shared_archive), _cheap_options(), force=True, command="pytest")
    assert [p.name for p in out.iterdir()] == ["manifest.json"]
    assert (out / "manifest.json").read_text() == '{"previous": true}', (
        "--force replaced the folder before the gates passed"
    )
    assert _leftovers(tmp_path, "model") == []


def test_export_checkpoint_failed_int8_gate_writes_nothing(
    cnn_run: Path, shared_archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "model"
    monkeypatch.setattr(export, "INT8_MAX_ACCURACY_DROP", -1.0)
    with pytest.raises(ParityError, match=r"^onnx_int8: accuracy .* points below fp32 ONNX"):
        export.export_checkpoint(
            cnn_run, out, str(shared_archive), _cheap_options(int8=True), force=False, command="pytest"
        )
    assert not out.exists()
    assert _leftovers(tmp_path, "model") == []


def test_export_main_force_replaces_an_existing_folder(cnn_run: Path, shared_archive: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.txt").write_text("from an older export")
    argv = [str(cnn_run), "--out", str(out), "--data", str(shared_archive), "--no-int8", "--parity-images", "8",
            "--eval-images", "100", "--force"]  # fmt: skip
    assert export.main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert {p.name for p in out.iterdir()} == {"manifest.json", "model.onnx", "model.ts", *manifest["documents"]}
    assert manifest["architecture"] == "baseline_cnn" and set(manifest["artifacts"]) == {"onnx", "torchscript"}
    assert _leftovers(tmp_path, "model") == []


def test_export_cli_refuses_an_existing_folder_without_force(cnn_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("keep")
    result = run_module("trainer.export", str(cnn_run), "--out", str(out), check=False, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"output folder {str(out)!r} exists; pass --force" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def _edited_checkpoint(cnn_run: Path, tmp_path: Path, edit: Callable[[dict], None]) -> Path:
    state = torch.load(cnn_run / "checkpoint.pt", map_location="cpu", weights_only=True)
    edit(state)
    path = tmp_path / "edited.pt"
    torch.save(state, path)
    return path


def _rename_key(state: dict) -> None:
    state["model"]["fc3.kernel"] = state["model"].pop("fc3.weight")


def _reshape_key(state: dict) -> None:
    state["model"]["fc3.weight"] = state["model"]["fc3.weight"][:5]


EDITS: dict[str, tuple[Callable[[dict], None], str]] = {
    "unknown_architecture": (
        lambda s: s.update(model_name="resnet1000"),
        "holds architecture 'resnet1000', which this version does not know; known: fast_resnet",
    ),
    "missing_key": (
        lambda s: s["model"].pop("fc3.bias"),
        "does not fit architecture 'baseline_cnn': missing ['fc3.bias']",
    ),
    "renamed_key": (
        _rename_key,
        "does not fit architecture 'baseline_cnn': missing ['fc3.weight'], unexpected ['fc3.kernel']",
    ),
    "wrong_shape": (_reshape_key, "does not fit architecture 'baseline_cnn'"),
    "not_a_checkpoint": (lambda s: s.pop("model_name"), "is not a trainer checkpoint"),
}


@pytest.mark.parametrize("case", sorted(EDITS))
def test_export_main_rejects_a_bad_checkpoint_with_a_clear_message(
    case: str, cnn_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    edit, expected = EDITS[case]
    checkpoint = _edited_checkpoint(cnn_run, tmp_path, edit)
    with caplog.at_level(logging.ERROR, logger="trainer.export"):
        assert export.main([str(checkpoint), "--out", str(tmp_path / "out")]) == 2
    assert expected in caplog.text and str(checkpoint) in caplog.text, caplog.text
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["missing", "random_bytes", "truncated"])
def test_export_main_rejects_a_missing_or_unreadable_checkpoint(
    case: str, cnn_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    checkpoint = tmp_path / "checkpoint.pt"
    if case == "random_bytes":
        checkpoint.write_bytes(np.random.default_rng(0).bytes(4096))
    elif case == "truncated":
        checkpoint.write_bytes((cnn_run / "checkpoint.pt").read_bytes()[:5000])
    with caplog.at_level(logging.ERROR, logger="trainer.export"):
        assert export.main([str(checkpoint), "--out", str(tmp_path / "out")]) == 2
    expected = "no checkpoint at" if case == "missing" else "cannot read checkpoint"
    assert expected in caplog.text and str(checkpoint) in caplog.text, caplog.text
    assert not (tmp_path / "out").exists()


def test_export_main_missing_checkpoint_exits_nonzero_as_a_process(tmp_path: Path) -> None:
    result = run_module("trainer.export", str(tmp_path / "no-run"), "--out", str(tmp_path / "out"), check=False)
    assert result.returncode == 2 and "no checkpoint at" in result.stderr and str(tmp_path / "no-run") in result.stderr


def test_load_trained_model_returns_an_eval_mode_module(cnn_run: Path) -> None:
    model, state, _ = export.load_trained_model(cnn_run)
    assert isinstance(model, NormalizedModel) and state.model_name == "baseline_cnn"
    assert not any(module.training for module in model.modules())


def _model_with_train_mode_behaviour() -> nn.Module:
    """BatchNorm with non-trivial running statistics and dropout: train and eval outputs clearly differ."""
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 4)
    return NormalizedModel(net, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])


WRITERS: dict[str, tuple[Callable[[nn.Module, Path], None], Callable[[Path], Runner]]] = {
    "onnx": (export.export_onnx, lambda path: onnx_runner(path, threads=1)),
    "torchscript": (export.export_torchscript, _torchscript),
    "torch_export": (export.export_pt2, _exported_program),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_export_writers_export_eval_mode_from_a_model_left_in_train_mode(writer: str, tmp_path: Path) -> None:
    model = _model_with_train_mode_behaviour()
    x = torch.rand(6, 3, 32, 32)
    with torch.no_grad():
        eval_out = copy.deepcopy(model).eval()(x).numpy()
        train_out = copy.deepcopy(model).train()(x).numpy()
    assert np.abs(eval_out - train_out).max() > 0.1
    write, load = WRITERS[writer]
    path = tmp_path / f"model.{writer}"
    write(model.train(), path)
    runner = load(path)
    np.testing.assert_allclose(runner(x.numpy()), eval_out, rtol=1e-4, atol=1e-5)


def test_export_onnx_writes_gelu_as_one_node_that_int8_keeps_whole(tmp_path: Path) -> None:
    """GELU (fast_resnet's activation) is one ONNX node, not its erf formula, in fp32 and INT8 alike."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)
    )
    fp32, int8 = tmp_path / "model.onnx", tmp_path / "model.int8.onnx"
    export.export_onnx(NormalizedModel(net, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]).eval(), fp32)
    export.export_int8(fp32, int8, np.random.default_rng(0).random((64, 3, 32, 32), dtype=np.float32))
    for path in (fp32, int8):
        ops = [node.op_type for node in onnx.load(str(path)).graph.node]
        assert ops.count("Gelu") == 1 and "Erf" not in ops, f"{path.name}: {ops}"


# ------------------------------------------------------------------ what each file says about itself, portability


def test_export_onnx_files_describe_themselves_from_the_manifests_facts(exported_model: Path, manifest: dict) -> None:
    """A user who takes only model.onnx still has the class names and the input contract (issue 20)."""
    import onnxruntime

    for kind in ("onnx", "onnx_int8"):
        session = onnxruntime.InferenceSession(str(exported_model / ARTIFACT_FILES[kind]))
        meta = session.get_modelmeta().custom_metadata_map
        assert json.loads(meta["class_names"]) == manifest["class_names"], kind
        assert json.loads(meta["input_contract"]) == manifest["input"], kind
        assert meta["architecture"] == manifest["architecture"] and meta["name"] == manifest["name"]


def test_export_int8_leaves_no_quantised_tensor_without_a_valid_axis(exported_model: Path) -> None:
    """OpenCV 4.x refuses a DequantizeLinear whose per-channel or default axis (1) does not fit its tensor: the
    exporter keeps the nodes with 1-D or scalar weights in float. ONNX Runtime's defaults wrote such nodes
    (BatchNormalization's scale and shift, the scalar logit scale)."""
    graph = onnx.load(str(exported_model / "model.int8.onnx")).graph
    ranks = {init.name: len(init.dims) for init in graph.initializer}
    consumer = {name: node.op_type for node in graph.node for name in node.input}
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in ranks:
            continue
        rank, scale_rank = ranks[node.input[0]], ranks.get(node.input[1], 0)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        assert scale_rank == 0 or -rank <= axis < rank, (node.name, rank, axis)
        if rank <= 1:  # only biases, quantised with their weights' scales; no 1-D or scalar weight elsewhere
            assert consumer[node.output[0]] in ("Conv", "Gemm"), (node.name, consumer[node.output[0]])


def test_export_int8_keeps_the_stem_conv_in_float(exported_model: Path) -> None:
    """The first Conv (it reads the image) takes float weights in the INT8 file, every later Conv int8 ones:
    quantising the stem cost 0.70 point on the validation split against 0.12 in float (trainer/formats.py)."""
    graph = onnx.load(str(exported_model / "model.int8.onnx")).graph
    produced_by = {out: node.op_type for node in graph.node for out in node.output}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    weight_sources = [produced_by.get(conv.input[1], "initializer") for conv in convs]
    assert weight_sources[0] == "initializer", weight_sources
    assert set(weight_sources[1:]) == {"DequantizeLinear"}, weight_sources


def test_export_manifest_records_portability_in_the_installed_runtimes(manifest: dict) -> None:
    """Each ONNX file was run in OpenVINO and OpenCV (the CI installs both): each installed runtime's verdict is
    recorded with its version (a runtime that is not installed says so, never passed). OpenCV 5.1 refuses this
    ResNet-20's INT8 graph (an assertion in its new engine; 4.12 loads it): the record says refused."""
    import importlib.util

    for kind in ("onnx", "onnx_int8"):
        results = manifest["portability"][kind]
        assert set(results) == {"openvino", "opencv"}, results
        for runtime, module in (("openvino", "openvino"), ("opencv", "cv2")):
            result = results[runtime]
            if importlib.util.find_spec(module) is None:
                assert result["status"] == "not checked", result
                continue
            assert result["status"] in ("passed", "failed", "refused") and result["version"], (kind, runtime, result)
            if result["status"] != "refused":
                passed = result["max_abs_logit_diff"] <= result["tolerance"]["max_abs_logit_diff"]
                assert (result["status"] == "passed") == passed, result
    assert manifest["portability"]["onnx"]["openvino"]["status"] in ("passed", "not checked")  # fp32: every runtime


def test_the_bundled_model_passed_every_portability_check(default_model: Path) -> None:
    """The bundle was exported with --strict-portability: every ONNX file passed in every installed runtime."""
    manifest = json.loads((default_model / "manifest.json").read_text())
    for kind in ("onnx", "onnx_int8"):
        for runtime, result in manifest["portability"][kind].items():
            assert result["status"] == "passed", (kind, runtime, result)


def test_export_model_card_states_the_manifests_figures(exported_model: Path, manifest: dict) -> None:
    card = (exported_model / "MODEL_CARD.md").read_text()
    for kind, accuracy in manifest["test_accuracy"].items():
        if kind in manifest["artifacts"]:
            assert f"| {kind} | `{manifest['artifacts'][kind]['file']}` |" in card and f"{100 * accuracy:.2f}%" in card
    for name in manifest["class_names"]:
        assert f"| {name} | {100 * manifest['per_class_test_accuracy']['onnx'][name]:.1f}%" in card
    assert manifest["commands"]["export"] in card and manifest["commands"]["train"][0] in card
    assert "1024x768" in card and "no 'none of the above'" in card
    for picture in ("predictions.png", "confusion.png"):
        assert (exported_model / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({picture})" in card
