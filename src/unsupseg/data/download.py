"""Fetch, verify and lay out the benchmarks: ``unsupseg download`` / ``unsupseg check-data``.

Sources, sizes, licences and layouts are in ``CATALOGUE`` (``download_catalog``; docs/datasets.md).
Per dataset root:

- archives go to ``<root>/downloads/<file>``; a transfer in progress lives in the hidden
  ``<root>/downloads/.<file>.part`` and resumes with an HTTP Range request;
- a file is verified before use: its published checksum where one exists, otherwise the archive's own
  integrity (every zip member's CRC-32, a tar read to its end) plus the expected member counts; a
  download that fails is deleted, a hand-placed file that fails is renamed ``<file>.rejected``;
- the archive is extracted into a hidden folder of the root and its folders are renamed into place
  only when extraction and the counts succeeded; then ``build_dataset`` must open every split and
  find every file it lists;
- ``<root>/unsupseg-downloads.json`` records, per archive, its URL, size and sha256 (so a second
  machine can compare) and where it was installed; a root that is complete is checked and nothing is
  downloaded;
- one download (or check-data) writes a root at a time: a second waits for ``<root>/.unsupseg-download.lock``
  and then finds the root complete.

Only the standard library (urllib, hashlib, zipfile, tarfile) and rich (progress bars) are used: the
job is one GET with a Range header per file, and no downloader library knows our checksums, layouts
or lists, so a third-party dependency (requests, pooch, torchvision's utils) would add nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import shutil
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from unsupseg._io import atomic_write_text, held_lock
from unsupseg._progress import console, enabled, track
from unsupseg.errors import DataError

from .download_catalog import CATALOGUE, SAME_FILES, Archive, Expect, Move, Source, catalogue_help, resolve

# the catalogue's names stay importable from here (the CLI's help, tests substituting entries)
__all__ = ["CATALOGUE", "MANIFEST_NAME", "SAME_FILES", "Archive", "Expect", "Move", "Outcome", "Source",
           "catalogue_help", "check_data", "download", "resolve"]

MANIFEST_NAME = "unsupseg-downloads.json"
LOCK_NAME = ".unsupseg-download.lock"   # held while a download or check-data writes the root
DOWNLOADS_DIR = "downloads"
PARTS = ("images", "labels", "lists")
CHUNK = 1 << 20
TIMEOUT_S = 60.0
ATTEMPTS = 3  # connection drops resumed within one call before giving up (a later call resumes too)
USER_AGENT = "unsupseg-download/1"

Log = Callable[[str], None]


@dataclass
class Outcome:
    """What one call did, per archive file: 'ok' (already there), 'installed', 'downloaded'."""

    name: str
    root: Path
    status: dict[str, str] = field(default_factory=dict)
    bytes_downloaded: int = 0
    missing: list[Archive] = field(default_factory=list)


# --- the verbs ----------------------------------------------------------------------------------


def download(
    name: str, root: str | os.PathLike, *, mirror: str | None = None, only: str | None = None,
    keep_archives: bool = False, log: Log = print,
) -> Outcome:
    """Fetch what is missing, verify it, lay it out under ``root`` and check the dataset opens."""
    return _run(name, Path(root), mirror=mirror, only=only, fetch=True, keep_archives=keep_archives, log=log)


def check_data(name: str, root: str | os.PathLike, *, log: Log = print) -> Outcome:
    """Verify and lay out what is in ``root`` (archives placed by hand included); never downloads."""
    return _run(name, Path(root), mirror=None, only=None, fetch=False, keep_archives=True, log=log)


def _run(
    name: str, root: Path, *, mirror: str | None, only: str | None, fetch: bool, keep_archives: bool, log: Log,
) -> Outcome:
    key, source = resolve(name)
    if only is not None and only not in PARTS:
        raise DataError(f"--only must be one of {', '.join(PARTS)}, got {only!r}")
    if mirror is not None and urllib.parse.urlsplit(mirror).scheme not in MIRROR_SCHEMES:
        raise DataError(f"--mirror {mirror!r} is not a URL: give the address of the folder holding the archives, "
                        f"starting {' or '.join(s + '://' for s in MIRROR_SCHEMES)}")
    if fetch:
        root.mkdir(parents=True, exist_ok=True)
    elif not root.is_dir():
        raise DataError(f"{key}: dataset root {root} not found; `unsupseg download {key} --root {root}` creates it")
    with _root_lock(root, log):
        return _run_locked(key, source, root, mirror=mirror, only=only, fetch=fetch, keep_archives=keep_archives,
                           log=log)


@contextlib.contextmanager
def _root_lock(root: Path, log: Log) -> Iterator[None]:
    """One writer per root: a second download waits here, then finds what the first laid out."""
    with held_lock(root / LOCK_NAME, lambda fd: log(f"another download is writing {root}; waiting for it to finish")):
        yield


def _run_locked(
    key: str, source: Source, root: Path, *, mirror: str | None, only: str | None, fetch: bool,
    keep_archives: bool, log: Log,
) -> Outcome:
    outcome = Outcome(key, root)
    reasons: list[str] = []
    failures: list[str] = []
    for archive in source.archives:
        if only is not None and archive.part != only:
            continue
        try:
            _ensure(archive, source, root, outcome, mirror=mirror, fetch=fetch, keep_archives=keep_archives, log=log)
        except _Unavailable as exc:
            outcome.missing.append(archive)
            reasons.append(str(exc))
        except DataError as exc:  # the other archives are still tried: one run reports every problem
            failures.append(str(exc))
    if outcome.missing or failures:
        parts = [f"{key}: {len(failures)} file(s) failed:"] + [f"  - {f}" for f in failures]
        if outcome.missing:
            parts = (parts if failures else []) + [_missing_message(key, root, outcome.missing, reasons, fetch)]
        raise DataError("\n".join(parts))
    if only is None:
        written = source.finish(root) if source.finish is not None else []
        for path in written:
            log(f"wrote {path}")
        _check_dataset(key, source, root)
        log(f"{key}: complete in {root} (splits {', '.join(source.splits)} open, every listed file present)")
    return outcome


class _Unavailable(Exception):
    """A file is neither in the root nor fetchable now (login needed, host unreachable)."""


def _ensure(
    archive: Archive, source: Source, root: Path, outcome: Outcome, *,
    mirror: str | None, fetch: bool, keep_archives: bool, log: Log,
) -> None:
    entry = _load_manifest(root)["archives"].get(archive.file, {})
    problem = _installed_problem(archive, root)
    if problem is None:
        # Installed earlier, or extracted by hand: the member counts decide.
        if not entry.get("installed"):
            _record(root, archive.file, dataset=source.name, origin="extracted by hand",
                    verified="member counts of the extracted folders", installed=_dests(archive))
        outcome.status[archive.file] = "ok"
        log(f"{archive.file}: in place, counts checked")
        return
    path = root / DOWNLOADS_DIR / archive.file
    url = _url(archive, mirror)
    if path.is_file():
        hashes = _hash_file(path, archive)
        if entry.get("sha256") != hashes["sha256"]:  # not verified by us before: a hand-placed file
            _verify(archive, path, hashes, url, ours=False)
            _record(root, archive.file, dataset=source.name, origin="placed by hand", url=None,
                    bytes=int(hashes["bytes"]), sha256=hashes["sha256"], verified=_how(archive))
        outcome.status[archive.file] = "installed"
    elif not fetch:
        raise _Unavailable(f"not in {path.parent} ({problem}); source {archive.url}")
    elif archive.login is not None and mirror is None:
        partial = any((root / m.dest).exists() for m in archive.moves)
        raise _Unavailable(f"the source needs a login, so download it by hand from {archive.url}"
                           + (f" ({problem})" if partial else ""))
    else:
        outcome.bytes_downloaded += _fetch(archive, source, url, path, log)
        outcome.status[archive.file] = "downloaded"
    _install(archive, path, url, root, log)
    _record(root, archive.file, installed=_dests(archive))
    if _load_manifest(root)["archives"][archive.file].get("origin") == "downloaded" and not keep_archives:
        path.unlink()
        log(f"{archive.file}: installed; archive deleted (its sha256 is kept in {MANIFEST_NAME})")
    else:
        log(f"{archive.file}: installed")


def _dests(archive: Archive) -> list[str]:
    return [m.dest for m in archive.moves]


def _installed_problem(archive: Archive, root: Path) -> str | None:
    absent = [m.dest for m in archive.moves if not (root / m.dest).exists()]
    if absent:
        return f"{root / absent[0]} does not exist"
    try:
        _check_expect(archive, {m.dest: root / m.dest for m in archive.moves}, str(root))
    except DataError as exc:
        return str(exc)
    return None


MIRROR_SCHEMES = ("http", "https", "ftp", "file")   # what urllib opens


def _url(archive: Archive, mirror: str | None) -> str:
    # A mirror is a plain folder of the archives under their file names.
    return archive.url if mirror is None else f"{mirror.rstrip('/')}/{archive.file}"


def _how(archive: Archive) -> str:
    if archive.checksum is not None:
        return f"{archive.checksum[0]} matches the published value ({archive.checksum_source})"
    return "no published checksum: archive integrity (CRC-32 / complete tar) and member counts"


# --- transfer -----------------------------------------------------------------------------------


def _fetch(archive: Archive, source: Source, url: str, path: Path, log: Log) -> int:
    """Download ``url`` to ``path`` through the hidden part file, resuming; verify; return bytes received."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.parent / f".{path.name}.part"
    received = 0
    for attempt in range(1, ATTEMPTS + 1):
        try:
            received += _transfer(url, part, archive.file)
            break
        except _Dropped as exc:
            if attempt == ATTEMPTS:
                raise DataError(
                    f"{archive.file}: transfer from {url} interrupted ({exc}); {part.stat().st_size} bytes "
                    f"kept in {part}; run the command again to resume"
                ) from exc
            log(f"{archive.file}: {exc}; resuming (attempt {attempt + 1} of {ATTEMPTS})")
    hashes = _hash_file(part, archive)
    _verify(archive, part, hashes, url, ours=True)
    os.replace(part, path)
    _record(path.parent.parent, archive.file, dataset=source.name, origin="downloaded", url=url,
            bytes=int(hashes["bytes"]), sha256=hashes["sha256"], verified=_how(archive), installed=[])
    return received


class _Dropped(Exception):
    """The connection ended before the announced length: resumable."""


def _transfer(url: str, part: Path, file: str) -> int:
    start = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if start:
        request.add_header("Range", f"bytes={start}-")
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and start:
            return 0  # the part file is already whole: verification decides
        raise _Unavailable(f"{url} answered HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise _Unavailable(f"{url} cannot be reached ({reason})") from exc
    with response:
        if start and response.status != 206:
            start = 0  # the server ignored the range: start over
        length = response.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        received = 0
        with open(part, "ab" if start else "wb") as fh, _bytes_progress(file, total, start) as advance:
            while True:
                try:
                    chunk = response.read(CHUNK)
                except (http.client.IncompleteRead, OSError) as exc:
                    raise _Dropped(f"connection dropped after {start + received} bytes") from exc
                if not chunk:
                    break
                fh.write(chunk)
                received += len(chunk)
                advance(len(chunk))
            fh.flush()
            os.fsync(fh.fileno())
        if total is not None and start + received < total:
            raise _Dropped(f"connection closed after {start + received} of {total} bytes")
    return received


@contextlib.contextmanager
def _bytes_progress(file: str, total: int | None, done: int) -> Iterator[Callable[[int], None]]:
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeRemainingColumn(), console=console, disable=not enabled(),
    )
    with progress:
        task = progress.add_task(file, total=total, completed=done)
        yield lambda n: progress.advance(task, n)


# --- verification ---------------------------------------------------------------------------------


def _hash_file(path: Path, archive: Archive) -> dict[str, str]:
    digests = {"sha256": hashlib.sha256()}
    if archive.checksum is not None and archive.checksum[0] != "sha256":
        digests[archive.checksum[0]] = hashlib.new(archive.checksum[0])
    with open(path, "rb") as fh, _bytes_progress(f"verify {archive.file}", path.stat().st_size, 0) as advance:
        while chunk := fh.read(CHUNK):
            for digest in digests.values():
                digest.update(chunk)
            advance(len(chunk))
    return {name: d.hexdigest() for name, d in digests.items()} | {"bytes": str(path.stat().st_size)}


def _verify(archive: Archive, path: Path, hashes: dict[str, str], url: str, *, ours: bool) -> None:
    if archive.checksum is None:
        return  # integrity and counts are checked while extracting
    algo, expected = archive.checksum
    actual = hashes[algo]
    if actual != expected.lower():
        where = _reject(path, ours)
        raise DataError(
            f"{archive.file}: {algo} checksum mismatch (expected {expected}, actual {actual}); "
            f"url {url}; {where}"
        )


def _reject(path: Path, ours: bool) -> str:
    # Our own download is deleted (a part file must not be resumed either); a file the user placed is
    # kept under another name, so nothing of theirs is lost and nothing bad stays under the final name.
    if ours:
        path.unlink(missing_ok=True)
        return "the download was deleted"
    rejected = path.with_name(path.name + ".rejected")
    os.replace(path, rejected)
    return f"the file was renamed {rejected}"


# --- extraction and layout ------------------------------------------------------------------------


def _install(archive: Archive, path: Path, url: str, root: Path, log: Log) -> None:
    staging = root / f".unsupseg-extract-{archive.file}"
    if staging.exists():
        shutil.rmtree(staging)  # our own leftover from an interrupted extraction
    staging.mkdir()
    try:
        try:
            _extract(archive, path, staging, log)
            sources = _resolve_moves(archive, staging)
            _check_expect(archive, sources, f"{archive.file} (extracted)")
        except DataError as exc:
            entry = _load_manifest(root)["archives"].pop(archive.file, {})
            _forget(root, archive.file)
            raise DataError(f"{exc}; url {url}; {_reject(path, entry.get('origin') == 'downloaded')}") from exc
        for move in archive.moves:
            dest = root / move.dest
            dest.parent.mkdir(parents=True, exist_ok=True)
            _merge_move(sources[move.dest], dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _extract(archive: Archive, path: Path, staging: Path, log: Log) -> None:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            members = zf.infolist()
            for info in track(members, len(members), f"extract {archive.file}"):
                _check_member_name(info.filename, path)
                try:
                    zf.extract(info, staging)  # reads the member fully: zipfile checks its CRC-32
                except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
                    raise DataError(
                        f"{path}: member {info.filename!r} is corrupt ({exc}; expected CRC-32 "
                        f"{info.CRC:08x} from the zip directory)"
                    ) from exc
        return
    try:
        with tarfile.open(path) as tf:
            # Streaming read to the end: a truncated or corrupt tar raises here.
            for member in track(tf, None, f"extract {archive.file}"):
                _check_member_name(member.name, path)
                tf.extract(member, staging, filter="data")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"{path}: not a complete zip or tar archive ({type(exc).__name__}: {exc})") from exc


def _check_member_name(name: str, path: Path) -> None:
    parts = Path(name).parts
    if name.startswith(("/", "\\")) or ".." in parts:
        raise DataError(f"{path}: member {name!r} would be written outside the extraction folder")


def _resolve_moves(archive: Archive, staging: Path) -> dict[str, Path]:
    sources = {}
    for move in archive.moves:
        found = sorted(p for p in staging.glob(move.src) if "__MACOSX" not in p.parts)
        if len(found) != 1:
            what = "nothing" if not found else ", ".join(str(p.relative_to(staging)) for p in found)
            raise DataError(f"{archive.file}: expected exactly one {move.src!r} in the archive, found {what}")
        sources[move.dest] = found[0]
    return sources


def _check_expect(archive: Archive, sources: dict[str, Path], what: str) -> None:
    """Count each expected pattern under the folder it lives in (extracted or installed)."""
    for expect in archive.expect:
        dest = max((d for d in sources if expect.pattern == d or expect.pattern.startswith(d + "/")), key=len)
        base = sources[dest]
        rest = expect.pattern[len(dest) + 1:]
        n = (1 if base.is_file() else 0) if not rest else sum(1 for p in base.glob(rest) if p.is_file())
        wanted = "at least 1" if expect.count is None else str(expect.count)
        if n == 0 or (expect.count is not None and n != expect.count):
            raise DataError(
                f"{what}: expected {wanted} file(s) matching {expect.pattern}, found {n} "
                f"(under {base}); the archive or folder is incomplete or not the published one"
            )


def _merge_move(src: Path, dest: Path) -> None:
    # One rename when dest is new (the usual case); merged entry by entry when another archive
    # already created it (VOC's tar and its Aug zip share VOC2012/), never overwriting a file.
    if not dest.exists():
        os.replace(src, dest)
        return
    if not (src.is_dir() and dest.is_dir()):
        if src.is_file() and dest.is_file() and src.stat().st_size == dest.stat().st_size:
            return  # left by an interrupted earlier move
        raise DataError(f"{dest} already exists and differs from the archive's copy; not overwritten")
    for child in sorted(src.iterdir()):
        _merge_move(child, dest / child.name)


def _check_dataset(key: str, source: Source, root: Path) -> None:
    from unsupseg.data.datasets import build_dataset

    for split in source.splits:
        dataset = build_dataset(key, root, split)
        missing = [p for p in dataset.files() if not p.is_file()]
        if missing:
            raise DataError(
                f"{key} split {split}: {len(missing)} listed file(s) missing, first {missing[0]}; "
                f"run `unsupseg check-data {key} --root {root}` after restoring them"
            )


# --- manifest and messages ------------------------------------------------------------------------


def _load_manifest(root: Path) -> dict:
    path = root / MANIFEST_NAME
    if not path.is_file():
        return {"version": 1, "archives": {}}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(manifest.get("archives"), dict):
            raise ValueError("no 'archives' table")
    except (ValueError, OSError) as exc:
        raise DataError(f"{path}: unreadable download record ({exc}); move it away to rebuild it") from exc
    return manifest


def _record(root: Path, file: str, **fields) -> None:
    manifest = _load_manifest(root)
    entry = manifest["archives"].setdefault(file, {})
    entry.update({k: v for k, v in fields.items() if v is not None})
    entry["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    atomic_write_text(root / MANIFEST_NAME, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def _forget(root: Path, file: str) -> None:
    manifest = _load_manifest(root)
    if manifest["archives"].pop(file, None) is not None:
        atomic_write_text(root / MANIFEST_NAME, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def _missing_message(key: str, root: Path, missing: list[Archive], reasons: list[str], fetched: bool) -> str:
    downloads = root / DOWNLOADS_DIR
    lines = [f"{key}: {len(missing)} file(s) missing:"]
    for archive, reason in zip(missing, reasons):
        lines.append(f"  - {archive.file} ({archive.size}): {reason}")
    login = sorted({a.login for a in missing if a.login})
    if login:
        lines.append(f"Log in (free registration) at {login[0]} and download the file(s) by hand.")
    where = ", ".join(f"{root / m.dest}" for a in missing for m in a.moves)
    lines.append(
        f"Put the archive(s) in {downloads}/ under the names above (or extract them so that {where} "
        f"exist), then run `unsupseg download {key} --root {root}` or `unsupseg check-data {key} "
        f"--root {root}` to verify and lay them out. Sources, sizes and layouts: docs/datasets.md."
    )
    if not fetched:
        lines.append(f"(check-data never downloads; `unsupseg download {key} --root {root}` does.)")
    return "\n".join(lines)
