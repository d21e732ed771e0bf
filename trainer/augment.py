"""Batched data augmentation on the training device: no per-image Python.

The whole data set lives on the device as one uint8 (N, 3, H, W) tensor;
each batch is gathered, augmented and normalised there with a handful of
tensor ops (after airbench94 and D. Page's ResNet-9 work).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bundle.contract import PIXEL_DIVISOR


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) pixels -> float32, per-channel standardised (mean/std in [0, 1] pixel units)."""
    return (images.float().div_(PIXEL_DIVISOR) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def random_translate(images: torch.Tensor, pad: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shift every float image by an independent random offset in [-pad, pad] (reflect padding).

    Equivalent to reflect-padding by `pad` and taking a random HxW crop.
    """
    if pad == 0:
        return images
    n, _, h, w = images.shape
    padded = F.pad(images, (pad,) * 4, mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), device=images.device, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), device=images.device, generator=generator)
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]  # N,1,H,1
    cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]  # N,1,1,W
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channel = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def flip_where(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror (left-right) the images whose entry in the boolean `mask` is True."""
    return torch.where(mask.view(-1, 1, 1, 1), images.flip(-1), images)


def cutout(images: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero one random `size` x `size` square per image (DeVries & Taylor 2017); may overlap the border."""
    if size == 0:
        return images
    n, _, h, w = images.shape
    cy = torch.randint(0, h, (n, 1, 1), device=images.device, generator=generator)
    cx = torch.randint(0, w, (n, 1, 1), device=images.device, generator=generator)
    ys = torch.arange(h, device=images.device).view(1, h, 1)
    xs = torch.arange(w, device=images.device).view(1, 1, w)
    inside = ((ys - cy).abs() <= size // 2) & ((xs - cx).abs() <= size // 2)
    if size % 2 == 0:  # even sizes: a [c - s/2, c + s/2) window
        inside = (ys >= cy - size // 2) & (ys < cy + size // 2) & (xs >= cx - size // 2) & (xs < cx + size // 2)
    return images.masked_fill(inside[:, None], 0)


def alternating_flip_mask(flip_bits: torch.Tensor, indices: torch.Tensor, epoch: int) -> torch.Tensor:
    """airbench's "alternating flip": each image gets a fixed random bit; epoch 0 flips the
    images whose bit is set, epoch 1 the others, and so on. Every image is seen both ways
    every two epochs, which beats independent coin flips at short schedules."""
    return flip_bits[indices] ^ bool(epoch % 2)


@dataclass(frozen=True)
class Augmentation:
    """How a run draws and augments its training batches (fixed for the whole run)."""

    batch_size: int  # global: each rank takes batch_size / world_size of every step
    seed: int
    mean: torch.Tensor  # per channel, in [0, 1] pixel units
    std: torch.Tensor
    translate: int = 0  # pixels of random translation (reflect padding); 0 disables
    flip: str = "none"  # alternating, random or none
    flip_bits: torch.Tensor | None = None  # one random bit per image, for alternating flips
    cutout_size: int = 0  # side of the cutout square in pixels; 0 disables
    rank: int = 0
    world_size: int = 1
    channels_last: bool = False


def train_batches(
    images: torch.Tensor, labels: torch.Tensor, aug: Augmentation, *, epoch: int, max_steps: int | None = None
):
    """Yield one epoch of augmented, normalised (inputs, labels) batches for this rank.

    The order and the augmentation depend only on (seed, epoch, rank), so a run
    resumed at an epoch boundary replays exactly what an uninterrupted one does.
    Each global batch of `batch_size` is split across ranks; the last partial
    batch is dropped (an uneven last step would need its own lr scaling).
    """
    device = images.device
    order_gen = torch.Generator(device="cpu").manual_seed(aug.seed * 100_003 + epoch)
    order = torch.randperm(len(images), generator=order_gen).to(device)
    aug_gen = torch.Generator(device=device).manual_seed(aug.seed * 100_003 + epoch * 1_009 + aug.rank + 1)
    steps = len(images) // aug.batch_size
    if max_steps is not None:
        steps = min(steps, max_steps)
    local = aug.batch_size // aug.world_size
    for step in range(steps):
        first = step * aug.batch_size + aug.rank * local
        indices = order[first : first + local]
        batch = normalize(images[indices], aug.mean, aug.std)
        batch = random_translate(batch, aug.translate, aug_gen)
        if aug.flip == "alternating":
            batch = flip_where(batch, alternating_flip_mask(aug.flip_bits, indices, epoch))
        elif aug.flip == "random":
            batch = flip_where(batch, torch.rand(len(batch), device=device, generator=aug_gen) < 0.5)
        batch = cutout(batch, aug.cutout_size, aug_gen)
        if aug.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        yield batch, labels[indices]
