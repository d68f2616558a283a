"""Evidence against a sealed (format 2) bundle: docs/format.md §8.

A format 2 bundle's signed root covers every member before the envelope, so anything wrong in
those members is the node's doing and can be proven from a few of them: each is carried with
its RFC 9162 inclusion proof under the signed root, and ``trace.json`` (also sealed) says what
each tensor member is. A container with members, in this order::

    evidence.json            canonical JSON: type, version 2, kind, step, field, reason,
                             members: [{name, index, inclusion_proof}, ...]
    envelope.json            the node's signed DSSE envelope
    node.pub.json            the node's public key
    job.json                 the job (version 2), canonical JSON
    steps/NNNNNN.onnx        the step models the claim re-runs
    sealed/<member name>     each sealed member named in evidence.json, byte for byte

Kinds: ``step-mismatch`` (step k re-run from its committed inputs does not give its committed
outputs, or does not run on them at all), ``window-mismatch`` (step k + 1 run from the
verifier's own outputs of step k does not give its committed outputs: a boundary nudged inside
the tolerance that the next step turns into another result), ``binding`` (the signed statement or
a sealed tensor contradicts the job: model or input digest, a committed input, an output that is
not its signed subject) and ``malformed`` (the sealed members are not a trace of the job:
trace.json unreadable or naming other tensors, a tensor whose bytes do not fit its shape).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from verimesh.core import merkle
from verimesh.core.canonical import b64decode_strict, b64encode, canonical_json
from verimesh.core.container import write_container
from verimesh.core.digest import member_leaf, parse_digest, sha256_bytes, tensor_digest
from verimesh.core.tensors import TensorRef
from verimesh.errors import InvalidInputError
from verimesh.jobs.bundle import SEAL_ALGORITHM, Bundle, decode_tensor, tensor_member, trace_specs
from verimesh.jobs.job import Job
from verimesh.jobs.modelsafety import check_model_bytes
from verimesh.signing.envelope import Envelope
from verimesh.signing.keys import PublicKey
from verimesh.spot.generate import GENERATE_KINDS, check_evidence_claim

if TYPE_CHECKING:
    from verimesh.spot.evidence import EvidenceResult

EVIDENCE_TYPE = "verimesh/evidence"
SEALED_KINDS = ("step-mismatch", "window-mismatch", "binding", "malformed", "link", "generate-mismatch", "generate")
BINDING_FIELDS = ("model_digest", "input_digest", "input-tensor", "output-subject", "link-tensor")
LINKED_ENVELOPE = "linked.envelope.json"


def job_document(job: Job) -> tuple[bytes, dict[str, Any]]:
    """What evidence carries to name its job: the job's canonical document, or for a segment its
    parent's and ``{"segment": {segments, index}}`` for evidence.json, for a shard the parent's
    and ``{"shard": {count, index, tensors}}`` (the checker rebuilds the sub-job from them)."""
    if job.shard is not None:
        assert job.shard.parent is not None
        row = {"count": job.shard.count, "index": job.shard.index, "tensors": [t.to_json() for t in job.input_tensors]}
        return job.shard.parent.canonical_bytes(), {"shard": row}
    if job.segment is None:
        return job.canonical_bytes(), {}
    assert job.segment.parent is not None
    split = {"segments": [list(r) for r in job.segment.ranges], "index": job.segment.index}
    return job.segment.parent.canonical_bytes(), {"segment": split}


MALFORMED_FIELDS = ("trace", "tensor", "members")


def step_member(index: int) -> str:
    return f"steps/{index:06d}.onnx"


def write_sealed_evidence(
    path: Path,
    *,
    kind: str,
    job: Job,
    bundle: Bundle,
    public: PublicKey,
    reason: str,
    members: Sequence[str],
    step: int | None = None,
    field: str | None = None,
    step_models: Sequence[tuple[int, bytes]] = (),
) -> None:
    """Write evidence carrying ``members`` of the sealed ``bundle`` with their inclusion proofs."""
    records = []
    names = list(dict.fromkeys(members))  # each member once, in the order given
    for name, (index, proof) in zip(names, bundle.inclusions(names), strict=True):
        records.append({"name": name, "index": index, "inclusion_proof": [b64encode(p) for p in proof]})
    job_bytes, split = job_document(job)
    doc = {
        "type": EVIDENCE_TYPE, "version": 2, "kind": kind, "step": step, "field": field, "reason": reason[:2000],
        "members": records, **split,
    }  # fmt: skip
    parts: list[tuple[str, bytes | memoryview]] = [
        ("evidence.json", canonical_json(doc)),
        ("envelope.json", bundle.envelope.to_bytes()),
        ("node.pub.json", canonical_json(public.to_json())),
        ("job.json", job_bytes),
    ]
    parts += [(step_member(i), blob) for i, blob in step_models]
    parts += [(f"sealed/{r['name']}", bundle.member(str(r["name"]))) for r in records]
    write_container(path, parts)


def write_link_evidence(
    path: Path, *, job: Job, envelope: Envelope, public: PublicKey, linked: Envelope, reason: str, tensor: str
) -> None:
    """A segment's statement names ``linked`` (by its statement digest) as the statement it built
    on and a digest for ``tensor`` that ``linked`` does not sign: the segment's node took a
    tensor its predecessor never committed. Both envelopes prove it; no tensor is needed."""
    job_bytes, split = job_document(job)
    doc = {
        "type": EVIDENCE_TYPE, "version": 2, "kind": "link", "step": None, "field": tensor, "reason": reason[:2000],
        "members": [], **split,
    }  # fmt: skip
    write_container(path, [
        ("evidence.json", canonical_json(doc)),
        ("envelope.json", envelope.to_bytes()),
        ("node.pub.json", canonical_json(public.to_json())),
        ("job.json", job_bytes),
        (LINKED_ENVELOPE, linked.to_bytes()),
    ])  # fmt: skip


Result = Callable[..., "EvidenceResult"]  # (proves_fraud, reason, **details)


def _check_link(
    members: Mapping[str, memoryview], tensor: str, job: Job, pred: Mapping[str, Any], result: Result,
    json_members: object,
) -> EvidenceResult:  # fmt: skip
    from verimesh.jobs.segments import segment_id

    if list(members) != ["evidence.json", "envelope.json", "node.pub.json", "job.json", LINKED_ENVELOPE]:
        raise InvalidInputError("link evidence holds exactly the two envelopes, the node key and the job")
    if json_members != []:
        raise InvalidInputError("link evidence carries no sealed members")
    if job.segment is None:
        return result(False, "link evidence concerns a segment of a split job")
    linked = Envelope.from_bytes(bytes(members[LINKED_ENVELOPE]), what="evidence linked envelope")
    claim: dict[str, Any] = pred["segment"] if isinstance(pred.get("segment"), dict) else {}
    links: list[Any] = claim["links"] if isinstance(claim.get("links"), list) else []
    digest = linked.statement_digest()
    named = [link for link in links if isinstance(link, dict) and link.get("statement") == digest]
    if not named:
        return result(False, "the node's statement does not name the linked statement as one it built on")
    source = named[0].get("segment")
    other = linked.statement()["predicate"]
    if (
        not isinstance(source, int)
        or source not in job.segment.links()
        or other.get("job_id") != segment_id(job.segment.parent_job_id, job.segment.ranges, source)
    ):
        return result(False, "the linked statement is not one of the segment this one takes inputs from")
    taken: dict[str, Any] = named[0]["tensors"] if isinstance(named[0].get("tensors"), dict) else {}
    if tensor not in taken:
        return result(False, f"the node's link does not name {tensor!r}")
    signed = {s["name"]: "sha256:" + s["digest"]["sha256"] for s in linked.statement()["subject"]}
    if signed.get(tensor) == taken[tensor]:
        return result(False, f"{tensor!r} is what the linked statement signs")
    return result(True, f"the node took {tensor!r} as {str(taken[tensor])[:80]}, which its predecessor's statement "
                        f"{digest[:19]}… does not sign")  # fmt: skip


def check_sealed_evidence(
    members: Mapping[str, memoryview], doc: dict[str, Any], job: Job, public: PublicKey, result: Result
) -> EvidenceResult:
    """Steps 3-6 of ``check_evidence`` for version 2 evidence; returns its ``EvidenceResult``.

    3. The envelope is the node's and its statement names this job and node; the commitment is
       a format 2 root over N members.
    4. Every carried member is the sealed one: its leaf is included under the signed root.
    5. The carried members are read through the sealed trace.json (what each tensor member is).
    6. The claim of the kind is recomputed.
    """
    kind, step, field = doc["kind"], doc["step"], doc["field"]
    if kind not in SEALED_KINDS:
        raise InvalidInputError(f"evidence kind {kind!r} is not one of {SEALED_KINDS}")
    # One spelling per claim: a re-run claim names a step and no field, the others a field and no step.
    rerun = kind in ("step-mismatch", "window-mismatch", "generate-mismatch")
    if rerun and (field is not None or not isinstance(step, int) or isinstance(step, bool)):
        raise InvalidInputError(f"{kind} evidence names a step and no field")
    if not rerun and (step is not None or not isinstance(field, str) or len(field) > 4096):
        raise InvalidInputError(f"{kind} evidence names a field and no step")
    envelope = Envelope.from_bytes(bytes(members["envelope.json"]), what="evidence envelope")
    # 3.
    if job.version != 2:
        return result(False, "version 2 evidence concerns version 2 jobs only")
    if (kind in GENERATE_KINDS) != (job.mode == "generate") and kind not in ("binding", "malformed"):
        return result(False, f"{kind} evidence does not concern a {job.mode} job")
    if not envelope.signed_by(public):
        return result(False, "the envelope is not signed by the node key in the evidence")
    statement = envelope.statement()
    pred = statement["predicate"]
    if pred.get("job_id") != job.job_id or pred.get("node_id") != public.node_id:
        return result(False, "the signed statement is for another job or node")
    commitment = pred.get("commitment") if isinstance(pred.get("commitment"), dict) else {}
    if commitment.get("algorithm") != SEAL_ALGORITHM:
        return result(False, "the signed statement does not seal a format 2 bundle")
    if kind == "link":
        return _check_link(members, str(field), job, pred, result, doc["members"])
    root = parse_digest(commitment.get("root"), what="commitment root")
    size = commitment.get("leaves")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= 1_000_000:
        return result(False, "the signed commitment has no valid member count")
    # 4.
    records = doc["members"]
    if not isinstance(records, list) or len(records) > 10_000:
        raise InvalidInputError("evidence members must be a list")
    sealed: dict[str, tuple[int, memoryview]] = {}
    for record in records:
        if not isinstance(record, dict) or set(record) != {"name", "index", "inclusion_proof"}:
            raise InvalidInputError("evidence member record is malformed")
        name, index, proof = record["name"], record["index"], record["inclusion_proof"]
        if not isinstance(name, str) or not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise InvalidInputError("evidence member record is malformed")
        if not isinstance(proof, list) or len(proof) > 64 or name in sealed:
            raise InvalidInputError("evidence member record is malformed")
        data = members.get(f"sealed/{name}")
        if data is None:
            raise InvalidInputError(f"evidence lacks the sealed member {name!r} it names")
        path = [b64decode_strict(p, what="inclusion proof") for p in proof]
        leaf = merkle.leaf_hash(member_leaf(name, data))
        if not merkle.verify_inclusion(leaf, index, size, path, root):
            return result(False, f"member {name!r} is not the one sealed at position {index} under the signed root")
        sealed[name] = (index, data)
    expected = ["evidence.json", "envelope.json", "node.pub.json", "job.json"]
    models = [n for n in members if n.startswith("steps/")]
    if list(members) != [*expected, *models, *(f"sealed/{r['name']}" for r in records)]:
        raise InvalidInputError("evidence members are not in the format's order")
    model_of: dict[int, bytes] = {}
    for name in models:
        index = _step_index(name, job)
        blob = bytes(members[name])
        if sha256_bytes(blob) != job.steps[index].digest:
            return result(False, f"the model of step {index} is not the job's")
        check_model_bytes(blob, what=f"evidence step {index} model")
        model_of[index] = blob
    # 5. and 6.
    if kind == "binding" and field in ("model_digest", "input_digest"):
        claimed, pinned = pred.get(field), job.model_digest if field == "model_digest" else job.input_digest
        if claimed == pinned:
            return result(False, f"the signed {field} equals the job's")
        return result(True, f"the node signed {field} {claimed} for a job that pins {pinned}")
    if "trace.json" not in sealed:
        return result(False, "the evidence does not carry the sealed trace.json")
    trace_index, trace_bytes = sealed["trace.json"]
    if kind == "malformed":
        return _check_malformed(field, trace_index, bytes(trace_bytes), size, sealed, job, result)
    try:
        specs = trace_specs(bytes(trace_bytes))
    except InvalidInputError:
        return result(False, "the sealed trace.json is malformed: that is a malformed claim, not this one")
    if tuple(name for name, _, _ in specs) != job.trace_names or trace_index != size - 1:
        return result(False, "the sealed trace is not the job's: that is a malformed claim, not this one")
    tensors: dict[str, np.ndarray] = {}
    for i, (name, dtype, shape) in enumerate(specs):
        if tensor_member(i) in sealed:
            tensor_index, data = sealed[tensor_member(i)]
            if tensor_index != i:
                return result(False, f"tensor member {tensor_member(i)} is not at its trace position")
            tensors[name] = decode_tensor(TensorRef(name, dtype, shape, ""), data, what="evidence")
    if kind == "binding":
        return _check_binding(field, statement, job, tensors, result)
    if kind in GENERATE_KINDS:
        proves, why = check_evidence_claim(kind, step, field, job, tensors, model_of)
        return result(proves, why)
    return _check_rerun(kind, step, job, tensors, model_of, result)


def _step_index(name: str, job: Job) -> int:
    try:
        index = int(name.removeprefix("steps/").removesuffix(".onnx"))
    except ValueError as exc:
        raise InvalidInputError(f"evidence member {name!r} is not a step model") from exc
    if step_member(index) != name or not 0 <= index < len(job.steps):
        raise InvalidInputError(f"evidence member {name!r} names no step of the job")
    return index


def _check_malformed(
    field: object, trace_index: int, trace_bytes: bytes, size: int, sealed: Mapping[str, tuple[int, memoryview]],
    job: Job, result: Result,
) -> EvidenceResult:  # fmt: skip
    if field not in MALFORMED_FIELDS:
        raise InvalidInputError(f"malformed evidence field {field!r} is unknown")
    if trace_index != size - 1:
        return result(True, "the sealed members do not end with trace.json")
    try:
        specs = trace_specs(trace_bytes)
    except InvalidInputError as exc:
        return result(True, f"the sealed trace.json is not a format 2 trace: {exc.message}")
    names = tuple(name for name, _, _ in specs)
    proofs = size - 1 - len(specs)
    if names != job.trace_names:
        return result(True, "the sealed trace names other tensors than the job's trace")
    if proofs != (len(job.steps) if job.mode == "zk" else 0):
        return result(True, f"the node sealed {size} members for a trace of {len(specs)} tensors")
    for i, (name, dtype, shape) in enumerate(specs):
        if tensor_member(i) in sealed:
            try:
                decode_tensor(TensorRef(name, dtype, shape, ""), sealed[tensor_member(i)][1], what="sealed")
            except InvalidInputError as exc:
                return result(True, f"sealed tensor {name!r} does not fit its declared shape: {exc.message}")
    return result(False, "the sealed members make a well-formed trace of the job")


def _check_binding(
    field: object, statement: dict[str, Any], job: Job, tensors: Mapping[str, np.ndarray], result: Result
) -> EvidenceResult:
    if field == "input-tensor":
        pinned = {t.name: t.digest for t in job.input_tensors}
        for name, array in tensors.items():
            if name in pinned and tensor_digest(name, array) != pinned[name]:
                return result(True, f"the node committed input {name!r} that differs from the job's")
        return result(False, "the committed input tensors equal the job's")
    if field == "output-subject":
        subjects = {s["name"]: "sha256:" + s["digest"]["sha256"] for s in statement["subject"]}
        for name in job.output_names:
            if name in tensors and subjects.get(name) != tensor_digest(name, tensors[name]):
                return result(True, f"the node signed a subject for {name!r} that is not its committed output")
        return result(False, "every committed output carried is its signed subject")
    if field == "link-tensor":
        claim = statement["predicate"].get("segment")
        links: list[Any] = claim["links"] if isinstance(claim, dict) and isinstance(claim.get("links"), list) else []
        named = {n: d for link in links if isinstance(link, dict) and isinstance(link.get("tensors"), dict)
                 for n, d in link["tensors"].items()}  # fmt: skip
        for name, array in tensors.items():
            if name in job.linked_names and name in named and tensor_digest(name, array) != named[name]:
                return result(True, f"the node committed input {name!r} other than the tensor its link names")
        return result(False, "the committed linked inputs are the tensors the node's links name")
    raise InvalidInputError(f"binding evidence field {field!r} is unknown")


def _check_rerun(
    kind: str, step: object, job: Job, tensors: Mapping[str, np.ndarray], models: Mapping[int, bytes], result: Result
) -> EvidenceResult:
    from verimesh.jobs.runtime import StepRunner
    from verimesh.spot.spotcheck import recheck_step

    last = len(job.steps) - 1 if kind == "step-mismatch" else len(job.steps) - 2
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= last:
        raise InvalidInputError("evidence step index is out of range")
    chain = [step] if kind == "step-mismatch" else [step, step + 1]
    if set(models) != set(chain):
        return result(False, f"the evidence must carry the models of steps {chain}")
    first, target = job.steps[chain[0]], job.steps[chain[-1]]
    needed = set(first.inputs) | set(target.outputs) | (set(target.inputs) - set(first.outputs))
    if set(tensors) != needed:
        return result(False, f"the evidence must carry exactly the committed tensors steps {chain} need")
    runner = StepRunner(device="cpu", precision=job.policy.precision, optimization=job.policy.optimization)
    sensitive = frozenset(job.policy.sign_sensitive)
    own = recheck_step(job, chain[0], models[chain[0]], tensors, runner, job.policy.tolerance_for(chain[0]),
                       sign_sensitive=sensitive, compare=kind == "step-mismatch")  # fmt: skip
    check = own
    if kind == "window-mismatch":
        if own.failed:
            return result(False, f"step {step} does not run on its committed inputs: that is a step-mismatch claim")
        check = recheck_step(job, chain[1], models[chain[1]], tensors, runner,
                             job.policy.window_tolerance_for(chain[1]), feeds=own.recomputed,
                             sign_sensitive=sensitive)  # fmt: skip
    metrics = {c.reason.split(":")[0]: c.metrics for c in check.comparisons}
    if check.ok:
        return result(False, f"re-running steps {chain} matches the committed outputs; no fraud shown")
    what = "from the verifier's own outputs of step " + str(step) if kind == "window-mismatch" else "from its inputs"
    return result(True, f"step {chain[-1]} outputs do not follow {what}: {check.reason}", metrics=metrics)
