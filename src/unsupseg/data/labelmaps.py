"""Raw label values of each benchmark → class indices (ignore = -1), as numpy lookup tables.

Sources: docs/protocols.md §4 and docs/methods/cause.md §1.4. A map is either *lenient* (anything unexpected
becomes -1: Cityscapes, VOC, Potsdam, CamVid, as the reference code does) or *strict* (values
that cannot occur in a valid annotation raise ``DataError``: the COCO maps, where the reference's
zero-initialised output would silently turn an unknown id into class 0).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from unsupseg.errors import ConfigError, DataError

IGNORE_INDEX = -1
_INVALID = -2  # table entry of a strict map: this raw value must raise

# --- COCO-Stuff -----------------------------------------------------------------------------

# Fine ids are the 0-based values of the COCO-Stuff PNGs (COCO-Stuff label - 1), 255 = unlabelled.
COCO_STUFF_FINE_CLASSES = (
    # things 0-90 (ids marked unused in COCO 2017 keep their name so indices line up)
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "street sign", "stop sign", "parking meter", "bench", "bird",
    "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "hat",
    "backpack", "umbrella", "shoe", "eye glasses", "handbag", "tie", "suitcase", "frisbee", "skis",
    "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard",
    "surfboard", "tennis racket", "bottle", "plate", "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza",
    "donut", "cake", "chair", "couch", "potted plant", "bed", "mirror", "dining table", "window",
    "desk", "toilet", "door", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "blender", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush", "hair brush",
    # stuff 91-181
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage",
    "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds",
    "counter", "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble",
    "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog", "food-other",
    "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house", "leaves",
    "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper",
    "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing",
    "railroad", "river", "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf",
    "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone", "straw",
    "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable",
    "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile",
    "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
)
COCO_STUFF_UNLABELLED = 255
COCO_NUM_THINGS = 91  # fine ids 0-90 are things, 91-181 stuff
COCO_UNUSED_IDS = frozenset({11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90})  # never occur in 2017

COCO27_CLASSES = (
    "electronic", "appliance", "food-things", "furniture-things", "indoor", "kitchen",
    "accessory", "animal", "outdoor", "person", "sports", "vehicle", "ceiling", "floor",
    "food-stuff", "furniture-stuff", "rawmaterial", "textile", "wall", "window", "building",
    "ground", "plant", "sky", "solid", "structural", "water",
)

# Fine id (range) → coarse id, in the notation of docs/methods/cause.md §1.4 (STEGO's mapping). Unused ids
# keep the coarse class of their neighbours there, so COCO-27 maps every fine id 0-181.
_COCO27_FINE_TO_COARSE = """
0:9 1-8:11 9-14:8 15-24:7 25-32:6 33-42:10 43-50:5 51-60:2 61-70:3 71-76:0 77-82:1 83-90:4
91-92:17 93:22 94-95:20 96:22 97:15 98:25 99:16 100:13 101-102:12 103-104:17 105:23 106-107:15
108:17 109:15 110:21 111:15 112:25 113-117:13 118:22 119:26 120-121:14 122:15 123:22 124-125:21
126:24 127:20 128:22 129:15 130:17 131:16 132:15 133:22 134:24 135:21 136:17 137:25 138:16
139:21 140:17 141:22 142:16 143-144:21 145:25 146:21 147:26 148:21 149:24 150:20 151:17 152:14
153:21 154:26 155:15 156:23 157:20 158:21 159:24 160:15 161:24 162:22 163:25 164:15 165:20
166-167:17 168:22 169:14 170-176:18 177-178:26 179-180:19 181:24
"""

# --- Cityscapes, VOC, Potsdam, CamVid ---------------------------------------------------------

CITYSCAPES_FIRST_CLASS_ID = 7  # labelIds 0-6 are void; 7-33 are the 27 classes
CITYSCAPES27_CLASSES = (
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail",
    "bridge", "tunnel", "pole", "polegroup", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "caravan", "trailer", "train",
    "motorcycle", "bicycle",
)

VOC21_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

POTSDAM6_CLASSES = (
    "impervious surfaces", "building", "low vegetation", "tree", "car", "clutter",
)
# ISPRS colour coding of the Potsdam ground truth, in Potsdam-6 index order.
POTSDAM6_COLOURS = (
    (255, 255, 255), (0, 0, 255), (0, 255, 255), (0, 255, 0), (255, 255, 0), (255, 0, 0),
)
POTSDAM3_CLASSES = ("roads and cars", "buildings and clutter", "trees and vegetation")
_POTSDAM6_TO_3 = (0, 1, 2, 2, 0, 1)

CAMVID11_CLASSES = (
    "sky", "building", "pole", "road", "pavement", "tree", "sign/symbol", "fence", "car",
    "pedestrian", "bicyclist",
)


class LabelMap:
    """A vectorised lookup table from raw label values to class indices (ignore = -1).

    ``table[v]`` is the class of raw value ``v``. Values beyond the table map to -1 in a lenient
    map and raise ``DataError`` in a strict one, as do table entries marked invalid.
    """

    def __init__(self, name: str, classes: Sequence[str], table: np.ndarray, *, strict: bool):
        table = np.asarray(table, dtype=np.int64).copy()
        table.setflags(write=False)  # shared module-level constants must not be mutated
        if table.max() >= len(classes):
            raise ValueError(f"label map {name}: table refers to a class beyond {len(classes)}")
        self.name = name
        self.classes = tuple(classes)
        self.table = table
        self.strict = strict

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __call__(self, raw: np.ndarray, source: str | os.PathLike | None = None) -> np.ndarray:
        """Map a raw integer label array to an int64 array of class indices (-1 = ignore).

        ``source`` (the label file) only serves error messages.
        """
        raw = np.asarray(raw)
        if raw.dtype.kind not in "iu":
            raise DataError(
                f"{source or 'label'}: label values must be integers, got dtype {raw.dtype}"
            )
        size = len(self.table)
        if raw.size and (int(raw.min()) < 0 or int(raw.max()) >= size):
            inside = (raw >= 0) & (raw < size)
            if self.strict:
                self._reject(raw[~inside], source)
            out = np.full(raw.shape, IGNORE_INDEX, dtype=np.int64)
            out[inside] = self.table[raw[inside]]
        else:
            out = self.table[raw]
        if self.strict:
            invalid = out == _INVALID
            if invalid.any():
                self._reject(raw[invalid], source)
        return out

    def _reject(self, values: np.ndarray, source) -> None:
        shown = ", ".join(str(v) for v in np.unique(values)[:10].tolist())
        raise DataError(
            f"{source or 'label'}: value(s) {shown} are not valid {self.name} annotation ids "
            f"(valid: {self.valid_values_text()}); the file is corrupt or belongs to another dataset"
        )

    def valid_values_text(self) -> str:
        valid = np.flatnonzero(self.table != _INVALID)
        return _ranges_text(valid.tolist())

    def __repr__(self) -> str:
        kind = "strict" if self.strict else "lenient"
        return f"LabelMap({self.name!r}, {self.num_classes} classes, {kind})"


def _ranges_text(values: list[int]) -> str:
    parts: list[str] = []
    start = prev = None
    for v in values + [None]:
        if start is not None and (v is None or v != prev + 1):
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if v is not None and start is None:
            start = v
        prev = v
    return ", ".join(parts)


def _parse_ranges(spec: str) -> dict[int, int]:
    mapping: dict[int, int] = {}
    for item in spec.split():
        ids, target = item.split(":")
        first, _, last = ids.partition("-")
        for fine in range(int(first), int(last or first) + 1):
            mapping[fine] = int(target)
    return mapping


def _coco_table(fine_to_class: dict[int, int]) -> np.ndarray:
    # 256 entries cover every uint8 value; ids 182-254 and unlisted ids are invalid.
    table = np.full(256, _INVALID, dtype=np.int64)
    for fine, cls in fine_to_class.items():
        table[fine] = cls
    table[COCO_STUFF_UNLABELLED] = IGNORE_INDEX
    return table


def _lenient_table(size: int, pairs: dict[int, int]) -> np.ndarray:
    table = np.full(size, IGNORE_INDEX, dtype=np.int64)
    for raw, cls in pairs.items():
        table[raw] = cls
    return table


_COCO_USED_IDS = [i for i in range(len(COCO_STUFF_FINE_CLASSES)) if i not in COCO_UNUSED_IDS]
_COCO_USED_THINGS = [i for i in _COCO_USED_IDS if i < COCO_NUM_THINGS]

COCO27 = LabelMap(
    "cocostuff27", COCO27_CLASSES, _coco_table(_parse_ranges(_COCO27_FINE_TO_COARSE)), strict=True
)
COCO171 = LabelMap(
    "cocostuff171",
    [COCO_STUFF_FINE_CLASSES[i] for i in _COCO_USED_IDS],
    _coco_table({fine: k for k, fine in enumerate(_COCO_USED_IDS)}),
    strict=True,
)
COCO81 = LabelMap(
    "coco81",
    ["stuff"] + [COCO_STUFF_FINE_CLASSES[i] for i in _COCO_USED_THINGS],
    _coco_table(
        {fine: k + 1 for k, fine in enumerate(_COCO_USED_THINGS)}
        | {fine: 0 for fine in _COCO_USED_IDS if fine >= COCO_NUM_THINGS}
    ),
    strict=True,
)
CITYSCAPES27 = LabelMap(
    "cityscapes27",
    CITYSCAPES27_CLASSES,
    _lenient_table(
        256, {CITYSCAPES_FIRST_CLASS_ID + k: k for k in range(len(CITYSCAPES27_CLASSES))}
    ),
    strict=False,
)
VOC21 = LabelMap("voc21", VOC21_CLASSES, _lenient_table(256, {k: k for k in range(21)}), strict=False)
POTSDAM6 = LabelMap(
    "potsdam6", POTSDAM6_CLASSES, _lenient_table(256, {k: k for k in range(6)}), strict=False
)
POTSDAM3 = LabelMap(
    "potsdam3", POTSDAM3_CLASSES, _lenient_table(256, dict(enumerate(_POTSDAM6_TO_3))), strict=False
)
CAMVID11 = LabelMap(
    "camvid", CAMVID11_CLASSES, _lenient_table(256, {k: k for k in range(11)}), strict=False
)


def identity_map(name: str, classes: Sequence[str], unlabelled: int = 255) -> LabelMap:
    """A strict map for labels stored as class indices 0..C-1 with ``unlabelled`` → -1."""
    if not 0 < len(classes) <= unlabelled:
        raise ConfigError(
            f"{name}: need between 1 and {unlabelled} class names (value {unlabelled} marks "
            f"unlabelled pixels), got {len(classes)}"
        )
    table = np.full(max(len(classes), unlabelled + 1), _INVALID, dtype=np.int64)
    table[: len(classes)] = np.arange(len(classes))
    table[unlabelled] = IGNORE_INDEX
    return LabelMap(name, classes, table, strict=True)


def potsdam_colours_to_index(rgb: np.ndarray, source: str | os.PathLike | None = None) -> np.ndarray:
    """Turn an H x W x 3 ISPRS colour label into Potsdam-6 indices (uint8, unknown colour → 255)."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise DataError(f"{source or 'label'}: expected an H x W x 3 colour label, got {rgb.shape}")
    out = np.full(rgb.shape[:2], 255, dtype=np.uint8)
    for index, colour in enumerate(POTSDAM6_COLOURS):
        out[(rgb == colour).all(axis=2)] = index
    return out
