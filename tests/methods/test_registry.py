"""The method contract: one registered ``Method`` per name, declared defaults for its optional parts,
Params resolved once per fit, and a method's own evaluation protocol dispatched by the method."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import unsupseg
import unsupseg.api.scoring as scoring
from tests.conftest import write_images
from unsupseg.api import Segmenter
from unsupseg.config import RunConfig
from unsupseg.methods import get_method, method_names, register_method
from unsupseg.methods.base import FitPlan, Method, Predictor


def test_every_name_is_registered_with_its_own_method():
    assert method_names() == ["cause-mlp", "cause-tr", "kmeans", "leopart", "stego"]
    for name in method_names():
        method = get_method(name)
        assert isinstance(method, Method) and method.name == name
        assert get_method(name) is method          # one instance, registered once
    # the declared parts: the minimum K and the linear probe each method has
    assert {n: get_method(n).MIN_CLUSTERS for n in method_names()} == {
        "cause-mlp": 2, "cause-tr": 2, "kmeans": 1, "leopart": 2, "stego": 2}
    assert get_method("kmeans").LINEAR_PROBE is None and get_method("leopart").LINEAR_PROBE is None
    assert get_method("stego").LINEAR_PROBE == ("linear_probe.weight", "linear_probe.bias")


def test_a_method_that_declares_only_the_required_parts_gets_the_defaults():
    @dataclass
    class BareParams:
        size: int = 3

    class Bare(Method):
        name = "bare"
        Params = BareParams

    bare = Bare()
    assert bare.MIN_CLUSTERS == 1 and bare.LINEAR_PROBE is None
    assert bare.parse_params({"size": 5}) == BareParams(5)
    assert bare.plan(BareParams(), 4, 10, 8, 100) == FitPlan([None], [])
    assert bare.evaluation_protocol(BareParams()) is None


def test_a_name_is_registered_once():
    class Again(Method):
        name = "kmeans"

    get_method("kmeans")
    with pytest.raises(ValueError, match="registered twice"):
        register_method(Again)


def test_leopart_declares_the_reference_protocol_only_for_reference_runs():
    leopart = get_method("leopart")
    assert leopart.evaluation_protocol(leopart.parse_params({"protocol": "reference"})) == "leopart-reference"
    assert leopart.evaluation_protocol(leopart.parse_params({})) is None


def test_fit_parses_the_method_params_once(tmp_path, monkeypatch):
    calls = []
    real = Method.parse_params
    monkeypatch.setattr(Method, "parse_params", lambda self, data: calls.append(self.name) or real(self, data))
    write_images(tmp_path / "imgs", 3)
    seg = unsupseg.fit("kmeans", images=tmp_path / "imgs", out=tmp_path / "run", backbone="efficientnet_lite0",
                       clusters=2, overrides=["data.resolution=32", "params.restarts=1", f"cache_dir={tmp_path}/c"],
                       log=lambda m: None)
    assert calls == ["kmeans"]
    assert seg.method is get_method("kmeans") and seg.params.restarts == 1


class _Identity(Predictor):
    def embed(self, features):
        return features

    def classify(self, embedding):
        return embedding


def test_evaluate_hands_a_run_to_the_protocol_its_method_names(monkeypatch):
    class Own(Method):
        name = "own"
        Params = get_method("kmeans").Params

        def evaluation_protocol(self, params):
            return "own-protocol"

    seen = {}

    def protocol(seg, **arguments):
        seen.update(arguments, seg=seg)
        return {"protocol": "own-protocol"}

    monkeypatch.setitem(scoring.METHOD_PROTOCOLS, "own-protocol", protocol)
    method = Own()
    seg = Segmenter(RunConfig(), None, _Identity(), torch.device("cpu"), resolved=(method, method.parse_params({})))
    report = unsupseg.api.evaluate(seg, dataset="camvid", root="/nowhere", split="test")
    assert report == {"protocol": "own-protocol"} and seen["seg"] is seg
    assert {k: seen[k] for k in ("dataset", "root", "split")} == {
        "dataset": "camvid",
        "root": "/nowhere",
        "split": "test",
    }
