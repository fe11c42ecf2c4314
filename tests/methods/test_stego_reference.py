"""STEGO's contrastive correlation loss against the values the reference code computed
(../shared/reference/stego_loss.npz, ContrastiveCorrelationLoss of mhamilton723/STEGO eb4d6b5).

The reference is bitwise deterministic in float64, so float64 runs here must agree to rounding (1e-10
of the largest entry, far inside the README's tolerances). Training runs in float32: those runs must
stay within a few float32 roundings of the float64 values (2e-6 of the largest entry; the reference's
own float32 run, summing in another order, deviates by up to 4e-7)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.reference_data import load
from unsupseg.methods.stego import Params, correlation_loss, correlation_term, sample_points

FLOAT64 = 1e-10


def _close(actual: torch.Tensor, expected: np.ndarray, relative: float) -> None:
    expected = torch.as_tensor(expected, dtype=torch.float64)
    scale = float(expected.abs().max()) or 1.0
    deviation = float((actual.double() - expected).abs().max())
    assert deviation <= relative * scale, f"deviation {deviation:.3g} > {relative:g} x {scale:.3g}"


def _t(ref, key, dtype=torch.float64, grad=False):
    return torch.tensor(ref[key], dtype=dtype, requires_grad=grad)


@pytest.mark.parametrize("variant", ["h", "hnp", "hnz", "hst"])
def test_helper_variants(variant):
    ref = load("stego_loss.npz")
    pointwise, zero_clamp, stabilize = (bool(v) for v in ref[f"{variant}_flags"])
    c1, c2 = _t(ref, "h_c1", grad=True), _t(ref, "h_c2", grad=True)
    loss, cd = correlation_term(_t(ref, "h_f1"), _t(ref, "h_f2"), c1, c2, float(ref["h_shift"]),
                                pointwise=pointwise, zero_clamp=zero_clamp, stabilize=stabilize)
    loss.mean().backward()
    _close(loss.detach(), ref[f"{variant}_loss"], FLOAT64)
    _close(cd.detach(), ref[f"{variant}_cd"], FLOAT64)
    _close(loss.mean().detach(), ref[f"{variant}_loss_mean"], FLOAT64)
    _close(c1.grad, ref[f"{variant}_grad_c1"], FLOAT64)
    _close(c2.grad, ref[f"{variant}_grad_c2"], FLOAT64)


def test_helper_with_one_code_in_both_slots():
    ref = load("stego_loss.npz")
    c = _t(ref, "h_c1", grad=True)
    f = _t(ref, "h_f1")
    loss, _ = correlation_term(f, f, c, c, float(ref["h_shift"]))
    loss.mean().backward()
    _close(loss.mean().detach(), ref["hs_loss_mean"], FLOAT64)
    _close(c.grad, ref["hs_grad_c"], FLOAT64)


def _params(ref) -> Params:
    return Params(
        feature_samples=int(ref["cfg_feature_samples"]),
        neg_samples=int(ref["cfg_neg_samples"]),
        pointwise=bool(ref["cfg_pointwise"]),
        zero_clamp=bool(ref["cfg_zero_clamp"]),
        stabilize=bool(ref["cfg_stabalize"]),
        correspondence_weight=float(ref["cfg_correspondence_weight"]),
        weight_self=float(ref["cfg_pos_intra_weight"]),
        weight_knn=float(ref["cfg_pos_inter_weight"]),
        weight_rand=float(ref["cfg_neg_inter_weight"]),
        shift_self=float(ref["cfg_pos_intra_shift"]),
        shift_knn=float(ref["cfg_pos_inter_shift"]),
        shift_rand=float(ref["cfg_neg_inter_shift"]),
    )


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, FLOAT64), (torch.float32, 2e-6)])
def test_full_loss_replaying_the_reference_draws(dtype, tol):
    ref = load("stego_loss.npz")
    assert not ref["cfg_use_salience"]
    # the reference samples at coords.permute(0, 2, 1, 3): value (i, j) comes from coords[:, j, i]
    coords1 = torch.tensor(ref["coords1"], dtype=dtype).permute(0, 2, 1, 3)
    coords2 = torch.tensor(ref["coords2"], dtype=dtype).permute(0, 2, 1, 3)
    np.testing.assert_array_equal(ref["coords1"], 2 * ref["rand1"] - 1)   # our random_coords: 2u - 1 too
    np.testing.assert_array_equal(ref["coords2"], 2 * ref["rand2"] - 1)
    code, code_pos = _t(ref, "code", dtype, grad=True), _t(ref, "code_pos", dtype, grad=True)
    perms = [torch.tensor(row) for row in ref["perms"]]
    out = correlation_loss(
        _t(ref, "feats", dtype), _t(ref, "feats_pos", dtype), code, code_pos, coords1, coords2, perms, _params(ref)
    )
    out["loss"].backward()
    _close(sample_points(code, coords1).detach(), ref["sampled_code"], tol)
    _close(sample_points(code_pos, coords2).detach(), ref["sampled_code_pos"], tol)
    for ours, theirs in (
        ("self", "pos_intra_loss"),
        ("knn", "pos_inter_loss"),
        ("rand", "neg_inter_loss"),
        ("cd_self", "pos_intra_cd_mean"),
        ("cd_knn", "pos_inter_cd_mean"),
        ("cd_rand", "neg_inter_cd_mean"),
    ):
        _close(out[ours].detach(), ref[theirs], tol)
    _close(out["loss"].detach(), ref["total_loss"], tol)
    _close(code.grad, ref["grad_code"], tol)
    _close(code_pos.grad, ref["grad_code_pos"], tol)
    if dtype == torch.float32:
        _close(out["loss"].detach(), ref["native_f32_total_loss"], tol)
