"""Checking a generate job's committed records (docs/format.md §15): the verifier's re-run and
the evidence checker share this, so that evidence re-checks exactly what the verifier found.

One prefill pass over prompt + tokens[:N-1] gives the logits every generated token was chosen
from (row P - 1 + t for position t); each checked position's record is compared with them
(``generation.position_problem``), and the answer's length with the stop rule.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from verimesh.core.digest import tensor_digest
from verimesh.errors import InvalidInputError
from verimesh.jobs.generation import (
    DEFAULT_TOP_K,
    GenerateSpec,
    logits_problem,
    position_problem,
    sequence_logits,
    shape_problem,
    sketch_matrix,
    stop_problem,
)
from verimesh.jobs.job import Job
from verimesh.jobs.runtime import StepRunner
from verimesh.jobs.tolerance import Tolerance

GENERATE_KINDS = ("generate-mismatch", "generate")  # a position's record; the answer's shape or length
GENERATE_FIELDS = ("shape", "stop")


@dataclass(frozen=True)
class RecordCheck:
    ok: bool
    reason: str
    kind: str | None = None  # on a failure: the evidence kind that proves it
    position: int | None = None  # generate-mismatch: the failing position
    field: str | None = None  # generate: shape or stop
    checked: int = 0


def spec_of(job: Job) -> GenerateSpec:
    if job.generate is None:
        raise InvalidInputError("this job is not a generate job")
    return job.generate


def structure(job: Job, tensors: Mapping[str, np.ndarray]) -> RecordCheck:
    """The records' shapes and the answer's length (provable from the sealed tokens alone)."""
    spec = spec_of(job)
    problem = shape_problem(spec, tensors)
    if problem is not None:
        return RecordCheck(False, problem, "generate", field="shape")
    problem = stop_problem(spec, tensors["tokens"][0].tolist())
    if problem is not None:
        return RecordCheck(False, problem, "generate", field="stop")
    count = tensors["tokens"].shape[1]
    return RecordCheck(True, f"{count} tokens, records of the job's shape, length by the stop rule")


def recomputed_logits(job: Job, runner: StepRunner, model: bytes | Callable[[], bytes],
                      tensors: Mapping[str, np.ndarray]) -> np.ndarray:  # fmt: skip
    """[N, vocab]: the logits each generated token was chosen from, by one prefill pass."""
    spec = spec_of(job)
    prompt, tokens = tensors["input_ids"], tensors["tokens"]
    ids = np.concatenate([prompt, tokens[:, :-1]], axis=1).astype(np.int64)
    digest = job.steps[0].digest

    def run(feeds: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
        return runner.run(digest, model, feeds, names)

    rows = sequence_logits(run, spec.layout, ids)
    return rows[prompt.shape[1] - 1 :]


def check_positions(job: Job, logits: np.ndarray, tensors: Mapping[str, np.ndarray],
                    positions: Sequence[int]) -> RecordCheck:  # fmt: skip
    """Each of ``positions`` against the recomputed logits; the first failing one is the claim."""
    spec = spec_of(job)
    tol = job.policy.tolerance_for(0)
    matrix = sketch_matrix(job.nonce, spec.layout.vocab, spec.sketch)
    tokens = tensors["tokens"][0]
    positions = list(positions)
    for t in positions:  # the model's doing, not the node's: no verdict can rest on such logits
        problem = logits_problem(t, logits[t])
        if problem is not None:
            raise InvalidInputError(problem, code="model-inconsistent")
    clear = _clearly_fine(spec, tol, logits, tensors, positions, matrix)
    for t in positions:
        if clear[t]:
            continue
        problem = position_problem(spec, tol, job.nonce, t, logits[t], int(tokens[t]), tensors["topk_values"][t],
                                   tensors["topk_indices"][t], tensors["sketch"][t], matrix)  # fmt: skip
        if problem is not None:
            return RecordCheck(False, problem, "generate-mismatch", position=t, checked=len(positions))
    return RecordCheck(True, f"{len(positions)} of {len(tokens)} positions: top-k, sketch and token as recomputed",
                       checked=len(positions))  # fmt: skip


def _clearly_fine(spec: GenerateSpec, tol: Tolerance, logits: np.ndarray, tensors: Mapping[str, np.ndarray],
                  positions: Sequence[int], matrix: np.ndarray) -> np.ndarray:  # fmt: skip
    """A vectorized pass over every position: True where the record is inside half of every bound
    ``position_problem`` applies (so that check would pass it too); every other position, and any
    non-finite or sampled one, goes through ``position_problem`` itself. A shortcut for the honest
    case only: it can send a position to the full check, never let one past it."""
    count = logits.shape[0]
    fine = np.zeros(count, dtype=bool)
    if not positions or spec.sampling.kind != "greedy" or not np.all(np.isfinite(logits)):
        return fine
    idx = tensors["topk_indices"]
    values, sketches, tokens = tensors["topk_values"], tensors["sketch"], tensors["tokens"][0]
    if not (np.all(np.isfinite(values)) and np.all(np.isfinite(sketches))):
        return fine
    rows = np.asarray(positions)
    vocab = logits.shape[1]
    chosen = idx[rows]
    valid = (chosen >= 0).all(axis=1) & (chosen < vocab).all(axis=1)
    ordered = np.sort(chosen, axis=1)
    valid &= (np.diff(ordered, axis=1) != 0).all(axis=1)
    safe = np.where(valid[:, None], chosen, 0)
    recomputed = logits[rows]
    at = np.take_along_axis(recomputed, safe, axis=1).astype(np.float64)
    largest = np.partition(recomputed, vocab - min(DEFAULT_TOP_K, vocab), axis=1)[:, -min(DEFAULT_TOP_K, vocab) :]
    tie = np.sqrt(2) * (tol.atol + tol.max_rel_frobenius * np.linalg.norm(largest.astype(np.float64), axis=1))

    def within(got: np.ndarray, want: np.ndarray) -> np.ndarray:
        diff = np.abs(got.astype(np.float64) - want)
        outside = (diff > 0.5 * (np.abs(want) * tol.rtol + tol.atol)).mean(axis=1)
        fro = np.linalg.norm(diff, axis=1) / np.maximum(np.linalg.norm(want, axis=1), 1e-30)
        return np.asarray((outside <= tol.max_outside_fraction) & (fro <= 0.5 * tol.max_rel_frobenius), dtype=bool)

    ok = valid & within(values[rows], at)
    others = recomputed.astype(np.float64).copy()
    np.put_along_axis(others, safe, -np.inf, axis=1)
    ok &= others.max(axis=1) <= at.min(axis=1) + 0.5 * tie
    bound = tol.atol + tol.max_rel_frobenius * np.linalg.norm(recomputed.astype(np.float64), axis=1)
    drift = np.abs(sketches[rows].astype(np.float64) - recomputed.astype(np.float64) @ matrix.astype(np.float64))
    ok &= drift.max(axis=1) <= 0.5 * bound
    picked = np.take_along_axis(recomputed, tokens[rows][:, None].clip(0, vocab - 1), axis=1)[:, 0]
    ok &= (tokens[rows] >= 0) & (tokens[rows] < vocab) & (picked >= recomputed.max(axis=1) - 0.5 * tie)
    fine[rows[ok]] = True
    return fine


def check_evidence_claim(kind: str, step: object, field: object, job: Job, tensors: Mapping[str, np.ndarray],
                         models: Mapping[int, bytes]) -> tuple[bool, str]:  # fmt: skip
    """(proves fraud, reason) of a generate claim over the sealed records it carries."""
    needed = {"input_ids", "tokens", "topk_values", "topk_indices", "sketch"} if kind == "generate-mismatch" else {
        "tokens", "topk_values", "topk_indices", "sketch"}  # fmt: skip
    if set(tensors) != needed:
        return False, f"{kind} evidence must carry exactly the sealed {', '.join(sorted(needed))}"
    if "input_ids" in tensors and tensor_digest("input_ids", tensors["input_ids"]) != job.input_tensors[0].digest:
        return False, "the sealed input_ids are not the job's prompt: that is a binding claim, not this one"
    shaped = structure(job, tensors)
    if kind == "generate":
        if field not in GENERATE_FIELDS:
            raise InvalidInputError(f"generate evidence field {field!r} is unknown")
        if shaped.ok or shaped.field != field:
            return False, f"the records' {field} is as the job asks" if shaped.ok else (
                f"that is a {shaped.field} claim, not this one")  # fmt: skip
        return True, shaped.reason
    if not shaped.ok:
        return False, f"the records fail their {shaped.field} check: that is a generate claim, not this one"
    count = tensors["tokens"].shape[1]
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < count:
        raise InvalidInputError("evidence position is out of range")
    if set(models) != {0}:
        return False, "generate-mismatch evidence must carry the job's model"
    runner = StepRunner(device="cpu", precision=job.policy.precision, optimization=job.policy.optimization)
    logits = recomputed_logits(job, runner, models[0], tensors)
    found = check_positions(job, logits, tensors, [step])
    if found.ok:
        return False, f"position {step}'s record matches the recomputed logits; no fraud shown"
    return True, found.reason
