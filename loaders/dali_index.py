"""The DALI index of a shard (``{prefix}-{NNNNNN}.idx``): its one reader and writer.

``fn.readers.webdataset(index_paths=...)`` reads one index per tar, the format DALI's
``wds2idx`` writes (version 1.2): a first line ``v1.2 <samples>``, then one line per sample,
in tar order, listing each member as ``<ext> <data offset> <size> <member name>``::

    v1.2 2
    jpg 512 10320 0a1b.jpg json 11264 212 0a1b.json
    jpg 12288 9811 77fe.jpg json 22528 198 77fe.json

The conversion writes it, the manifest reads its count, the shard check reads its samples, and
the DALI backend writes a filtered copy without the corrupt ones: all through this module.
``python -m loaders.dali_index TAR [IDX]`` writes it from :func:`tar_members` (the one reader of
tar headers), right also for GNU long names (``wds2idx`` takes their name block for the data).

An index is only a claim about its tar, and a wrong one changes the data silently (DALI reads
other bytes, a short count drops samples), so :func:`index_problem` compares it with the tar's
own member headers before a loader trusts it: the count on its first line, one key per line,
and every member's name, data offset and size in tar order (a name as GNU tar quotes it under
the C locale, ``caf\\303\\251.jpg``, is the same name). A tar that ends early (truncated)
or breaks part-way is not the index's fault: the members it still lists must match, and what is
missing is the loaders' to skip and count.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable, Sequence

from loaders.remote import open_regular_file

VERSION = "v1.2"
HEAD_BYTES = 64  # the first line ("v1.2 <count>") fits in this
BLOCK = 512  # tar's block: every header and every member's data starts on one
MAX_HEADER_DATA = 1 << 20  # a pax header or GNU long name larger than this: the tar is broken there


class IndexSyntaxError(ValueError):
    """An index line that cannot be parsed (e.g. ``wds2idx``'s line of a key with a space)."""


@dataclass(frozen=True)
class Member:
    """One tar member of a sample: its extension, where its data starts, its size, its name."""

    ext: str
    offset: int
    size: int
    name: str

    @property
    def end(self) -> int:
        return self.offset + self.size


@dataclass(frozen=True)
class IndexSample:
    """One sample line of an index: the line itself, the sample key and its members by extension.

    ``members`` holds the first member of each extension; ``repeated`` the later ones (the key
    written twice in a row: ``wds2idx`` puts both copies on one line, and the first is read).
    """

    line: str
    key: str
    members: dict[str, Member]
    repeated: tuple[Member, ...] = ()

    def member(self, *extensions: str) -> Member | None:
        """The first member with one of ``extensions`` (``"jpg", "jpeg"``), or None."""
        return next((self.members[ext] for ext in extensions if ext in self.members), None)

    @property
    def end(self) -> int:
        """The byte just past this sample's last member data (0 for a line with no member)."""
        return max((member.end for member in self.members.values()), default=0)

    @property
    def listed(self) -> list[Member]:
        """Every member on the line, repeats included, in tar order."""
        return sorted([*self.members.values(), *self.repeated], key=lambda member: member.offset)

    @property
    def first_copy_line(self) -> str:
        """The line without the repeated members (the line itself when nothing repeats)."""
        return sample_line(sorted(self.members.values(), key=lambda m: m.offset)) if self.repeated else self.line


def sample_line(members: Sequence[Member]) -> str:
    """The index line of one sample, members in tar order."""
    return " ".join(f"{m.ext} {m.offset} {m.size} {m.name}" for m in members)


def index_text(lines: Sequence[str]) -> str:
    """The whole index of a shard holding these sample lines: byte for byte what ``wds2idx`` writes."""
    return "".join([f"{VERSION} {len(lines)}\n", *(line + "\n" for line in lines)])


def write_index(path: str | os.PathLike, lines: Sequence[str], *, fsync: bool = False) -> Path:
    """Write an index of ``lines`` to ``path`` (UTF-8; ASCII for ecomaug's keys); ``fsync`` if asked."""
    path = Path(path)
    with open(path, "w", encoding="utf-8") as stream:
        stream.write(index_text(lines))
        if fsync:
            stream.flush()
            os.fsync(stream.fileno())
    return path


def parse_count(head: bytes, where: str) -> int:
    """The sample count on an index's first line (``v1.2 <count>``, or a bare count in old versions).

    Raises:
        ValueError: naming ``where``: empty, or not a DALI index.
    """
    first = head.split(b"\n", 1)[0].decode("ascii", "replace").split()
    if not first:
        raise ValueError(f"{where}: empty DALI index file")
    try:
        return int(first[-1]) if first[0].startswith("v") else int(first[0])
    except ValueError:
        raise ValueError(f"{where}: not a DALI index (its first line is {' '.join(first)[:40]!r})") from None


def parse_line(line: str) -> IndexSample | None:
    """One sample line -> :class:`IndexSample` (None for a blank line).

    The key is webdataset's: the member name without folders, up to its first dot.

    Raises:
        ValueError: not groups of ``<ext> <offset> <size> <name>`` with whole numbers >= 0.
    """
    fields = line.split()
    if not fields:
        return None
    if len(fields) % 4:
        raise ValueError(f"{len(fields)} fields, not groups of '<ext> <offset> <size> <name>' "
                         f"(a member name with a space, which this format cannot hold?)")
    members: dict[str, Member] = {}
    repeated = []
    for i in range(0, len(fields), 4):
        if not (fields[i + 1].isdigit() and fields[i + 2].isdigit()):
            raise ValueError(f"{fields[i + 3]}: offset {fields[i + 1]!r} and size {fields[i + 2]!r} "
                             f"must be whole numbers")
        member = Member(fields[i], int(fields[i + 1]), int(fields[i + 2]), fields[i + 3])
        if member.ext in members:
            repeated.append(member)
        else:
            members[member.ext] = member
    return IndexSample(line=line, key=member_key(fields[3]), members=members, repeated=tuple(repeated))


def member_key(name: str) -> str:
    """A member's sample key as DALI and webdataset name it: no folders, up to the first dot."""
    return name.rsplit("/", 1)[-1].split(".", 1)[0]


def read_index(path: str | os.PathLike) -> tuple[int, list[IndexSample]]:
    """The count on a local index's first line and every sample it lists, in tar order.

    Raises:
        IndexSyntaxError: naming the file and line: a line that is not a DALI index line.
        ValueError: naming the file: not a DALI index, or not a regular file.
    """
    where = os.fspath(path)
    with open_regular_file(path) as stream:
        lines = stream.read().decode("utf-8", "replace").splitlines()
    declared = parse_count((lines[0] if lines else "").encode(), where)
    samples = []
    for number, line in enumerate(lines[1:], 2):
        try:
            sample = parse_line(line)
        except ValueError as error:
            raise IndexSyntaxError(f"{where}: line {number} is not a DALI index line ({error})") from None
        if sample is not None:
            samples.append(sample)
    return declared, samples


def read_samples(path: str | os.PathLike) -> list[IndexSample]:
    """Every sample of a local index file, in tar order."""
    return read_index(path)[1]


def split_inside(samples: Iterable[IndexSample], tar_size: int) -> tuple[list[IndexSample], list[IndexSample]]:
    """The samples whose members all lie inside a tar of ``tar_size`` bytes, and the rest
    (DALI would read past the end of a truncated shard)."""
    inside, beyond = [], []
    for sample in samples:
        (inside if sample.end <= tar_size else beyond).append(sample)
    return inside, beyond


# ----------------------------------------------------------------------------- index against tar
def _split_name(name: str) -> tuple[str, str]:
    """A member name as ``wds2idx`` splits it: the path up to the first dot of the file name, and
    the rest (it leaves out members whose first part is empty or a folder: hidden files)."""
    dot = name.find(".", name.rfind("/") + 1)
    return name[:dot], name[dot + 1:]


def _number(field: bytes) -> int:
    """A tar header's numeric field: octal digits, or GNU's base-256 for large values."""
    if field[:1] and field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    digits = field.strip(b"\0 ")
    return int(digits, 8) if digits else 0


def _pax_records(payload: bytes) -> dict[bytes, bytes]:
    """The ``"<length> <key>=<value>\\n"`` records of a pax header; ValueError for a garbage one."""
    records, position = {}, 0
    while position < len(payload) and payload[position:].strip(b"\0"):
        space = payload.find(b" ", position)
        length = payload[position:space] if space > position else b""
        if not length.isdigit() or int(length) <= space - position + 1 or position + int(length) > len(payload):
            raise ValueError("not a pax record")
        end = position + int(length)
        if payload[end - 1:end] != b"\n":
            raise ValueError("not a pax record")
        key, _, value = payload[space + 1:end - 1].partition(b"=")
        records[key] = value
        position = end
    return records


def tar_members(stream: IO[bytes], start: int = 0, limit: int | None = None) -> tuple[list[Member], str]:
    """The members of a tar that ``wds2idx`` would index, from their 512-byte headers alone (pax
    and GNU long names followed; ~10x faster than :mod:`tarfile`), and how the listing ended:
    ``"end"`` (the end-of-archive block), ``"truncated"`` (the file stops inside a header or a
    member), ``"broken"`` (a block that is not a tar header, a garbage pax record, a pax header
    or long name over :data:`MAX_HEADER_DATA` bytes) or ``"limit"`` (``limit`` members listed).
    ``start``: the byte of the header to start at (a header inside the tar: a spot check)."""
    members: list[Member] = []
    position, long_name, long_size = start, None, None
    while limit is None or len(members) < limit:
        stream.seek(position)
        header = stream.read(BLOCK)
        if len(header) < BLOCK:
            return members, "truncated"
        if not header.strip(b"\0"):
            return members, "end"
        try:
            size, checksum = _number(header[124:136]), _number(header[148:156])
        except ValueError:
            return members, "broken"
        if checksum != sum(header[:148]) + 8 * 32 + sum(header[156:]):
            return members, "broken"
        kind, data = header[156:157], position + BLOCK
        if kind in (b"x", b"g", b"L", b"K") and size > MAX_HEADER_DATA:
            return members, "broken"
        if kind in (b"x", b"L"):  # the next member's name: a pax header or a GNU long name
            stream.seek(data)
            payload = stream.read(size)
            if kind == b"L":
                long_name = payload.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            else:
                try:
                    records = _pax_records(payload)
                    long_size = int(records[b"size"]) if b"size" in records else long_size
                except ValueError:
                    return members, "broken"
                if b"path" in records:
                    long_name = records[b"path"].decode("utf-8", "surrogateescape")
        elif kind not in (b"g", b"K"):  # a global pax header, a GNU long link name: not names
            size = size if long_size is None else long_size
            name = long_name or header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if long_name is None and header[257:262] == b"ustar" and header[345:346] != b"\0":
                name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape") + "/" + name
            basename, extension = _split_name(name)
            if kind in (b"0", b"\0", b"7") and basename and not basename.endswith("/"):
                members.append(Member(extension, data, size, name))
            long_name, long_size = None, None
        position = data + -(-size // BLOCK) * BLOCK
    return members, "limit"


def sample_groups(members: Iterable[Member]) -> list[list[Member]]:
    """Members grouped into samples as ``wds2idx`` groups them: consecutive members sharing the
    path up to the file name's first dot (a key written twice in a row is one sample)."""
    groups: list[list[Member]] = []
    previous = None
    for member in members:
        basename = _split_name(member.name)[0]
        if groups and basename == previous:
            groups[-1].append(member)
        else:
            groups.append([member])
        previous = basename
    return groups


_ESCAPES = {b"a": b"\a", b"b": b"\b", b"f": b"\f", b"n": b"\n", b"r": b"\r", b"t": b"\t", b"v": b"\v"}


def _unescaped(match: re.Match[bytes]) -> bytes:
    code = match.group(1)
    return bytes([int(code, 8) & 0xFF]) if len(code) == 3 else _ESCAPES.get(code, code)


def unquote_name(name: str) -> str:
    """A member name as GNU tar's ``escape`` quoting writes it (``wds2idx`` lists members with
    GNU tar: ``caf\\303\\251.jpg`` under the C locale, ``a\\\\b.jpg`` always), decoded."""
    if "\\" not in name:
        return name
    raw = re.sub(rb"\\([0-7]{3}|.)", _unescaped, name.encode("utf-8", "surrogateescape"), flags=re.DOTALL)
    return raw.decode("utf-8", "surrogateescape")


def _line_problem(samples: Sequence[IndexSample]) -> str | None:
    """What is wrong within the index's lines themselves: keys shared or split across lines."""
    previous = None
    for number, sample in enumerate(samples, 2):
        keys = {_split_name(member.name)[0] for member in sample.listed}
        if len(keys) > 1:
            return f"line {number} mixes the members of {len(keys)} keys ({', '.join(sorted(keys))})"
        if previous is not None and keys == previous:
            return f"lines {number - 1} and {number} hold the same key {sample.key!r} (wds2idx writes one line per key)"
        previous = keys
    return None


def index_problem(declared: int, samples: Sequence[IndexSample], members: Sequence[Member],
                  ending: str) -> str | None:
    """What is wrong with an index against its tar's :func:`tar_members`, or None.

    Args:
        declared: the count on the index's first line.
        samples: the index's sample lines.
        members: the tar's members, in tar order.
        ending: how the tar's listing ended (see :func:`tar_members`).

    Returns:
        One phrase naming the first disagreement, or None when the index describes the tar
        (or the part of it that a truncated or broken tar still holds).
    """
    if declared != len(samples):
        return f"its first line says {declared} samples but it lists {len(samples)}"
    problem = _line_problem(samples)
    if problem is not None:
        return problem
    listed = [member for sample in samples for member in sample.listed]
    for number, (found, claimed) in enumerate(zip(members, listed), 1):
        same_name = found.name in (claimed.name, unquote_name(claimed.name))
        if (found.offset, found.size) != (claimed.offset, claimed.size) or not same_name:
            return (f"the tar's member {number} is {found.name} ({found.size} bytes at byte {found.offset}) "
                    f"but the index lists {claimed.name} ({claimed.size} bytes at byte {claimed.offset})")
    if len(members) > len(listed):
        return (f"the tar holds {len(members) - len(listed)} member(s) after the last one it lists "
                f"(the first is {members[len(listed)].name})")
    if len(members) < len(listed) and ending == "end":
        return (f"it lists {len(listed) - len(members)} member(s) after the tar's last one "
                f"(the first is {listed[len(members)].name})")
    return None


def check_index(tar: str | os.PathLike, index: str | os.PathLike) -> int:
    """Check a local shard's index against the tar's member headers; return its sample count.

    Raises:
        IndexSyntaxError: naming the index and line: a line that cannot be parsed.
        ValueError: one line naming the index, what disagrees, and how to rebuild it.
    """
    declared, samples = read_index(index)
    with open_regular_file(tar) as stream:
        members, ending = tar_members(stream)
    problem = index_problem(declared, samples, members, ending)
    if problem is not None:
        raise ValueError(f"{os.fspath(index)} does not match its shard {os.fspath(tar)}: {problem}; "
                         f"rebuild it with `python -m loaders.dali_index {os.fspath(tar)} {os.fspath(index)}`")
    return len(samples)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m loaders.dali_index TAR [IDX]``: write a local tar's index (``IDX``: ``TAR``
    with ``.idx``); 2 with one line on stderr when the tar cannot be read to its end."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) not in (1, 2):
        print("usage: python -m loaders.dali_index TAR [IDX]", file=sys.stderr)
        return 2
    try:
        with open_regular_file(args[0]) as stream:
            members, ending = tar_members(stream)
        if ending != "end":
            raise ValueError(f"{args[0]}: the tar is {ending} after {len(members)} member(s); no index written")
        write_index(args[1] if len(args) == 2 else Path(args[0]).with_suffix(".idx"),
                    [sample_line(group) for group in sample_groups(members)])
    except (OSError, ValueError) as error:
        print(f"Error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
