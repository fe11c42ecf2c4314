"""`evaluate --probe linear` for CAUSE: the teacher head's output, then the probe (the STEGO path is
tested on an imported checkpoint in tests/importers/test_stego_import.py)."""

from __future__ import annotations

import pytest
import torch

from tests.methods.test_cause_inference import segmenter, state_of
from unsupseg.api import linear_probe_segmenter
from unsupseg.errors import ConfigError


@pytest.mark.parametrize("variant", ["mlp", "tr"])
def test_cause_probe_scores_the_head_output(variant):
    state, head = state_of(variant)
    generator = torch.Generator().manual_seed(3)
    state["linear.weight"], state["linear.bias"] = (
        torch.randn(6, 5, generator=generator),
        torch.randn(6, generator=generator),
    )
    seg = segmenter(state)
    probe = linear_probe_segmenter(seg, state)
    assert probe.num_clusters == 6 and probe.config.test.alpha == 1.0 and seg.config.clusters == 4
    feats = torch.randn(2, 12, 4, 6, generator=generator)
    with torch.no_grad():
        y = head(feats.flatten(2).transpose(1, 2))                                    # B x N x r
        expected = (y @ state["linear.weight"].T + state["linear.bias"]).transpose(1, 2).reshape(2, 6, 4, 6)
    torch.testing.assert_close(probe.scores(feats, None, (4, 6)), expected, atol=1e-5, rtol=1e-5)


def test_a_run_without_probe_is_refused():
    state, _ = state_of("mlp")
    with pytest.raises(ConfigError, match="no linear probe"):
        linear_probe_segmenter(segmenter(state), state)
