"""Session-wide fixtures: keys and jobs are made once per test session and shared."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from verimesh.jobs.job import Job, new_job
from verimesh.signing.keys import SecretKey, generate_key, write_key_pair

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
MODELS = ("mlp", "rescnn", "transformer")


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit and integration tests run with the network cut off: nothing may download."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("network access attempted in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@dataclass(frozen=True)
class Keys:
    node: SecretKey
    other: SecretKey
    node_file: Path
    node_pub: Path
    other_file: Path
    other_pub: Path


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    d = tmp_path_factory.mktemp("keys")
    node, other = generate_key(), generate_key()
    write_key_pair(d / "node.key", node)
    write_key_pair(d / "other.key", other)
    return Keys(node, other, d / "node.key", d / "node.key.pub", d / "other.key", d / "other.key.pub")


def model_path(name: str) -> Path:
    return FIXTURES / f"{name}.onnx"


def input_path(name: str) -> Path:
    return FIXTURES / f"{name}.input.npy"


@pytest.fixture(scope="session")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Job]:
    """One spot job per fixture model, default plan (several steps each)."""
    d = tmp_path_factory.mktemp("jobs")
    return {name: new_job(model_path(name), input_path(name), d / f"{name}.json") for name in MODELS}


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.chdir(tmp_path)
    yield tmp_path


def perturbed(array: np.ndarray, index: int = 0, delta: float = 0.5) -> np.ndarray:
    out = np.array(array, copy=True)
    out.reshape(-1)[index] += np.asarray(delta, dtype=out.dtype)
    return out
