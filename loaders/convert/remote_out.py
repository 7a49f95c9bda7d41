"""Writing a conversion to object storage (``s3://``, ``gs://``, any fsspec URL that can be written).

The conversion runs as ever into a local staging folder, because the lock, the journal and the
resume need a POSIX disk. :class:`RemoteOut` uploads each shard and its index through fsspec as
soon as the journal holds it, checks the upload (the stored size is the local size) and removes
the local copy, so staging holds about one shard; ``skipped.jsonl`` goes up last but one and
``manifest.json`` last of all, so a manifest on the store means the conversion is complete. A
crashed run resumes from the staging journal and uploads again any shard whose stored copy is
missing or of the wrong size. fsspec and its store packages are imported only here, when used.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from loaders.convert.out_dir import JobNames
from loaders.convert.outputs import ConvertReport, finished_report
from loaders.remote import FSSPEC_PACKAGES, WEBDATASET_SCHEMES, url_scheme

STAGING_MARK = ".ecomaug-remote-out"  # in a staging folder: the URL it stages for
_WRITE_CHECK = ".ecomaug-write-check"  # written and removed once per run, before any conversion
_RESUME_HINT = "the shards uploaded so far are kept: run the same command again to resume"


def is_remote(out: str | os.PathLike) -> bool:
    """True when ``out`` is a URL (``s3://bucket/prefix``) rather than a local folder."""
    return url_scheme(os.fspath(out)) is not None


def default_staging(url: str) -> Path:
    """The staging folder used when none is given: ``~/.cache/ecomaug/staging/<hash of url>``
    (``$XDG_CACHE_HOME`` replaces ``~/.cache``), the same for every run into ``url``."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ecomaug" / "staging"
    return root / hashlib.sha256(url.rstrip("/").encode("utf-8")).hexdigest()[:16]


def local_out(out: str | os.PathLike, staging: str | os.PathLike | None) -> tuple[Path, "RemoteOut | None"]:
    """Where a conversion into ``out`` writes locally, and the :class:`RemoteOut` that uploads it:
    ``(Path(out), None)`` for a local folder (which takes no staging), else :func:`open_remote_out`'s.

    Raises:
        ValueError: ``staging`` given with a local ``out``; see :func:`open_remote_out`.
        ImportError: see :func:`open_remote_out`.
    """
    if is_remote(out):
        remote = open_remote_out(os.fspath(out), staging)
        return remote.staging, remote
    if staging is not None:
        raise ValueError(f"--staging is for an object-storage OUT (s3://, gs://), not the local folder {out}")
    return Path(out), None


def open_remote_out(url: str, staging: str | os.PathLike | None = None) -> "RemoteOut":
    """Check ``url`` and prepare its staging folder (made, marked with the URL it stages for).

    Args:
        url: where the shard set goes, e.g. ``s3://bucket/shards``.
        staging: a local folder for the shard being written and the journal (default
            :func:`default_staging`); it must be empty or a staging folder of this same URL.

    Raises:
        ValueError: a scheme fsspec cannot write (``http(s):``, ``pipe:``) or an unknown one, or a
            staging folder that holds something else.
        ImportError: the scheme's fsspec package is missing (names the ``ecomaug`` extra).
    """
    url = url.rstrip("/")
    scheme = url_scheme(url) or ""
    if scheme in WEBDATASET_SCHEMES:
        raise ValueError(f"OUT {url}: {scheme}: can only be read; write to s3://, gs:// or a local folder")
    try:
        from fsspec.core import url_to_fs

        fs, root = url_to_fs(url)
    except ImportError as error:
        package, extra = FSSPEC_PACKAGES.get(scheme, (None, None))
        hint = f"pip install 'ecomaug[{extra}]'" if extra else f"pip install {package or 'fsspec'}"
        raise ImportError(f"writing to {scheme}:// needs {package or 'fsspec'}: {hint}") from error
    except ValueError as error:
        raise ValueError(f"OUT {url}: not a URL fsspec can write to ({error})") from error
    folder = Path(staging) if staging is not None else default_staging(url)
    folder.mkdir(parents=True, exist_ok=True)
    mark = folder / STAGING_MARK
    if mark.exists():
        staged_for = mark.read_text(encoding="utf-8").strip()
        if staged_for != url:
            raise ValueError(f"staging folder {folder} holds a conversion into {staged_for}, not {url}; "
                             f"pick another --staging")
    elif any(folder.iterdir()):
        raise ValueError(f"staging folder {folder} is not empty; use an empty folder for --staging")
    else:
        mark.write_text(url + "\n", encoding="utf-8")
    return RemoteOut(url=url, staging=folder, fs=fs, root=root.rstrip("/"))


@dataclass
class RemoteOut:
    """The bridge from a local staging folder to the object store: ``staging/<path>`` is
    uploaded to ``url/<path>`` (so ``staging/val`` goes to ``url/val``)."""

    url: str
    staging: Path
    fs: Any  # an fsspec AbstractFileSystem
    root: str  # ``url`` as a path inside ``fs`` (``bucket/prefix``)

    def url_of(self, local: Path) -> str:
        """The URL where the staging file or folder ``local`` goes."""
        return self._beneath(self.url, local)

    def _path_of(self, local: Path) -> str:
        """The same place as a path inside :attr:`fs`."""
        return self._beneath(self.root, local)

    def _beneath(self, top: str, local: Path) -> str:
        relative = Path(local).relative_to(self.staging).as_posix()
        return top if relative == "." else f"{top}/{relative}"

    def _error(self, error: BaseException, doing: str, hint: str = "") -> ValueError:
        """A store's own exception (credentials, permission, a missing bucket) as one line."""
        text = str(error).strip()
        detail = f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__
        return ValueError(f"{self.url}: cannot {doing} the object store ({detail})" + (f"; {hint}" if hint else ""))

    def _listing(self, folder: Path) -> dict[str, int]:
        """Name -> size of the files stored at ``folder``'s URL (none when nothing is there)."""
        path = self._path_of(folder)
        try:
            self.fs.invalidate_cache(path)
            entries = self.fs.ls(path, detail=True)
        except FileNotFoundError:
            return {}
        except Exception as error:  # noqa: BLE001 -- the store's own exception types
            raise self._error(error, "list") from error
        return {entry["name"].rstrip("/").rsplit("/", 1)[-1]: int(entry.get("size") or 0)
                for entry in entries if entry.get("type") == "file"}

    def finished_report(self, names: JobNames, fingerprint: dict[str, Any], inputs: int,
                        started: float) -> ConvertReport | None:
        """The report of this job if its manifest is on the store (checked against this run's
        input and options as for a local OUT), else None. A manifest left in staging by a crash
        before its upload is removed: the journal writes it again."""
        if names.manifest.name not in self._listing(names.manifest.parent):
            names.manifest.unlink(missing_ok=True)
            return None
        names.manifest.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.fs.get_file(self._path_of(names.manifest), str(names.manifest))
        except Exception as error:  # noqa: BLE001
            raise self._error(error, "read from") from error
        try:
            return finished_report(names, fingerprint, inputs, started)
        except ValueError as error:  # name the stored manifest, not its copy in staging
            raise ValueError(str(error).replace(str(names.manifest), self.url_of(names.manifest))) from None
        finally:
            names.manifest.unlink(missing_ok=True)

    def sibling_manifests(self, names: JobNames) -> list[str]:
        """The URLs of the other jobs' ``manifest*.json`` next to where this job's goes."""
        listing = self._listing(names.manifest.parent)
        return [self.url_of(names.manifest.parent / name) for name in sorted(listing)
                if name.startswith("manifest") and name.endswith(".json") and name != names.manifest.name]

    def start(self, names: JobNames, entries: list[dict[str, Any]]) -> None:
        """Before converting: check that the store takes a write, refuse shards there that the
        journal does not know, and upload again each journaled shard whose stored copy is
        missing or of the wrong size (a crash during or before its upload).

        Raises:
            ValueError: the store refuses (credentials, permission, no such bucket), holds
                shards of another run, or lost a shard whose staging copy is already gone.
        """
        folder = names.manifest.parent
        check = self._path_of(folder / _WRITE_CHECK)
        try:
            self.fs.pipe_file(check, b"")
        except Exception as error:  # noqa: BLE001
            raise self._error(error, "write to") from error
        try:
            self.fs.rm_file(check)
        except Exception:  # noqa: BLE001 -- a store that allows writes but not deletes keeps an empty file
            pass
        listing = self._listing(folder)
        journaled = [(entry["shard"][kind], entry["shard"]["bytes"] if kind == "tar" else None)
                     for entry in entries if entry.get("shard") for kind in ("index", "tar")]
        known = {name for name, _ in journaled}
        strays = sorted(name for name in listing if names.shard_pattern.match(name)
                        and not name.startswith(".") and name not in known)
        if strays:
            raise ValueError(f"{self.url_of(folder)} already holds shards named {names.prefix}-*.tar that this "
                             f"run's journal does not know ({strays[0]}, ...: another run, or one whose staging "
                             f"folder {self.staging} was lost); use an empty OUT or another --prefix")
        for name, size in journaled:
            local = folder / name
            if local.exists():
                if listing.get(name) == local.stat().st_size:
                    local.unlink()  # uploaded before the crash, not yet removed
                else:
                    self._upload(local)
            elif name not in listing or (size is not None and listing[name] != size):
                raise ValueError(f"{self.url_of(local)} was uploaded and removed from staging, but the store no "
                                 f"longer holds it whole; convert again into an empty OUT")

    def shard_closed(self, folder: Path, shard: dict[str, Any]) -> None:
        """Upload a shard the journal now holds (index, then tar) and remove its local copy."""
        for name in (shard["index"], shard["tar"]):
            self._upload(folder / name)

    def outputs_written(self, names: JobNames) -> None:
        """Upload ``skipped.jsonl``, then ``manifest.json``, the mark of completion."""
        for local in (names.skipped, names.manifest):
            self._upload(local)

    def _upload(self, local: Path) -> None:
        """Put ``local`` on the store, check the stored size, then remove the local copy."""
        remote = self._path_of(local)
        size = local.stat().st_size
        try:
            self.fs.put_file(str(local), remote)
            self.fs.invalidate_cache(remote)
            stored = int(self.fs.info(remote).get("size") or 0)
        except Exception as error:  # noqa: BLE001
            raise self._error(error, "write to", _RESUME_HINT) from error
        if stored != size:
            raise ValueError(f"{self.url_of(local)}: the store holds {stored} bytes after the upload of "
                             f"{size}; {_RESUME_HINT}")
        local.unlink()

    def published(self, report: ConvertReport) -> ConvertReport:
        """``report`` naming the store's URLs instead of staging; the emptied staging folder is
        removed (not while another job of the same OUT still uses it)."""
        self._remove_staging()
        return self._named_remotely(report)

    def _named_remotely(self, report: ConvertReport) -> ConvertReport:
        val = self._named_remotely(report.val) if report.val is not None else None
        return replace(report, out_dir=self.url_of(report.out_dir),
                       manifest_path=self.url_of(report.manifest_path), val=val)

    def _remove_staging(self) -> None:
        for folder in sorted((path for path in self.staging.rglob("*") if path.is_dir()), reverse=True):
            try:
                folder.rmdir()
            except OSError:  # not empty
                pass
        if [path.name for path in self.staging.iterdir()] == [STAGING_MARK]:
            (self.staging / STAGING_MARK).unlink(missing_ok=True)
            try:
                self.staging.rmdir()
            except OSError:
                pass
