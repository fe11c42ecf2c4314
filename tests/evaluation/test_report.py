"""The HTML report: self-contained, one overlay per image, a gallery row per cluster, metrics when
labelled, and every picture really decoded by a headless browser (Debian's chromium)."""

import base64
import io
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.spatial import cKDTree

import unsupseg
from tests.conftest import write_images
from unsupseg.data import load_image
from unsupseg.errors import ConfigError
from unsupseg.evaluation.report import ClusterGallery, ReportData, ReportImage, render_report
from unsupseg.evaluation.visualize import palette
from unsupseg.reporting import build_report

OVERRIDES = ["data.resolution=48", "params.restarts=1"]
CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not on PATH (apt-get install -y chromium) - browser checks skipped"
)


class _Images(HTMLParser):
    """Every <img> (attributes) and the class of every element, in document order."""

    def __init__(self):
        super().__init__()
        self.imgs, self.classes = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.imgs.append(attrs)
        self.classes += (attrs.get("class") or "").split()


def parse(text: str) -> _Images:
    parser = _Images()
    parser.feed(text)
    return parser


def decode(uri: str) -> Image.Image:
    head, data = uri.split(",", 1)
    assert re.fullmatch(r"data:image/(jpeg|png);base64", head), head
    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


def chromium(html_path: Path, tmp: Path, *args: str) -> str:
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
        f"--user-data-dir={tmp}", *args, html_path.resolve().as_uri(),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    write_images(tmp / "imgs", 4)
    seg = unsupseg.fit(
        "kmeans", images=tmp / "imgs", clusters=3, backbone="efficientnet_lite0", out=tmp / "run",
        overrides=OVERRIDES + [f"cache_dir={tmp / 'cache'}"], log=lambda m: None,
    )
    return tmp, seg


@pytest.fixture(scope="module")
def unlabelled(run):
    """The report of the run on its own training images (no --images / --dataset)."""
    tmp, seg = run
    path = build_report(tmp / "run", tmp / "out" / "report.html", log=lambda m: None)
    return path, path.read_text()


@pytest.fixture(scope="module")
def labelled(run):
    """A report on a CamVid-layout folder of 3 synthetic labelled photos (left region road, right sky)."""
    tmp, seg = run
    root = tmp / "camvid"
    paths = write_images(root / "val", 3, seed=1)
    (root / "valannot").mkdir()
    for p in paths:
        width = np.asarray(Image.open(p)).shape[1]
        label = np.tile(np.where(np.arange(width) < width // 2, 3, 0), (48, 1)).astype(np.uint8)
        label[:4] = 11   # void: ignored
        Image.fromarray(label).save(root / "valannot" / p.name)
    path = build_report(seg, tmp / "labelled.html", dataset="camvid", root=root, split="val", log=lambda m: None)
    scores = unsupseg.evaluate(seg, dataset="camvid", root=root, split="val")
    return path, path.read_text(), scores


def test_report_is_self_contained_with_one_overlay_per_image_and_a_row_per_cluster(unlabelled):
    path, text = unlabelled
    doc = parse(text)
    assert doc.imgs and all(img["src"].startswith("data:image/") for img in doc.imgs)
    # nothing fetched from elsewhere: no external src/href, no stylesheet or script files
    assert not re.search(r"""(src|href)=["'](?!data:|#)""", text)
    overlays = [img for img in doc.imgs if img.get("class") == "clusters"]
    originals = [img for img in doc.imgs if img.get("class") == "image"]
    assert len(overlays) == len(originals) == doc.classes.count("overlay-card") == 4
    assert doc.classes.count("gallery-row") == 3
    for c in range(3):
        row = re.search(rf'data-cluster="{c}">(.*)$', text, re.M)   # one row per line
        patches = re.findall(r"<img ", row.group(1))
        # 4 images x at most 2 peaks each, capped at 8 per cluster
        assert 1 <= len(patches) <= 8
    for img in doc.imgs:
        decode(img["src"])
    # the overlay is the photo blended with the cluster colours, not the photo itself
    for o, i in zip(overlays, originals):
        assert np.abs(np.asarray(decode(o["src"]), float) - np.asarray(decode(i["src"]), float)).mean() > 10
    assert "Metrics" not in text and "cluster 2" in text
    assert path.stat().st_size < 2_000_000


def test_labelled_report_has_metrics_table_charts_and_ground_truth(labelled):
    path, text, scores = labelled
    doc = parse(text)
    assert all(img["src"].startswith("data:image/") for img in doc.imgs)
    assert len([i for i in doc.imgs if i.get("class") == "ground-truth"]) == 3
    iou_chart = [i for i in doc.imgs if "iou-chart" in (i.get("class") or "")]
    confusion = [i for i in doc.imgs if "confusion-chart" in (i.get("class") or "")]
    assert len(iou_chart) == len(confusion) == 1
    assert iou_chart[0]["src"].startswith("data:image/png") and decode(iou_chart[0]["src"]).size[0] > 300
    assert f"<td class=\"num\">{scores['miou']:.1f}</td>" in text
    assert f"<td class=\"num\">{scores['pixel_accuracy']:.1f}</td>" in text
    per_class = re.search(r'<table class="per-class">(.*?)</table>', text, re.S).group(1)
    assert per_class.count("<tr>") == 1 + 11   # header + the 11 CamVid classes
    for name, value in scores["per_class_iou"].items():
        shown = "n/a" if value is None else f"{value:.1f}"
        assert f"<td>{name}</td><td class=\"num\">{shown}</td>" in per_class
    names = list(scores["per_class_iou"])
    for cluster, cls in enumerate(scores["mapping"]):
        assert (f"cluster {cluster} → {names[cls]}" if cls >= 0 else f"cluster {cluster} (unmatched)") in text


def test_gallery_takes_patches_around_the_highest_probabilities():
    image = np.zeros((100, 120, 3), dtype=np.uint8)
    image[70, 90] = (255, 0, 0)
    probs = np.full((2, 100, 120), 0.4, dtype=np.float32)
    probs[0, 70, 90] = 0.99     # cluster 0 peaks on the red pixel
    probs[0, 72, 92] = 0.98     # inside the same window: suppressed, not a second patch
    probs[0, 10, 10] = 0.9      # second peak, elsewhere
    probs[1] = 1 - probs[0]
    gallery = ClusterGallery(2, per_cluster=3, patch_size=16, per_image=2)
    gallery.add(image, probs)
    first, second = gallery.rows()[0][:2]
    assert first.shape == (16, 16, 3) and tuple(first[8, 8]) == (255, 0, 0)
    assert second.max() == 0   # the peak at (10, 10), far from the red pixel
    gallery.add(image, probs)   # a second image: the per-cluster cap keeps the best 3
    assert len(gallery.rows()[0]) == 3 and len(gallery.rows()[1]) == 3
    assert gallery.pixel_share()[0] == pytest.approx(3 / (100 * 120))
    # an image smaller than the patch gives a padded patch
    small = ClusterGallery(1, patch_size=16)
    small.add(np.zeros((5, 7, 3), np.uint8), np.ones((1, 5, 7), np.float32))
    assert small.rows()[0][0].shape == (16, 16, 3)
    with pytest.raises(ValueError, match="do not match"):
        gallery.add(image, probs[:1])


def test_render_escapes_names_and_rejects_a_gallery_of_the_wrong_size():
    item = ReportImage("<script>alert(1)</script>", np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.int64))
    data = ReportData("t & <b>", 2, [item], [[], []], [1.0, 0.0], summary=[("run", "a<b")])
    text = render_report(data)
    assert "<script>alert(1)" not in text and "&lt;script&gt;" in text and "a&lt;b" in text
    assert text.count('class="swatch" style="background:rgb(128,64,128)"') == 2   # legend + gallery row
    with pytest.raises(ValueError, match="one entry per cluster"):
        render_report(ReportData("t", 3, [item], [[], []], [1.0, 0.0]))


def test_build_report_on_given_images_and_argument_errors(run):
    tmp, seg = run
    one = build_report(seg, tmp / "one.html", images=tmp / "imgs", max_images=1, log=lambda m: None)
    assert parse(one.read_text()).classes.count("overlay-card") == 1
    with pytest.raises(ConfigError, match="not both"):
        build_report(seg, tmp / "x.html", images=tmp / "imgs", dataset="camvid", root=tmp)
    with pytest.raises(ConfigError, match="max_images"):
        build_report(seg, tmp / "x.html", max_images=0)
    with pytest.raises(ConfigError, match="--root"):
        build_report(seg, tmp / "x.html", dataset="camvid")


@needs_chromium
@pytest.mark.parametrize("which", ["unlabelled", "labelled"])
def test_every_image_renders_in_a_headless_browser(which, request, tmp_path):
    path, text = request.getfixturevalue(which)[:2]
    dom = chromium(path, tmp_path / "profile", "--virtual-time-budget=5000", "--dump-dom")
    total = re.search(r'data-images-total="(\d+)"', dom)
    ok = re.search(r'data-images-ok="(\d+)"', dom)
    assert total and ok, "the page's load script did not run"
    assert int(ok.group(1)) == int(total.group(1)) == len(parse(text).imgs)


@needs_chromium
def test_screenshot_shows_the_overlay_colours(run, unlabelled, tmp_path):
    """The screenshot holds many pixels that are 50% blends of a photo colour with a cluster colour
    (computed here from the photos and the palette, not from the report), and are not photo colours."""
    tmp, seg = run
    path, _ = unlabelled
    shot = tmp_path / "shot.png"
    chromium(path, tmp_path / "profile", "--window-size=1200,2000", f"--screenshot={shot}")
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
    assert pixels.std(axis=0).max() > 20, "blank screenshot"

    colours = palette(seg.num_clusters).astype(np.float32)
    photos = np.concatenate([
        seg.preprocess().apply(load_image(p))[0].permute(1, 2, 0).reshape(-1, 3).numpy() * 255
        for p in sorted((tmp / "imgs").iterdir())
    ])
    blends = (photos[:, None] * 0.5 + colours[None] * 0.5).reshape(-1, 3)
    # distinct screenshot colours, packed as 24-bit ints (np.unique over rows is much slower)
    packed, counts = np.unique(pixels.astype(np.int32) @ np.array([1 << 16, 1 << 8, 1]), return_counts=True)
    unique = np.stack([packed >> 16, (packed >> 8) & 255, packed & 255], axis=1)
    near_blend = cKDTree(blends).query(unique)[0] <= 10
    near_photo = cKDTree(photos).query(unique)[0] <= 10
    overlay_pixels = counts[near_blend & ~near_photo].sum()
    # 4 overlays are shown at 280 x 210 CSS pixels each (235,200 pixels)
    assert overlay_pixels > 100_000, overlay_pixels


def test_report_lists_every_protocol_and_the_clusters_auto_curve(run, labelled):
    tmp, seg = run
    path = build_report(seg, tmp / "protocols.html", dataset="camvid", root=tmp / "camvid", split="val",
                        matching="all", log=lambda m: None)
    text = path.read_text()
    table = re.search(r'<table class="protocols">(.*?)</table>', text, re.S).group(1)
    assert [row for row in re.findall(r"<tr><td>([a-z-]+)</td>", table)] == ["dataset", "per-image", "many-to-one"]
    assert "cluster-count-chart" not in text   # a fixed K: no curve
    count = {"chosen": 4, "best": 6, "ks": [2, 3, 4, 5, 6], "scores": [0.3, 0.5, 0.6, 0.6, 0.61],
             "score_se": [0.01] * 5, "criterion": "modularity", "images": 3}
    item = ReportImage("a", np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.int64))
    text = render_report(ReportData("t", 1, [item], [[]], [1.0], cluster_count=count))
    chart = [i for i in parse(text).imgs if "cluster-count-chart" in (i.get("class") or "")]
    assert len(chart) == 1 and decode(chart[0]["src"]).size[0] > 300
    assert "K = 4 was chosen without labels" in text


def test_report_reuses_the_masks_segment_wrote_for_the_same_model_and_crf(run, tmp_path, monkeypatch):
    tmp, seg = run
    unsupseg.segment(seg, [tmp / "imgs"], tmp_path / "masks", crf=False)
    (tmp_path / "masks" / "img_03.png").unlink()                    # one mask missing: that image is segmented
    calls = []
    predict = seg.predict_tensor
    monkeypatch.setattr(seg, "predict_tensor", lambda *a, **k: calls.append(1) or predict(*a, **k))
    logged = []
    path = build_report(seg, tmp_path / "r.html", images=tmp / "imgs", crf=False, masks=tmp_path / "masks",
                        log=logged.append)
    assert logged == [f"report of 4 images written to {path} (3 from the masks in {tmp_path / 'masks'})"]
    assert len(calls) == 1
    # the overlays shown are those of the masks: the same as segmenting again (the photos are shown at
    # their own size here, so no resize of the masks in between)
    again = build_report(seg, tmp_path / "again.html", images=tmp / "imgs", crf=False, log=lambda m: None)
    shown = [decode(img["src"]) for img in parse(path.read_text()).imgs if img.get("class") == "clusters"]
    fresh = [decode(img["src"]) for img in parse(again.read_text()).imgs if img.get("class") == "clusters"]
    assert len(shown) == 4 and all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(shown, fresh))
    # masks recorded with another CRF setting are not this recipe's: every image is segmented
    calls.clear()
    build_report(seg, tmp_path / "crf.html", images=tmp / "imgs", crf=True, masks=tmp_path / "masks", log=logged.append)
    assert len(calls) == 4 and logged[-1] == f"report of 4 images written to {tmp_path / 'crf.html'}"
