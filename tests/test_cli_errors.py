"""Every mistake a user can make on the command line ends in one line on stderr, without a traceback,
through the installed console script: usage errors, Ctrl-C, operating-system errors, misleading values."""

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import unsupseg
from tests.conftest import write_images

UNSUPSEG = str(Path(sys.executable).with_name("unsupseg"))


def cli(*args, cwd=None, env=None, file_limit=None) -> subprocess.CompletedProcess:
    """The console script in a subprocess; ``file_limit`` caps the size of every file it writes (a full
    disk, as the writer sees it: the write fails with EFBIG instead of ENOSPC)."""
    limit = None
    if file_limit is not None:
        def limit():
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))
    return subprocess.run([UNSUPSEG, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, preexec_fn=limit, timeout=600)


def one_error(result, code=2) -> str:
    """The run failed with ``code`` and printed exactly one line on stderr: ``error: ...``."""
    assert "Traceback" not in result.stderr + result.stdout
    assert result.returncode == code, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0][len("error: "):]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli-errors")
    write_images(tmp / "imgs", 3)
    unsupseg.fit("kmeans", images=tmp / "imgs", out=tmp / "run", clusters=3, backbone="efficientnet_lite0",
                 overrides=["data.resolution=48", "params.restarts=1", f"cache_dir={tmp / 'cache'}"],
                 log=lambda m: None)
    return tmp / "run"


# --- usage errors (typer's bundled click) ---------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["fit"], "fit needs --out RUN, the run directory to write (only --plan goes without)"),
    (["fit", "--out", "x", "--bogus"], "No such option: --bogus"),
    (["fit", "--out", "x", "--throughput", "fast"], "Invalid value for '--throughput': "),
    (["evaluate", "runs/km", "--dataset", "camvid", "--split", "val"],
     "Missing option '--root'. (see 'unsupseg evaluate --help')"),
    (["segment", "runs/km", "-leading-dash.jpg", "--out", "masks"], "No such option: -l"),
    (["fitt"], "No such command 'fitt'."),
])
def test_usage_errors_are_one_line(tmp_path, args, message):
    found = one_error(cli(*args, cwd=tmp_path))
    assert found.startswith(message)
    assert not (tmp_path / "x").exists()


def test_bare_command_prints_its_help_and_no_error():
    result = cli()
    assert result.returncode == 2 and "Usage: unsupseg" in result.stdout + result.stderr
    assert "error:" not in result.stdout + result.stderr


# --- Ctrl-C --------------------------------------------------------------------------------------------

def test_ctrl_c_during_fit_says_where_a_rerun_resumes_and_exits_130(tmp_path):
    write_images(tmp_path / "imgs", 6)
    tiny = ["params.steps=100000", "params.checkpoint_every=2", "params.batch_size=4", "params.knn_k=2",
            "params.dim=6", "params.neg_samples=2", "params.feature_samples=3", "data.resolution=32"]
    args = [UNSUPSEG, "fit", "--method", "stego", "--images", "imgs", "--backbone", "efficientnet_lite0",
            "--backbone-weights", "random", "--clusters", "3", "--out", "run"] + [a for s in tiny for a in ("--set", s)]
    # Ctrl-C as a terminal sends it, to a command started with Ctrl-C's default action: a suite run in
    # the background (`cmd &`) hands its children SIGINT ignored, and Python keeps it ignored.
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    checkpoint = tmp_path / "run" / "checkpoints" / "stego.pt"
    try:
        while not checkpoint.exists() and proc.poll() is None:   # waits for a state, asserts nothing on time
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        proc.kill()     # a fit that ignored Ctrl-C must not train on after the test
    step = torch.load(checkpoint, weights_only=True)["step"]
    assert proc.returncode == 130 and "Traceback" not in stdout + stderr
    assert stderr.splitlines() == [f"interrupted; rerun the same command to resume from step {step}/100000 of stego"]


# --- operating-system errors ---------------------------------------------------------------------------

LONG = "a" * 300


def test_too_long_output_names_are_one_line(run, tmp_path):
    imgs = run.parent / "imgs"
    result = cli("segment", run, imgs, "--out", LONG, cwd=tmp_path)
    assert one_error(result, code=1) == f"{LONG}: File name too long"
    result = cli("fit", "--method", "kmeans", "--images", imgs, "--out", LONG, "--clusters", "3", "--backbone",
                 "efficientnet_lite0", cwd=tmp_path)
    assert one_error(result, code=1) == f"{LONG}: File name too long"
    result = cli("report", run, "--out", f"{LONG}.html", cwd=tmp_path)
    assert one_error(result, code=1) == f"{LONG}.html: File name too long"
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_stops_segment_and_report_with_one_line_and_no_truncated_file(run, tmp_path):
    message = one_error(cli("segment", run, run.parent / "imgs", "--out", tmp_path / "masks", file_limit=500))
    assert message.startswith(f"cannot write {tmp_path / 'masks'}/img_00") and "File too large" in message
    for path in (tmp_path / "masks").iterdir():      # what is there is whole: PNG masks end with IEND
        assert path.name == ".unsupseg-segment.json" or path.read_bytes().endswith(b"IEND\xaeB`\x82")
    message = one_error(cli("report", run, "--out", tmp_path / "r.html", file_limit=2000))
    assert message == f"cannot write {tmp_path / 'r.html'}: File too large; nothing was written there"
    assert not (tmp_path / "r.html").exists()


def test_a_full_disk_at_the_start_of_fit_leaves_no_run_folder(run, tmp_path):
    message = one_error(cli("fit", "--method", "kmeans", "--images", run.parent / "imgs", "--out", tmp_path / "new",
                            "--clusters", "3", "--backbone", "efficientnet_lite0", file_limit=100))
    assert message == f"cannot write {tmp_path / 'new' / 'config.yaml'}: File too large; nothing was written there"
    assert not (tmp_path / "new").exists()


def test_a_mirror_that_is_not_a_url_is_refused_before_anything_is_made(tmp_path):
    message = one_error(cli("download", "potsdam3", "--root", tmp_path / "data", "--mirror", "not-a-url"))
    assert message.startswith("--mirror 'not-a-url' is not a URL")
    assert not (tmp_path / "data").exists()


def test_a_bad_label_file_is_named_without_the_workers_traceback(run, tmp_path):
    from PIL import Image

    root = tmp_path / "camvid"
    for split in ("val", "train"):
        write_images(root / split, 2)
        (root / f"{split}annot").mkdir()
        for name in ("img_00.png", "img_01.png"):
            Image.new("L", (64, 48)).save(root / f"{split}annot" / name)
    (root / "valannot" / "img_01.png").write_text("not a picture")
    message = one_error(cli("evaluate", run, "--dataset", "camvid", "--root", root))
    assert message.startswith(f"{root / 'valannot' / 'img_01.png'}: cannot decode label file")


# --- misleading messages -------------------------------------------------------------------------------

def test_negative_clusters_are_a_range_error_not_a_type_error(tmp_path):
    message = one_error(cli("fit", "--method", "kmeans", "--images", tmp_path, "--out", tmp_path / "r",
                            "--clusters", "-3", "--plan"))
    assert message == "clusters must be at least 1, got -3"


def test_a_backbone_option_of_the_wrong_type_is_named_and_no_run_folder_is_left(tmp_path):
    write_images(tmp_path / "imgs", 2)
    message = one_error(cli("fit", "--method", "kmeans", "--images", tmp_path / "imgs", "--out", tmp_path / "r",
                            "--clusters", "2", "--set", "backbone.options.center=maybe"))
    assert message == "backbone option center must be true or false, got 'maybe'"
    assert not (tmp_path / "r").exists()


def test_a_weights_file_that_is_no_pickle_gets_no_advice_to_unpickle_it(tmp_path):
    (tmp_path / "w.pth").write_text("localhost\n")
    write_images(tmp_path / "imgs", 2)
    message = one_error(cli("fit", "--method", "kmeans", "--images", tmp_path / "imgs", "--out", tmp_path / "r",
                            "--clusters", "3", "--backbone", "efficientnet_lite0", "--backbone-weights",
                            tmp_path / "w.pth"))
    assert message.startswith(f"cannot read {tmp_path / 'w.pth'}: not a PyTorch file or damaged")
    assert "weights_only" not in message


def test_a_cache_dir_with_a_tilde_is_the_home_folder(tmp_path, run):
    (tmp_path / "home").mkdir()
    result = cli("fit", "--method", "kmeans", "--images", run.parent / "imgs", "--out", "r", "--clusters", "3",
                 "--backbone", "efficientnet_lite0", "--set", "data.resolution=48", "--set", "params.restarts=1",
                 cwd=tmp_path, env={"UNSUPSEG_CACHE_DIR": "~/x", "HOME": str(tmp_path / "home")})
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "~").exists() and any((tmp_path / "home" / "x").iterdir())


def test_a_config_of_another_method_names_the_clash(run, tmp_path):
    message = one_error(cli("fit", "--config", run / "config.yaml", "--method", "stego", "--out", tmp_path / "r"))
    assert message == (f"{run / 'config.yaml'} is a kmeans config: its params do not fit --method stego; "
                       "drop --method, or leave out --config and start from a stego preset")


def test_square_brackets_in_a_message_reach_the_user(tmp_path):
    message = one_error(cli("fit", "--method", "kmeans", "--images", tmp_path / "photos[2024]", "--out",
                            tmp_path / "r", "--clusters", "3"))
    assert "photos[2024]" in message


# --- readers -------------------------------------------------------------------------------------------

def test_fit_does_not_train_on_segment_outputs_in_a_subfolder(run, tmp_path):
    write_images(tmp_path / "photos", 3)
    assert cli("segment", run, tmp_path / "photos", "--out", tmp_path / "photos" / "masks").returncode == 0
    result = cli("fit", "--plan", "--method", "kmeans", "--images", tmp_path / "photos", "--out", tmp_path / "r",
                 "--clusters", "3", "--backbone", "efficientnet_lite0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "fit kmeans on photos: 3 training items (3 images)"
    masks = tmp_path / "photos" / "masks"
    assert result.stderr.splitlines() == [f"warning: skipping 6 mask/overlay file(s) in {masks}: "
                                          "a segment output folder, not photos"]


# --- concurrent writers --------------------------------------------------------------------------------

def test_a_second_fit_into_a_run_folder_being_written_is_refused_naming_the_first(run, tmp_path):
    from unsupseg import rundir

    out = tmp_path / "new"
    fit = ["fit", "--method", "kmeans", "--images", run.parent / "imgs", "--out", out, "--clusters", "3",
           "--backbone", "efficientnet_lite0", "--set", "data.resolution=48", "--set", "params.restarts=1",
           "--set", f"cache_dir={run.parent / 'cache'}"]
    with rundir.writing(out):    # this process plays the first fit
        message = one_error(cli(*fit))
        assert message == (f"{out} is being written by another fit (process {os.getpid()}); "
                           "wait for it to finish or choose another --out")
        assert [p.name for p in out.iterdir()] == [rundir.LOCK]
    assert not out.exists()      # the folder the lock made goes with it when nothing was written
    result = cli(*fit)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "meta.json", "weights.safetensors"]


def _potsdam_by_hand(root: Path) -> None:
    """A complete potsdam3 root of one tile, as the first download would leave it."""
    import numpy as np
    import scipy.io

    base = root / "potsdam"
    tiles = (("imgs", "img", np.zeros((4, 4, 3), np.uint8)), ("gt", "gt", np.zeros((4, 4), np.uint8)))
    for folder, key, value in tiles:
        (base / folder).mkdir(parents=True)
        scipy.io.savemat(base / folder / "t1.mat", {key: value})
    for name in ("labelled_train", "labelled_test", "unlabelled_train"):
        (base / f"{name}.txt").write_text("t1\n")


def test_a_second_download_into_one_root_waits_then_finds_it_complete(tmp_path):
    import fcntl

    from unsupseg.data import download as dl

    root = tmp_path / "data"
    root.mkdir()
    with open(root / dl.LOCK_NAME, "w") as lock:     # this process plays the first download
        fcntl.flock(lock, fcntl.LOCK_EX)
        second = subprocess.Popen([UNSUPSEG, "download", "potsdam3", "--root", root, "--mirror",
                                   (tmp_path / "empty").as_uri()], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "1000"})
        first_line = second.stdout.readline()           # waits for a state, asserts nothing on time
        assert first_line.strip() == f"another download is writing {root}; waiting for it to finish"
        _potsdam_by_hand(root)
    stdout, stderr = second.communicate(timeout=600)
    assert second.returncode == 0 and stderr == "", stderr
    assert stdout.splitlines() == ["Potsdam.tar.gz: in place, counts checked",
                                   f"potsdam3: complete in {root} (splits train, val open, every listed file present)"]
    assert not (root / "downloads").exists() and not (root / dl.LOCK_NAME).exists()


def test_every_file_of_a_folder_not_segmented_is_named_once_and_counted(run, tmp_path):
    import numpy as np
    from PIL import Image

    photos = tmp_path / "photos"
    write_images(photos, 2)
    frames = [Image.fromarray(np.full((20, 30, 3), v, np.uint8)) for v in (0, 128, 255)]
    frames[0].save(photos / "anim.gif", save_all=True, append_images=frames[1:])
    Image.fromarray(np.arange(600, dtype=np.uint8).reshape(20, 30)).convert("P").save(photos / "palette.bmp")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (photos / "notes.txt").write_text("mine")
    result = cli("segment", run, photos, "--out", tmp_path / "masks", env={"COLUMNS": "1000"})
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert result.stdout.splitlines() == [f"wrote 4 masks and overlays to {tmp_path / 'masks'}; "
                                          "2 files could not be segmented (see the warnings)"]
    assert sorted(result.stderr.splitlines()) == [
        f"warning: skipping {photos / 'notes.txt'}: not an image file (supported extensions: "
        ".jpg, .jpeg, .png, .webp, .tif, .tiff, .bmp, .gif)",
        f"warning: skipping unreadable image: {photos / 'broken.jpg'}: not a readable image "
        "(OSError: Truncated File Read)",
    ]
    assert sorted(p.name for p in (tmp_path / "masks").glob("*.png")) == ["anim.png", "img_00.png", "img_01.png",
                                                                          "palette.png"]


def test_a_strip_photo_among_the_training_photos_keeps_its_feature_map_small(tmp_path):
    import json

    import numpy as np
    from PIL import Image

    write_images(tmp_path / "imgs", 3)
    Image.fromarray(np.full((4, 1000, 3), 128, np.uint8)).save(tmp_path / "imgs" / "strip.png")
    result = cli("fit", "--method", "kmeans", "--images", tmp_path / "imgs", "--out", tmp_path / "run", "--clusters",
                 "3", "--backbone", "efficientnet_lite0", "--set", "data.resolution=48", "--set", "params.restarts=1",
                 "--set", f"cache_dir={tmp_path / 'cache'}")
    assert result.returncode == 0, result.stderr
    [index] = (tmp_path / "cache").glob("*/index.json")
    index = json.loads(index.read_text())
    shapes = dict(zip(index["ids"], index["shapes"]))
    # longer side capped at 8 x 48 = 384 px, the shorter kept at one stride of 8: 1 x 48 tokens (uncapped 6 x 1500)
    assert shapes["strip"][1:] == [1, 48]


def test_a_cache_entry_holding_nan_is_rebuilt_with_one_warning(tmp_path):
    import numpy as np

    write_images(tmp_path / "imgs", 3)
    fit = ["fit", "--method", "kmeans", "--images", tmp_path / "imgs", "--clusters", "3", "--backbone",
           "efficientnet_lite0", "--set", "data.resolution=48", "--set", "params.restarts=1",
           "--set", f"cache_dir={tmp_path / 'cache'}"]
    assert cli(*fit, "--out", tmp_path / "a").returncode == 0
    [entry] = (tmp_path / "cache").glob("*/index.json")
    features = np.memmap(entry.parent / "features.f16", dtype=np.float16, mode="r+")
    features[5] = np.nan      # damage on disk: the size still matches the index
    features.flush()
    del features
    result = cli(*fit, "--out", tmp_path / "b", env={"COLUMNS": "1000"})
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines() == [
        f"warning: feature cache {entry.parent} holds NaN or infinite values (damaged); rebuilding it"]
    assert np.isfinite(np.fromfile(entry.parent / "features.f16", dtype=np.float16)).all()


def test_clusters_edited_in_a_finished_runs_config_are_caught_when_it_loads(run, tmp_path):
    import shutil

    edited = tmp_path / "run"
    shutil.copytree(run, edited)
    text = (edited / "config.yaml").read_text()
    assert "clusters: 3\n" in text
    (edited / "config.yaml").write_text(text.replace("clusters: 3\n", "clusters: 5\n"))
    message = one_error(cli("segment", edited, run.parent / "imgs", "--out", tmp_path / "masks"))
    assert message == (f"{edited / 'config.yaml'} does not match the checksum recorded in meta.json: it was edited "
                       "after the fit, and the weights hold the values it had then; fit again to change clusters "
                       "or settings")
    assert not (tmp_path / "masks").exists()
