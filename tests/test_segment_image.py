"""segment-image: one photo partitioned from its own features, training-free."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.optimize import linear_sum_assignment

from unsupseg.api import segment_image
from unsupseg.features.partition import knee

UNSUPSEG = str(Path(sys.executable).parent / "unsupseg")    # the installed console script
WIDE = {**os.environ, "COLUMNS": "400"}                      # rich wraps at the terminal width


def three_textures(path, size=192, seed=0):
    """A photo of three textured regions (ground truth returned): fine red-white stripes on the left
    third, a green checkerboard top right, blue-grey noise bottom right."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size]
    truth = np.where(x < size // 3, 0, np.where(y < size // 2, 1, 2))
    stripes = np.where((x // 3) % 2 == 0, 1.0, 0.2)[..., None] * np.array([0.9, 0.2, 0.2]) + 0.1
    checker = np.where(((x // 6) + (y // 6)) % 2 == 0, 0.8, 0.3)[..., None] * np.array([0.2, 0.9, 0.3])
    noise = rng.uniform(0.2, 0.8, (size, size, 1)) * np.array([0.5, 0.6, 1.0])
    img = np.where((truth == 0)[..., None], stripes, np.where((truth == 1)[..., None], checker, noise))
    Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8)).save(path)
    return truth


def matched_accuracy(pred: np.ndarray, truth: np.ndarray) -> float:
    """Share of pixels right after the best one-to-one matching of parts to regions (Hungarian)."""
    k = max(pred.max(), truth.max()) + 1
    confusion = np.bincount(pred.ravel() * k + truth.ravel(), minlength=k * k).reshape(k, k)
    rows, cols = linear_sum_assignment(-confusion)
    return confusion[rows, cols].sum() / truth.size


def test_matched_accuracy_by_hand():
    truth = np.array([[0, 0, 1, 1]])
    assert matched_accuracy(np.array([[1, 1, 0, 0]]), truth) == 1.0      # swapped names still match
    assert matched_accuracy(np.array([[1, 1, 1, 0]]), truth) == 0.75


def test_knee_of_the_modularity_curve_by_hand():
    # steep up to K = 4, then 0.02 per part: the knee is 4
    assert knee([2, 3, 4, 5, 6, 7, 8], [0.1, 0.4, 0.7, 0.72, 0.74, 0.76, 0.78]) == 4
    assert knee([2, 3, 4, 5, 6], [1, 2, 3, 4, 5]) == 6          # a straight line has none: the largest K


def test_three_textured_regions_are_recovered(tmp_path, one_thread):
    truth = three_textures(tmp_path / "textures.png")
    seg = segment_image(tmp_path / "textures.png", tmp_path / "out", clusters=3, resolution=192,
                        log=lambda m: None)
    assert seg.num_clusters == 3
    mask = np.asarray(Image.open(tmp_path / "out" / "textures.png"))
    assert mask.shape == truth.shape
    assert matched_accuracy(mask.astype(np.int64), truth) >= 0.95
    assert Image.open(tmp_path / "out" / "textures_overlay.jpg").size == (192, 192)


def test_segment_image_command_writes_mask_overlay_and_report(tmp_path):
    three_textures(tmp_path / "textures.png")
    result = subprocess.run([UNSUPSEG, "segment-image", str(tmp_path / "textures.png"), "--clusters", "3",
                             "--resolution", "96", "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, env=WIDE)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3, lines
    assert re.fullmatch(rf"{re.escape(str(tmp_path / 'textures.png'))}: 3 parts \(given\) from 12x12 tokens, "
                        r"[0-9.]+ s", lines[0])
    # the report shows the mask segment-image wrote, without segmenting the photo again
    out = tmp_path / "out"
    assert lines[1] == f"report of 1 images written to {out / 'report.html'} (1 from the masks in {out})"
    assert lines[2] == f"wrote textures.png and textures_overlay.jpg (3 parts) to {tmp_path / 'out'}"
    mask = np.asarray(Image.open(tmp_path / "out" / "textures.png"))
    assert mask.shape == (192, 192) and set(np.unique(mask)) <= {0, 1, 2}
    assert Image.open(tmp_path / "out" / "textures_overlay.jpg").size == (192, 192)
    assert "data:image/" in (tmp_path / "out" / "report.html").read_text()
    assert result.stderr == ""


@pytest.mark.parametrize("args, message", [
    (["--clusters", "3"], "cannot"),                  # not an image
    (["--clusters", "many"], "clusters must be a positive number or 'auto', got 'many'"),
])
def test_segment_image_command_bad_input_is_one_line(tmp_path, args, message):
    (tmp_path / "notes.png").write_text("not a photo")
    result = subprocess.run([UNSUPSEG, "segment-image", str(tmp_path / "notes.png"), "--out", str(tmp_path / "out"),
                             *args], capture_output=True, text=True, env=WIDE)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / "out").exists()
