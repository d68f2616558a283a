"""Conformance with the shared RFC 9162 vectors (transparency-dev/merkle testdata)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from verimesh.core import merkle

VECTORS = Path(__file__).resolve().parents[2].parent / "shared" / "vectors" / "rfc9162"

if not VECTORS.is_dir():  # never the case in CI, where ../shared sits beside the clone
    pytest.skip(f"RFC 9162 vectors not found at {VECTORS}", allow_module_level=True)


def _b64(value: str | None) -> bytes:
    return base64.b64decode(value) if value else b""


def _cases(kind: str) -> list[Path]:
    return sorted((VECTORS / kind).rglob("*.json"))


@pytest.mark.parametrize("path", _cases("inclusion"), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_inclusion_vector(path: Path) -> None:
    case = json.loads(path.read_text())
    proof = [_b64(p) for p in case.get("proof") or []]
    ok = merkle.verify_inclusion(_b64(case["leafHash"]), case["leafIdx"], case["treeSize"], proof, _b64(case["root"]))
    assert ok is (not case["wantErr"]), case["desc"]


@pytest.mark.parametrize("path", _cases("consistency"), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_consistency_vector(path: Path) -> None:
    case = json.loads(path.read_text())
    proof = [_b64(p) for p in case.get("proof") or []]
    ok = merkle.verify_consistency(case["size1"], case["size2"], _b64(case["root1"]), _b64(case["root2"]), proof)
    assert ok is (not case["wantErr"]), case["desc"]


def test_vectors_present() -> None:
    assert len(_cases("inclusion")) > 20 and len(_cases("consistency")) > 20
