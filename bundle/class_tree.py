"""The class-folder data layout, read from a folder or a .tar/.tar.gz archive without torch.

Layouts: `train/<class>/<image>` and `test/<class>/<image>` (the shared
CIFAR-10 copy; an optional top-level folder is allowed), or plain
`<class>/<image>` with no split folders. Only files with the documented image
suffixes count. The trainer decodes whole splits from it, the offline
predictor scores a split (`--evaluate`), and the tests and benchmarks take a
few test images per class.
"""

from __future__ import annotations

import os
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from bundle.preprocess import IMAGE_SUFFIXES, read_image_file

SPLITS = ("train", "test")
DATA_ENV = "CIFAR10_DATA"  # where the trainer, the tests and the benchmarks read CIFAR-10 from when told nothing
# The development layout: the shared JPEG copy lies beside the repository (the tests' and benchmarks' default).
SHARED_COPY = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpeg.tar.gz"


def data_source(default: str | Path = SHARED_COPY) -> Path:
    """$CIFAR10_DATA, else `default`."""
    return Path(os.environ.get(DATA_ENV) or default)


@dataclass(frozen=True)
class LabelledFile:
    """One image of the tree: its split ("train", "test" or None), class folder, name for messages, and content
    (bytes read from an archive, or a file to read: `read` raises ImageError for what cannot be read, such as a
    FIFO, a dangling or looping symbolic link, or an oversized file, and the caller reports it)."""

    split: str | None
    label: str
    name: str
    content: bytes | Path

    def read(self) -> bytes:
        return read_image_file(self.content) if isinstance(self.content, Path) else self.content


def iter_labelled_files(source: Path, split: str | None = None) -> Iterator[LabelledFile]:
    """Yield the images of the class-folder tree or archive at `source`, in archive (or sorted folder) order.

    `split` keeps one split; with split folders absent, every image counts as that split. Raises ValueError
    naming `source` when it is neither a folder nor a readable tar archive.
    """
    if source.is_dir():
        yield from _iter_folder(source, split)
    elif source.is_file():
        yield from _iter_archive(source, split)
    else:  # a FIFO or a device such as /dev/zero would block or never end
        raise ValueError(f"{str(source)!r} is neither a folder nor a regular file (a tar archive of class folders)")


def first_per_class(source: Path, split: str, per_class: int) -> list[LabelledFile]:
    """The first `per_class` images of each class in `split`, ordered by class; stops reading early once
    the archive has moved past that split (the shared copy stores test/ first)."""
    found: dict[str, list[LabelledFile]] = {}
    for file in iter_labelled_files(source, None):
        if file.split not in (split, None):
            if found:
                break
            continue
        images = found.setdefault(file.label, [])
        if len(images) < per_class:
            images.append(file)
    return [file for label in sorted(found) for file in found[label]]


def _iter_folder(root: Path, split: str | None) -> Iterator[LabelledFile]:
    # Every entry with an image suffix is yielded, readable or not (FIFOs, broken links): reading reports it.
    splits = [s for s in SPLITS if (root / s).is_dir()]
    if not splits:
        for file in sorted(root.glob("*/*")):
            if file.suffix.lower() in IMAGE_SUFFIXES and not file.is_dir():
                yield LabelledFile(split, file.parent.name, str(file), file)
        return
    for name in splits:
        if split not in (None, name):
            continue
        for file in sorted((root / name).glob("*/*")):
            if file.suffix.lower() in IMAGE_SUFFIXES and not file.is_dir():
                yield LabelledFile(name, file.parent.name, str(file), file)


def _iter_archive(archive: Path, split: str | None, read: bool = True) -> Iterator[LabelledFile]:
    try:
        with tarfile.open(archive) as tar:
            for member in tar:
                parts = PurePosixPath(member.name).parts
                if (
                    not member.isfile()
                    or len(parts) < 2
                    or PurePosixPath(parts[-1]).suffix.lower() not in IMAGE_SUFFIXES
                ):
                    continue
                member_split = parts[-3] if len(parts) >= 3 and parts[-3] in SPLITS else None
                if split is not None and member_split not in (split, None):
                    continue
                content = tar.extractfile(member).read() if read else b""
                yield LabelledFile(member_split or split, parts[-2], f"{archive}:{member.name}", content)
    except (tarfile.TarError, EOFError, zlib.error) as err:
        raise ValueError(f"{str(archive)!r} is not a readable tar archive of class folders ({err})") from err
