"""A job's files, moved by digest: what a submission uploads and a lease names.

A job over the mesh is its canonical job document plus the blobs it pins: every step file (by
the digest the job pins), the model (by its digest) and the input file (by the sha256 of its
bytes; the job pins the input's tensors, which ``Job.read_input`` checks); a zk job also its
circuit: circuit.json (by the digest the job pins) and the settings and verifying key of each
step (by the digests circuit.json pins), in the circuit folder the job names (inside its own
folder: the owner copies it there); a generate job's one step is its model, by the path the
owner's job names (often above the job's folder). ``materialize`` writes them into a private
folder, each under the relative path the job names (the job document placed as deep as those
paths climb, each checked to stay inside that folder) and each checked against its digest
before it is written. No SRS travels: the node and the coordinator hold their
own (``--srs``), which must be the one the circuit pins.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import Any

from verimesh.core.canonical import parse_json
from verimesh.core.digest import parse_digest, sha256_bytes
from verimesh.errors import IntegrityError, InvalidInputError
from verimesh.jobs.job import Job, job_from_bytes

MODEL_NAME = "model.onnx"
JOB_NAME = "job.json"


def job_files(job: Job, input_blob: str, circuit_json: bytes | None = None) -> dict[str, Any]:
    """The blob digests a job needs (the lease's ``files``); a zk job's with its circuit's."""
    files = {
        "job": sha256_bytes(job.canonical_bytes()),
        "model": job.model_digest,
        "input": input_blob,
        "steps": [s.digest for s in job.steps],
    }
    if job.mode == "zk":
        if circuit_json is None or sha256_bytes(circuit_json) != job.circuit_digest:
            raise IntegrityError("the circuit.json given is not the one the zk job pins")
        files["circuit"] = circuit_files(circuit_json)
    return files


def circuit_files(circuit_json: bytes) -> list[str]:
    """circuit.json's digest, then the settings and verifying key digests it pins, step by step
    (its step models are the job's steps)."""
    doc = parse_json(circuit_json, what="circuit.json", max_bytes=MAX_CIRCUIT_JSON)
    steps = doc.get("steps") if isinstance(doc, dict) else None
    if not isinstance(steps, list) or not steps or len(steps) > 1024:
        raise InvalidInputError("circuit.json must list its steps")
    digests = [sha256_bytes(circuit_json)]
    for step in steps:
        if not isinstance(step, dict):
            raise InvalidInputError("circuit.json steps must be objects")
        for field in ("settings_digest", "vk_digest"):
            parse_digest(step.get(field), what=f"circuit.json {field}")
            digests.append(str(step[field]))
    return digests


MAX_CIRCUIT_JSON = 1024 * 1024
MAX_RELATIVE_BYTES = 1024  # a path inside the job's folder (jobs pin at most this much, jobs/job.py)
MAX_REACH = 32  # folders above its own a job's file may be named


def plain_name(name: Any) -> str:
    """A circuit file's name: one plain file name, as ``jobs.circuit`` reads it."""
    if (not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith(".")
            or "\x00" in name or len(name.encode("utf-8", "surrogatepass")) > 255):  # fmt: skip
        raise InvalidInputError(f"circuit.json names a file {str(name)!r:.80} that is not a plain file name")
    return name


def check_files(doc: Any) -> dict[str, Any]:
    keys = set(doc) if isinstance(doc, dict) else set()
    if keys - {"circuit"} != {"job", "model", "input", "steps"}:
        raise InvalidInputError("the job's files must name job, model, input and steps (and a zk job's circuit)")
    if "circuit" in doc:
        if not isinstance(doc["circuit"], list) or not 3 <= len(doc["circuit"]) <= 2049:
            raise InvalidInputError("files.circuit must list circuit.json's digest and its files'")
        for digest in doc["circuit"]:
            parse_digest(digest, what="files.circuit[]")
    for name in ("job", "model", "input"):
        parse_digest(doc[name], what=f"files.{name}")
    if not isinstance(doc["steps"], list) or len(doc["steps"]) > 100_000:
        raise InvalidInputError("files.steps must be a list of digests")
    for digest in doc["steps"]:
        parse_digest(digest, what="files.steps[]")
    return dict(doc)


def _inside(folder: Path, relative: str, bound: Path | None = None) -> Path:
    """``folder / relative``, which must lie inside ``bound`` (default: ``folder``) and be neither."""
    if "\x00" in relative or len(relative.encode("utf-8", "surrogatepass")) > MAX_RELATIVE_BYTES:
        raise InvalidInputError(f"the job names a file path that is not one: {relative!r:.80}")
    try:
        target = (folder / relative).resolve()
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"the job names a file path that is not one: {relative!r:.80}") from exc
    top = (bound or folder).resolve()
    if not target.is_relative_to(top) or target in (top, folder.resolve()):
        raise InvalidInputError(f"the job names a file outside its folder: {relative!r:.80}")
    return target


def _reach(relative: str) -> int:
    """How many folders above its own a path climbs at most (``../a/../../b``: 2)."""
    depth = lowest = 0
    for part in PurePosixPath(relative).parts:
        depth += -1 if part == ".." else 1
        lowest = min(lowest, depth)
    return -lowest


def _job_folder(job: Job, folder: Path) -> Path:
    """Where the job document goes under ``folder/job``: as deep as the files it names climb
    (a generate job names its model where the owner keeps it, ``../models/lm.onnx`` say), so
    that every one of them still lands inside ``folder/job``."""
    named = (*(s.path for s in job.steps), job.input_path, job.circuit_path or "")
    reach = max(_reach(p) for p in named)
    if reach > MAX_REACH:
        raise InvalidInputError(f"the job names a file {reach} folders above its own (at most {MAX_REACH})")
    return folder.joinpath("job", *(["up"] * reach))


def materialize(
    files: dict[str, Any], fetch: Callable[[str], bytes], folder: Path, *, with_model: bool
) -> tuple[Job, Path | None]:
    """Write the job and its files under ``folder/job/`` (the model beside it, when asked, where
    no path the job names can reach); the job and the model's path."""
    data = fetch(files["job"])
    if sha256_bytes(data) != files["job"]:
        raise IntegrityError("the job document does not match its digest")
    top = folder / "job"
    job = job_from_bytes(data, top, what="mesh job")
    job_dir = _job_folder(job, folder)
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / JOB_NAME).write_bytes(data)
    job = replace(job, base_dir=job_dir.resolve())
    if [s.digest for s in job.steps] != list(files["steps"]) or job.model_digest != files["model"]:
        raise IntegrityError("the job's files are not the ones the job pins")

    written: set[Path] = {(job_dir / JOB_NAME).resolve()}

    def put(relative: str, digest: str, base: Path = job_dir) -> Path:
        target = _inside(base, relative, top if base == job_dir else None)
        if target in written:  # one file the job names twice would overwrite another (job.json, say)
            raise InvalidInputError(f"the job names {relative!r:.80} for two of its files")
        written.add(target)
        body = fetch(digest)
        if sha256_bytes(body) != digest:
            raise IntegrityError(f"{relative} does not match its digest")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(body)
        except (OSError, ValueError) as exc:
            raise InvalidInputError(f"cannot write the job's file {relative!r:.80}: {exc}") from exc
        return target

    for step in job.steps:
        put(step.path, step.digest)
    put(job.input_path, files["input"])
    if job.mode == "zk":
        _put_circuit(job, files, put)
    if job.mode == "generate":  # its one step is the model: the file just written
        return job, job.resolve(job.steps[0].path) if with_model else None
    model = put(MODEL_NAME, files["model"], folder) if with_model else None
    return job, model


def _put_circuit(job: Job, files: dict[str, Any], put: Callable[..., Path]) -> None:
    """A zk job's circuit folder: circuit.json as the job pins it, then each step's settings and
    verifying key under the names circuit.json gives them, each as circuit.json pins it."""
    assert job.circuit_path is not None and job.circuit_digest is not None
    listed = files.get("circuit")
    if not isinstance(listed, list) or not listed or listed[0] != job.circuit_digest:
        raise IntegrityError("the job's files do not name the circuit the zk job pins")
    folder = job.circuit_path
    data_path = put(f"{folder}/circuit.json", job.circuit_digest)
    body = data_path.read_bytes()
    if circuit_files(body) != list(listed):
        raise IntegrityError("the job's circuit files are not the ones its circuit.json pins")
    doc = parse_json(body, what="circuit.json", max_bytes=MAX_CIRCUIT_JSON)
    for step in doc["steps"]:
        for name, digest in ((step.get("settings"), step["settings_digest"]), (step.get("vk"), step["vk_digest"])):
            put(f"{folder}/{plain_name(name)}", digest)
    job.load_circuit()  # what the prover and the verifier read: every name plain, every file as pinned
