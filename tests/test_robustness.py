"""What keeps a user's work safe on bad or unusual inputs (segment and fit)."""

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import unsupseg
import unsupseg.rundir
from tests.conftest import write_images
from unsupseg.data import DataWarning
from unsupseg.errors import DataError


def _until_paused(args: list[str], env: dict) -> subprocess.Popen:
    """Start a child process that prints "paused" at its stop point and waits there; return once it
    is there (no timing involved), or fail with its output if it ends first."""
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    output = []
    for line in proc.stdout:
        if line == b"paused\n":
            return proc
        output.append(line)
    proc.wait()
    pytest.fail("the child process ended before its stop point:\n" + b"".join(output).decode(errors="replace"))


def _kill(proc: subprocess.Popen) -> None:
    proc.kill()                           # kill -9
    proc.wait()
    proc.stdin.close()
    proc.stdout.close()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("robust")
    write_images(tmp / "imgs", 3)
    # its own feature cache: a module fixture runs before the per-test cache fixture, and copies of
    # this file running at once must not share (or race on) the user's cache
    unsupseg.fit(
        "kmeans",
        images=tmp / "imgs",
        out=tmp / "run",
        clusters=3,
        backbone="efficientnet_lite0",
        overrides=["data.resolution=48", "params.restarts=1", f"cache_dir={tmp / 'cache'}"],
        log=lambda m: None,
    )
    return tmp / "run"


def _odd_images(folder):
    folder.mkdir()
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "good.png")
    Image.fromarray(rgb[:, :, 0]).save(folder / "gray.png")
    Image.fromarray(rgb).convert("P").save(folder / "palette.png")
    Image.fromarray(np.dstack([rgb, rgb[:, :, :1]])).save(folder / "alpha.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray((rgb[:, :, 0].astype(np.uint16) * 257)).save(folder / "sixteen.png")
    Image.fromarray(rgb[:3, :5]).save(folder / "tiny.png")
    (folder / "zero.png").write_bytes(b"")
    (folder / "notes.png").write_text("not an image")
    full = (folder / "good.png").read_bytes()
    (folder / "truncated.png").write_bytes(full[: len(full) // 2])
    (folder / "readme.txt").write_text("ignored: not an image extension")


def test_segment_handles_odd_and_bad_files(run_dir, tmp_path):
    _odd_images(tmp_path / "in")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        written = unsupseg.segment(run_dir, [tmp_path / "in"], tmp_path / "out")
    names = sorted(p.stem for p in written)
    assert names == ["alpha", "cmyk", "good", "gray", "palette", "sixteen", "tiny"]
    messages = " ".join(str(w.message) for w in caught)
    for bad in ("zero.png", "notes.png", "truncated.png"):
        assert bad in messages
    for name in names:
        mask = Image.open(tmp_path / "out" / f"{name}.png")
        source = Image.open(tmp_path / "in" / next(p.name for p in (tmp_path / "in").iterdir() if p.stem == name))
        assert mask.size == source.size      # tiny 5x3 included: padded to the stride, cropped back
    with pytest.raises(DataError, match="truncated.png|zero.png|notes.png"):
        unsupseg.segment(run_dir, [tmp_path / "in"], tmp_path / "strict", strict=True)


def test_huge_images_are_downscaled_with_a_warning(run_dir, tmp_path):
    (tmp_path / "in").mkdir()
    Image.fromarray(np.zeros((300, 400, 3), dtype=np.uint8)).save(tmp_path / "in" / "big.jpg")
    with pytest.warns(DataWarning, match=r"big.jpg: 400x300 image is above 30000 pixels; downscaled to 200x150"):
        unsupseg.segment(run_dir, [tmp_path / "in"], tmp_path / "out", max_pixels=30_000)
    assert Image.open(tmp_path / "out" / "big.png").size == (200, 150)


# The child process pauses right before renaming the 4th overlay into place: 3 pairs are finished,
# the 4th mask is final and its overlay is a complete temporary file. os.replace is wrapped only to
# stop there (the kill lands at a known point, not at whatever moment a poll loop sees); it still
# renames every other file.
_PAUSE_BEFORE_4TH_OVERLAY = """
import os, sys
import unsupseg

rename, overlays = os.replace, []

def replace(src, dst):
    if str(dst).endswith("_overlay.jpg"):
        overlays.append(dst)
        if len(overlays) == 4:
            print("paused", flush=True)
            sys.stdin.read()      # until killed
    rename(src, dst)

os.replace = replace
unsupseg.segment(sys.argv[1], [sys.argv[2]], sys.argv[3])
"""


def test_interrupted_segment_leaves_no_half_written_file(run_dir, tmp_path):
    write_images(tmp_path / "many", 12, size=(96, 72))
    out = tmp_path / "out"
    _kill(
        _until_paused(
            [sys.executable, "-c", _PAUSE_BEFORE_4TH_OVERLAY, str(run_dir), str(tmp_path / "many"), str(out)],
            {**os.environ, "UNSUPSEG_PROGRESS": "0"},
        )
    )
    finished = [f"img_{i:02d}" for i in range(3)]
    assert sorted(p.stem for p in out.glob("*.png")) == finished + ["img_03"]
    assert sorted(p.name for p in out.glob("*_overlay.jpg")) == [f"{n}_overlay.jpg" for n in finished]
    assert len(list(out.glob(".img_03_overlay.jpg.*.tmp"))) == 1      # the killed process's leftover
    for path in [*out.glob("*.png"), *out.glob("*_overlay.jpg")]:
        Image.open(path).load()          # every file under its final name is complete
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for n in finished for p in out.glob(f"{n}*")}

    # the next call removes the dead process's temporary file, keeps the finished pairs, redoes the rest
    written = unsupseg.segment(run_dir, [tmp_path / "many"], out)
    assert sorted(p.name for p in written) == [f"img_{i:02d}.png" for i in range(3, 12)]
    assert sorted(p.stem for p in written.skipped) == finished
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for n in finished for p in out.glob(f"{n}*")}
    assert after == before                # finished pairs were not rewritten
    assert not list(out.rglob("*.tmp"))
    assert len(list(out.glob("*.png"))) == len(list(out.glob("*_overlay.jpg"))) == 12
    for path in out.glob("img_*"):
        Image.open(path).load()


# The CLI, stopped (until killed) right after a file of the given name is renamed into place.
_PAUSE_AFTER_WRITING = """
import os, sys
from unsupseg.cli import main

rename, target = os.replace, sys.argv.pop(1)

def replace(src, dst):
    rename(src, dst)
    if os.path.basename(dst) == target:
        print("paused", flush=True)
        sys.stdin.read()          # until killed

os.replace = replace
main()
"""


def test_killed_fit_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_one(tmp_path):
    """kill -9 in the middle of CAUSE's Step 2, then the same command again: it resumes from the
    last checkpoint and writes the weights an uninterrupted fit writes, bit for bit."""
    write_images(tmp_path / "imgs", 8)
    overrides = ["data.resolution=64", "data.mode=square"] + [f"params.{key}={value}" for key, value in {
        "train_resolution": 64, "concepts": 16, "projection_dim": 8, "bank_size": 4, "batch_size": 2,
        "mediator_epochs": 1, "head_epochs": 100, "cluster_epochs": 1, "checkpoint_every": 5, "linear_probe": False,
    }.items()]
    unsupseg.fit("cause-mlp", images=tmp_path / "imgs", out=tmp_path / "straight", clusters=3,
                 backbone="efficientnet_lite0", overrides=overrides, log=lambda m: None)

    interrupted = tmp_path / "interrupted"
    command = [sys.executable, "-m", "unsupseg.cli", "fit", "--method", "cause-mlp", "--images", str(tmp_path / "imgs"),
               "--clusters", "3", "--backbone", "efficientnet_lite0", "--out", str(interrupted)]
    for override in overrides:
        command += ["--set", override]
    env = {**os.environ, "UNSUPSEG_PROGRESS": "0"}
    step2 = interrupted / "checkpoints" / "cause-step2-front-door.pt"
    # the first run stops right after writing its first Step 2 checkpoint, then is killed
    _kill(_until_paused([sys.executable, "-c", _PAUSE_AFTER_WRITING, step2.name, *command[3:]], env))
    assert step2.exists() and not (interrupted / "weights.safetensors").exists()

    again = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    output = again.stdout + again.stderr
    assert "resuming the unfinished run" in output and "cause-step2-front-door: resuming from step" in output
    straight = unsupseg.rundir.load(tmp_path / "straight").state
    resumed = unsupseg.rundir.load(interrupted).state
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    assert not (interrupted / "checkpoints").exists()
