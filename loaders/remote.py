"""Where shard bytes come from: a local file, an object store through fsspec, or a typed ``pipe:``.

Every reader of shards opens them here (:func:`open_shard`), so a local path is only ever
opened as a regular file (a FIFO would block forever), an ``s3://``/``gs://`` URL is streamed
through fsspec (``s3fs``/``gcsfs``, the ``s3``/``gcs`` extras), and webdataset's shell-running
``pipe:`` scheme is used only for text the user typed (manifest entries never get here with a
scheme: :mod:`loaders.manifest` refuses them). :func:`register_webdataset_handlers` gives
webdataset's own ``gopen`` the same fsspec handlers, as webdataset allows, so a
``webdataset.WebDataset("s3://...")`` elsewhere in the project reads them too.
"""

from __future__ import annotations

import os
import re
import stat
from typing import IO, Any

# A URL scheme of two or more characters ("C:" is a Windows drive, not a scheme).
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")
# Schemes webdataset opens itself (a shell pipe, curl); everything else goes through fsspec.
WEBDATASET_SCHEMES = ("pipe", "http", "https")
# Object stores and the package (and ecomaug extra) fsspec needs for them.
FSSPEC_PACKAGES = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"),
                   "gcs": ("gcsfs", "gcs"), "az": ("adlfs", None), "abfs": ("adlfs", None),
                   "memory": (None, None), "file": (None, None)}


def url_scheme(text: str) -> str | None:
    """The scheme of ``text`` in lower case (``"s3"``, ``"pipe"``), or None for a plain path."""
    match = _SCHEME.match(text)
    return match.group(1).lower() if match else None


def file_kind(mode: int) -> str:
    """A name for what ``st_mode`` describes, for messages (``"FIFO"``, ``"directory"``...)."""
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


NOT_REGULAR = "not a regular file"  # the one wording of this refusal, in messages and skip reasons


class NotRegularFileError(ValueError):
    """A local path is a FIFO, socket, device or directory where a file was expected."""

    def __init__(self, path: str, kind: str) -> None:
        super().__init__(f"{path}: {NOT_REGULAR} (a {kind})")
        self.kind = kind


def open_regular_file(path: str | os.PathLike) -> IO[bytes]:
    """Open a local file for reading, refusing anything that is not a regular file.

    The file is opened non-blocking and checked on the open descriptor, so a FIFO (which
    would block ``open`` until a writer comes) or a device is refused at once, with no race
    between the check and the open.

    Raises:
        FileNotFoundError: no such file (or a dangling symlink).
        NotRegularFileError: a FIFO, socket, device or directory (a ValueError).
        OSError: a symlink loop or another failure of ``open``.
    """
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(os.fspath(path), file_kind(mode))
        if hasattr(os, "set_blocking"):
            os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def read_text(location: str | os.PathLike, *, limit: int = 1 << 30) -> str:
    """The UTF-8 text of a small local file or fsspec URL (a manifest), at most ``limit`` bytes.

    Raises:
        ValueError: not a regular file, too large, or not UTF-8.
        FileNotFoundError: it does not exist.
        ImportError: the URL's fsspec backend is not installed.
    """
    text = os.fspath(location)
    stream = open_regular_file(text) if url_scheme(text) is None else _fsspec_open(text)
    with stream:
        data = stream.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{text}: larger than {limit} bytes; not a manifest")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{text}: not UTF-8 text ({error.reason} at byte {error.start})") from error


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem of ``url`` and the path inside it.

    Raises:
        ImportError: fsspec or the scheme's package (``s3fs``, ``gcsfs``) is not installed,
            naming the extra to install.
        ValueError: a scheme fsspec does not know.
    """
    scheme = url_scheme(url) or "file"
    try:
        import fsspec
        from fsspec.core import url_to_fs
    except ImportError as error:
        raise ImportError(f"reading {scheme}:// URLs needs fsspec: pip install fsspec") from error
    try:
        return url_to_fs(url)
    except ImportError as error:
        package, extra = FSSPEC_PACKAGES.get(scheme, (None, None))
        hint = f"pip install 'ecomaug[{extra}]'" if extra else f"pip install {package or 'the fsspec backend'}"
        raise ImportError(f"reading {scheme}:// URLs needs {package or 'an fsspec backend'}: {hint}") from error
    except ValueError as error:
        if scheme not in fsspec.available_protocols():
            raise ValueError(f"{url}: unknown URL scheme {scheme!r} (fsspec knows "
                             f"s3, gs, az, http(s), ... ; pipe: runs a shell command)") from error
        raise


def store_error(url: str, error: BaseException) -> ValueError:
    """An object store's own exception (credentials, network, a missing bucket) as one line."""
    text = str(error).strip()
    message = f": {text.splitlines()[0]}" if text else ""
    return ValueError(f"{url}: cannot read from the object store ({type(error).__name__}{message})")


def check_readable(url: str) -> None:
    """Ask the store for ``url``'s metadata once, so bad credentials or a wrong endpoint are one
    error before any worker starts (``pipe:``/``http(s):`` are left to webdataset).

    Raises:
        FileNotFoundError: no such object.
        ImportError: the scheme's fsspec package is missing.
        ValueError: the store refused (credentials, network) or the scheme is unknown.
    """
    if url_scheme(url) in (None, *WEBDATASET_SCHEMES):
        return
    fs, path = filesystem(url)
    try:
        fs.info(path)
    except FileNotFoundError:
        raise FileNotFoundError(2, "No such shard", url) from None
    except Exception as error:  # noqa: BLE001 -- the store's own exception types
        raise store_error(url, error) from error


def _fsspec_open(url: str) -> IO[bytes]:
    fs, path = filesystem(url)
    return fs.open(path, "rb")


def open_shard(url: str) -> IO[bytes]:
    """A binary stream of one shard: a local path, ``pipe:``/``http(s):`` (webdataset's
    ``gopen``) or any fsspec URL (``s3://``, ``gs://``, ...), read sequentially.

    Raises:
        FileNotFoundError, ValueError, ImportError, OSError: the shard cannot be opened.
    """
    scheme = url_scheme(url)
    if scheme is None:
        return open_regular_file(url)
    if scheme in WEBDATASET_SCHEMES:
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    return _fsspec_open(url)


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any) -> IO[bytes]:
    if mode[0] != "r":
        raise ValueError(f"{url}: ecomaug opens remote shards for reading only, not {mode!r}")
    return _fsspec_open(url)


def register_webdataset_handlers() -> None:
    """Let webdataset's ``gopen`` read ``s3://``, ``gs://``, ``gcs://`` and ``az://`` through
    fsspec (webdataset 1.0 has no handler for s3 and shells out to ``gsutil`` for gs)."""
    try:
        from webdataset.gopen import gopen_schemes
    except ImportError:
        return
    for scheme in ("s3", "s3a", "gs", "gcs", "az", "abfs"):
        gopen_schemes[scheme] = _gopen_fsspec
