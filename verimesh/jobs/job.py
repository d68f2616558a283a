"""Jobs: the job owner's statement of what must be computed (docs/design.md §3, docs/format.md §3).

``job new`` writes ``NAME.json`` and a sibling folder ``NAME.files/`` holding the step models
and the input tensors. Paths in the job are relative to the job file's folder. ``job_id`` is the
digest of the canonical job document without its ``job_id`` field, so any edit is detected.
"""

from __future__ import annotations

import json
import secrets
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np

from verimesh.core.canonical import canonical_json, parse_json
from verimesh.core.digest import parse_digest, sha256_bytes, tensor_digest, tensor_set_digest
from verimesh.core.files import read_user_file
from verimesh.errors import IntegrityError, InvalidInputError

if TYPE_CHECKING:
    from verimesh.jobs.circuit import Circuit
from verimesh.core.tensors import DTYPES, TensorRef, TensorSpec, check_tensor, npz_bytes
from verimesh.jobs.generation import TRACE as GENERATE_TRACE
from verimesh.jobs.generation import GenerateSpec
from verimesh.jobs.modelsafety import check_model_bytes, max_model_bytes
from verimesh.jobs.tolerance import DEFAULT_TOLERANCES, Tolerance, load_tolerance_profile

JOB_TYPE = "verimesh/job"
# Version 2 jobs pin bundle format 2 (sealed bundles, docs/format.md §6); version 1 jobs, and the
# bundles made for them, still verify as they always did.
JOB_VERSIONS = (1, 2)
CURRENT_VERSION = 2
WINDOWS = (1, 2)
MODES = ("spot", "zk", "generate")
MAX_JOB_BYTES = 8 * 1024 * 1024
MAX_STEPS = 4096
_STEP_KEYS = frozenset({"index", "path", "digest", "inputs", "outputs", "cost", "nodes"})
# Digests of step files that passed the model-safety check in this process (the bytes are
# pinned by digest, so the check holds for every job that names the same file).
_SAFE_STEPS: set[str] = set()


@dataclass(frozen=True)
class StepRef:
    index: int
    path: str
    digest: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    cost: int
    nodes: int

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "path": self.path,
            "digest": self.digest,
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
            "cost": self.cost,
            "nodes": self.nodes,
        }


@dataclass(frozen=True)
class Policy:
    samples: int
    precision: str
    optimization: str
    tolerance: Tolerance
    step_tolerances: tuple[Tolerance, ...] = ()  # from `verimesh calibrate`; empty: `tolerance` everywhere
    # Steps a verifier runs in a chain from each sampled step: 2 also runs the step after it from
    # the verifier's own outputs (docs/format.md §7, laundering); 1 checks each step alone.
    window: int = 1
    # Boundary tensors that feed an operator telling -0.0 from +0.0 (a divisor): their zeros must
    # keep their sign. Found by the planner; version 2 jobs.
    sign_sensitive: tuple[str, ...] = ()
    # Calibrated tolerances of the windows ending at steps 1..S-1 (a window chains two steps'
    # honest spread); empty: the job's tolerance, or the class default beside calibrated steps.
    window_tolerances: tuple[Tolerance, ...] = ()

    def tolerance_for(self, step: int) -> Tolerance:
        return self.step_tolerances[step] if self.step_tolerances else self.tolerance

    def window_tolerance_for(self, step: int) -> Tolerance:
        """The tolerance of the window that ends at ``step`` (step >= 1)."""
        if self.window_tolerances:
            return self.window_tolerances[step - 1]
        return DEFAULT_TOLERANCES[self.precision] if self.step_tolerances else self.tolerance

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "samples": self.samples,
            "precision": self.precision,
            "optimization": self.optimization,
            "tolerance": self.tolerance.to_json(),
        }
        if self.step_tolerances:
            doc["step_tolerances"] = [t.to_json() for t in self.step_tolerances]
        if self.window != 1:
            doc["window"] = self.window
        if self.sign_sensitive:
            doc["sign_sensitive"] = list(self.sign_sensitive)
        if self.window_tolerances:
            doc["window_tolerances"] = [t.to_json() for t in self.window_tolerances]
        return doc


@dataclass(frozen=True)
class Segment:
    """What makes a job a segment of another (docs/format.md §13): steps ``ranges[index]`` of the
    parent job, ``ranges`` the whole split (contiguous, end exclusive). ``linked`` names the
    segment's inputs that earlier segments produce, with the segment that produces each; the
    rest of its inputs are the parent job's own, pinned by digest."""

    parent_job_id: str
    index: int
    ranges: tuple[tuple[int, int], ...]
    linked: tuple[tuple[str, int], ...]
    final_outputs: tuple[str, ...]  # the parent job's outputs this segment computes
    parent: Job | None = field(default=None, compare=False, repr=False)  # what evidence carries

    @property
    def range(self) -> tuple[int, int]:
        return self.ranges[self.index]

    def links(self) -> dict[int, tuple[str, ...]]:
        """Producing segment -> the tensors this segment takes from it (in trace order)."""
        out: dict[int, list[str]] = {}
        for name, source in self.linked:
            out.setdefault(source, []).append(name)
        return {k: tuple(v) for k, v in sorted(out.items())}


@dataclass(frozen=True)
class Shard:
    """What makes a job a shard of another (docs/format.md §13): the parent's steps and policy
    on row ``index`` of a batch of ``count`` rows (its input, pinned by digest as in any job)."""

    parent_job_id: str
    index: int
    count: int
    parent: Job | None = field(default=None, compare=False, repr=False)  # what evidence carries


@dataclass(frozen=True)
class Job:
    job_id: str
    nonce: str
    created: str
    mode: str
    model_digest: str
    model_path: str
    model_inputs: tuple[TensorSpec, ...]
    model_outputs: tuple[TensorSpec, ...]
    input_digest: str
    input_path: str
    input_tensors: tuple[TensorRef, ...]
    steps: tuple[StepRef, ...]
    policy: Policy
    base_dir: Path
    circuit_path: str | None = None  # zk mode: the job owner's circuit folder
    circuit_digest: str | None = None
    version: int = CURRENT_VERSION
    # A segment of a split job (``verimesh job split``): a view of the parent job, never a
    # document of its own; None for a whole job.
    segment: Segment | None = None
    shard: Shard | None = None  # one row of a batch (``verimesh job split --shards``)
    generate: GenerateSpec | None = None  # generate mode: what the decode loop pins (jobs/generation.py)

    @property
    def step_tolerances_given(self) -> bool:
        return bool(self.policy.step_tolerances or self.policy.window_tolerances or self.policy.window != 1)

    @property
    def step_range(self) -> list[int]:
        """The parent job's step range this job covers (end exclusive): all of it for a whole job."""
        if self.segment is None:
            return [0, len(self.steps)]
        return list(self.segment.range)

    @property
    def final_output_names(self) -> tuple[str, ...]:
        """The model outputs computed here (compared as outputs: argmax and all); a segment's
        other outputs are boundary tensors, compared under the tolerance like any other."""
        return self.output_names if self.segment is None else self.segment.final_outputs

    @property
    def linked_names(self) -> tuple[str, ...]:
        return () if self.segment is None else tuple(n for n, _ in self.segment.linked)

    @property
    def trace_names(self) -> tuple[str, ...]:
        names = [s.name for s in self.model_inputs]
        for step in self.steps:
            names.extend(step.outputs)
        return tuple(names)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.model_outputs)

    @property
    def audit_units(self) -> int:
        """What an audit level samples a share of (``Standing.samples_for``): the job's steps, or
        a generate job's generated positions (its one step is the model, re-run once over the
        whole answer: counted as one, a node's audit level would check only the last token)."""
        return self.generate.max_new_tokens if self.generate is not None else len(self.steps)

    def document(self) -> dict[str, Any]:
        """The job document without ``job_id`` (what ``job_id`` is the digest of)."""
        return {
            "type": JOB_TYPE,
            "version": self.version,
            "nonce": self.nonce,
            "created": self.created,
            "mode": self.mode,
            "model": {
                "digest": self.model_digest,
                "path": self.model_path,
                "inputs": [_spec_json(s) for s in self.model_inputs],
                "outputs": [_spec_json(s) for s in self.model_outputs],
            },
            "input": {
                "digest": self.input_digest,
                "path": self.input_path,
                "tensors": [t.to_json() for t in self.input_tensors],
            },
            "steps": [s.to_json() for s in self.steps],
            "policy": self.policy.to_json(),
            **({"circuit": {"path": self.circuit_path, "digest": self.circuit_digest}} if self.mode == "zk" else {}),
            **({"generate": self.generate.to_json()} if self.generate is not None else {}),
        }

    def canonical_bytes(self) -> bytes:
        return canonical_json({**self.document(), "job_id": self.job_id})

    def resolve(self, relative: str) -> Path:
        return self.base_dir / relative

    def read_step_model(self, index: int) -> bytes:
        """One step file, checked against the digest the job pins (IntegrityError otherwise)."""
        step = self.steps[index]
        path = self.resolve(step.path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise InvalidInputError(
                f"step file {path} is missing", hint="keep the job's .files folder beside the job file"
            ) from exc
        if sha256_bytes(data) != step.digest:
            raise IntegrityError(f"step file {path} does not match the digest pinned by the job")
        if step.digest not in _SAFE_STEPS:  # a hostile owner can hand-write a job: check what runs
            check_model_bytes(data, what=f"step {index} of job {self.job_id[:19]}…")
            _SAFE_STEPS.add(step.digest)
        return data

    def read_step_models(self) -> tuple[bytes, ...]:
        return tuple(self.read_step_model(i) for i in range(len(self.steps)))

    def read_input(self) -> dict[str, np.ndarray]:
        """The job's input tensors, checked against their pinned digests."""
        from verimesh.core.tensors import MAX_INPUT_BYTES, parse_npz

        path = self.resolve(self.input_path)
        if not path.is_file():  # a job may name any path: never a device or a FIFO
            raise InvalidInputError(f"job input {path} is missing or not a regular file")
        data = read_user_file(path, what="job input", max_bytes=MAX_INPUT_BYTES)
        tensors = parse_npz(data, what=f"job input {path}")
        expected = {t.name: t for t in self.input_tensors}
        if self.segment is not None:  # the parent job's input: this segment needs a part of it
            if not set(expected) <= set(tensors):
                raise IntegrityError(f"job input {path} lacks {sorted(set(expected) - set(tensors))[:5]}")
            tensors = {n: tensors[n] for n in expected}
        if set(tensors) != set(expected):
            raise IntegrityError(f"job input {path} holds {sorted(tensors)}, the job pins {sorted(expected)}")
        for name, array in tensors.items():
            check_tensor(name, array, what="job input")
            if tensor_digest(name, array) != expected[name].digest:
                raise IntegrityError(f"job input tensor {name!r} does not match the digest pinned by the job")
        return tensors

    def load_circuit(self) -> Circuit:
        """zk mode: the circuit the job pins (settings, vk and SRS digests come from it, never from a bundle)."""
        from verimesh.jobs.circuit import load_circuit

        if self.circuit_path is None:
            raise InvalidInputError("this job is not a zk job")
        circuit = load_circuit(self.resolve(self.circuit_path))
        if circuit.digest != self.circuit_digest:
            raise IntegrityError(f"circuit {circuit.folder} is not the one the job pins (digest mismatch)")
        circuit.check_files()
        return circuit

    def check_model_file(self, path: Path | None = None, *, digest_of: Callable[[Path], str] | None = None) -> None:
        """Refuse a model file whose digest is not the job's (``digest_of`` may cache digests)."""
        from verimesh.core.digest import sha256_file

        model = path or self.resolve(self.model_path)
        try:
            st = model.stat()
            # A job may name any path: never hash a device, a FIFO or an endless file.
            if not stat.S_ISREG(st.st_mode) or st.st_size > max_model_bytes():
                raise InvalidInputError(f"model file {model} is not a regular file within the model size limit")
            digest = (digest_of or sha256_file)(model)
        except OSError as exc:
            raise InvalidInputError(f"model file {model} not found", hint="pass --model PATH") from exc
        if digest != self.model_digest:
            raise IntegrityError(f"model file {model} does not match the job's model digest {self.model_digest[:19]}…")


def _spec_json(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "dtype": spec.dtype, "shape": None if spec.shape is None else list(spec.shape)}


def _spec_from(doc: Any, what: str) -> TensorSpec:
    if not isinstance(doc, dict) or set(doc) != {"name", "dtype", "shape"}:
        raise InvalidInputError(f"job {what} spec is malformed")
    shape = doc["shape"]
    if not isinstance(doc["name"], str) or doc["dtype"] not in DTYPES:
        raise InvalidInputError(f"job {what} spec has a bad name or dtype")
    if shape is not None and (
        not isinstance(shape, list) or not all(d is None or isinstance(d, (int, str)) for d in shape)
    ):
        raise InvalidInputError(f"job {what} spec has a bad shape")
    return TensorSpec(doc["name"], doc["dtype"], None if shape is None else tuple(shape))


# Longest path a job may name for a file inside its files folder (UTF-8 bytes): every folder a job
# is written under (a verifier's, a node's, a fleet's) must still hold it within the system's
# 4096-byte path limit. Paths that may leave the folder (a local job's model, a zk circuit) are
# never written under a work folder and are not capped.
MAX_PATH_BYTES = 1024


def _relative_path(value: Any, what: str, *, allow_parent: bool = False) -> str:
    if not isinstance(value, str) or not value or value.startswith("/") or "\\" in value or "\x00" in value:
        raise InvalidInputError(f"job {what} path must be a relative POSIX path")
    if not allow_parent and ".." in PurePosixPath(value).parts:
        raise InvalidInputError(f"job {what} path {value!r} escapes the job folder")
    if not allow_parent:  # a path inside the job's files folder: written under every work folder
        size = len(value.encode())
        if size > MAX_PATH_BYTES or any(len(part.encode()) > 255 for part in PurePosixPath(value).parts):
            raise InvalidInputError(f"job {what} path is {size} bytes long (at most {MAX_PATH_BYTES}, and 255 a name)")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise InvalidInputError(f"job policy {what} must be a list")
    return value


def _circuit_ref(value: Any, what: str) -> tuple[str, str]:
    if not isinstance(value, dict) or set(value) != {"path", "digest"}:
        raise InvalidInputError(f"{what}: a zk job needs circuit {{path, digest}}")
    parse_digest(value["digest"], what="circuit digest")
    return _relative_path(value["path"], "circuit", allow_parent=True), value["digest"]


def _names(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise InvalidInputError(f"job {what} must be a list of tensor names")
    return tuple(value)


def job_from_bytes(data: bytes, base_dir: Path, *, what: str = "job") -> Job:
    """Parse and check a job document; any edit since ``job new`` breaks ``job_id``."""
    doc = parse_json(data, what=what, max_bytes=MAX_JOB_BYTES)
    try:
        return _job_from_doc(doc, base_dir, what)
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidInputError(f"{what} is malformed: missing or bad field {exc}") from exc


def _job_from_doc(doc: Any, base_dir: Path, what: str) -> Job:
    if not isinstance(doc, dict) or doc.get("type") != JOB_TYPE:
        raise InvalidInputError(f"{what} is not a verimesh job (type {JOB_TYPE})")
    if doc.get("version") not in JOB_VERSIONS:
        raise InvalidInputError(f"{what} has unsupported version {doc.get('version')!r}")
    expected_keys = {"type", "version", "job_id", "nonce", "created", "mode", "model", "input", "steps", "policy"}
    if doc.get("mode") == "zk":
        expected_keys.add("circuit")
    if doc.get("mode") == "generate":
        expected_keys.add("generate")
    if set(doc) != expected_keys:
        raise InvalidInputError(f"{what} fields differ from the format: {sorted(set(doc) ^ expected_keys)}")
    if doc["mode"] not in MODES:
        raise InvalidInputError(f"{what} mode {doc['mode']!r} is not supported here", hint=f"modes: {MODES}")
    model, inp, pol = doc["model"], doc["input"], doc["policy"]
    # Exact members everywhere: a member the job id does not cover would be a byte free to change.
    for part, keys in ((model, {"digest", "path", "inputs", "outputs"}), (inp, {"digest", "path", "tensors"})):
        if not isinstance(part, dict) or set(part) != keys:
            raise InvalidInputError(f"{what}: model and input must have exactly {sorted(keys)}")
    tensors = []
    for t in inp["tensors"]:
        tensors.append(TensorRef.from_json(t, what=f"{what} input tensor"))
    steps = []
    if not isinstance(doc["steps"], list) or not 1 <= len(doc["steps"]) <= MAX_STEPS:
        raise InvalidInputError(f"{what} must have 1..{MAX_STEPS} steps")
    for i, s in enumerate(doc["steps"]):
        if not isinstance(s, dict) or s.get("index") != i or set(s) != _STEP_KEYS:
            raise InvalidInputError(f"{what} step {i} is malformed or out of order")
        if not all(isinstance(s[k], int) and s[k] >= 0 for k in ("cost", "nodes")):
            raise InvalidInputError(f"{what} step {i} cost/nodes must be non-negative integers")
        parse_digest(s["digest"], what=f"step {i} digest")
        steps.append(
            StepRef(
                i,
                _relative_path(s["path"], f"step {i}", allow_parent=doc["mode"] in ("zk", "generate")),
                s["digest"],
                _names(s["inputs"], f"step {i} inputs"),
                _names(s["outputs"], f"step {i} outputs"),
                s["cost"],
                s["nodes"],
            )
        )
    samples = pol["samples"]
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 0:
        raise InvalidInputError(f"{what} policy samples must be a non-negative integer")
    if pol["precision"] not in DEFAULT_TOLERANCES:
        raise InvalidInputError(f"{what} precision {pol['precision']!r} is unknown")
    from verimesh.jobs.runtime import OPT_LEVELS

    if pol["optimization"] not in OPT_LEVELS:
        raise InvalidInputError(f"{what} optimization level {pol['optimization']!r} is unknown")
    policy_keys = {
        "samples", "precision", "optimization", "tolerance", "step_tolerances", "window", "sign_sensitive",
        "window_tolerances",
    }  # fmt: skip
    if not isinstance(pol, dict) or not set(pol) <= policy_keys:
        raise InvalidInputError(f"{what} policy has unknown fields {sorted(set(pol) - policy_keys)}")
    window = pol.get("window", 1)
    if window not in WINDOWS or isinstance(window, bool) or (doc["version"] == 1 and "window" in pol):
        raise InvalidInputError(f"{what} policy window must be one of {WINDOWS} (version 2 jobs)")
    sign_sensitive = _names(pol.get("sign_sensitive", []), "policy sign_sensitive")
    if list(sign_sensitive) != sorted(set(sign_sensitive)) or (doc["version"] == 1 and sign_sensitive):
        raise InvalidInputError(f"{what} policy sign_sensitive must be sorted, unique tensor names (version 2 jobs)")
    for key in ("digest",):
        parse_digest(model[key], what="model digest")
        parse_digest(inp[key], what="input digest")
    circuit = _circuit_ref(doc.get("circuit"), what) if doc["mode"] == "zk" else None
    job = Job(
        job_id=doc["job_id"],
        nonce=str(doc["nonce"]),
        created=str(doc["created"]),
        mode=doc["mode"],
        model_digest=model["digest"],
        model_path=_relative_path(model["path"], "model", allow_parent=True),
        model_inputs=tuple(_spec_from(s, "model input") for s in model["inputs"]),
        model_outputs=tuple(_spec_from(s, "model output") for s in model["outputs"]),
        input_digest=inp["digest"],
        input_path=_relative_path(inp["path"], "input"),
        input_tensors=tuple(tensors),
        steps=tuple(steps),
        policy=Policy(
            samples,
            pol["precision"],
            pol["optimization"],
            Tolerance.from_json(pol["tolerance"]),
            tuple(Tolerance.from_json(t) for t in _list(pol.get("step_tolerances", []), "step_tolerances")),
            window,
            sign_sensitive,
            tuple(Tolerance.from_json(t) for t in _list(pol.get("window_tolerances", []), "window_tolerances")),
        ),
        base_dir=base_dir,
        circuit_path=circuit[0] if circuit else None,
        circuit_digest=circuit[1] if circuit else None,
        version=doc["version"],
        generate=GenerateSpec.from_json(doc["generate"], relative_path=lambda v, w: _relative_path(
            v, w, allow_parent=True)) if doc["mode"] == "generate" else None,
    )  # fmt: skip
    _check_consistency(job, what)
    if compute_job_id(job.document()) != job.job_id:
        raise IntegrityError(f"{what} was edited after it was created: its job_id no longer matches its content")
    return job


def _unique(names: Sequence[str], what: str) -> None:
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InvalidInputError(f"{what} names {repeated[:5]} more than once")


def _check_consistency(job: Job, what: str) -> None:
    """The trace must be well formed: every name unique, every step input available, every name
    produced once (a step that lists an output twice could never be verified: the node would do
    the work and never be paid)."""
    available = [s.name for s in job.model_inputs]
    _unique(available, f"{what}: the model inputs")
    _unique(job.output_names, f"{what}: the model outputs")
    for step in job.steps:
        _unique(step.inputs, f"{what}: step {step.index}'s inputs")
        _unique(step.outputs, f"{what}: step {step.index}'s outputs")
    if [t.name for t in job.input_tensors] != available:
        raise InvalidInputError(f"{what}: input tensors do not match the model inputs")
    if tensor_set_digest({t.name: t.digest for t in job.input_tensors}) != job.input_digest:
        raise IntegrityError(f"{what}: input digest does not match its tensors")
    seen = set(available)
    for step in job.steps:
        missing = [n for n in step.inputs if n not in seen]
        if missing:
            raise InvalidInputError(f"{what}: step {step.index} needs {missing} before they are produced")
        dup = [n for n in step.outputs if n in seen]
        if dup or not step.outputs:
            raise InvalidInputError(f"{what}: step {step.index} outputs {dup or 'nothing'} already produced")
        seen.update(step.outputs)
    unknown = sorted(set(job.policy.sign_sensitive) - seen)
    if unknown:
        raise InvalidInputError(f"{what}: policy sign_sensitive names tensors no step produces: {unknown[:5]}")
    if job.policy.step_tolerances and len(job.policy.step_tolerances) != len(job.steps):
        raise InvalidInputError(f"{what}: step_tolerances must give one tolerance per step")
    if job.policy.window_tolerances and len(job.policy.window_tolerances) != len(job.steps) - 1:
        raise InvalidInputError(f"{what}: window_tolerances must give one tolerance per step after the first")
    absent = [s.name for s in job.model_outputs if s.name not in seen]
    if absent:
        raise InvalidInputError(f"{what}: model outputs {absent} are produced by no step")
    if job.mode == "generate" and (job.trace_names != GENERATE_TRACE or len(job.steps) != 1 or job.version != 2
                                   or job.output_names != ("tokens",) or job.step_tolerances_given):  # fmt: skip
        raise InvalidInputError(f"{what}: a generate job is one step, the whole model, with the trace "
                                f"{', '.join(GENERATE_TRACE)} (version 2)")  # fmt: skip


def _profile_tolerances(
    profile: Path, model_digest: str, precision: str, steps: list[StepRef]
) -> tuple[tuple[Tolerance, ...], tuple[Tolerance, ...]]:
    """(step tolerances, window tolerances) pinned from a calibration profile."""
    loaded = load_tolerance_profile(profile)
    if loaded.model_digest != model_digest:
        raise InvalidInputError(f"tolerance profile {profile} was calibrated for another model")
    if loaded.precision != precision:
        raise InvalidInputError(
            f"tolerance profile {profile} is for precision {loaded.precision}, the job uses {precision}"
        )
    digests = [loaded.steps.get(s.index, ("", None))[0] for s in steps]
    if len(loaded.steps) != len(steps) or digests != [s.digest for s in steps]:
        raise InvalidInputError(
            f"tolerance profile {profile} was calibrated for another step plan",
            hint="give job new the same --steps as calibrate",
        )
    windows = tuple(loaded.windows[s.index] for s in steps[1:] if s.index in loaded.windows)
    return tuple(loaded.steps[s.index][1] for s in steps), windows if len(windows) == len(steps) - 1 else ()


def compute_job_id(document: dict[str, Any]) -> str:
    return sha256_bytes(b"verimesh.job.v1\x00" + canonical_json(document))


def load_job(path: Path) -> Job:
    """A job file, or a segment file written by ``verimesh job split`` (the segment's view of its
    parent job, which must sit where the segment file says)."""
    data = read_user_file(path, what="job file", max_bytes=MAX_JOB_BYTES)
    if b'"verimesh/segment"' in data or b'"verimesh/shard"' in data:
        from verimesh.jobs.segments import SEGMENT_TYPE, SHARD_TYPE, load_segment, load_shard

        doc = parse_json(data, what=f"job {path}", max_bytes=MAX_JOB_BYTES)
        if isinstance(doc, dict) and doc.get("type") == SEGMENT_TYPE:
            return load_segment(doc, path)
        if isinstance(doc, dict) and doc.get("type") == SHARD_TYPE:
            return load_shard(doc, path)
    return job_from_bytes(data, path.resolve().parent, what=f"job {path}")


def new_job(
    model_path: Path,
    input_path: Path,
    out: Path,
    *,
    mode: str = "spot",
    steps: int | None = None,
    samples: int = 1,
    precision: str = "fp32-strict",
    optimization: str = "extended",
    tolerance: Tolerance | None = None,
    overwrite: bool = False,
    circuit: Path | None = None,
    profile: Path | None = None,
    window: int = 2,
    upgrade_opset: int | None = None,
    on_note: Callable[[str], None] | None = None,
) -> Job:
    """Plan the model, pin every digest, and write ``out`` plus its ``.files`` folder.

    1. Read the model (refused unless verimesh will run it: jobs/modelsafety.py) and the input;
       with ``upgrade_opset``, convert the model to that opset first and pin the converted model.
    2. Run the model once on the input: what cannot run is refused now, and the values feed
       the cut-safety check.
    3. Plan the steps (zk: take them from ``circuit``, built by ``verimesh circuit build``) with
       no cut where a boundary value sits near a later decision point, write the step files.
    4. Pin the tolerances (``profile`` from ``verimesh calibrate`` must match the model,
       precision class and step plan) and write the job; the files appear all at once.

    ``on_note`` hears what a user should know about the plan (one step because of control flow,
    fewer steps than ``steps`` asked for)."""
    import os
    import shutil

    from verimesh.core.tensors import load_input_file
    from verimesh.jobs.plan import (
        build_step_models,
        decision_inputs,
        initializer_values,
        load_model,
        model_io,
        plan_model,
        with_outputs,
    )

    if mode not in MODES:
        raise InvalidInputError(f"mode {mode!r} is not available", hint=f"available modes: {', '.join(MODES)}")
    if precision not in DEFAULT_TOLERANCES:
        raise InvalidInputError(f"unknown precision class {precision!r}", hint="use fp32-strict or tf32")
    if samples < 0:
        raise InvalidInputError("--samples must be 0 or more")
    if window not in WINDOWS:
        raise InvalidInputError(f"--window must be one of {WINDOWS}")
    if out.exists() and not overwrite:
        raise InvalidInputError(f"{out} already exists", hint="pass --force to overwrite it")
    if mode != "zk" and circuit is not None:
        raise InvalidInputError("--circuit goes with --mode zk")
    if mode == "zk" and circuit is None:
        raise InvalidInputError("zk mode needs --circuit DIR", hint="build one with `verimesh circuit build`")
    # 1.
    model, model_bytes = load_model(model_path)
    if upgrade_opset is not None:
        model, model_bytes = _upgraded(model, upgrade_opset, model_path)
    specs_in, specs_out = model_io(model)
    tensors = load_input_file(input_path, specs_in)
    tol = tolerance or DEFAULT_TOLERANCES[precision]
    base, files, staging = stage_job_files(out)
    try:
        # 2.
        wanted = decision_inputs(model) if mode == "spot" else []
        extended, added = with_outputs(model, wanted)
        reference = _run_once(extended, tensors, [*(s.name for s in specs_out), *added])
        reference.update(initializer_values(model, wanted))
        reference.update(tensors)
        # 3.
        step_refs: list[StepRef] = []
        circuit_ref: tuple[str, str] | None = None
        divided: tuple[str, ...] = ()
        if mode == "zk":
            from verimesh.jobs.circuit import load_circuit

            assert circuit is not None
            spec = load_circuit(circuit)
            if spec.model_digest != sha256_bytes(model_bytes):
                raise IntegrityError(f"circuit {circuit} was built for another model (model digest mismatch)")
            spec.check_files()
            first = spec.steps[0]
            for name, shape in zip(first.inputs, first.input_shapes, strict=False):
                if name in tensors and tuple(tensors[name].shape) != tuple(shape):
                    raise InvalidInputError(
                        f"circuit {circuit} was built for input {name!r} of shape {tuple(shape)}; this input is "
                        f"{tuple(tensors[name].shape)}",
                        hint="build a circuit from an input of this shape (a circuit is for one shape)",
                    )
            circuit_ref = (os.path.relpath(spec.folder, base), spec.digest)
            for cs in spec.steps:
                rel = os.path.relpath(spec.path(cs.model), base)
                step_refs.append(StepRef(cs.index, rel, cs.model_digest, cs.inputs, cs.outputs, 0, 0))
        else:
            shapes = {k: tuple(v.shape) for k, v in tensors.items()}
            plan = plan_model(model, steps=steps, input_shapes=shapes, reference=reference, tolerance=tol)
            planned = build_step_models(model, model_bytes, plan)
            divided = plan.sign_sensitive
            if on_note is not None:
                for note in plan.notes:
                    on_note(note)
            for step, blob, digest in zip(plan.steps, planned.step_bytes, planned.step_digests, strict=True):
                name = f"step-{step.index:03d}.onnx"
                (staging / name).write_bytes(blob)
                ref = StepRef(
                    step.index, f"{files.name}/{name}", digest, step.inputs, step.outputs, step.cost, step.node_count
                )
                step_refs.append(ref)
        # 4.
        profiled = (
            _profile_tolerances(profile, sha256_bytes(model_bytes), precision, step_refs) if profile else ((), ())
        )
        (staging / "input.npz").write_bytes(npz_bytes(tensors))
        model_rel = os.path.relpath(model_path.resolve(), base)
        if upgrade_opset is not None:  # the job pins the converted model, kept with its files
            (staging / "model.onnx").write_bytes(model_bytes)
            model_rel = f"{files.name}/model.onnx"
        refs = tuple(TensorRef.of(s.name, tensors[s.name]) for s in specs_in)
        job = Job(
            job_id="",
            nonce=secrets.token_hex(16),
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            mode=mode,
            model_digest=sha256_bytes(model_bytes),
            model_path=model_rel,
            model_inputs=specs_in,
            model_outputs=specs_out,
            input_digest=tensor_set_digest({r.name: r.digest for r in refs}),
            input_path=f"{files.name}/input.npz",
            input_tensors=refs,
            steps=tuple(step_refs),
            policy=Policy(
                samples,
                precision,
                optimization,
                tol,
                profiled[0],
                window if mode == "spot" else 1,
                divided,
                profiled[1],
            ),
            base_dir=base,
            circuit_path=circuit_ref[0] if circuit_ref else None,
            circuit_digest=circuit_ref[1] if circuit_ref else None,
        )
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return publish_job(job, staging, files, out)


def stage_job_files(out: Path) -> tuple[Path, Path, Path]:
    """(the job's base folder, its ``NAME.files`` folder, an empty private staging folder that
    ``publish_job`` puts in the files folder's place) for a job file written to ``out``."""
    import os
    import shutil

    files = out.with_name(out.stem + ".files")
    staging = out.with_name(f".{out.stem}.files.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return out.resolve().parent, files, staging


def publish_job(draft: Job, staging: Path, files: Path, out: Path) -> Job:
    """Give a drafted job its id, put its files folder (prepared in ``staging``) in place and write
    the job file: the folder and the file appear whole or not at all."""
    import shutil

    try:
        job = Job(**{**draft.__dict__, "job_id": compute_job_id(draft.document())})
        if files.exists():
            shutil.rmtree(files)
        staging.replace(files)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    partial = out.with_name(out.name + ".partial")
    partial.write_text(json.dumps({**job.document(), "job_id": job.job_id}, indent=2) + "\n")
    partial.replace(out)
    return job


def _run_once(model_bytes: bytes, tensors: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
    """Run the whole model on the job's input: a model that cannot run is refused here, not on a
    worker; the returned values are what the cut-safety check reads."""
    from verimesh.errors import StepExecutionError
    from verimesh.jobs.runtime import StepRunner

    names = list(dict.fromkeys(outputs))
    try:
        return StepRunner(device="cpu").run(sha256_bytes(model_bytes), model_bytes, tensors, names)
    except StepExecutionError as exc:
        raise StepExecutionError(
            f"the model does not run on the given input: {exc.message}",
            hint="check the input's shapes and values; a model of an old opset can be converted with --upgrade-opset",
        ) from exc


def _upgraded(model: Any, opset: int, path: Path) -> tuple[Any, bytes]:
    """The model converted to ``opset`` by onnx's version converter (checked again afterwards)."""
    from onnx import version_converter

    from verimesh.jobs.plan import parse_model

    try:
        converted = version_converter.convert_version(model, opset)
    except (RuntimeError, ValueError, IndexError) as exc:
        raise InvalidInputError(
            f"onnx cannot convert {path} to opset {opset}: {str(exc).splitlines()[0][:200]}"
        ) from exc
    data = converted.SerializeToString(deterministic=True)
    return parse_model(data, what=f"{path} converted to opset {opset}"), data
