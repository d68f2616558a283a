"""Circuit specs: what a job owner pins for zero-knowledge mode (docs/design.md §5, docs/format.md §11).

A circuit folder holds ``circuit.json`` (canonical JSON) and, per step, the step model, its
calibrated ezkl settings and its verifying key. A circuit's identity is the digest of
``circuit.json``, which pins every file beside it and the SRS (path and digest); generated
artefacts (compiled circuits, proving keys) live in the content-addressed cache, never here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from verimesh.core.canonical import canonical_json, parse_canonical_json
from verimesh.core.digest import parse_digest, sha256_bytes, sha256_file
from verimesh.core.files import read_user_file
from verimesh.errors import IntegrityError, InvalidInputError

CIRCUIT_TYPE = "verimesh/circuit"
VISIBILITIES = ("public", "hashed")


@dataclass(frozen=True)
class CircuitStep:
    index: int
    model: str
    model_digest: str
    settings: str
    settings_digest: str
    vk: str
    vk_digest: str
    logrows: int
    input_visibility: str
    output_visibility: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    input_scales: tuple[int, ...]
    output_scales: tuple[int, ...]
    input_shapes: tuple[tuple[int, ...], ...]
    output_shapes: tuple[tuple[int, ...], ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "model": self.model,
            "model_digest": self.model_digest,
            "settings": self.settings,
            "settings_digest": self.settings_digest,
            "vk": self.vk,
            "vk_digest": self.vk_digest,
            "logrows": self.logrows,
            "input_visibility": self.input_visibility,
            "output_visibility": self.output_visibility,
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
            "input_scales": list(self.input_scales),
            "output_scales": list(self.output_scales),
            "input_shapes": [list(s) for s in self.input_shapes],
            "output_shapes": [list(s) for s in self.output_shapes],
        }

    @classmethod
    def from_json(cls, doc: Any, index: int) -> CircuitStep:
        try:
            step = cls(
                index=doc["index"],
                model=_file(doc["model"]),
                model_digest=doc["model_digest"],
                settings=_file(doc["settings"]),
                settings_digest=doc["settings_digest"],
                vk=_file(doc["vk"]),
                vk_digest=doc["vk_digest"],
                logrows=int(doc["logrows"]),
                input_visibility=doc["input_visibility"],
                output_visibility=doc["output_visibility"],
                inputs=tuple(doc["inputs"]),
                outputs=tuple(doc["outputs"]),
                input_scales=tuple(int(s) for s in doc["input_scales"]),
                output_scales=tuple(int(s) for s in doc["output_scales"]),
                input_shapes=tuple(tuple(int(d) for d in s) for s in doc["input_shapes"]),
                output_shapes=tuple(tuple(int(d) for d in s) for s in doc["output_shapes"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInputError(f"circuit step {index} is malformed ({exc})") from exc
        if (
            step.index != index
            or step.input_visibility not in VISIBILITIES
            or step.output_visibility not in VISIBILITIES
        ):
            raise InvalidInputError(f"circuit step {index} has a bad index or visibility")
        for d in (step.model_digest, step.settings_digest, step.vk_digest):
            parse_digest(d, what=f"circuit step {index} digest")
        return step


def _file(name: Any) -> str:
    if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith(".") or not name:
        raise InvalidInputError(f"circuit file name {name!r} must be a plain file name")
    return name


@dataclass(frozen=True)
class Circuit:
    folder: Path
    digest: str
    name: str
    model_digest: str
    target: str
    srs_path: str
    srs_digest: str
    srs_logrows: int
    steps: tuple[CircuitStep, ...]
    onboarding: dict[str, Any]
    ezkl_version: str

    def path(self, name: str) -> Path:
        return self.folder / name

    def read(self, name: str, digest: str) -> bytes:
        """A file of the circuit, checked against the digest circuit.json pins."""
        data = read_user_file(self.folder / name, what="circuit file", max_bytes=1 << 30)
        if sha256_bytes(data) != digest:
            raise IntegrityError(f"circuit file {self.folder / name} does not match its pinned digest")
        return data

    def check_files(self) -> None:
        for step in self.steps:
            for name, digest in (
                (step.model, step.model_digest),
                (step.settings, step.settings_digest),
                (step.vk, step.vk_digest),
            ):
                self.read(name, digest)

    def resolve_srs(self, override: Path | None = None) -> Path:
        """The SRS file: ``override``, else the recorded path; its digest must be the pinned one."""
        path = override or Path(self.srs_path)
        if not path.is_absolute() and override is None:
            path = (self.folder / path).resolve()
        if not path.exists():
            raise InvalidInputError(f"SRS file {path} not found", hint="pass --srs PATH (no SRS is ever downloaded)")
        if sha256_file(path) != self.srs_digest:
            raise IntegrityError(f"SRS file {path} is not the one this circuit was built with (digest mismatch)")
        return path

    def to_json(self) -> dict[str, Any]:
        return {
            "type": CIRCUIT_TYPE,
            "version": 1,
            "name": self.name,
            "model_digest": self.model_digest,
            "target": self.target,
            "srs": {"path": self.srs_path, "digest": self.srs_digest, "logrows": self.srs_logrows},
            "steps": [s.to_json() for s in self.steps],
            "onboarding": self.onboarding,
            "ezkl_version": self.ezkl_version,
        }


def write_circuit(circuit: Circuit) -> str:
    """Write circuit.json (canonical); returns the circuit digest."""
    data = canonical_json(circuit.to_json())
    (circuit.folder / "circuit.json").write_bytes(data)
    return sha256_bytes(data)


def load_circuit(folder: Path) -> Circuit:
    path = folder / "circuit.json"
    data = read_user_file(path, what="circuit spec", max_bytes=8 << 20)
    doc = parse_canonical_json(data, what=f"circuit spec {path}")
    if not isinstance(doc, dict) or doc.get("type") != CIRCUIT_TYPE or doc.get("version") != 1:
        raise InvalidInputError(f"{path} is not a verimesh circuit spec")
    try:
        srs = doc["srs"]
        steps = tuple(CircuitStep.from_json(s, i) for i, s in enumerate(doc["steps"]))
        circuit = Circuit(
            folder=folder.resolve(),
            digest=sha256_bytes(data),
            name=str(doc["name"]),
            model_digest=doc["model_digest"],
            target=str(doc["target"]),
            srs_path=str(srs["path"]),
            srs_digest=srs["digest"],
            srs_logrows=int(srs["logrows"]),
            steps=steps,
            onboarding=dict(doc["onboarding"]),
            ezkl_version=str(doc["ezkl_version"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidInputError(f"{path} is malformed ({exc})") from exc
    if not steps:
        raise InvalidInputError(f"{path} has no steps")
    parse_digest(circuit.srs_digest, what="SRS digest")
    return circuit


def cache_dir() -> Path:
    """``$VERIMESH_CACHE``, else the user cache dir: compiled circuits and proving keys live there."""
    env = os.environ.get("VERIMESH_CACHE")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("verimesh"))
