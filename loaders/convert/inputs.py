"""What a conversion reads: a folder tree of images, or a CSV / JSONL / Parquet manifest of paths or URLs.

Each input has an *identity* (its path relative to the folder, or the manifest's path value as
written, or the URL as written) from which its shard key is derived, so keys are stable across runs, jobs and resumes.
The folder walk is the one listing of image files: :func:`list_image_files` (``preview --images``,
``embed`` on a folder) keeps the entries of the same walk that Pillow recognises.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import hashlib
import json
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from loaders.remote import NOT_REGULAR, file_kind

MANIFEST_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
KEY_LENGTH = 20
ITEM_ID_SOURCES = ("column", "parent")  # a manifest's item_id column, or each image's folder name


@dataclass(frozen=True)
class InputItem:
    """One input: its identity (and key), where its bytes are, and its manifest columns.

    ``problem`` says why a folder entry cannot be read as a file (``"FIFO"``, ``"dangling
    symlink"``, ``"symlink loop"``...); such an input is listed so that it is skipped with that
    reason, and inputs = written + skipped still holds.
    """

    identity: str
    path: str
    meta: dict[str, Any]
    problem: str | None = None

    @property
    def key(self) -> str:
        return input_key(self.identity)


@dataclass(frozen=True)
class InputListing:
    """All inputs in a stable order, and the metadata columns a manifest offers."""

    source: Path
    kind: str  # "folder", "csv", "jsonl" or "parquet"
    items: list[InputItem]
    columns: tuple[str, ...]


def input_key(identity: str) -> str:
    """The shard key of an input: the first 20 hex digits of sha1 of its identity.

    A folder file name that is not UTF-8 arrives surrogate-escaped (``os.fsdecode``); its key
    is that of the name's raw bytes, so every other name keeps the key it always had.
    """
    return hashlib.sha1(identity.encode("utf-8", "surrogateescape")).hexdigest()[:KEY_LENGTH]


def entry_problem(path: str | os.PathLike) -> str | None:
    """Why a folder entry is not a readable regular file (None when it is one; a symlink to a
    regular file is one). Nothing is opened, so a FIFO cannot block."""
    try:
        mode = os.stat(path).st_mode  # follows symlinks
    except FileNotFoundError:
        return "dangling symlink" if os.path.islink(path) else "vanished while listing"
    except OSError as error:
        return "symlink loop" if error.errno == errno.ELOOP else f"cannot stat ({error.strerror})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "symlink to a folder (not followed)"
    return file_kind(mode)


def _walk_folder(root: Path) -> list[InputItem]:
    items = []
    for directory, subdirectories, files in os.walk(root):
        # Hidden files and folders (.DS_Store, .git, our own temporaries) are not inputs.
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
        # os.walk lists a symlink to a folder among the folders and does not follow it: an
        # input to skip with its reason, not a silent gap in the counts
        linked = [d for d in subdirectories if os.path.islink(os.path.join(directory, d))]
        subdirectories[:] = [d for d in subdirectories if d not in linked]
        for name in sorted([*files, *linked]):
            if name.startswith("."):
                continue
            path = Path(directory) / name
            identity = path.relative_to(root).as_posix()
            items.append(InputItem(identity=identity, path=str(path), meta={}, problem=entry_problem(path)))
    items.sort(key=lambda item: item.identity)
    return items


def _normalise_meta(row: dict[str, Any]) -> dict[str, Any]:
    if "item_id" in row and row["item_id"] is not None:
        row["item_id"] = str(row["item_id"])
    return row


@dataclass(frozen=True)
class _Column:
    """The manifest column that says where each input is: a path (relative to the manifest) or a URL."""

    name: str
    urls: bool = False

    @property
    def flag(self) -> str:
        return "--url-column" if self.urls else "--path-column"

    def missing(self, where: str, found: Any) -> ValueError:
        kind = "URL" if self.urls else "path"
        return ValueError(f"{where}: no {kind} column '{self.name}' ({found}); pick one with {self.flag}")


def _item_from_row(row: dict[str, Any], column: _Column, base: Path, where: str) -> InputItem:
    value = row.pop(column.name, None)
    if column.urls:  # never joined to a folder: a URL is fetched as written, or skipped
        identity = "" if value is None else str(value)
        return InputItem(identity=identity, path=identity, meta=_normalise_meta(row))
    if value is None or str(value).strip() == "":
        raise ValueError(f"{where}: empty '{column.name}' value")
    identity = str(value)
    path = Path(identity) if os.path.isabs(identity) else base / identity
    return InputItem(identity=identity, path=str(path), meta=_normalise_meta(row))


def _read_csv(path: Path, column: _Column) -> tuple[list[InputItem], tuple[str, ...]]:
    with open(path, newline="", encoding="utf-8-sig") as stream:
        reader = csv.DictReader(stream)
        columns = tuple(reader.fieldnames or ())
        if column.name not in columns:
            raise column.missing(str(path), f"columns: {', '.join(columns) or 'none'}")
        items = []
        for line, row in enumerate(reader, start=2):
            row.pop(None, None)  # cells beyond the header: not a column
            items.append(_item_from_row(dict(row), column, path.parent, f"{path}:{line}"))
    return items, tuple(c for c in columns if c != column.name)


def _read_parquet(path: Path, column: _Column) -> tuple[list[InputItem], tuple[str, ...]]:
    try:
        import pyarrow.parquet
    except ImportError:
        raise ValueError(f"{path}: reading a Parquet manifest needs pyarrow: pip install \"ecomaug[parquet]\"") \
            from None
    try:
        table = pyarrow.parquet.read_table(path)
    except (OSError, pyarrow.ArrowException) as error:
        raise ValueError(f"{path}: not a readable Parquet file ({str(error).splitlines()[0]})") from None
    if column.name not in table.column_names:
        raise column.missing(str(path), f"columns: {', '.join(table.column_names) or 'none'}")
    # A date, a decimal or raw bytes has no JSON form: such a cell goes into <key>.json as its text.
    plain = (str, int, float, bool, list, dict, type(None))
    items = [_item_from_row({k: v if isinstance(v, plain) else str(v) for k, v in row.items()}, column, path.parent,
                            f"{path}: row {number}")
             for number, row in enumerate(table.to_pylist(), start=1)]
    return items, tuple(c for c in table.column_names if c != column.name)


def _read_jsonl(path: Path, column: _Column) -> tuple[list[InputItem], tuple[str, ...]]:
    items: list[InputItem] = []
    columns: dict[str, None] = {}
    with open(path, encoding="utf-8") as stream:
        for line, text in enumerate(stream, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line}: not valid JSON ({error.msg})") from error
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line}: expected a JSON object, got {type(row).__name__}")
            if column.name not in row:
                raise column.missing(f"{path}:{line}", f"keys: {', '.join(row) or 'none'}")
            columns.update(dict.fromkeys(k for k in row if k != column.name))
            items.append(_item_from_row(row, column, path.parent, f"{path}:{line}"))
    return items, tuple(columns)


def _item_id_from_parent(listing: InputListing) -> InputListing:
    """Each input's ``item_id`` from the folder holding it (``shoes/a123/1.jpg`` -> ``a123``);
    inputs directly in the top folder get none."""
    items = []
    for item in listing.items:
        parent = Path(item.identity).parent.name
        meta = {**item.meta, "item_id": parent} if parent else {k: v for k, v in item.meta.items() if k != "item_id"}
        items.append(InputItem(identity=item.identity, path=item.path, meta=meta, problem=item.problem))
    columns = listing.columns if "item_id" in listing.columns else (*listing.columns, "item_id")
    return dataclasses.replace(listing, items=items, columns=columns)


def read_inputs(source: str | os.PathLike, *, path_column: str = "path",
                item_id_from: str = "column", url_column: str | None = None) -> InputListing:
    """List the inputs of a conversion.

    Args:
        source: a folder (walked recursively, hidden entries ignored; every file is a candidate
            and its type is decided later by content) or a ``.csv`` / ``.jsonl`` / ``.parquet``
            manifest with a path column (relative paths are relative to the manifest) and metadata
            columns.
        path_column: the manifest column holding the image path.
        url_column: instead of ``path_column``: the manifest column holding each image's URL
            (kept as written, never joined to a folder; see :mod:`loaders.convert.fetch`).
        item_id_from: ``"column"`` (a manifest's ``item_id`` column, if any) or ``"parent"``
            (each image's folder name, for a folder of one sub-folder per item).

    Returns:
        The inputs: folder files sorted by relative path, manifest rows in file order.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: an empty folder or manifest, an unknown file type, a missing path column,
            an unknown ``item_id_from``, ``url_column`` with a folder or a non-default ``path_column``.
    """
    if item_id_from not in ITEM_ID_SOURCES:
        raise ValueError(f"item_id_from must be one of {ITEM_ID_SOURCES} (got {item_id_from!r})")
    if url_column is not None and path_column != "path":
        raise ValueError("give --url-column or --path-column, not both")
    column = _Column(url_column, urls=True) if url_column is not None else _Column(path_column)
    listing = _read_listing(Path(source), column)
    return _item_id_from_parent(listing) if item_id_from == "parent" else listing


def _read_listing(path: Path, column: _Column) -> InputListing:
    if not path.exists():
        raise FileNotFoundError(2, "No such file or directory", str(path))
    if path.is_dir():
        if column.urls:
            raise ValueError(f"{path}: --url-column needs a manifest of URLs (.csv, .jsonl or .parquet), "
                             f"not a folder")
        items = _walk_folder(path)
        if not items:
            raise ValueError(f"{path}: the input folder holds no files")
        return InputListing(source=path, kind="folder", items=items, columns=())
    if not path.is_file():  # a FIFO would block the read forever
        raise ValueError(f"{path}: INPUT is not a regular file or a folder (a {file_kind(path.stat().st_mode)})")
    kind = MANIFEST_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: INPUT must be a folder or a manifest ending in "
                         f"{', '.join(MANIFEST_SUFFIXES)} (got '{path.suffix or 'no suffix'}')")
    reader = {"csv": _read_csv, "jsonl": _read_jsonl, "parquet": _read_parquet}[kind]
    items, columns = reader(path, column)
    if not items:
        raise ValueError(f"{path}: the manifest lists no inputs")
    return InputListing(source=path, kind=kind, items=items, columns=columns)


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """The image files under ``folder`` (recursive), chosen by content as a conversion would.

    The entries of :func:`read_inputs`' walk (hidden files and folders left out) that are
    regular files whose header Pillow recognises, whatever their names.

    Returns:
        The paths, sorted by their path relative to ``folder``.

    Raises:
        FileNotFoundError: ``folder`` is not a directory.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(2, "No such image directory", str(root))
    found = []
    for item in _walk_folder(root):
        if item.problem is not None:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(item.path):
                    pass
        except Exception:  # not an image (or not readable): not one of the folder's images
            continue
        found.append(Path(item.path))
    return found
