"""Segments and shards: one job cut into sub-jobs that different nodes run (docs/format.md §13).

Shards (``job split --shards``) are the other cut: one sub-job per row of a batch, each the
parent's steps and policy on that row, named by ``shard_id(parent, count, index, input digest)``.

A segment is not a new job document: it is a view of its parent job (same step files, same
policy), named by ``segment_id(parent job id, ranges, index)``. ``verimesh job split`` writes a
small pointer file per segment (``seg-K.json``: where the parent job is and which range); a
verifier needs only the parent job, since every segment's statement names the split it belongs
to and the view is recomputed from it.

A segment's inputs are the tensors its steps consume that were made before its first step: the
parent job's own inputs (pinned by digest, as in any job) and tensors earlier segments produce
(``linked``: each from exactly one segment, checked against that segment's signed outputs). Its
outputs are what later segments consume and the parent's model outputs it computes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from verimesh.core.canonical import canonical_json
from verimesh.core.digest import sha256_bytes, tensor_set_digest
from verimesh.core.tensors import TensorRef, TensorSpec, npz_bytes
from verimesh.errors import IntegrityError, InvalidInputError
from verimesh.jobs.job import Job, Policy, Segment, Shard, StepRef, load_job

SEGMENT_TYPE = "verimesh/segment"
SHARD_TYPE = "verimesh/shard"
SEGMENT_VERSION = 1
MAX_SHARDS = 4096
MAX_SEGMENTS = 256
_POINTER_KEYS = frozenset({"type", "version", "job", "job_id", "segments", "index", "segment_id"})

Ranges = tuple[tuple[int, int], ...]


def segment_id(parent_job_id: str, ranges: Ranges, index: int) -> str:
    """The id a segment's statement binds (its ``job_id``): the parent, the whole split, the index."""
    body = {"job_id": parent_job_id, "segments": [list(r) for r in ranges], "index": index}
    return sha256_bytes(b"verimesh.segment.v1\x00" + canonical_json(body))


def check_ranges(value: Any, steps: int, *, what: str = "segments") -> Ranges:
    """Contiguous, non-empty, end-exclusive ranges covering steps [0, steps) exactly."""
    if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= min(MAX_SEGMENTS, steps):
        raise InvalidInputError(f"{what} must list 1..{min(MAX_SEGMENTS, steps)} step ranges")
    ranges: list[tuple[int, int]] = []
    start = 0
    for r in value:
        if (
            not isinstance(r, (list, tuple))
            or len(r) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in r)
        ):
            raise InvalidInputError(f"{what}: each range is [first, end) of two integers")
        a, b = r
        if a != start or not a < b <= steps:
            raise InvalidInputError(
                f"{what}: range [{a}, {b}) does not continue at step {start} (ranges must be contiguous, "
                f"non-empty, not overlapping, within the job's {steps} steps)"
            )
        ranges.append((a, b))
        start = b
    if start != steps:
        raise InvalidInputError(f"{what} cover steps [0, {start}) of the job's {steps}: a segment is missing")
    return tuple(ranges)


def plan_segments(job: Job, count: int) -> Ranges:
    """``count`` contiguous ranges of about equal cost (each cut at the step boundary nearest to
    an equal share of the cumulative cost, at least one step each)."""
    steps = len(job.steps)
    if job.segment is not None or job.shard is not None:
        raise InvalidInputError("this is already a sub-job; split the parent job")
    if job.mode != "spot":
        raise InvalidInputError(
            "zk jobs cannot be split: a zk job's steps are proven by one node against one circuit",
            hint="split the spot-mode job, or prove the zk job on one node",
        )
    if job.version < 2:
        raise InvalidInputError("version 1 jobs cannot be split", hint="make the job again with `verimesh job new`")
    if not 1 <= count <= min(steps, MAX_SEGMENTS):
        raise InvalidInputError(f"--segments must be 1..{min(steps, MAX_SEGMENTS)}: the job has {steps} steps")
    costs = [max(s.cost, 1) for s in job.steps]
    total = sum(costs)
    cumulative = [sum(costs[: i + 1]) for i in range(steps)]
    cuts: list[int] = []
    for k in range(1, count):
        target = total * k / count
        low = (cuts[-1] if cuts else 0) + 1
        high = steps - (count - k)  # leave a step for each segment still to come
        best = min(range(low, high + 1), key=lambda c: (abs(cumulative[c - 1] - target), c))
        cuts.append(best)
    bounds = [0, *cuts, steps]
    return tuple((bounds[i], bounds[i + 1]) for i in range(count))


def segment_view(parent: Job, ranges: Ranges, index: int) -> Job:
    """Segment ``index`` of ``parent`` split at ``ranges``, as a job the prover and verifier run."""
    ranges = check_ranges(ranges, len(parent.steps))
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(ranges):
        raise InvalidInputError(f"segment index {index} is not in 0..{len(ranges) - 1}")
    if parent.mode != "spot" or parent.version < 2 or parent.segment is not None or parent.shard is not None:
        raise InvalidInputError("only a whole spot-mode job of version 2 has segments")
    a, b = ranges[index]
    producer: dict[str, int] = {s.name: -1 for s in parent.model_inputs}
    for step in parent.steps:
        for name in step.outputs:
            producer[name] = step.index
    segment_of = {i: k for k, (lo, hi) in enumerate(ranges) for i in range(lo, hi)}
    inputs: list[str] = []
    for step in parent.steps[a:b]:
        for name in step.inputs:
            if producer[name] < a and name not in inputs:
                inputs.append(name)
    pinned = [n for n in (s.name for s in parent.model_inputs) if n in inputs]
    linked = [n for n in parent.trace_names if n in inputs and producer[n] >= 0]
    later = {n for step in parent.steps[b:] for n in step.inputs}
    finals = set(parent.output_names)
    produced = [n for step in parent.steps[a:b] for n in step.outputs]
    outputs = [n for n in produced if n in later or n in finals]
    if not outputs:
        raise InvalidInputError(f"segment {index} (steps [{a}, {b})) computes nothing a later step or the job uses")
    specs_in = {s.name: s for s in parent.model_inputs}
    specs_out = {s.name: s for s in parent.model_outputs}

    # A boundary tensor's dtype and shape are whatever its producing step makes; a step that
    # cannot run on what it is given fails its re-check, so nothing here needs to know them.
    def unknown(name: str) -> TensorSpec:
        return TensorSpec(name, "", None)

    refs = tuple(t for t in parent.input_tensors if t.name in pinned)
    pol = parent.policy
    policy = Policy(
        pol.samples,
        pol.precision,
        pol.optimization,
        pol.tolerance,
        pol.step_tolerances[a:b],
        pol.window,
        pol.sign_sensitive,
        pol.window_tolerances[a : b - 1] if pol.window_tolerances else (),
    )
    steps = tuple(
        StepRef(i - a, s.path, s.digest, s.inputs, s.outputs, s.cost, s.nodes)
        for i, s in enumerate(parent.steps)
        if a <= i < b
    )
    return Job(
        job_id=segment_id(parent.job_id, ranges, index),
        nonce=parent.nonce,
        created=parent.created,
        mode=parent.mode,
        model_digest=parent.model_digest,
        model_path=parent.model_path,
        model_inputs=tuple(specs_in[n] for n in pinned) + tuple(unknown(n) for n in linked),
        model_outputs=tuple(specs_out.get(n) or unknown(n) for n in outputs),
        input_digest=tensor_set_digest({r.name: r.digest for r in refs}),
        input_path=parent.input_path,
        input_tensors=refs,
        steps=steps,
        policy=policy,
        base_dir=parent.base_dir,
        version=parent.version,
        segment=Segment(
            parent.job_id,
            index,
            ranges,
            tuple((n, segment_of[producer[n]]) for n in linked),
            tuple(n for n in outputs if n in finals),
            parent,
        ),
    )


def write_segments(job_path: Path, count: int, out_dir: Path, *, overwrite: bool = False) -> list[tuple[Path, Job]]:
    """``verimesh job split --segments``: one pointer file per segment in ``out_dir``."""
    parent = load_job(job_path)
    ranges = plan_segments(parent, count)
    views = [segment_view(parent, ranges, k) for k in range(len(ranges))]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"seg-{k}.json" for k in range(len(ranges))]
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        raise InvalidInputError(f"{existing[0]} already exists", hint="pass --force to overwrite it")
    rel = os.path.relpath(job_path.resolve(), out_dir.resolve())
    for path, view in zip(paths, views, strict=True):
        assert view.segment is not None
        doc = {
            "type": SEGMENT_TYPE,
            "version": SEGMENT_VERSION,
            "job": Path(rel).as_posix(),
            "job_id": parent.job_id,
            "segments": [list(r) for r in ranges],
            "index": view.segment.index,
            "segment_id": view.job_id,
        }
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(doc, indent=2) + "\n")
        partial.replace(path)
    return list(zip(paths, views, strict=True))


def load_segment(doc: dict[str, Any], path: Path) -> Job:
    """The segment a pointer file names, from its parent job (which must be where it says)."""
    what = f"segment file {path}"
    if set(doc) != _POINTER_KEYS or type(doc.get("version")) is not int or doc.get("version") != SEGMENT_VERSION:
        raise InvalidInputError(f"{what} fields differ from the format (version {SEGMENT_VERSION})")
    parent = _parent_of(doc, path, what)
    index = doc["index"]
    if not isinstance(index, int) or isinstance(index, bool):
        raise InvalidInputError(f"{what}: index must be an integer")
    view = segment_view(parent, check_ranges(doc["segments"], len(parent.steps), what=what), index)
    if view.job_id != doc["segment_id"]:
        raise IntegrityError(f"{what}: segment_id does not match the parent job, ranges and index")
    return view


def views_of(parent: Job, ranges: Sequence[Sequence[int]]) -> list[Job]:
    """Every segment of one split (the chain verifier's view, rebuilt from the parent job)."""
    checked = check_ranges(ranges, len(parent.steps))
    return [segment_view(parent, checked, k) for k in range(len(checked))]


# -- shards ----------------------------------------------------------------------------------------


def shard_id(parent_job_id: str, count: int, index: int, input_digest: str) -> str:
    """The id a shard's statement binds: the parent, the number of rows, the row and its input."""
    body = {"job_id": parent_job_id, "count": count, "index": index, "input_digest": input_digest}
    return sha256_bytes(b"verimesh.shard.v1\x00" + canonical_json(body))


def check_batchable(parent: Job) -> None:
    """A whole spot-mode job (version 2) whose model declares a dynamic leading batch axis on every
    input and every output (the outputs of the rows are put back together along it)."""
    if parent.segment is not None or parent.shard is not None:
        raise InvalidInputError("this is already a sub-job; split the parent job")
    if parent.mode != "spot" or parent.version < 2:
        raise InvalidInputError("only spot-mode jobs of version 2 are split into shards (zk jobs are not split)")
    for kind, specs in (("input", parent.model_inputs), ("output", parent.model_outputs)):
        for spec in specs:
            if not spec.shape or (isinstance(spec.shape[0], int) and spec.shape[0] > 0):
                raise InvalidInputError(
                    f"the model's {kind} {spec.name!r} has no dynamic leading batch axis (its shape is "
                    f"{spec.describe()})",
                    hint="export the model with a dynamic first axis (torch.onnx.export(..., dynamic_axes=...))",
                )


def batch_rows(parent: Job, batch: dict[str, Any], *, what: str = "--shards") -> list[dict[str, Any]]:
    """The rows of a batch (arrays named after the model inputs, one leading batch axis each),
    each row keeping a batch axis of 1; the model must declare that axis dynamic."""
    import numpy as np

    check_batchable(parent)
    names = [s.name for s in parent.model_inputs]
    if sorted(batch) != sorted(names):
        raise InvalidInputError(f"{what} holds {sorted(batch)[:5]}; the model's inputs are {names}")
    counts = {int(np.asarray(a).shape[0]) if np.asarray(a).ndim else 0 for a in batch.values()}
    if len(counts) != 1 or not 1 <= next(iter(counts)) <= MAX_SHARDS:
        raise InvalidInputError(f"{what}: every array needs the same leading batch axis of 1..{MAX_SHARDS} rows")
    for ref in parent.input_tensors:
        array = np.asarray(batch[ref.name])
        if array.dtype.name != ref.dtype or tuple(array.shape[1:]) != tuple(ref.shape[1:]):
            raise InvalidInputError(
                f"{what}: rows of {ref.name!r} are {array.dtype.name} {tuple(array.shape[1:])}, the job's input is "
                f"{ref.dtype} {tuple(ref.shape[1:])}"
            )
    count = next(iter(counts))
    return [{n: np.ascontiguousarray(np.asarray(batch[n])[k : k + 1]) for n in names} for k in range(count)]


def shard_view(parent: Job, count: int, index: int, refs: tuple[TensorRef, ...], input_path: str | None = None) -> Job:
    """Shard ``index`` of ``count``: the parent job on the row whose tensors ``refs`` pin."""
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_SHARDS:
        raise InvalidInputError(f"a shard count is 1..{MAX_SHARDS}")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < count:
        raise InvalidInputError(f"shard index {index!r} is not in 0..{count - 1}")
    if parent.mode != "spot" or parent.version < 2 or parent.segment is not None or parent.shard is not None:
        raise InvalidInputError("only a whole spot-mode job of version 2 has shards")
    if [r.name for r in refs] != [s.name for s in parent.model_inputs]:
        raise InvalidInputError("a shard's input tensors must be the model's inputs, in order")
    digest = tensor_set_digest({r.name: r.digest for r in refs})
    return dataclasses.replace(
        parent,
        job_id=shard_id(parent.job_id, count, index, digest),
        input_digest=digest,
        input_tensors=refs,
        input_path=input_path or parent.input_path,
        shard=Shard(parent.job_id, index, count, parent),
    )


def write_shards(job_path: Path, batch_file: Path, out_dir: Path, *, overwrite: bool = False) -> list[tuple[Path, Job]]:
    """``verimesh job split --shards``: a pointer file and an input file per row in ``out_dir``."""

    from verimesh.core.tensors import load_input_file

    parent = load_job(job_path)
    check_batchable(parent)
    batch = load_input_file(batch_file, parent.model_inputs)
    rows = batch_rows(parent, batch)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"shard-{k}.json" for k in range(len(rows))]
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        raise InvalidInputError(f"{existing[0]} already exists", hint="pass --force to overwrite it")
    rel = Path(os.path.relpath(job_path.resolve(), out_dir.resolve())).as_posix()
    written = []
    for k, (path, row) in enumerate(zip(paths, rows, strict=True)):
        refs = tuple(TensorRef.of(s.name, row[s.name]) for s in parent.model_inputs)
        input_file = out_dir / f"shard-{k}.npz"
        input_file.write_bytes(npz_bytes(row))
        view = shard_view(parent, len(rows), k, refs, os.path.relpath(input_file.resolve(), parent.base_dir))
        doc = {
            "type": SHARD_TYPE,
            "version": SEGMENT_VERSION,
            "job": rel,
            "job_id": parent.job_id,
            "count": len(rows),
            "index": k,
            "input": {"path": input_file.name, "tensors": [r.to_json() for r in refs]},
            "shard_id": view.job_id,
        }
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(doc, indent=2) + "\n")
        partial.replace(path)
        written.append((path, view))
    return written


def load_shard(doc: dict[str, Any], path: Path) -> Job:
    """The shard a pointer file names, from its parent job (which must be where it says)."""
    what = f"shard file {path}"
    keys = {"type", "version", "job", "job_id", "count", "index", "input", "shard_id"}
    if set(doc) != keys or type(doc.get("version")) is not int or doc.get("version") != SEGMENT_VERSION:
        raise InvalidInputError(f"{what} fields differ from the format (version {SEGMENT_VERSION})")
    parent = _parent_of(doc, path, what)
    spec = doc["input"]
    if not isinstance(spec, dict) or set(spec) != {"path", "tensors"} or not isinstance(spec["tensors"], list):
        raise InvalidInputError(f"{what}: input must be {{path, tensors}}")
    location = spec["path"]
    if not isinstance(location, str) or location in ("", ".", "..") or "/" in location or "\x00" in location:
        raise InvalidInputError(f"{what}: input path must be a file name beside the shard file")
    refs = tuple(TensorRef.from_json(t, what=f"{what} input tensor") for t in spec["tensors"])
    input_path = os.path.relpath(path.resolve().parent / location, parent.base_dir)
    view = shard_view(parent, doc["count"], doc["index"], refs, input_path)
    if view.job_id != doc["shard_id"]:
        raise IntegrityError(f"{what}: shard_id does not match the parent job, count, index and input")
    return view


def _parent_of(doc: dict[str, Any], path: Path, what: str) -> Job:
    location = doc["job"]
    if not isinstance(location, str) or not location or "\x00" in location or location.startswith("/"):
        raise InvalidInputError(f"{what}: job must be a relative path to the parent job")
    parent_path = path.resolve().parent / location
    if not parent_path.is_file():
        raise InvalidInputError(f"{what}: the parent job {parent_path} is missing", hint="keep parts/ beside the job")
    from verimesh.core.files import read_user_file
    from verimesh.jobs.job import MAX_JOB_BYTES, job_from_bytes

    # The parent is read as a job document, never as another pointer (no chains, no cycles).
    data = read_user_file(parent_path, what="parent job", max_bytes=MAX_JOB_BYTES)
    if b'"verimesh/segment"' in data or b'"verimesh/shard"' in data:
        raise InvalidInputError(f"{what}: its parent {parent_path} is a sub-job itself, not the job that was split")
    parent = job_from_bytes(data, parent_path.resolve().parent, what=f"job {parent_path}")
    if parent.job_id != doc["job_id"]:
        raise IntegrityError(f"{what}: {parent_path} is not the job it was split from (job id mismatch)")
    return parent
