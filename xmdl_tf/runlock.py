"""Output folders that two processes never share and a kill never corrupts.

`FolderLock` is an advisory `flock` on a hidden file beside the folder
(`.<name>.lock` in its parent), so it covers the folder through renames and
is released by the kernel when the process dies, however it dies. A second
command on the same output gets `FolderBusy` naming the process that holds it.

`atomic_write_text` / `atomic_replace_dir` are the two ways outputs land:
written whole under a temporary name, then renamed into place.
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path


class FolderBusy(RuntimeError):
    """Another live process holds the lock of an output folder."""


class FolderLock:
    """Exclusive, non-blocking lock of `folder` for the life of a `with` block (POSIX)."""

    def __init__(self, folder: str | Path, what: str = "run"):
        self.folder = Path(folder)
        self.path = self.folder.parent / f".{self.folder.name}.lock"
        self.what = what
        self._fd: int | None = None

    def __enter__(self) -> "FolderLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = _read_pid(self.path)
            who = f"process {holder}" if holder else "another process"
            raise FolderBusy(f"{self.folder}: {who} is already writing this {self.what}; wait for it to finish "
                             "or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        import fcntl

        if self._fd is not None:
            # The file stays: unlinking it would let a waiting process lock a
            # deleted inode while a third one creates a new file.
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip() or 0) or None
    except (OSError, ValueError):
        return None


def usual_permissions(path: str | Path) -> None:
    """Give `path` the mode a plain `open`/`mkdir` would (0o666 / 0o777 less the umask).

    `tempfile.mkstemp` and `mkdtemp` create 0o600 / 0o700, and the mode survives the rename into
    place: an exported model would be unreadable to a TF Serving process of another user.
    """
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~mask)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file, fsync and a rename (never half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_replace_dir(new: Path, target: Path) -> None:
    """Put the complete folder `new` at `target`, replacing what was there.

    The old folder is renamed aside first and deleted only once `new` is in
    place; a kill in between leaves both on disk (`finish_replace_dir` on the
    next run completes the swap).
    """
    trash = target.with_name(f".{target.name}.replaced")
    if trash.exists():
        shutil.rmtree(trash)
    if target.exists():
        os.replace(target, trash)
    os.replace(new, target)
    shutil.rmtree(trash, ignore_errors=True)


def finish_replace_dir(target: Path) -> None:
    """Complete a swap `atomic_replace_dir` was killed in the middle of."""
    trash = target.with_name(f".{target.name}.replaced")
    if trash.exists():
        if target.exists():
            shutil.rmtree(trash, ignore_errors=True)
        else:  # killed between the two renames: the old folder is the one to keep
            os.replace(trash, target)
