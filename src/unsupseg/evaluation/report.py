"""A self-contained HTML report of a run, rendered from already computed arrays and numbers.

This module knows no model: ``render_report`` turns a ``ReportData`` (images as segmented, their
cluster maps, optional ground truth and ``evaluate()`` scores, the cluster gallery) into one HTML
string. Every picture is embedded as a base64 data URI (photos as JPEG, charts as PNG) so the file
opens offline in a browser on its own. ``ClusterGallery`` picks, for each cluster, the image
patches around the pixels of highest probability. The driver that runs a model over images lives
at api level (``unsupseg.reporting.build_report``).
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from .visualize import overlay, palette

__all__ = ["ClusterGallery", "ReportData", "ReportImage", "render_report"]

_UNMATCHED_GREY = (150, 150, 150)


@dataclass
class ReportImage:
    name: str
    image: np.ndarray               # H x W x 3 uint8, the image as it was segmented
    labels: np.ndarray              # H x W cluster ids
    truth: np.ndarray | None = None  # H x W class ids (ignore = -1), when the data has labels


@dataclass
class ReportData:
    title: str
    num_clusters: int
    images: list[ReportImage]
    gallery: list[list[np.ndarray]]      # per cluster: patches (h x w x 3 uint8), best first
    pixel_share: list[float]             # per cluster: fraction of the segmented pixels
    summary: list[tuple[str, str]] = field(default_factory=list)   # run facts, shown as a table
    metrics: dict | None = None          # the dict of unsupseg.evaluate(), when labels exist
    notes: list[str] = field(default_factory=list)
    cluster_count: dict | None = None    # the clusters-auto curve of the run (meta.json "clusters_auto")
    names: list[str | None] | None = None      # per cluster: its name in the run's labels.yaml (None: unnamed)
    order: list[int] | None = None             # clusters in the order shown (merged clusters side by side)
    adjacent: list[list[tuple[int, float]]] | None = None   # per cluster: (neighbour, share of its border)
    similar: list[list[tuple[int, float]]] | None = None    # per cluster: (cluster, centroid cosine)


class ClusterGallery:
    """Collects, for each cluster, the ``per_cluster`` patches of highest probability.

    Each image contributes at most ``per_image`` peaks per cluster (greedy non-maximum suppression
    over a patch-sized window), so a row shows several places rather than one region repeated.
    Only the best candidates are kept, so memory does not grow with the number of images.
    """

    def __init__(self, num_clusters: int, per_cluster: int = 8, patch_size: int = 64, per_image: int = 2):
        if min(num_clusters, per_cluster, patch_size, per_image) < 1:
            raise ValueError(
                f"num_clusters, per_cluster, patch_size and per_image must be >= 1, got "
                f"{num_clusters}, {per_cluster}, {patch_size}, {per_image}"
            )
        self.num_clusters = num_clusters
        self.per_cluster = per_cluster
        self.patch_size = patch_size
        self.per_image = per_image
        self._candidates: list[list[tuple[float, int, np.ndarray]]] = [[] for _ in range(num_clusters)]
        self._pixels = np.zeros(num_clusters, dtype=np.int64)
        self._order = 0   # tie-break: earlier images first, so the gallery is deterministic

    def add(self, image: np.ndarray, probabilities: np.ndarray) -> None:
        """``image`` H x W x 3 uint8 and its C x H x W cluster probabilities."""
        probs = np.asarray(probabilities)
        if probs.shape != (self.num_clusters, *image.shape[:2]):
            raise ValueError(
                f"probabilities of shape {probs.shape} do not match {self.num_clusters} clusters "
                f"over an image of {image.shape[0]}x{image.shape[1]}"
            )
        self._pixels += np.bincount(probs.argmax(0).ravel(), minlength=self.num_clusters)
        half = self.patch_size // 2
        for k in range(self.num_clusters):
            score = probs[k].astype(np.float64)
            for _ in range(self.per_image):
                y, x = np.unravel_index(int(score.argmax()), score.shape)
                value = float(score[y, x])
                if not np.isfinite(value):
                    break   # the whole map is suppressed: the image is smaller than two patches
                self._candidates[k].append((value, self._order, self._crop(image, y, x)))
                self._order += 1
                score[max(y - half, 0) : y + half + 1, max(x - half, 0) : x + half + 1] = -np.inf
            self._candidates[k].sort(key=lambda c: (-c[0], c[1]))
            del self._candidates[k][self.per_cluster :]

    def _crop(self, image: np.ndarray, y: int, x: int) -> np.ndarray:
        """The patch centred on (y, x), shifted inside the image; padded when the image is smaller."""
        p = self.patch_size
        h, w = image.shape[:2]
        top = min(max(y - p // 2, 0), max(h - p, 0))
        left = min(max(x - p // 2, 0), max(w - p, 0))
        crop = image[top : top + p, left : left + p]
        if crop.shape[:2] != (p, p):
            padded = np.full((p, p, 3), 255, dtype=np.uint8)
            padded[: crop.shape[0], : crop.shape[1]] = crop
            crop = padded
        return crop.copy()

    def rows(self) -> list[list[np.ndarray]]:
        return [[patch for _, _, patch in cands] for cands in self._candidates]

    def pixel_share(self) -> list[float]:
        total = int(self._pixels.sum())
        return [float(n) / total if total else 0.0 for n in self._pixels]


def adjacency(labels: np.ndarray, num_clusters: int) -> np.ndarray:
    """K x K counts of 4-neighbour pixel pairs whose clusters differ (symmetric, zero diagonal)."""
    counts = np.zeros((num_clusters, num_clusters), dtype=np.int64)
    for a, b in ((labels[:, 1:], labels[:, :-1]), (labels[1:], labels[:-1])):
        differ = a != b
        np.add.at(counts, (a[differ], b[differ]), 1)
    return counts + counts.T


def top_neighbours(matrix: np.ndarray, top: int = 3, share: bool = False) -> list[list[tuple[int, float]]]:
    """Per row, the ``top`` other columns of largest value (as a share of the row's sum when ``share``)."""
    out = []
    for k, row in enumerate(np.asarray(matrix, dtype=np.float64)):
        total = row.sum() - row[k]
        values = row / total if share and total > 0 else row
        others = [j for j in np.argsort(-values, kind="stable") if j != k and (not share or row[j] > 0)]
        out.append([(int(j), float(values[j])) for j in others[:top]])
    return out


# ----------------------------------------------------------------------------- encoding


def _image_uri(array: np.ndarray, fmt: str = "JPEG") -> str:
    """A data URI of an H x W x 3 uint8 array (JPEG for photos, PNG for exact colours)."""
    buf = io.BytesIO()
    image = Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8))
    if fmt == "JPEG":
        image.save(buf, format="JPEG", quality=88)
    else:
        image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _figure_uri(fig: Figure) -> str:
    buf = io.BytesIO()
    FigureCanvasAgg(fig)   # Agg canvas directly: no pyplot global state, no display needed
    fig.savefig(buf, format="png", dpi=100)
    return f"data:image/png;base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


# ----------------------------------------------------------------------------- labelled views


def _class_names(metrics: dict) -> list[str]:
    return list(metrics["per_class_iou"])


def _class_colours(metrics: dict, colours: np.ndarray) -> np.ndarray:
    """Each class painted in the colour of (the first) cluster matched to it, grey if none is."""
    names = _class_names(metrics)
    out = np.tile(np.array(_UNMATCHED_GREY, dtype=np.uint8), (len(names), 1))
    for cluster in reversed(range(len(metrics["mapping"]))):
        cls = metrics["mapping"][cluster]
        if cls >= 0:
            out[cls] = colours[cluster]
    return out


def _truth_overlay(image: np.ndarray, truth: np.ndarray, class_colours: np.ndarray) -> np.ndarray:
    """Ground truth blended at 50% like the prediction overlay; ignored pixels left as the photo."""
    blended = image.astype(np.float32)
    valid = (truth >= 0) & (truth < len(class_colours))
    blended[valid] = blended[valid] * 0.5 + class_colours[truth[valid]].astype(np.float32) * 0.5
    return blended.round().astype(np.uint8)


def _iou_chart(metrics: dict, class_colours: np.ndarray) -> str:
    names = _class_names(metrics)
    values = [metrics["per_class_iou"][n] for n in names]
    fig = Figure(figsize=(7, 0.32 * len(names) + 1.2), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(len(names))
    ax.barh(y, [0 if v is None else v for v in values], color=class_colours / 255.0, edgecolor="#333", linewidth=0.5)
    for yi, v in zip(y, values):
        ax.text((v or 0) + 1, yi, "n/a" if v is None else f"{v:.1f}", va="center", fontsize=8)
    ax.axvline(metrics["miou"], color="#c0392b", linestyle="--", linewidth=1, label=f"mIoU {metrics['miou']:.1f}")
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 105)
    ax.set_xlabel("IoU (%)")
    ax.set_title("Per-class IoU")
    ax.legend(loc="lower right", fontsize=8)
    return _figure_uri(fig)


def _confusion_chart(metrics: dict) -> str:
    """Rows: true classes; columns: clusters ordered by their matched class; cells: the share of
    each class's pixels given to each cluster (rows sum to 1)."""
    names = _class_names(metrics)
    confusion = np.asarray(metrics["confusion"], dtype=np.float64)      # clusters x classes
    mapping = metrics["mapping"]
    order = sorted(range(len(mapping)), key=lambda k: (mapping[k] < 0, mapping[k], k))
    matrix = confusion[order].T
    totals = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
    cols = [f"{k}→{names[mapping[k]]}" if mapping[k] >= 0 else f"{k} (unmatched)" for k in order]
    fig = Figure(figsize=(max(0.45 * len(cols) + 3.0, 7.0), 0.4 * len(names) + 2.0), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("cluster → matched class")
    ax.set_ylabel("true class")
    ax.set_title("Confusion (share of each true class's pixels)")
    if share.size <= 40 * 40:   # numbers stay legible up to this size
        for (i, j), v in np.ndenumerate(share):
            if v >= 0.005:
                ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=6,
                        color="white" if v > 0.6 else "#222")
    fig.colorbar(im, ax=ax, fraction=0.03)
    return _figure_uri(fig)


def _cluster_count_chart(count: dict) -> str:
    """The criterion over K (mean and one standard error band), the chosen K marked."""
    ks = np.asarray(count["ks"])
    mean = np.asarray(count["scores"])
    se = np.asarray(count.get("score_se") or np.zeros_like(mean))
    fig = Figure(figsize=(7, 3.2), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(ks, mean, color="#2c3e50", marker="o", markersize=3, label="modularity (mean over resamples)")
    ax.fill_between(ks, mean - se, mean + se, color="#2c3e50", alpha=0.2, linewidth=0, label="± 1 standard error")
    chosen = count["chosen"]
    ax.axvline(chosen, color="#c0392b", linestyle="--", linewidth=1.2, label=f"chosen K = {chosen}")
    if count.get("best") is not None and count["best"] != chosen:
        ax.axvline(count["best"], color="#7f8c8d", linestyle=":", linewidth=1, label=f"maximum at K = {count['best']}")
    ax.set_xlabel("number of clusters K")
    ax.set_ylabel("modularity Q(K)")
    ax.set_title("clusters auto: criterion over K")
    ax.legend(loc="lower right", fontsize=8)
    return _figure_uri(fig)


# ----------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1180px;
padding:16px 24px;color:#222;background:#fafafa}
h1{font-size:1.5em;margin:.2em 0 .4em}
h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:1.6em}
nav a{margin-right:14px}table{border-collapse:collapse;margin:8px 0}
td,th{padding:3px 10px;border-bottom:1px solid #e3e3e3;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.swatch{display:inline-block;width:14px;height:14px;border:1px solid #555;vertical-align:middle;margin-right:6px}
.legend{display:flex;flex-wrap:wrap;gap:6px 18px;font-size:.9em}
.card{display:inline-block;vertical-align:top;margin:0 18px 18px 0;background:#fff;border:1px solid #ddd;padding:8px}
.card figure{display:inline-block;margin:0 6px 0 0;text-align:center;font-size:.8em;color:#555}
.card img{width:280px;max-width:100%;display:block}
.name{font-size:.85em;font-weight:600;margin-bottom:4px;word-break:break-all}
.row{display:flex;align-items:center;gap:6px;margin:6px 0;flex-wrap:wrap}
.row .head{width:190px;font-size:.85em}.row img{width:72px;height:72px;border:3px solid;image-rendering:auto}
.chart{max-width:100%}.note{color:#666;font-size:.9em}
"""

# Marks on <body> how many embedded images the browser decoded (data-images-ok of data-images-total):
# a self-check readable by headless browsers and tests, harmless for a reader.
_SCRIPT = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  document.body.dataset.imagesTotal = imgs.length;
  document.body.dataset.imagesOk = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
});
"""


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _rgb(colour) -> str:
    r, g, b = (int(c) for c in colour)
    return f"rgb({r},{g},{b})"


def _img(uri: str, alt: str, cls: str = "", style: str = "") -> str:
    attrs = f' class="{cls}"' if cls else ""
    attrs += f' style="{style}"' if style else ""
    return f'<img src="{uri}" alt="{_esc(alt)}"{attrs}>'


def _cluster_label(k: int, metrics: dict | None, names: list[str | None] | None = None) -> str:
    base = f"cluster {k}" + (f" “{names[k]}”" if names and names[k] else "")
    if metrics is None:
        return base
    cls = metrics["mapping"][k]
    return f"{base} → {_class_names(metrics)[cls]}" if cls >= 0 else f"{base} (unmatched)"


def render_report(data: ReportData) -> str:
    """The HTML document of ``data`` (no file is read or written)."""
    k = data.num_clusters
    if len(data.gallery) != k or len(data.pixel_share) != k:
        raise ValueError(
            f"gallery and pixel_share need one entry per cluster ({k}), got {len(data.gallery)} and "
            f"{len(data.pixel_share)}"
        )
    colours = palette(k)
    metrics = data.metrics
    class_colours = _class_colours(metrics, colours) if metrics is not None else None
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(data.title)}</title><style>{_CSS}</style><script>{_SCRIPT}</script></head><body>",
        f"<h1>{_esc(data.title)}</h1>",
        '<nav><a href="#summary">Summary</a><a href="#legend">Legend</a><a href="#overlays">Overlays</a>'
        '<a href="#gallery">Cluster gallery</a>' + ('<a href="#metrics">Metrics</a>' if metrics else "") + "</nav>",
    ]

    parts.append('<h2 id="summary">Summary</h2><table>')
    parts += [f"<tr><th>{_esc(key)}</th><td>{_esc(value)}</td></tr>" for key, value in data.summary]
    if metrics is not None:
        parts.append(f'<tr><th>pixel accuracy</th><td>{metrics["pixel_accuracy"]:.1f} %</td></tr>')
        parts.append(f'<tr><th>mIoU</th><td>{metrics["miou"]:.1f} %</td></tr>')
    parts.append("</table>")
    parts += [f'<p class="note">{_esc(note)}</p>' for note in data.notes]
    if data.cluster_count is not None:
        c = data.cluster_count
        parts.append(
            f'<p class="note">K = {c["chosen"]} was chosen without labels ({_esc(c.get("criterion", ""))}; smallest K '
            f'within one standard error of the maximum, searched {c["ks"][0]}..{c["ks"][-1]} on {c.get("images", "?")} '
            f'images).</p>'
        )
        parts.append(_img(_cluster_count_chart(c), "clusters auto criterion over K", cls="chart cluster-count-chart"))

    order = data.order or list(range(k))
    parts.append('<h2 id="legend">Legend</h2><div class="legend">')
    for c in order:
        parts.append(
            f'<span class="legend-item"><span class="swatch" style="background:{_rgb(colours[c])}"></span>'
            f"{_esc(_cluster_label(c, metrics, data.names))} "
            f"<span class=\"note\">({100 * data.pixel_share[c]:.1f} % of the pixels shown)</span></span>"
        )
    parts.append("</div>")

    parts.append(f'<h2 id="overlays">Overlays ({len(data.images)} images)</h2>')
    if metrics is not None:
        parts.append('<p class="note">Ground truth painted in the colour of the cluster matched to each class '
                     "(grey: no cluster matched; unlabelled pixels left as the photo).</p>")
    for item in data.images:
        panels = [("image", item.image), ("clusters", np.asarray(overlay(Image.fromarray(item.image), item.labels, k)))]
        if item.truth is not None and class_colours is not None:
            panels.append(("ground truth", _truth_overlay(item.image, item.truth, class_colours)))
        figures = "".join(
            f"<figure>{_img(_image_uri(arr), f'{item.name} {what}', cls=what.replace(' ', '-'))}"
            f"<figcaption>{what}</figcaption></figure>"
            for what, arr in panels
        )
        parts.append(f'<div class="card overlay-card"><div class="name">{_esc(item.name)}</div>{figures}</div>')

    parts.append('<h2 id="gallery">Cluster gallery</h2><p class="note">For each cluster, the image patches '
                 "centred on the pixels of highest probability for it, best first; the clusters it borders most "
                 "often in the images shown, and those of most similar centroid (merge candidates). Name and merge "
                 "with <code>unsupseg label RUN --name 3=road --merge 4,7=building</code>.</p>")
    for c in order:
        patches = "".join(
            _img(_image_uri(p), f"cluster {c} patch {i}", style=f"border-color:{_rgb(colours[c])}")
            for i, p in enumerate(data.gallery[c])
        ) or '<span class="note">no patch</span>'
        parts.append(
            f'<div class="row gallery-row" data-cluster="{c}"><div class="head"><span class="swatch" '
            f'style="background:{_rgb(colours[c])}"></span>{_esc(_cluster_label(c, metrics, data.names))}<br>'
            f'<span class="note">{100 * data.pixel_share[c]:.1f} % of the pixels shown{_relations(c, data)}</span>'
            f'</div>{patches}</div>'
        )

    if metrics is not None:
        parts.append(_metrics_section(metrics, colours, class_colours))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _relations(c: int, data: ReportData) -> str:
    out = ""
    if data.adjacent and data.adjacent[c]:
        out += "<br>next to: " + ", ".join(f"{j} ({100 * v:.0f} %)" for j, v in data.adjacent[c])
    if data.similar and data.similar[c]:
        out += "<br>similar: " + ", ".join(f"{j} ({v:.2f})" for j, v in data.similar[c])
    return out


def _metrics_section(metrics: dict, colours: np.ndarray, class_colours: np.ndarray) -> str:
    names = _class_names(metrics)
    clusters_of = {i: [c for c, m in enumerate(metrics["mapping"]) if m == i] for i in range(len(names))}
    where = f"{metrics.get('dataset', '?')}/{metrics.get('split', '?')}, {metrics.get('n_images', '?')} images"
    rows = []
    for i, name in enumerate(names):
        value = metrics["per_class_iou"][name]
        swatches = "".join(
            f'<span class="swatch" style="background:{_rgb(colours[c])}" title="cluster {c}"></span>{c} '
            for c in clusters_of[i]
        ) or '<span class="note">none</span>'
        rows.append(
            f'<tr><td>{_esc(name)}</td><td '
            f'class="num">{"n/a" if value is None else f"{value:.1f}"}</td><td>{swatches}</td></tr>'
        )
    protocols = metrics.get("protocols") or {}
    protocol_rows = [
        f'<tr><td>{_esc(name)}</td><td class="num">{p["miou"]:.1f}</td><td '
        f'class="num">{p["pixel_accuracy"]:.1f}</td></tr>'
        for name, p in protocols.items()
    ]
    protocol_table = (
        [
            '<table class="protocols"><tr><th>matching protocol</th><th>mIoU %</th><th>pixel accuracy %</th></tr>',
            *protocol_rows,
            "</table>",
            '<p class="note">dataset: one Hungarian matching over the split; per-image: a Hungarian '
            "matching per image, TP/FP/FN summed over images (DiffCut's protocol); many-to-one: each "
            "cluster to its majority class. Per-class figures below: the first protocol.</p>",
        ]
        if len(protocols) > 1
        else []
    )
    return "\n".join(
        [
            '<h2 id="metrics">Metrics</h2>',
            f'<p class="note">Whole split ({_esc(where)}); matching {_esc(metrics.get("matching", "?"))}, '
            f"flip {'on' if metrics.get('flip') else 'off'}, CRF {'on' if metrics.get('crf') else 'off'}.</p>",
            '<table class="metrics"><tr><th>pixel accuracy</th><td class="num">'
            f'{metrics["pixel_accuracy"]:.1f}</td></tr><tr><th>mIoU</th><td '
            f'class="num">{metrics["miou"]:.1f}</td></tr></table>',
            *protocol_table,
            '<table class="per-class"><tr><th>class</th><th>IoU %</th><th>matched cluster(s)</th></tr>',
            *rows,
            "</table>",
            _img(_iou_chart(metrics, class_colours), "per-class IoU bar chart", cls="chart iou-chart"),
            "<br>",
            _img(_confusion_chart(metrics), "confusion matrix", cls="chart confusion-chart"),
        ]
    )
