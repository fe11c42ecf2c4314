"""Label maps against tables written here independently from docs/protocols.md §4."""

from __future__ import annotations

import numpy as np
import pytest

from unsupseg.data import labelmaps
from unsupseg.errors import ConfigError, DataError

# docs/protocols.md §4.1, coarse id → fine ids, copied row by row from the table (not from the code).
COARSE_TO_FINE = {
    0: [71, 72, 73, 74, 75, 76],
    1: [77, 78, 79, 80, 81, 82],
    2: [51, 52, 53, 54, 55, 56, 57, 58, 59, 60],
    3: [61, 62, 63, 64, 65, 66, 67, 68, 69, 70],
    4: [83, 84, 85, 86, 87, 88, 89, 90],
    5: [43, 44, 45, 46, 47, 48, 49, 50],
    6: [25, 26, 27, 28, 29, 30, 31, 32],
    7: [15, 16, 17, 18, 19, 20, 21, 22, 23, 24],
    8: [9, 10, 11, 12, 13, 14],
    9: [0],
    10: [33, 34, 35, 36, 37, 38, 39, 40, 41, 42],
    11: [1, 2, 3, 4, 5, 6, 7, 8],
    12: [101, 102],
    13: [100, 113, 114, 115, 116, 117],
    14: [120, 121, 152, 169],
    15: [97, 106, 107, 109, 111, 122, 129, 132, 155, 160, 164],
    16: [99, 131, 138, 142],
    17: [91, 92, 103, 104, 108, 130, 136, 140, 151, 166, 167],
    18: [170, 171, 172, 173, 174, 175, 176],
    19: [179, 180],
    20: [94, 95, 127, 150, 157, 165],
    21: [110, 124, 125, 135, 139, 143, 144, 146, 148, 153, 158],
    22: [93, 96, 118, 123, 128, 133, 141, 162, 168],
    23: [105, 156],
    24: [126, 134, 149, 159, 161, 181],
    25: [98, 112, 137, 145, 163],
    26: [119, 147, 154, 177, 178],
}
COARSE_NAMES = [
    "electronic", "appliance", "food-things", "furniture-things", "indoor", "kitchen", "accessory",
    "animal", "outdoor", "person", "sports", "vehicle", "ceiling", "floor", "food-stuff",
    "furniture-stuff", "rawmaterial", "textile", "wall", "window", "building", "ground", "plant",
    "sky", "solid", "structural", "water",
]
UNUSED = [11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90]


def test_coco27_table_is_a_partition_of_all_fine_ids():
    fine = sorted(f for ids in COARSE_TO_FINE.values() for f in ids)
    assert fine == list(range(182))  # guards the hand-written table itself


def test_coco27_maps_every_fine_id_and_255():
    raw = np.array(list(range(182)) + [255], dtype=np.uint8).reshape(1, -1)
    expected = np.empty(183, dtype=np.int64)
    for coarse, ids in COARSE_TO_FINE.items():
        expected[ids] = coarse
    expected[182] = -1
    out = labelmaps.COCO27(raw)
    assert out.dtype == np.int64 and out.shape == raw.shape
    np.testing.assert_array_equal(out[0], expected)
    assert list(labelmaps.COCO27.classes) == COARSE_NAMES


@pytest.mark.parametrize("value", [182, 200, 254])
def test_coco27_rejects_ids_beyond_181(value):
    with pytest.raises(DataError, match=rf"a/b.png: value\(s\) {value} are not valid"):
        labelmaps.COCO27(np.array([[0, value]], dtype=np.uint8), source="a/b.png")


def test_coco171_classes_and_hand_picked_ids():
    m = labelmaps.COCO171
    assert m.num_classes == 171
    picks = {0: 0, 10: 10, 12: 11, 24: 23, 26: 24, 27: 25, 30: 26, 43: 39, 45: 40, 64: 59,
             66: 60, 69: 61, 71: 62, 81: 72, 83: 73, 89: 79, 91: 80, 181: 170, 255: -1}
    out = m(np.array([list(picks)], dtype=np.uint8))
    np.testing.assert_array_equal(out[0], list(picks.values()))
    assert m.classes[0] == "person" and m.classes[79] == "toothbrush"
    assert m.classes[80] == "banner" and m.classes[170] == "wood"


def test_coco81_classes_and_hand_picked_ids():
    m = labelmaps.COCO81
    assert m.num_classes == 81
    picks = {0: 1, 1: 2, 10: 11, 12: 12, 89: 80, 91: 0, 120: 0, 181: 0, 255: -1}
    out = m(np.array([list(picks)], dtype=np.uint8))
    np.testing.assert_array_equal(out[0], list(picks.values()))
    assert m.classes[1] == "person" and m.classes[80] == "toothbrush"


@pytest.mark.parametrize("label_map", [labelmaps.COCO171, labelmaps.COCO81])
@pytest.mark.parametrize("unused", UNUSED)
def test_coco171_and_81_raise_on_unused_ids(label_map, unused):
    # CAUSE would silently turn these into class 0; we refuse.
    with pytest.raises(DataError, match=rf"x.png: value\(s\) {unused} are not valid"):
        label_map(np.array([[0, unused]], dtype=np.uint8), source="x.png")


def test_coco_maps_accept_16_bit_input_and_reject_large_values():
    np.testing.assert_array_equal(labelmaps.COCO27(np.array([5, 255], dtype=np.uint16)), [11, -1])
    with pytest.raises(DataError, match="1000"):
        labelmaps.COCO27(np.array([5, 1000], dtype=np.uint16))


CITYSCAPES = {0: -1, 1: -1, 2: -1, 3: -1, 4: -1, 5: -1, 6: -1, 7: 0, 8: 1, 9: 2, 10: 3, 11: 4,
              12: 5, 13: 6, 14: 7, 15: 8, 16: 9, 17: 10, 18: 11, 19: 12, 20: 13, 21: 14, 22: 15,
              23: 16, 24: 17, 25: 18, 26: 19, 27: 20, 28: 21, 29: 22, 30: 23, 31: 24, 32: 25,
              33: 26, 255: -1}


def test_cityscapes_every_label_id():
    out = labelmaps.CITYSCAPES27(np.array([list(CITYSCAPES)], dtype=np.uint8))
    np.testing.assert_array_equal(out[0], list(CITYSCAPES.values()))
    assert labelmaps.CITYSCAPES27.classes[0] == "road" and labelmaps.CITYSCAPES27.classes[26] == "bicycle"
    assert labelmaps.CITYSCAPES27.num_classes == 27


def test_cityscapes_unexpected_values_are_ignored():
    np.testing.assert_array_equal(
        labelmaps.CITYSCAPES27(np.array([34, 100, 254, 5000], dtype=np.uint16)), [-1, -1, -1, -1]
    )
    np.testing.assert_array_equal(labelmaps.CITYSCAPES27(np.array([-3, 8], dtype=np.int32)), [-1, 1])


def test_voc_255_and_above_20_are_ignored():
    raw = np.array([[0, 15, 20, 21, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(labelmaps.VOC21(raw), [[0, 15, 20, -1, -1]])
    assert labelmaps.VOC21.num_classes == 21 and labelmaps.VOC21.classes[15] == "person"


def test_camvid_void_is_ignored():
    raw = np.arange(13, dtype=np.uint8)
    np.testing.assert_array_equal(labelmaps.CAMVID11(raw), list(range(11)) + [-1, -1])
    assert labelmaps.CAMVID11.classes[6] == "sign/symbol"


def test_potsdam_maps():
    raw = np.array([0, 1, 2, 3, 4, 5, 255], dtype=np.uint8)
    np.testing.assert_array_equal(labelmaps.POTSDAM6(raw), [0, 1, 2, 3, 4, 5, -1])
    np.testing.assert_array_equal(labelmaps.POTSDAM3(raw), [0, 1, 2, 2, 0, 1, -1])


def test_potsdam_colours():
    colours = np.array(
        [[[255, 255, 255], [0, 0, 255], [0, 255, 255], [0, 255, 0], [255, 255, 0], [255, 0, 0],
          [10, 20, 30]]],
        dtype=np.uint8,
    )
    index = labelmaps.potsdam_colours_to_index(colours)
    np.testing.assert_array_equal(index, [[0, 1, 2, 3, 4, 5, 255]])
    np.testing.assert_array_equal(labelmaps.POTSDAM3(index), [[0, 1, 2, 2, 0, 1, -1]])


def test_label_map_rejects_float_labels():
    with pytest.raises(DataError, match="integers"):
        labelmaps.VOC21(np.zeros((2, 2), dtype=np.float32))


def test_identity_map():
    m = labelmaps.identity_map("mine", ["a", "b", "c"])
    np.testing.assert_array_equal(m(np.array([0, 2, 255], dtype=np.uint8)), [0, 2, -1])
    with pytest.raises(DataError, match="3"):
        m(np.array([3], dtype=np.uint8))
    with pytest.raises(ConfigError):
        labelmaps.identity_map("none", [])


def test_tables_are_read_only():
    with pytest.raises(ValueError):
        labelmaps.COCO27.table[0] = 3
