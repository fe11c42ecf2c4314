"""GPU check for a lent machine: the throughput figures of the paper-scale paths, in a few minutes.

Prints, on one device (CUDA when present):

  1. backbone only: images/s of the frozen backbone (cocostuff27 preset: dino_vitb8, 320x320),
     float32 and bf16 autocast;
  2. feature extraction: images/s of ``extract_features`` over a folder of synthetic JPEG photos
     (decode, resize, crop, backbone, cache write), with the input pipeline's workers where this
     build has them;
  3. ``segment``: images/s over the same folder (mask PNG + overlay JPEG per photo) with a k-means
     run on that backbone, batched (``--batch``) and one photo at a time;
  4. CAUSE-TR Step 2 (front door) at the cocostuff27 preset (K 2048, P 2048, 40x40 tokens, batch 16)
     with a full concept bank (K x 100 entries), bf16 and float32: images/s of training steps;
  5. dense CRF: images/s on the GPU (whole batch) and on the CPU (one image at a time);
  6. peak GPU memory per section and overall.

Weights are random and images synthetic (throughput does not depend on either); nothing is
downloaded. ``--quick`` shrinks every size so that the whole check runs on a CPU in a minute or two
(a smoke test of the script, not a measurement). ``benchmarks/gpu_check.sh`` sets up the
environment and calls this script.

    python benchmarks/gpu_check.py              # on a GPU: about 2-4 minutes
    python benchmarks/gpu_check.py --quick      # anywhere
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


@dataclass
class Sizes:
    backbone: str
    side: int            # square input side of the backbone and CAUSE measurements
    photo: tuple[int, int]  # (width, height) of the synthetic photos
    photos: int          # photos in the folder (extraction, segment)
    single: int          # photos segmented one at a time
    batch: int           # images per backbone forward
    backbone_batches: int
    cause_steps: int
    crf_side: tuple[int, int]   # (width, height) of the CRF images
    crf_gpu: int
    crf_cpu: int
    cause_overrides: dict


FULL = Sizes("dino_vitb8", 320, (640, 480), 512, 64, 32, 12, 10, (480, 320), 32, 2, {})
# the cocostuff27 preset's structure at toy sizes: every code path, none of the cost
QUICK = Sizes("dino_vits16", 64, (96, 72), 16, 4, 4, 2, 2, (64, 48), 2, 1,
              {"concepts": 64, "projection_dim": 64, "bank_size": 8, "tr_ffn_dim": 64})


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Memory:
    """Peak GPU memory of each section (CUDA's max_memory_allocated), and the highest of them."""

    def __init__(self, device: torch.device):
        self.device, self.peaks = device, {}

    def start(self) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def stop(self, name: str) -> str:
        if self.device.type != "cuda":
            return ""
        sync(self.device)
        self.peaks[name] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return f"  (GPU peak {self.peaks[name]:.2f} GiB)"


def timed(fn, device: torch.device) -> float:
    sync(device)
    tic = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - tic


def make_photos(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> None:
    """JPEG photos: a few flat rectangles over smooth noise (cheap to make, realistic to decode)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    for i in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (h // 32 + 2, w // 32 + 2, 3), dtype=np.uint8))
        img = np.array(coarse.resize((w, h), Image.BILINEAR))
        for _ in range(3):
            y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
            img[y0 : y0 + h // 3, x0 : x0 + w // 3] = rng.integers(0, 256, 3)
        Image.fromarray(img).save(folder / f"photo_{i:05d}.jpg", quality=90)


def check_backbone(s: Sizes, device, memory, report) -> None:
    from unsupseg.backbones import build_backbone
    from unsupseg.engine import autocast

    net = build_backbone(s.backbone, "random", device=device)
    images = torch.rand(s.batch, 3, s.side, s.side, device=device)
    for precision in ("fp32", "bf16"):
        with torch.no_grad(), autocast(device, precision):
            net(images)   # warm-up: kernels, allocator
            memory.start()
            seconds = timed(lambda: [net(images) for _ in range(s.backbone_batches)], device)
        rate = s.batch * s.backbone_batches / seconds
        note = memory.stop(f"backbone {precision}")
        report(
            f"backbone_{precision}",
            rate,
            f"1. backbone only, {s.backbone} {s.side}x{s.side}, batch {s.batch}, {precision}: {rate:9.1f} "
            f"images/s{note}",
        )


def check_extraction(s: Sizes, device, memory, report, photos: Path, work: Path) -> None:
    from unsupseg.backbones import build_backbone
    from unsupseg.data import ImageFolder, Preprocess
    from unsupseg.features.extract import extract_features

    net = build_backbone(s.backbone, "random", device=device)
    data = ImageFolder(photos)
    prep = Preprocess(s.side, mode="short_crop", interpolation="bilinear", multiple=net.stride)
    options, pipeline = {}, "decoded in the main process (this build has no input-pipeline workers)"
    if "workers" in inspect.signature(extract_features).parameters:
        options["workers"] = min(8, os.cpu_count() or 1)
        pipeline = f"{options['workers']} decode workers"
    memory.start()
    seconds = timed(lambda: extract_features(net, data, prep, cache_dir=work / "cache", batch_size=s.batch,
                                             description="gpu check: extraction", **options), device)
    rate = len(data) / seconds
    note = memory.stop("extraction")
    report(
        "extraction",
        rate,
        f"2. feature extraction, {len(data)} JPEG {s.photo[0]}x{s.photo[1]} -> {s.side} px crops, "
        f"{pipeline}, cache written: {rate:9.1f} images/s{note}",
    )


def check_segment(s: Sizes, device, memory, report, photos: Path, work: Path) -> None:
    import unsupseg

    fit_photos = work / "fit-photos"
    fit_photos.mkdir()
    for p in sorted(photos.iterdir())[:8]:
        shutil.copy(p, fit_photos / p.name)
    unsupseg.fit("kmeans", images=fit_photos, out=work / "run", clusters=27, backbone=s.backbone,
                 backbone_weights="random", overrides=["params.restarts=1", f"data.resolution={s.side}",
                                                       f"cache_dir={work / 'cache'}", f"device={device}"],
                 log=lambda m: None)
    seg = unsupseg.load(work / "run", device=str(device))
    subset = work / "subset"
    subset.mkdir()
    for p in sorted(photos.iterdir())[: s.single]:
        shutil.copy(p, subset / p.name)
    unsupseg.segment(seg, [subset], work / "warm-up", batch_size=s.batch)
    memory.start()
    seconds = timed(lambda: unsupseg.segment(seg, [photos], work / "masks", batch_size=s.batch), device)
    rate = s.photos / seconds
    note = memory.stop("segment")
    single = s.single / timed(lambda: unsupseg.segment(seg, [subset], work / "masks-1", batch_size=1), device)
    report(
        "segment",
        rate,
        f"3. segment (k-means K=27, {s.backbone}, {seg.resolution} px, flip {'on' if seg.config.test.flip else 'off'}, "
        f"{seg.precision}), {s.photos} photos {s.photo[0]}x{s.photo[1]}, mask + overlay written: "
        f"{rate:9.1f} images/s with batch {s.batch}{note}; {single:.1f} images/s one at a time",
    )
    report("segment_single", single, None)


class TensorSource:
    """CAUSE training batches from a tensor of features already on the device (no I/O measured)."""

    def __init__(self, features: torch.Tensor):
        self.features, self.labelled = features, False
        self.dim, self.grid = features.shape[1], tuple(features.shape[-2:])

    def __len__(self) -> int:
        return len(self.features)

    def load(self, batch, shard):
        return self.features[batch[shard].to(self.features.device)], None


def check_cause(s: Sizes, device, memory, report) -> None:
    from unsupseg.api import resolve_config
    from unsupseg.engine import Dist
    from unsupseg.methods.cause.params import Params
    from unsupseg.methods.cause.trainer import front_door_stage

    config = resolve_config("cause-tr", preset="cocostuff27")
    params = Params(**{**config.params, **s.cause_overrides, "ref_world_size": 1})
    stride = 8 if s.backbone.endswith("8") else 16
    dim = 768 if "vitb" in s.backbone else 384
    grid = s.side // stride
    gen = torch.Generator(device=device).manual_seed(0)
    n = 2 * params.batch_size
    source = TensorSource(torch.randn(n, dim, grid, grid, generator=gen, device=device))
    codebook = torch.randn(params.concepts, dim, generator=gen, device=device)
    for precision in ("bf16", "fp32"):
        torch.manual_seed(0)
        dist = Dist(device=device, precision=precision)
        stage, front = front_door_stage(source, codebook, "tr", None, params, dist, 0, device)
        # a full bank from the first step: K x capacity normalised entries
        bank = front.bank
        bank.values = F.normalize(torch.randn(bank.values.shape, generator=gen, device=device), dim=-1)
        bank.length.fill_(params.bank_size)
        batches = stage.batches(0)

        def steps(count, first=0, stage=stage, batches=batches, dist=dist):
            for i in range(first, first + count):
                with dist.autocast():   # as run_stage runs each step
                    stage.step(i, batches[i % len(batches)])

        steps(2)
        memory.start()
        seconds = timed(lambda: steps(s.cause_steps, 2), device)
        rate = s.cause_steps * params.batch_size / seconds
        note = memory.stop(f"cause {precision}")
        bank_gb = bank.values.numel() * bank.values.element_size() / 2**30
        report(
            f"cause_step2_{precision}",
            rate,
            f"4. CAUSE-TR step 2, cocostuff27 preset{' (quick: reduced K, P, bank)' if s.cause_overrides else ''}: "
            f"{grid}x{grid} tokens x {dim}, batch {params.batch_size}, K {params.concepts}, P {params.projection_dim}, "
            f"full bank {params.concepts} x {params.bank_size} ({bank_gb:.2f} GiB), {precision}: {rate:9.1f} "
            f"images/s{note}",
        )
        del stage, front, bank
        if device.type == "cuda":
            torch.cuda.empty_cache()


def check_crf(s: Sizes, device, memory, report) -> None:
    from unsupseg.postprocess.crf import refine_batch

    w, h = s.crf_side
    gen = torch.Generator().manual_seed(0)
    count = max(s.crf_gpu, s.crf_cpu)
    images = (torch.rand(count, h // 8, w // 8, 3, generator=gen) * 255).to(torch.uint8)
    images = images.repeat_interleave(8, 1).repeat_interleave(8, 2)   # blocky photos: real edges
    logp = torch.log_softmax(3 * torch.randn(count, 27, h, w, generator=gen), dim=1)
    if device.type == "cuda":
        refine_batch(images[:2].to(device), logp[:2].to(device))   # warm-up
        memory.start()
        seconds = timed(lambda: refine_batch(images[: s.crf_gpu].to(device), logp[: s.crf_gpu].to(device)), device)
        gpu = s.crf_gpu / seconds
        note = memory.stop("crf")
        report(
            "crf_gpu",
            gpu,
            f"5. dense CRF, {w}x{h}, 27 classes, 10 iterations, GPU (batch {s.crf_gpu}): {gpu:9.1f} images/s{note}",
        )
    else:
        report("crf_gpu", None, "5. dense CRF on the GPU: no GPU here")
    cpu_dev = torch.device("cpu")
    cpu = s.crf_cpu / timed(lambda: refine_batch(images[: s.crf_cpu], logp[: s.crf_cpu]), cpu_dev)
    report("crf_cpu", cpu, f"   dense CRF, same images, CPU ({torch.get_num_threads()} threads, one image at a time): "
                           f"{cpu:9.2f} images/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes: checks the script end to end on any device")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--only", nargs="*", default=None,
                        choices=["backbone", "extraction", "segment", "cause", "crf"], help="run only these sections")
    args = parser.parse_args()
    os.environ.setdefault("UNSUPSEG_PROGRESS", "0")
    warnings.filterwarnings("ignore", message=".*backbone weights differ.*")
    s = QUICK if args.quick else FULL
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    print(f"unsupseg GPU check{' (--quick: toy sizes, not a measurement)' if args.quick else ''}: device {device} "
          f"({name}), torch {torch.__version__}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads")
    if device.type != "cuda" and not args.quick:
        print("no CUDA device: the figures below are CPU figures (use --quick for a smoke test)")
    figures: dict[str, float | None] = {}

    def report(key, value, line):
        figures[key] = None if value is None else round(float(value), 2)
        if line:
            print(line, flush=True)

    memory = Memory(device)
    wanted = set(args.only or ["backbone", "extraction", "segment", "cause", "crf"])
    tic = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="unsupseg-gpu-check-") as tmp:
        work = Path(tmp)
        os.environ["UNSUPSEG_CACHE_DIR"] = str(work / "cache")   # never touch the user's feature cache
        photos = work / "photos"
        if wanted & {"extraction", "segment"}:
            make_photos(photos, s.photos, s.photo)
        if "backbone" in wanted:
            check_backbone(s, device, memory, report)
        if "extraction" in wanted:
            check_extraction(s, device, memory, report, photos, work)
        if "segment" in wanted:
            check_segment(s, device, memory, report, photos, work)
        if "cause" in wanted:
            check_cause(s, device, memory, report)
        if "crf" in wanted:
            check_crf(s, device, memory, report)
    if memory.peaks:
        worst = max(memory.peaks, key=memory.peaks.get)
        figures["peak_gpu_gib"] = round(memory.peaks[worst], 2)
        print(f"6. peak GPU memory: {memory.peaks[worst]:.2f} GiB (in {worst}); total on the device "
              f"{torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB")
    else:
        print("6. peak GPU memory: no GPU here")
    print(f"GPU check done in {time.perf_counter() - tic:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "quick": args.quick, "figures": figures}, indent=2))


if __name__ == "__main__":
    main()
