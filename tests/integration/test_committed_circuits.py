"""The circuit specs under circuits/ still hold: every pinned file matches, and compiling and
setting up from the committed settings against the committed test SRS reproduces each pinned
verifying key (a change in ezkl or in verimesh that moves a vk digest fails here, naming it)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from verimesh.jobs.circuit import load_circuit

ROOT = Path(__file__).resolve().parents[2]
CIRCUITS = sorted(p.parent for p in (ROOT / "circuits").glob("*/circuit.json"))
pytestmark = pytest.mark.slow


@pytest.fixture()
def fresh_cache(tmp_path: Path) -> Iterator[Path]:
    previous = os.environ.get("VERIMESH_CACHE")
    os.environ["VERIMESH_CACHE"] = str(tmp_path / "cache")
    yield tmp_path / "cache"
    if previous is None:
        os.environ.pop("VERIMESH_CACHE", None)
    else:
        os.environ["VERIMESH_CACHE"] = previous


def test_there_are_committed_circuits() -> None:
    assert {c.name for c in CIRCUITS} >= {"mlp", "mlp-chain"}


@pytest.mark.parametrize("folder", CIRCUITS, ids=lambda p: p.name)
def test_committed_circuit_reproduces_its_verifying_keys(folder: Path, fresh_cache: Path) -> None:
    from verimesh.zk import ezkl_backend as zk

    circuit = load_circuit(folder)
    circuit.check_files()
    srs = circuit.resolve_srs()  # the committed test SRS, found through the recorded relative path
    for step in circuit.steps:
        compiled = zk.compiled_circuit(circuit.path(step.model), circuit.path(step.settings), step.model_digest,
                                       step.settings_digest)  # fmt: skip
        # Raises IntegrityError naming both digests if setup no longer gives the pinned vk.
        pk = zk.proving_key(compiled, srs, circuit.srs_digest, step.vk_digest)
        assert pk.exists() and step.logrows <= circuit.srs_logrows <= 15
