"""The input contract of every exported artifact, defined once and written into the manifest.

Exported models take float32 NCHW RGB images with values in [0, 1] (pixel / 255);
the per-channel normalisation is inside the graph. How an arbitrary image is
brought to that form (orientation, colour mode, alpha, resizing) is recorded
here too, so the service and the offline predictor build their input from the
manifest alone.
"""

from __future__ import annotations

import torch
from torch import nn

CONTRACT_VERSION = 1
INPUT_NAME = "image"
OUTPUT_NAME = "logits"


def input_contract(mean: list[float], std: list[float], height: int = 32, width: int = 32) -> dict:
    """The contract as written to `manifest.json` (see the module docstring)."""
    return {
        "version": CONTRACT_VERSION,
        "input_name": INPUT_NAME,
        "layout": "NCHW",
        "dtype": "float32",
        "shape": [None, 3, height, width],
        "color_order": "RGB",
        "value_range": [0.0, 1.0],
        "pixel_divisor": 255.0,  # value = uint8 pixel / pixel_divisor
        "normalization_in_graph": True,
        "normalization": {"mean": list(mean), "std": list(std)},
        "preprocess": {
            "exif_transpose": True,
            "alpha": "composite_on_white",
            "sixteen_bit": "scale_to_8_bit",
            "resize": "center_crop_to_aspect_then_resize",
            "resample": "bicubic",
            "note": "images already height x width are used unchanged",
        },
        "output_name": OUTPUT_NAME,
        "output": "logits (apply softmax for probabilities)",
    }


class NormalizedModel(nn.Module):
    """Wraps a trained model so that it takes the contract's [0, 1] input and normalises inside."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model((image - self.mean) / self.std)


class MirrorAveraged(nn.Module):
    """Test-time augmentation inside the graph: the mean of the logits of the image and its mirror."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.model(image) + self.model(image.flip(-1)))
