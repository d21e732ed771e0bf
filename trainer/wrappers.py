"""Modules that put the input contract (bundle.contract) and test-time augmentation inside an exported graph."""

from __future__ import annotations

import torch
from torch import nn

from bundle.contract import CHANNELS


class NormalizedModel(nn.Module):
    """Wraps a trained model so that it takes the contract's [0, 1] input and normalises inside."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, CHANNELS, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, CHANNELS, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model((image - self.mean) / self.std)


class MirrorAveraged(nn.Module):
    """Test-time augmentation inside the graph: the mean of the logits of the image and its mirror."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.model(image) + self.model(image.flip(-1)))
