"""Permutohedral lattice (Adams, Baek & Davis 2010), vectorised in PyTorch.

This is a re-implementation of the lattice in Philipp Krähenbühl's ``densecrf`` library
(``permutohedral.cpp``, the code behind ``pydensecrf``), written with whole-tensor operations so
that it runs on CPU and CUDA without a compiler.

Exact (same as densecrf):

* **Lattice construction** follows densecrf operation for operation in float32: the elevation
  ``y = E f`` with the same scale factors (``inv_std_dev = sqrt(2/3) * (d+1)``) accumulated in the
  same order, round-half-to-even of ``y / (d+1)`` (the ``_mm_cvtps_epi32`` of densecrf's SSE build),
  the same rank (sort) of the remainders including its tie-breaking, the same "back onto the
  plane" correction, and the same barycentric weights including the wrap-around term. Every point
  therefore splats to the same ``d + 1`` lattice vertices with the same weights as in densecrf.
  densecrf's SSE build also inserts the vertices of the simplex at the origin when the number of
  points is not a multiple of 4 (its zero-padded last block); they carry no value but relay the
  blur, and are reproduced here.
* **Filtering** is splat, blur along the lattice directions ``0, 1, ..., d`` (in that order) with
  ``new[v] = old[v] + (old[n1] + old[n2]) / 2`` where missing neighbours count as zero, then slice
  with the barycentric weights times ``alpha = 1 / (1 + 2^-d)``.

Different (results agree to float32 rounding, not bit for bit):

* densecrf's hash table is replaced by sorting: the vertex keys (integer coordinates) are packed
  into one int64 each and deduplicated with a sort; blur neighbours are found with
  ``torch.searchsorted``. All ``d`` coordinates of a vertex of remainder ``r`` are congruent to
  ``r`` modulo ``d + 1``, so the code packs ``(image, r, quotients)``. Vertices are then numbered
  in order of their first point, like densecrf's hash-table insertion order (it keeps the sparse
  products cache friendly); numbering only changes float summation order.
* splat, blur and slice are sparse CSR matrices, built once per lattice and reused by every
  mean-field iteration; consecutive blur directions are multiplied pairwise into one matrix
  (``B1 B0``, ``B3 B2``, ...), which is the same linear map. Their products sum in a different
  order than densecrf's loops (measured: filtered values within about 1e-6 relative).
* On CPU the CSR rows are left unsorted (MKL and torch's native kernel accept that); on CUDA they
  are sorted for cuSPARSE.

Several images are filtered together by building one lattice over all of them with the image index
packed into the vertex codes: vertices of different images never meet, so the result equals one
lattice per image.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

__all__ = ["LatticeOverflowError", "PermutohedralLattice", "build_lattice", "csr"]

_MAX_BITS = 62


class LatticeOverflowError(OverflowError):
    """The lattice vertex keys of this feature set do not fit in 62 bits."""


def csr(
    crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """A sparse CSR float32 tensor (int32 indices where they fit, which spares MKL and cuSPARSE
    a conversion on every product), without torch's beta-feature and invariant-check warnings."""
    if col.numel() < 2**31 - 1 and max(size) < 2**31 - 1:
        crow, col = crow.to(torch.int32), col.to(torch.int32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            crow,
            col,
            val,
            size=size,
            dtype=torch.float32,
            device=val.device,
            check_invariants=False,
        )


def _scale_factors(d: int) -> list[float]:
    """densecrf's diagonal of E times ``inv_std_dev``, each rounded to float32 as densecrf does."""
    inv_std_dev = float(torch.tensor(math.sqrt(2.0 / 3.0) * (d + 1), dtype=torch.float32))
    return [
        float(torch.tensor(1.0 / math.sqrt((i + 2) * (i + 1)) * inv_std_dev, dtype=torch.float32))
        for i in range(d)
    ]


@dataclass
class PermutohedralLattice:
    """A lattice built over ``num_points`` feature vectors of dimension ``d``.

    ``offsets``/``weights`` (num_points x (d+1)) are the vertices each point splats to and their
    barycentric weights; ``splat_crow/splat_col/splat_val`` hold the same entries vertex-major
    (CSR); ``neighbors[j, v]`` are the two neighbours of vertex v along lattice direction j (-1 if
    absent); ``blur`` holds the blur as sparse CSR matrices to apply in order (the ``d + 1``
    direction steps, pre-multiplied in pairs).
    """

    d: int
    num_points: int
    num_vertices: int
    offsets: torch.Tensor
    weights: torch.Tensor
    splat_crow: torch.Tensor
    splat_col: torch.Tensor
    splat_val: torch.Tensor
    neighbors: torch.Tensor  # (d+1) x num_vertices x 2 int64, -1 where missing
    blur: list[torch.Tensor]

    @property
    def alpha(self) -> float:
        """densecrf's "magic scaling constant" applied at slicing."""
        return 1.0 / (1.0 + 2.0 ** (-self.d))

    @property
    def device(self) -> torch.device:
        return self.offsets.device

    def splat_matrix(self, col_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Sparse (num_vertices x num_points) splatting matrix; column j scaled by col_scale[j]."""
        w = self.splat_val
        if col_scale is not None:
            w = w * col_scale.index_select(0, self.splat_col)
        return csr(self.splat_crow, self.splat_col, w, (self.num_vertices, self.num_points))

    def slice_matrix(self, row_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Sparse (num_points x num_vertices) slicing matrix including ``alpha``; row i scaled by
        row_scale[i] (used to fold the kernel normalisation and the Potts weight in)."""
        n, k = self.offsets.shape
        w = self.weights * self.alpha
        if row_scale is not None:
            w = w * row_scale[:, None]
        crow = torch.arange(0, n * k + 1, k, device=self.device, dtype=torch.int64)
        # offsets rows are sorted on CUDA (cuSPARSE); MKL accepts any order within a row
        return csr(crow, self.offsets.reshape(-1), w.reshape(-1), (n, self.num_vertices))

    def compute(self, values: torch.Tensor) -> torch.Tensor:
        """Filter ``values`` (num_points x C float32) like densecrf's ``Permutohedral::compute``."""
        v = self.splat_matrix() @ values
        for step in self.blur:
            v = step @ v
        return self.slice_matrix() @ v


def build_lattice(
    features: torch.Tensor,
    batch_index: torch.Tensor | None = None,
    batch_size: int = 1,
    points_per_image: int | None = None,
    sort_columns: bool | None = None,
) -> PermutohedralLattice:
    """Build the lattice of ``features`` (P x d, float32, any device).

    ``batch_index`` (P int64 in ``[0, batch_size)``; default: all points in image 0) says which
    image each point belongs to; points of different images never share a vertex.
    ``points_per_image`` (default ``P // batch_size``) is each image's point count, used only to
    reproduce densecrf's zero-padding vertices (see the module docstring). ``sort_columns``
    (default: on CUDA only) sorts the column indices of every CSR row, as cuSPARSE expects.
    """
    device = features.device
    features = features.to(torch.float32)
    P, d = features.shape
    if P == 0 or d == 0:
        raise ValueError(f"cannot build a lattice over features of shape {tuple(features.shape)}")
    if sort_columns is None:  # cuSPARSE wants sorted CSR rows; MKL does not care
        sort_columns = device.type != "cpu"
    if points_per_image is None:
        points_per_image = P // batch_size
    if batch_index is None:
        batch_index = torch.zeros(P, dtype=torch.int64, device=device)

    elev = _elevate(features)
    rank, rem0, q0 = _enclosing_simplex(elev)
    bary = _barycentric(elev, rem0, rank)
    del elev, rem0
    grid = _CodeGrid.of(q0, batch_size, pad=points_per_image % 4 != 0)
    flat, n_real = grid.vertex_codes(q0, rank, batch_index.to(device=device, dtype=torch.int64), batch_size)
    bary_t = torch.stack(bary, 0)  # (d+1) x P
    del rank, q0, bary

    uniq, perm, vid, counts, start, order, newid = _number_vertices(flat, n_real, P)
    del flat
    splat_crow, splat_col, splat_val = _splat_matrix(perm, counts, start, order, bary_t, P)
    offsets, weights = _slice_table(perm, vid, newid, bary_t, P, sort_columns)
    del perm, vid, bary_t
    neighbors = _blur_neighbors(uniq, newid, grid)

    return PermutohedralLattice(
        d=d,
        num_points=P,
        num_vertices=uniq.numel(),
        offsets=offsets,
        weights=weights,
        splat_crow=splat_crow,
        splat_col=splat_col,
        splat_val=splat_val,
        neighbors=neighbors,
        blur=_blur_matrices(neighbors, sort_columns),
    )


def _f32(x: float, device: torch.device) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32, device=device)


def _elevate(features: torch.Tensor) -> list[torch.Tensor]:
    """y = E f (d+1 columns of P), accumulating from the last coordinate as densecrf does (float32)."""
    P, d = features.shape
    device = features.device
    scale = _scale_factors(d)
    cols = [features[:, i].contiguous() for i in range(d)]
    elev: list[torch.Tensor] = [None] * (d + 1)  # type: ignore[list-item]
    sm = torch.zeros(P, dtype=torch.float32, device=device)
    for j in range(d, 0, -1):
        cf = cols[j - 1] * _f32(scale[j - 1], device)
        elev[j] = sm - _f32(float(j), device) * cf
        sm = sm + cf
    elev[0] = sm
    return elev


def _enclosing_simplex(elev: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """(rank, rem0, q0) per coordinate: the rank of its remainder, the closest remainder-0 point and
    its quotient rem0 / (d+1) as integers, with densecrf's rounding and tie-breaking."""
    d1 = len(elev)
    device = elev[0].device
    inv_d1, d1_f = _f32(1.0 / d1, device), _f32(float(d1), device)
    # closest remainder-0 point by round-half-to-even, its coordinate sum
    v = [torch.round(e * inv_d1) for e in elev]
    rem0 = [x * d1_f for x in v]
    vsum = v[0].clone()
    for x in v[1:]:
        vsum += x
    vsum = vsum.to(torch.int64)
    del v

    # rank of each coordinate's remainder, with densecrf's pairwise tie-breaking
    diff = [e - r for e, r in zip(elev, rem0)]
    rank = [vsum.clone() for _ in range(d1)]  # includes "rank += sum"
    for i in range(d1 - 1):
        for j in range(i + 1, d1):
            c = diff[i] < diff[j]
            rank[i] += c
            rank[j] += ~c
    del diff

    # bring points that are off the plane back
    q0 = []
    for i in range(d1):
        lo = rank[i] < 0
        hi = rank[i] >= d1
        fix = lo.to(torch.int64) - hi.to(torch.int64)
        rank[i] += fix * d1
        rem0[i] = rem0[i] + fix.to(torch.float32) * d1_f
        q0.append(torch.round(rem0[i] / d1_f).to(torch.int64))
    return rank, rem0, q0


def _barycentric(elev: list[torch.Tensor], rem0: list[torch.Tensor], rank: list[torch.Tensor]) -> list[torch.Tensor]:
    """The d+1 barycentric weights of each point, with densecrf's float operations."""
    d1 = len(elev)
    d = d1 - 1
    P = elev[0].numel()
    inv_d1 = _f32(1.0 / d1, elev[0].device)
    vb = [(e - r) * inv_d1 for e, r in zip(elev, rem0)]
    # by_rank[k] = vb of the coordinate of rank k (rank is a permutation of 0..d per point)
    by_rank = torch.empty(d1, P, dtype=torch.float32, device=elev[0].device)
    by_rank.scatter_(0, torch.stack(rank, 0), torch.stack(vb, 0))
    del vb
    bary = [by_rank[d] + (1.0 - by_rank[0])]
    bary += [by_rank[d - p] - by_rank[d - p + 1] for p in range(1, d1)]
    return bary


@dataclass
class _CodeGrid:
    """Mixed-radix packing of vertex keys into int64 codes: per coordinate the quotient's offset
    ``qmin`` and ``stride``; then the remainder (``stride_r``) and the image (``stride_b``)."""

    d: int
    qmin: list[int]
    stride: list[int]
    stride_r: int
    stride_b: int
    pad: bool          # densecrf's zero-padding vertices are reproduced (see the module docstring)

    @classmethod
    def of(cls, q0: list[torch.Tensor], batch_size: int, pad: bool) -> _CodeGrid:
        d = len(q0) - 1
        d1 = d + 1
        qmin, qmax = [], []
        for i in range(d):
            lo, hi = int(q0[i].min()), int(q0[i].max())
            if pad:
                lo, hi = min(lo, 0), max(hi, 0)
            qmin.append(lo - 2)  # keys go one below q0, blur neighbours one further
            qmax.append(hi + 1)
        radix = [hi - lo + 1 for lo, hi in zip(qmin, qmax)]
        bits = math.log2(batch_size * d1) + sum(math.log2(r) for r in radix)
        if bits > _MAX_BITS:
            raise LatticeOverflowError(
                f"lattice vertex codes need {bits:.1f} bits (> {_MAX_BITS}): filter fewer images at "
                "once or use larger kernel widths"
            )
        stride = [1] * d
        for i in range(d - 2, -1, -1):
            stride[i] = stride[i + 1] * radix[i + 1]
        stride_r = stride[0] * radix[0]
        return cls(d, qmin, stride, stride_r, stride_r * d1, pad)

    def vertex_codes(self, q0: list[torch.Tensor], rank: list[torch.Tensor], batch_index: torch.Tensor,
                     batch_size: int) -> tuple[torch.Tensor, int]:
        """Codes of every point's d+1 vertices, remainder-major (entry e = r * P + p), then (when
        padding) the origin simplex of every image; and the number of point entries.

        Vertex r of a point has key[i] = rem0[i] + r - (d+1) [rank[i] > d - r], i.e. remainder r and
        quotient q0[i] - [rank[i] > d - r] in each of the first d coordinates."""
        d, d1, stride, stride_r = self.d, self.d + 1, self.stride, self.stride_r
        base = batch_index * self.stride_b
        for i in range(d):
            base += (q0[i] - self.qmin[i]) * stride[i]
        codes = []
        for r in range(d1):
            c = base + r * stride_r if r else base
            for i in range(d):
                if d - r < d1 - 1:  # rank[i] > d - r is possible
                    c = c - (rank[i] > d - r).to(torch.int64) * stride[i]
            codes.append(c)
        flat = torch.cat(codes)
        n_real = flat.numel()
        if self.pad:
            # the simplex at the origin: q0 = 0, rank[i] = i
            origin = [
                sum(-self.qmin[i] * stride[i] for i in range(d))
                + r * stride_r
                - sum(stride[i] for i in range(d) if i > d - r)
                for r in range(d1)
            ]
            extra = (
                torch.arange(batch_size, dtype=torch.int64)[:, None] * self.stride_b
                + torch.tensor(origin, dtype=torch.int64)[None, :]
            ).to(flat.device)
            flat = torch.cat([flat, extra.reshape(-1)])
        return flat, n_real


def _number_vertices(flat: torch.Tensor, n_real: int, P: int):
    """Distinct codes (sorted) and the vertex numbering: ``(uniq, perm, vid, counts, start, order,
    newid)``; ``perm`` sorts the point entries, ``vid`` is each sorted entry's distinct code,
    ``counts``/``start`` each code's segment, ``newid`` the vertex number of each distinct code."""
    # The sort groups equal codes; within a group entries keep their order e = r * P + p, i.e.
    # increasing point index (all entries of a vertex share r).
    sorted_codes, perm = torch.sort(flat, stable=True)
    uniq, vid, counts = torch.unique_consecutive(
        sorted_codes, return_inverse=True, return_counts=True
    )
    del sorted_codes
    M = uniq.numel()
    if n_real < flat.numel():  # drop the relay-only origin entries from the splat/slice data
        real = perm < n_real
        perm, vid = perm[real], vid[real]
        counts = torch.bincount(vid, minlength=M)
    start = torch.cumsum(counts, 0) - counts

    # Number vertices in order of their first point (as densecrf's hash table does): neighbouring
    # pixels then touch neighbouring vertices, which makes the sparse products cache friendly.
    first_e = perm.index_select(0, start.clamp(max=perm.numel() - 1))
    first = torch.where(counts > 0, torch.remainder(first_e, P), P)
    order = torch.argsort(first, stable=True)  # new vertex k is old vertex order[k]
    newid = torch.empty_like(order)
    newid[order] = torch.arange(M, device=flat.device)
    return uniq, perm, vid, counts, start, order, newid


def _splat_matrix(perm, counts, start, order, bary_t, P: int):
    """Splat (vertex-major CSR): the segments of the sorted entries, in the new vertex order."""
    M = order.numel()
    counts_new = counts.index_select(0, order)
    splat_crow = torch.zeros(M + 1, dtype=torch.int64, device=perm.device)
    torch.cumsum(counts_new, 0, out=splat_crow[1:])
    nnz = int(splat_crow[-1])
    src = torch.repeat_interleave(
        start.index_select(0, order) - splat_crow[:-1], counts_new, output_size=nnz
    )
    src += torch.arange(nnz, device=perm.device)
    splat_e = perm.index_select(0, src)
    splat_val = bary_t.reshape(-1).index_select(0, splat_e)
    splat_col = torch.remainder(splat_e, P)
    return splat_crow, splat_col, splat_val


def _slice_table(perm, vid, newid, bary_t, P: int, sort_columns: bool):
    """Slice (point-major): each point's d+1 vertices and weights (sorted by id for cuSPARSE only)."""
    d1 = bary_t.shape[0]
    inverse = torch.empty(d1 * P, dtype=torch.int64, device=perm.device)
    inverse.scatter_(0, perm, newid.index_select(0, vid))
    if sort_columns:
        offsets, o = torch.sort(inverse.view(d1, P).t(), dim=1)
        return offsets, torch.gather(bary_t.t(), 1, o)
    return inverse.view(d1, P).t().contiguous(), bary_t.t().contiguous()


def _blur_neighbors(uniq: torch.Tensor, newid: torch.Tensor, grid: _CodeGrid) -> torch.Tensor:
    """(d+1) x M x 2 new ids of each vertex's two blur neighbours per direction (-1: none).

    Along direction j, n1 = key - 1 except key[j] + d (all - 1 for j = d), n2 = key + 1 except
    key[j] - d. In code space n1 is a shift that depends only on whether r = 0 (uniq is sorted, so it
    is found by binary search); n2 is the inverse map of n1."""
    d, stride, stride_r = grid.d, grid.stride, grid.stride_r
    d1, M = d + 1, uniq.numel()
    at_zero = torch.remainder(torch.div(uniq, stride_r, rounding_mode="floor"), d1) == 0
    neighbors = torch.empty((d1, M, 2), dtype=torch.int64, device=uniq.device)
    n2_buf = torch.empty(M + 1, dtype=torch.int64, device=uniq.device)
    for j in range(d1):
        shift_pos = -stride_r + (stride[j] if j < d else 0)
        shift_zero = d * stride_r - sum(stride[i] for i in range(d) if i != j)
        n1_code = torch.where(at_zero, uniq + shift_zero, uniq + shift_pos)
        idx = torch.searchsorted(uniq, n1_code).clamp_(max=M - 1)
        found = uniq.index_select(0, idx) == n1_code
        dst = torch.where(found, newid.index_select(0, idx), -1)  # new id of n1, or -1
        # in new ids: n1[newid[v]] = dst[v]; n2[dst[v]] = newid[v] where found
        neighbors[j, :, 0].index_copy_(0, newid, dst)
        n2_buf.fill_(-1)
        n2_buf.scatter_(0, torch.where(found, dst, M), torch.where(found, newid, -1))
        neighbors[j, :, 1] = n2_buf[:M]
    return neighbors


def _blur_matrices(neighbors: torch.Tensor, sort_columns: bool) -> list[torch.Tensor]:
    """The blur as sparse CSR matrices, in densecrf's order (direction 0 first).

    Step j is ``new[i] = old[i] + 0.5 * (old[n1[i]] + old[n2[i]])``; missing neighbours (-1)
    contribute nothing (densecrf reads a zero row). Consecutive steps are multiplied pairwise into
    one matrix ``B_{j+1} B_j`` (at most 9 entries a row): half the passes over the vertex values for
    a few more multiply-adds, a net gain because the blur is memory-bound and the lattice sparse.
    The product is the same linear map; only float summation order changes. Two distinct
    directions never create duplicate entries (their lattice vectors are linearly independent
    when d >= 2).
    """
    d1, M, _ = neighbors.shape
    d = d1 - 1
    device = neighbors.device
    arange_m = torch.arange(M, device=device)
    pad = torch.full((1,), -1, dtype=torch.int64, device=device)
    mats = []
    j = 0
    while j < d1:
        n1, n2 = neighbors[j, :, 0], neighbors[j, :, 1]
        if d < 2 or j + 1 == d1:
            cols = torch.stack([n1, arange_m, n2], 1)
            w = torch.tensor([0.5, 1.0, 0.5], dtype=torch.float32, device=device)
            j += 1
        else:
            # row i of B_{j+1} B_j: for u in (m1[i], i, m2[i]) (direction j+1, weights 1/2, 1,
            # 1/2), the entries (n1[u], u, n2[u]) of B_j (weights 1/2, 1, 1/2)
            m1, m2 = neighbors[j + 1, :, 0], neighbors[j + 1, :, 1]
            n1p, n2p = torch.cat([n1, pad]), torch.cat([n2, pad])  # index M -> -1
            u1 = torch.where(m1 >= 0, m1, M)
            u2 = torch.where(m2 >= 0, m2, M)
            cols = torch.stack(
                [
                    n1p.index_select(0, u1), m1, n2p.index_select(0, u1),
                    n1, arange_m, n2,
                    n1p.index_select(0, u2), m2, n2p.index_select(0, u2),
                ],
                1,
            )  # fmt: skip
            w = torch.tensor(
                [0.25, 0.5, 0.25, 0.5, 1.0, 0.5, 0.25, 0.5, 0.25],
                dtype=torch.float32,
                device=device,
            )
            j += 2
        mats.append(_rows_to_csr(cols, w, M, sort_columns))
    return mats


def _rows_to_csr(
    cols: torch.Tensor, vals: torch.Tensor, ncols: int, sort_columns: bool
) -> torch.Tensor:
    """CSR from per-row column lists ``cols`` (n x k; entries < 0 are left out) and the value of
    each of the k positions ``vals`` (k,).

    MKL (CPU) accepts unsorted column indices within a row; for cuSPARSE the rows are sorted.
    """
    n, k = cols.shape
    if sort_columns:
        big = torch.iinfo(torch.int64).max
        cols, order = torch.sort(torch.where(cols >= 0, cols, big), dim=1)
        pos = order.reshape(-1)
        valid = cols != big
    else:
        pos = None
        valid = cols >= 0
    keep = valid.reshape(-1).nonzero().squeeze(1)
    crow = torch.zeros(n + 1, dtype=torch.int64, device=cols.device)
    torch.cumsum(valid.sum(1), 0, out=crow[1:])
    col = cols.reshape(-1).index_select(0, keep)
    slot = torch.remainder(keep, k) if pos is None else pos.index_select(0, keep)
    return csr(crow, col, vals.index_select(0, slot), (n, ncols))
