"""--clusters auto end to end: the chosen K is fitted, written to config.yaml, its curve to meta.json."""

import json

import pytest
import yaml

import unsupseg
from tests.conftest import write_images
from unsupseg.api import resolve_config
from unsupseg.cli import _clusters
from unsupseg.errors import ConfigError


def test_fit_with_auto_clusters_records_k_and_curve(tmp_path):
    write_images(tmp_path / "imgs", 4)
    logs = []
    seg = unsupseg.fit("kmeans", images=tmp_path / "imgs", clusters="auto", backbone="efficientnet_lite0",
                       out=tmp_path / "run", overrides=["data.resolution=48", "params.restarts=1",
                                                        "clusters_range=2,5"], log=logs.append)
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    k = meta["clusters_auto"]["chosen"]
    assert 2 <= k <= 5 and config["clusters"] == k == seg.num_clusters
    assert config["clusters_range"] == [2, 5] and meta["clusters_auto"]["ks"] == [2, 3, 4, 5]
    assert seg.predictor.centroids.shape[0] == k
    assert any(f"clusters auto: K = {k}" in m for m in logs)


def test_auto_and_range_are_checked():
    assert _clusters("11") == 11 and _clusters("auto") == "auto" and _clusters(None) is None
    assert resolve_config("kmeans", clusters="auto").clusters == "auto"
    with pytest.raises(ConfigError, match="clusters: expected an integer, got 'many'; clusters: expected 'auto'"):
        resolve_config("kmeans", clusters="many")
    with pytest.raises(ConfigError, match="clusters_range must be two integers"):
        resolve_config("kmeans", overrides=["clusters_range=9,3"])
    assert resolve_config("kmeans", overrides=["clusters_range=3,9"]).clusters_range == [3, 9]
