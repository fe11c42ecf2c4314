"""CAUSE pure functions: shapes, grid sampling, VQ, modularity and contrastive loss (docs/methods/cause.md §8.1-8.5)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from unsupseg.errors import ConfigError
from unsupseg.methods.cause.heads import MLPHead, ProjectionHead, TRHead
from unsupseg.methods.cause.losses import (
    affinity,
    concept_index,
    cosine_cluster_loss,
    draw_grid_order,
    front_door_loss,
    front_door_terms,
    grid_indices,
    max_product,
    modularity_loss,
    modularity_matrix,
    quantize,
    sample_grid,
)
from unsupseg.methods.cause.trainer import Student, to_map

pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- 1. shapes


def test_head_projection_and_probe_shapes():
    torch.manual_seed(0)
    b, d, r, p, c, grid = 2, 12, 5, 7, 3, (8, 12)
    n_tokens = grid[0] * grid[1]
    tokens = torch.randn(b, n_tokens, d)
    codebook = torch.randn(6, d)
    mlp, tr = MLPHead(d, r), TRHead(d, r, codebook, n_tokens, ffn_dim=16)
    assert mlp(tokens).shape == (b, n_tokens, r)
    assert tr(tokens).shape == (b, n_tokens, r)
    order = draw_grid_order(b, grid, gen())
    n = (grid[0] // 4) * (grid[1] // 4)
    assert sample_grid(tokens, order, grid).shape == (b, n, d)
    student = Student(mlp, ProjectionHead(r, p), torch.nn.Linear(r, c), grid, 4)
    z, logits = student(tokens, order, mlp(tokens))
    assert z.shape == (b, n, p)
    assert logits.shape == (b, c, *grid)


def test_tr_head_raises_when_token_count_differs():
    head = TRHead(8, 4, torch.randn(5, 8), num_queries=16, ffn_dim=8)
    head(torch.randn(1, 16, 8))
    with pytest.raises(ConfigError, match="16 tokens"):
        head(torch.randn(1, 25, 8))


def test_to_map_is_row_major():
    tokens = torch.arange(6.0).view(1, 6, 1)
    assert to_map(tokens, (2, 3))[0, 0].tolist() == [[0, 1, 2], [3, 4, 5]]


# ----------------------------------------------------------------------------- 2. grid sampling


def test_grid_sample_members_of_their_own_window_and_leftovers_unused():
    grid = (14, 14)  # 3 x 3 windows: rows/cols 12, 13 are leftovers
    order = draw_grid_order(64, grid, gen(1))
    index = grid_indices(order, grid)
    assert index.shape == (64, 9)
    rows, cols = index // 14, index % 14
    window_rows = torch.arange(3).repeat_interleave(3)
    window_cols = torch.arange(3).repeat(3)
    assert torch.equal(rows // 4, window_rows.expand_as(rows))
    assert torch.equal(cols // 4, window_cols.expand_as(cols))
    assert int(rows.max()) <= 11 and int(cols.max()) <= 11
    # every position of the window is drawn over many images
    assert len(torch.unique(order)) == 16


def test_grid_sample_same_order_gives_aligned_tokens():
    grid = (8, 8)
    coords = (
        torch.stack(torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij"), -1)
        .view(1, 64, 2)
        .repeat(3, 1, 1)
    )
    other = coords * 10 + 1
    order = draw_grid_order(3, grid, gen(2))
    a, b = sample_grid(coords, order, grid), sample_grid(other, order, grid)
    assert torch.equal(b, a * 10 + 1)
    assert torch.equal(sample_grid(coords, order, grid)[..., 0], (grid_indices(order, grid) // 8).float())


def test_grid_smaller_than_window_is_an_error():
    with pytest.raises(ConfigError, match="smaller than"):
        draw_grid_order(1, (3, 8), gen())


# ----------------------------------------------------------------------------- 3. VQ


def test_vq_rows_argmax_and_invariances():
    torch.manual_seed(0)
    x, codebook = torch.randn(50, 6), torch.randn(9, 6)
    q = quantize(x, codebook)
    idx = concept_index(x, codebook)
    assert torch.equal(q, codebook[idx])
    cos = F.normalize(x, dim=1) @ F.normalize(codebook, dim=1).T
    assert torch.equal(idx, cos.argmax(1))
    assert torch.equal(concept_index(x * 3.7, codebook), idx)
    scaled = codebook * torch.rand(9, 1).add(0.1) * 5
    assert torch.equal(concept_index(x, scaled), idx)
    ux, uc = F.normalize(x, dim=1), F.normalize(codebook, dim=1)
    assert torch.equal(concept_index(ux, uc), torch.cdist(ux, uc).argmin(1))


def test_vq_ties_go_to_lowest_index():
    codebook = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    assert concept_index(torch.tensor([[3.0, 0.0]]), codebook).item() == 0


# ----------------------------------------------------------------------------- 4. modularity


def naive_modularity(x, centroids, temperature=0.1):
    """The reference's formulation, written out: the full B x K x n x n tanh tensor, then a max
    over K (absolute values: tests/methods/test_cause_reference.py)."""
    x = x.detach()
    unit = x / x.norm(dim=-1, keepdim=True)
    a = (unit @ unit.transpose(1, 2)).clamp_min(0) * (1 - torch.eye(x.shape[1]))
    d = a.sum(2, keepdim=True)
    e = a.sum((1, 2), keepdim=True)
    w = a - d * d.transpose(1, 2) / e
    gamma = (F.normalize(x, dim=-1) @ F.normalize(centroids, dim=-1).T).clamp_min(0).transpose(1, 2)
    delta = torch.tanh(gamma.unsqueeze(3) * gamma.unsqueeze(2) / temperature).max(1).values
    return -((w * delta).sum((1, 2)) / e.flatten()).mean()


def test_affinity_and_modularity_matrix_properties():
    x = torch.randn(3, 10, 5, generator=gen(3))
    a = affinity(x)
    assert (a >= 0).all() and torch.allclose(a, a.transpose(1, 2), atol=1e-6)
    assert torch.equal(torch.diagonal(a, dim1=1, dim2=2), torch.zeros(3, 10))
    w, e = modularity_matrix(a)
    assert torch.allclose(w.sum(2), torch.zeros(3, 10), atol=1e-5)
    assert torch.allclose(e.flatten(), a.sum((1, 2)))


def test_delta_in_unit_interval_loss_finite_and_gradient_only_to_centroids():
    x = torch.randn(2, 12, 6, generator=gen(4), requires_grad=True)
    m = torch.randn(20, 6, generator=gen(5), requires_grad=True)
    gamma = (F.normalize(x, dim=-1) @ F.normalize(m, dim=-1).T).clamp_min(0)
    delta = torch.tanh(max_product(gamma, 7) / 0.1)
    assert (delta >= 0).all() and (delta <= 1).all()
    loss = modularity_loss(x, m)
    assert torch.isfinite(loss)
    loss.backward()
    assert x.grad is None
    assert m.grad is not None and m.grad.abs().sum() > 0


@pytest.mark.parametrize("chunk", [1, 3, 16, 64])
def test_chunked_equals_unchunked_values_and_gradients(chunk):
    x = torch.randn(3, 9, 5, generator=gen(6))
    m1 = torch.randn(16, 5, generator=gen(7), requires_grad=True)
    m2 = m1.detach().clone().requires_grad_(True)
    ours = modularity_loss(x, m1, chunk=chunk)
    ref = naive_modularity(x, m2)
    assert torch.allclose(ours, ref, atol=1e-6)
    ours.backward(), ref.backward()
    assert torch.allclose(m1.grad, m2.grad, atol=1e-6)


def blobs(n_per=16, dim=8, seed=8):
    g = gen(seed)
    centres = F.normalize(torch.randn(4, dim, generator=g), dim=1) * 3
    x = torch.cat([c + 0.2 * torch.randn(n_per, dim, generator=g) for c in centres])
    perm = torch.randperm(len(x), generator=g)
    return x[perm].view(4, -1, dim), centres


def test_modularity_improves_on_blobs_and_prefers_blob_centres():
    x, centres = blobs()
    m = torch.nn.Parameter(torch.empty(4, x.shape[-1]).uniform_(-0.25, 0.25, generator=gen(9)))
    start = modularity_loss(x, m).item()
    opt = torch.optim.Adam([m], lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        loss = modularity_loss(x, m)
        loss.backward()
        opt.step()
    assert modularity_loss(x, m).item() < start - 0.05
    random_m = torch.randn(4, x.shape[-1], generator=gen(10))
    assert modularity_loss(x, centres) < modularity_loss(x, random_m)


def test_cosine_cluster_loss_is_the_nearest_centroid_cosine_and_moves_only_winners():
    x = torch.randn(2, 10, 4, generator=gen(20), requires_grad=True)
    centroids = torch.randn(5, 4, generator=gen(21))
    centroids[4] = -centroids[:4].sum(0) * 100  # far from everything: never the nearest
    centroids.requires_grad_(True)
    cos = F.normalize(x, dim=-1) @ F.normalize(centroids, dim=-1).T
    assert cos.argmax(-1).ne(4).all()
    loss = cosine_cluster_loss(x, centroids)
    assert torch.allclose(loss, -cos.max(-1).values.mean())
    loss.backward()
    assert x.grad is None
    assert centroids.grad[:4].abs().sum() > 0 and torch.equal(centroids.grad[4], torch.zeros(4))


# ----------------------------------------------------------------------------- 5. contrastive loss


def setup_contrastive(b=3, n=6, p=5, k=8, seed=11):
    g = gen(seed)
    z_s = torch.randn(b, n, p, generator=g, requires_grad=True)
    z_t = torch.randn(b * n, p, generator=g)
    codebook = torch.randn(k, 4, generator=g)
    unit = F.normalize(codebook, dim=1)
    concept_cos = unit @ unit.T
    concepts = torch.randint(k, (b, n), generator=g)
    self_index = torch.arange(b * n).view(b, n)
    return z_s, z_t, concepts, concept_cos, self_index


def reference_loop(z_s, z_t, concepts, concept_cos, bank=None, temp=0.07, pos_t=0.3, neg_t=0.1):
    """The reference's per-image loop (contrastive_ema_with_codebook_bank), with empty terms dropped."""
    terms = []
    zs, zt = F.normalize(z_s, dim=2), F.normalize(z_t, dim=1)
    b, n, _ = z_s.shape
    for i in range(b):
        s = zs[i] @ zt.T / temp
        c = concept_cos[concepts[i]][:, concepts.flatten()]
        pos, neg = c > pos_t, c < neg_t
        auto = torch.ones_like(pos)
        auto[:, i * n : (i + 1) * n].fill_diagonal_(0)
        pos = pos & auto
        shifted = s - s.max(1, keepdim=True).values.detach()
        mat = -shifted + torch.log((shifted.exp() * (pos | neg)).sum(1, keepdim=True))
        terms.append(mat[pos].mean())
        if bank is not None:
            values, concept_of = bank
            sb = zs[i] @ values.T / temp
            cb = concept_cos[concepts[i]][:, concept_of]
            pb, nb = cb > pos_t, cb < neg_t
            shifted = sb - sb.max(1, keepdim=True).values.detach()
            mat = -shifted + torch.log((shifted.exp() * (pb | nb)).sum(1, keepdim=True))
            terms.append(mat[pb].mean())
    terms = [t for t in terms if torch.isfinite(t)]
    return sum(terms) / len(terms)


def test_contrastive_matches_reference_loop_in_batch_and_bank():
    z_s, z_t, concepts, concept_cos, self_index = setup_contrastive()
    terms, valid = front_door_terms(z_s, z_t, concepts, concepts.flatten(), concept_cos, self_index)
    assert terms.shape == (3,)  # empty bank: one term per image
    ours = front_door_loss(terms, valid)
    assert torch.isfinite(ours)
    assert torch.allclose(ours, reference_loop(z_s, z_t, concepts, concept_cos), atol=1e-5)
    # a bank of 8 concepts x capacity 3, partly filled
    g = gen(12)
    values = F.normalize(torch.randn(8, 3, 5, generator=g), dim=-1)
    length = torch.tensor([3, 0, 1, 2, 3, 0, 3, 1])
    filled = torch.arange(3) < length.unsqueeze(1)
    flat_values = values[filled]
    concept_of = torch.arange(8).unsqueeze(1).expand(8, 3)[filled]
    terms, valid = front_door_terms(
        z_s, z_t, concepts, concepts.flatten(), concept_cos, self_index, (flat_values, concept_of)
    )
    assert terms.shape == (6,)
    expected = reference_loop(z_s, z_t, concepts, concept_cos, (flat_values, concept_of))
    assert torch.allclose(front_door_loss(terms, valid), expected, atol=1e-5)


def test_contrastive_invariant_to_projection_scale():
    z_s, z_t, concepts, concept_cos, self_index = setup_contrastive()
    a = front_door_loss(*front_door_terms(z_s, z_t, concepts, concepts.flatten(), concept_cos, self_index))
    b = front_door_loss(*front_door_terms(z_s * 4.2, z_t * 0.3, concepts, concepts.flatten(), concept_cos, self_index))
    assert torch.allclose(a, b, atol=1e-5)


def test_self_is_never_a_positive():
    # one concept everywhere: every pair is positive except an anchor with itself
    b, n, p = 2, 3, 4
    z_s = torch.randn(b, n, p, generator=gen(13))
    z_t = z_s.detach().reshape(b * n, p).clone()
    concepts = torch.zeros(b, n, dtype=torch.long)
    concept_cos = torch.ones(1, 1)
    self_index = torch.arange(b * n).view(b, n)
    terms, valid = front_door_terms(z_s, z_t, concepts, concepts.flatten(), concept_cos, self_index)
    s = F.normalize(z_s, dim=-1).reshape(b * n, p) @ F.normalize(z_t, dim=-1).T / 0.07
    eye = torch.eye(b * n, dtype=torch.bool)
    lse = torch.logsumexp(s.masked_fill(eye, -float("inf")), 1, keepdim=True)
    expected = (lse - s).masked_fill(eye, 0).sum(1).view(b, n).sum(1) / (n * (b * n - 1))
    assert torch.allclose(terms, expected, atol=1e-5)
    assert valid.all()


def test_neutral_pairs_do_not_change_the_loss():
    b, n, p = 2, 4, 5
    z_s = torch.randn(b, n, p, generator=gen(14))
    own = torch.randn(b * n, p, generator=gen(15))
    concepts = torch.randint(2, (b, n), generator=gen(16))
    # concepts 0 and 1 are negatives of each other; concept 2 sits in the neutral zone of both
    concept_cos = torch.tensor([[1.0, 0.0, 0.2], [0.0, 1.0, 0.2], [0.2, 0.2, 1.0]])
    extra_concepts = torch.full((3,), 2)
    candidate_concepts = torch.cat([concepts.flatten(), extra_concepts])
    self_index = torch.arange(b * n).view(b, n)
    results = []
    for seed in (17, 18):
        z_t = torch.cat([own, 10 * torch.randn(3, p, generator=gen(seed))])
        results.append(front_door_terms(z_s, z_t, concepts, candidate_concepts, concept_cos, self_index)[0])
    without = front_door_terms(z_s, own, concepts, concepts.flatten(), concept_cos, self_index)[0]
    assert torch.equal(results[0], results[1])
    assert torch.allclose(results[0], without, atol=1e-6)


def test_max_shift_does_not_change_the_value():
    z_s, z_t, concepts, concept_cos, self_index = setup_contrastive(seed=16)
    terms, valid = front_door_terms(z_s, z_t, concepts, concepts.flatten(), concept_cos, self_index)
    s = F.normalize(z_s, dim=-1).reshape(-1, 5) @ F.normalize(z_t, dim=-1).T / 0.07
    c = concept_cos[concepts.flatten()][:, concepts.flatten()]
    pos = (c > 0.3) & ~torch.eye(len(s), dtype=torch.bool)
    mask = pos | (c < 0.1)
    lse = torch.log((s.exp() * mask).sum(1, keepdim=True))  # no shift
    per_image = ((lse - s) * pos).sum(1).view(3, -1).sum(1) / pos.sum(1).view(3, -1).sum(1)
    assert torch.allclose(terms[valid], per_image[valid], atol=1e-4)


def test_empty_positive_terms_are_dropped_and_all_empty_is_zero():
    b, n, p = 2, 3, 4
    z_s = torch.randn(b, n, p, generator=gen(17), requires_grad=True)
    z_t = torch.randn(b * n, p, generator=gen(18))
    concepts = torch.arange(b * n).view(b, n)  # every token its own, mutually orthogonal concept
    concept_cos = torch.eye(b * n)
    terms, valid = front_door_terms(z_s, z_t, concepts, concepts.flatten(), concept_cos, torch.arange(b * n).view(b, n))
    assert not valid.any()
    loss = front_door_loss(terms, valid)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(z_s.grad, torch.zeros_like(z_s))
    # image 0 gets positives, image 1 does not: the loss is image 0's term alone
    concepts2 = torch.tensor([[0, 0, 1], [2, 3, 4]])
    cos2 = torch.eye(5)
    terms, valid = front_door_terms(z_s, z_t, concepts2, concepts2.flatten(), cos2, torch.arange(6).view(2, 3))
    assert valid.tolist() == [True, False]
    assert torch.allclose(front_door_loss(terms, valid), terms[0])
