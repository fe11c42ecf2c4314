"""Pure functions of CAUSE (docs/methods/cause.md §2-§3): grid sub-sampling, vector quantisation, the modularity
loss and the concept-wise contrastive loss. No state, no training loop.

Token tensors are B x N x F with the N = h*w tokens of a map in row-major order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import ConfigError

# ----------------------------------------------------------------------------- grid sub-sampling


def draw_grid_order(batch: int, grid: tuple[int, int], generator: torch.Generator, window: int = 4) -> Tensor:
    """π: one position in 0..window²-1 per (image, window), uniform and independent (B x n)."""
    h, w = grid
    if h < window or w < window:
        raise ConfigError(
            f"a {h}x{w} token grid is smaller than the {window}x{window} sampling window; raise the resolution"
        )
    n = (h // window) * (w // window)
    return torch.randint(window * window, (batch, n), generator=generator)


def grid_indices(order: Tensor, grid: tuple[int, int], window: int = 4) -> Tensor:
    """Flat token index (into the h*w grid) of the token π picks in each window, B x n.

    Windows tile the grid from the top-left corner; leftover rows and columns are never used.
    """
    h, w = grid
    rows, cols = h // window, w // window
    wy = torch.arange(rows, device=order.device).repeat_interleave(cols) * window
    wx = torch.arange(cols, device=order.device).repeat(rows) * window
    return (wy + order // window) * w + (wx + order % window)


def sample_grid(x: Tensor, order: Tensor, grid: tuple[int, int], window: int = 4) -> Tensor:
    """S(X, π): B x N x F -> B x n x F, one token per window (the same π gives aligned tokens)."""
    index = grid_indices(order.to(x.device), grid, window)
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


# ----------------------------------------------------------------------------- vector quantisation


def concept_similarity(x: Tensor, codebook: Tensor) -> Tensor:
    """cos(x, M_k) for every token and concept: ... x D -> ... x K."""
    return F.normalize(x, dim=-1) @ F.normalize(codebook, dim=-1).T


def concept_index(x: Tensor, codebook: Tensor) -> Tensor:
    """a(x) = argmax_k cos(x, M_k); ties go to the lowest index (torch.argmax's rule)."""
    return concept_similarity(x, codebook).argmax(-1)


def quantize(x: Tensor, codebook: Tensor) -> Tensor:
    """VQ(x) = M_{a(x)}, the raw (un-normalised) codebook row."""
    return codebook[concept_index(x, codebook)]


# ----------------------------------------------------------------------------- modularity


def affinity(x: Tensor) -> Tensor:
    """A_ij = max(0, cos(x_i, x_j)) with a zero diagonal, B x n x n."""
    unit = F.normalize(x, dim=-1)
    a = (unit @ unit.transpose(1, 2)).clamp_min(0)
    return a * (1 - torch.eye(a.shape[1], device=a.device, dtype=a.dtype))


def modularity_matrix(a: Tensor) -> tuple[Tensor, Tensor]:
    """W = A - d dᵀ / e and e = Σ A (= 2m), per image; rows of W sum to 0."""
    d = a.sum(2, keepdim=True)
    e = a.sum((1, 2), keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    return a - d @ d.transpose(1, 2) / e, e


class _MaxProduct(torch.autograd.Function):
    """max_k Γ_ik Γ_jk over K in chunks, so B x K x n x n is never held; the gradient goes to the
    maximising concept (ties: the lowest index), as autograd of torch.max would route it."""

    @staticmethod
    def forward(ctx, gamma: Tensor, chunk: int) -> Tensor:
        batch, n, k = gamma.shape
        best = gamma.new_full((batch, n, n), -float("inf"))
        index = torch.zeros((batch, n, n), dtype=torch.long, device=gamma.device)
        for start in range(0, k, chunk):
            g = gamma[:, :, start : start + chunk]
            value, arg = (g.unsqueeze(2) * g.unsqueeze(1)).max(-1)
            better = value > best
            best = torch.where(better, value, best)
            index = torch.where(better, arg + start, index)
        ctx.save_for_backward(gamma, index)
        return best

    @staticmethod
    def backward(ctx, grad: Tensor):
        gamma, index = ctx.saved_tensors
        # value_ij = Γ[i, k*] Γ[j, k*]: d/dΓ[i, k*] = Γ[j, k*] and d/dΓ[j, k*] = Γ[i, k*]
        at_i = gamma.gather(2, index)
        at_j = gamma.gather(2, index.transpose(1, 2)).transpose(1, 2)
        out = torch.zeros_like(gamma)
        out.scatter_add_(2, index, grad * at_j)
        out.scatter_add_(2, index.transpose(1, 2), (grad * at_i).transpose(1, 2))
        return out, None


def max_product(gamma: Tensor, chunk: int | None = None) -> Tensor:
    """max_k Γ_ik Γ_jk for Γ: B x n x K -> B x n x n, computed over ``chunk`` concepts at a time."""
    return _MaxProduct.apply(gamma, chunk or gamma.shape[-1])


def modularity_chunk(batch: int, n: int, budget: int = 1 << 25) -> int:
    """Concepts per chunk so that one B x n x n x chunk product holds about ``budget`` values
    (128 MiB in float32 by default)."""
    return max(1, budget // max(1, batch * n * n))


def modularity_loss(x: Tensor, centroids: Tensor, temperature: float = 0.1, chunk: int | None = None) -> Tensor:
    """L_mod(M; X) = -mean_b (1/e) Σ_ij W_ij Δ_ij with Δ_ij = max_k tanh(Γ_ik Γ_jk / τ).

    ``x`` (B x n x F) is detached: only ``centroids`` (K x F) receive a gradient. tanh is monotone,
    so Δ = tanh(max_k Γ_ik Γ_jk / τ), computed chunk-wise over K (``chunk`` None: automatic).
    """
    x = x.detach()
    w, e = modularity_matrix(affinity(x))
    gamma = concept_similarity(x, centroids).clamp_min(0)
    # a GPU affords (and needs, to be fast) bigger chunks than a CPU's caches
    chunk = chunk or modularity_chunk(x.shape[0], x.shape[1], 1 << (28 if x.is_cuda else 25))
    delta = torch.tanh(max_product(gamma, chunk) / temperature)
    q = (w * delta).sum((1, 2)) / e.flatten()
    return -q.mean()


def cosine_cluster_loss(x: Tensor, centroids: Tensor) -> Tensor:
    """-mean_i max_c cos(x_i, Φ_c): the STEGO-style cluster loss the reference also defines
    (``forward_centroid``), i.e. online spherical k-means; the gradient reaches the winning centroid."""
    cos = F.normalize(x.detach(), dim=-1) @ F.normalize(centroids, dim=-1).T
    return -cos.max(-1).values.mean()


# ----------------------------------------------------------------------------- contrastive loss


def _pair_terms(scores: Tensor, pos: Tensor, neg: Tensor) -> tuple[Tensor, Tensor]:
    """Per anchor row of A x M scores: Σ_j∈Pos ℓ_ij and |Pos|, ℓ_ij = -s_ij + log Σ_{Pos ∪ Neg} exp(s).

    The row maximum (detached) is subtracted before exp for stability; it cancels exactly.
    """
    shifted = scores - scores.detach().amax(1, keepdim=True)
    denom = (shifted.exp() * (pos | neg)).sum(1)
    count = pos.sum(1)
    # log(0) happens only on rows without candidates, which have no positive either
    log_denom = torch.where(count > 0, denom.clamp_min(torch.finfo(scores.dtype).tiny).log(), torch.zeros_like(denom))
    return count * log_denom - (shifted * pos).sum(1), count


def _per_image(row_sums: Tensor, counts: Tensor, images: int) -> tuple[Tensor, Tensor]:
    """Flat mean over the positive pairs of each anchor image: (term per image, non-empty mask)."""
    sums = row_sums.view(images, -1).sum(1)
    totals = counts.view(images, -1).sum(1)
    return sums / totals.clamp_min(1), totals > 0


def front_door_terms(
    z_student: Tensor,
    z_teacher: Tensor,
    anchor_concepts: Tensor,
    candidate_concepts: Tensor,
    concept_cos: Tensor,
    self_index: Tensor,
    bank: tuple[Tensor, Tensor] | None = None,
    temperature: float = 0.07,
    pos_threshold: float = 0.3,
    neg_threshold: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """The list [L_in(1), L_bank(1), ..., L_in(B), L_bank(B)] of docs/methods/cause.md §3.2, batched.

    z_student: B x n x P anchors (student projections); z_teacher: M x P in-batch candidates (all
    sampled tokens of the global batch, teacher projections, constants); anchor_concepts B x n and
    candidate_concepts M: concept ids a(x); concept_cos: K x K cosine between codebook rows;
    self_index: B x n position of each anchor among the candidates (never its own positive).
    bank: (entries E x P unit vectors, their concept ids E), or None while the bank is empty.
    Returns (terms, non-empty mask), both of length B (no bank) or 2B; a term without positive
    pairs is 0 and masked out (§7.9).
    """
    images, n, _ = z_student.shape
    # 1/τ folded into the anchors: one pass less over the A x M score matrices
    anchors = F.normalize(z_student, dim=-1).reshape(images * n, -1) / temperature
    a = anchor_concepts.reshape(-1)
    pos_table, neg_table = concept_cos > pos_threshold, concept_cos < neg_threshold
    scores = anchors @ F.normalize(z_teacher, dim=-1).T
    pos = pos_table[a][:, candidate_concepts]
    pos[torch.arange(len(anchors), device=pos.device), self_index.reshape(-1)] = False
    row_sums, counts = _pair_terms(scores, pos, neg_table[a][:, candidate_concepts])
    terms, valid = _per_image(row_sums, counts, images)
    if bank is None:
        return terms, valid
    entries, entry_concepts = bank
    row_sums, counts = _pair_terms(
        anchors @ entries.T, pos_table[a][:, entry_concepts], neg_table[a][:, entry_concepts]
    )
    bank_terms, bank_valid = _per_image(row_sums, counts, images)
    return torch.stack([terms, bank_terms], 1).flatten(), torch.stack([valid, bank_valid], 1).flatten()


def front_door_loss(terms: Tensor, valid: Tensor) -> Tensor:
    """Average of the non-empty terms; 0 (still attached to the graph) when every term is empty."""
    if bool(valid.any()):
        return terms[valid].mean()
    return terms.sum() * 0


def probe_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Linear-probe cross-entropy: B x C x h x w logits upsampled bilinearly to the B x H x W labels;
    pixels outside [0, C) are ignored (0 when none is valid)."""
    logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    valid = (labels >= 0) & (labels < logits.shape[1])
    if not bool(valid.any()):
        return logits.sum() * 0
    target = torch.where(valid, labels, torch.full_like(labels, -100))
    return F.cross_entropy(logits, target, ignore_index=-100)
