"""The one atomic file writer: a temporary file beside the target, fsync, the umask's mode, a rename.

Every file a reader may open while it is being (re)written goes through here: manifests, shard
check results, checkpoints, exports, embeddings, reports. A reader sees the old file or the new
one, never half of one; a full disk raises one :class:`DiskFullError` naming the file, removes
the temporary file and leaves the previous file as it was.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

DISK_FULL_ERRNOS = tuple(code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if code is not None)


class DiskFullError(OSError):
    """The disk filled up while writing ``filename``; the partial file has been removed."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(errno.ENOSPC, "No space left on device (nothing partial was left; free "
                         "space or write elsewhere)", str(path))

    def __str__(self) -> str:
        return f"disk full while writing {self.filename}: no space left on device (the partial " \
               "file was removed; free some space or write elsewhere, then rerun)"


def check_writable(path: str | os.PathLike) -> None:
    """Raise, creating nothing, when ``path`` (a file or folder to write) could not be written.

    The folder checked is ``path`` itself when it is one, else the nearest existing folder above it
    (where it would be created). A few stats: cheap enough to call before any work, so that a
    read-only or foreign output place fails in one line at once rather than after the work.

    Raises:
        NotADirectoryError: a file stands where a folder above ``path`` should be.
        OSError: ``EROFS``, the folder is on a read-only file system.
        PermissionError: this user may not write into the folder.
    """
    target = Path(path).absolute()
    folder = target if target.is_dir() else target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory (a file is in the way)", str(folder))
    if hasattr(os, "statvfs") and os.statvfs(folder).f_flag & os.ST_RDONLY:
        raise OSError(errno.EROFS, "Read-only file system", str(folder))
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "Permission denied", str(folder))


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (``/proc/self/status``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, hence the fallback only)
    os.umask(mask)
    return mask


class _WholeWrites:
    """An unbuffered binary stream that writes all it is given and remembers the OSError that stopped it.

    ``torch.save`` reports a failed write as ``RuntimeError: [enforce fail at inline_container.cc]``;
    the error kept here says what really happened (a full disk, usually).
    """

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        view = memoryview(data).cast("B")
        written = 0
        try:
            while written < len(view):  # a raw write may stop short when the disk fills up
                written += self.stream.write(view[written:]) or 0
        except OSError as error:
            self.error = error
            raise
        return written

    def flush(self) -> None:
        self.stream.flush()


def stage_file(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Write a temporary file beside ``path`` with ``write(stream)``, fsync it, give it the umask's mode.

    The caller renames it over ``path`` (:func:`write_atomic` does both); staging several files
    first lets an export replace all of them or none.

    Args:
        path: the file the temporary one will replace; its directory must exist.
        write: writes the content to the binary stream it is given.

    Returns:
        The temporary file (``.NAME.*.tmp`` in the same directory).

    Raises:
        DiskFullError: the disk (or quota) filled up; the temporary file is removed.
    """
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with open(handle, "wb", buffering=0) as raw:
            stream = _WholeWrites(raw)
            try:
                write(stream)  # type: ignore[arg-type]
                os.fsync(raw.fileno())
            except Exception as error:
                cause = stream.error if stream.error is not None else error
                if isinstance(cause, OSError) and cause.errno in DISK_FULL_ERRNOS:
                    raise DiskFullError(path) from error
                raise
        # mkstemp creates owner-only files; teammates on a shared filesystem need what the umask allows
        os.chmod(temporary, 0o666 & ~current_umask())
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return Path(temporary)


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Write ``path`` so that readers see the old file or the new one, never half of one.

    Args:
        path: the file to (re)place; its directory must exist.
        write: writes the content to the binary stream it is given (``torch.save``, ``stream.write``).

    Returns:
        ``path``.

    Raises:
        DiskFullError: the disk filled up; no temporary file is left and the old file is intact.
    """
    path = Path(path)
    temporary = stage_file(path, write)
    try:
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, payload: Any) -> Path:
    """Write ``payload`` as indented UTF-8 JSON (and a newline) with :func:`write_atomic`."""
    text = json.dumps(payload, indent=2, sort_keys=False) + "\n"
    return write_atomic(path, lambda stream: stream.write(text.encode("utf-8")))
