"""Conformance with the RFC 9162 vectors of transparency-dev/merkle (testdata/), carried in tests/vectors/rfc9162.

The vectors are part of the project (see the README.md there for their origin): they are read from this
checkout only, and a missing folder fails collection instead of skipping."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from verimesh.core import merkle

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "rfc9162"


def _b64(value: str | None) -> bytes:
    return base64.b64decode(value) if value else b""


def _cases(kind: str) -> list[Path]:
    folder = VECTORS / kind
    if not folder.is_dir():
        raise FileNotFoundError(f"RFC 9162 vectors missing: {folder} (they are part of the checkout)")
    return sorted(folder.rglob("*.json"))


def _id(path: Path) -> str:
    return path.relative_to(VECTORS).with_suffix("").as_posix()


@pytest.mark.parametrize("path", _cases("inclusion"), ids=_id)
def test_inclusion_vector(path: Path) -> None:
    case = json.loads(path.read_text())
    proof = [_b64(p) for p in case.get("proof") or []]
    ok = merkle.verify_inclusion(_b64(case["leafHash"]), case["leafIdx"], case["treeSize"], proof, _b64(case["root"]))
    assert ok is (not case["wantErr"]), case["desc"]


@pytest.mark.parametrize("path", _cases("consistency"), ids=_id)
def test_consistency_vector(path: Path) -> None:
    case = json.loads(path.read_text())
    proof = [_b64(p) for p in case.get("proof") or []]
    ok = merkle.verify_consistency(case["size1"], case["size2"], _b64(case["root1"]), _b64(case["root2"]), proof)
    assert ok is (not case["wantErr"]), case["desc"]


def test_vectors_present() -> None:
    """The whole upstream copy is here, with its licence and provenance note."""
    assert len(_cases("inclusion")) == 98 and len(_cases("consistency")) == 98
    assert len(_cases("subtreeinclusion")) == 204 and len(_cases("subtreeconsistency")) == 118
    assert (VECTORS / "LICENSE").read_text().lstrip().startswith("Apache License")
    assert "transparency-dev/merkle" in (VECTORS / "README.md").read_text()
