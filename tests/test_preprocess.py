"""The input contract's rules (bundle/preprocess.py) against references built here from first principles.

The service, the offline predictor and the exporter all decode through `bundle.preprocess`, so comparing them
with each other cannot catch a wrong rule. Here each rule of `bundle.contract.PREPROCESS_RULES` is checked on
small synthetic images whose expected pixels the test computes itself: alpha over white by the compositing
formula, 16-bit ramps divided by their peak, palette look-ups, CMYK by its definition, EXIF orientations 1-8
by the index maps of the EXIF specification, grey replicated to RGB, and the centre crop + bicubic resize
with the crop box worked out here and Pillow's resampler called directly. Unit tests, no data set needed,
except one: the JPEG fast path against Pillow on the shared copy's 10,000 test images (skipped without it).
Run: `pytest tests/test_preprocess.py`.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from helpers import image_bytes
from PIL import Image

from bundle.contract import IMAGE_HEIGHT, IMAGE_WIDTH, PIXEL_DIVISOR, input_contract
from bundle.manifest import load_model_dir
from bundle.preprocess import ImageError, decode_image, decode_plain_jpeg, to_contract_pixels
from serving.classifier import Classifier
from serving.decoding import Decoder
from serving.predict import predict_stream
from serving.requests import RequestError, Upload

CONTRACT = input_contract([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
SIZE = (IMAGE_WIDTH, IMAGE_HEIGHT)  # Pillow's (width, height)
# Pillow composites and converts colour modes in integer arithmetic: allow its rounding (1 level of 255). The
# broken rules these tests guard against miss by far more (alpha on black: >= 127 at alpha 128; CMYK read as
# RGB: up to 255).
ROUNDING = 1
EXIF_ORIENTATION = 0x0112


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _random_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return _rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _decode(image: Image.Image, fmt: str, **params) -> np.ndarray:
    """`image` written as a `fmt` file, then decoded by the contract's function from the bytes."""
    pixels = decode_image(image_bytes(image, fmt, **params), CONTRACT)
    assert pixels.shape == (IMAGE_HEIGHT, IMAGE_WIDTH, 3) and pixels.dtype == np.uint8
    return pixels


def _assert_pixels(got: np.ndarray, want: np.ndarray, atol: int = 0) -> None:
    diff = np.abs(got.astype(int) - np.asarray(want).astype(int))
    assert diff.max() <= atol, f"{int((diff > atol).sum())} values off by up to {diff.max()} (allowed {atol})"


# ------------------------------------------------------------------ images already 32 x 32 RGB


@pytest.mark.parametrize(("fmt", "params"), [("PNG", {}), ("BMP", {}), ("TIFF", {}), ("WEBP", {"lossless": True})])
def test_decode_image_lossless_32x32_rgb_is_used_unchanged(fmt: str, params: dict) -> None:
    pixels = _random_rgb(IMAGE_HEIGHT, IMAGE_WIDTH)
    _assert_pixels(_decode(Image.fromarray(pixels), fmt, **params), pixels)


# ------------------------------------------------------------------ alpha: composited on white


def _over_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Porter-Duff 'over' onto an opaque white background, in [0, 255] units."""
    a = alpha.astype(np.float64)[..., None] / 255
    return np.round(colour.astype(np.float64) * a + 255 * (1 - a))


ALPHAS = np.array([0, 1, 64, 127, 128, 200, 254, 255], dtype=np.uint8)


def _alpha_grid() -> tuple[np.ndarray, np.ndarray]:
    """32 x 32 random colours, each column with one alpha of ALPHAS (every value appears in 4 columns)."""
    colour = _random_rgb(IMAGE_HEIGHT, IMAGE_WIDTH, seed=1)
    alpha = np.broadcast_to(np.resize(ALPHAS, IMAGE_WIDTH), (IMAGE_HEIGHT, IMAGE_WIDTH)).copy()
    return colour, alpha


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "WEBP"])
def test_decode_image_rgba_is_composited_over_white(fmt: str) -> None:
    colour, alpha = _alpha_grid()
    image = Image.fromarray(np.dstack([colour, alpha]), "RGBA")
    got = _decode(image, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    _assert_pixels(got, _over_white(colour, alpha), atol=ROUNDING)
    assert (got[:, ALPHAS[0] == np.resize(ALPHAS, IMAGE_WIDTH)] == 255).all(), "fully transparent must be white"


def test_decode_image_grey_with_alpha_is_composited_over_white() -> None:
    colour, alpha = _alpha_grid()
    grey = colour[..., 0]
    got = _decode(Image.fromarray(np.dstack([grey, alpha]), "LA"), "PNG")
    _assert_pixels(got, _over_white(np.dstack([grey] * 3), alpha), atol=ROUNDING)


def test_decode_image_palette_with_a_transparent_index_is_composited_over_white() -> None:
    palette = _rng(2).integers(0, 256, (256, 3), dtype=np.uint8)
    indices = _rng(3).integers(0, 256, (IMAGE_HEIGHT, IMAGE_WIDTH), dtype=np.uint8)
    indices[:4] = 7  # the transparent index: the top four rows
    image = Image.fromarray(indices, "P")
    image.putpalette(palette.tobytes())
    got = _decode(image, "PNG", transparency=7)
    want = palette[indices]
    want[indices == 7] = 255
    _assert_pixels(got, want)


# ------------------------------------------------------------------ 16-bit: scaled to 8 bits by the peak


def _ramp16() -> np.ndarray:
    """32 x 32 values from 0 to 65535, evenly spread: every part of the 16-bit range."""
    return np.round(np.linspace(0, 65535, IMAGE_HEIGHT * IMAGE_WIDTH)).astype(np.uint16).reshape(IMAGE_HEIGHT, -1)


def _grey(values: np.ndarray) -> np.ndarray:
    return np.repeat(values[..., None], 3, axis=2)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_decode_image_16_bit_grey_is_scaled_by_its_peak_65535(fmt: str) -> None:
    ramp = _ramp16()
    image = Image.fromarray(ramp)
    assert image.mode == "I;16"
    # v * 255 / 65535 = v / 257: never exactly halfway between two integers, so rounding is unambiguous.
    _assert_pixels(_decode(image, fmt), _grey(np.round(ramp / 257.0)))


def test_decode_image_32_bit_integer_grey_above_255_is_16_bit() -> None:
    ramp = _ramp16().astype(np.int32)
    image = Image.fromarray(ramp)
    assert image.mode == "I"
    _assert_pixels(_decode(image, "TIFF"), _grey(np.round(ramp / 257.0)))


def test_to_contract_pixels_integer_grey_within_0_255_keeps_its_values() -> None:
    values = np.arange(IMAGE_HEIGHT * IMAGE_WIDTH, dtype=np.int32).reshape(IMAGE_HEIGHT, -1) % 256
    image = Image.fromarray(values)
    assert image.mode == "I"
    _assert_pixels(to_contract_pixels(image, CONTRACT), _grey(values))


# ------------------------------------------------------------------ colour modes without alpha


def test_decode_image_grey_is_replicated_to_rgb() -> None:
    grey = _random_rgb(IMAGE_HEIGHT, IMAGE_WIDTH)[..., 0]
    _assert_pixels(_decode(Image.fromarray(grey, "L"), "PNG"), _grey(grey))


def test_decode_image_bilevel_is_black_and_white() -> None:
    bits = _rng(4).random((IMAGE_HEIGHT, IMAGE_WIDTH)) < 0.5
    image = Image.fromarray(bits.astype(np.uint8) * 255, "L").convert("1")
    _assert_pixels(_decode(image, "PNG"), _grey(bits.astype(np.uint8) * 255))


def test_decode_image_palette_looks_up_its_colours() -> None:
    palette = _rng(5).integers(0, 256, (256, 3), dtype=np.uint8)
    indices = _rng(6).integers(0, 256, (IMAGE_HEIGHT, IMAGE_WIDTH), dtype=np.uint8)
    image = Image.fromarray(indices, "P")
    image.putpalette(palette.tobytes())
    _assert_pixels(_decode(image, "PNG"), palette[indices])


def test_decode_image_cmyk_is_converted_by_its_definition() -> None:
    cmyk = _rng(7).integers(0, 256, (IMAGE_HEIGHT, IMAGE_WIDTH, 4), dtype=np.uint8)
    cmyk[0, :4] = [[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255], [0, 255, 255, 0]]  # white, cyan, black, red
    c = cmyk.astype(np.float64)
    want = np.round((255 - c[..., :3]) * (255 - c[..., 3:]) / 255)  # R = 255 (1 - C)(1 - K), and so on
    got = _decode(Image.fromarray(cmyk, "CMYK"), "TIFF")
    _assert_pixels(got, want, atol=ROUNDING)
    _assert_pixels(got[0, :4], [[255, 255, 255], [0, 255, 255], [0, 0, 0], [255, 0, 0]])


# ------------------------------------------------------------------ EXIF orientation


def _displayed(stored: np.ndarray, orientation: int) -> np.ndarray:
    """How a viewer shows `stored` (H, W, C) with EXIF `orientation`, from the specification's definitions of
    where the stored 0th row and 0th column appear: row/column index maps, written out rather than derived
    from Pillow's transpose operations."""
    h, w = stored.shape[:2]
    # (displayed height, width), and the stored (row, column) shown at displayed (i, j)
    maps = {
        1: ((h, w), lambda i, j: (i, j)),  # 0th row at the top, 0th column on the left
        2: ((h, w), lambda i, j: (i, w - 1 - j)),  # 0th row at the top, 0th column on the right
        3: ((h, w), lambda i, j: (h - 1 - i, w - 1 - j)),  # 0th row at the bottom, 0th column on the right
        4: ((h, w), lambda i, j: (h - 1 - i, j)),  # 0th row at the bottom, 0th column on the left
        5: ((w, h), lambda i, j: (j, i)),  # 0th row on the left, 0th column at the top
        6: ((w, h), lambda i, j: (h - 1 - j, i)),  # 0th row on the right, 0th column at the top
        7: ((w, h), lambda i, j: (h - 1 - j, w - 1 - i)),  # 0th row on the right, 0th column at the bottom
        8: ((w, h), lambda i, j: (j, w - 1 - i)),  # 0th row on the left, 0th column at the bottom
    }
    (out_h, out_w), source = maps[orientation]
    rows, cols = np.meshgrid(np.arange(out_h), np.arange(out_w), indexing="ij")
    src_rows, src_cols = source(rows, cols)
    return stored[src_rows, src_cols]


def _exif(orientation: int) -> dict:
    """Save parameters that tag the file with an EXIF orientation."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    return {"exif": exif.tobytes()}


# Pillow itself applies a TIFF's orientation when it loads the file (and drops the tag): TIFF checks that
# the image is not turned twice; PNG and lossless WebP check the decoder's own EXIF step.
@pytest.mark.parametrize(("fmt", "params"), [("PNG", {}), ("WEBP", {"lossless": True}), ("TIFF", {})])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_decode_image_applies_exif_orientation(orientation: int, fmt: str, params: dict) -> None:
    stored = _random_rgb(IMAGE_HEIGHT, IMAGE_WIDTH, seed=orientation)  # random: every pixel tells where it went
    got = _decode(Image.fromarray(stored), fmt, **params, **_exif(orientation))
    _assert_pixels(got, _displayed(stored, orientation))
    if orientation > 1:  # the test can tell orientations apart: each one moves the pixels
        assert not np.array_equal(got, stored)


# ------------------------------------------------------------------ plain JPEGs: libjpeg-turbo without Pillow


def _pillow_only(data: bytes) -> np.ndarray:
    return decode_image(data, CONTRACT, fast_jpeg=False)


@pytest.mark.parametrize(
    ("mode", "params"),
    [
        ("RGB", {"quality": 75}),  # 4:2:0, the shared copy's settings
        ("RGB", {"quality": 95, "subsampling": 1}),  # 4:2:2
        ("RGB", {"quality": 100, "subsampling": 0}),  # 4:4:4
        ("RGB", {"quality": 75, "progressive": True}),
        ("RGB", {"quality": 75, "optimize": True, "restart_marker_blocks": 4}),
        ("L", {"quality": 90}),
    ],
)
def test_plain_jpeg_fast_path_gives_pillows_pixels(mode: str, params: dict) -> None:
    image = Image.fromarray(_random_rgb(IMAGE_HEIGHT, IMAGE_WIDTH, seed=11)).convert(mode)
    data = image_bytes(image, "JPEG", **params)
    fast = decode_plain_jpeg(data, CONTRACT)
    assert fast is not None, "a plain JPEG of the contract's size should skip Pillow"
    assert fast.shape == (IMAGE_HEIGHT, IMAGE_WIDTH, 3) and fast.dtype == np.uint8
    _assert_pixels(fast, _pillow_only(data))


def test_plain_jpeg_fast_path_gives_pillows_pixels_on_the_test_split(shared_archive: Path) -> None:
    """Every test image of the shared copy (10,000 JPEGs): the fast path takes each one, pixel for pixel."""
    from bundle.class_tree import first_per_class

    files = first_per_class(shared_archive, "test", 1000)
    mismatched = [
        f.name for f in files if not np.array_equal(decode_plain_jpeg(data := f.read(), CONTRACT), _pillow_only(data))
    ]
    assert len(files) == 10_000 and not mismatched, f"{len(mismatched)} files differ, e.g. {mismatched[:3]}"


@pytest.mark.parametrize("orientation", range(2, 9))
def test_jpeg_with_exif_orientation_takes_pillows_path_and_is_turned(orientation: int) -> None:
    stored_image = Image.fromarray(_random_rgb(IMAGE_HEIGHT, IMAGE_WIDTH, seed=orientation))
    params = {"quality": 100, "subsampling": 0}
    stored = _pillow_only(image_bytes(stored_image, "JPEG", **params))  # the same entropy data, no EXIF
    tagged = image_bytes(stored_image, "JPEG", **params, **_exif(orientation))
    assert decode_plain_jpeg(tagged, CONTRACT) is None
    _assert_pixels(decode_image(tagged, CONTRACT), _displayed(stored, orientation))


def test_fast_path_declines_what_needs_more_than_decoding() -> None:
    pixels = _random_rgb(IMAGE_HEIGHT, IMAGE_WIDTH)
    jpeg = image_bytes(Image.fromarray(pixels), "JPEG")
    declined = {
        "larger than the input": image_bytes(Image.fromarray(_random_rgb(64, 64)), "JPEG"),
        "CMYK": image_bytes(Image.fromarray(pixels).convert("CMYK"), "JPEG"),
        "PNG": image_bytes(Image.fromarray(pixels), "PNG"),
        "truncated": jpeg[: len(jpeg) // 2],
        "empty": b"",
    }
    for what, data in declined.items():
        assert decode_plain_jpeg(data, CONTRACT) is None, what
    with pytest.raises(ImageError, match="truncated or corrupt"):
        decode_image(declined["truncated"], CONTRACT)  # Pillow's path words the error


def test_service_decoder_mixes_both_paths_in_upload_order_and_budgets_every_image() -> None:
    def jpeg(height: int, width: int, seed: int) -> bytes:
        return image_bytes(Image.fromarray(_random_rgb(height, width, seed=seed)), "JPEG")

    png = image_bytes(Image.fromarray(_random_rgb(IMAGE_HEIGHT, IMAGE_WIDTH, seed=2)), "PNG")
    uploads = [Upload("a.jpg", jpeg(32, 32, 1)), Upload("b.png", png), Upload("c.jpg", jpeg(32, 32, 3))]
    uploads.append(Upload("d.jpg", jpeg(64, 48, 4)))  # larger: resized by Pillow
    declared = 3 * IMAGE_HEIGHT * IMAGE_WIDTH + 64 * 48

    def decoder(max_request_pixels: int) -> Decoder:
        return Decoder(CONTRACT, max_pixels=10**6, max_request_pixels=max_request_pixels, max_pixels_in_flight=10**6)

    got = asyncio.run(decoder(declared).decode(uploads))
    np.testing.assert_array_equal(got, np.stack([_pillow_only(upload.data) for upload in uploads]))
    with pytest.raises(RequestError, match=f"the 4 images declare {declared:,} pixels"):
        asyncio.run(decoder(declared - 1).decode(uploads))


# ------------------------------------------------------------------ size: centre crop to the aspect, bicubic


def _centre_box(width: int, height: int) -> tuple[float, float, float, float]:
    """The largest centred region of the contract's aspect ratio, as Pillow's (left, upper, right, lower)."""
    target = IMAGE_WIDTH / IMAGE_HEIGHT
    if width / height > target:
        crop_w = height * target
        return ((width - crop_w) / 2, 0.0, (width + crop_w) / 2, float(height))
    crop_h = width / target
    return (0.0, (height - crop_h) / 2, float(width), (height + crop_h) / 2)


def _pillow_bicubic(pixels: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize(SIZE, Image.Resampling.BICUBIC, box=box))


@pytest.mark.parametrize(
    ("width", "height"),
    [(64, 64), (80, 64), (81, 64), (64, 96), (100, 37), (16, 16), (20, 50)],
    ids=["down-2x", "wide", "wide-odd-margin", "tall", "wide-odd", "up-2x", "small-tall"],
)
def test_decode_image_centre_crops_then_resizes_bicubic(width: int, height: int) -> None:
    pixels = _random_rgb(height, width, seed=width * 1000 + height)
    box = _centre_box(width, height)
    got = _decode(Image.fromarray(pixels), "PNG")
    _assert_pixels(got, _pillow_bicubic(pixels, box))
    # The resampling filter matters: nearest-neighbour and bilinear give other pixels on this random image.
    for other in (Image.Resampling.NEAREST, Image.Resampling.BILINEAR):
        assert not np.array_equal(got, np.asarray(Image.fromarray(pixels).resize(SIZE, other, box=box))), other


@pytest.mark.parametrize("axis", [0, 1])
def test_decode_image_crops_the_margins_rather_than_squashing_or_padding(axis: int) -> None:
    """Three 32-pixel bands of flat colour along the long side: only the middle one survives, exactly."""
    bands = [
        np.full((IMAGE_HEIGHT, IMAGE_WIDTH, 3), colour, np.uint8) for colour in ([255, 0, 0], [0, 200, 0], [0, 0, 90])
    ]
    pixels = np.concatenate(bands, axis=axis)
    _assert_pixels(_decode(Image.fromarray(pixels), "PNG"), bands[1])


# ------------------------------------------------------------------ the offline predictor's path


def test_predict_stream_feeds_the_model_the_contract_input(default_model: Path) -> None:
    """serving.predict turns file bytes into exactly pixel / 255 in NCHW, by the same rules (RGBA over white,
    EXIF orientation, centre crop) as the references above."""
    model = load_model_dir(default_model)
    colour, alpha = _alpha_grid()
    rgba = Image.fromarray(np.dstack([colour, alpha]), "RGBA")
    wide = _random_rgb(64, 80, seed=11)
    rotated = _random_rgb(IMAGE_HEIGHT, IMAGE_WIDTH, seed=12)
    items = [
        ("rgba.png", image_bytes(rgba, "PNG")),
        ("wide.png", image_bytes(Image.fromarray(wide), "PNG")),
        ("rotated.png", image_bytes(Image.fromarray(rotated), "PNG", **_exif(6))),
    ]
    expected = [_over_white(colour, alpha), _pillow_bicubic(wide, _centre_box(80, 64)), _displayed(rotated, 6)]
    seen: list[np.ndarray] = []

    def recording_runner(batch: np.ndarray) -> np.ndarray:
        seen.append(batch.copy())
        return np.zeros((len(batch), len(model.class_names)), np.float32)

    results = list(predict_stream(Classifier(model, "onnx", recording_runner), items, batch_size=8, total=None))
    assert [(name, error) for name, _, error in results] == [(name, None) for name, _ in items]
    (batch,) = seen
    assert batch.dtype == np.float32 and batch.shape == (3, 3, IMAGE_HEIGHT, IMAGE_WIDTH)
    pixels = np.round(batch.transpose(0, 2, 3, 1) * PIXEL_DIVISOR)
    np.testing.assert_allclose(batch, pixels.transpose(0, 3, 1, 2) / PIXEL_DIVISOR, rtol=0, atol=1e-7)
    for got, want in zip(pixels, expected, strict=True):
        _assert_pixels(got, want, atol=ROUNDING)
