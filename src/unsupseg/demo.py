"""The main job on the embedded default: no download, no GPU.

Fits a method (the flagship CAUSE-MLP by default, with its ``demo`` preset: sizes for six photos)
with the ``efficientnet_lite0`` backbone on the colour photographs that ship with
scikit-image, segments them, prints a table of what was discovered and writes masks, overlays and
an HTML report (from the masks just written: nothing is segmented twice).

The number of clusters is estimated by default (``clusters="auto"``, 19 here): six unrelated photos
differ more from each other than their parts do, so a handful of clusters finds the photos (with 5,
three of them came out in one colour); the table counts each photo's parts (clusters covering at
least 10 % of it).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from rich.table import Table

from .errors import ConfigError

# scikit-image's bundled colour photographs (public domain / CC0, see skimage.data's README)
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png", "motorcycle_right.png", "rocket.jpg")


def bundled_photos() -> list[Path]:
    try:
        import skimage.data
    except ImportError:
        raise ConfigError("the demo photos come with scikit-image: pip install 'unsupseg[demo]'") from None
    folder = Path(skimage.data.__file__).parent
    missing = [name for name in PHOTOS if not (folder / name).exists()]
    if missing:
        raise ConfigError(f"scikit-image at {folder} lacks the bundled photos {', '.join(missing)}")
    return [folder / name for name in PHOTOS]


def run_demo(out: Path, method: str, clusters: int, overwrite: bool, log: Callable) -> Table:
    from .api import fit, segment

    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    for photo in bundled_photos():
        if not (images / photo.name).exists():
            shutil.copyfile(photo, images / photo.name)
    run_dir = out / f"run-{method}"     # one run per method: a finished run of another is never reused
    from . import rundir

    if rundir.is_complete(run_dir) and not overwrite:
        from .api import load

        log(f"using the finished run in {run_dir} (pass --overwrite to fit again)")
        seg = load(run_dir)
    else:
        from .config import has_preset

        seg = fit(method, out=run_dir, backbone="efficientnet_lite0", images=images, clusters=clusters,
                  preset="demo" if has_preset(method, "demo") else None, overwrite=overwrite, log=log)
    masks = out / "masks"
    segment(seg, [images], masks, overwrite=True)
    from .reporting import build_report

    build_report(seg, out / "report.html", images=images, masks=masks, log=log)   # reuses segment's masks
    return summary_table(seg.num_clusters, masks, sorted(images.iterdir()))


# a photo is "split into parts" when at least MIN_PARTS clusters each cover MIN_SHARE of it
MIN_PARTS, MIN_SHARE = 2, 0.10


def parts(labels: np.ndarray, num_clusters: int, min_share: float = MIN_SHARE) -> int:
    """How many clusters cover at least ``min_share`` of the mask's pixels."""
    counts = np.bincount(np.asarray(labels).ravel(), minlength=num_clusters)
    return int((counts >= min_share * counts.sum()).sum())


def summary_table(num_clusters: int, masks: Path, photos: list[Path]) -> Table:
    """Per image: size, its number of parts and the clusters covering it, largest first (share of its
    pixels, %; clusters under 1 % left out). One line per photo whatever the number of clusters."""
    table = Table(title=f"{num_clusters} clusters discovered")
    table.add_column("photo")
    table.add_column("size")
    table.add_column(f"parts >= {MIN_SHARE:.0%}", justify="right")
    table.add_column("clusters (share of the photo, %)")
    totals = np.zeros(num_clusters)
    for photo in photos:
        labels = np.asarray(Image.open(masks / f"{photo.stem}.png"))
        counts = np.bincount(labels.ravel(), minlength=num_clusters)[:num_clusters]
        totals += counts
        n = parts(labels, num_clusters)
        table.add_row(photo.name, f"{labels.shape[1]}x{labels.shape[0]}", f"{n}" if n >= MIN_PARTS else f"[red]{n}",
                      _shares(counts))
    table.add_section()
    table.add_row("all", "", "", _shares(totals))
    return table


def _shares(counts: np.ndarray) -> str:
    share = 100 * counts / counts.sum()
    return " ".join(f"c{c}:{share[c]:.0f}" for c in np.argsort(-share, kind="stable") if share[c] >= 1)
