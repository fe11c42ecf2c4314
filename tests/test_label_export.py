"""Names and merges (labels.yaml) and the exports, each read back by the format's own reader."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import unsupseg
from tests.conftest import write_images
from unsupseg import labels as labels_file
from unsupseg.errors import ConfigError

UNSUPSEG = Path(sys.executable).parent / "unsupseg"
DM_PYTHON = Path(os.environ.get("UNSUPSEG_DATUMARO_PYTHON", "/tmp/dm-venv/bin/python"))   # scripts/test.sh sets it


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "UNSUPSEG_PROGRESS": "0", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run([str(UNSUPSEG), *map(str, args)], env=env, capture_output=True, text=True)


def message(stderr: str) -> str:
    """The error message as one line (the terminal may wrap it at spaces)."""
    return " ".join(stderr.split())


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """An 11-cluster k-means run on 3 photos, with its plain masks (no labels.yaml)."""
    tmp = tmp_path_factory.mktemp("label")
    write_images(tmp / "imgs", 3)
    unsupseg.fit("kmeans", images=tmp / "imgs", out=tmp / "run", clusters=11, backbone="efficientnet_lite0",
                 overrides=["data.resolution=48", "params.restarts=1", f"cache_dir={tmp / 'cache'}"],
                 log=lambda m: None)
    unsupseg.segment(tmp / "run", [tmp / "imgs"], tmp / "plain")
    return tmp


@pytest.fixture
def labelled(run, tmp_path):
    """A copy of the run, named and merged, with its masks (and confidence)."""
    shutil.copytree(run / "run", tmp_path / "run")
    shutil.copytree(run / "imgs", tmp_path / "imgs")
    plain = {p.name: np.asarray(Image.open(p)) for p in (run / "plain").glob("img_??.png")}
    present = sorted(set(np.concatenate([m.ravel() for m in plain.values()]).tolist()))
    assert len(present) >= 3, present
    a, b = present[-2:]
    unsupseg.label(tmp_path / "run", names={present[0]: "sky"}, merges={"building": [a, b]})
    unsupseg.segment(tmp_path / "run", [tmp_path / "imgs"], tmp_path / "masks", confidence=True)
    return tmp_path, plain, (present[0], a, b)


# -- labels.yaml ----------------------------------------------------------------------------------


def test_classes_are_groups_in_order_of_their_smallest_cluster():
    lab = labels_file.validate(5, {0: "sky", 3: "road"}, {"building": [4, 1]})
    assert lab.groups == [(0,), (1, 4), (2,), (3,)]
    assert lab.classes == ["sky", "building", "cluster_2", "road"]
    assert lab.lookup.tolist() == [0, 1, 2, 3, 1]
    assert labels_file.identity(3).apply(np.array([[2, 0, 1]])).tolist() == [[2, 0, 1]]


@pytest.mark.parametrize("names, merges, message", [
    ({99: "x"}, {}, "cluster 99 does not exist (this run has clusters 0 to 10)"),
    ({}, {"b": [4, 4]}, "merge 'b' joins cluster 4 with itself"),
    ({1: " "}, {}, "a name must be non-empty"),
    ({1: "road", 2: "road"}, {}, "the name 'road' is given twice"),
    ({3: "cluster_2"}, {}, "the name 'cluster_2' is given twice"),
    ({}, {"a": [1, 2], "b": [2, 3]}, "cluster 2 is in two merges"),
    ({1: "x"}, {"a": [1, 2]}, "cluster 1 is named 'x' and also merged into 'a'"),
    ({}, {"a": [5]}, "needs at least two clusters"),
])
def test_bad_labels_are_named(names, merges, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        labels_file.validate(11, names, merges)


def test_label_writes_yaml_that_reads_back_and_reset_reverts(run, tmp_path):
    shutil.copytree(run / "run", tmp_path / "run")
    unsupseg.label(tmp_path / "run", names={0: "sky: blue", 3: "road"}, merges={"building": [4, 7]})
    unsupseg.label(tmp_path / "run", names={5: "tree"})               # adds to what is there
    lab = labels_file.load(tmp_path / "run", 11)
    assert lab.names == {0: "sky: blue", 3: "road", 5: "tree"} and lab.merges == {"building": (4, 7)}
    unsupseg.label(tmp_path / "run", reset=True)
    assert not (tmp_path / "run" / "labels.yaml").exists()
    assert labels_file.load(tmp_path / "run", 11).classes == [f"cluster_{k}" for k in range(11)]


def test_masks_hold_merged_class_ids_and_the_record_the_names(labelled):
    tmp, plain, (sky, a, b) = labelled
    lab = labels_file.load(tmp / "run", 11)
    for name, clusters in plain.items():
        assert np.array_equal(np.asarray(Image.open(tmp / "masks" / name)), lab.lookup[clusters])
    merged = lab.lookup[[a, b]]
    assert merged[0] == merged[1] and lab.classes[merged[0]] == "building" and lab.classes[lab.lookup[sky]] == "sky"
    record = json.loads((tmp / "masks" / ".unsupseg-segment.json").read_text())
    assert record["classes"] == lab.classes
    conf = np.asarray(Image.open(tmp / "masks" / "img_00_confidence.png"))
    assert conf.shape == plain["img_00.png"].shape and conf.min() >= 255 // 11   # a max over 11 probabilities


# -- exports, read back by the tools' own readers -------------------------------------------------


@pytest.mark.parametrize("mask", [
    np.random.default_rng(0).random((37, 53)) > 0.5,             # short runs
    np.ones((300, 300), bool),                                    # one run longer than 2^16 bytes
    (np.arange(400 * 500).reshape(400, 500) % 97) < 40,           # runs of every width class
    np.ones((1, 2), bool), np.ones((1, 64), bool), np.ones((1, 65), bool), np.zeros((5, 7), bool),
])
def test_brush_rle_is_label_studio_converters(mask):
    converter = pytest.importorskip("label_studio_converter.brush")
    from unsupseg.exporters.brush import brush_rle

    rle = brush_rle(mask)
    assert rle == converter.mask2rle((mask * 255).astype(np.uint8))
    assert np.array_equal(converter.decode_rle(rle).reshape(*mask.shape, 4)[:, :, 3] > 0, mask)


def _masks(tmp: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.asarray(Image.open(p)).astype(np.int64) for p in (tmp / "masks").glob("img_??.png")}


def test_coco_export_decodes_with_pycocotools_to_the_masks(labelled):
    COCO = pytest.importorskip("pycocotools.coco").COCO

    tmp, _, _ = labelled
    unsupseg.export(tmp / "run", tmp / "masks", "coco", tmp / "coco", image_root="http://host/photos")
    coco = COCO(str(tmp / "coco" / "annotations.json"))
    classes = labels_file.load(tmp / "run", 11).classes
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == classes
    masks = _masks(tmp)
    assert len(coco.getImgIds()) == len(masks) == 3
    for image in coco.loadImgs(coco.getImgIds()):
        name = Path(image["file_name"]).stem
        assert image["file_name"] == f"http://host/photos/{name}.png"
        union = np.full((image["height"], image["width"]), -1)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image["id"])):
            pixels = coco.annToMask(ann).astype(bool)
            assert not (union[pixels] >= 0).any() and ann["area"] == pixels.sum() and 0 < ann["score"] <= 1
            union[pixels] = ann["category_id"] - 1
        assert np.array_equal(union, masks[name])


def test_label_studio_export_decodes_with_the_converter_to_the_masks(labelled):
    decode_rle = pytest.importorskip("label_studio_converter.brush").decode_rle

    tmp, _, _ = labelled
    unsupseg.export(tmp / "run", tmp / "masks", "label-studio", tmp / "ls")
    tasks = json.loads((tmp / "ls" / "tasks.json").read_text())
    classes = labels_file.load(tmp / "run", 11).classes
    masks = _masks(tmp)
    assert sorted(Path(t["data"]["image"]).stem for t in tasks) == sorted(masks)
    for task in tasks:
        mask = masks[Path(task["data"]["image"]).stem]
        union = np.full(mask.shape, -1)
        for region in task["predictions"][0]["result"]:
            h, w = region["original_height"], region["original_width"]
            pixels = decode_rle(region["value"]["rle"]).reshape(h, w, 4)[:, :, 3] > 0   # alpha, as LS reads it
            union[pixels] = classes.index(region["value"]["brushlabels"][0])
        assert np.array_equal(union, mask)
    config = (tmp / "ls" / "label_config.xml").read_text()
    assert all(f'<Label value="{name}"' in config for name in classes)


@pytest.mark.skipif(not DM_PYTHON.exists(), reason=f"datumaro needs its own environment (its pins conflict with "
                    f"ours): python -m venv /tmp/dm-venv && /tmp/dm-venv/bin/pip install datumaro; none at {DM_PYTHON}")
def test_cvat_export_imports_in_datumaro_with_names_and_mask_counts(labelled):
    tmp, _, _ = labelled
    unsupseg.export(tmp / "run", tmp / "masks", "cvat", tmp / "cvat")
    script = ("import json, sys, datumaro as dm\n"
              "ds = dm.Dataset.import_from(sys.argv[1], 'voc_segmentation')\n"
              "names = [c.name for c in ds.categories()[dm.AnnotationType.label]]\n"
              "items = {i.id: sorted([a.label, int(a.image.sum())] for a in i.annotations) for i in ds}\n"
              "print(json.dumps({'names': names, 'items': items}))\n")
    done = subprocess.run([str(DM_PYTHON), "-c", script, str(tmp / "cvat")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    classes = labels_file.load(tmp / "run", 11).classes
    assert got["names"] == ["background", *classes]
    for name, mask in _masks(tmp).items():
        ids, counts = np.unique(mask, return_counts=True)
        assert got["items"][name] == sorted([int(k) + 1, int(c)] for k, c in zip(ids, counts))


def test_png_export_loads_in_fiftyone(labelled):
    fo = pytest.importorskip("fiftyone", reason="FiftyOne is not installed (it is not in the export extra); "
                             "the png layout is its ImageSegmentationDirectory")
    tmp, _, _ = labelled
    unsupseg.export(tmp / "run", tmp / "masks", "png", tmp / "png")
    shutil.copytree(tmp / "imgs", tmp / "png" / "data")
    ds = fo.Dataset.from_dir(dataset_dir=str(tmp / "png"), dataset_type=fo.types.ImageSegmentationDirectory)
    assert len(ds) == 3


def test_png_export_copies_masks_and_lists_classes(labelled):
    tmp, _, _ = labelled
    unsupseg.export(tmp / "run", tmp / "masks", "png", tmp / "png")
    for name, mask in _masks(tmp).items():
        assert np.array_equal(np.asarray(Image.open(tmp / "png" / "labels" / f"{name}.png")), mask)
    classes = json.loads((tmp / "png" / "classes.json").read_text())
    assert classes["mask_targets"] == {str(k): n for k, n in enumerate(labels_file.load(tmp / "run", 11).classes)}


# -- the command line: the flow and bad input -----------------------------------------------------


def test_cli_label_segment_export_and_resume(run, tmp_path):
    shutil.copytree(run / "run", tmp_path / "run")
    photos = run / "imgs"
    before = {p: p.read_bytes() for p in photos.iterdir()}
    done = cli("label", tmp_path / "run", "--name", "0=sky", "--merge", "1,2=building")
    assert done.returncode == 0, done.stderr
    rows = [line for line in lines(done.stdout) if line.startswith("│")]
    assert rows[:3] == ["│ 0     │ sky        │ 0        │", "│ 1     │ building   │ 1, 2     │",
                        "│ 2     │ cluster_3  │ 3        │"] and len(rows) == 10
    done = cli("segment", tmp_path / "run", photos, "--out", tmp_path / "masks", "--export", "png")
    assert done.returncode == 0, done.stderr
    assert lines(done.stdout) == [f"wrote 3 masks and overlays to {tmp_path / 'masks'}",
                                  f"png: exported 3 images to {tmp_path / 'masks-png'}",
                                  f"wrote {tmp_path / 'masks-png' / 'classes.json'}"]
    done = cli("export", tmp_path / "run", tmp_path / "masks", "--format", "png", "--out", tmp_path / "masks-png")
    assert lines(done.stdout) == [f"png: exported 0 images to {tmp_path / 'masks-png'}; skipped 3 already exported "
                                  "(--overwrite redoes them)", f"wrote {tmp_path / 'masks-png' / 'classes.json'}"]
    # renaming after segment: the masks' names are stale, both segment and export say so
    assert cli("label", tmp_path / "run", "--name", "3=road").returncode == 0
    done = cli("export", tmp_path / "run", tmp_path / "masks", "--format", "coco", "--out", tmp_path / "coco")
    assert done.returncode == 2 and message(done.stderr) == (
        f"error: the masks in {tmp_path / 'masks'} were written before {tmp_path / 'run' / 'labels.yaml'} changed; "
        "re-run segment with --overwrite to apply the current names and merges")
    assert not (tmp_path / "coco").exists()
    done = cli("segment", tmp_path / "run", photos, "--out", tmp_path / "masks")
    assert done.returncode == 2 and "written before the run's labels.yaml changed" in message(done.stderr)
    assert before == {p: p.read_bytes() for p in photos.iterdir()}


def test_cli_bad_input_is_one_line_and_writes_nothing(run, tmp_path):
    shutil.copytree(run / "run", tmp_path / "run")
    shutil.copytree(run / "imgs", tmp_path / "imgs")
    labels_yaml = tmp_path / "run" / "labels.yaml"

    def error(*args) -> str:
        done = cli(*args)
        assert done.returncode == 2 and done.stdout == "", (done.stdout, done.stderr)
        assert done.stderr.count("error:") == 1 and "Traceback" not in done.stderr
        return message(done.stderr)

    assert error("label", tmp_path / "run", "--name", "99=x") == (
        f"error: labels of {tmp_path / 'run'}: cluster 99 does not exist (this run has clusters 0 to 10)")
    assert error("label", tmp_path / "run", "--merge", "4,4=building") == (
        f"error: labels of {tmp_path / 'run'}: merge 'building' joins cluster 4 with itself")
    assert not labels_yaml.exists()
    # a hand-edited label file naming cluster 99
    labels_yaml.write_text("version: 1\nclusters: 11\nnames:\n  99: sky\n")
    assert error("segment", tmp_path / "run", tmp_path / "imgs", "--out", tmp_path / "m") == (
        f"error: {labels_yaml}: cluster 99 does not exist (this run has clusters 0 to 10)")
    assert not (tmp_path / "m").exists()
    labels_yaml.unlink()
    # masks missing: one removed after segment
    assert cli("segment", tmp_path / "run", tmp_path / "imgs", "--out", tmp_path / "m").returncode == 0
    (tmp_path / "m" / "img_01.png").unlink()
    assert error("export", tmp_path / "run", tmp_path / "m", "--format", "coco", "--out", tmp_path / "e") == (
        f"error: 1 of 3 masks are missing in {tmp_path / 'm'} (e.g. img_01.png for "
        f"{tmp_path / 'imgs' / 'img_01.png'}); run segment to finish them (nothing was exported)")
    assert error("export", tmp_path / "run", tmp_path / "none", "--format", "coco", "--out", tmp_path / "e") == (
        f"error: the masks folder {tmp_path / 'none'} does not exist; run `unsupseg segment {tmp_path / 'run'} "
        f"PHOTOS --out {tmp_path / 'none'}` first")
    assert not (tmp_path / "e").exists()
    # an export into the photos' folder
    assert cli("segment", tmp_path / "run", tmp_path / "imgs", "--out", tmp_path / "m").returncode == 0
    photos = {p: p.read_bytes() for p in (tmp_path / "imgs").iterdir()}
    assert error("export", tmp_path / "run", tmp_path / "m", "--format", "cvat", "--out", tmp_path / "imgs" / "x") == (
        f"error: --out {tmp_path / 'imgs' / 'x'} lies in {tmp_path / 'imgs'}, a folder of the photos or masks; "
        "exports never write there: choose another --out (nothing was written)")
    assert photos == {p: p.read_bytes() for p in (tmp_path / "imgs").iterdir()}
    assert error("export", tmp_path / "run", tmp_path / "m", "--format", "xml", "--out", tmp_path / "e") == (
        "error: unknown export format 'xml'; choose one of coco, cvat, label-studio, png")


# -- evaluation and report ------------------------------------------------------------------------


def test_evaluate_scores_the_merged_classes(labelled, camvid_root):
    tmp, _, (sky, a, b) = labelled
    merged = unsupseg.evaluate(tmp / "run", dataset="camvid", root=camvid_root, split="val", flip=False)
    plain = unsupseg.evaluate(tmp / "run", dataset="camvid", root=camvid_root, split="val", flip=False, merges=False)
    lab = labels_file.load(tmp / "run", 11)
    assert merged["labels"] == {"classes": lab.classes, "clusters": [list(g) for g in lab.groups]}
    assert "labels" not in plain and len(plain["confusion"]) == 11 and len(merged["confusion"]) == 10
    # the merged prediction's rows are the sums of its clusters' rows
    expected = np.zeros((10, len(plain["confusion"][0])), dtype=np.int64)
    np.add.at(expected, lab.lookup, np.asarray(plain["confusion"], dtype=np.int64))
    assert np.array_equal(np.asarray(merged["confusion"]), expected)


def test_report_names_clusters_and_shows_merge_candidates(labelled):
    from unsupseg.reporting import build_report

    tmp, _, (sky, a, b) = labelled
    build_report(tmp / "run", tmp / "report.html", images=tmp / "imgs", log=lambda m: None)
    html = (tmp / "report.html").read_text()
    rows = html.split('class="row gallery-row" data-cluster="')[1:]
    order = [int(row.split('"')[0]) for row in rows]
    assert sorted(order) == list(range(11)) and order.index(b) == order.index(a) + 1   # merged side by side
    assert f"cluster {sky} “sky”" in rows[order.index(sky)]
    assert f"cluster {a} “building”" in rows[order.index(a)]
    assert all("next to: " in row and "similar: " in row for row in rows if "0.0 % of the pixels" not in row)
