"""Data safety (issue 17): a user's files are never deleted or overwritten, bad values and busy
neighbours give messages, not crashes. One test per numbered defect (3 is the feature cache's)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

import unsupseg
from tests.conftest import write_images
from unsupseg import rundir
from unsupseg.api import resolve_config
from unsupseg.cli import app
from unsupseg.data import DataWarning
from unsupseg.errors import CheckpointError, ConfigError, DataError, OutputError, RunDirError, WeightsError

OVERRIDES = ["data.resolution=48", "params.restarts=1"]


def _fit(images, out, tmp, clusters=3, **kwargs):
    return unsupseg.fit("kmeans", images=images, out=out, clusters=clusters, backbone="efficientnet_lite0",
                        overrides=OVERRIDES + [f"cache_dir={tmp / 'cache'}"], log=lambda m: None, **kwargs)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("safety")
    write_images(tmp / "imgs", 3)
    _fit(tmp / "imgs", tmp / "run", tmp)
    return tmp


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# 1 ------------------------------------------------------------------------------------------------


def test_overwrite_replaces_only_a_run_and_its_own_files(run, tmp_path):
    photos = tmp_path / "myphotos"
    write_images(photos, 3)
    (photos / "notes.txt").write_text("mine")
    before = _snapshot(photos)
    with pytest.raises(RunDirError, match="not a run directory.*nothing was deleted"):
        _fit(photos, photos, run, overwrite=True)
    assert _snapshot(photos) == before

    from unsupseg.methods.leopart.finetune import _prepare_out

    with pytest.raises(RunDirError, match="not a fine-tuning folder"):
        _prepare_out(photos, {"backbone": "dino_vits16"}, True, photos / "dino_vits16-leopart.safetensors")
    assert _snapshot(photos) == before

    # a run directory holding a file of the user's: --overwrite replaces the run, keeps the file
    _fit(run / "imgs", tmp_path / "run", run)
    (tmp_path / "run" / "notes.txt").write_text("mine")
    _fit(run / "imgs", tmp_path / "run", run, clusters=2, overwrite=True)
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"
    assert rundir.load(tmp_path / "run").config.clusters == 2


# 2 ------------------------------------------------------------------------------------------------


def test_segment_never_writes_onto_an_input_nor_reads_its_outputs_back(run, tmp_path):
    photos = tmp_path / "photos"
    write_images(photos, 2)
    before = _snapshot(photos)
    with pytest.raises(OutputError, match=r"img_00.png would replace the input image"):
        unsupseg.segment(run / "run", [photos], photos)
    assert _snapshot(photos) == before

    # JPEG photos segmented into their own folder: the masks and overlays written there are not
    # inputs of the next call
    jpegs = tmp_path / "jpegs"
    jpegs.mkdir()
    for path in photos.iterdir():
        Image.open(path).save(jpegs / f"{path.stem}.jpg")
    first = unsupseg.segment(run / "run", [jpegs], jpegs)
    assert sorted(p.name for p in first) == ["img_00.png", "img_01.png"]
    again = unsupseg.segment(run / "run", [jpegs], jpegs)
    assert list(again) == [] and sorted(p.name for p in again.skipped) == ["img_00.jpg", "img_01.jpg"]
    assert not list(jpegs.glob("*_overlay_overlay.jpg"))


# 4 ------------------------------------------------------------------------------------------------

_HOLD_A_TEMPORARY_FILE = """
import sys
from unsupseg._io import atomic_path

with atomic_path(sys.argv[1]) as tmp:
    tmp.write_bytes(b"half written")
    print("holding", flush=True)
    sys.stdin.read()
"""


def _holder(target: Path) -> subprocess.Popen:
    """A real neighbour process in the middle of an atomic write of ``target``."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_A_TEMPORARY_FILE, str(target)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout.readline() == b"holding\n"
    return proc


def test_segment_removes_only_temporary_files_of_dead_processes(run, tmp_path):
    out = tmp_path / "out"
    live = _holder(out / "img_00.png")           # a second segment call writing into the same folder
    dead = _holder(out / "img_01.png")
    dead.send_signal(signal.SIGKILL)
    dead.wait()
    [live_tmp] = out.glob(".img_00.png.*.tmp")
    [dead_tmp] = out.glob(".img_01.png.*.tmp")
    try:
        unsupseg.segment(run / "run", [run / "imgs"], out)
        assert live_tmp.read_bytes() == b"half written"    # the live neighbour's file is untouched
        assert not dead_tmp.exists()                        # a killed call's leftover is cleaned
    finally:
        live.kill()
        live.wait()


# 5 ------------------------------------------------------------------------------------------------


def test_same_file_names_in_two_folders_get_two_outputs(run, tmp_path):
    write_images(tmp_path / "a", 1, seed=1)
    write_images(tmp_path / "b", 1, seed=2)
    written = unsupseg.segment(run / "run", [tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in written) == ["a/img_00.png", "b/img_00.png"]
    assert (tmp_path / "out" / "a" / "img_00_overlay.jpg").exists() and (
        tmp_path / "out" / "b" / "img_00_overlay.jpg"
    ).exists()

    Image.open(tmp_path / "a" / "img_00.png").save(tmp_path / "a" / "img_00.jpg")
    with pytest.raises(OutputError, match=r"img_00.png and .*img_00.jpg would both be written"):
        unsupseg.segment(run / "run", [tmp_path / "a" / "img_00.png", tmp_path / "a" / "img_00.jpg"], tmp_path / "o2")


# 6 ------------------------------------------------------------------------------------------------


def test_skipped_outputs_are_reported_and_runs_are_not_mixed(run, tmp_path):
    out = tmp_path / "out"
    unsupseg.segment(run / "run", [run / "imgs"], out)
    result = CliRunner().invoke(app, ["segment", str(run / "run"), str(run / "imgs"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())      # rich wraps long lines
    assert "wrote 0 masks" in output and "skipped 3 images whose outputs were already there" in output

    _fit(run / "imgs", tmp_path / "other", run, clusters=2)
    with pytest.raises(OutputError, match="holds the masks of another run"):
        unsupseg.segment(tmp_path / "other", [run / "imgs"], out)
    assert len(unsupseg.segment(tmp_path / "other", [run / "imgs"], out, overwrite=True)) == 3


# 7 ------------------------------------------------------------------------------------------------


def test_bad_values_are_refused_with_a_message(run, tmp_path):
    for method, clusters, message in [("kmeans", 0, "at least 1"), ("kmeans", -3, "at least 1"),
                                      ("cause-mlp", 1, "at least 2"), ("stego", 1, "at least 2"),
                                      ("leopart", 1, "at least 2")]:
        with pytest.raises(ConfigError, match=f"clusters must be {message}"):
            resolve_config(method, clusters=clusters)
    for method, override, name in [
        ("kmeans", "params.restarts=0", "restarts"),
        ("kmeans", "params.iterations=-5", "iterations"),
        ("stego", "params.lr=-1", "lr"),
        ("cause-mlp", "params.lr=-1", "lr"),
        ("leopart", "params.k_fg=0", "k_fg"),
    ]:
        with pytest.raises(ConfigError, match=f"params.{name} must be"):
            resolve_config(method, overrides=[override])
    from unsupseg.methods.leopart.finetune import FinetuneParams, check_params

    with pytest.raises(ConfigError, match="lr_head must be >= 0"):
        check_params(FinetuneParams(lr_head=-1), 16)
    # K above the number of training tokens (3 images at 48 px: a few hundred) fails before k-means
    with pytest.raises(ConfigError, match=r"clusters=100000 is more than the \d+ training tokens"):
        _fit(run / "imgs", tmp_path / "big", run, clusters=100000)
    # a hand-edited config.yaml
    config = yaml.safe_load((run / "run" / "config.yaml").read_text())
    for key, value, message in [("clusters", 0, "clusters must be at least 1"), ("version", 99, "config version 99"),
                                ("test", {"resolution": 20000}, "test.resolution must be between 1 and 2048")]:
        edited = {**config, key: value}
        (tmp_path / "edited.yaml").write_text(yaml.safe_dump(edited))
        with pytest.raises(ConfigError, match=message):
            resolve_config(config_file=tmp_path / "edited.yaml")
    for max_pixels in (0, -5):
        with pytest.raises(ConfigError, match="max_pixels must be a positive"):
            unsupseg.segment(run / "run", [run / "imgs"], tmp_path / "masks", max_pixels=max_pixels)


# 8 ------------------------------------------------------------------------------------------------


def test_a_strip_photo_is_capped_with_a_warning_and_the_batch_goes_on(run, tmp_path):
    folder = tmp_path / "in"
    write_images(folder, 1)
    Image.fromarray(np.full((4, 1000, 3), 128, dtype=np.uint8)).save(folder / "strip.png")
    with pytest.warns(DataWarning, match=r"strip.png: 1000x4 is a very elongated image; segmented at 384x2"):
        written = unsupseg.segment(run / "run", [folder], tmp_path / "out")
    assert sorted(p.name for p in written) == ["img_00.png", "strip.png"]
    assert Image.open(tmp_path / "out" / "strip.png").size == (1000, 4)


# 9 ------------------------------------------------------------------------------------------------


def test_unwritable_outputs_are_refused_before_the_work(run, tmp_path, monkeypatch):
    from unsupseg.reporting import build_report

    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        unsupseg.segment(run / "run", [run / "imgs"], a_file)
    with pytest.raises(OutputError, match="cannot write into --out folder"):
        unsupseg.segment(run / "run", [run / "imgs"], a_file / "masks")     # under a file: cannot be made
    (tmp_path / "dir").mkdir()
    with pytest.raises(OutputError, match="report file .*dir is a folder"):
        build_report(run / "run", tmp_path / "dir")
    # checked before the evaluation (which would fail here only later, on the missing dataset)
    with pytest.raises(OutputError, match="--json file .*dir is a folder"):
        unsupseg.evaluate(run / "run", dataset="camvid", root=tmp_path / "no-such-root", json_path=tmp_path / "dir")
    monkeypatch.setenv("UNSUPSEG_CACHE_DIR", str(a_file))
    with pytest.raises(OutputError, match="feature cache folder .*is a file"):
        unsupseg.fit("kmeans", images=run / "imgs", out=tmp_path / "r", clusters=3, overrides=OVERRIDES,
                     backbone="efficientnet_lite0", log=lambda m: None)
    assert not (tmp_path / "r").exists()


# 10 -----------------------------------------------------------------------------------------------


def test_a_failed_fit_leaves_nothing_that_blocks_the_corrected_one(run, tmp_path):
    with pytest.raises(DataError, match="not found"):
        _fit(tmp_path / "typo", tmp_path / "run", run)
    assert not (tmp_path / "run").exists()
    # a fit killed before its first checkpoint (no clean-up ran) left its config: replaced, not refused
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(
        yaml.safe_dump({**yaml.safe_load((run / "run" / "config.yaml").read_text()), "clusters": 7})
    )
    _fit(run / "imgs", tmp_path / "run", run)
    assert rundir.load(tmp_path / "run").config.clusters == 3


# 11 -----------------------------------------------------------------------------------------------


def test_fit_from_a_config_file_keeps_its_method(run, tmp_path):
    config = resolve_config("stego", clusters=3, **{"data.images": str(tmp_path / "moved-away")})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(rundir.to_dict(config)))
    result = CliRunner().invoke(app, ["fit", "--config", str(tmp_path / "config.yaml"), "--out", str(tmp_path / "r")])
    # stego's own params were accepted (with kmeans they are unknown keys); it stops at the missing images
    assert isinstance(result.exception, DataError) and "moved-away" in str(result.exception)


# 12 -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_fits_each_method_in_its_own_run_and_small_folders_fit(tmp_path):
    pytest.importorskip("skimage")
    from unsupseg.config import load_preset
    from unsupseg.demo import PHOTOS, run_demo
    from unsupseg.methods import stego

    run_demo(tmp_path, "kmeans", 5, overwrite=False, log=lambda m: None)
    assert rundir.load(tmp_path / "run-kmeans").config.method == "kmeans"
    # another method fits its own run (here it stops at once on a bad K) instead of reusing k-means'
    with pytest.raises(ConfigError, match="clusters must be at least 2"):
        run_demo(tmp_path, "stego", 1, overwrite=False, log=lambda m: None)
    # STEGO's demo preset fits the six photos; its defaults get a message saying what to set
    n = len(PHOTOS)
    demo = stego.Params(**load_preset("stego", "demo")["params"])
    stego._check(demo, n, [(70, 40, 40)] * n, 1, min(demo.knn_pool, n))
    with pytest.raises(ConfigError, match=r"--set params.batch_size=6 --set params.knn_k=5"):
        stego._check(stego.Params(), n, [(70, 40, 40)] * n, 1, n)


# 13 -----------------------------------------------------------------------------------------------


def test_run_paths_are_absolute_so_report_works_from_another_folder(run, tmp_path, monkeypatch):
    from unsupseg.reporting import build_report

    write_images(tmp_path / "work" / "imgs", 3)
    monkeypatch.chdir(tmp_path / "work")
    _fit(Path("imgs"), Path("run"), run)
    stored = rundir.load(tmp_path / "work" / "run").config.data.images
    assert stored == str(tmp_path / "work" / "imgs")
    monkeypatch.chdir(tmp_path)
    build_report(tmp_path / "work" / "run", tmp_path / "report.html", max_images=2, log=lambda m: None)
    assert (tmp_path / "report.html").stat().st_size > 0


# 14 -----------------------------------------------------------------------------------------------


class _RunsAShellCommand:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickles_holding_code_are_refused_saying_so(tmp_path):
    from unsupseg.backbones.weights import read_weights_file
    from unsupseg.engine.loop import _load as load_checkpoint
    from unsupseg.importers.cause import _load as load_cause

    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(2), "payload": _RunsAShellCommand()}, path)
    for load, error in [(read_weights_file, WeightsError), (load_cause, CheckpointError),
                        (lambda p: load_checkpoint(p, None), RunDirError)]:
        with pytest.raises(error) as caught:
            load(path)
        message = str(caught.value)
        assert "holds code" in message and "refused" in message and "system" in message
        assert "weights_only" not in message


# 15 -----------------------------------------------------------------------------------------------


def test_minor_defects(run, tmp_path):
    # a file given as the run directory says so
    with pytest.raises(RunDirError, match="is a file, not a run directory"):
        unsupseg.load(run / "run" / "config.yaml")
    # symlinked subfolders are followed (a loop back to the root is not)
    write_images(tmp_path / "elsewhere", 2)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "linked").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "photos" / "loop").symlink_to(tmp_path / "photos")
    from unsupseg.data import ImageFolder

    assert ImageFolder(tmp_path / "photos").ids == ["linked/img_00", "linked/img_01"]
    # a transparent PNG gives the same labels from its path and as a PIL image
    rgba = np.zeros((48, 64, 4), dtype=np.uint8)
    rgba[:, :32] = (200, 30, 30, 255)
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    seg = unsupseg.load(run / "run")
    assert np.array_equal(seg.predict(tmp_path / "alpha.png"), seg.predict(Image.open(tmp_path / "alpha.png")))
