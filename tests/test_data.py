"""CIFAR-10 loading (trainer/data.py): every layout, the cache, the shared copy, bad data, validation splits.

Tiny data sets are generated per test in a tmp folder (official pickles, class-folder
trees of PNG/JPEG as folders and tar archives); every load uses a tmp cache folder,
except the shared copy, which is read through the default cache like the trainer does.
Run: `pytest tests/test_data.py`.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import socket
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.data import Dataset, load_dataset, split_validation

OFFICIAL_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
TREE_CLASSES = ("cat", "dog", "ship")  # sorted: the label order a class-folder tree gets


# ------------------------------------------------------------------ fixture writers


def _random_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _write_official(
    folder: Path, per_batch: int = 4, test: int = 6
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The official python layout (`cifar-10-batches-py/` pickles, row-major RGB planes); returns the arrays."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_x, test_x = _random_images(5 * per_batch, 1), _random_images(test, 2)
    train_y, test_y = rng.integers(0, 10, 5 * per_batch), rng.integers(0, 10, test)

    def dump(name: str, images: np.ndarray, labels: np.ndarray) -> None:
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in labels],
            b"data": images.transpose(0, 3, 1, 2).reshape(len(images), 3072),
            b"filenames": [f"{name}_{i}.png".encode() for i in range(len(images))],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))

    for i in range(5):
        part = slice(i * per_batch, (i + 1) * per_batch)
        dump(f"data_batch_{i + 1}", train_x[part], train_y[part])
    dump("test_batch", test_x, test_y)
    meta = {b"label_names": [c.encode() for c in OFFICIAL_CLASSES], b"num_cases_per_batch": per_batch}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return train_x, train_y, test_x, test_y


def _tar(source: Path, archive: Path, arcname: str) -> Path:
    with tarfile.open(archive, "w:gz" if archive.name.endswith(".gz") else "w") as tar:
        tar.add(source, arcname=arcname)
    return archive


def _write_tree(root: Path, suffix: str, train_per_class: int = 2, test_per_class: int = 1) -> dict:
    """train/<class>/NNNN.suffix and test/<class>/NNNN.suffix; returns {split: {class: [pixels in file order]}}."""
    written: dict[str, dict[str, list[np.ndarray]]] = {}
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        written[split] = {}
        for c, name in enumerate(TREE_CLASSES):
            (root / split / name).mkdir(parents=True)
            pixels = _random_images(count, seed=10 * (split == "test") + c)
            written[split][name] = []
            for i, image in enumerate(pixels):
                path = root / split / name / f"{i:04d}{suffix}"
                Image.fromarray(image).save(path, **({"quality": 90} if suffix == ".jpg" else {}))
                # Compare against what Pillow decodes from the file: JPEG is lossy.
                written[split][name].append(np.asarray(Image.open(path).convert("RGB")))
    return written


def _png_bytes(size: tuple[int, int] = (32, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def _load(source: Path, tmp_path: Path, **kwargs) -> Dataset:
    return load_dataset(source, cache_dir=tmp_path / "cache", **kwargs)


def _assert_tree_matches(data: Dataset, written: dict) -> None:
    assert data.class_names == TREE_CLASSES
    for split, images, labels in (
        ("train", data.train_images, data.train_labels),
        ("test", data.test_images, data.test_labels),
    ):
        expected = [(label, image) for label, name in enumerate(TREE_CLASSES) for image in written[split][name]]
        assert images.dtype == np.uint8 and images.shape == (len(expected), 32, 32, 3)
        assert labels.dtype == np.int64
        assert labels.tolist() == [label for label, _ in expected]
        for got, (_, want) in zip(images, expected, strict=True):
            np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------ layouts


@pytest.mark.parametrize("where", ["batches_folder", "parent_folder", "tar_gz", "folder_holding_tar_gz"])
def test_load_dataset_reads_the_official_layout(tmp_path: Path, where: str) -> None:
    batches = tmp_path / "src" / "cifar-10-batches-py"
    train_x, train_y, test_x, test_y = _write_official(batches)
    archive_dir = tmp_path / "archive"
    archive_dir.mkdir()
    source = {
        "batches_folder": batches,
        "parent_folder": batches.parent,
        "tar_gz": lambda: _tar(batches, archive_dir / "my-copy.tar.gz", "cifar-10-batches-py"),
        "folder_holding_tar_gz": lambda: (
            _tar(batches, archive_dir / "cifar-10-python.tar.gz", "cifar-10-batches-py").parent
        ),
    }[where]
    data = _load(source() if callable(source) else source, tmp_path)
    assert data.class_names == OFFICIAL_CLASSES and data.num_classes == 10
    np.testing.assert_array_equal(data.train_images, train_x)
    np.testing.assert_array_equal(data.test_images, test_x)
    assert data.train_labels.dtype == data.test_labels.dtype == np.int64
    np.testing.assert_array_equal(data.train_labels, train_y)
    np.testing.assert_array_equal(data.test_labels, test_y)


@pytest.mark.parametrize(
    ("suffix", "container", "prefix"),
    [
        (".png", "folder", ""),
        (".jpg", "folder", ""),
        (".png", "tar", ""),
        (".jpg", "tar.gz", ""),
        (".png", "tar.gz", "cifar10/"),
        (".jpg", "tar", "cifar10-jpeg/"),
    ],
)
def test_load_dataset_reads_class_folder_trees(tmp_path: Path, suffix: str, container: str, prefix: str) -> None:
    root = tmp_path / "tree"
    written = _write_tree(root, suffix)
    source = root
    if container != "folder":
        source = tmp_path / f"tree.{container}"
        with tarfile.open(source, "w:gz" if container == "tar.gz" else "w") as tar:
            for split in ("train", "test"):
                tar.add(root / split, arcname=f"{prefix}{split}")
    _assert_tree_matches(_load(source, tmp_path), written)


def test_load_dataset_converts_grey_and_palette_images_to_rgb(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    for split in ("train", "test"):
        (root / split / "a").mkdir(parents=True)
        Image.new("L", (32, 32), 77).save(root / split / "a" / "grey.png")
        Image.new("RGB", (32, 32), (1, 2, 3)).convert("P", palette=Image.Palette.ADAPTIVE).save(
            root / split / "a" / "palette.png"
        )
    data = _load(root, tmp_path)
    assert data.train_images.shape == (2, 32, 32, 3)
    assert (data.train_images[0] == 77).all()  # grey.png sorts first
    assert data.train_images[1, 0, 0].tolist() == [1, 2, 3]


# ------------------------------------------------------------------ cache


def test_load_dataset_second_load_reads_the_cache(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    written = _write_tree(root, ".png")
    cache = tmp_path / "cache"
    first = _load(root, tmp_path)
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz", files
    # Rewrite the cache entry with marked pixels: a second load that returns them read the cache.
    with np.load(files[0]) as z:
        content = dict(z)
    content["train_images"] = np.full_like(content["train_images"], 123)
    np.savez(files[0], **content)
    second = _load(root, tmp_path)
    assert (second.train_images == 123).all()
    np.testing.assert_array_equal(second.test_images, first.test_images)
    assert second.class_names == first.class_names and second.source == str(root)
    assert list(cache.iterdir()) == files, "no second entry and no temporary file may be left"
    _assert_tree_matches(first, written)


def test_load_dataset_cache_is_invalidated_when_the_source_changes(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    _write_tree(root, ".png")
    _load(root, tmp_path)
    changed = root / "train" / "cat" / "0000.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(changed)
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))  # a new mtime even on coarse clocks
    data = _load(root, tmp_path)
    assert (data.train_images[0] == 0).all()
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2


def test_load_dataset_unreadable_cache_is_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "tree"
    written = _write_tree(root, ".png")
    _load(root, tmp_path)
    (entry,) = (tmp_path / "cache").iterdir()
    entry.write_bytes(b"not an npz file")
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        data = _load(root, tmp_path)
    _assert_tree_matches(data, written)
    assert "ignoring unreadable cache" in caplog.text and str(entry) in caplog.text


# ------------------------------------------------------------------ the shared copy


def test_load_dataset_shared_copy_is_cifar10(shared_archive: Path) -> None:
    data = load_dataset(shared_archive)  # the default cache, as the trainer uses it
    assert data.class_names == OFFICIAL_CLASSES
    assert data.train_images.shape == (50000, 32, 32, 3) and data.test_images.shape == (10000, 32, 32, 3)
    assert data.train_images.dtype == np.uint8
    assert np.bincount(data.train_labels).tolist() == [5000] * 10
    assert np.bincount(data.test_labels).tolist() == [1000] * 10
    mean = data.train_images.reshape(-1, 3).mean(0) / 255
    np.testing.assert_allclose(mean, [0.4913, 0.4821, 0.4465], atol=5e-4)  # the README's figures
    test_mean = data.test_images.reshape(-1, 3).mean(0) / 255
    np.testing.assert_allclose(test_mean, [0.4941, 0.4851, 0.4504], atol=5e-4)


# ------------------------------------------------------------------ bad data


def test_load_dataset_missing_path_names_it_and_the_fix(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        _load(missing, tmp_path)
    assert str(missing) in str(info.value) and "--download" in str(info.value)


def test_load_dataset_folder_without_train_and_test_is_an_unknown_layout(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    (folder / "cat").mkdir(parents=True)
    (folder / "cat" / "0.png").write_bytes(_png_bytes())
    with pytest.raises(ValueError, match="unknown data layout") as info:
        _load(folder, tmp_path)
    assert str(folder) in str(info.value) and "train/<class>" in str(info.value)


def test_load_dataset_random_file_is_an_unknown_source(tmp_path: Path) -> None:
    file = tmp_path / "notes.txt"
    file.write_text("not a data set\n" * 100)
    with pytest.raises(ValueError, match="unknown data source") as info:
        _load(file, tmp_path)
    assert str(file) in str(info.value)


def test_load_dataset_tar_without_images_is_an_unknown_layout(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "README.txt").write_text("nothing here")
    (tmp_path / "docs" / "train").mkdir()
    archive = _tar(tmp_path / "docs", tmp_path / "docs.tar.gz", "docs")
    with pytest.raises(ValueError, match="unknown layout in archive") as info:
        _load(archive, tmp_path)
    assert str(archive) in str(info.value)


@pytest.mark.parametrize("container", ["folder", "tar.gz"])
def test_load_dataset_corrupt_image_is_named(tmp_path: Path, container: str) -> None:
    root = tmp_path / "tree"
    _write_tree(root, ".png")
    (root / "train" / "dog" / "0001.png").write_bytes(b"\x89PNG\r\n\x1a\n but then garbage")
    source = root if container == "folder" else _tar(root, tmp_path / "tree.tar.gz", "tree")
    with pytest.raises(ValueError, match="corrupt or unreadable image") as info:
        _load(source, tmp_path)
    assert "dog/0001.png" in str(info.value)
    assert str(source) in str(info.value), "the message must say which data source holds the image"


@pytest.mark.parametrize("container", ["folder", "tar"])
def test_load_dataset_class_names_must_match_between_train_and_test(tmp_path: Path, container: str) -> None:
    root = tmp_path / "tree"
    for split, classes in (("train", ("cat", "dog")), ("test", ("cat", "bird"))):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            (root / split / name / "0.png").write_bytes(_png_bytes())
    source = root if container == "folder" else _tar(root, tmp_path / "tree.tar", "tree")
    with pytest.raises(ValueError, match="class names differ between train and test") as info:
        _load(source, tmp_path)
    message = str(info.value)
    assert "only in train ['dog']" in message and "only in test ['bird']" in message and str(source) in message


@pytest.mark.parametrize("container", ["folder", "tar"])
def test_load_dataset_rejects_images_that_are_not_32x32(tmp_path: Path, container: str) -> None:
    root = tmp_path / "tree"
    _write_tree(root, ".png")
    (root / "test" / "ship" / "0000.png").write_bytes(_png_bytes((31, 32)))
    source = root if container == "folder" else _tar(root, tmp_path / "tree.tar", "tree")
    with pytest.raises(ValueError, match="is 31x32; CIFAR-style data sets must be 32x32") as info:
        _load(source, tmp_path)
    assert "ship/0000.png" in str(info.value) and str(source) in str(info.value)


def test_load_dataset_split_without_images_is_named(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    (root / "train" / "cat").mkdir(parents=True)
    (root / "train" / "cat" / "0.png").write_bytes(_png_bytes())
    (root / "test" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"no images found under test/<class>/") as info:
        _load(root, tmp_path)
    assert str(root) in str(info.value)


def test_load_dataset_official_folder_missing_a_batch_is_named(tmp_path: Path) -> None:
    batches = tmp_path / "cifar-10-batches-py"
    _write_official(batches)
    (batches / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="lacks 'data_batch_3'") as info:
        _load(batches, tmp_path)
    assert str(batches) in str(info.value)


@pytest.mark.parametrize("container", ["folder", "tar.gz"])
def test_load_dataset_corrupt_official_batch_is_named(tmp_path: Path, container: str) -> None:
    batches = tmp_path / "cifar-10-batches-py"
    _write_official(batches)
    (batches / "test_batch").write_bytes(b"\x80\x02}q\x00(truncated")
    source = batches if container == "folder" else _tar(batches, tmp_path / "c.tar.gz", "cifar-10-batches-py")
    with pytest.raises(ValueError, match="corrupt CIFAR-10 batch") as info:
        _load(source, tmp_path)
    assert "test_batch" in str(info.value) and str(source) in str(info.value)


def test_load_dataset_download_without_a_network_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No network (every request fails as a failed DNS look-up does): a RuntimeError that names the folder and
    says to pass a downloaded copy with --data. Simulated, so it runs the same online and offline."""
    requests = []

    def unreachable(request, *args, **kwargs):
        requests.append(getattr(request, "full_url", request))
        raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    target = tmp_path / "new"
    with pytest.raises(RuntimeError, match="offline") as info:
        _load(target, tmp_path, download=True)
    assert requests and all("cifar-10" in url for url in requests), requests
    assert str(target) in str(info.value) and "--data" in str(info.value)


# ------------------------------------------------------------------ split_validation


def _indexed(n: int) -> tuple[np.ndarray, np.ndarray]:
    images = np.arange(n * 2).reshape(n, 2)  # row i holds (2i, 2i + 1): its own index
    return images, np.arange(n) % 10


@pytest.mark.parametrize("val_size", [0, 1, 37, 99])
def test_split_validation_sizes_and_disjoint_cover(val_size: int) -> None:
    images, labels = _indexed(100)
    train_x, train_y, val_x, val_y = split_validation(images, labels, val_size, seed=3)
    assert len(train_x) == len(train_y) == 100 - val_size and len(val_x) == len(val_y) == val_size
    train_ids, val_ids = train_x[:, 0] // 2, val_x[:, 0] // 2
    assert not set(train_ids) & set(val_ids)
    assert sorted([*train_ids, *val_ids]) == list(range(100))
    np.testing.assert_array_equal(train_y, labels[train_ids])  # labels travel with their images
    np.testing.assert_array_equal(val_y, labels[val_ids])
    assert (np.diff(train_ids) > 0).all() and (np.diff(val_ids) > 0).all(), "each part keeps the original order"


def test_split_validation_depends_only_on_its_seed() -> None:
    images, labels = _indexed(1000)
    first = split_validation(images, labels, 100, seed=0)
    again = split_validation(images, labels, 100, seed=0)
    other = split_validation(images, labels, 100, seed=1)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[2], other[2])


@pytest.mark.parametrize("val_size", [-1, 100, 1000])
def test_split_validation_rejects_a_bad_size(val_size: int) -> None:
    images, labels = _indexed(100)
    with pytest.raises(ValueError, match=rf"--val-size must be in \[0, 99\], got {val_size}"):
        split_validation(images, labels, val_size)
