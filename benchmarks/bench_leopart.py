"""Leopart benchmarks: fine-tuning throughput of a ViT-S/16 and the fit time of the fully
unsupervised pipeline. Prints figures; asserts nothing.

    python benchmarks/bench_leopart.py                        # CPU (and CUDA when present), synthetic fit
    python benchmarks/bench_leopart.py --steps 5 --batch 8    # more steps / images per step
    python benchmarks/bench_leopart.py --camvid /path/camvid  # fit time of the camvid preset (cached features)

Fine-tuning uses random weights at the reference crop sizes (2 x 224 + 4 x 96, K = 300, queue 8192):
"data" is images/s of decoding + multi-crop augmentation in the loader threads, "step" images/s of
the training step alone (teacher, Sinkhorn, student forward/backward, AdamW, EMA) after one warm-up step.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from unsupseg.engine import Dist
from unsupseg.methods.leopart import finetune as lf
from unsupseg.methods.leopart import views as lv


def _photo(rng: np.random.Generator, height: int = 375, width: int = 500) -> Image.Image:
    img = rng.integers(0, 255, (height // 25, width // 25, 3), dtype=np.uint8)
    return Image.fromarray(img).resize((width, height), Image.Resampling.BICUBIC)


def bench_finetune(device: str, batch: int, steps: int, workers: int, amp: bool) -> None:
    params = lf.FinetuneParams(workers=workers, amp=amp)
    trainer = lf.Trainer("dino_vits16", "random", params, total_steps=1000, dist=Dist(device=torch.device(device)))
    rng = np.random.default_rng(0)
    photos = [_photo(rng) for _ in range(batch)]

    def load(seed: int):
        return lv.collate([lv.make_views(p, params, np.random.default_rng([seed, i])) for i, p in enumerate(photos)])

    with ThreadPoolExecutor(max_workers=workers) as pool:
        tic = time.perf_counter()
        batches = list(pool.map(load, range(steps + 1)))
        data_rate = batch * (steps + 1) / (time.perf_counter() - tic)
    trainer.step(0, batches[0])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    tic = time.perf_counter()
    for i in range(1, steps + 1):
        logs = trainer.step(i, batches[i])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    step_rate = batch * steps / (time.perf_counter() - tic)
    memory = (
        f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.startswith("cuda") else ""
    )
    print(f"finetune dino_vits16 on {device} (batch {batch}, {steps} steps, threads {torch.get_num_threads()}"
          f"{', bf16' if amp else ''}): step {step_rate:.2f} img/s, data {data_rate:.1f} img/s "
          f"({workers} loader threads){memory}, last loss {logs['loss']:.3f}")


def bench_fit(camvid: Path | None, images: int) -> None:
    import unsupseg

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if camvid is not None:
            kwargs = dict(dataset="camvid", root=camvid)
            what = "camvid preset (367 train images, cached features when UNSUPSEG_CACHE_DIR holds them)"
        else:
            folder = tmp / "images"
            folder.mkdir()
            rng = np.random.default_rng(1)
            for i in range(images):
                _photo(rng, 360, 480).save(folder / f"{i}.png")
            kwargs = dict(images=folder, backbone="efficientnet_lite0", backbone_weights="random",
                          overrides=[f"cache_dir={tmp / 'cache'}", "data.resolution=360"])
            what = f"{images} synthetic 480x360 images, random efficientnet_lite0 (features extracted first)"
        tic = time.perf_counter()
        unsupseg.fit("leopart", out=tmp / "run", log=lambda msg: None, **kwargs)
        total = time.perf_counter() - tic
        import json

        fit_seconds = json.loads((tmp / "run" / "meta.json").read_text())["fit_seconds"]
        print(f"leopart fit, {what}: method fit {fit_seconds:.1f} s, total with setup {total:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4, help="images per step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up)")
    parser.add_argument("--workers", type=int, default=4, help="loader threads")
    parser.add_argument("--gpu-batch", type=int, default=32, help="images per step on CUDA (Ref: 32 per GPU)")
    parser.add_argument("--camvid", type=Path, default=None, help="CamVid root: time the camvid preset's fit")
    parser.add_argument("--fit-images", type=int, default=40, help="synthetic images for the fit timing")
    parser.add_argument("--skip-fit", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    bench_finetune("cpu", args.batch, args.steps, args.workers, amp=False)
    if torch.cuda.is_available():
        bench_finetune("cuda", args.gpu_batch, max(args.steps, 10), args.workers, amp=False)
        bench_finetune("cuda", args.gpu_batch, max(args.steps, 10), args.workers, amp=True)
    if not args.skip_fit:
        bench_fit(args.camvid, args.fit_images)


if __name__ == "__main__":
    main()
