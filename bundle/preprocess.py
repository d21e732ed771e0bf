"""Turn image bytes or raw pixels into a model's input, as its manifest's contract says; softmax and top-k.

The service, the offline predictor and the exporter all call these functions,
so the same file gives the same answer through each. Pillow and numpy; simplejpeg (libjpeg-turbo, the
library Pillow decodes JPEGs with) when installed, for JPEGs that need nothing but decoding.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

try:  # optional: without it Pillow decodes every file, to the same pixels
    import simplejpeg
except ImportError:
    simplejpeg = None

DEFAULT_MAX_FILE_BYTES = 64 * 2**20  # image files larger than this are refused before reading
DEFAULT_MAX_PIXELS = 40_000_000  # declared width x height; larger is refused before decoding (decompression bombs)
ACCEPTED_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")  # Pillow's names; nothing else is even parsed
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")  # the documented formats
JPEG_DRAFT_MARGIN = 4  # a large JPEG is decoded at 1/2, 1/4 or 1/8 scale while it stays >= 4x the crop it feeds
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class ImageError(ValueError):
    """The bytes are not an image this service can use; the message says why."""


def read_image_file(path: Path, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> bytes:
    """The bytes of an image file, after checking that it is a regular file (not a FIFO, device or socket,
    which could block or never end), that a symbolic link leads somewhere, and that it is not too large.
    Raises ImageError with the reason."""
    try:
        info = path.stat()
    except FileNotFoundError:
        reason = "dangling symbolic link" if path.is_symlink() else "no such file"
        raise ImageError(f"{path}: {reason}") from None
    except OSError as err:  # ELOOP for a symbolic link loop, EACCES, ...
        raise ImageError(f"{path}: cannot read the file ({os.strerror(err.errno) if err.errno else err})") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "folder" if stat.S_ISDIR(info.st_mode) else "FIFO" if stat.S_ISFIFO(info.st_mode) else "special file"
        raise ImageError(f"{path}: not a regular file (a {kind})")
    if info.st_size > max_bytes:
        raise ImageError(f"{path}: {info.st_size:,} bytes, over the limit of {max_bytes:,} for one image file")
    try:
        return path.read_bytes()
    except OSError as err:
        raise ImageError(f"{path}: cannot read the file ({err.strerror or err})") from None


def decode_image(
    data: bytes, contract: dict, *, name: str = "image", max_pixels: int = DEFAULT_MAX_PIXELS, fast_jpeg: bool = True
) -> np.ndarray:
    """Image file bytes (PNG, JPEG, BMP, GIF, WebP, TIFF; any size or mode) -> uint8 (H, W, 3) RGB
    at the contract's size. Raises ImageError naming `name` for anything unusable. `fast_jpeg=False`
    decodes every file with Pillow (same pixels, slower for plain JPEGs: see decode_plain_jpeg)."""
    if fast_jpeg and (pixels := decode_plain_jpeg(data, contract)) is not None:
        return pixels
    return load_image(open_image(data, name=name, max_pixels=max_pixels), contract, name=name)


def decode_plain_jpeg(data: bytes, contract: dict) -> np.ndarray | None:
    """A JPEG that needs nothing but decoding (already the contract's size, YCbCr or grey, no EXIF that could
    turn it) -> uint8 (H, W, 3) RGB, by libjpeg-turbo in one call (simplejpeg); None for every other file and
    on any doubt (corrupt data included): the caller then takes the Pillow path, which also words the errors.

    Same library and settings as Pillow (accurate integer DCT, smooth chroma upsampling), so the same pixels
    (tests/test_preprocess.py compares them on the test split); a 32x32 JPEG costs ~9 us here instead of ~70 us
    through Pillow's per-file Python work (header parsing, EXIF, mode conversion)."""
    if simplejpeg is None or not data.startswith(b"\xff\xd8"):
        return None
    _, _, height, width = contract["shape"]
    try:
        declared_height, declared_width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if (declared_height, declared_width) != (height, width) or colorspace not in ("YCbCr", "Gray"):
            return None  # checked first: a large file is not scanned for EXIF below
        if b"Exif\x00\x00" in data:
            return None  # an EXIF block may rotate the image: Pillow applies it (conservative: any EXIF at all)
        return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=False, fastupsample=False, strict=True)
    except ValueError:  # corrupt or truncated (strict: libjpeg's warnings raise too)
        return None


def open_image(data: bytes, *, name: str = "image", max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Image file bytes -> a Pillow image whose header alone has been read (`.size` is what it declares); no
    pixel is decoded yet. Raises ImageError for an empty file, another format, or more than `max_pixels`."""
    if not data:
        raise ImageError(f"{name}: the file is empty")
    with _image_errors(name):
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    check_declared_size(image.size, max_pixels, name)
    return image


def load_image(image: Image.Image, contract: dict, *, name: str = "image") -> np.ndarray:
    """An image from `open_image` -> uint8 (H, W, 3) RGB at the contract's size (decodes it)."""
    with _image_errors(name):
        image.seek(0)  # first frame of animations (GIF, WebP, multi-page TIFF)
        if image.format == "JPEG" and (request := _jpeg_draft_size(image.size, contract)):
            image.draft(None, request)  # DCT-domain downscaling: a fraction of the decoding work
        image.load()
        image = ImageOps.exif_transpose(image)
    return to_contract_pixels(image, contract)


@contextlib.contextmanager
def _image_errors(name: str) -> Iterator[None]:
    """Pillow's many exception types (and its decompression-bomb warning) -> one ImageError naming the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except UnidentifiedImageError as err:
        raise ImageError(f"{name}: not a recognised image format (PNG, JPEG, BMP, GIF, WebP or TIFF)") from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"{name}: refused as a possible decompression bomb ({err})") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageError(f"{name}: truncated or corrupt image ({err})") from err


def _jpeg_draft_size(size: tuple[int, int], contract: dict) -> tuple[int, int] | None:
    """The size to ask the JPEG decoder for so that the centre crop keeps >= JPEG_DRAFT_MARGIN x the model's
    input size (None: the image is too small to reduce). See the contract's `large_jpeg` rule."""
    _, _, height, width = contract["shape"]
    ratio = min(size[0] / width, size[1] / height)  # how much larger than the input the centre crop is
    if ratio < 2 * JPEG_DRAFT_MARGIN:
        return None
    scale = JPEG_DRAFT_MARGIN / ratio
    return math.ceil(size[0] * scale), math.ceil(size[1] * scale)


def check_declared_size(size: tuple[int, int], max_pixels: int, name: str) -> None:
    """Raise ImageError when an image declares more than `max_pixels` (a decompression bomb, or just too big)."""
    width, height = size
    if width * height > max_pixels:
        raise ImageError(f"{name}: declared size {width}x{height} exceeds the limit of {max_pixels:,} pixels")


def to_contract_pixels(image: Image.Image, contract: dict) -> np.ndarray:
    """Any Pillow image -> uint8 (H, W, 3) RGB of the contract's size, by the rules of `bundle.contract`
    (a manifest's rules were checked when it was loaded)."""
    _, _, height, width = contract["shape"]
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        image = Image.fromarray(np.clip(values * (255.0 / peak), 0, 255).round().astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    image = image.convert("RGB")  # L, P, CMYK, YCbCr, 1, F ... -> RGB
    if image.size != (width, height):
        image = ImageOps.fit(image, (width, height), method=Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def pixels_to_input(pixels: np.ndarray, contract: dict) -> np.ndarray:
    """uint8 (N, H, W, 3) RGB pixels -> the model input the contract describes (float32 NCHW in [0, 1])."""
    _, channels, height, width = contract["shape"]
    if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[1:] != (height, width, channels):
        raise ValueError(
            f"pixels must be uint8 of shape (N, {height}, {width}, {channels}); got {pixels.dtype} {pixels.shape}"
        )
    return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(contract["pixel_divisor"])


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def top_k(probabilities: np.ndarray, class_names: list[str], k: int) -> list[list[dict]]:
    """Per row, the k most probable classes as [{"label", "probability"}], most probable first."""
    k = max(1, min(k, len(class_names)))
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return [
        [{"label": class_names[j], "probability": float(row[j])} for j in idx]
        for row, idx in zip(probabilities, order, strict=True)
    ]
