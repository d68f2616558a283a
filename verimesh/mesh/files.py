"""A job's files, moved by digest: what a submission uploads and a lease names.

A job over the mesh is its canonical job document plus the blobs it pins: every step file (by
the digest the job pins), the model (by its digest) and the input file (by the sha256 of its
bytes; the job pins the input's tensors, which ``Job.read_input`` checks). ``materialize``
writes them into a private folder, each under the relative path the job names (checked to stay
inside the job's folder) and each checked against its digest before it is written.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from verimesh.core.digest import parse_digest, sha256_bytes
from verimesh.errors import IntegrityError, InvalidInputError
from verimesh.jobs.job import Job, job_from_bytes

MODEL_NAME = "model.onnx"
JOB_NAME = "job.json"


def job_files(job: Job, input_blob: str) -> dict[str, Any]:
    """The blob digests a job needs (the lease's ``files``)."""
    return {
        "job": sha256_bytes(job.canonical_bytes()),
        "model": job.model_digest,
        "input": input_blob,
        "steps": [s.digest for s in job.steps],
    }


def check_files(doc: Any) -> dict[str, Any]:
    if not isinstance(doc, dict) or set(doc) != {"job", "model", "input", "steps"}:
        raise InvalidInputError("the job's files must name job, model, input and steps")
    for name in ("job", "model", "input"):
        parse_digest(doc[name], what=f"files.{name}")
    if not isinstance(doc["steps"], list) or len(doc["steps"]) > 100_000:
        raise InvalidInputError("files.steps must be a list of digests")
    for digest in doc["steps"]:
        parse_digest(digest, what="files.steps[]")
    return doc


def _inside(folder: Path, relative: str) -> Path:
    target = (folder / relative).resolve()
    if not target.is_relative_to(folder.resolve()) or target == folder.resolve():
        raise InvalidInputError(f"the job names a file outside its folder: {relative!r:.80}")
    return target


def materialize(
    files: dict[str, Any], fetch: Callable[[str], bytes], folder: Path, *, with_model: bool
) -> tuple[Job, Path | None]:
    """Write the job and its files under ``folder/job/`` (the model beside it, when asked, where
    no path the job names can reach); the job and the model's path."""
    data = fetch(files["job"])
    if sha256_bytes(data) != files["job"]:
        raise IntegrityError("the job document does not match its digest")
    job_dir = folder / "job"
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / JOB_NAME).write_bytes(data)
    job = job_from_bytes(data, job_dir.resolve(), what="mesh job")
    if job.mode != "spot":
        raise InvalidInputError(f"mode {job.mode} jobs do not run over the mesh yet (spot mode only)")
    if [s.digest for s in job.steps] != list(files["steps"]) or job.model_digest != files["model"]:
        raise IntegrityError("the job's files are not the ones the job pins")

    def put(relative: str, digest: str, base: Path = job_dir) -> Path:
        target = _inside(base, relative)
        body = fetch(digest)
        if sha256_bytes(body) != digest:
            raise IntegrityError(f"{relative} does not match its digest")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(body)
        return target

    for step in job.steps:
        put(step.path, step.digest)
    put(job.input_path, files["input"])
    model = put(MODEL_NAME, files["model"], folder) if with_model else None
    return job, model
