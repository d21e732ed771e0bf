"""CIFAR-10 loading: official python archive or class-folder tree, decoded once and cached.

Sources `load_dataset` understands:

- the official python version: `cifar-10-python.tar.gz`, an extracted
  `cifar-10-batches-py/` folder, or a folder holding either; with
  `download=True` a missing source is fetched there through torchvision;
- a class-folder tree `train/<class>/*` and `test/<class>/*` (PNG, JPEG, ...)
  as a directory or a `.tar` / `.tar.gz` (the layout of the shared JPEG copy).

Images are decoded by the input contract's decoder (bundle.preprocess: EXIF orientation, alpha on white,
16-bit scaling, libjpeg-turbo for plain JPEGs), the one the service and the predictor use, so a model trains
on the pixels it will be served. The decoded uint8 arrays are cached (keyed by the source's path, size and
modification time) so that a second run starts in about a second.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import tarfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from bundle.class_tree import LabelledFile, iter_labelled_files
from bundle.contract import CHANNELS, IMAGE_HEIGHT, IMAGE_WIDTH, PIXEL_DIVISOR, input_contract
from bundle.environment import usable_cores
from bundle.preprocess import ImageError, decode_plain_jpeg, load_image, open_image

if TYPE_CHECKING:
    from trainer.config import TrainConfig

log = logging.getLogger(__name__)
OFFICIAL_FOLDER = "cifar-10-batches-py"
OFFICIAL_ARCHIVE = "cifar-10-python.tar.gz"
CACHE_FORMAT = 2  # 2: decoded by the input contract's rules (alpha on white, EXIF, 16-bit scaling)
# Decoding needs the contract's size and rules only; the normalisation is measured later, on the training split.
_DECODING = input_contract(mean=[0.0] * CHANNELS, std=[1.0] * CHANNELS)


@dataclass(frozen=True)
class Dataset:
    """Decoded CIFAR-style data: images are uint8 (N, H, W, 3) RGB at the contract's size, labels int64 (N,)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "resnet-cifar"


def load_dataset(source: str | Path, cache_dir: Path | None = None, download: bool = False) -> Dataset:
    """Load (and cache) the data set at `source`; see the module docstring for layouts."""
    path = Path(source).expanduser()
    if path.exists() and not (path.is_dir() or path.is_file()):  # /dev/zero, a FIFO: reading would never end
        raise ValueError(f"data source {str(path)!r} is neither a folder nor a regular file")
    if not path.exists():
        if not download:
            raise FileNotFoundError(
                f"data source {str(path)!r} does not exist; pass an existing CIFAR-10 archive or "
                f"folder, or add --download to fetch the official release into it"
            )
        return _download_official(path, cache_dir)
    if download and path.is_dir() and _find_official(path) is None and not _is_class_tree(path):
        return _download_official(path, cache_dir)
    cache_file = _cache_path(path, cache_dir)
    if cache_file is not None and cache_file.exists():
        try:
            return _read_cache(cache_file, path)
        except (OSError, ValueError, KeyError, pickle.UnpicklingError) as err:
            log.warning("ignoring unreadable cache %s (%s); decoding again", cache_file, err)
    dataset = _decode(path)
    if cache_file is not None:
        _write_cache(cache_file, dataset)
    return dataset


def split_validation(
    images: np.ndarray, labels: np.ndarray, val_size: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Carve `val_size` images out of the training set: (train_x, train_y, val_x, val_y).

    The split depends only on `seed` (not on the training seed), so every run
    selecting hyper-parameters sees the same validation images.
    """
    if not 0 <= val_size < len(images):
        raise ValueError(f"--val-size must be in [0, {len(images) - 1}], got {val_size}")
    order = np.random.default_rng(seed).permutation(len(images))
    val, train = np.sort(order[:val_size]), np.sort(order[val_size:])
    return images[train], labels[train], images[val], labels[val]


# ------------------------------------------------------------------ on the training device


@dataclass(frozen=True)
class DeviceData:
    """The splits as uint8 (N, 3, H, W) tensors on the training device, plus what describes them."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    class_names: list[str]
    source: str


def load_data(config: TrainConfig, device: torch.device, normalization: dict | None) -> DeviceData:
    """Decode (or read from cache), split off validation, and move everything to `device` once.

    The normalisation is measured on the training split, unless a resumed run brings its own.
    """
    data = load_dataset(config.data, Path(config.cache_dir) if config.cache_dir else None, download=config.download)
    train_x, train_y, val_x, val_y = split_validation(data.train_images, data.train_labels, config.val_size)
    if config.train_subset:
        keep = np.sort(np.random.default_rng(config.seed).permutation(len(train_x))[: config.train_subset])
        train_x, train_y = train_x[keep], train_y[keep]
    if normalization:
        mean, std = torch.tensor(normalization["mean"]), torch.tensor(normalization["std"])
    else:
        pixels = torch.from_numpy(train_x).reshape(-1, train_x.shape[-1]).double() / PIXEL_DIVISOR
        mean, std = pixels.mean(0).float(), pixels.std(0).float()

    def on_device(images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)

    return DeviceData(
        train_images=on_device(train_x),
        train_labels=torch.from_numpy(train_y).to(device),
        val_images=on_device(val_x),
        val_labels=torch.from_numpy(val_y),
        test_images=on_device(data.test_images),
        test_labels=torch.from_numpy(data.test_labels),
        mean=mean.to(device),
        std=std.to(device),
        class_names=list(data.class_names),
        source=data.source,
    )


# ------------------------------------------------------------------ detection


def _find_official(path: Path) -> Path | None:
    """Return the official archive or batch folder at or inside `path`, if any."""
    if path.is_file():
        return path if _archive_has(path, f"{OFFICIAL_FOLDER}/data_batch_1") else None
    for candidate in (path, path / OFFICIAL_FOLDER):
        if (candidate / "data_batch_1").is_file():
            return candidate
    if (path / OFFICIAL_ARCHIVE).is_file():
        return path / OFFICIAL_ARCHIVE
    return None


def _is_class_tree(path: Path) -> bool:
    return (path / "train").is_dir() and (path / "test").is_dir()


def _archive_has(path: Path, member_suffix: str) -> bool:
    if not tarfile.is_tarfile(path):
        return False
    try:
        with tarfile.open(path) as tar:
            return any(member.name.endswith(member_suffix) for member in tar)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:  # truncated or corrupt archives
        raise ValueError(f"{str(path)!r} is a damaged tar archive ({err}); download or copy it again") from None


def _decode(path: Path) -> Dataset:
    official = _find_official(path)
    if official is not None:
        return _read_official(official)
    if path.is_dir():
        if _is_class_tree(path):
            return _read_class_folders(path)
        raise ValueError(
            f"unknown data layout in {str(path)!r}: expected train/<class>/* and test/<class>/* "
            f"image folders, or the official {OFFICIAL_FOLDER}/ batches"
        )
    if tarfile.is_tarfile(path):
        return _read_class_folders(path)
    raise ValueError(
        f"unknown data source {str(path)!r}: not a folder or a tar archive; expected the official "
        f"{OFFICIAL_ARCHIVE} or a .tar/.tar.gz of train/<class>/* and test/<class>/* images"
    )


# ------------------------------------------------------------------ official format


def _read_official(location: Path) -> Dataset:
    def read_batches(read: callable) -> Dataset:
        meta = read("batches.meta")
        names = tuple(n.decode() if isinstance(n, bytes) else n for n in meta[b"label_names"])
        train = [read(f"data_batch_{i}") for i in range(1, 6)]
        test = read("test_batch")

        def to_arrays(batches: list[dict]) -> tuple[np.ndarray, np.ndarray]:
            data = np.concatenate([b[b"data"] for b in batches]).reshape(-1, CHANNELS, IMAGE_HEIGHT, IMAGE_WIDTH)
            labels = np.concatenate([np.asarray(b[b"labels"], dtype=np.int64) for b in batches])
            return np.ascontiguousarray(data.transpose(0, 2, 3, 1)), labels

        train_x, train_y = to_arrays(train)
        test_x, test_y = to_arrays([test])
        return Dataset(train_x, train_y, test_x, test_y, names, str(location))

    def unpickle(raw: bytes, name: str) -> dict:
        try:
            batch = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
        except _ForbiddenInPickle as err:
            raise ValueError(f"refusing CIFAR-10 batch {name!r} in {str(location)!r}: {err}") from None
        except Exception as err:  # pickle raises many types on corrupt input
            raise ValueError(f"corrupt CIFAR-10 batch {name!r} in {str(location)!r}: {err}") from err
        if not isinstance(batch, dict):
            raise ValueError(f"CIFAR-10 batch {name!r} in {str(location)!r} is a {type(batch).__name__}, not a dict")
        return batch

    if location.is_dir():

        def read_file(name: str) -> dict:
            file = location / name
            if not file.is_file():
                raise FileNotFoundError(f"official CIFAR-10 folder {str(location)!r} lacks {name!r}")
            return unpickle(file.read_bytes(), str(file))

        return read_batches(read_file)

    try:
        with tarfile.open(location) as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}

            def read_member(name: str) -> dict:
                if name not in members:
                    raise FileNotFoundError(f"official CIFAR-10 archive {str(location)!r} lacks {name!r}")
                return unpickle(tar.extractfile(members[name]).read(), f"{location}:{name}")

            return read_batches(read_member)
    except (tarfile.TarError, EOFError, zlib.error) as err:
        raise ValueError(f"{str(location)!r} is a damaged tar archive ({err}); download or copy it again") from None


class _ForbiddenInPickle(pickle.UnpicklingError):
    """A pickle asked for something a CIFAR-10 batch never contains."""


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles what the official CIFAR-10 batches contain and nothing else: dicts, lists, bytes, strings,
    numbers and numpy arrays. Any other global (os.system, builtins.eval, ...) is refused before it can run:
    `pickle.loads` on a crafted archive runs arbitrary code."""

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),  # how numpy 1 pickled arrays (the official files)
            ("numpy._core.multiarray", "_reconstruct"),  # ... and numpy 2
            ("numpy.core.numeric", "_frombuffer"),  # protocol 5 arrays
            ("numpy._core.numeric", "_frombuffer"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),  # how Python 3 writes bytes at protocol 2 (a string codec, no code)
        }
    )

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise _ForbiddenInPickle(
                f"it asks to load {module}.{name}, which CIFAR-10 batches never contain (only dicts, lists, "
                "bytes, strings and numpy arrays are allowed): the file is not the official data set"
            )
        return super().find_class(module, name)


def _download_official(path: Path, cache_dir: Path | None) -> Dataset:
    from torchvision.datasets import CIFAR10  # only needed for this path

    path.mkdir(parents=True, exist_ok=True)
    try:
        CIFAR10(root=str(path), train=True, download=True)
    except OSError as err:  # URLError is an OSError
        raise RuntimeError(
            f"could not download CIFAR-10 into {str(path)!r} ({err}); this machine seems to be "
            f"offline: download {OFFICIAL_ARCHIVE} elsewhere and pass its path with --data"
        ) from err
    return load_dataset(path, cache_dir, download=False)


# ------------------------------------------------------------------ class-folder trees (bundle.class_tree)


def _decode_image(raw: bytes, name: str) -> np.ndarray:
    """An image file of a CIFAR-style data set -> uint8 (H, W, 3) RGB, by the input contract's decoder; images
    not already at the contract's size are refused (resizing a data set silently would hide a mistake)."""
    try:
        pixels = decode_plain_jpeg(raw, _DECODING)
        if pixels is not None:
            return pixels
        image = open_image(raw, name=name)
        if image.size != (IMAGE_WIDTH, IMAGE_HEIGHT):
            raise ValueError(
                f"image {name!r} is {image.width}x{image.height}; CIFAR-style data sets must be "
                f"{IMAGE_WIDTH}x{IMAGE_HEIGHT} (resize them first)"
            )
        return load_image(image, _DECODING, name=name)
    except ImageError as err:
        raise ValueError(f"corrupt or unreadable image {name!r}: {err}") from err


def _read_class_folders(source: Path) -> Dataset:
    """Both splits of a class-folder tree or archive, decoded; both splits must have the same classes."""
    files = [f for f in iter_labelled_files(source) if f.split is not None]
    if not files:
        raise ValueError(
            f"unknown layout in {'folder' if source.is_dir() else 'archive'} {str(source)!r}: no train/<class>/* "
            f"or test/<class>/* images and no official {OFFICIAL_FOLDER}/ batches"
        )
    classes = {split: sorted({f.label for f in files if f.split == split}) for split in ("train", "test")}
    for split in ("train", "test"):
        if not classes[split]:
            raise ValueError(f"no images found under {split}/<class>/ in {str(source)!r}")
    if classes["train"] != classes["test"]:
        only_train = sorted(set(classes["train"]) - set(classes["test"]))
        only_test = sorted(set(classes["test"]) - set(classes["train"]))
        raise ValueError(
            f"class names differ between train and test in {str(source)!r}: only in train {only_train}, "
            f"only in test {only_test}"
        )
    names = tuple(classes["train"])
    index = {c: i for i, c in enumerate(names)}

    def decode_split(split: str) -> tuple[np.ndarray, np.ndarray]:
        items = sorted(((index[f.label], f.name, f) for f in files if f.split == split), key=lambda t: t[:2])
        labels = np.asarray([label for label, _, _ in items], dtype=np.int64)
        with ThreadPoolExecutor(max_workers=usable_cores()) as pool:
            # Pillow and libjpeg-turbo release the GIL while decoding, so threads give real parallelism.
            decoded = pool.map(lambda item: _decode_file(item[2]), items)
            images = list(tqdm(decoded, total=len(items), desc=f"decoding {split}", unit="img", leave=False))
        return np.stack(images), labels

    train_x, train_y = decode_split("train")
    test_x, test_y = decode_split("test")
    return Dataset(train_x, train_y, test_x, test_y, names, str(source))


def _decode_file(file: LabelledFile) -> np.ndarray:
    try:
        raw = file.read()
    except ImageError as err:
        raise ValueError(f"cannot read image {file.name!r}: {err}") from err
    return _decode_image(raw, file.name)


# ------------------------------------------------------------------ cache


def _source_fingerprint(path: Path) -> str:
    """Identity of a source: its resolved path plus the size and mtime of every file in it."""
    digest = hashlib.sha256(f"v{CACHE_FORMAT}:{path.resolve()}".encode())
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    for file in files:
        if file.is_file():
            stat = file.stat()
            digest.update(
                f"{file.relative_to(path) if path.is_dir() else ''}:{stat.st_size}:{stat.st_mtime_ns}".encode()
            )
    return digest.hexdigest()[:24]


def _cache_path(path: Path, cache_dir: Path | None) -> Path | None:
    cache_dir = cache_dir or default_cache_dir()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        log.warning("cannot create cache folder %s (%s); decoding without a cache", cache_dir, err)
        return None
    return cache_dir / f"cifar-{_source_fingerprint(path)}.npz"


def _read_cache(file: Path, path: Path) -> Dataset:
    with np.load(file, allow_pickle=False) as z:
        return Dataset(
            z["train_images"],
            z["train_labels"],
            z["test_images"],
            z["test_labels"],
            tuple(str(n) for n in z["class_names"]),
            str(path),
        )


def _write_cache(file: Path, dataset: Dataset) -> None:
    tmp = file.with_suffix(f".{os.getpid()}.tmp.npz")
    try:
        np.savez(
            tmp,
            train_images=dataset.train_images,
            train_labels=dataset.train_labels,
            test_images=dataset.test_images,
            test_labels=dataset.test_labels,
            class_names=np.asarray(dataset.class_names),
        )
        os.replace(tmp, file)
    except OSError as err:
        log.warning("could not write data cache %s (%s)", file, err)
        tmp.unlink(missing_ok=True)
