"""Fully connected CRF refinement (Krähenbühl & Koltun 2011), as used by STEGO and CAUSE.

Every published score of unsupervised semantic segmentation (STEGO, CAUSE) refines its predictions
with ``pydensecrf`` and these settings, which are this module's defaults::

    d = dcrf.DenseCRF2D(W, H, C)
    d.setUnaryEnergy(unary_from_softmax(softmax(logits)))      # -log(clip(p, 1e-5, 1))
    d.addPairwiseGaussian(sxy=1, compat=3)
    d.addPairwiseBilateral(sxy=67, srgb=3, rgbim=image, compat=4)
    Q = d.inference(10)                                         # C x H x W marginals

Two backends compute it:

``backend="torch"`` (default)
    A re-implementation of densecrf's mean-field inference in PyTorch (CPU and CUDA, no compiler).
    What is *the same* as densecrf:

    * the model: unary ``-log(clip(softmax(log_probs), unary_clip, 1))`` (``unary_from_softmax``'s
      default clip 1e-5), ``Q0 = softmax(-unary)``, then ``iterations`` updates
      ``Q = softmax(-unary + sum_k compat_k * n_k * K_k(n_k * Q))`` -- densecrf's
      ``PottsCompatibility`` multiplies the filtered message by ``-compat`` and ``inference``
      subtracts it, so labels present nearby are *rewarded*. The self-contribution of each pixel
      stays in the message, exactly as in densecrf (which never removes it);
    * the kernel normalisation: ``NORMALIZE_SYMMETRIC`` (DenseCRF2D's default),
      ``n_k = 1 / sqrt(K_k(1) + 1e-20)``;
    * the features: Gaussian ``(x / sxy, y / sxy)``, bilateral ``(x / sxy, y / sxy, c0 / srgb,
      c1 / srgb, c2 / srgb)`` with x the column and y the row, as in ``DenseCRF2D``;
    * **both** kernels are filtered with the permutohedral lattice, as in densecrf (the Gaussian
      kernel included: at ``sxy = 1`` the lattice is far from an exact Gaussian, and an exact
      Gaussian would change the results), with the same lattice vertices, barycentric weights,
      blur order and scaling constant (see :mod:`unsupseg.postprocess.permutohedral`).

    What is *approximate*: only floating-point summation order (splat, blur and slice are sparse
    matrix products here, loops there; consecutive blur directions are pre-multiplied pairwise).
    Measured against pydensecrf2 on the 101 CamVid val images (``benchmarks/bench_crf.py``): the
    same argmax label at every pixel, marginals within 1.2e-4 (max abs; typically 1e-5); on
    arbitrary 1- to 5-D features within 2e-5 (tests). On CUDA float rounding can differ in the
    last bit as well (not measured here).

    Speed notes (CPU): the per-image lattice construction plus 10 iterations cost about the same
    CPU time as pydensecrf's single-threaded C++ (0.8-1.05x of it on a 2-core machine, 320x320 and
    480x360, 11 and 27 classes); torch's intra-op threads then make it faster in wall-clock time.
    On an oversubscribed machine OpenMP's spin-waiting makes 2 threads many times *slower*: export
    ``OMP_WAIT_POLICY=PASSIVE`` or call ``torch.set_num_threads(1)`` (e.g. in data-loader workers).
    The Gaussian lattice depends only on the image size and is cached (8 sizes, per device).

``backend="pydensecrf"``
    Calls ``pydensecrf2`` (install with ``pip install pydensecrf2`` or ``pip install
    unsupseg[crf-reference]``), one image at a time, with the code above. It is the reference.

Colour order: the published code reverses the image to BGR before ``addPairwiseBilateral``. The
ideal bilateral kernel is symmetric in the colour channels, so that is harmless in theory; the
permutohedral *approximation* is not exactly symmetric in its coordinates (feeding RGB instead
changes the argmax of about 0.17% of the pixels of CamVid images, with marginals moving by up to
0.97), so both backends feed the colour channels in the published BGR order to reproduce the
published numbers exactly (pass ``image`` as RGB; the reversal is internal).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from unsupseg.errors import ConfigError
from unsupseg.postprocess.permutohedral import (
    LatticeOverflowError,
    PermutohedralLattice,
    build_lattice,
)

__all__ = ["refine", "refine_batch", "BACKENDS", "DEFAULT_PARAMS"]

BACKENDS = ("torch", "pydensecrf")

#: The settings of STEGO and CAUSE (and of this module's defaults).
DEFAULT_PARAMS: dict[str, float] = {
    "iterations": 10,
    "gaussian_sxy": 1.0,
    "gaussian_compat": 3.0,
    "bilateral_sxy": 67.0,
    "bilateral_srgb": 3.0,
    "bilateral_compat": 4.0,
    "unary_clip": 1e-5,
}

_PIP_HINT = "pip install pydensecrf2  (or: pip install 'unsupseg[crf-reference]')"


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def refine(
    image: np.ndarray | torch.Tensor,
    log_probs: np.ndarray | torch.Tensor,
    backend: str = "torch",
    *,
    iterations: int = 10,
    gaussian_sxy: float = 1.0,
    gaussian_compat: float = 3.0,
    bilateral_sxy: float = 67.0,
    bilateral_srgb: float = 3.0,
    bilateral_compat: float = 4.0,
    unary_clip: float | None = 1e-5,
) -> np.ndarray | torch.Tensor:
    """Refine one prediction with the dense CRF; returns C x H x W marginals (sum 1 per pixel).

    Args:
        image: H x W x 3 uint8 RGB image (numpy array or tensor) the prediction belongs to.
        log_probs: C x H x W float log-probabilities *or* logits (a log-softmax over C is applied
            first, so both give the same result), at the image's resolution.
        backend: ``"torch"`` (default; CPU or the device of ``log_probs``) or ``"pydensecrf"``
            (the reference ``pydensecrf2`` package, CPU).
        iterations: mean-field iterations (>= 0; 0 returns the clipped softmax).
        gaussian_sxy, gaussian_compat: spatial (smoothness) kernel std in pixels and Potts weight.
        bilateral_sxy, bilateral_srgb, bilateral_compat: appearance kernel stds in pixels and in
            colour levels (0..255), and its Potts weight.
        unary_clip: probabilities are clipped to ``[unary_clip, 1]`` before ``-log``, as
            ``pydensecrf.utils.unary_from_softmax`` does (default 1e-5); ``None`` disables it.

    Returns:
        float32 marginals, C x H x W: a numpy array if ``log_probs`` is one, else a tensor on the
        device of ``log_probs``.

    Raises:
        ConfigError: a bad shape, dtype, value or backend name (the message names the argument).
    """
    img = _as_image(image, "image", batched=False)
    lp = _as_log_probs(log_probs, "log_probs", batched=False)
    _check_match(img, lp, batched=False)
    out = refine_batch(
        img[None],
        lp[None],
        backend,
        iterations=iterations,
        gaussian_sxy=gaussian_sxy,
        gaussian_compat=gaussian_compat,
        bilateral_sxy=bilateral_sxy,
        bilateral_srgb=bilateral_srgb,
        bilateral_compat=bilateral_compat,
        unary_clip=unary_clip,
    )
    return out[0]


def refine_batch(
    images: np.ndarray | torch.Tensor,
    log_probs: np.ndarray | torch.Tensor,
    backend: str = "torch",
    *,
    iterations: int = 10,
    gaussian_sxy: float = 1.0,
    gaussian_compat: float = 3.0,
    bilateral_sxy: float = 67.0,
    bilateral_srgb: float = 3.0,
    bilateral_compat: float = 4.0,
    unary_clip: float | None = 1e-5,
    chunk_size: int | None = None,
) -> np.ndarray | torch.Tensor:
    """Batched :func:`refine`: images B x H x W x 3 uint8, log_probs B x C x H x W -> B x C x H x W.

    The torch backend refines ``chunk_size`` images together: one bilateral lattice over the chunk
    (image index packed into the vertex keys), one shared Gaussian lattice, and one set of sparse
    products per mean-field iteration for the whole chunk. The result equals refining each image
    alone (to float rounding). ``chunk_size=None`` (default) means the whole batch on CUDA and one
    image at a time on CPU, where batching was measured to be slower (2-core CPU, CamVid 480x360:
    1.2x the per-image CPU time at C=11 and 1.4-1.5x at C=27 for chunks of 2-4, from cache misses
    on the interleaved images); set it to bound GPU memory. The pydensecrf backend loops over the
    images.
    """
    imgs = _as_image(images, "images", batched=True)
    lp = _as_log_probs(log_probs, "log_probs", batched=True)
    _check_match(imgs, lp, batched=True)
    params = _check_params(
        backend=backend,
        iterations=iterations,
        gaussian_sxy=gaussian_sxy,
        gaussian_compat=gaussian_compat,
        bilateral_sxy=bilateral_sxy,
        bilateral_srgb=bilateral_srgb,
        bilateral_compat=bilateral_compat,
        unary_clip=unary_clip,
    )
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ConfigError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")

    as_numpy = isinstance(log_probs, np.ndarray)
    lp_t = _to_tensor(lp)
    img_t = _to_tensor(imgs)
    device = lp_t.device
    B = lp_t.shape[0]
    if B == 0:
        out = torch.zeros(lp_t.shape, dtype=torch.float32, device=device)
        return out.numpy() if as_numpy else out

    if backend == "pydensecrf":
        out = _refine_pydensecrf(img_t, lp_t, params)
        out = out.to(device)
    else:
        img_t = img_t.to(device)
        if chunk_size is None:
            step = B if device.type == "cuda" else 1
        else:
            step = chunk_size
        parts = [
            _refine_torch(img_t[i : i + step], lp_t[i : i + step], params)
            for i in range(0, B, step)
        ]
        out = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
    return out.cpu().numpy() if as_numpy else out


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def _to_tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    # np.require copies only arrays that are read-only or not C-contiguous (torch needs neither)
    return torch.from_numpy(np.require(x, requirements=["C", "W"]))


def _describe(x: Any) -> str:
    if isinstance(x, (np.ndarray, torch.Tensor)):
        kind = "numpy array" if isinstance(x, np.ndarray) else "tensor"
        return f"{kind} of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"{type(x).__name__} {x!r}"[:200]


def _as_image(x: Any, name: str, *, batched: bool) -> np.ndarray | torch.Tensor:
    want = "B x H x W x 3" if batched else "H x W x 3"
    if not isinstance(x, (np.ndarray, torch.Tensor)):
        raise ConfigError(
            f"{name} must be a {want} uint8 numpy array or tensor, got {_describe(x)}"
        )
    ndim = 4 if batched else 3
    if x.ndim != ndim or x.shape[-1] != 3:
        raise ConfigError(f"{name} must be {want} (RGB, channels last), got {_describe(x)}")
    if x.dtype not in (np.uint8, torch.uint8):
        raise ConfigError(
            f"{name} must have dtype uint8 (0..255 RGB, de-normalised), got {_describe(x)}"
        )
    if x.shape[-2] == 0 or x.shape[-3] == 0:
        raise ConfigError(f"{name} must not be empty, got {_describe(x)}")
    return x


def _as_log_probs(x: Any, name: str, *, batched: bool) -> np.ndarray | torch.Tensor:
    want = "B x C x H x W" if batched else "C x H x W"
    if not isinstance(x, (np.ndarray, torch.Tensor)):
        raise ConfigError(
            f"{name} must be a {want} float numpy array or tensor, got {_describe(x)}"
        )
    ndim = 4 if batched else 3
    if x.ndim != ndim:
        raise ConfigError(f"{name} must be {want}, got {_describe(x)}")
    if isinstance(x, torch.Tensor):
        is_float = x.is_floating_point()
    else:
        is_float = np.issubdtype(x.dtype, np.floating)
    if not is_float:
        raise ConfigError(
            f"{name} must be floating point (log-probabilities or logits), got {_describe(x)}"
        )
    if x.shape[-3] < 1:
        raise ConfigError(f"{name} must have at least one class channel, got {_describe(x)}")
    if isinstance(x, np.ndarray):
        x = np.ascontiguousarray(x, dtype=np.float32)
        finite = bool(np.isfinite(x).all()) if x.size else True
    else:
        x = x.detach().to(torch.float32)
        finite = bool(torch.isfinite(x).all()) if x.numel() else True
    if not finite:
        raise ConfigError(f"{name} contains NaN or infinite values ({_describe(x)})")
    return x


def _check_match(img: Any, lp: Any, *, batched: bool) -> None:
    if batched:
        ok = img.shape[0] == lp.shape[0] and tuple(img.shape[1:3]) == tuple(lp.shape[2:4])
        if not ok:
            raise ConfigError(
                f"images {tuple(img.shape)} and log_probs {tuple(lp.shape)} do not match: "
                "expected B x H x W x 3 and B x C x H x W with the same B, H, W"
            )
    elif tuple(img.shape[:2]) != tuple(lp.shape[1:3]):
        raise ConfigError(
            f"image {tuple(img.shape)} and log_probs {tuple(lp.shape)} do not match: expected "
            "H x W x 3 and C x H x W with the same H, W (upsample the prediction to the image "
            "first)"
        )


def _check_params(**p: Any) -> dict[str, Any]:
    if p["backend"] not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS}, got {p['backend']!r}")
    it = p["iterations"]
    if isinstance(it, bool) or not isinstance(it, (int, np.integer)) or it < 0:
        raise ConfigError(f"iterations must be a non-negative integer, got {it!r}")
    p["iterations"] = int(it)
    for name in ("gaussian_sxy", "bilateral_sxy", "bilateral_srgb"):
        v = p[name]
        if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not (
            np.isfinite(v) and v > 0
        ):
            raise ConfigError(f"{name} must be a positive number, got {v!r}")
        p[name] = float(v)
    for name in ("gaussian_compat", "bilateral_compat"):
        v = p[name]
        if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not np.isfinite(v):
            raise ConfigError(f"{name} must be a finite number, got {v!r}")
        p[name] = float(v)
    c = p["unary_clip"]
    if c is not None:
        if isinstance(c, bool) or not isinstance(c, (int, float, np.number)) or not (0 < c < 1):
            raise ConfigError(f"unary_clip must be a number in (0, 1) or None, got {c!r}")
        p["unary_clip"] = float(c)
    return p


# --------------------------------------------------------------------------------------------
# torch backend
# --------------------------------------------------------------------------------------------

_CACHE_LOCK = threading.Lock()
_GAUSS_CACHE: OrderedDict[tuple, tuple[PermutohedralLattice, torch.Tensor]] = OrderedDict()
_GAUSS_CACHE_SIZE = 8


def _unary(lp: torch.Tensor, clip: float | None) -> torch.Tensor:
    """``-log(clip(softmax(lp)))`` over dim 1, as ``unary_from_softmax(softmax(logits))``."""
    if clip is None:
        return -torch.log_softmax(lp, dim=1)
    return -torch.log(torch.softmax(lp, dim=1).clamp_(min=clip, max=1.0))


def _norm(lattice: PermutohedralLattice) -> torch.Tensor:
    """NORMALIZE_SYMMETRIC: 1 / sqrt(K(1) + 1e-20) per point."""
    ones = torch.ones(lattice.num_points, 1, dtype=torch.float32, device=lattice.device)
    k1 = lattice.compute(ones)[:, 0]
    return 1.0 / torch.sqrt(k1 + 1e-20)


def _gaussian_lattice(H: int, W: int, sxy: float, device: torch.device):
    key = (H, W, sxy, str(device))
    with _CACHE_LOCK:
        hit = _GAUSS_CACHE.get(key)
        if hit is not None:
            _GAUSS_CACHE.move_to_end(key)
            return hit
    ys, xs = torch.meshgrid(
        torch.arange(H, device=device), torch.arange(W, device=device), indexing="ij"
    )
    s = torch.tensor(sxy, dtype=torch.float32, device=device)
    feats = torch.stack([xs.reshape(-1).float() / s, ys.reshape(-1).float() / s], 1)
    lat = build_lattice(feats)
    entry = (lat, _norm(lat))
    with _CACHE_LOCK:
        _GAUSS_CACHE[key] = entry
        while len(_GAUSS_CACHE) > _GAUSS_CACHE_SIZE:
            _GAUSS_CACHE.popitem(last=False)
    return entry


def _bilateral_features(images: torch.Tensor, sxy: float, srgb: float) -> torch.Tensor:
    """(N*B) x 5 features in pixel-major, image-minor order: (x, y, b, g, r) scaled."""
    B, H, W, _ = images.shape
    device = images.device
    s = torch.tensor(sxy, dtype=torch.float32, device=device)
    c = torch.tensor(srgb, dtype=torch.float32, device=device)
    ys, xs = torch.meshgrid(
        torch.arange(H, device=device), torch.arange(W, device=device), indexing="ij"
    )
    pos = torch.stack([xs.reshape(-1).float() / s, ys.reshape(-1).float() / s], 1)  # N x 2
    # BGR, as the published code feeds pydensecrf (see module docstring).
    col = images.flip(-1).reshape(B, H * W, 3).permute(1, 0, 2).float() / c  # N x B x 3
    pos = pos[:, None, :].expand(H * W, B, 2)
    return torch.cat([pos, col], 2).reshape(H * W * B, 5)


def _softmax_rows_(x: torch.Tensor) -> torch.Tensor:
    """Row-wise softmax of a P x C matrix, max subtracted as in densecrf's ``expAndNormalize``;
    may overwrite ``x`` (and returns it) or return a new tensor.

    ATen's softmax over a short contiguous last dimension is slow on CPU (a scalar loop below the
    SIMD width: 4-6x slower at 11 classes), so below 16 classes it is composed in place from max,
    exp, sum and divide.
    """
    if x.device.type == "cpu" and x.shape[1] < 16:
        x.sub_(x.amax(dim=1, keepdim=True)).exp_()
        return x.div_(x.sum(dim=1, keepdim=True))
    return torch.softmax(x, dim=1)


@dataclass
class _Term:
    """One pairwise kernel ready for mean-field: ``compat * n * K(n * Q)`` as sparse products, with
    the normalisation ``n`` and the Potts weight folded into the splat and slice matrices.
    ``shape`` is the view of the P x C state the lattice filters (N x (B*C) for a lattice shared
    by the images of a batch)."""

    splat: torch.Tensor
    blur: list[torch.Tensor]
    slice: torch.Tensor
    shape: tuple[int, int]


def _term(lattice: PermutohedralLattice, norm: torch.Tensor, compat: float, shape) -> _Term:
    return _Term(
        lattice.splat_matrix(norm), lattice.blur, lattice.slice_matrix(norm * compat), tuple(shape)
    )


def _mean_field(neg_unary: torch.Tensor, terms: list[_Term], iterations: int) -> torch.Tensor:
    """densecrf's ``DenseCRF::inference`` on a P x C float32 ``-unary``; returns P x C marginals.

    ``Q = softmax(-unary)``; then ``iterations`` times
    ``Q = softmax(-unary - sum_k Potts_k(K_k Q))`` with ``Potts_k(x) = -compat_k * x``.
    """
    device = neg_unary.device
    q = _softmax_rows_(neg_unary.clone())
    if iterations == 0 or not terms:
        return q
    # Preallocated buffers: in-place ``addmm_`` (beta 0 to overwrite) avoids the zero fill and the
    # copy that ``sparse @ dense`` makes on every call.
    bufs = [
        (
            torch.zeros(t.splat.shape[0], t.shape[1], dtype=torch.float32, device=device),
            torch.zeros(t.splat.shape[0], t.shape[1], dtype=torch.float32, device=device),
        )
        for t in terms
    ]
    spare = torch.empty_like(neg_unary)
    for _ in range(iterations):
        logits = spare
        logits.copy_(neg_unary)
        for t, (va, vb) in zip(terms, bufs):
            va.addmm_(t.splat, q.view(t.shape), beta=0.0)
            for step in t.blur:
                vb.addmm_(step, va, beta=0.0)
                va, vb = vb, va
            logits.view(t.shape).addmm_(t.slice, va)
        new_q = _softmax_rows_(logits)
        spare = q if new_q is logits else logits
        q = new_q
    return q


def _refine_features(
    unary: torch.Tensor, kernels: list[tuple[torch.Tensor, float]], iterations: int
) -> torch.Tensor:
    """Mean-field with arbitrary features, like pydensecrf's ``DenseCRF.addPairwiseEnergy``
    (Potts, DIAG_KERNEL, NORMALIZE_SYMMETRIC): ``unary`` P x C energies, ``kernels`` a list of
    (P x d float32 features, compat). Returns P x C marginals. Used to test the lattice."""
    terms = []
    for feats, compat in kernels:
        lat = build_lattice(feats.to(torch.float32))
        terms.append(_term(lat, _norm(lat), float(compat), unary.shape))
    return _mean_field((-unary).to(torch.float32).contiguous(), terms, iterations)


def _refine_torch(images: torch.Tensor, lp: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
    try:
        return _refine_torch_batch(images, lp, p)
    except LatticeOverflowError as exc:
        B = lp.shape[0]
        if B == 1:
            raise ConfigError(
                f"the bilateral kernel (bilateral_sxy={p['bilateral_sxy']}, "
                f"bilateral_srgb={p['bilateral_srgb']}) or the Gaussian kernel (gaussian_sxy="
                f"{p['gaussian_sxy']}) is too narrow for a {lp.shape[2]}x{lp.shape[3]} image: {exc}"
            ) from exc
        h = B // 2
        return torch.cat(
            [_refine_torch(images[:h], lp[:h], p), _refine_torch(images[h:], lp[h:], p)], 0
        )


def _refine_torch_batch(images: torch.Tensor, lp: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
    B, C, H, W = lp.shape
    N = H * W
    device = lp.device
    # State layout: (N, B, C) flattened to (N*B) x C -- pixel-major, so that the Gaussian lattice,
    # identical for every image, filters an N x (B*C) view of the same memory.
    neg_unary = -_unary(lp, p["unary_clip"]).permute(2, 3, 0, 1).reshape(N * B, C)
    neg_unary = neg_unary.contiguous()
    terms: list[_Term] = []
    if p["iterations"] > 0 and p["bilateral_compat"] != 0.0:
        feats = _bilateral_features(images, p["bilateral_sxy"], p["bilateral_srgb"])
        batch_index = torch.arange(B, device=device).repeat(N)
        blat = build_lattice(feats, batch_index=batch_index, batch_size=B, points_per_image=N)
        del feats, batch_index
        terms.append(_term(blat, _norm(blat), p["bilateral_compat"], (N * B, C)))
        del blat
    if p["iterations"] > 0 and p["gaussian_compat"] != 0.0:
        glat, gnorm = _gaussian_lattice(H, W, p["gaussian_sxy"], device)
        terms.append(_term(glat, gnorm, p["gaussian_compat"], (N, B * C)))
    q = _mean_field(neg_unary, terms, p["iterations"])
    return q.view(H, W, B, C).permute(2, 3, 0, 1).contiguous()


# --------------------------------------------------------------------------------------------
# pydensecrf backend
# --------------------------------------------------------------------------------------------


def _import_pydensecrf():
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError as exc:
        raise ConfigError(
            f"backend 'pydensecrf' needs the pydensecrf2 package, which is not installed ({exc}); "
            f"install it with: {_PIP_HINT}"
        ) from exc
    return dcrf, unary_from_softmax


def _refine_pydensecrf(images: torch.Tensor, lp: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
    dcrf, unary_from_softmax = _import_pydensecrf()
    B, C, H, W = lp.shape
    lp = lp.detach().float().cpu()
    probs = torch.softmax(lp, dim=1).numpy()
    neg_log = -torch.log_softmax(lp, dim=1).numpy()  # for unary_clip=None (no log(0))
    imgs = images.detach().cpu().numpy()
    out = np.empty((B, C, H, W), dtype=np.float32)
    for b in range(B):
        # The published code passes the image reversed to BGR; the ideal bilateral kernel is
        # symmetric in the colour channels, but the permutohedral approximation is not exactly,
        # so we keep the published order (and the torch backend does the same).
        bgr = np.ascontiguousarray(imgs[b, :, :, ::-1])
        if p["unary_clip"] is None:
            u = neg_log[b].reshape(C, -1)
        else:
            u = unary_from_softmax(probs[b], clip=p["unary_clip"])
        d = dcrf.DenseCRF2D(W, H, C)
        d.setUnaryEnergy(np.ascontiguousarray(u, dtype=np.float32))
        d.addPairwiseGaussian(sxy=p["gaussian_sxy"], compat=p["gaussian_compat"])
        d.addPairwiseBilateral(
            sxy=p["bilateral_sxy"],
            srgb=p["bilateral_srgb"],
            rgbim=bgr,
            compat=p["bilateral_compat"],
        )
        q = d.inference(p["iterations"])
        out[b] = np.asarray(q, dtype=np.float32).reshape(C, H, W)
    return torch.from_numpy(out)
