import pytest

from unsupseg.api import resolve_config
from unsupseg.config import RunConfig, apply_overrides, from_dict, to_dict
from unsupseg.errors import ConfigError


def test_unknown_key_names_the_closest_valid_one():
    with pytest.raises(ConfigError, match=r"'data.resolutoin'.*'resolution'"):
        from_dict(RunConfig, {"data": {"resolutoin": 320}})


def test_wrong_types_are_rejected_with_the_key():
    with pytest.raises(ConfigError, match="clusters: expected an integer"):
        from_dict(RunConfig, {"clusters": "many"})
    with pytest.raises(ConfigError, match="test.flip: expected true or false"):
        from_dict(RunConfig, {"test": {"flip": "yes"}})


def test_overrides_parse_yaml_values_and_round_trip():
    data = apply_overrides(
        {"data": {"split": "train"}}, ["data.resolution=224", "test.crf=true", "backbone.name=dino_vits8"]
    )
    config = from_dict(RunConfig, data)
    assert config.data.resolution == 224 and config.test.crf is True and config.backbone.name == "dino_vits8"
    assert from_dict(RunConfig, to_dict(config)) == config
    with pytest.raises(ConfigError, match="key.subkey=value"):
        apply_overrides({}, ["resolution"])


def test_dataset_preset_is_selected_and_overrides_win():
    config = resolve_config("kmeans", **{"data.dataset": "camvid"}, overrides=["params.restarts=1"])
    assert config.clusters == 11 and config.data.resolution == 360   # from presets/kmeans/camvid.yaml
    assert config.params["restarts"] == 1
    with pytest.raises(ConfigError, match="params.restart'.*'restarts'"):
        resolve_config("kmeans", overrides=["params.restart=1"])
    with pytest.raises(ConfigError, match="unknown method 'kmean'.*'kmeans'"):
        resolve_config("kmean")


def test_every_shipped_preset_resolves_to_valid_params():
    from unsupseg.api import resolve_method
    from unsupseg.config import preset_names
    from unsupseg.methods import method_names

    checked = 0
    for method in method_names():
        for name in preset_names(method):
            config = resolve_config(method, preset=name)
            resolve_method(config)            # typed and validated by the method's Params
            assert config.method == method and config.clusters >= 1, (method, name)
            checked += 1
    assert checked >= 20
