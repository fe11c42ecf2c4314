"""The catalogue of ``unsupseg download``: per benchmark its archives (URLs, sizes, published
checksums, where their folders go, how many files each must hold), licence and splits; the transfer
and verification code is in ``download``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from unsupseg._io import atomic_write_text
from unsupseg.errors import DataError


@dataclass(frozen=True)
class Move:
    """After extraction, the one path matching ``src`` (a glob in the archive) goes to ``dest``."""

    src: str
    dest: str  # relative to the dataset root


@dataclass(frozen=True)
class Expect:
    """``pattern`` (a glob relative to the root, under one Move's dest) matches ``count`` files."""

    pattern: str
    count: int | None  # None: at least one


@dataclass(frozen=True)
class Archive:
    file: str
    url: str
    part: str  # images | labels | lists: what --only selects
    size: str  # for help and docs
    moves: tuple[Move, ...]
    expect: tuple[Expect, ...]
    checksum: tuple[str, str] | None = None  # (hashlib name, hex digest), only when published
    checksum_source: str = ""
    login: str | None = None  # page of a source that needs an account: never fetched without --mirror


@dataclass(frozen=True)
class Source:
    name: str
    title: str
    size: str
    licence: str
    archives: tuple[Archive, ...]
    splits: tuple[str, ...]  # build_dataset must open these after a full install
    finish: Callable[[Path], list[str]] | None = None  # derived files; returns what it wrote


_COCO_MD5 = "PaddlePaddle's detection download utility; COCO itself publishes none"


def _voc_trainaug(root: Path) -> list[str]:
    """Leopart's trainaug list: every SegmentationClassAug id that is not in VOC 2012 seg val.

    SegmentationClassAug holds the 10,582 trainaug masks plus the 1,449 val masks (12,031 files).
    """
    base = root / "pascalvoc" / "VOCdevkit" / "VOC2012"
    aug, sets = base / "SegmentationClassAug", base / "ImageSets" / "Segmentation"
    target = sets / "trainaug.txt"
    if not aug.is_dir() or not (sets / "val.txt").is_file() or target.is_file():
        return []
    val = set((sets / "val.txt").read_text(encoding="utf-8").split())
    ids = sorted(p.stem for p in aug.glob("*.png") if p.stem not in val)
    atomic_write_text(target, "".join(f"{i}\n" for i in ids))
    return [target.relative_to(root).as_posix()]


_COCO = Source(
    name="cocostuff27",
    title="COCO-Stuff 164k with IIC's curated lists (cocostuff27, cocostuff171, coco81)",
    size="≈19.5 GB",
    licence="COCO images: Flickr terms of use; COCO/COCO-Stuff annotations: CC BY 4.0; IIC lists: no licence stated "
            "(IIC code: MIT)",
    archives=(
        Archive(
            "train2017.zip",
            "http://images.cocodataset.org/zips/train2017.zip",
            "images",
            "18 GB",
            (Move("train2017", "cocostuff/images/train2017"),),
            (Expect("cocostuff/images/train2017/*.jpg", 118_287),),
            ("md5", "cced6f7f71b7629ddf16f17bbcfab6b2"),
            _COCO_MD5,
        ),
        Archive(
            "val2017.zip",
            "http://images.cocodataset.org/zips/val2017.zip",
            "images",
            "0.8 GB",
            (Move("val2017", "cocostuff/images/val2017"),),
            (Expect("cocostuff/images/val2017/*.jpg", 5_000),),
            ("md5", "442b8da7639aecaf257c1dceb8ba8c80"),
            _COCO_MD5,
        ),
        Archive(
            "stuffthingmaps_trainval2017.zip",
            "http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/stuffthingmaps_trainval2017.zip",
            "labels",
            "659 MB",
            (Move("train2017", "cocostuff/annotations/train2017"), Move("val2017", "cocostuff/annotations/val2017")),
            (
                Expect("cocostuff/annotations/train2017/*.png", 118_287),
                Expect("cocostuff/annotations/val2017/*.png", 5_000),
            ),
        ),
        Archive(
            "COCOStuff164kCurated.tar.gz",
            "https://www.robots.ox.ac.uk/~xuji/datasets/COCOStuff164kCurated.tar.gz",
            "lists",
            "small",
            (Move("**/curated", "cocostuff/curated"),),
            (
                Expect("cocostuff/curated/train2017/Coco164kFull_Stuff_Coarse.txt", 1),
                Expect("cocostuff/curated/val2017/Coco164kFull_Stuff_Coarse.txt", 1),
                Expect("cocostuff/curated/val2017/Coco164kFull_Stuff_Coarse_7.txt", 1),
            ),
        ),
    ),
    splits=("train", "val"),
)

_CITYSCAPES_LOGIN = "https://www.cityscapes-dataset.com/downloads/"
_CITYSCAPES = Source(
    name="cityscapes27",
    title="Cityscapes fine annotations (cityscapes27); needs a free account",
    size="≈11.2 GB",
    licence="Cityscapes licence: non-commercial research and teaching only, no redistribution",
    archives=(
        Archive(
            "leftImg8bit_trainvaltest.zip", "https://www.cityscapes-dataset.com/file-handling/?packageID=3",
            "images", "11 GB",
            (Move("leftImg8bit", "cityscapes/leftImg8bit"),),
            (Expect("cityscapes/leftImg8bit/train/*/*_leftImg8bit.png", 2_975),
             Expect("cityscapes/leftImg8bit/val/*/*_leftImg8bit.png", 500),
             Expect("cityscapes/leftImg8bit/test/*/*_leftImg8bit.png", 1_525)),
            ("sha1", "2c0b77ce9933cc635adda307fbba5566f5d9d404"), "GluonCV's Cityscapes preparation script",
            login=_CITYSCAPES_LOGIN,
        ),
        Archive(
            "gtFine_trainvaltest.zip", "https://www.cityscapes-dataset.com/file-handling/?packageID=1",
            "labels", "241 MB",
            (Move("gtFine", "cityscapes/gtFine"),),
            (Expect("cityscapes/gtFine/train/*/*_gtFine_labelIds.png", 2_975),
             Expect("cityscapes/gtFine/val/*/*_gtFine_labelIds.png", 500)),
            ("sha1", "99f532cb1af174f5fcc4c5bc8feea8c66246ddbc"), "GluonCV's Cityscapes preparation script",
            login=_CITYSCAPES_LOGIN,
        ),
    ),
    splits=("train", "val"),
)

_VOC = Source(
    name="voc21",
    title="PASCAL VOC 2012 segmentation + SegmentationClassAug (voc21; trainaug for Leopart)",
    size="≈2.0 GB",
    licence="VOC: images under Flickr terms of use, annotations for research; SBD-derived Aug masks: research use",
    archives=(
        Archive(
            "VOCtrainval_11-May-2012.tar", "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
            "images", "1.9 GB",
            (Move("VOCdevkit/VOC2012", "pascalvoc/VOCdevkit/VOC2012"),),
            (Expect("pascalvoc/VOCdevkit/VOC2012/JPEGImages/*.jpg", 17_125),
             Expect("pascalvoc/VOCdevkit/VOC2012/SegmentationClass/*.png", 2_913),
             Expect("pascalvoc/VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt", 1),
             Expect("pascalvoc/VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt", 1)),
            ("md5", "6cd6e144f989b92b3379bac3b3de84fd"), "torchvision.datasets.VOCSegmentation",
        ),
        Archive(
            "SegmentationClassAug.zip", "https://www.dropbox.com/s/oeu149j8qtbs1x0/SegmentationClassAug.zip?dl=1",
            "labels", "small",
            (Move("SegmentationClassAug", "pascalvoc/VOCdevkit/VOC2012/SegmentationClassAug"),),
            (Expect("pascalvoc/VOCdevkit/VOC2012/SegmentationClassAug/*.png", 12_031),),
        ),
    ),
    splits=("train", "val", "trainaug"),
    finish=_voc_trainaug,
)

_POTSDAM = Source(
    name="potsdam3",
    title="ISPRS Potsdam as IIC's 200x200 tiles (potsdam3, potsdam6)",
    size="size not published",
    licence="ISPRS benchmark data: research use under ISPRS terms; IIC tiles derived from it",
    archives=(
        Archive(
            "Potsdam.tar.gz", "https://www.robots.ox.ac.uk/~xuji/datasets/Potsdam.tar.gz",
            "images", "size not published",
            (Move("**/imgs", "potsdam/imgs"), Move("**/gt", "potsdam/gt"),
             Move("**/labelled_train.txt", "potsdam/labelled_train.txt"),
             Move("**/labelled_test.txt", "potsdam/labelled_test.txt"),
             Move("**/unlabelled_train.txt", "potsdam/unlabelled_train.txt")),
            (Expect("potsdam/imgs/*.mat", None), Expect("potsdam/gt/*.mat", None),
             Expect("potsdam/labelled_train.txt", 1), Expect("potsdam/labelled_test.txt", 1),
             Expect("potsdam/unlabelled_train.txt", 1)),
        ),
    ),
    splits=("train", "val"),
)

# Tests substitute entries here (monkeypatch.setitem); every function looks names up at call time.
CATALOGUE: dict[str, Source] = {s.name: s for s in (_COCO, _CITYSCAPES, _VOC, _POTSDAM)}
SAME_FILES = {"cocostuff171": "cocostuff27", "coco81": "cocostuff27", "potsdam6": "potsdam3"}
_ALIASES = {"coco171": "cocostuff171", "cocostuff81": "coco81", "cityscapes": "cityscapes27",
            "pascalvoc": "voc21", "potsdam": "potsdam3"}


def resolve(name: str) -> tuple[str, Source]:
    """(dataset key for build_dataset, its Source) for a name or alias."""
    key = _ALIASES.get(name.lower(), name.lower())
    source = CATALOGUE.get(SAME_FILES.get(key, key))
    if source is None:
        known = ", ".join([*CATALOGUE, *SAME_FILES])
        raise DataError(f"no download known for dataset {name!r}; downloadable: {known}")
    return key, source


def catalogue_help() -> str:
    """One paragraph per dataset for ``unsupseg download --help``."""
    lines = []
    for source in CATALOGUE.values():
        same = [k for k, v in SAME_FILES.items() if v == source.name]
        names = source.name + (f" (also {', '.join(same)})" if same else "")
        files = ", ".join(f"{a.file} {a.size}" for a in source.archives)
        lines.append(f"{names}: {source.size}. {files}. Licence: {source.licence}.")
    return "\n\n".join(lines)
