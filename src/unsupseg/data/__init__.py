"""Image folders, benchmark datasets, label maps, offline crops and transforms.

Labels are H x W int64 arrays with classes 0..C-1 and ignore = -1 (docs/protocols.md §0).
"""

from unsupseg.data.base import FileDataset, Sample, SegDataset
from unsupseg.data.crops import (
    CROP_KINDS,
    CropBox,
    CroppedDataset,
    CropView,
    crop_boxes,
    crop_size,
    five_crop_boxes,
    prepare_crops,
    ten_crop_boxes,
)
from unsupseg.data.datasets import (
    DATASET_NAMES,
    ImageFolder,
    PotsdamDataset,
    build_dataset,
)
from unsupseg.data.images import (
    IMAGE_EXTENSIONS,
    DataWarning,
    check_image_header,
    image_size,
    load_image,
    load_label,
)
from unsupseg.data.labelmaps import IGNORE_INDEX, LabelMap
from unsupseg.data.transforms import Preprocess

__all__ = [
    "CROP_KINDS",
    "DATASET_NAMES",
    "IGNORE_INDEX",
    "IMAGE_EXTENSIONS",
    "CropBox",
    "CropView",
    "CroppedDataset",
    "DataWarning",
    "FileDataset",
    "ImageFolder",
    "LabelMap",
    "PotsdamDataset",
    "Preprocess",
    "Sample",
    "SegDataset",
    "build_dataset",
    "check_image_header",
    "image_size",
    "crop_boxes",
    "crop_size",
    "five_crop_boxes",
    "load_image",
    "load_label",
    "prepare_crops",
    "ten_crop_boxes",
]
