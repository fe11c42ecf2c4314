"""The permutohedral lattice: a real high-dimensional Gaussian filter, densecrf's structure."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unsupseg.postprocess.permutohedral import build_lattice


def _brute_force(features: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Exact sum_j exp(-|f_i - f_j|^2 / 2) v_j (densecrf's kernel on pre-scaled features)."""
    d2 = torch.cdist(features.double(), features.double()) ** 2
    return torch.exp(-d2 / 2) @ values.double()


def _points(n: int, d: int, spread: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, d, generator=g) * spread


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lattice_approximates_exact_5d_gaussian(seed):
    """200 points in 5-D: the lattice filter tracks the brute-force Gaussian filter.

    Measured over seeds 0..2: correlation 0.981-0.986 for random values and 0.983-0.985 for the
    normalisation K(1) (a filter std of 1 in feature units fits better than 0.85 or 1.2), and the
    best scalar fit (the lattice's gain is about 1.7) leaves a relative error of 0.080-0.088. The
    thresholds below leave margin. (densecrf's filter is the same approximation; the lattice is not
    an exact Gaussian, which is why the CRF is re-implemented lattice and all.)
    """
    feats = _points(200, 5, spread=3.0, seed=seed)
    g = torch.Generator().manual_seed(100 + seed)
    values = torch.rand(200, 3, generator=g)
    lat = build_lattice(feats)
    approx = lat.compute(values).double()
    exact = _brute_force(feats, values)
    for c in range(3):
        corr = np.corrcoef(approx[:, c].numpy(), exact[:, c].numpy())[0, 1]
        assert corr > 0.95, corr
    scale = (approx * exact).sum() / (approx * approx).sum()
    rel = torch.linalg.norm(scale * approx - exact) / torch.linalg.norm(exact)
    assert rel < 0.15, rel

    ones = torch.ones(200, 1)
    k1 = lat.compute(ones)[:, 0].double()
    corr = np.corrcoef(k1.numpy(), _brute_force(feats, ones)[:, 0].numpy())[0, 1]
    assert corr > 0.95, corr


def test_lattice_is_not_a_local_window():
    """Far-apart points do not interact; points at distance ~1 std do, at every dimension."""
    base = torch.zeros(1, 5)
    near = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.8]])
    far = torch.tensor([[0.0, 0.0, 0.0, 0.0, 8.0]])
    feats = torch.cat([base, near, far])
    values = torch.tensor([[1.0], [0.0], [0.0]])
    out = build_lattice(feats).compute(values)[:, 0]
    assert out[1] > 0.05 * out[0]
    assert out[2] == 0.0


def test_lattice_structure():
    feats = _points(257, 5, spread=4.0, seed=3)  # 257: not a multiple of 4 (densecrf padding)
    lat = build_lattice(feats)
    d1 = 6
    assert lat.offsets.shape == (257, d1) and lat.weights.shape == (257, d1)
    # barycentric weights: non-negative, sum to one; d+1 distinct vertices per point
    assert (lat.weights >= -1e-6).all()
    assert torch.allclose(lat.weights.sum(1), torch.ones(257), atol=1e-5)
    ordered = torch.sort(lat.offsets, dim=1).values
    assert (ordered[:, 1:] > ordered[:, :-1]).all()
    assert int(lat.offsets.max()) < lat.num_vertices
    # the blur neighbours are mutual: n2(n1(v)) = v along every direction
    for j in range(d1):
        n1, n2 = lat.neighbors[j, :, 0], lat.neighbors[j, :, 1]
        has = n1 >= 0
        assert (n2[n1[has]] == torch.arange(lat.num_vertices)[has]).all()
    # filtering is linear; it is only nearly symmetric (<K a, b> ~ <a, K b>): the blur steps run in
    # the order 0..d and do not commute where the lattice ends (densecrf has the same property)
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(257, 1, generator=g), torch.rand(257, 1, generator=g)
    ka, kb = lat.compute(a), lat.compute(b)
    assert torch.allclose(lat.compute(2 * a + b), 2 * ka + kb, atol=1e-4)
    assert torch.allclose((ka * b).sum(), (a * kb).sum(), rtol=0.05)


def test_batched_lattice_keeps_images_apart():
    f1 = _points(150, 5, spread=3.0, seed=4)
    f2 = _points(150, 5, spread=3.0, seed=5)
    v = torch.rand(300, 2, generator=torch.Generator().manual_seed(6))
    # interleaved point order (pixel-major, image-minor), as the CRF uses it
    feats = torch.stack([f1, f2], 1).reshape(300, 5)
    vals = torch.stack([v[:150], v[150:]], 1).reshape(300, 2)
    batch = torch.arange(2).repeat(150)
    out = build_lattice(feats, batch_index=batch, batch_size=2, points_per_image=150).compute(vals)
    out = out.reshape(150, 2, 2)
    assert torch.allclose(out[:, 0], build_lattice(f1).compute(v[:150]), atol=1e-6)
    assert torch.allclose(out[:, 1], build_lattice(f2).compute(v[150:]), atol=1e-6)


def test_sorted_csr_layout_used_on_cuda_gives_the_same_filter():
    """The CUDA build sorts every CSR row (cuSPARSE); exercise that code path on the CPU."""
    feats = _points(301, 5, spread=3.0, seed=8)
    values = torch.rand(301, 4, generator=torch.Generator().manual_seed(9))
    plain = build_lattice(feats)
    tidy = build_lattice(feats, sort_columns=True)
    assert torch.allclose(tidy.compute(values), plain.compute(values), atol=1e-6)
    mats = [tidy.splat_matrix(), tidy.slice_matrix(), *tidy.blur]
    for m in mats:
        crow, col = m.crow_indices().long(), m.col_indices().long()
        row = torch.repeat_interleave(torch.arange(m.shape[0]), crow[1:] - crow[:-1])
        same_row = row[1:] == row[:-1]
        assert (col[1:][same_row] > col[:-1][same_row]).all()
