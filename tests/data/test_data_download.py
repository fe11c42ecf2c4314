"""`unsupseg download` / `check-data` against a loopback HTTP mirror serving archives built here.

The catalogue entries of voc21 and cityscapes27 are replaced by small archives with the same layout
(checksums computed here with hashlib); the server counts every byte it sends.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
import threading
import zipfile
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from unsupseg import cli
from unsupseg.data import build_dataset
from unsupseg.data import download as dl

VOC = "pascalvoc/VOCdevkit/VOC2012"


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100000")  # rich must not wrap the messages the tests read


# --- archives -------------------------------------------------------------------------------------


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zip(files: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _voc_tar() -> bytes:
    d = "VOCdevkit/VOC2012"
    # Incompressible padding makes the transfer long enough to cut half-way.
    pad = hashlib.sha256(b"pad").digest() * 4096
    return _tar({
        f"{d}/JPEGImages/a.jpg": b"jpeg a" + pad, f"{d}/JPEGImages/b.jpg": b"jpeg b",
        f"{d}/JPEGImages/c.jpg": b"jpeg c",
        f"{d}/SegmentationClass/a.png": b"png a", f"{d}/SegmentationClass/b.png": b"png b",
        f"{d}/ImageSets/Segmentation/train.txt": b"a\n", f"{d}/ImageSets/Segmentation/val.txt": b"b\n",
    })


def _aug_zip(members=("a", "b", "c"), compression=zipfile.ZIP_DEFLATED) -> bytes:
    files = {f"SegmentationClassAug/{m}.png": f"aug {m}".encode() * 50 for m in members}
    files["__MACOSX/SegmentationClassAug/._a.png"] = b"resource fork"
    return _zip(files, compression)


def _voc_source(tar: bytes, aug_checksum: str | None = None) -> dl.Source:
    real = dl.CATALOGUE["voc21"]
    tar_archive, aug_archive = real.archives
    tar_archive = replace(
        tar_archive,
        expect=(dl.Expect(f"{VOC}/JPEGImages/*.jpg", 3), dl.Expect(f"{VOC}/SegmentationClass/*.png", 2),
                dl.Expect(f"{VOC}/ImageSets/Segmentation/val.txt", 1)),
        checksum=("sha256", hashlib.sha256(tar).hexdigest()),
    )
    aug_archive = replace(
        aug_archive, expect=(dl.Expect(f"{VOC}/SegmentationClassAug/*.png", 3),),
        checksum=None if aug_checksum is None else ("sha256", aug_checksum),
    )
    return replace(real, archives=(tar_archive, aug_archive))


# --- loopback mirror ------------------------------------------------------------------------------


class Mirror:
    """127.0.0.1 only, any free port, Range support; stops at exit or after 60 s on its own."""

    def __init__(self, files: dict[str, bytes], *, corrupt=False, drop_first: set[str] = frozenset()):
        self.files, self.corrupt, self.drop_first = files, corrupt, set(drop_first)
        self.served: dict[str, int] = {}
        self.ranges: list[tuple[str, str | None]] = []
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                mirror.ranges.append((name, self.headers.get("Range")))
                data = mirror.files.get(name)
                if data is None:
                    self.send_error(404)
                    return
                if mirror.corrupt:
                    data = data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) + data[len(data) // 2 + 1:]
                start = 0
                rng = self.headers.get("Range")
                if rng:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if name in mirror.drop_first:
                    mirror.drop_first.discard(name)
                    body = body[: len(body) // 2]  # announced in full, cut half-way
                    self.close_connection = True
                self.wfile.write(body)
                mirror.served[name] = mirror.served.get(name, 0) + len(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.watchdog = threading.Timer(60, self.server.shutdown)

    def __enter__(self):
        self.thread.start()
        self.watchdog.start()
        return self

    def __exit__(self, *exc):
        self.watchdog.cancel()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """Run `unsupseg ARGS` in this process (the patched catalogue applies); exit code and output."""
    monkeypatch.setattr(sys, "argv", ["unsupseg", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, " ".join((captured.out + captured.err).split())


def _files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


# --- tests ----------------------------------------------------------------------------------------


def test_download_lays_out_verifies_records_and_skips_a_complete_root(tmp_path, monkeypatch, capsys):
    tar, aug = _voc_tar(), _aug_zip()
    monkeypatch.setitem(dl.CATALOGUE, "voc21", _voc_source(tar))
    root = tmp_path / "data"
    files = {"VOCtrainval_11-May-2012.tar": tar, "SegmentationClassAug.zip": aug}
    with Mirror(files) as mirror:
        code, text = run_cli(monkeypatch, capsys, "download", "voc21", "--root", str(root), "--mirror", mirror.url)
        assert code == 0, text
        assert mirror.served == {k: len(v) for k, v in files.items()}
        assert (root / VOC / "JPEGImages" / "c.jpg").read_bytes() == b"jpeg c"
        assert (root / VOC / "SegmentationClassAug" / "c.png").is_file()
        # trainaug = Aug ids minus val ids
        assert (root / VOC / "ImageSets" / "Segmentation" / "trainaug.txt").read_text() == "a\nc\n"
        assert build_dataset("voc21", root, "trainaug").ids == ["a", "c"]
        manifest = json.loads((root / dl.MANIFEST_NAME).read_text())["archives"]
        assert manifest["VOCtrainval_11-May-2012.tar"]["sha256"] == hashlib.sha256(tar).hexdigest()
        assert manifest["SegmentationClassAug.zip"]["sha256"] == hashlib.sha256(aug).hexdigest()
        assert manifest["SegmentationClassAug.zip"]["bytes"] == len(aug)
        assert "no published checksum" in manifest["SegmentationClassAug.zip"]["verified"]
        # archives deleted after extraction, no staging folder or part file left, no MACOSX junk
        assert not [p for p in root.iterdir() if p.name.startswith(".")]
        assert _files_under(root / "downloads") == []
        assert not any("__MACOSX" in f for f in _files_under(root))
        before = _files_under(root)

        requests = len(mirror.ranges)
        code, text = run_cli(monkeypatch, capsys, "download", "voc21", "--root", str(root), "--mirror", mirror.url)
        assert code == 0, text
        assert len(mirror.ranges) == requests  # a complete root is checked, nothing requested
        assert "in place" in text and _files_under(root) == before
        code, text = run_cli(monkeypatch, capsys, "check-data", "voc21", "--root", str(root))
        assert code == 0 and "complete" in text


def test_corrupt_bytes_for_every_file(tmp_path, monkeypatch, capsys):
    tar, aug = _voc_tar(), _aug_zip()
    good_aug = hashlib.sha256(aug).hexdigest()
    monkeypatch.setitem(dl.CATALOGUE, "voc21", _voc_source(tar, aug_checksum=good_aug))
    root = tmp_path / "data"
    with Mirror({"VOCtrainval_11-May-2012.tar": tar, "SegmentationClassAug.zip": aug}, corrupt=True) as mirror:
        code, text = run_cli(monkeypatch, capsys, "download", "voc21", "--root", str(root), "--mirror", mirror.url)
    assert code == 2
    for name, data in (("VOCtrainval_11-May-2012.tar", tar), ("SegmentationClassAug.zip", aug)):
        i = len(data) // 2
        bad = hashlib.sha256(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]).hexdigest()
        good = hashlib.sha256(data).hexdigest()
        assert f"{name}: sha256 checksum mismatch (expected {good}, actual {bad}); url {mirror.url}/{name}" in text
    assert "2 file(s) failed" in text
    # nothing under a final name: no archive, no part file, no extracted folder
    assert _files_under(root) == []


def test_zip_crc_corruption_without_published_checksum(tmp_path, monkeypatch, capsys):
    tar, aug = _voc_tar(), bytearray(_aug_zip(compression=zipfile.ZIP_STORED))
    # Flip a byte inside one member's stored data: only the CRC-32 check can catch it.
    with zipfile.ZipFile(io.BytesIO(bytes(aug))) as zf:
        info = zf.getinfo("SegmentationClassAug/b.png")
    offset = info.header_offset + 30 + len(info.filename) + len(info.extra) + 2
    assert aug[offset:offset + 3] == b"g b"
    aug[offset] ^= 0x01
    monkeypatch.setitem(dl.CATALOGUE, "voc21", _voc_source(tar))
    root = tmp_path / "data"
    with Mirror({"VOCtrainval_11-May-2012.tar": tar, "SegmentationClassAug.zip": bytes(aug)}) as mirror:
        code, text = run_cli(monkeypatch, capsys, "download", "voc21", "--root", str(root), "--mirror", mirror.url)
    assert code == 2
    assert "member 'SegmentationClassAug/b.png' is corrupt" in text and f"{info.CRC:08x}" in text
    assert "the download was deleted" in text
    assert not (root / "downloads" / "SegmentationClassAug.zip").exists()
    assert not (root / VOC / "SegmentationClassAug").exists()
    assert (root / VOC / "JPEGImages" / "a.jpg").is_file()  # the good tar is still installed


def test_resume_on_a_second_call_downloads_only_the_rest(tmp_path, monkeypatch, capsys):
    tar = _voc_tar()
    monkeypatch.setitem(dl.CATALOGUE, "voc21", _voc_source(tar))
    monkeypatch.setattr(dl, "ATTEMPTS", 1)  # no retry inside the call: the next call resumes
    root = tmp_path / "data"
    name = "VOCtrainval_11-May-2012.tar"
    with Mirror({name: tar, "SegmentationClassAug.zip": _aug_zip()}, drop_first={name}) as mirror:
        code, text = run_cli(monkeypatch, capsys, "download", "voc21", "--root", str(root),
                             "--mirror", mirror.url, "--only", "images")
        assert code == 2 and "interrupted" in text and "run the command again to resume" in text
        half = len(tar) // 2
        part = root / "downloads" / f".{name}.part"
        assert part.stat().st_size == half and not (root / "downloads" / name).exists()
        assert mirror.served[name] == half

        code, text = run_cli(monkeypatch, capsys, "download", "voc21", "--root", str(root),
                             "--mirror", mirror.url, "--only", "images")
        assert code == 0, text
        assert mirror.ranges[-1] == (name, f"bytes={half}-")
        assert mirror.served[name] == len(tar)  # the second call sent only the remaining half
        assert (root / VOC / "JPEGImages" / "a.jpg").is_file() and not part.exists()


def test_resume_within_one_call(tmp_path, monkeypatch, capsys):
    tar = _voc_tar()
    monkeypatch.setitem(dl.CATALOGUE, "voc21", _voc_source(tar))
    name = "VOCtrainval_11-May-2012.tar"
    with Mirror({name: tar}, drop_first={name}) as mirror:
        code, text = run_cli(monkeypatch, capsys, "download", "voc21", "--root", str(tmp_path),
                             "--mirror", mirror.url, "--only", "images")
    assert code == 0, text
    assert mirror.served[name] == len(tar) and [r for _, r in mirror.ranges] == [None, f"bytes={len(tar) // 2}-"]


def test_404_names_file_and_url(tmp_path, monkeypatch, capsys):
    tar = _voc_tar()
    monkeypatch.setitem(dl.CATALOGUE, "voc21", _voc_source(tar))
    with Mirror({"VOCtrainval_11-May-2012.tar": tar}) as mirror:
        code, text = run_cli(monkeypatch, capsys, "download", "voc21", "--root", str(tmp_path), "--mirror", mirror.url)
    assert code == 2
    assert "SegmentationClassAug.zip" in text and f"{mirror.url}/SegmentationClassAug.zip answered HTTP 404" in text
    assert f"Put the archive(s) in {tmp_path / 'downloads'}/" in text
    assert not (tmp_path / "downloads" / "SegmentationClassAug.zip").exists()
    assert not list((tmp_path / "downloads").glob(".*part"))


def test_zip_with_a_missing_member(tmp_path, monkeypatch, capsys):
    tar = _voc_tar()
    monkeypatch.setitem(dl.CATALOGUE, "voc21", _voc_source(tar))
    files = {"VOCtrainval_11-May-2012.tar": tar, "SegmentationClassAug.zip": _aug_zip(members=("a", "b"))}
    with Mirror(files) as mirror:
        code, text = run_cli(monkeypatch, capsys, "download", "voc21", "--root", str(tmp_path), "--mirror", mirror.url)
    assert code == 2
    assert f"expected 3 file(s) matching {VOC}/SegmentationClassAug/*.png, found 2" in text
    assert not (tmp_path / VOC / "SegmentationClassAug").exists()
    assert not (tmp_path / "downloads" / "SegmentationClassAug.zip").exists()
    assert "SegmentationClassAug.zip" not in json.loads((tmp_path / dl.MANIFEST_NAME).read_text())["archives"]


# --- login-only sources ---------------------------------------------------------------------------


def _cityscapes_archives() -> tuple[bytes, bytes]:
    images, labels = {}, {}
    for split, city, n in (("train", "aachen", 2), ("val", "lindau", 1)):
        for i in range(n):
            stem = f"{city}_{i:06d}_000019"
            images[f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png"] = f"img {stem}".encode()
            labels[f"gtFine/{split}/{city}/{stem}_gtFine_labelIds.png"] = f"lab {stem}".encode()
    images["license.txt"] = labels["README"] = b"text"
    return _zip(images), _zip(labels)


def _cityscapes_source(images: bytes, labels: bytes) -> dl.Source:
    real = dl.CATALOGUE["cityscapes27"]
    img, lab = real.archives
    img = replace(img, checksum=("sha256", hashlib.sha256(images).hexdigest()), expect=(
        dl.Expect("cityscapes/leftImg8bit/train/*/*_leftImg8bit.png", 2),
        dl.Expect("cityscapes/leftImg8bit/val/*/*_leftImg8bit.png", 1)))
    lab = replace(lab, checksum=("sha256", hashlib.sha256(labels).hexdigest()), expect=(
        dl.Expect("cityscapes/gtFine/train/*/*_gtFine_labelIds.png", 2),
        dl.Expect("cityscapes/gtFine/val/*/*_gtFine_labelIds.png", 1)))
    return replace(real, archives=(img, lab))


def test_login_only_source_explains_then_verifies_hand_placed_files(tmp_path, monkeypatch, capsys):
    images, labels = _cityscapes_archives()
    monkeypatch.setitem(dl.CATALOGUE, "cityscapes27", _cityscapes_source(images, labels))
    root = tmp_path / "data"
    code, text = run_cli(monkeypatch, capsys, "download", "cityscapes27", "--root", str(root))
    assert code == 2
    assert "https://www.cityscapes-dataset.com/file-handling/?packageID=3" in text
    assert "leftImg8bit_trainvaltest.zip" in text and "gtFine_trainvaltest.zip" in text
    assert "Log in" in text and f"Put the archive(s) in {root / 'downloads'}/" in text

    (root / "downloads").mkdir()
    (root / "downloads" / "leftImg8bit_trainvaltest.zip").write_bytes(images)
    (root / "downloads" / "gtFine_trainvaltest.zip").write_bytes(labels[:-1] + b"X")  # a bad copy
    code, text = run_cli(monkeypatch, capsys, "check-data", "cityscapes27", "--root", str(root))
    assert code == 2
    assert f"gtFine_trainvaltest.zip: sha256 checksum mismatch (expected {hashlib.sha256(labels).hexdigest()}" in text
    # the user's file is kept, under another name
    assert (root / "downloads" / "gtFine_trainvaltest.zip.rejected").is_file()
    assert not (root / "downloads" / "gtFine_trainvaltest.zip").exists()

    (root / "downloads" / "gtFine_trainvaltest.zip").write_bytes(labels)
    code, text = run_cli(monkeypatch, capsys, "check-data", "cityscapes27", "--root", str(root))
    assert code == 0, text
    ds = build_dataset("cityscapes27", root, "train")
    assert ds.ids == ["aachen/aachen_000000_000019", "aachen/aachen_000001_000019"]
    assert (root / "downloads" / "leftImg8bit_trainvaltest.zip").is_file()  # hand-placed: never deleted
    entry = json.loads((root / dl.MANIFEST_NAME).read_text())["archives"]["gtFine_trainvaltest.zip"]
    assert entry["origin"] == "placed by hand" and entry["sha256"] == hashlib.sha256(labels).hexdigest()


def test_check_data_accepts_folders_extracted_by_hand(tmp_path, monkeypatch, capsys):
    images, labels = _cityscapes_archives()
    monkeypatch.setitem(dl.CATALOGUE, "cityscapes27", _cityscapes_source(images, labels))
    for blob in (images, labels):
        with zipfile.ZipFile(io.BytesIO(blob)) as zf:
            zf.extractall(tmp_path / "cityscapes")
    code, text = run_cli(monkeypatch, capsys, "check-data", "cityscapes", "--root", str(tmp_path))
    assert code == 0, text
    (tmp_path / "cityscapes" / "gtFine" / "val" / "lindau" / "lindau_000000_000019_gtFine_labelIds.png").unlink()
    code, text = run_cli(monkeypatch, capsys, "check-data", "cityscapes", "--root", str(tmp_path))
    assert code == 2 and "expected 1 file(s) matching cityscapes/gtFine/val/*/*_gtFine_labelIds.png, found 0" in text


def test_help_lists_every_dataset_with_size_and_licence(monkeypatch, capsys):
    code, text = run_cli(monkeypatch, capsys, "download", "--help")
    assert code == 0
    for name in ("cocostuff27", "cocostuff171", "coco81", "cityscapes27", "voc21", "potsdam3"):
        assert name in text
    for fragment in ("18 GB", "CC BY 4.0", "non-commercial", "VOCtrainval_11-May-2012.tar 1.9 GB", "ISPRS"):
        assert fragment in text


def test_unknown_dataset_and_bad_only(tmp_path, monkeypatch, capsys):
    code, text = run_cli(monkeypatch, capsys, "download", "camvid", "--root", str(tmp_path))
    assert code == 2 and "no download known for dataset 'camvid'" in text
    code, text = run_cli(monkeypatch, capsys, "download", "voc21", "--root", str(tmp_path), "--only", "masks")
    assert code == 2 and "--only must be one of images, labels, lists" in text
