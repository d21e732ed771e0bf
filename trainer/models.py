"""Model zoo: every network `trainer.fit` can train, registered by name.

All models take a normalised float batch (N, 3, H, W) at the input contract's size (bundle.contract:
32 x 32 for CIFAR-10) and return logits
(N, num_classes). None has data-dependent Python control flow in `forward`,
so each one traces, scripts and exports to ONNX as it is.

    >>> from trainer.models import build_model, MODEL_NAMES
    >>> build_model("resnet18", num_classes=10)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_MODEL = "fast_resnet_256"  # why: trainer/config.py, above RECIPES
INIT_SCHEMES = ("default", "kaiming", "xavier")


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[[int], nn.Module]
    summary: str


MODELS: dict[str, ModelSpec] = {}


def _register(name: str, summary: str):
    def wrap(build: Callable[[int], nn.Module]) -> Callable[[int], nn.Module]:
        MODELS[name] = ModelSpec(build, summary)
        return build

    return wrap


def build_model(name: str, num_classes: int = 10) -> nn.Module:
    """Build the registered model `name` with a `num_classes`-way head."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return MODELS[name].build(num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------
# The default: a fast residual net after airbench94 (K. Jordan, 2024) and
# D. Page's ResNet-9. Three conv groups of widths 64/256/256, each
# conv -> max-pool -> BN -> GELU followed by a residual conv-BN-GELU, behind a
# frozen 2x2 patch-whitening conv. Max-pool before BN makes the BN 4x cheaper.


def _fast_batchnorm(channels: int) -> nn.BatchNorm2d:
    # airbench: BN momentum 0.6 in its convention (0.4 in torch's), a tiny eps,
    # and the scale frozen at 1 so only the shift is learned.
    bn = nn.BatchNorm2d(channels, momentum=0.4, eps=1e-12)
    bn.weight.requires_grad_(False)
    return bn


class _FastBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, deep: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.norm1 = _fast_batchnorm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = _fast_batchnorm(c_out)
        # airbench96: a third conv, the residual spanning the last two. It runs after the pool, on a quarter
        # of conv1's positions: 0.96 against 0.71 GFLOP per training image at widths 64/256/256.
        self.deep = deep
        if deep:
            self.conv3 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
            self.norm3 = _fast_batchnorm(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(F.max_pool2d(self.conv1(x), 2)))
        if not self.deep:
            return x + F.gelu(self.norm2(self.conv2(x)))
        y = F.gelu(self.norm2(self.conv2(x)))
        return F.gelu(x + self.norm3(self.conv3(y)))


class FastResNet(nn.Module):
    """Patch-whitening stem, three residual groups, max-pooled linear head."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (64, 256, 256), deep: bool = False):
        super().__init__()
        # 2x2 patches have 12 dims; the stem holds their whitened eigenbasis
        # and its negation (24 filters). Set from data by `init_from_data`.
        self.whiten = nn.Conv2d(3, 24, kernel_size=2, bias=True)
        self.whiten.weight.requires_grad_(False)
        self.blocks = nn.Sequential(
            _FastBlock(24, widths[0], deep),
            _FastBlock(widths[0], widths[1], deep),
            _FastBlock(widths[1], widths[2], deep),
        )
        self.head = nn.Linear(widths[2], num_classes, bias=False)
        # airbench scales logits down (1/9): keeps early softmax outputs soft.
        self.logit_scale = 1 / 9
        self._init_identity()

    def _init_identity(self) -> None:
        # Identity ("Dirac") init of the first in-channels of every conv: the
        # net starts close to a stack of identities, which trains faster.
        for module in self.blocks.modules():
            if isinstance(module, nn.Conv2d):
                w = module.weight.data
                c = min(w.shape[0], w.shape[1])
                torch.nn.init.dirac_(w[:c])

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the whitening stem from the eigenvectors of 2x2 training patches.

        `images` is a normalised float batch (a few thousand images suffice).
        """
        patches = images.float().unfold(2, 2, 1).unfold(3, 2, 1)  # N,C,H',W',2,2
        patches = patches.transpose(1, 3).reshape(-1, 3 * 2 * 2)
        patches = patches - patches.mean(dim=0)
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        # Patches were flattened in (C, kh, kw) order, so each eigenvector reshapes straight to a filter.
        filters = (eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]).reshape(12, 3, 2, 2)
        self.whiten.weight.copy_(torch.cat([filters, -filters]))
        self.whiten.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.whiten(x))
        x = self.blocks(x)
        x = torch.amax(x, dim=(2, 3))
        return self.head(x) * self.logit_scale


@_register("fast_resnet", "whitening stem + 3 residual groups 48/96/192, ~0.66M params (the small one)")
def _fast_resnet(num_classes: int) -> nn.Module:
    return FastResNet(num_classes, widths=(48, 96, 192))


@_register("fast_resnet_256", "default: fast_resnet at airbench94's widths 64/256/256, ~2.0M params")
def _fast_resnet_256(num_classes: int) -> nn.Module:
    return FastResNet(num_classes, widths=(64, 256, 256))


@_register("fast_resnet_320", "fast_resnet at widths 80/320/320, ~3.1M params (fp32 ONNX ~12 MB)")
def _fast_resnet_320(num_classes: int) -> nn.Module:
    return FastResNet(num_classes, widths=(80, 320, 320))


@_register("fast_resnet_deep", "fast_resnet_256 with airbench96's 3 convs per group, ~3.2M params (fp32 ONNX ~13 MB)")
def _fast_resnet_deep(num_classes: int) -> nn.Module:
    return FastResNet(num_classes, widths=(64, 256, 256), deep=True)


@_register("fast_resnet_512", "fast_resnet at airbench96-like widths 128/384/512, ~6.1M params")
def _fast_resnet_512(num_classes: int) -> nn.Module:
    return FastResNet(num_classes, widths=(128, 384, 512))


# --------------------------------------------------------------------------
# CIFAR ResNet-18/34 (3x3 stem, no max-pool), as in kuangliu/pytorch-cifar.


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-18/34 for 32x32 inputs; `deep_stem` uses three 3x3 convs (Bag of Tricks)."""

    def __init__(self, blocks_per_stage: list[int], num_classes: int = 10, deep_stem: bool = False):
        super().__init__()
        if deep_stem:
            self.stem = nn.Sequential(*_conv_bn_relu(3, 32), *_conv_bn_relu(32, 32), *_conv_bn_relu(32, 64))
        else:
            self.stem = nn.Sequential(*_conv_bn_relu(3, 64))
        layers: list[nn.Module] = []
        c_in = 64
        for stage, n_blocks in enumerate(blocks_per_stage):
            c_out = 64 * 2**stage
            for i in range(n_blocks):
                layers.append(BasicBlock(c_in, c_out, stride=2 if stage > 0 and i == 0 else 1))
                c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@_register("resnet18", "CIFAR ResNet-18 (3x3 stem, no max-pool), ~11.2M params")
def _resnet18(num_classes: int) -> nn.Module:
    return CifarResNet([2, 2, 2, 2], num_classes)


@_register("resnet18_deepstem", "ResNet-18 with a three-conv 3x3 stem (Bag of Tricks)")
def _resnet18_deepstem(num_classes: int) -> nn.Module:
    return CifarResNet([2, 2, 2, 2], num_classes, deep_stem=True)


@_register("resnet34", "CIFAR ResNet-34 (3x3 stem, no max-pool), ~21.3M params")
def _resnet34(num_classes: int) -> nn.Module:
    return CifarResNet([3, 4, 6, 3], num_classes)


@_register("resnet34_deepstem", "ResNet-34 with a three-conv 3x3 stem (Bag of Tricks)")
def _resnet34_deepstem(num_classes: int) -> nn.Module:
    return CifarResNet([3, 4, 6, 3], num_classes, deep_stem=True)


# --------------------------------------------------------------------------
# He et al. 2015 CIFAR ResNets (6n+2 layers, 16/32/64 channels, option-A
# shortcuts: stride-2 subsampling and zero-padded channels, no parameters).


class _HeBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn_relu(c_in, c_out, stride),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.stride = stride
        self.pad_channels = c_out - c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x[:, :, :: self.stride, :: self.stride]
        if self.pad_channels:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.pad_channels))
        return F.relu(self.body(x) + shortcut)


class HeResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"He et al. CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        layers: list[nn.Module] = [*_conv_bn_relu(3, 16)]
        c_in = 16
        for stage, c_out in enumerate((16, 32, 64)):
            for i in range(n):
                layers.append(_HeBlock(c_in, c_out, stride=2 if stage > 0 and i == 0 else 1))
                c_in = c_out
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


for _depth, _params in ((20, "0.27M"), (32, "0.46M"), (56, "0.85M")):
    _register(f"resnet{_depth}", f"He et al. CIFAR ResNet-{_depth}, {_params} params")(
        lambda num_classes, depth=_depth: HeResNet(depth, num_classes)
    )


# --------------------------------------------------------------------------
# D. Page's DAWNBench ResNet-9 (~6.57M params).


class _Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(*_conv_bn_relu(channels, channels), *_conv_bn_relu(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResNet9(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(3, 64),
            *_conv_bn_relu(64, 128),
            nn.MaxPool2d(2),
            _Residual(128),
            *_conv_bn_relu(128, 256),
            nn.MaxPool2d(2),
            *_conv_bn_relu(256, 512),
            nn.MaxPool2d(2),
            _Residual(512),
        )
        self.fc = nn.Linear(512, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.amax(self.features(x), dim=(2, 3))
        return self.fc(x) * 0.125


@_register("resnet9", "D. Page's DAWNBench ResNet-9, ~6.57M params")
def _resnet9(num_classes: int) -> nn.Module:
    return ResNet9(num_classes)


# --------------------------------------------------------------------------
# The seed notebook's baseline (the PyTorch tutorial CNN), for comparison.


class BaselineCNN(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


@_register("baseline_cnn", "the seed notebook's CNN (conv6-conv16-fc120-fc84), ~62K params")
def _baseline_cnn(num_classes: int) -> nn.Module:
    return BaselineCNN(num_classes)


MODEL_NAMES = tuple(MODELS)


def apply_init(model: nn.Module, scheme: str) -> None:
    """Re-initialise trainable conv/linear weights: 'default' keeps PyTorch's (or the model's own)."""
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"unknown init {scheme!r}; choose one of: {', '.join(INIT_SCHEMES)}")
    if scheme == "default":
        return
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and module.weight.requires_grad:
            if scheme == "kaiming":
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            else:
                nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
