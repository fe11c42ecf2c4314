"""The CAUSE reproduction presets and every command of docs/reproducing-cause.md: each resolves, and
each paper preset differs from its label-free preset (its base) in exactly the keys it states."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from unsupseg.api import resolve_config
from unsupseg.backbones.registry import get_spec
from unsupseg.config import load_preset, to_dict
from unsupseg.errors import ConfigError

DOC = Path(__file__).resolve().parents[1] / "docs" / "reproducing-cause.md"
CROPS = {"cocostuff27": "five", "cityscapes27": "five", "voc21": "super", "coco81": "double", "cocostuff171": "double"}
# docs/methods/cause.md §6: 20 numbers in the backbone table plus COCO-81 and COCO-171 (MLP and TR each)
PUBLISHED = 30


def doc_commands() -> list[list[str]]:
    return [shlex.split(c) for c in re.findall(r"`(unsupseg fit [^`]+)`", DOC.read_text())]


def resolve_command(argv: list[str]):
    """resolve_config with the arguments `unsupseg fit` would pass (the CLI's options, by name)."""
    assert argv[:2] == ["unsupseg", "fit"]
    opts, sets = {}, []
    it = iter(argv[2:])
    for flag in it:
        value = next(it)
        if flag == "--set":
            sets.append(value)
        else:
            opts[flag] = value
    assert set(opts) <= {"--method", "--dataset", "--root", "--preset", "--backbone", "--out"}, opts
    config = resolve_config(opts["--method"], preset=opts["--preset"], overrides=sets, **{
        "backbone.name": opts["--backbone"], "data.dataset": opts["--dataset"], "data.root": opts["--root"]})
    return config, opts


def test_every_published_number_has_a_command_that_resolves_to_the_paper_recipe():
    commands = doc_commands()
    assert len(commands) == PUBLISHED
    seen = set()
    for argv in commands:
        config, opts = resolve_command(argv)
        spec = get_spec(config.backbone.name)
        heads = config.backbone.options.get("num_heads")
        assert heads is None or spec.dim % heads == 0
        # the reference's DINO ViT-S runs 12 heads (docs/methods/cause.md §7.3); DINOv2 runs at 322 (§1.3)
        assert (heads == 12) == (config.backbone.name in ("dino_vits8", "dino_vits16"))
        assert (config.data.resolution == 322) == (config.backbone.name == "dinov2_vitb14")
        assert opts["--preset"] == f"{config.data.dataset}-paper"
        assert config.data.crop == CROPS[config.data.dataset]
        assert config.params["reference_step3"] and config.params["reference_clip"] and config.test.crf
        seen.add((config.method, config.data.dataset, config.backbone.name))
    assert len(seen) == PUBLISHED


@pytest.mark.parametrize("method", ["cause-mlp", "cause-tr"])
@pytest.mark.parametrize("dataset", sorted(CROPS))
def test_paper_preset_departs_from_the_label_free_one_in_the_listed_keys_only(method, dataset):
    paper = to_dict(resolve_config(method, preset=f"{dataset}-paper"))
    free = to_dict(resolve_config(method, preset=dataset))
    # both train on the reference's crops, cut on the fly (docs/methods/cause.md §1.4)
    assert free["data"]["crop"] == paper["data"]["crop"] == CROPS[dataset]
    assert (free["params"].pop("reference_step3"), paper["params"].pop("reference_step3")) == (False, True)
    assert (free["params"].pop("reference_clip"), paper["params"].pop("reference_clip")) == (False, True)
    assert paper == free
    # and the preset states exactly those departures on top of the label-free one
    own = yaml.safe_load(
        (Path(__file__).resolve().parents[1] / "src/unsupseg/presets" / method / f"{dataset}-paper.yaml").read_text()
    )
    assert own == {"base": f"{method}/{dataset}", "params": {"reference_step3": True, "reference_clip": True}}
    assert load_preset(method, f"{dataset}-paper")["data"]["crop"] == CROPS[dataset]


def test_data_crop_is_validated():
    assert resolve_config("cause-mlp", preset="cocostuff27", overrides=["data.crop=double"]).data.crop == "double"
    with pytest.raises(ConfigError, match="data.crop"):
        resolve_config("cause-mlp", preset="cocostuff27", overrides=["data.crop=ten"])
