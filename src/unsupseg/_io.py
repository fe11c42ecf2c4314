"""File writing (and safe reading) shared by every layer.

A file is written to a temporary name in the destination folder and renamed into place, so a crash
or kill never leaves a half-written output under the final name. Temporary names carry the host and
process that write them, so a later call removes only the leftovers of dead processes of this host,
never a live neighbour's files.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import os
import pickle
import re
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import OutputError

_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"
# .<final name>.<host>~<pid>~<random>.tmp
# a full disk, a quota or a file size limit while the body writes the temporary file
_DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_TEMP = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9_-]+)~(?P<pid>\d+)~[^.]*\.tmp$")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_HOST}~{os.getpid()}~", suffix=".tmp", dir=path.parent)
    except OSError as err:   # a name too long, a read-only folder: say which output, not where in the code
        raise OutputError(f"cannot write {path}: {err.strerror or err}") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
        except OSError as err:
            if err.errno not in _DISK_FULL:
                raise
            raise OutputError(f"cannot write {path}: {err.strerror or err}; nothing was written there") from None
        # mkstemp creates 0600 files; outputs get the usual permissions (0666 less the umask)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_image(path: str | os.PathLike, image, **save_args) -> None:
    """Encode a Pillow image in memory, then write it with a checked write: Pillow's JPEG encoder ends a
    short write to a file without an error, which on a full disk left a truncated photo in place."""
    buffer = io.BytesIO()
    image.save(buffer, **save_args)
    atomic_write_bytes(path, buffer.getvalue())


@contextlib.contextmanager
def held_lock(lock: str | os.PathLike, on_busy: Callable[[int], None]) -> Iterator[int]:
    """Hold the file ``lock`` (flock, exclusive) for the block, then remove it; yields its descriptor.
    When another process holds it, ``on_busy(fd)`` runs once: it raises to refuse, or returns to wait.
    flock is released by the kernel however its holder exits, so a killed holder leaves no stale lock;
    a waiter that locked a file its holder removed meanwhile opens the new one instead."""
    told = False
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not told:
                told = True
                try:
                    on_busy(fd)
                except BaseException:
                    os.close(fd)
                    raise
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield fd
    finally:
        Path(lock).unlink(missing_ok=True)
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's live process
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike, recursive: bool = False) -> int:
    """Delete the temporary files that ``atomic_path`` left in ``folder`` when its process was killed:
    only names of this host whose process is gone. Returns how many were removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    for tmp in folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp"):
        match = _TEMP.match(tmp.name)
        if match is None or match["host"] != _HOST or _alive(int(match["pid"])):
            continue
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed += 1
    return removed


def check_writable_dir(folder: str | os.PathLike, what: str = "output folder") -> Path:
    """Create ``folder`` if needed and prove it takes files; OutputError with the reason otherwise.

    Called before long work, so a bad ``--out`` fails in a second, not after an hour."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{what} {folder} is a file, not a folder; choose a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".write-probe.{_HOST}~{os.getpid()}~", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputError(f"cannot write into {what} {folder}: {err.strerror or err}") from None
    return folder


def check_writable_file(path: str | os.PathLike, what: str = "output file") -> Path:
    """``path`` can be (re)placed by a file: it is not a folder and its folder takes files."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{what} {path} is a folder; give a file name (e.g. {path / 'out'}.*)")
    check_writable_dir(path.parent, f"folder of the {what}")
    return path


def torch_load_plain(path: str | os.PathLike, error: type[Exception], allowed: tuple = ()):
    """``torch.load`` of a file that may only hold tensors and plain containers (plus ``allowed``
    classes). A pickle naming anything else (a function such as os.system, a class) is refused with
    ``error``: the file holds code, and unsupseg never runs code from a file."""
    import torch

    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        if found is None:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if "weights_only" in first:   # torch's advice to load with weights_only=False: never ours to give
                first = "not a pickle of tensors"
            raise error(f"cannot read {path}: not a PyTorch file or damaged ({first})") from None
        raise error(
            f"refusing to load {path}: the file holds code ({found.group(1)}), not only tensors; "
            "unsupseg never unpickles code or objects, so it is refused. Use weights saved as plain tensors "
            "(a state dict or a .safetensors file)"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError) as err:
        raise error(f"cannot read {path}: not a PyTorch file or damaged ({type(err).__name__}: {err})") from None
