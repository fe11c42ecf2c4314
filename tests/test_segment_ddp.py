"""``segment`` under torchrun: two CPU processes on gloo split the photos, each file is written by
exactly one of them, and together they write what a single process writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp
from PIL import Image

import unsupseg
from tests.conftest import write_images
from unsupseg.engine import process_group


def worker(rank: int, world: int, folder: str) -> None:
    os.environ.update(UNSUPSEG_PROGRESS="0", RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    with process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world):
        import unsupseg.api as api
        import unsupseg.api.outputs as outputs

        opened = []
        real = outputs.atomic_write_image

        def spy(path, image, **save_args):   # every mask, overlay and confidence map goes through it
            opened.append(str(path))
            return real(path, image, **save_args)

        outputs.atomic_write_image = spy
        root = Path(folder)
        returned = api.segment(root / "run", [root / "photos"], root / "ddp", batch_size=2)
        (root / f"rank{rank}.json").write_text(json.dumps({"opened": opened, "returned": [str(p) for p in returned]}))


def test_two_gloo_processes_split_the_photos_and_write_each_file_once(tmp_path):
    write_images(tmp_path / "fit", 4)
    unsupseg.fit("kmeans", images=tmp_path / "fit", out=tmp_path / "run", backbone="efficientnet_lite0", clusters=3,
                 overrides=["data.resolution=32", "params.restarts=1", f"cache_dir={tmp_path / 'cache'}"],
                 log=lambda m: None)
    write_images(tmp_path / "photos", 7, seed=3)
    write_images(tmp_path / "photos" / "tall", 2, size=(40, 56), seed=4)
    single = unsupseg.segment(tmp_path / "run", [tmp_path / "photos"], tmp_path / "single", batch_size=1)
    assert len(single) == 9

    mp.spawn(worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    logs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    opened = [Path(p).relative_to(tmp_path / "ddp") for log in logs for p in log["opened"]]
    # each of the 18 files (mask + overlay per photo) written exactly once, by one process
    assert len(opened) == len(set(opened)) == 18
    # the split is every other photo of the sorted list (9 photos: 5 and 4)
    assert [len(log["returned"]) for log in logs] == [5, 4]
    # masks and overlays; the folder's run record (.unsupseg-segment.json) is written once, by rank 0
    def outputs(folder):
        return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))

    expected, written = outputs(tmp_path / "single"), outputs(tmp_path / "ddp")
    assert (tmp_path / "ddp" / ".unsupseg-segment.json").is_file()
    assert written == expected == sorted(opened)
    for rel in expected:
        assert (tmp_path / "ddp" / rel).read_bytes() == (tmp_path / "single" / rel).read_bytes(), rel
    assert np.asarray(Image.open(tmp_path / "ddp" / "tall" / "img_01.png")).shape == (56, 40)
