"""Every shipped preset resolves to exactly the config it resolved to before presets could inherit
(tests/fixtures/resolved_presets.json, written by the code of a73e04d), and ``base:`` inheritance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from unsupseg.api import resolve_config
from unsupseg.config import load_preset, preset_names, to_dict
from unsupseg.errors import ConfigError
from unsupseg.methods import method_names

HERE = Path(__file__).resolve().parent
PRESETS = HERE.parent / "src" / "unsupseg" / "presets"
EXPECTED = json.loads((HERE / "fixtures" / "resolved_presets.json").read_text())


def test_the_presets_are_those_pinned():
    assert sorted(f"{m}/{n}" for m in method_names() for n in preset_names(m)) == sorted(EXPECTED)


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_every_preset_resolves_to_the_config_it_resolved_to_before(preset):
    method, name = preset.split("/")
    assert to_dict(resolve_config(method, preset=name)) == EXPECTED[preset]


@pytest.mark.parametrize("path", sorted(PRESETS.glob("*/*-paper.yaml")), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_a_paper_preset_states_only_its_differences_each_with_a_reason(path):
    lines = path.read_text().splitlines()
    assert len(lines) < 30
    own = yaml.safe_load(path.read_text())
    base_method, base_name = own.pop("base").split("/")
    base = load_preset(base_method, base_name)
    for section, values in own.items():
        for key, value in values.items():
            assert base[section][key] != value, f"{section}.{key} restates the base's value"
            line = next(i for i, text in enumerate(lines) if text.strip().startswith(f"{key}:"))
            assert lines[line - 1].strip().startswith("#"), f"{section}.{key} has no comment giving the reason"


def test_a_preset_file_inherits_and_its_own_keys_win(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("base: kmeans/camvid\nclusters: 5\ndata: {resolution: 64}\n")
    config = resolve_config("kmeans", preset=str(child))
    camvid = resolve_config("kmeans", preset="camvid")
    assert (config.clusters, config.data.resolution) == (5, 64)
    assert config.data.mode == camvid.data.mode and config.params == camvid.params   # the rest: the base's


def test_a_malformed_base_is_refused_naming_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: camvid\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: base must be <method>/<preset>"):
        resolve_config("kmeans", preset=str(bad))
    bad.write_text("base: kmeans/nothing\n")
    with pytest.raises(ConfigError, match="unknown preset 'nothing' for method 'kmeans'"):
        resolve_config("kmeans", preset=str(bad))
