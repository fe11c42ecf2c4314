"""Benchmark of the dense CRF backends: speed, and label agreement on CamVid.

Speed: images per second of ``unsupseg.postprocess.crf.refine`` for the ``torch`` backend (CPU, and
CUDA when available) and the ``pydensecrf`` reference, at 320x320 and 480x360 with 11 and 27
classes, with the STEGO/CAUSE settings (10 iterations, Gaussian sxy=1 compat=3, bilateral sxy=67
srgb=3 compat=4). The images are CamVid photos resized to each size (the lattice size, hence the
cost, depends on image content: random-noise images are much slower for both backends); each
timing includes the per-image lattice construction, after one warm-up call (which also builds the
cached Gaussian lattice of the size). ``--batch B`` adds the throughput of the torch backend
refining B images jointly (one lattice, one set of products; ``refine_batch(chunk_size=B)``),
which is what CUDA uses by default; on CPU ``refine_batch`` goes one image at a time by default.
The torch CPU figures use torch's intra-op threads (``--threads``); on a shared machine export
``OMP_WAIT_POLICY=PASSIVE`` (or use one thread), or OpenMP threads spin while waiting for a
descheduled peer and the timings become meaningless.

Agreement: over the CamVid val split (or ``--limit N`` images), the fraction of pixels whose argmax
label is the same for both backends, and the accuracy against the ground truth (void ignored) of
the unaries and of each backend. Unaries: ``unsupseg.postprocess._synthetic.noisy_label_log_probs``
(ground-truth one-hot at 1/8 resolution, Gaussian noise std 0.5 seeded by image index, times 3,
bilinear upsampling, log-softmax).

    python benchmarks/bench_crf.py                       # everything
    python benchmarks/bench_crf.py --limit 10 --repeats 2
    python benchmarks/bench_crf.py --threads 1 --no-agreement
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from unsupseg.postprocess._synthetic import noisy_label_log_probs
from unsupseg.postprocess.crf import refine, refine_batch

DEFAULT_CAMVID = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "camvid"


def _have_reference() -> bool:
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def _parse_size(text: str) -> tuple[int, int]:
    w, h = text.lower().split("x")
    return int(w), int(h)


def _load(root: Path | None, index: int, size: tuple[int, int] | None):
    """(image uint8 H x W x 3, label int64 H x W) from CamVid val, or synthetic without CamVid."""
    if root is not None:
        names = sorted(p.name for p in (root / "val").iterdir() if p.suffix == ".png")
        name = names[index % len(names)]
        img = Image.open(root / "val" / name).convert("RGB")
        lbl = Image.open(root / "valannot" / name)
        if size is not None and img.size != size:
            img = img.resize(size, Image.BILINEAR)
            lbl = lbl.resize(size, Image.NEAREST)
        return np.asarray(img), np.asarray(lbl).astype(np.int64)
    w, h = size or (480, 360)
    rng = np.random.default_rng(index)
    yy, xx = np.mgrid[0:h, 0:w]
    lbl = ((xx // (w // 4)) + 4 * (yy // (h // 3))).astype(np.int64) % 11
    palette = rng.integers(0, 256, (11, 3))
    img = np.clip(palette[lbl] + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)
    return img, lbl


def _time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_speed(args, root: Path | None) -> None:
    have_ref = _have_reference() and "pydensecrf" in args.backends
    cuda = torch.cuda.is_available() and not args.no_cuda
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"\n## Speed (images/s; best of {args.repeats}; torch threads = {torch.get_num_threads()}; "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; load average {load:.1f})"
    )
    cols = ["size", "C", "torch cpu"]
    if args.batch > 1:
        cols.append(f"torch cpu joint b{args.batch}")
    if have_ref:
        cols.append("pydensecrf")
    if cuda:
        cols += ["torch cuda", f"torch cuda b{args.cuda_batch}"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for size in args.sizes:
        imgs, lbls = zip(*[_load(root, i, size) for i in range(max(args.batch, args.cuda_batch, 1))])
        for C in args.classes:
            lps = [noisy_label_log_probs(lbl, C, noise=0.5, seed=i) for i, lbl in enumerate(lbls)]
            row = [f"{size[0]}x{size[1]}", str(C)]
            refine(imgs[0], lps[0])  # warm-up: MKL init, cached Gaussian lattice of this size
            t = _time(lambda: refine(imgs[0], lps[0]), args.repeats)
            row.append(f"{1 / t:.2f}")
            if args.batch > 1:
                bi, bl = np.stack(imgs[: args.batch]), np.stack(lps[: args.batch])
                t = _time(lambda: refine_batch(bi, bl, chunk_size=args.batch), args.repeats)
                row.append(f"{args.batch / t:.2f}")
            if have_ref:
                t = _time(lambda: refine(imgs[0], lps[0], backend="pydensecrf"), args.repeats)
                row.append(f"{1 / t:.2f}")
            if cuda:
                gi = torch.from_numpy(np.stack(imgs)).cuda()
                gl = torch.from_numpy(np.stack(lps)).cuda()

                def one():
                    refine(gi[0], gl[0])
                    torch.cuda.synchronize()

                def many():
                    refine_batch(gi[: args.cuda_batch], gl[: args.cuda_batch])
                    torch.cuda.synchronize()

                one()
                many()
                row.append(f"{1 / _time(one, args.repeats):.1f}")
                row.append(f"{args.cuda_batch / _time(many, args.repeats):.1f}")
            print("| " + " | ".join(row) + " |", flush=True)


def bench_agreement(args, root: Path) -> None:
    names = sorted(p.name for p in (root / "val").iterdir() if p.suffix == ".png")
    n = len(names) if args.limit is None else min(args.limit, len(names))
    have_ref = _have_reference()
    agree = total = 0
    acc = {"unary": [0, 0], "torch": [0, 0], "pydensecrf": [0, 0]}
    worst = 1.0
    max_diff = 0.0
    for i in range(n):
        img, lbl = _load(root, i, None)
        lp = noisy_label_log_probs(lbl, 11, noise=0.5, seed=i)
        ours = refine(img, lp)
        valid = lbl < 11
        preds = {"unary": lp.argmax(0), "torch": ours.argmax(0)}
        if have_ref:
            ref = refine(img, lp, backend="pydensecrf")
            preds["pydensecrf"] = ref.argmax(0)
            same = int((preds["torch"] == preds["pydensecrf"]).sum())
            agree += same
            total += lbl.size
            worst = min(worst, same / lbl.size)
            max_diff = max(max_diff, float(np.abs(ours - ref).max()))
        for k, pred in preds.items():
            acc[k][0] += int((pred == lbl)[valid].sum())
            acc[k][1] += int(valid.sum())
    print(f"\n## CamVid val, {n} images (unaries: noisy 1/8-resolution ground truth, noise 0.5)")
    print("| quantity | value |")
    print("|---|---|")
    if have_ref:
        print(f"| argmax agreement torch vs pydensecrf (all pixels) | {agree / total:.6f} |")
        print(f"| pixels with a different argmax | {total - agree} of {total} |")
        print(f"| worst image agreement | {worst:.6f} |")
        print(f"| max abs marginal difference | {max_diff:.2e} |")
    for k, (hit, cnt) in acc.items():
        if cnt:
            print(f"| pixel accuracy vs ground truth: {k} | {hit / cnt:.4f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--camvid", type=Path, default=Path(os.environ.get("UNSUPSEG_CAMVID", DEFAULT_CAMVID))
    )
    parser.add_argument(
        "--sizes",
        type=lambda s: [_parse_size(x) for x in s.split(",")],
        default=[(320, 320), (480, 360)],
        help="WxH list, e.g. 320x320,480x360",
    )
    parser.add_argument(
        "--classes", type=lambda s: [int(x) for x in s.split(",")], default=[11, 27]
    )
    parser.add_argument("--backends", type=lambda s: s.split(","), default=["torch", "pydensecrf"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4, help="joint CPU batch to time (1: skip)")
    parser.add_argument("--cuda-batch", type=int, default=8)
    parser.add_argument("--no-cuda", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--limit", type=int, default=None, help="CamVid val images for agreement")
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--no-agreement", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    root = args.camvid if (args.camvid / "val").is_dir() else None
    if root is None:
        print(f"CamVid not found at {args.camvid}: speed on synthetic images, no agreement")
    if not _have_reference():
        print("pydensecrf2 not installed (pip install pydensecrf2): torch backend only")
    if not args.no_speed:
        bench_speed(args, root)
    if not args.no_agreement and root is not None:
        bench_agreement(args, root)


if __name__ == "__main__":
    main()
