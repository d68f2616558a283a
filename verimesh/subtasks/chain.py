"""Verifying a job run as segments by several nodes (docs/design.md §9, docs/format.md §13).

``verify_chain`` takes one bundle per segment, the parent job and the key of the node expected
for each bundle. The split is read from the statements (they all must name the same one, of
this job, covering every step once); each segment is then checked as a job of its own against
the view rebuilt from the parent job, and every link between segments is checked: the statement
a segment names as the one it built on is the statement of the bundle given for that segment,
and each tensor it took is that segment's signed output.

Sampling is over the whole job: the last step of every segment (what the next node builds on)
and every step producing a model output always, plus the verifier's ``samples`` drawn by cost
over all steps; each segment re-checks its share.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from verimesh.core.container import DEFAULT_LIMITS, Limits
from verimesh.errors import InvalidInputError
from verimesh.jobs.bundle import Bundle, read_bundle
from verimesh.jobs.job import Job, load_job
from verimesh.jobs.runtime import StepRunner
from verimesh.jobs.segments import check_ranges, views_of
from verimesh.jobs.verdict import Check, Verdict
from verimesh.signing.keys import PublicKey, load_public_key
from verimesh.spot.evidence import store_evidence
from verimesh.spot.sealed_evidence import write_link_evidence
from verimesh.spot.spotcheck import derived_seed, mandatory_steps, sample_steps, seeded_rng
from verimesh.workflows import Samples, verify_parsed

Status = Literal["accept", "reject", "error"]


@dataclass(frozen=True)
class SegmentResult:
    """One segment's verification inside a chain."""

    index: int
    bundle: str
    step_range: tuple[int, int]
    verdict: Verdict
    statement: str  # digest of the node's signed statement
    public: PublicKey
    input_digest: str = ""  # the sub-job's pinned input (a shard's row)

    @property
    def sampled_steps(self) -> tuple[int, ...]:
        """The steps re-checked, as indices of the parent job."""
        return tuple(self.step_range[0] + i for i in self.verdict.sampled_steps)

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "bundle": self.bundle,
            "step_range": list(self.step_range),
            "node_id": self.public.node_id,
            "statement": self.statement,
            "input_digest": self.input_digest,
            "sampled_steps": list(self.sampled_steps),
            **{k: v for k, v in self.verdict.to_json().items() if k in ("verdict", "reason", "evidence", "checks")},
        }


@dataclass(frozen=True)
class ChainVerdict:
    """The verdict on a whole split job: its own checks (the split, the links) and each segment's."""

    status: Status
    checks: tuple[Check, ...]
    job_id: str
    seed: int
    segments: tuple[SegmentResult, ...] = ()
    outputs: dict[str, str] = field(default_factory=dict)
    link_evidence: str | None = None  # a broken link the later node's signature proves
    kind: str = "segments"  # or "shards": one sub-job per row of a batch

    def __post_init__(self) -> None:
        if self.status == "accept" and (
            not self.checks
            or not all(c.ok for c in self.checks)
            or not self.segments
            or not all(s.verdict for s in self.segments)
        ):
            raise ValueError("an accepting chain verdict needs every check and every segment accepted")

    def __bool__(self) -> bool:
        return self.status == "accept"

    @property
    def reason(self) -> str:
        for check in self.checks:
            if not check.ok:
                return f"{check.name}: {check.detail}"
        for seg in self.segments:
            if not seg.verdict:
                return f"segment {seg.index}: {seg.verdict.reason}"
        if self.status != "accept":
            return "no checks ran"
        return "every shard checked" if self.kind == "shards" else "every segment and every link checked"

    @property
    def evidence(self) -> str | None:
        found = (s.verdict.evidence for s in self.segments if s.verdict.evidence)
        return self.link_evidence or next(found, None)

    def to_json(self) -> dict[str, Any]:
        return {
            "verdict": self.status,
            "reason": self.reason,
            "job_id": self.job_id,
            "kind": self.kind,
            "seed": self.seed,
            "outputs": self.outputs,
            "evidence": self.evidence,
            "checks": [c.to_json() for c in self.checks],
            "segments": [s.to_json() for s in self.segments],
        }


def _start(
    job: Job | Path, bundles: Sequence[Path], node_keys: Sequence[PublicKey | Path], seed: int | None
) -> tuple[Job, list[PublicKey], int]:
    """The parent job (a whole job), one key per bundle, and the verifier's seed."""
    parent = job if isinstance(job, Job) else load_job(job)
    if parent.segment is not None or parent.shard is not None:
        raise InvalidInputError("verify a split job against the job that was split, not one of its sub-jobs")
    if not bundles:
        raise InvalidInputError("a split job needs at least one bundle")
    if len(node_keys) != len(bundles):
        raise InvalidInputError(f"{len(bundles)} bundles need {len(bundles)} node keys, one per bundle, in order")
    keys = [k if isinstance(k, PublicKey) else load_public_key(k) for k in node_keys]
    return parent, keys, seed if seed is not None else int.from_bytes(os.urandom(8), "big") >> 11


def _read_all(bundles: Sequence[Path], limits: Limits, version: int) -> list[Bundle] | Check:
    """Every bundle read within limits, or the check naming the first that is malformed."""
    parsed = []
    for path in bundles:
        try:
            parsed.append(read_bundle(path, limits=limits, version=version))
        except InvalidInputError as exc:
            return Check("bundle-format", False, f"{path}: {exc.message}")
    return parsed


def _claims(parsed: Sequence[Bundle], names: Sequence[str]) -> list[dict[str, Any]] | Check:
    """Each bundle's claimed place in a split (unauthenticated until its segment is verified)."""
    claims = []
    for bundle, name in zip(parsed, names, strict=True):
        try:
            pred = bundle.envelope.statement()["predicate"]
        except InvalidInputError as exc:
            return Check("split", False, f"{name}: {exc.message}")
        claim = pred.get("segment")
        if not isinstance(claim, dict) or type(claim.get("index")) is not int:
            return Check("split", False, f"{name} is not a bundle of a segment (its statement claims no split)")
        claims.append(claim)
    return claims


def verify_chain(
    bundles: Sequence[Path],
    *,
    job: Job | Path,
    node_keys: Sequence[PublicKey | Path],
    samples: Samples = None,
    seed: int | None = None,
    evidence_out: Path | None = None,
    runner: StepRunner | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> tuple[ChainVerdict, dict[str, np.ndarray]]:
    """Verify a split job from one bundle per segment; ``node_keys[i]`` is the key of the node
    expected to have signed ``bundles[i]`` (bundles may come in any order). Returns the chain
    verdict and, on an accept, the job's output values.

    1. Read every bundle (a malformed container is an ``error``).
    2. The split: every statement names this job and the same ranges, each segment exactly once.
    3. Sample over the whole job (see the module docstring).
    4. Verify each segment, in order, against its view (signature by its node, bindings, seal,
       its share of the sample); stop at the first reject.
    5. Check every link against the bundle of the segment it names.
    """
    parent, keys, seed = _start(job, bundles, node_keys, seed)
    checks: list[Check] = []

    def done(status: Status, segments: Sequence[SegmentResult] = ()) -> tuple[ChainVerdict, dict[str, np.ndarray]]:
        return ChainVerdict(status, tuple(checks), parent.job_id, seed, tuple(segments)), {}

    # 1.
    parsed = _read_all(bundles, limits, parent.version)
    if isinstance(parsed, Check):
        checks.append(parsed)
        return done("error")
    names = [str(p) for p in bundles]
    # 2.
    claims = _claims(parsed, names)
    if isinstance(claims, Check):
        checks.append(claims)
        return done("reject")
    split_check = _check_split(parent, claims, names)
    checks.append(split_check)
    if not split_check.ok:
        return done("reject")
    ranges = check_ranges(claims[0]["segments"], len(parent.steps))
    views = views_of(parent, ranges)
    order = sorted(range(len(bundles)), key=lambda i: int(claims[i]["index"]))
    # 3.
    # Each segment's mandatory steps (first, last, every producer of what later segments consume)
    # are re-run whatever the draw; the verifier's budget is drawn by cost over the others.
    always = [a + i for view, (a, _) in zip(views, ranges, strict=True) for i in mandatory_steps(view)]
    k = len(parent.steps) if samples == "all" else parent.policy.samples if samples is None else samples
    if not isinstance(k, int) or k < 0:
        raise InvalidInputError("samples must be a non-negative integer or 'all'")
    sampled = sample_steps(parent, k, seeded_rng(seed), also=always)
    checks.append(Check("sampling", True, f"seed {seed}: steps {list(sampled)} of {len(parent.steps)}"))
    # 4.
    results: list[SegmentResult] = []
    values: dict[str, np.ndarray] = {}
    for i in order:
        view = views[int(claims[i]["index"])]
        a, b = ranges[int(claims[i]["index"])]
        verdict, outputs = verify_parsed(
            parsed[i], job=view, public=keys[i], seed=seed, evidence_out=evidence_out, runner=runner,
            steps=[g - a for g in sampled if a <= g < b],
        )  # fmt: skip
        results.append(SegmentResult(int(claims[i]["index"]), names[i], (a, b), verdict,
                                     parsed[i].envelope.statement_digest(), keys[i], view.input_digest))  # fmt: skip
        if not verdict:
            return done("reject" if verdict.status == "reject" else "error", results)
        values.update(outputs)
    # 5.
    link_check, writer = _check_links([parsed[i] for i in order], results, views)
    checks.append(link_check)
    if not link_check.ok:
        evidence = None
        if writer is not None:
            path, problem = store_evidence(writer, out=evidence_out)
            evidence = str(path)
            if problem:
                checks.append(Check("evidence", True, problem))
        return ChainVerdict("reject", tuple(checks), parent.job_id, seed, tuple(results), link_evidence=evidence), {}
    finals = {n: d for r in results for n, d in r.verdict.outputs.items() if n in parent.output_names}
    digests = {n: finals[n] for n in parent.output_names}
    chain = ChainVerdict("accept", tuple(checks), parent.job_id, seed, tuple(results), digests)
    return chain, {n: values[n] for n in parent.output_names}


def _check_split(parent: Job, claims: Sequence[dict[str, Any]], names: Sequence[str]) -> Check:
    for claim, name in zip(claims, names, strict=True):
        if claim.get("job_id") != parent.job_id:
            return Check("split", False, f"{name} is a segment of another job", parent.job_id, str(claim.get("job_id")))
        if claim.get("segments") != claims[0].get("segments"):
            return Check("split", False, f"{name} claims another split than {names[0]}",
                         str(claims[0].get("segments"))[:200], str(claim.get("segments"))[:200])  # fmt: skip
    try:
        ranges = check_ranges(claims[0].get("segments"), len(parent.steps), what="the split the bundles claim")
    except InvalidInputError as exc:
        return Check("split", False, exc.message)
    indices = [claim["index"] for claim in claims]
    for k in range(len(ranges)):
        if indices.count(k) > 1:
            return Check("split", False, f"segment {k} (steps [{ranges[k][0]}, {ranges[k][1]})) is given twice")
    missing = [k for k in range(len(ranges)) if k not in indices]
    if missing or len(indices) != len(ranges):
        what = ", ".join(f"{k} (steps [{ranges[k][0]}, {ranges[k][1]}))" for k in missing) or "none"
        return Check("split", False, f"the split has {len(ranges)} segments; missing: {what}")
    return Check("split", True, f"{len(ranges)} segments: " + " ".join(f"[{a},{b})" for a, b in ranges))


def _check_links(
    parsed: Sequence[Bundle], results: Sequence[SegmentResult], views: Sequence[Job]
) -> tuple[Check, Callable[[Path], object] | None]:
    """Each verified segment's links against the verified bundles they name (segments in order).
    A statement digest that is not the given bundle's is blamed on no one (the predecessor may
    have signed two); a tensor the named statement does not sign is the later node's doing,
    proven by the two envelopes (link evidence)."""
    count = 0
    for bundle, result in zip(parsed, results, strict=True):
        links = bundle.envelope.statement()["predicate"]["segment"]["links"]
        for link in links:
            j = int(link["segment"])
            source = results[j]
            same = all(source.verdict.outputs.get(n) == d for n, d in link["tensors"].items())
            if link["statement"] != source.statement and not same:
                detail = (
                    f"segment {result.index} built on a statement of segment {j} that is not the one in "
                    f"{source.bundle} (segment {j}'s node signed another, or segment {result.index}'s link is wrong)"
                )
                return Check(f"link-{j}-{result.index}", False, detail, source.statement, str(link["statement"])), None
            # Built on another statement of segment j with the same tensors: what it took is what the
            # verified bundle of segment j signs, and that is all the chain's soundness needs.
            for name, digest in link["tensors"].items():
                if source.verdict.outputs.get(name) != digest:
                    detail = f"segment {result.index} took {name!r} that segment {j} never committed"
                    check = Check(f"link-{j}-{result.index}", False, detail, source.verdict.outputs.get(name), digest)
                    return check, _link_writer(views[result.index], bundle, result.public, parsed[j], detail, name)
            count += 1
    return Check("links", True, f"{count} links: each segment built on its predecessors' signed outputs"), None


def _link_writer(
    view: Job, bundle: Bundle, public: PublicKey, linked: Bundle, reason: str, tensor: str
) -> Callable[[Path], object]:
    return lambda path: write_link_evidence(
        path, job=view, envelope=bundle.envelope, public=public, linked=linked.envelope, reason=reason, tensor=tensor
    )


def verify_shards(
    bundles: Sequence[Path],
    *,
    job: Job | Path,
    node_keys: Sequence[PublicKey | Path],
    batch: Mapping[str, np.ndarray] | Path,
    samples: Samples = None,
    seed: int | None = None,
    evidence_out: Path | None = None,
    runner: StepRunner | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> tuple[ChainVerdict, dict[str, np.ndarray]]:
    """Verify a job split into shards (one per row of ``batch``, the file the job owner split):
    one bundle per row, each checked as a whole job on its row under its node's key (with the
    verifier's sampling per shard); on an accept, the outputs reassembled into the batch.

    1. Read every bundle. 2. ``shards``: every statement claims a shard of this job and this
    batch's row count, each row exactly once. 3. Verify each shard in row order, each with its
    own seed ``derived_seed(seed, row)``; stop at the first reject. 4. Concatenate each output
    along the batch axis."""
    from verimesh.core.digest import tensor_digest
    from verimesh.core.tensors import TensorRef, load_input_file
    from verimesh.jobs.segments import batch_rows, shard_view

    parent, keys, seed = _start(job, bundles, node_keys, seed)
    values = load_input_file(batch, parent.model_inputs) if isinstance(batch, Path) else dict(batch)
    rows = batch_rows(parent, values)
    checks: list[Check] = []

    def done(status: Status, segments: Sequence[SegmentResult] = ()) -> tuple[ChainVerdict, dict[str, np.ndarray]]:
        return ChainVerdict(status, tuple(checks), parent.job_id, seed, tuple(segments), kind="shards"), {}

    parsed = _read_all(bundles, limits, parent.version)
    if isinstance(parsed, Check):
        checks.append(parsed)
        return done("error")
    names = [str(p) for p in bundles]
    indices: list[int] = []
    for bundle, name in zip(parsed, names, strict=True):
        try:
            claim = bundle.envelope.statement()["predicate"].get("shard")
        except InvalidInputError as exc:
            checks.append(Check("shards", False, f"{name}: {exc.message}"))
            return done("reject")
        if not isinstance(claim, dict) or claim.get("job_id") != parent.job_id or claim.get("count") != len(rows):
            detail = f"{name} is not a shard of this job over a batch of {len(rows)} rows"
            checks.append(Check("shards", False, detail))
            return done("reject")
        index = claim.get("index")
        if (
            type(index) is not int
            or type(claim.get("count")) is not int
            or not 0 <= index < len(rows)
            or index in indices
        ):
            checks.append(Check("shards", False, f"{name}: shard index {index!r} is out of range or given twice"))
            return done("reject")
        indices.append(index)
    missing = [k for k in range(len(rows)) if k not in indices]
    if missing:
        checks.append(Check("shards", False, f"the batch has {len(rows)} rows; missing shards: {missing[:10]}"))
        return done("reject")
    checks.append(Check("shards", True, f"{len(rows)} shards, one per row"))
    results: list[SegmentResult] = []
    produced: list[dict[str, np.ndarray]] = []
    for i in sorted(range(len(bundles)), key=lambda i: indices[i]):
        k = indices[i]
        refs = tuple(TensorRef.of(s.name, rows[k][s.name]) for s in parent.model_inputs)
        view = shard_view(parent, len(rows), k, refs)
        # Each shard draws with its own seed (derived from the verification's): the shards share
        # steps and costs, and one draw for all would let one tampered step pass in every row.
        verdict, outputs = verify_parsed(parsed[i], job=view, public=keys[i], samples=samples,
                                         seed=derived_seed(seed, k), evidence_out=evidence_out,
                                         runner=runner)  # fmt: skip
        results.append(SegmentResult(k, names[i], (0, len(parent.steps)), verdict,
                                     parsed[i].envelope.statement_digest(), keys[i], view.input_digest))  # fmt: skip
        if not verdict:
            return done("reject" if verdict.status == "reject" else "error", results)
        produced.append(outputs)
    try:
        batched = {n: np.concatenate([p[n] for p in produced], axis=0) for n in parent.output_names}
    except ValueError as exc:  # outputs without a batch axis to join along
        checks.append(Check("outputs", False, f"the shards' outputs do not join along a batch axis: {exc}"))
        return done("reject", results)
    digests = {n: tensor_digest(n, a) for n, a in batched.items()}
    checks.append(Check("outputs", True, f"{len(produced)} rows joined along the batch axis"))
    return ChainVerdict("accept", tuple(checks), parent.job_id, seed, tuple(results), digests, kind="shards"), batched


def whole_verdict(verdict: Verdict, *, bundle: Path, job: Job, public: PublicKey) -> ChainVerdict:
    """A whole job's verdict in the shape a receipt records (kind ``whole``: one sub-task, the job)."""
    if job.segment is not None or job.shard is not None:
        raise InvalidInputError("a whole-job verdict is for a job that was not split")
    statement = read_bundle(bundle, version=job.version).envelope.statement_digest()
    seg = SegmentResult(0, str(bundle), (0, len(job.steps)), verdict, statement, public, job.input_digest)
    outputs = dict(verdict.outputs) if verdict else {}
    return ChainVerdict(verdict.status, verdict.checks, job.job_id, int(verdict.seed or 0), (seg,), outputs,
                        kind="whole")  # fmt: skip


def verify_whole(
    bundle: Path, *, job: Job | Path, node_key: PublicKey, samples: Samples = None, seed: int | None = None
) -> ChainVerdict:
    """``verify`` of one whole-job bundle, as a receipt records it (``receipt check --full``)."""
    from verimesh.workflows import verify

    parent = job if isinstance(job, Job) else load_job(job)
    verdict = verify(bundle, job=parent, node_key=node_key, samples=samples, seed=seed)
    return whole_verdict(verdict, bundle=bundle, job=parent, public=node_key)
