"""Flipping any byte of a bundle, truncating it or appending to it is never accepted and never
raises: the verifier always answers with a verdict."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Keys
from verimesh.jobs.job import Job
from verimesh.workflows import prove, verify

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def honest(jobs: dict[str, Job], keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> tuple[Job, bytes]:
    job = jobs["mlp"]
    path = tmp_path_factory.mktemp("fuzz") / "honest.vmb"
    prove(job, key=keys.node, out=path, device="cpu")
    data = path.read_bytes()
    assert verify(path, job=job, node_key=keys.node.public, samples="all").status == "accept"
    return job, data


def _verdict_for(data: bytes, job: Job, keys: Keys, tmp_path: Path) -> str:
    path = tmp_path / "mutant.vmb"
    path.write_bytes(data)
    return verify(path, job=job, node_key=keys.node.public, samples="all", evidence_out=tmp_path / "ev.vme").status


@SETTINGS
@given(data=st.data())
def test_any_flipped_byte_is_refused(
    data: st.DataObject, honest: tuple[Job, bytes], keys: Keys, tmp_path: Path
) -> None:
    job, raw = honest
    index = data.draw(st.integers(0, len(raw) - 1), label="offset")
    mask = data.draw(st.integers(1, 255), label="xor")
    mutant = bytearray(raw)
    mutant[index] ^= mask
    assert _verdict_for(bytes(mutant), job, keys, tmp_path) != "accept"


def test_every_single_bit_flip_in_metadata_is_refused(honest: tuple[Job, bytes], keys: Keys, tmp_path: Path) -> None:
    """Exhaustive over the bytes that are not tensor data: envelope, trace.json and ZIP structure."""
    job, raw = honest
    data_start = raw.index(b"tensors/000000.bin") + len("tensors/000000.bin")
    tail_start = raw.rindex(b"PK\x01\x02", 0)  # central directory onwards
    first_cd = raw.index(b"PK\x01\x02")
    offsets = [*range(0, data_start, 3), *range(first_cd, len(raw))]
    assert tail_start >= first_cd
    for index in offsets:
        mutant = bytearray(raw)
        mutant[index] ^= 0x01
        assert _verdict_for(bytes(mutant), job, keys, tmp_path) != "accept", f"bit flip at {index} accepted"


@SETTINGS
@given(cut=st.integers(min_value=0, max_value=10_000))
def test_truncation_is_refused(cut: int, honest: tuple[Job, bytes], keys: Keys, tmp_path: Path) -> None:
    job, raw = honest
    assert _verdict_for(raw[: cut % len(raw)], job, keys, tmp_path) == "error"


@SETTINGS
@given(garbage=st.binary(min_size=1, max_size=64), front=st.booleans())
def test_appended_or_prepended_garbage_is_refused(
    garbage: bytes, front: bool, honest: tuple[Job, bytes], keys: Keys, tmp_path: Path
) -> None:
    job, raw = honest
    mutant = garbage + raw if front else raw + garbage
    assert _verdict_for(mutant, job, keys, tmp_path) == "error"


@SETTINGS
@given(payload=st.binary(max_size=4096), start=st.integers(0, 0xFFFFFFFF))
def test_container_crc_is_zlibs(payload: bytes, start: int) -> None:
    """The fast CRC (ISA-L) must give zlib's values: any ZIP tool checks them."""
    import zlib

    from verimesh.core import container

    assert container._crc32.__module__ != "zlib"  # the fast one is installed
    assert container._crc32(payload, start) == zlib.crc32(payload, start)


def test_a_bundle_is_a_zip_any_tool_reads(honest: tuple[Job, bytes], tmp_path: Path) -> None:
    import zipfile

    (tmp_path / "b.zip").write_bytes(honest[1])
    with zipfile.ZipFile(tmp_path / "b.zip") as archive:
        assert archive.testzip() is None  # every member's CRC checked by the standard library
        assert archive.namelist()[-2:] == ["trace.json", "envelope.json"]
