"""Cluster names and merges of a run: ``labels.yaml`` in the run directory.

The file is small and meant to be edited by hand::

    version: 1
    clusters: 11          # the run's number of clusters (checked on load)
    names:                # cluster id: name
      0: sky
      3: road
    merges:               # name: the clusters it joins (two or more)
      building: [4, 7]

Output classes ("classes" below) are the groups of clusters: every merge is one class, every other
cluster is its own. Classes are numbered in the order of their smallest cluster id, so a run without
merges keeps its cluster ids. A class without a name is called ``cluster_<id>``. Masks, overlays,
exports and the evaluation use these classes once the file exists; without it nothing changes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from ._io import atomic_write_text
from .errors import ConfigError

LABELS = "labels.yaml"
VERSION = 1


@dataclass(frozen=True)
class Labels:
    num_clusters: int
    names: dict[int, str] = field(default_factory=dict)
    merges: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def groups(self) -> list[tuple[int, ...]]:
        """The clusters of each class, in class order."""
        merged = {c for members in self.merges.values() for c in members}
        groups = [tuple(sorted(m)) for m in self.merges.values()]
        groups += [(c,) for c in range(self.num_clusters) if c not in merged]
        return sorted(groups)

    @property
    def classes(self) -> list[str]:
        """The name of each class (``cluster_<id>`` when unnamed)."""
        by_members = {tuple(sorted(m)): name for name, m in self.merges.items()}
        return [by_members.get(g) or self.names.get(g[0]) or f"cluster_{g[0]}" for g in self.groups]

    @property
    def lookup(self) -> np.ndarray:
        """Cluster id -> class id (int64 array of length num_clusters)."""
        lut = np.zeros(self.num_clusters, dtype=np.int64)
        for k, group in enumerate(self.groups):
            lut[list(group)] = k
        return lut

    def apply(self, clusters: np.ndarray) -> np.ndarray:
        """Class id per pixel from cluster id per pixel."""
        return self.lookup[clusters]

    def to_dict(self) -> dict:
        return {"version": VERSION, "clusters": self.num_clusters,
                "names": {int(k): v for k, v in sorted(self.names.items())},
                "merges": {k: sorted(int(c) for c in v) for k, v in self.merges.items()}}


def identity(num_clusters: int) -> Labels:
    return Labels(num_clusters)


def _cluster_id(value, num_clusters: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            value = int(str(value).strip())
        except ValueError:
            raise ConfigError(f"{where}: {value!r} is not a cluster id (a whole number)") from None
    if not 0 <= value < num_clusters:
        raise ConfigError(f"{where}: cluster {value} does not exist (this run has clusters 0 to {num_clusters - 1})")
    return value


def _name(value, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: a name must be non-empty text, got {value!r}")
    return value.strip()


def validate(num_clusters: int, names: dict, merges: dict, where: str = "labels") -> Labels:
    """Labels from raw names ``{cluster: name}`` and merges ``{name: [clusters]}``; ConfigError
    naming ``where`` and the first problem (unknown cluster, empty or duplicate name, a merge of a
    cluster with itself or of fewer than two clusters, a cluster in two merges or both named and merged)."""
    clean_names = {_cluster_id(k, num_clusters, where): _name(v, where) for k, v in (names or {}).items()}
    clean_merges: dict[str, tuple[int, ...]] = {}
    owner: dict[int, str] = {}
    for raw_name, members in (merges or {}).items():
        name = _name(raw_name, where)
        if not isinstance(members, (list, tuple)):
            raise ConfigError(f"{where}: merge {name!r} must list the clusters it joins, got {members!r}")
        ids = [_cluster_id(c, num_clusters, where) for c in members]
        dup = next((c for c in ids if ids.count(c) > 1), None)
        if dup is not None:
            raise ConfigError(f"{where}: merge {name!r} joins cluster {dup} with itself")
        if len(ids) < 2:
            raise ConfigError(f"{where}: merge {name!r} needs at least two clusters, got {ids}")
        for c in ids:
            if c in owner:
                raise ConfigError(f"{where}: cluster {c} is in two merges ({owner[c]!r} and {name!r})")
            if c in clean_names:
                raise ConfigError(f"{where}: cluster {c} is named {clean_names[c]!r} and also merged into {name!r}; "
                                  "name the merge instead")
            owner[c] = name
        clean_merges[name] = tuple(sorted(ids))
    labels = Labels(num_clusters, clean_names, clean_merges)
    seen: dict[str, int] = {}
    for k, name in enumerate(labels.classes):
        if name in seen:
            raise ConfigError(f"{where}: the name {name!r} is given twice (merge the clusters instead)")
        seen[name] = k
    return labels


def load(run_dir: str | Path, num_clusters: int) -> Labels:
    """The run's labels (identity labels when it has no labels.yaml)."""
    path = Path(run_dir) / LABELS
    if not path.is_file():
        return identity(num_clusters)
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping with names and merges")
    unknown = set(data) - {"version", "clusters", "names", "merges"}
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)} (expected version, clusters, names, merges)")
    if data.get("clusters", num_clusters) != num_clusters:
        raise ConfigError(f"{path} was written for {data['clusters']} clusters but the run has {num_clusters}")
    for key in ("names", "merges"):
        if not isinstance(data.get(key) or {}, dict):
            raise ConfigError(f"{path}: {key} must be a mapping")
    return validate(num_clusters, data.get("names") or {}, data.get("merges") or {}, where=str(path))


def save(run_dir: str | Path, labels: Labels) -> Path:
    path = Path(run_dir) / LABELS
    # written by hand (not yaml.dump) so that the file reads as in the module docstring: one line per entry
    lines = ["# names and merges of this run's clusters; `unsupseg label RUN --reset` removes this file",
             f"version: {VERSION}", f"clusters: {labels.num_clusters}", "names:" + ("" if labels.names else " {}")]
    lines += [f"  {k}: {json.dumps(v)}" for k, v in sorted(labels.names.items())]
    lines += ["merges:" + ("" if labels.merges else " {}")]
    lines += [f"  {json.dumps(k)}: {list(v)}" for k, v in labels.merges.items()]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def remove(run_dir: str | Path) -> bool:
    path = Path(run_dir) / LABELS
    if path.is_file():
        path.unlink()
        return True
    return False


def parse_name(text: str) -> tuple[str, str]:
    """``"3=road"`` -> ("3", "road")."""
    cluster, sep, name = text.partition("=")
    if not sep:
        raise ConfigError(f"--name {text!r}: write CLUSTER=NAME, e.g. 3=road")
    return cluster.strip(), name


def parse_merge(text: str) -> tuple[str, list[str]]:
    """``"4,7=building"`` -> ("building", ["4", "7"])."""
    clusters, sep, name = text.partition("=")
    if not sep:
        raise ConfigError(f"--merge {text!r}: write CLUSTERS=NAME, e.g. 4,7=building")
    return name, [c.strip() for c in clusters.split(",")]
