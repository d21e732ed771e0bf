"""How the exporter writes each model format (trainer/export.py chooses and gates them; bundle.runtime runs them).

ONNX (opset 20, dynamic batch, checked by onnx.checker), TorchScript (frozen trace), torch.export programs,
static INT8 ONNX made from the fp32 file, and the metadata each ONNX file carries about itself.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from bundle.contract import CHANNELS, IMAGE_HEIGHT, IMAGE_WIDTH, INPUT_NAME, OUTPUT_NAME

# 20: GELU is one node (Gelu) instead of five (Div, Erf, Add, Mul, Mul), so ONNX Runtime runs one kernel and
# INT8 quantisation leaves it whole: the bundled fast_resnet_256 re-exported at 20 ran INT8 11% faster per
# image (0.357 vs 0.400 ms at batch 16, one thread), fp32 2-6% faster; INT8 test accuracy 90.00 vs 90.05%
# (benchmarks/README.md, "Export"). OpenCV 4.12 and 5.x also crash on the opset-18 form (issue 20).
OPSET = 20
EXAMPLE_SHAPE = (2, CHANNELS, IMAGE_HEIGHT, IMAGE_WIDTH)  # batch >= 2: a batch of 1 would specialise the dimension


def export_onnx(model: torch.nn.Module, path: Path, opset: int = OPSET) -> None:
    """fp32 ONNX with a dynamic batch dimension, checked by onnx.checker (full check)."""
    import onnx

    model.eval()
    example = torch.rand(*EXAMPLE_SHAPE)
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=True,
            opset_version=opset,
            external_data=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={"image": {0: batch}},
            verbose=False,
        )
    proto = onnx.load(str(path))
    got = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if got != opset:  # asking for < 18 silently yields 18
        raise RuntimeError(f"ONNX export produced opset {got}, expected {opset}")
    onnx.checker.check_model(str(path), full_check=True)


def export_torchscript(model: torch.nn.Module, path: Path) -> None:
    model.eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*TorchScript.*deprecated.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..*deprecated.*", category=FutureWarning)
        traced = torch.jit.trace(model, torch.rand(1, *EXAMPLE_SHAPE[1:]))
        torch.jit.save(torch.jit.freeze(traced), str(path))


def export_pt2(model: torch.nn.Module, path: Path) -> None:
    program = torch.export.export(
        model.eval(), (torch.rand(*EXAMPLE_SHAPE),), dynamic_shapes={"image": {0: torch.export.Dim("batch", min=1)}}
    )
    torch.export.save(program, str(path))


def export_int8(
    fp32_path: Path,
    path: Path,
    calibration: np.ndarray,
    *,
    stem_in_float: bool = True,
    head_in_float: bool = False,
    calibration_method: str = "MinMax",
) -> None:
    """Static QDQ INT8 (per-channel int8 weights, uint8 activations) calibrated on training images. Nodes whose
    weights are 1-D or scalars (BatchNormalization's scale and shift, the scalar logit scale) stay in float:
    ONNX Runtime quantises their weights with a per-channel axis those tensors lack, which OpenCV 4.x refuses
    ("axis >= -dims && axis < dims"), and they cost a few multiply-adds per channel either way. The stem (the first
    Conv, which reads the normalised image) stays in float too: see `_stem_conv`. The keyword options are the
    alternatives benchmarks/int8_calibration.py measures on a validation split; the defaults are its choice
    (`calibration_method`: MinMax, Entropy or Percentile, as in onnxruntime's CalibrationMethod)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(np.array_split(calibration, max(1, len(calibration) // 64)))

        def get_next(self) -> dict | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    prepared = path.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
    graph = onnx.load(str(prepared)).graph
    small = {init.name for init in graph.initializer if len(init.dims) <= 1}
    in_float = [n.name for n in graph.node if n.op_type not in ("Conv", "Gemm") and small & set(n.input)]
    if stem_in_float:
        in_float.append(_stem_conv(graph))
    if head_in_float:
        in_float += [n.name for n in graph.node if n.op_type == "Gemm"]
    # reduce_range: 7-bit weights. Without it, x86 CPUs lacking VNNI (AVX2-only) saturate in
    # VPMADDUBSW: a ResNet-20 kept only 70% top-1 agreement with fp32 on this project's AVX2 machine
    # (94% with reduce_range); see ONNX Runtime's quantization docs, "reduce_range".
    quantize_static(
        str(prepared),
        str(path),
        _Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=in_float,
        calibrate_method=CalibrationMethod[calibration_method],
    )
    prepared.unlink()


def _stem_conv(graph) -> str:
    """The first Conv in graph order: the one that reads the (normalised) image.

    Quantised, its input is the image re-quantised to uint8 on a grid that does not match the 256 pixel levels,
    and fast_resnet's whitening filters (scaled by 1/sqrt of each 2x2-patch eigenvalue: weights up to 16, against
    0.3 in the later convs) amplify that rounding noise. Measured on fast_resnet_320 trained on 45,000 images,
    judged on the 5,000 validation images (2026-12-06): INT8 0.70 point below fp32 with the stem quantised, 0.12
    with it in float (2048 calibration images instead of 512: 0.30; percentile calibration: 0.48; the head in
    float as well: 0.06). It is the smallest conv of every model here (3 input channels): float costs little."""
    return next(node.name for node in graph.node if node.op_type == "Conv")


def describe_onnx(path: Path, metadata: dict[str, str]) -> None:
    """Write `metadata` into the ONNX file's metadata_props (ONNX Runtime: `get_modelmeta().custom_metadata_map`),
    so that the file alone still says its classes and input contract."""
    import onnx

    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, metadata)
    onnx.save(proto, str(path))
