"""The input contract of every exported model, defined once and written into its manifest.

Exported models take float32 NCHW RGB images with values in [0, 1] (uint8 pixel
/ PIXEL_DIVISOR); the per-channel normalisation is inside the graph. How any
image file becomes such an input (orientation, colour mode, alpha, 16-bit
scaling, resizing) is recorded here too, so the service and the offline
predictor build their input from the manifest alone. The trainer uses the same
constants, so a fact such as the 32 x 32 size is stated nowhere else.
"""

from __future__ import annotations

CONTRACT_VERSION = 1
SUPPORTED_CONTRACT_VERSIONS = (1,)
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
IMAGE_HEIGHT = IMAGE_WIDTH = 32
CHANNELS = 3  # RGB
PIXEL_DIVISOR = 255.0  # model input = uint8 pixel / PIXEL_DIVISOR, in [0, 1]

PREPROCESS_RULES = {
    "exif_transpose": True,
    "alpha": "composite_on_white",
    "sixteen_bit": "scale_to_8_bit",
    "resize": "center_crop_to_aspect_then_resize",
    "resample": "bicubic",
    # JPEGs at least 8x larger than the crop they feed are decoded at 1/2, 1/4 or 1/8 scale by the JPEG
    # decoder (DCT scaling), never below 4x the crop, then resized as above: an 8,000 x 5,000 photo costs a
    # sixty-fourth of the decoding, and the 32 x 32 result is the same up to rounding.
    "large_jpeg": "dct_downscale_to_4x",
    "note": "images already height x width are used unchanged",
}
OPTIONAL_RULES = ("large_jpeg",)  # absent from manifests written before it was recorded: the same behaviour
CONTRACT_KEYS = (
    "version",
    "input_name",
    "layout",
    "dtype",
    "shape",
    "color_order",
    "value_range",
    "pixel_divisor",
    "normalization_in_graph",
    "normalization",
    "preprocess",
    "output_name",
)


def input_contract(mean: list[float], std: list[float]) -> dict:
    """The contract as written to `manifest.json` (see the module docstring); mean/std in [0, 1] units."""
    return {
        "version": CONTRACT_VERSION,
        "input_name": INPUT_NAME,
        "layout": "NCHW",
        "dtype": "float32",
        "shape": [None, CHANNELS, IMAGE_HEIGHT, IMAGE_WIDTH],
        "color_order": "RGB",
        "value_range": [0.0, 1.0],
        "pixel_divisor": PIXEL_DIVISOR,
        "normalization_in_graph": True,
        "normalization": {"mean": [float(m) for m in mean], "std": [float(s) for s in std]},
        "preprocess": dict(PREPROCESS_RULES),
        "output_name": OUTPUT_NAME,
        "output": "logits (apply softmax for probabilities)",
    }


def contract_problems(contract: object) -> list[str]:
    """What is wrong with a manifest's `input` entry (empty when this version can follow it)."""
    if not isinstance(contract, dict):
        return [f"'input' must be an object, got {type(contract).__name__}"]
    missing = [key for key in CONTRACT_KEYS if key not in contract]
    if missing:
        return [f"'input' lacks {missing}"]
    problems = []
    if contract["version"] not in SUPPORTED_CONTRACT_VERSIONS:
        problems.append(
            f"input contract version {contract['version']!r} is not one this version reads "
            f"({', '.join(map(str, SUPPORTED_CONTRACT_VERSIONS))}); upgrade the serving code or re-export the model"
        )
    shape = contract["shape"]
    if not (isinstance(shape, list) and len(shape) == 4 and all(isinstance(n, int) and n > 0 for n in shape[1:])) or (
        shape[1] != CHANNELS
    ):
        problems.append(f"'input.shape' must be [null, {CHANNELS}, height, width], got {shape!r}")
    if contract["layout"] != "NCHW" or contract["dtype"] != "float32" or contract["color_order"] != "RGB":
        problems.append(
            f"input layout/dtype/colour order must be NCHW/float32/RGB, got "
            f"{contract['layout']!r}/{contract['dtype']!r}/{contract['color_order']!r}"
        )
    divisor = contract["pixel_divisor"]
    if not isinstance(divisor, int | float) or isinstance(divisor, bool) or divisor <= 0:
        problems.append(f"'input.pixel_divisor' must be a positive number, got {divisor!r}")
    rules = contract["preprocess"]
    if not isinstance(rules, dict):
        problems.append(f"'input.preprocess' must be an object, got {type(rules).__name__}")
    else:
        for key, value in PREPROCESS_RULES.items():
            if key == "note" or (key in OPTIONAL_RULES and key not in rules):
                continue
            if rules.get(key) != value:
                problems.append(
                    f"preprocessing rule {key}={rules.get(key)!r} is not supported (this version: {value!r})"
                )
    return problems
