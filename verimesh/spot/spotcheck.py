"""Spot-check mechanism (docs/design.md §4): run steps, commit to the trace, sample, recheck.

These are the building blocks; ``workflows`` composes them into ``prove`` and ``verify``.
The commitment is an RFC 9162 Merkle tree whose i-th leaf is the 32 raw bytes of the i-th trace
tensor's digest (trace order: model inputs, then each step's outputs).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from verimesh.core import merkle
from verimesh.core.digest import format_digest, parse_digest
from verimesh.core.tensors import TensorRef
from verimesh.errors import StepExecutionError
from verimesh.jobs.bundle import SEAL_ALGORITHM
from verimesh.jobs.job import Job
from verimesh.jobs.runtime import StepRunner
from verimesh.jobs.tolerance import Comparison, Tolerance, compare_tensors

# By job (and bundle) version: version 2 signs a root over every sealed member of the bundle.
PREDICATE_TYPES = {1: "https://verimesh.dev/spot-check/v1", 2: "https://verimesh.dev/spot-check/v2"}
COMMITMENT_ALGORITHMS = {1: "rfc9162-sha256/tensor-digest-leaves", 2: SEAL_ALGORITHM}
PREDICATE_TYPE, COMMITMENT_ALGORITHM = PREDICATE_TYPES[1], COMMITMENT_ALGORITHMS[1]

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Commitment:
    entries: tuple[TensorRef, ...]
    leaf_hashes: tuple[bytes, ...]
    root: bytes

    @property
    def root_digest(self) -> str:
        return format_digest(self.root)


def run_steps(
    job: Job,
    step_models: Sequence[bytes] | None,
    inputs: Mapping[str, np.ndarray],
    runner: StepRunner,
    *,
    progress: Progress | None = None,
    on_tensor: Callable[[str, np.ndarray], None] | None = None,
) -> dict[str, np.ndarray]:
    """Run every step in order from the job input; returns every trace tensor by name.

    ``step_models=None`` reads (and digest-checks) a step file only when ``runner`` has no
    session for that step's digest yet. ``on_tensor`` sees each trace tensor in trace order as
    soon as it exists (the worker streams them into the bundle)."""
    trace: dict[str, np.ndarray] = dict(inputs)
    if on_tensor:
        for spec in job.model_inputs:
            on_tensor(spec.name, trace[spec.name])
    for step in job.steps:
        blob: bytes | Callable[[], bytes] = (
            step_models[step.index] if step_models is not None else (lambda i=step.index: job.read_step_model(i))
        )
        produced = runner.run(step.digest, blob, {n: trace[n] for n in step.inputs}, step.outputs)
        trace.update(produced)
        if on_tensor:
            for name in step.outputs:
                on_tensor(name, produced[name])
        if progress:
            progress(step.index + 1, len(job.steps))
    return trace


def commit_entries(entries: Sequence[TensorRef]) -> Commitment:
    """The commitment over already-digested trace entries (in trace order)."""
    leaves = tuple(merkle.leaf_hash(parse_digest(e.digest)) for e in entries)
    return Commitment(tuple(entries), leaves, merkle.root_from_leaf_hashes(leaves))


def spot_predicate(
    job: Job, *, node_id: str, runner: StepRunner, root: bytes, leaves: int, proof_digest: str | None = None,
    links: Sequence[Mapping[str, object]] = (),
) -> dict[str, object]:  # fmt: skip
    """The signed claim. Version 1 also names trace.json's digest (its root covers only the
    declared tensor digests); in version 2 the root covers every member, trace.json included.
    A segment also names its split and, per earlier segment it took inputs from, the digest of
    that segment's signed statement and of each tensor taken (``links``, docs/format.md §13)."""
    from verimesh.jobs.runtime import onnxruntime_version

    predicate: dict[str, object] = {
        "job_id": job.job_id,
        "mode": "generate" if job.mode == "generate" else "spot",
        "node_id": node_id,
        "model_digest": job.model_digest,
        "input_digest": job.input_digest,
        "step_range": job.step_range,
        "runtime": {
            "onnxruntime": onnxruntime_version(),
            "provider": runner.provider,
            "precision": runner.precision,
            "optimization": runner.optimization,
        },
        "commitment": {"algorithm": COMMITMENT_ALGORITHMS[job.version], "root": format_digest(root), "leaves": leaves},
    }
    if job.version == 1:
        predicate["proof_digest"] = proof_digest
    if job.segment is not None:
        predicate["segment"] = segment_claim(job, links)
    if job.shard is not None:
        predicate["shard"] = shard_claim(job)
    return predicate


def shard_claim(job: Job) -> dict[str, object]:
    """The ``shard`` member of a shard's predicate."""
    assert job.shard is not None
    return {"job_id": job.shard.parent_job_id, "count": job.shard.count, "index": job.shard.index}


def segment_claim(job: Job, links: Sequence[Mapping[str, object]]) -> dict[str, object]:
    """The ``segment`` member of a segment's predicate."""
    assert job.segment is not None
    return {
        "job_id": job.segment.parent_job_id,
        "segments": [list(r) for r in job.segment.ranges],
        "index": job.segment.index,
        "links": [dict(link) for link in links],
    }


def mandatory_steps(job: Job) -> tuple[int, ...]:
    """The steps every verification re-runs: the last one and every step that produces a model
    output (a model with two heads computes one of them early; a wrong value there must not hide
    behind the sampling); for a segment, its first step and every step producing a tensor later
    segments consume."""
    last = len(job.steps) - 1
    if job.segment is not None:
        # A segment also answers for everything later segments build on (every step producing one
        # of its outputs) and for its first step, which no window from the segment before covers.
        outputs = set(job.output_names)
        return tuple(s.index for s in job.steps if s.index in (0, last) or outputs.intersection(s.outputs))
    outputs = set(job.final_output_names)
    return tuple(s.index for s in job.steps if s.index == last or outputs.intersection(s.outputs))


def sample_steps(job: Job, samples: int | None, rng: random.Random, *, also: Sequence[int] = ()) -> tuple[int, ...]:
    """The mandatory steps (``mandatory_steps``, and ``also``) always, plus ``samples`` more drawn
    without replacement, weighted by cost.

    ``None`` means every step. Weighted sampling without replacement uses the Efraimidis-Spirakis
    keys u^(1/w); the randomness is the verifier's alone (``rng``), never the worker's.
    """
    always = set(mandatory_steps(job)) | set(also)
    others = [step for step in job.steps if step.index not in always]
    if samples is None or samples >= len(others):
        return tuple(range(len(job.steps)))
    keyed = []
    for step in others:
        weight = max(step.cost, 1)
        keyed.append((rng.random() ** (1.0 / weight), step.index))
    chosen = {index for _, index in sorted(keyed, reverse=True)[:samples]}
    return tuple(sorted(chosen | always))


def commitment_members(job: Job) -> tuple[str, ...]:
    """What a node uploads first in challenge mode (docs/design.md §10): trace.json and the output
    tensors (the statement signs the root and names the outputs as its subjects)."""
    from verimesh.jobs.bundle import tensor_member

    names = job.trace_names
    return ("trace.json", *(tensor_member(names.index(n)) for n in job.output_names))


def challenged_members(job: Job, sampled: Sequence[int]) -> tuple[str, ...]:
    """The members a re-check of ``sampled`` reads beyond ``commitment_members``: each sampled
    step's inputs and outputs and, with a window of 2, those of the step after it."""
    from verimesh.jobs.bundle import tensor_member

    names = job.trace_names
    wanted: dict[str, None] = {}
    for index in sorted(sampled):
        for i in (index, index + 1) if job.policy.window >= 2 else (index,):
            if i < len(job.steps):
                wanted.update(dict.fromkeys((*job.steps[i].inputs, *job.steps[i].outputs)))
    return tuple(sorted({tensor_member(names.index(n)) for n in wanted} - set(commitment_members(job))))


def derived_seed(seed: int, index: int) -> int:
    """Sub-task ``index``'s own seed from a verification's seed (53 bits, JSON-safe): shards that
    share steps and costs must not all re-check the same steps."""
    material = hashlib.sha256(b"verimesh.subtask-seed.v1\x00%d\x00%d" % (seed, index)).digest()
    return int.from_bytes(material[:8], "big") >> 11


def seeded_rng(seed: int) -> random.Random:
    """Mersenne Twister seeded from SHA-256 of the seed, so audits replay on any platform."""
    material = hashlib.sha256(b"verimesh.sample.v1\x00" + str(seed).encode()).digest()
    return random.Random(int.from_bytes(material, "big"))


@dataclass(frozen=True)
class StepCheck:
    """One re-check: ``index`` the step compared; ``window`` when it ran from the verifier's own
    outputs of the step before; ``failed`` when the step could not run on its inputs at all."""

    index: int
    ok: bool
    comparisons: tuple[Comparison, ...]
    recomputed: Mapping[str, np.ndarray] = field(default_factory=dict, repr=False)
    window: bool = False
    failed: str | None = None

    @property
    def reason(self) -> str:
        if self.failed:
            return f"step {self.index} does not run on its committed inputs: {self.failed}"
        return "; ".join(c.reason for c in self.comparisons if not c.ok)


def recheck_step(
    job: Job,
    index: int,
    step_model: bytes | Callable[[], bytes],
    trace: Mapping[str, np.ndarray],
    runner: StepRunner,
    tolerance: Tolerance,
    *,
    feeds: Mapping[str, np.ndarray] | None = None,
    sign_sensitive: frozenset[str] = frozenset(),
    compare: bool = True,
) -> StepCheck:
    """Re-run one step and compare with its committed outputs.

    By default the step runs from its committed inputs. ``feeds`` overrides some of them: the
    window check runs step i + 1 from the verifier's own outputs of step i, which catches a
    boundary value nudged within the tolerance where the next step turns it into another result.
    A step that cannot run on committed inputs (an index out of range, a shape that does not fit)
    fails the check: the job's own input ran when the job was made, so only a wrong commitment
    gets there. A failure of the machine (memory) is not a check result and propagates.
    ``compare=False`` only runs the step (the first step of a window whose outputs are not at hand)."""
    step = job.steps[index]
    inputs = {n: (feeds[n] if feeds is not None and n in feeds else trace[n]) for n in step.inputs}
    try:
        recomputed = runner.run(step.digest, step_model, inputs, step.outputs)
    except StepExecutionError as exc:
        if not exc.data_dependent:
            raise
        return StepCheck(index, False, (), {}, feeds is not None, exc.message)
    if not compare:
        return StepCheck(index, True, (), recomputed, feeds is not None)
    outputs = set(job.final_output_names)
    comparisons = tuple(
        compare_tensors(n, trace[n], recomputed[n], tolerance, discrete=n in outputs, zero_sign=n in sign_sensitive)
        for n in step.outputs
    )
    return StepCheck(index, all(c.ok for c in comparisons), comparisons, recomputed, feeds is not None)
