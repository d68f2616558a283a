"""Packed uploads: byte planes, then deflate, for what a node sends a coordinator (docs/format.md §15).

A bundle is a STORED container (core/container.py: nothing in it decompresses), and most of its
bytes are float32 tensors, whose four byte planes compress far better apart than interleaved
(a whole ResNet-50 bundle: 65% of its size with planes split, 70% without; but sparse ReLU
outputs can do better interleaved; ISA-L deflate level 1 is about 0.2 s for 27 MB). So a node may
send any upload packed, and ``pack`` tries both::

    "VMZ1" || width (1 byte: 1, 2, 4 or 8) || length (8 bytes, big-endian) || zlib stream

where the stream inflates to the upload padded with zero bytes to a multiple of ``width``,
rearranged so that byte j of every ``width``-byte word comes before byte j + 1 of any. ``unpack``
gives back exactly the upload, or refuses: a wrong magic or width, a length over the caller's
limit (checked before anything is inflated), a stream that inflates to more or less than it must,
bytes after it, nonzero padding. A packed upload is never what is signed, stored or verified: the
receiver unpacks it first and everything after reads the upload itself, so packing changes
bytes on the wire and nothing else.
"""

from __future__ import annotations

import zlib

import numpy as np

from verimesh.errors import InvalidInputError

try:  # ISA-L's deflate: zlib's format, several times faster
    from isal import isal_zlib as _zlib
except ImportError:  # pragma: no cover - isal is a dependency; zlib is the portable fallback
    import zlib as _zlib  # type: ignore[no-redef]

_ERRORS: tuple[type[BaseException], ...] = (zlib.error, ValueError, getattr(_zlib, "error", zlib.error))
MAGIC = b"VMZ1"
NAME = "vmz1"  # how a coordinator lists this packing among the uploads it takes (GET /v1/info)
# A packed upload inflates to at most this many times its own size: a deflate stream can reach
# ~1000x, which would let a 1 MB request cost the receiver a gigabyte. Real tensors stay far
# below it (fp32 activations: under 2x); an upload that packs better than this travels as it is.
MAX_RATIO = 32
_HEADER = len(MAGIC) + 1 + 8
WIDTHS = (1, 2, 4, 8)


def is_packed(data: bytes) -> bool:
    return data[: len(MAGIC)] == MAGIC


def _planes(data: bytes, width: int) -> bytes:
    return np.frombuffer(data, np.uint8).reshape(-1, width).T.tobytes()


def _words(data: bytes, width: int) -> bytes:
    return np.frombuffer(data, np.uint8).reshape(width, -1).T.tobytes()


def pack(data: bytes, *, widths: tuple[int, ...] = (1, 4), level: int = 1) -> bytes:
    """``data`` packed: deflated as it is (width 1) or by byte planes, whichever is smaller;
    ``unpack`` gives it back. ``level``: 0 to 3 (ISA-L's levels)."""
    if not 0 <= level <= 3:
        raise ValueError("level must be 0 to 3")
    best = b""
    for width in widths:
        if width not in WIDTHS:
            raise ValueError(f"width must be one of {WIDTHS}")
        padded = data + bytes(-len(data) % width)
        packed = MAGIC + bytes([width]) + len(data).to_bytes(8, "big") + _zlib.compress(_planes(padded, width), level)
        if not best or len(packed) < len(best):
            best = packed
    return best


def worth_packing(data: bytes, packed: bytes) -> bool:
    """Whether to send ``packed`` instead of ``data``: smaller, and within what ``unpack`` takes."""
    return len(packed) < len(data) <= MAX_RATIO * len(packed)


def unpack(data: bytes, *, limit: int, what: str = "upload") -> bytes:
    """The upload ``data`` packs; InvalidInputError (code ``bad-packing``, or ``too-large`` over
    ``limit`` bytes) for anything that is not exactly one packed upload, or one that would
    inflate to more than MAX_RATIO times its size."""
    if len(data) < _HEADER or not is_packed(data):
        raise InvalidInputError(f"{what} is not a packed upload (VMZ1)", code="bad-packing")
    width, length = data[len(MAGIC)], int.from_bytes(data[len(MAGIC) + 1 : _HEADER], "big")
    if width not in WIDTHS:
        raise InvalidInputError(f"{what}: packing width {width} is not one of {WIDTHS}", code="bad-packing")
    if length > limit:
        raise InvalidInputError(f"{what} unpacks to {length} bytes, over the {limit} byte limit", code="too-large")
    if length > MAX_RATIO * len(data):
        raise InvalidInputError(f"{what} would inflate {length // len(data)}x, over {MAX_RATIO}x: send it as it is",
                                code="bad-packing")  # fmt: skip
    padded = length + (-length % width)
    inflater = _zlib.decompressobj()
    try:
        out = inflater.decompress(data[_HEADER:], padded + 1)
    except _ERRORS as exc:
        raise InvalidInputError(f"{what}: the packed stream is corrupt ({exc})", code="bad-packing") from exc
    if len(out) != padded or not inflater.eof or inflater.unused_data or inflater.unconsumed_tail:
        raise InvalidInputError(f"{what}: the packed stream is not exactly {length} bytes", code="bad-packing")
    words = out if width == 1 else _words(out, width)
    if padded == length:
        return words
    if any(words[length:]):
        raise InvalidInputError(f"{what}: the packing's padding is not zero", code="bad-packing")
    return words[:length]
