"""Digests: ``sha256:<hex>`` strings over domain-separated canonical bytes.

A tensor's canonical bytes (docs/format.md §2)::

    "verimesh.tensor.v1" 0x00 | u16be len(name) | name (UTF-8) | u8 len(dtype) | dtype (ASCII)
    | u8 ndim | u64be dim * ndim | data (little-endian, C-contiguous)

A set of named tensors: ``"verimesh.tensor-set.v1" 0x00`` followed by the 32 raw bytes of each
tensor digest, tensors in ascending name order. A file (model, step): SHA-256 of its bytes.

A bundle member's commitment leaf (bundle format 2, docs/format.md §6): BLAKE3 over
``"verimesh.member.v2" 0x00 | u16be len(name) | name (ASCII) | data``. BLAKE3 hashes every byte of
a bundle at several GB/s per core, so a verifier can afford to hash all of them.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from verimesh.errors import InvalidInputError

PREFIX = "sha256:"
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
TENSOR_TAG = b"verimesh.tensor.v1\x00"
TENSOR_SET_TAG = b"verimesh.tensor-set.v1\x00"
MEMBER_TAG = b"verimesh.member.v2\x00"
# Below this many bytes one thread hashes faster than BLAKE3 can fan out.
_BLAKE3_THREADED_BYTES = 1 << 20


def format_digest(raw: bytes) -> str:
    return PREFIX + raw.hex()


def parse_digest(text: object, *, what: str = "digest") -> bytes:
    """The 32 raw bytes of a ``sha256:<64 lowercase hex>`` string."""
    if not isinstance(text, str) or not _DIGEST_RE.match(text):
        raise InvalidInputError(f"{what} must look like sha256:<64 lowercase hex>, got {text!r:.80}")
    return bytes.fromhex(text[len(PREFIX) :])


def sha256_bytes(data: bytes | memoryview) -> str:
    return format_digest(hashlib.sha256(data).digest())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return format_digest(h.digest())


def tensor_header(name: str, dtype: str, shape: tuple[int, ...]) -> bytes:
    name_b = name.encode("utf-8")
    dtype_b = dtype.encode("ascii")
    if len(name_b) > 0xFFFF or len(dtype_b) > 0xFF or len(shape) > 0xFF:
        raise InvalidInputError(f"tensor {name[:40]!r}: name, dtype or rank too long to encode")
    parts = [TENSOR_TAG, struct.pack(">H", len(name_b)), name_b, bytes([len(dtype_b)]), dtype_b]
    parts.append(bytes([len(shape)]))
    parts.extend(struct.pack(">Q", d) for d in shape)
    return b"".join(parts)


def little_endian_c(array: np.ndarray) -> np.ndarray:
    """The array as little-endian C-contiguous data (no copy when it already is)."""
    dt = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    return np.ascontiguousarray(array, dtype=dt)


def tensor_bytes(array: np.ndarray) -> memoryview:
    """The tensor's data as canonical bytes (little-endian, C order), without a copy when possible."""
    arr = little_endian_c(array)
    return memoryview(arr.reshape(-1).view(np.uint8))  # type: ignore[arg-type]  # numpy stubs lack Buffer


def tensor_digest_raw(name: str, array: np.ndarray) -> bytes:
    h = hashlib.sha256(tensor_header(name, array.dtype.name, tuple(int(d) for d in array.shape)))
    h.update(tensor_bytes(array))
    return h.digest()


def tensor_digest(name: str, array: np.ndarray) -> str:
    return format_digest(tensor_digest_raw(name, array))


def tensor_set_digest(digests: Mapping[str, str]) -> str:
    h = hashlib.sha256(TENSOR_SET_TAG)
    for name in sorted(digests):
        h.update(parse_digest(digests[name], what=f"digest of {name!r}"))
    return format_digest(h.digest())


def member_leaf(name: str, data: bytes | memoryview, *, threads: bool = False) -> bytes:
    """The 32-byte commitment leaf of a bundle member (format 2); ``threads``: use every core."""
    import blake3

    name_b = name.encode("ascii")
    size = len(data) if isinstance(data, bytes) else data.nbytes
    many = threads and size >= _BLAKE3_THREADED_BYTES
    h = blake3.blake3(max_threads=blake3.blake3.AUTO if many else 1)
    h.update(MEMBER_TAG + struct.pack(">H", len(name_b)) + name_b)
    h.update(data)
    return bytes(h.digest())


def member_leaf_and_crc(name: str, data: bytes | memoryview) -> tuple[bytes, int]:
    """``member_leaf`` and the member's ZIP CRC-32 in one pass over the bytes."""
    import blake3

    from verimesh.core.container import crc32

    name_b = name.encode("ascii")
    h = blake3.blake3(MEMBER_TAG + struct.pack(">H", len(name_b)) + name_b)
    view = memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data)
    crc, chunk = 0, 1 << 18
    for start in range(0, view.nbytes, chunk):
        part = view[start : start + chunk]
        crc = crc32(part, crc)
        h.update(part)
    return bytes(h.digest()), crc
