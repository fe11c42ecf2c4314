"""The main job on the embedded default: no download, no GPU.

Fits a method (the flagship CAUSE-MLP by default, with its ``demo`` preset: sizes for six photos)
with the ``efficientnet_lite0`` backbone on the colour photographs that ship with
scikit-image, segments them, prints a table of what was discovered and writes masks, overlays and
an HTML report.
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

    build_report(seg, out / "report.html", images=images, log=log)
    return summary_table(seg.num_clusters, masks, sorted(images.iterdir()))


def summary_table(num_clusters: int, masks: Path, photos: list[Path]) -> Table:
    """Per image: size and the share of its pixels in each discovered cluster."""
    table = Table(title=f"{num_clusters} clusters discovered (share of each photo's pixels, %)")
    table.add_column("photo")
    table.add_column("size")
    for c in range(num_clusters):
        table.add_column(f"c{c}", justify="right")
    totals = np.zeros(num_clusters)
    for photo in photos:
        labels = np.asarray(Image.open(masks / f"{photo.stem}.png"))
        counts = np.bincount(labels.ravel(), minlength=num_clusters)[:num_clusters]
        totals += counts
        share = 100 * counts / counts.sum()
        table.add_row(photo.name, f"{labels.shape[1]}x{labels.shape[0]}", *[f"{s:.0f}" if s >= 0.5 else "" for s in share])
    table.add_section()
    table.add_row("all", "", *[f"{100 * t / totals.sum():.0f}" for t in totals])
    return table
