"""Packed uploads (core/packing.py): exactly the upload back, or a one-line refusal, never more
bytes than the limit (a deflate bomb inflates to at most the declared length plus one byte)."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from verimesh.core.packing import MAGIC, MAX_RATIO, WIDTHS, is_packed, pack, unpack, worth_packing
from verimesh.errors import InvalidInputError


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=4096), st.sampled_from(WIDTHS))
def test_unpack_gives_back_exactly_the_upload(data: bytes, width: int) -> None:
    packed = pack(data, widths=(width,))
    assert is_packed(packed)
    if len(data) <= MAX_RATIO * len(packed):
        assert unpack(packed, limit=len(data)) == data
    else:  # packs too well to be taken: sent as it is
        assert not worth_packing(data, packed)
        with pytest.raises(InvalidInputError):
            unpack(packed, limit=len(data))


def test_an_upload_that_inflates_beyond_the_ratio_is_refused_before_inflating() -> None:
    zeros = bytes(10_000_000)
    packed = pack(zeros)
    assert len(zeros) > MAX_RATIO * len(packed) and not worth_packing(zeros, packed)
    with pytest.raises(InvalidInputError, match="inflate"):
        unpack(packed, limit=len(zeros))


def test_pack_keeps_the_smaller_of_interleaved_and_byte_planes() -> None:
    rng = np.random.default_rng(0)
    dense = rng.standard_normal(1 << 16).astype(np.float32).tobytes()
    sparse = np.maximum(rng.standard_normal(1 << 16).astype(np.float32), 0).tobytes()  # ReLU: half zeros
    for data in (dense, sparse):
        sizes = {w: len(pack(data, widths=(w,))) for w in (1, 4)}
        assert len(pack(data)) == min(sizes.values()) < len(data)
    assert len(pack(dense, widths=(4,))) < len(pack(dense, widths=(1,)))  # planes: the exponents compress


def _header(width: int, length: int) -> bytes:
    return MAGIC + bytes([width]) + length.to_bytes(8, "big")


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"PK\x03\x04 a plain bundle", "bad-packing"),
        (MAGIC + b"\x04", "bad-packing"),  # truncated header
        (_header(3, 4) + zlib.compress(b"\x00" * 4), "bad-packing"),  # width 3
        (_header(4, 1 << 40) + zlib.compress(b""), "too-large"),  # over the limit: refused before inflating
        (_header(1, 100) + zlib.compress(b"\x00" * 10_000_000), "bad-packing"),  # inflates past its length
        (_header(1, 1 << 20) + zlib.compress(b"\x00" * (1 << 20)), "bad-packing"),  # a bomb: over the ratio
        (_header(1, 100) + zlib.compress(b"\x00" * 50), "bad-packing"),  # short
        (_header(1, 4) + zlib.compress(b"abcd") + b"trailing", "bad-packing"),
        (_header(1, 4) + zlib.compress(b"abcd")[:-3], "bad-packing"),  # cut
        (_header(4, 3) + zlib.compress(b"abcd"), "bad-packing"),  # padding not zero
        (_header(1, 4) + b"not deflate at all", "bad-packing"),
    ],
)
def test_anything_but_one_packed_upload_is_refused(body: bytes, code: str) -> None:
    with pytest.raises(InvalidInputError) as refused:
        unpack(body, limit=1 << 20)
    assert refused.value.code == code
