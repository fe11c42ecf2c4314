"""One vocabulary on the command line: the method names of ``fit`` in import-checkpoint,
``--backbone-weights`` in finetune-leopart, ``evaluate --seeds`` as the API's seeds, ``fit --plan``
without ``--out``, and options that would be ignored refused with one line (the installed script, in
a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_images

SCRIPT = Path(sys.executable).with_name("unsupseg")


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "UNSUPSEG_PROGRESS": "0", "COLUMNS": "200", "UNSUPSEG_CACHE_DIR": str(cwd / "cache")}
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def _refused(result: subprocess.CompletedProcess, message: str) -> None:
    assert (result.returncode, result.stdout, result.stderr) == (2, "", f"error: {message}\n")


def test_fit_plan_needs_no_out_and_fit_without_plan_does(tmp_path):
    write_images(tmp_path / "photos", 3)
    common = ("fit", "--method", "kmeans", "--images", "photos", "--backbone-weights", "random", "--clusters", "3")
    plan = _run(*common, "--plan", cwd=tmp_path)
    assert plan.returncode == 0 and plan.stderr == ""
    lines = plan.stdout.splitlines()
    assert lines[0] == "fit kmeans on photos: 3 training items (3 images)"
    assert lines[-1].startswith("time: give --throughput ITEMS_PER_S")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]          # nothing written
    _refused(_run(*common, cwd=tmp_path), "fit needs --out RUN, the run directory to write (only --plan goes without)")
    _refused(_run(*common, "--out", "run", "--throughput", "2", cwd=tmp_path),
             "--throughput goes with --plan (a time estimate of the plan); leave it out to fit")


def test_evaluate_refuses_what_overclustering_would_ignore(tmp_path):
    common = ("evaluate", "RUN", "--dataset", "camvid", "--root", "DATA")
    _refused(_run(*common, "--overcluster", "10", "--matching", "all", "--no-crf", "--probe", "linear", cwd=tmp_path),
             "--overcluster scores the backbone features alone: --matching, --probe, --crf/--no-crf would be ignored; "
             "leave them out")
    _refused(
        _run(*common, "--seeds", "0,1", cwd=tmp_path),
        "--seeds goes with --overcluster (its k-means seeds); leave it out",
    )
    _refused(_run(*common, "--overcluster", "10", "--seeds", "5x", cwd=tmp_path),
             "--seeds takes comma-separated integer seeds, e.g. 0,1,2; got '5x'")


@pytest.mark.parametrize("args, message", [
    (("cause", "--out", "RUN"), "import-checkpoint takes cause-mlp, cause-tr or stego, got 'cause'"),
    (("cause-tr", "--out", "RUN", "--segment", "s.pth"), "import-checkpoint cause-tr needs --cluster, --backbone"),
    (("cause-mlp", "--out", "RUN", "--segment", "s.pth", "--cluster", "c.pth", "--backbone", "dino_vits8",
      "--ckpt", "x.ckpt"), "--ckpt is STEGO's checkpoint; import-checkpoint cause-mlp reads --segment and --cluster"),
    (("stego", "--out", "RUN", "--ckpt", "x.ckpt", "--backbone", "dino_vits8"),
     "--backbone: CAUSE's files; import-checkpoint stego reads --ckpt alone"),
])
def test_import_checkpoint_takes_the_method_names_of_fit(tmp_path, args, message):
    _refused(_run("import-checkpoint", *args, cwd=tmp_path), message)


def test_finetune_leopart_names_its_weights_as_fit_does(tmp_path):
    help_text = _run("finetune-leopart", "--help", cwd=tmp_path).stdout
    assert "--backbone-weights" in help_text and "--weights " not in help_text
    old = _run("finetune-leopart", "--backbone", "dino_vits16", "--images", "x", "--out", "FT", "--weights", "random",
               cwd=tmp_path)
    assert old.returncode != 0 and "No such option: --weights" in old.stderr


def test_the_python_verbs_take_their_options_by_keyword(tmp_path):
    from unsupseg.api import load, plan, resolve_config
    from unsupseg.importers.cause import import_cause
    from unsupseg.reporting import build_report

    with pytest.raises(TypeError):
        load(tmp_path / "run", "cpu")
    with pytest.raises(TypeError):
        plan(resolve_config("kmeans"), tmp_path / "cache")
    with pytest.raises(TypeError):
        build_report(tmp_path / "run", tmp_path / "r.html", tmp_path / "photos")
    with pytest.raises(TypeError):
        import_cause("cause-mlp", "s.pth", "c.pth", "dino_vits8", tmp_path / "run", "random")
