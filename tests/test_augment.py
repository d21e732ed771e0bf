"""Batched augmentation (trainer/augment.py): each op's semantics, and the epoch iterator `train_batches`.

Small synthetic tensors on $TEST_DEVICE (default cpu); images whose pixels encode their
index and label let the tests trace every augmented sample back to its source.
Run: `pytest tests/test_augment.py`.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import TEST_DEVICE

from trainer.augment import (
    Augmentation,
    alternating_flip_mask,
    cutout,
    flip_where,
    normalize,
    random_translate,
    train_batches,
)

DEVICE = torch.device(TEST_DEVICE)
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _reflect_pad(image: torch.Tensor, pad: int) -> torch.Tensor:
    """Reflect padding of one (C, H, W) image by explicit index arithmetic (no F.pad)."""

    def reflect(k: int, size: int) -> int:
        return -k if k < 0 else 2 * (size - 1) - k if k >= size else k

    h, w = image.shape[-2:]
    rows = [reflect(k, h) for k in range(-pad, h + pad)]
    cols = [reflect(k, w) for k in range(-pad, w + pad)]
    return image[:, rows][:, :, cols]


def _find_shifts(original: torch.Tensor, shifted: torch.Tensor, pad: int) -> list[list[tuple[int, int]]]:
    """For every image, the offsets (dy, dx) in [-pad, pad] for which `shifted` is that window of the padded image."""
    h, w = original.shape[-2:]
    found = []
    for image, out in zip(original, shifted, strict=True):
        padded = _reflect_pad(image, pad)
        found.append(
            [
                (dy - pad, dx - pad)
                for dy, dx in itertools.product(range(2 * pad + 1), repeat=2)
                if torch.equal(padded[:, dy : dy + h, dx : dx + w], out)
            ]
        )
    return found


# ------------------------------------------------------------------ random_translate


@pytest.mark.parametrize("pad", [1, 2, 4])
def test_random_translate_is_a_pure_shift_of_the_reflect_padded_image(pad: int) -> None:
    images = torch.randn(300, 3, 10, 12, device=DEVICE)  # non-square: rows and columns must not be swapped
    shifted = random_translate(images, pad, _generator(0))
    assert shifted.shape == images.shape
    shifts = _find_shifts(images, shifted, pad)
    # Random pixels make the matching window unique; every image must match exactly one offset.
    assert all(len(s) == 1 for s in shifts), [i for i, s in enumerate(shifts) if len(s) != 1][:10]
    seen = {s[0] for s in shifts}
    assert all(-pad <= dy <= pad and -pad <= dx <= pad for dy, dx in seen)
    if pad <= 2:  # 300 draws cover all 25 offsets (a miss has probability ~1e-4)
        assert seen == set(itertools.product(range(-pad, pad + 1), repeat=2))
    else:
        assert {dy for dy, _ in seen} == {dx for _, dx in seen} == set(range(-pad, pad + 1))


def test_random_translate_draws_independent_offsets_per_image() -> None:
    images = torch.randn(64, 3, 8, 8, device=DEVICE)
    offsets = [s[0] for s in _find_shifts(images, random_translate(images, 2, _generator(1)), 2)]
    assert len(set(offsets)) > 10


def test_random_translate_pad_zero_is_identity() -> None:
    images = torch.randn(5, 3, 32, 32, device=DEVICE)
    assert torch.equal(random_translate(images, 0, _generator(0)), images)


def test_random_translate_same_generator_seed_gives_same_shifts() -> None:
    images = torch.randn(32, 3, 16, 16, device=DEVICE)
    first = random_translate(images, 2, _generator(7))
    assert torch.equal(first, random_translate(images, 2, _generator(7)))
    assert not torch.equal(first, random_translate(images, 2, _generator(8)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_random_translate_preserves_dtype_and_device(dtype: torch.dtype) -> None:
    images = torch.randn(4, 3, 32, 32, device=DEVICE).to(dtype)
    out = random_translate(images, 2, _generator(0))
    assert out.dtype == dtype and out.device == images.device and out.shape == images.shape


# ------------------------------------------------------------------ flips


def test_flip_where_mirrors_exactly_the_masked_images() -> None:
    images = torch.randn(50, 3, 8, 8, device=DEVICE)
    mask = torch.rand(50, generator=_generator(0), device=DEVICE) < 0.5
    assert 0 < mask.sum() < 50
    out = flip_where(images, mask)
    for image, flipped, masked in zip(images, out, mask.tolist(), strict=True):
        expected = image[:, :, torch.arange(7, -1, -1)] if masked else image
        assert torch.equal(flipped, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_flip_where_preserves_dtype_and_all_or_nothing_masks(dtype: torch.dtype) -> None:
    images = torch.randn(6, 3, 8, 8, device=DEVICE).to(dtype)
    none = flip_where(images, torch.zeros(6, dtype=torch.bool, device=DEVICE))
    every = flip_where(images, torch.ones(6, dtype=torch.bool, device=DEVICE))
    assert none.dtype == every.dtype == dtype and none.device == images.device
    assert torch.equal(none, images)
    assert torch.equal(every, images.flip(-1))


def test_alternating_flip_mask_alternates_per_epoch() -> None:
    flip_bits = torch.rand(100, generator=_generator(0), device=DEVICE) < 0.5
    indices = torch.randperm(100, generator=torch.Generator().manual_seed(0))[:40].to(DEVICE)
    masks = [alternating_flip_mask(flip_bits, indices, epoch) for epoch in range(5)]
    assert masks[0].dtype == torch.bool
    assert torch.equal(masks[0], flip_bits[indices])
    for epoch in range(4):
        # each image is mirrored in exactly one of any two consecutive epochs
        assert torch.equal(masks[epoch + 1], ~masks[epoch])
    assert torch.equal(masks[0], masks[2]) and torch.equal(masks[2], masks[4])
    assert torch.equal(masks[1], masks[3])


# ------------------------------------------------------------------ cutout


def _zero_box(mask: torch.Tensor) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the zeroed pixels of one H x W boolean mask, checking they form a box."""
    rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
    top, bottom, left, right = rows.min().item(), rows.max().item() + 1, cols.min().item(), cols.max().item() + 1
    box = torch.zeros_like(mask)
    box[top:bottom, left:right] = True
    assert torch.equal(mask, box), "the zeroed pixels do not form one rectangle"
    return top, bottom, left, right


@pytest.mark.parametrize("size", [1, 4, 5, 8])
def test_cutout_zeroes_one_square_of_the_given_size(size: int) -> None:
    h = w = 16
    images = torch.rand(200, 3, h, w, device=DEVICE) + 1  # no zero before cutout
    out = cutout(images, size, _generator(0))
    zero = out == 0
    assert torch.equal(zero, zero[:, :1].expand_as(zero)), "cutout must zero all channels of a pixel"
    assert torch.equal(out[~zero], images[~zero]), "pixels outside the square must be untouched"
    inside = clipped = 0
    for mask in zero[:, 0]:
        top, bottom, left, right = _zero_box(mask)
        assert bottom - top <= size and right - left <= size
        if top > 0 and left > 0 and bottom < h and right < w:
            assert (bottom - top, right - left) == (size, size)
            inside += 1
        else:
            clipped += 1
    assert inside > 0, "no square fell fully inside the image"
    if size > 1:
        assert clipped > 0, "squares may overlap the border (centres are drawn over the whole image)"


def test_cutout_size_zero_is_identity() -> None:
    images = torch.rand(3, 3, 32, 32, device=DEVICE)
    assert torch.equal(cutout(images, 0, _generator(0)), images)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cutout_preserves_dtype_and_device(dtype: torch.dtype) -> None:
    images = torch.rand(4, 3, 32, 32, device=DEVICE).to(dtype) + 1
    out = cutout(images, 8, _generator(0))
    assert out.dtype == dtype and out.device == images.device
    assert (out == 0).any()


# ------------------------------------------------------------------ train_batches

N_IMAGES = 300
MEAN = torch.tensor([0.45, 0.5, 0.4], device=DEVICE)
STD = torch.tensor([0.25, 0.2, 0.3], device=DEVICE)


def _coded_images(n: int = N_IMAGES) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images of constant colour: channel 0/1 hold the index (low/high byte), channel 2 the label x 20.
    Translation (reflect padding) and flips leave such images unchanged; cutout covers < 7% of them."""
    labels = (torch.arange(n) * 7) % 10
    codes = torch.stack([torch.arange(n) % 256, torch.arange(n) // 256, labels * 20], 1)
    images = codes[:, :, None, None].expand(n, 3, 32, 32).to(torch.uint8).contiguous()
    return images.to(DEVICE), labels.to(DEVICE)


def _decode(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert the normalisation; the median over pixels ignores a cutout square. Returns (indices, labels)."""
    pixels = (batch.float() * STD.view(1, 3, 1, 1) + MEAN.view(1, 3, 1, 1)) * 255
    codes = pixels.flatten(2).median(2).values.round().long()
    return codes[:, 0] + 256 * codes[:, 1], codes[:, 2] // 20


def _batches(images: torch.Tensor, labels: torch.Tensor, **overrides) -> list[tuple[torch.Tensor, torch.Tensor]]:
    options = dict(
        batch_size=64,
        epoch=0,
        seed=0,
        mean=MEAN,
        std=STD,
        translate=2,
        flip="random",
        flip_bits=torch.zeros(len(images), dtype=torch.bool, device=DEVICE),
        cutout_size=8,
    )
    options = {**options, **overrides}
    epoch, max_steps = options.pop("epoch"), options.pop("max_steps", None)
    return list(train_batches(images, labels, Augmentation(**options), epoch=epoch, max_steps=max_steps))


def test_train_batches_yields_normalised_float_batches_of_the_right_shape() -> None:
    images, labels = _coded_images()
    batches = _batches(images, labels, translate=0, flip="none", cutout_size=0)
    assert len(batches) == N_IMAGES // 64  # the last partial batch is dropped
    for inputs, targets in batches:
        assert inputs.shape == (64, 3, 32, 32) and inputs.dtype == torch.float32 and inputs.device == DEVICE
        assert targets.shape == (64,) and targets.dtype == torch.int64
        indices, _ = _decode(inputs)
        torch.testing.assert_close(inputs, normalize(images[indices], MEAN, STD))


def test_train_batches_respects_max_steps() -> None:
    images, labels = _coded_images()
    assert len(_batches(images, labels, max_steps=2)) == 2
    assert len(_batches(images, labels, max_steps=100)) == N_IMAGES // 64


def test_train_batches_labels_stay_aligned_with_augmented_images() -> None:
    images, labels = _coded_images()
    for epoch in range(2):
        for inputs, targets in _batches(images, labels, epoch=epoch):
            indices, coded_labels = _decode(inputs)
            assert torch.equal(coded_labels, targets)
            assert torch.equal(labels[indices], targets)


def test_train_batches_visits_each_image_at_most_once_per_epoch() -> None:
    images, labels = _coded_images()
    indices = torch.cat([_decode(x)[0] for x, _ in _batches(images, labels)])
    assert len(indices) == (N_IMAGES // 64) * 64
    assert len(set(indices.tolist())) == len(indices)


def test_train_batches_deterministic_for_seed_epoch_and_rank() -> None:
    images = torch.randint(0, 256, (N_IMAGES, 3, 32, 32), dtype=torch.uint8, device=DEVICE)
    labels = torch.randint(0, 10, (N_IMAGES,), device=DEVICE)
    first = _batches(images, labels, epoch=3, seed=5, rank=1, world_size=2)
    again = _batches(images, labels, epoch=3, seed=5, rank=1, world_size=2)
    for (x1, y1), (x2, y2) in zip(first, again, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    for other in ({"epoch": 4}, {"seed": 6}):
        changed = _batches(images, labels, **{"epoch": 3, "seed": 5, "rank": 1, "world_size": 2, **other})
        assert not torch.equal(first[0][0], changed[0][0]), f"{other} did not change the batches"


def test_train_batches_order_differs_across_epochs() -> None:
    images, labels = _coded_images()
    orders = [torch.cat([_decode(x)[0] for x, _ in _batches(images, labels, epoch=e)]) for e in range(3)]
    assert not torch.equal(orders[0], orders[1]) and not torch.equal(orders[1], orders[2])


def test_train_batches_ddp_shards_are_disjoint_and_form_the_global_batch() -> None:
    images, labels = _coded_images()
    common = dict(epoch=2, seed=1)
    global_batches = _batches(images, labels, **common)
    shards = [_batches(images, labels, rank=rank, world_size=2, **common) for rank in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == len(global_batches)
    for (whole, _), (x0, y0), (x1, y1) in zip(global_batches, *shards, strict=True):
        assert x0.shape[0] == x1.shape[0] == 32
        rank0, rank1 = set(_decode(x0)[0].tolist()), set(_decode(x1)[0].tolist())
        assert not rank0 & rank1
        assert rank0 | rank1 == set(_decode(whole)[0].tolist())
        assert torch.equal(labels[_decode(x0)[0]], y0) and torch.equal(labels[_decode(x1)[0]], y1)


def test_train_batches_alternating_flip_mirrors_each_image_every_other_epoch() -> None:
    images, labels = _coded_images()
    images[:, 2, :, :16] = 0  # left half dark, right half bright: a mirrored image shows it swapped
    images[:, 2, :, 16:] = 255
    flip_bits = torch.rand(N_IMAGES, generator=_generator(3), device=DEVICE) < 0.5
    flipped_in: list[dict[int, bool]] = []
    for epoch in range(3):
        seen = {}
        for inputs, _ in _batches(
            images, labels, epoch=epoch, translate=0, cutout_size=0, flip="alternating", flip_bits=flip_bits
        ):
            indices, _ = _decode(inputs[..., :16])  # channels 0/1 are constant: decode from the left half
            for index, left, right in zip(indices.tolist(), inputs[:, 2, 0, 0], inputs[:, 2, 0, -1], strict=True):
                seen[index] = bool(left > right)
        flipped_in.append(seen)
    for index, flipped in flipped_in[0].items():
        assert flipped == bool(flip_bits[index])
    for epoch in (1, 2):
        both = flipped_in[epoch].keys() & flipped_in[epoch - 1].keys()
        assert len(both) > 100
        assert all(flipped_in[epoch][i] != flipped_in[epoch - 1][i] for i in both)


@pytest.mark.parametrize("flip", ["none", "random"])
def test_train_batches_flip_modes(flip: str) -> None:
    images, labels = _coded_images()
    images[:, 2, :, 16:] = 255
    images[:, 2, :, :16] = 0
    inputs = torch.cat([x for x, _ in _batches(images, labels, translate=0, cutout_size=0, flip=flip)])
    mirrored = (inputs[:, 2, 0, 0] > inputs[:, 2, 0, -1]).float().mean().item()
    assert (mirrored == 0.0) if flip == "none" else (0.3 < mirrored < 0.7)
