"""Files that are whole or not there: how every checkpoint, cache and decompressed dataset file is written; and what
a file holds, as a digest."""

import contextlib
import glob
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def replacing(path: str | Path, durable: bool = False) -> Iterator[BinaryIO]:
    """A binary file to write that takes the place of ``path`` only once the block ends without an error: it is written
    beside ``path`` under a hidden temporary name of this process's own (two writers never share one) and renamed over
    it, so a kill at any moment leaves the old file or the new one, never a torn one. An error removes the temporary
    file and leaves ``path`` as it was. ``durable``: the file's bytes, and then the rename, are on disk (fsync) before
    the block returns, as a checkpoint's must be before training goes on."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:  # the rename itself is durable only once the directory entry is on disk
            directory = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
    finally:
        tmp.unlink(missing_ok=True)


def _remove_leftovers(path: Path) -> None:
    """The temporary files that writers of ``path`` killed mid-write (kill -9) left: a dead process's are removed,
    so that kills do not pile up hidden copies of a checkpoint."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name.removeprefix(f".{path.name}.").removesuffix(".tmp")
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def digest(path: Path, algorithm: str = "sha256") -> str:
    """The hex digest of a file's bytes, read a few MB at a time."""
    hashed = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            hashed.update(chunk)
    return hashed.hexdigest()
