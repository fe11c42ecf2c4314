"""Leopart's graph, community detection and Sinkhorn against the values its code computed
(../shared/reference: leopart_cooccurrence.npz, leopart_infomap.npz, leopart_sinkhorn.npz; the
metric's leopart_eval.npz is in tests/evaluation/test_leopart_metric.py). Discrete outputs exactly."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from tests.reference_data import load
from unsupseg.errors import ConfigError
from unsupseg.methods.leopart import finetune as lf
from unsupseg.methods.leopart import merge


def test_neighbour_offsets_are_those_greycomatrix_counted():
    ref = load("leopart_cooccurrence.npz")
    # offsets[angle, distance] = (drow, dcol); ours list distance 1 for every angle, then distance 2
    expected = [tuple(ref["offsets"][a, d]) for d in range(2) for a in range(8)]
    assert list(merge.OFFSETS) == expected


def test_pair_counts_matrix_and_edges():
    ref = load("leopart_cooccurrence.npz")
    n = int(ref["num_clusters"])
    labels = [torch.from_numpy(m) for m in ref["labels"]]
    for image, counts in zip(labels, ref["counts"]):
        np.testing.assert_array_equal(merge.pair_counts(image, n).numpy(), counts)
    adj = merge.cooccurrence(labels, n)
    np.testing.assert_array_equal(adj.numpy(), ref["adj"])    # exact: integer counts, float64 arithmetic
    edges = merge.build_graph(adj, float(ref["weight_threshold"]))
    assert [(i, j) for i, j, _ in edges] == [(int(i), int(j)) for i, j, _ in ref["edges"]]
    np.testing.assert_array_equal([w for _, _, w in edges], ref["edges"][:, 2])


@pytest.mark.skipif(importlib.util.find_spec("infomap") is None, reason="infomap not installed")
def test_infomap_runs_give_the_reference_modules():
    import infomap

    ref = load("leopart_infomap.npz")
    if infomap.__version__ != "2.16.0":   # README: the forced-20 partitions are specific to 2.16.0
        pytest.skip(f"the stored modules were computed with infomap 2.16.0, found {infomap.__version__}")
    assert not ref["directed"] and ref["two_level"]
    edges = [(int(i), int(j), float(w)) for i, j, w in ref["edges"]]
    for s, (mt, number) in enumerate(zip(ref["markov_time"], ref["preferred_number_of_modules"])):
        for k, seed in enumerate(ref["seeds"]):
            modules = merge.detect_communities(edges, int(number), backend="infomap", markov_time=float(mt),
                                               seed=int(seed), trials=1)
            got = [modules[node] for node in range(int(ref["num_nodes"]))]
            np.testing.assert_array_equal(got, ref["modules"][s, k], err_msg=f"setting {s}, seed {seed}")
    # the reference's seed 0 cannot run: Infomap rejects it, so do we (with a clear error)
    assert "seed=0 is out of range" in str(ref["seed0_result"])
    with pytest.raises(ConfigError, match="start at 1"):
        merge.detect_communities(edges, 20, backend="infomap", seed=0)


@pytest.mark.parametrize("case", ["a", "b"])
def test_sinkhorn_matches_the_reference(case):
    ref = load("leopart_sinkhorn.npz")
    assert float(ref["epsilon"]) == 0.05 and int(ref["iters"]) == 3
    scores = torch.from_numpy(ref[f"{case}_scores"])
    before = scores.clone()
    out = lf.sinkhorn(scores, epsilon=0.05, iterations=3)
    assert out.dtype == torch.float32
    # README: a float32 run deviates from the float64 values by <= 3e-7 absolute
    np.testing.assert_allclose(out.double().numpy(), ref[f"{case}_out"], rtol=0, atol=3e-7)
    np.testing.assert_allclose(out.double().numpy(), ref[f"{case}_out32"], rtol=0, atol=3e-7)
    # the reference rescales its Q argument in place (q_after != q); ours leaves its input alone
    assert not np.array_equal(ref[f"{case}_q_after"], ref[f"{case}_q"]) and torch.equal(scores, before)
