"""What every dataset is: samples with stable ids, a fingerprint, the benchmark's preprocessing.

The benchmark loaders (``datasets``) and the offline crops (``crops``) both build on these classes,
so they live in a module of their own that imports neither.
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from unsupseg.data.images import image_size, load_image, load_label
from unsupseg.data.labelmaps import IGNORE_INDEX
from unsupseg.data.transforms import Preprocess
from unsupseg.errors import DataError

LabelMapper = Callable[[np.ndarray, Path], np.ndarray]


@dataclass(frozen=True, eq=False)  # holds arrays: compare by identity, not by field values
class Sample:
    """One item of a dataset: RGB image and H x W int64 label (ignore = -1) or None."""

    id: str
    image: Image.Image
    label: np.ndarray | None


class SegDataset:
    """Base of every dataset: ids, samples, fingerprint and the benchmark's preprocessing.

    Subclasses implement ``_load(i)`` and ``files()`` and set the (mode, interpolation) pairs
    ``eval_transform`` / ``train_transform``.
    """

    ignore_index: int = IGNORE_INDEX
    eval_transform: tuple[str, str] = ("short_crop", "nearest")
    train_transform: tuple[str, str] = ("short_crop", "nearest")

    def __init__(self, name: str, root: Path, ids: Sequence[str], classes: Sequence[str] | None):
        self.name = name
        self.root = Path(root)
        self.ids = list(ids)
        self.classes = None if classes is None else list(classes)

    @property
    def num_classes(self) -> int | None:
        return None if self.classes is None else len(self.classes)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Sample:
        i = operator.index(index)
        n = len(self.ids)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"{self.name}: index {index} out of range for {n} samples")
        return self._load(i)

    def _load(self, i: int) -> Sample:
        raise NotImplementedError

    def files(self) -> list[Path]:
        """Every file whose content the samples are read from."""
        raise NotImplementedError

    def image_size(self, i: int) -> tuple[int, int]:
        """``(width, height)`` of sample ``i``'s image (subclasses read it without decoding)."""
        return self[i].image.size

    def fingerprint(self) -> str:
        """sha1 of the dataset name and each file's relative path, size and mtime (no reads)."""
        entries = []
        for path in self.files():
            try:
                rel = path.relative_to(self.root).as_posix()
            except ValueError:
                rel = path.as_posix()
            try:
                st = path.stat()
                entries.append(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}")
            except OSError:
                entries.append(f"{rel}\0missing")
        digest = hashlib.sha1(f"{self.name}\n".encode())
        for entry in sorted(entries):
            digest.update(entry.encode("utf-8", "surrogateescape") + b"\n")
        return digest.hexdigest()

    def eval_preprocess(self, resolution: int, multiple: int = 1, interpolation: str | None = None) -> Preprocess:
        """The test-time transform of this dataset's benchmark protocol (docs/protocols.md §5.3).

        ``interpolation`` replaces the protocol's image interpolation (labels are always resized
        nearest): VOC is squashed with nearest for CAUSE, but bilinear for Leopart."""
        mode, default = self.eval_transform
        return Preprocess(resolution, mode, interpolation or default, multiple)

    def train_preprocess(self, resolution: int, multiple: int = 1) -> Preprocess:
        """The train-time transform of this dataset's benchmark protocol (docs/protocols.md §5.2)."""
        mode, interpolation = self.train_transform
        return Preprocess(resolution, mode, interpolation, multiple)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, root={str(self.root)!r}, n={len(self)})"


class FileDataset(SegDataset):
    """Image files with optional same-grid label files and a label map (most benchmarks)."""

    def __init__(
        self,
        name: str,
        root: Path,
        ids: Sequence[str],
        image_paths: Sequence[Path],
        label_paths: Sequence[Path] | None,
        classes: Sequence[str] | None,
        label_map: LabelMapper | None,
        *,
        eval_transform: tuple[str, str] | None = None,
        train_transform: tuple[str, str] | None = None,
    ):
        super().__init__(name, root, ids, classes)
        self.image_paths = [Path(p) for p in image_paths]
        self.label_paths = None if label_paths is None else [Path(p) for p in label_paths]
        self.label_map = label_map
        if eval_transform is not None:
            self.eval_transform = eval_transform
        if train_transform is not None:
            self.train_transform = train_transform

    def files(self) -> list[Path]:
        return self.image_paths + (self.label_paths or [])

    def image_size(self, i: int) -> tuple[int, int]:
        return image_size(self.image_paths[i], exif_transpose=self.label_paths is None)

    def _load(self, i: int) -> Sample:
        image_path = self.image_paths[i]
        if self.label_paths is None:
            return Sample(self.ids[i], load_image(image_path), None)
        # Annotations are drawn on the stored pixel grid: EXIF orientation must not rotate the photo.
        image = load_image(image_path, exif_transpose=False)
        label_path = self.label_paths[i]
        raw = load_label(label_path)
        check_same_size(image, raw, image_path, label_path)
        return Sample(self.ids[i], image, self.label_map(raw, label_path))


def check_same_size(image: Image.Image, label: np.ndarray, image_path: Path, label_path: Path) -> None:
    width, height = image.size
    if label.shape[:2] != (height, width):
        raise DataError(
            f"label {label_path} is {label.shape[1]}x{label.shape[0]} but image {image_path} is "
            f"{width}x{height} (W x H); a label must have its image's size"
        )
