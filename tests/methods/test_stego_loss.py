"""STEGO's pure functions: correlation terms, pointwise normalisation, permutations, probes, head."""

import pytest
import torch
import torch.nn.functional as F

from unsupseg.errors import ConfigError
from unsupseg.methods.stego import (
    Params,
    StegoHead,
    _Trainable,
    cluster_probe_loss,
    correlation,
    correlation_loss,
    correlation_term,
    derangement,
    linear_probe_loss,
    pointwise_normalize,
    random_coords,
    sample_points,
)


def _points(vectors):
    """A 1 x C x 1 x P map whose P points hold the given C-dim vectors."""
    return torch.tensor(vectors, dtype=torch.float32).T[None, :, None, :]


def test_correlation_is_cosine_of_every_point_pair():
    a = _points([[1, 0], [0, 2], [1, 1]])
    b = _points([[3, 0], [-1, 0]])
    fc = correlation(a, b)
    assert fc.shape == (1, 1, 3, 1, 2)
    expected = torch.tensor([[1.0, -1.0], [0.0, 0.0], [2**-0.5, -(2**-0.5)]])
    assert torch.allclose(fc[0, 0, :, 0, :], expected, atol=1e-6)


def test_term_shifts_features_and_clamps_negative_code_correlations():
    # features: Fc = [[1, 0], [0, 1]]; codes: Sc = [[1, -0.6], [-0.6, 1]] (two unit vectors, cos -0.6)
    f = _points([[1, 0], [0, 1]])
    z = _points([[1, 0], [-0.6, 0.8]]).requires_grad_(True)
    shift = 0.25
    loss, sc = correlation_term(f, f, z, z, shift, pointwise=False)
    assert torch.allclose(sc[0, 0, :, 0, :], torch.tensor([[1.0, -0.6], [-0.6, 1.0]]), atol=1e-6)
    # clamp(Sc, 0) keeps the diagonal only: -(1 * (1 - b)) there, 0 off the diagonal
    assert torch.allclose(loss[0, 0, :, 0, :], torch.tensor([[-(1 - shift), 0.0], [0.0, -(1 - shift)]]), atol=1e-6)
    # the clamp stops the gradient of the negative pairs: only the (constant) diagonal remains
    loss.mean().backward()
    assert torch.allclose(z.grad, torch.zeros_like(z.grad), atol=1e-6)
    # without the zero clamp the negative pairs (Fc - b = -0.25) push the codes apart
    z2 = z.detach().clone().requires_grad_(True)
    unclamped, _ = correlation_term(f, f, z2, z2, shift, pointwise=False, zero_clamp=False)
    assert torch.allclose(unclamped[0, 0, 0, 0, 1], torch.tensor(0.6 * (0 - shift)))
    unclamped.mean().backward()
    assert z2.grad.abs().sum() > 0


def test_shift_moves_the_loss_by_the_mean_clamped_code_correlation():
    gen = torch.Generator().manual_seed(0)
    f, z = torch.randn(2, 5, 3, 3, generator=gen), torch.randn(2, 4, 3, 3, generator=gen)
    low, sc = correlation_term(f, f.flip(0), z, z.flip(0), 0.0)
    high, _ = correlation_term(f, f.flip(0), z, z.flip(0), 0.3)
    assert torch.allclose(high.mean() - low.mean(), 0.3 * sc.clamp(min=0).mean(), atol=1e-6)


def test_stabilize_caps_code_correlations_at_0_8():
    f = _points([[1, 0], [1, 0]])
    z = _points([[1, 0], [1, 0]])
    loss, _ = correlation_term(f, f, z, z, 0.0, pointwise=False, stabilize=True)
    assert torch.allclose(loss, torch.full_like(loss, -0.8))


def test_pointwise_normalisation_centres_rows_and_keeps_the_global_mean():
    fc = torch.rand(3, 4, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    out = pointwise_normalize(fc)
    assert torch.allclose(out.mean(), fc.mean(), atol=1e-6)
    row_means = out.mean(dim=(3, 4))
    assert torch.allclose(row_means, torch.full_like(row_means, float(fc.mean())), atol=1e-6)


def test_derangement_has_no_fixed_points():
    gen = torch.Generator().manual_seed(0)
    for n in (2, 3, 5, 16, 33):
        for _ in range(50):
            perm = derangement(n, gen)
            assert perm.shape == (n,)
            assert not bool((perm == torch.arange(n)).any())
            assert int(perm.min()) >= 0 and int(perm.max()) < n
    with pytest.raises(ConfigError):
        derangement(1, gen)


def test_sampling_at_grid_corners_is_exact():
    t = torch.arange(12.0).view(1, 1, 3, 4)
    coords = torch.tensor([[[[-1.0, -1.0], [1.0, 1.0]]]])      # (x, y): top-left, bottom-right
    assert torch.equal(sample_points(t, coords)[0, 0, 0], torch.tensor([0.0, 11.0]))


def _inputs(b=4, c=6, d=3, s=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    signal, signal_pos = torch.randn(b, c, 6, 7, generator=gen), torch.randn(b, c, 6, 7, generator=gen)
    code, code_pos = torch.randn(b, d, 6, 7, generator=gen), torch.randn(b, d, 6, 7, generator=gen)
    return signal, signal_pos, code, code_pos, random_coords(b, s, gen), random_coords(b, s, gen)


def test_self_term_pairs_the_anchor_points_with_themselves():
    # the combination of the three terms is checked against the reference's numbers in test_stego_reference
    signal, signal_pos, code, code_pos, c1, c2 = _inputs()
    perms = [torch.tensor([1, 0, 3, 2]), torch.tensor([2, 3, 1, 0])]
    out = correlation_loss(signal, signal_pos, code, code_pos, c1, c2, perms, Params())
    # same points on both sides: the code correlation of the self term has a unit diagonal
    _, self_cd = correlation_term(sample_points(signal, c1), sample_points(signal, c1), sample_points(code, c1),
                                  sample_points(code, c1), 0.0)
    assert torch.allclose(
        torch.diagonal(self_cd.flatten(1, 2).flatten(2), dim1=1, dim2=2), torch.ones(4, 25), atol=1e-5
    )
    # the partner points (c2) never enter the self term
    other = correlation_loss(
        signal, signal_pos, code, code_pos, c1, random_coords(4, 5, torch.Generator()), perms, Params()
    )
    assert torch.equal(other["self"], out["self"]) and not torch.equal(other["knn"], out["knn"])


def test_code_gradient_flows_to_anchor_and_partner_but_not_through_features():
    signal, signal_pos, code, code_pos, c1, c2 = _inputs()
    for t in (signal, signal_pos, code, code_pos):
        t.requires_grad_(True)
    out = correlation_loss(signal, signal_pos, code, code_pos, c1, c2, [derangement(4, torch.Generator())], Params())
    out["loss"].backward()
    assert code.grad.abs().sum() > 0 and code_pos.grad.abs().sum() > 0
    assert signal.grad is None and signal_pos.grad is None


def test_cluster_probe_loss_is_minus_mean_best_cosine():
    gen = torch.Generator().manual_seed(0)
    code = torch.randn(2, 5, 3, 4, generator=gen)
    clusters = torch.randn(7, 5, generator=gen).requires_grad_(True)
    loss = cluster_probe_loss(code, clusters)
    cos = torch.einsum("bchw,kc->bkhw", F.normalize(code, dim=1), F.normalize(clusters, dim=1))
    assert torch.allclose(loss, -cos.max(1).values.mean())
    loss.backward()
    assert clusters.grad.abs().sum() > 0


def test_linear_probe_loss_ignores_unlabelled_and_out_of_range_pixels():
    logits = torch.randn(1, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[[0, 2, -1, 5], [1, 1, -1, 3], [2, 0, 0, 9], [-1, -1, 1, 2]]])
    loss = linear_probe_loss(logits, labels)
    up = F.interpolate(logits, size=(4, 4), mode="bilinear", align_corners=False)
    valid = (labels >= 0) & (labels < 3)
    expected = F.cross_entropy(up.permute(0, 2, 3, 1)[valid], labels[valid])
    assert torch.allclose(loss, expected)
    nothing = linear_probe_loss(logits.requires_grad_(True), torch.full((1, 4, 4), -1))
    assert float(nothing.detach()) == 0.0
    nothing.backward()
    assert logits.grad is not None


def test_probes_train_on_detached_codes_only():
    head = StegoHead(6, 3)
    model = _Trainable(
        head, 6, 3, clusters=4, num_classes=5, reconstruct=False, generator=torch.Generator().manual_seed(0)
    )
    feats = torch.randn(4, 6, 5, 5)
    labels = torch.randint(0, 5, (2, 40, 40))
    _, _, losses = model(feats, 2, labels)
    (losses["cluster"] + losses["linear"]).backward()
    assert all(p.grad is None for p in head.parameters())
    assert model.cluster_probe.grad.abs().sum() > 0 and model.linear_probe.weight.grad.abs().sum() > 0


def test_head_branches_draw_independent_dropout_masks_and_eval_has_none():
    torch.manual_seed(0)
    head = StegoHead(16, 4, dropout=0.5)
    feats = torch.randn(1, 16, 3, 3)
    masks = []
    head.cluster1.register_forward_pre_hook(lambda m, args: masks.append(args[0] != 0))
    head.cluster2.register_forward_pre_hook(lambda m, args: masks.append(args[0] != 0))
    signal, _ = head(feats)
    masks.append(signal != 0)
    assert len(masks) == 3
    assert all(not m.all() and m.any() for m in masks)  # each is a channel-dropout mask
    assert (
        not torch.equal(masks[0], masks[1])
        and not torch.equal(masks[1], masks[2])
        and not torch.equal(masks[0], masks[2])
    )
    head.eval()
    signal, code = head(feats)
    assert torch.equal(signal, feats)
    expected = head.cluster1(feats) + head.cluster2(feats)
    assert torch.allclose(code, expected)
    with pytest.raises(ConfigError, match="projection"):
        StegoHead(4, 2, projection="mlp")
