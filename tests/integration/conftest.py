"""Fixtures of the integration tests: a live mesh (tests/integration/mesh_harness.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.mesh_harness import Mesh


@pytest.fixture()
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    """A coordinator on a free loopback port, killed (with its nodes) after the test."""
    m = Mesh(tmp_path)
    try:
        yield m
    finally:
        m.close()
