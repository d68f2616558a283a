"""The verimesh container: a strict, canonical subset of ZIP used for bundles and evidence files.

Any ZIP tool can list and extract it, yet every byte of it is determined by its members: entries
are STORED (no compression, so nothing can decompress beyond a limit), timestamps are fixed at
1980-01-01 00:00, there are no extra fields or comments, the central directory mirrors the local
headers exactly and nothing may follow the end record. ``read_container`` checks every field
against that canonical form (docs/format.md §5), so a flipped, inserted or removed byte anywhere
in the file is refused before any member is interpreted.
"""

from __future__ import annotations

import io
import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from verimesh.core.files import open_input
from verimesh.core.threads import map_bytes
from verimesh.errors import InvalidInputError

try:  # ISA-L's CRC-32: the same polynomial and values as zlib's, about 3x faster, GIL released
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # pragma: no cover - isal is a dependency; zlib is the portable fallback
    from zlib import crc32 as _crc32

_LOCAL = struct.Struct("<IHHHHHIIIHH")  # sig, need, flags, method, time, date, crc, csize, usize, nlen, xlen
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_END = struct.Struct("<IHHHHIIH")
_LOCAL_SIG, _CENTRAL_SIG, _END_SIG = 0x04034B50, 0x02014B50, 0x06054B50
_VERSION = 20
_DOS_DATE = (0 << 9) | (1 << 5) | 1  # 1980-01-01
_DOS_TIME = 0
_EXTERNAL_ATTR = 0o100644 << 16
_MADE_BY = (3 << 8) | _VERSION  # unix, 2.0

# Member names: relative, lowercase, no "..", no leading "/", no backslashes, short.
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}(/[a-z0-9][a-z0-9_.-]{0,63}){0,2}$")


@dataclass(frozen=True)
class Limits:
    """Hard bounds applied before anything is read into memory."""

    max_file_bytes: int = 4 * 1024**3 - 1
    max_members: int = 10_000
    max_member_bytes: int = 2 * 1024**3


DEFAULT_LIMITS = Limits()


def _check_name(name: str) -> bytes:
    if not _NAME_RE.match(name) or ".." in name.split("/"):
        raise InvalidInputError(f"member name {name[:80]!r} is not allowed (path escape or bad characters)")
    return name.encode("ascii")


class ContainerWriter:
    """Writes members one at a time (to ``path.partial``, renamed on ``close``)."""

    def __init__(self, path: Path | None) -> None:
        """``path`` None: in memory (``getvalue`` after ``close``)."""
        self._path = path
        self._tmp = path.with_name(path.name + ".partial") if path is not None else None
        self._fh: Any = self._tmp.open("wb") if self._tmp is not None else io.BytesIO()
        self._central: list[bytes] = []
        self._names: set[str] = set()
        self._offset = 0

    def add(self, name: str, data: bytes | memoryview) -> None:
        name_b = _check_name(name)
        if name in self._names:
            raise InvalidInputError(f"duplicate member name {name!r}")
        size = len(data) if isinstance(data, bytes) else data.nbytes
        if size >= 0xFFFFFFFF or self._offset >= 0xFFFFFFFF:
            raise InvalidInputError("container over 4 GiB (ZIP64 is not part of the format)")
        crc = _crc32(data) & 0xFFFFFFFF
        header = _LOCAL.pack(_LOCAL_SIG, _VERSION, 0, 0, _DOS_TIME, _DOS_DATE, crc, size, size, len(name_b), 0)
        self._fh.write(header + name_b)
        self._fh.write(data)
        self._central.append(
            _CENTRAL.pack(
                _CENTRAL_SIG, _MADE_BY, _VERSION, 0, 0, _DOS_TIME, _DOS_DATE, crc, size, size,
                len(name_b), 0, 0, 0, 0, _EXTERNAL_ATTR, self._offset,
            )
            + name_b
        )  # fmt: skip
        self._names.add(name)
        self._offset += len(header) + len(name_b) + size

    def close(self) -> int:
        """Write the central directory and end record, then move the file into place; returns its size."""
        cd = b"".join(self._central)
        n = len(self._central)
        if self._offset + len(cd) >= 0xFFFFFFFF or n > 0xFFFF:
            self.abort()
            raise InvalidInputError("container over 4 GiB or 65535 members")
        self._fh.write(cd)
        self._fh.write(_END.pack(_END_SIG, 0, 0, n, n, len(cd), self._offset, 0))
        total = self._fh.tell()
        if self._tmp is None:
            self._value: bytes = self._fh.getvalue()
        self._fh.close()
        if self._tmp is not None and self._path is not None:
            self._tmp.replace(self._path)
        return int(total)

    def getvalue(self) -> bytes:
        return self._value

    def abort(self) -> None:
        self._fh.close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)


def write_container(path: Path, members: Sequence[tuple[str, bytes | memoryview]]) -> int:
    """Write members in the given order; returns the file size."""
    return _written(ContainerWriter(path), members)


def container_bytes(members: Sequence[tuple[str, bytes | memoryview]]) -> bytes:
    """A container of ``members`` (in order), in memory."""
    writer = ContainerWriter(None)
    _written(writer, members)
    return writer.getvalue()


def _written(writer: ContainerWriter, members: Sequence[tuple[str, bytes | memoryview]]) -> int:
    try:
        for name, data in members:
            writer.add(name, data)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def read_private(path: Path, *, what: str, max_bytes: int) -> bytearray:
    """The file's bytes in memory of this process alone.

    A bundle may sit where its sender can still write (a shared upload folder, a network inbox):
    a shared memory map would let it swap bytes between the moment they are hashed and the moment
    they are compared. Everything is verified from this one private copy."""
    try:
        with open_input(path, what=what) as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > max_bytes:
                raise InvalidInputError(f"{what} {path} is {size} bytes, over the {max_bytes}-byte limit")
            buffer = bytearray(size)
            view, done = memoryview(buffer), 0
            while done < size:  # readinto may return short counts
                n = fh.readinto(view[done:])
                if not n:
                    raise InvalidInputError(f"{what} {path} shrank while it was read")
                done += n
            if fh.read(1):
                raise InvalidInputError(f"{what} {path} grew while it was read")
    except OSError as exc:
        raise InvalidInputError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    if not buffer:
        raise InvalidInputError(f"{what} {path} is empty")
    return buffer


def read_container_file(
    path: Path, *, what: str, limits: Limits = DEFAULT_LIMITS, crcs: dict[str, int] | None = None
) -> dict[str, memoryview]:
    """Parse a container file from a private copy of its bytes (see ``read_private``); ``what``
    names the kind of file ("bundle"), the path is added to messages."""
    data = read_private(path, what=what, max_bytes=limits.max_file_bytes)
    return read_container(data, what=f"{what} {path}", limits=limits, crcs=crcs)


def read_container(
    data: bytes | bytearray, *, what: str, limits: Limits = DEFAULT_LIMITS, crcs: dict[str, int] | None = None
) -> dict[str, memoryview]:
    """Parse a canonical container; returns name -> zero-copy view of the member's bytes.

    ``crcs``: the caller checks the members' CRC-32s itself (``crc_matches``), in the same pass as
    other work over the bytes; they are put here instead of checked."""
    if len(data) > limits.max_file_bytes:
        raise InvalidInputError(f"{what} is over the {limits.max_file_bytes}-byte limit")
    view = memoryview(data).toreadonly()

    def bad(reason: str) -> InvalidInputError:
        return InvalidInputError(f"{what} is corrupt or not a verimesh container: {reason}")

    # 1. End record: fixed size, at the very end, no comment.
    if len(data) < _END.size:
        raise bad("too short")
    sig, disk, cd_disk, n_here, n_total, cd_size, cd_offset, comment = _END.unpack_from(data, len(data) - _END.size)
    if sig != _END_SIG or disk or cd_disk or n_here != n_total or comment:
        raise bad("no canonical end-of-archive record at the end of the file")
    if n_total > limits.max_members:
        raise bad(f"{n_total} members, over the limit of {limits.max_members}")
    if cd_offset + cd_size != len(data) - _END.size:
        raise bad("central directory does not end where the end record begins")
    # 2. Local entries, in order, from offset 0 up to the central directory.
    members: dict[str, memoryview] = {}
    expected_crcs: list[int] = []
    expected_central: list[bytes] = []
    pos = 0
    for _ in range(n_total):
        if pos + _LOCAL.size > cd_offset:
            raise bad("local header runs into the central directory")
        sig, need, flags, method, time_, date, crc, csize, usize, nlen, xlen = _LOCAL.unpack_from(data, pos)
        if sig != _LOCAL_SIG:
            raise bad(f"no local header at offset {pos}")
        if method != 0:
            raise bad("compressed members are not allowed (members must be stored)")
        name_start = pos + _LOCAL.size
        data_start = name_start + nlen
        if data_start > cd_offset:
            raise bad("member name runs into the central directory")
        try:
            name = bytes(view[name_start:data_start]).decode("ascii")
        except UnicodeDecodeError as exc:
            raise bad("member name is not ASCII") from exc
        name_b = _check_name(name)
        if (need, flags, time_, date, xlen) != (_VERSION, 0, _DOS_TIME, _DOS_DATE, 0) or csize != usize:
            raise bad(f"non-canonical local header at offset {pos}")
        if usize > limits.max_member_bytes:
            raise bad(f"a member declares {usize} bytes, over the {limits.max_member_bytes}-byte limit")
        data_end = data_start + usize
        if data_end > cd_offset:
            raise bad("member data runs past the central directory (truncated?)")
        if name in members:
            raise bad(f"duplicate member {name!r}")
        members[name] = view[data_start:data_end]
        expected_crcs.append(crc)
        expected_central.append(
            _CENTRAL.pack(
                _CENTRAL_SIG,
                _MADE_BY,
                _VERSION,
                0,
                0,
                _DOS_TIME,
                _DOS_DATE,
                crc,
                usize,
                usize,
                nlen,
                0,
                0,
                0,
                0,
                _EXTERNAL_ATTR,
                pos,
            )
            + name_b
        )
        pos = data_end
    if pos != cd_offset:
        raise bad("unexpected bytes between the last member and the central directory")
    # 3. The central directory must be exactly the one the local headers imply.
    if view[cd_offset : cd_offset + cd_size] != b"".join(expected_central):
        raise bad("central directory does not match the local headers")
    # 4. CRCs last, in parallel for large containers (the CRC releases the GIL).
    if crcs is not None:
        crcs.update(zip(members, expected_crcs, strict=True))
        return members
    for name, ok in zip(members, _crcs_match(list(members.values()), expected_crcs), strict=True):
        if not ok:
            raise bad(f"CRC mismatch in member {name!r}")
    return members


def crc32(data: bytes | memoryview, value: int = 0) -> int:
    """The ZIP CRC-32 (continuing from ``value``)."""
    return int(_crc32(data, value)) & 0xFFFFFFFF


def _crcs_match(payloads: list[memoryview], crcs: list[int]) -> list[bool]:
    def check(i: int) -> bool:
        return _crc32(payloads[i]) & 0xFFFFFFFF == crcs[i]

    return map_bytes(check, range(len(payloads)), total_bytes=sum(p.nbytes for p in payloads))
