"""``label`` and ``export``: names and merges of a run's clusters (its labels.yaml), and the masks
``segment`` wrote, exported to annotation tools' formats."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from .. import labels as labels_file
from .. import rundir
from .._progress import track
from ..errors import DataError, OutputError
from .outputs import SEGMENT_RECORD, confidence_path, plan_outputs


def label(
    run: str | os.PathLike,
    *,
    names: dict[int, str] | None = None,
    merges: dict[str, Sequence[int]] | None = None,
    reset: bool = False,
) -> labels_file.Labels:
    """Name and merge the clusters of a finished run (its labels.yaml, written atomically).

    ``names`` ({cluster: name}) and ``merges`` ({name: clusters}) are added to those already there (a
    merge takes its clusters out of earlier merges and names); ``reset`` first removes labels.yaml,
    so ``label(run, reset=True)`` reverts the run to numbered clusters. Nothing is written when any
    value is invalid (ConfigError naming it). Returns the labels now in force.
    """
    path = Path(run)
    num_clusters = rundir.load(path).config.clusters
    current = labels_file.identity(num_clusters) if reset else labels_file.load(path, num_clusters)
    new_merges = {str(k): list(v) for k, v in (merges or {}).items()}
    touched = set()
    for members in new_merges.values():
        for c in members:
            try:
                touched.add(int(c))
            except (TypeError, ValueError):
                pass      # validate names the bad id
    all_names = {c: n for c, n in current.names.items() if c not in touched}
    all_merges = {n: m for n, m in current.merges.items() if not touched & set(m)}
    all_names.update(names or {})
    all_merges.update(new_merges)
    result = labels_file.validate(num_clusters, all_names, all_merges, where=f"labels of {path}")
    if reset and not names and not merges:
        labels_file.remove(path)
    else:
        labels_file.save(path, result)
    return result


def export(
    run: str | os.PathLike,
    masks: str | os.PathLike,
    format: str,
    out: str | os.PathLike,
    *,
    images: Sequence[str | os.PathLike] | None = None,
    image_root: str | None = None,
    overwrite: bool = False,
) -> list[str]:
    """Export the masks that ``segment`` wrote into ``masks`` for run ``run`` to ``out`` (format coco,
    cvat, label-studio or png; see ``unsupseg.export``). The photos are those segment was given
    (recorded in ``masks``) unless ``images``; ``image_root`` prefixes their paths in the COCO and
    Label Studio files (e.g. a URL). Nothing is exported when a mask is missing, the masks are of
    another run or of other labels, or ``out`` lies in an input or the masks folder. Returns the
    names of the images exported (an ``exporters.ExportResult``: also ``skipped`` and ``files``).
    """
    from ..exporters import ExportItem, check_format, export_masks

    check_format(format)
    run_path, masks, out = Path(run), Path(masks), Path(out)
    loaded = rundir.load(run_path)
    classes = labels_file.load(run_path, loaded.config.clusters).classes
    record = masks / SEGMENT_RECORD
    if not masks.is_dir():
        raise DataError(f"the masks folder {masks} does not exist; "
                        f"run `unsupseg segment {run} PHOTOS --out {masks}` first")
    if not record.is_file():
        raise DataError(f"{masks} holds no masks of `unsupseg segment` (no {SEGMENT_RECORD}); segment the photos first")
    try:
        theirs = json.loads(record.read_text())
    except (json.JSONDecodeError, OSError, UnicodeDecodeError) as err:
        raise DataError(f"{record} cannot be read ({err})") from None
    if theirs.get("run") is None or Path(theirs["run"]).resolve() != run_path.resolve():
        raise DataError(f"the masks in {masks} were written by the run {theirs.get('run')}, not {run_path}")
    if theirs.get("classes") != classes:
        raise DataError(f"the masks in {masks} were written before {run_path / labels_file.LABELS} changed; re-run "
                        "segment with --overwrite to apply the current names and merges")
    inputs = [Path(p) for p in (images if images else theirs.get("inputs", []))]
    if not inputs:
        raise DataError(f"{record} does not say which photos were segmented; pass --images")
    folders = [p.resolve() if p.is_dir() else p.resolve().parent for p in inputs] + [masks.resolve()]
    for folder in folders:
        if out.resolve() == folder or out.resolve().is_relative_to(folder):
            raise OutputError(f"--out {out} lies in {folder}, a folder of the photos or masks; exports never write "
                              "there: choose another --out (nothing was written)")
    planned = plan_outputs(inputs, masks)
    missing = [item for item in planned if not item.mask.is_file()]
    if missing:
        raise DataError(f"{len(missing)} of {len(planned)} masks are missing in {masks} (e.g. {missing[0].mask.name} "
                        f"for {missing[0].source}); run segment to finish them (nothing was exported)")
    items = [ExportItem(p.name, p.name + p.source.suffix, p.mask, confidence_path(p)) for p in planned]
    identity = {"masks": str(masks.resolve()), "model_sha256": theirs.get("model_sha256"), "crf": theirs.get("crf")}
    return export_masks(items, classes, format, out, identity=identity, image_root=image_root,
                        model_version=f"unsupseg {loaded.config.method} {run_path.name}", overwrite=overwrite,
                        track=track)
