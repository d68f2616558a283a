"""Equivocation evidence: a node signed two results for one job and step range whose committed
outputs cannot both be right (docs/format.md §8).

Two statements that differ are not enough: an honest node that re-proves a job on another
platform (a GPU, then a CPU after a failover) signs other bits for outputs that agree within the
job's tolerance, and both verify. Equivocation is proven only when the two committed outputs
differ beyond the job's tolerance, compared as the verifier compares a committed tensor with a
recomputed one (``compare_tensors``), in both directions. Each output is carried with its RFC
9162 inclusion proof under the root its own statement seals, with the sealed ``trace.json``
that says what the tensor member is. A container with members, in this order::

    evidence.json            canonical JSON: type, version 2, kind "equivocation", step null,
                             field null, reason, members: [{of, name, index, inclusion_proof}, ...]
    envelope.json            the first envelope
    node.pub.json            the node's public key
    second.envelope.json     the second envelope
    job.json                 the job (version 2, spot mode), canonical JSON
    sealed/<member name>     the first bundle's output tensors, then its trace.json
    second/<member name>     the same members of the second bundle

``of`` is ``first`` or ``second``. Version 1 equivocation evidence (two envelopes whose subjects
differ, nothing else) is read and proves nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from verimesh.core import merkle
from verimesh.core.canonical import b64decode_strict, b64encode, canonical_json
from verimesh.core.container import write_container
from verimesh.core.digest import member_leaf, parse_digest, sha256_file
from verimesh.core.tensors import TensorRef
from verimesh.errors import InvalidInputError
from verimesh.jobs.bundle import SEAL_ALGORITHM, Bundle, decode_tensor, tensor_member, trace_specs
from verimesh.jobs.job import Job, job_from_bytes
from verimesh.jobs.tolerance import compare_tensors
from verimesh.signing.envelope import Envelope
from verimesh.signing.keys import PublicKey
from verimesh.spot.sealed_evidence import job_document
from verimesh.spot.spotcheck import PREDICATE_TYPES

if TYPE_CHECKING:
    from verimesh.spot.evidence import EvidenceResult

EVIDENCE_TYPE = "verimesh/evidence"
SECOND_ENVELOPE = "second.envelope.json"
SIDES = ("first", "second")
PREFIX = {"first": "sealed/", "second": "second/"}


def _carried(job: Job, specs: tuple[tuple[str, str, tuple[int, ...]], ...]) -> list[str]:
    """The members one side carries: the output tensors in trace order, then trace.json."""
    outputs = set(job.output_names)
    return [tensor_member(i) for i, (name, _, _) in enumerate(specs) if name in outputs] + ["trace.json"]


def write_equivocation_evidence(path: Path, *, job: Job, first: Bundle, second: Bundle, public: PublicKey) -> str:
    """Evidence that ``first`` and ``second`` (two sealed bundles by one node for ``job``) commit to
    outputs that differ; returns its digest. Whether they differ beyond the tolerance is for
    ``check_evidence`` to say: written over two honest bundles, it proves nothing."""
    records: list[dict[str, Any]] = []
    parts: list[tuple[str, bytes | memoryview]] = []
    for side, bundle in zip(SIDES, (first, second), strict=True):
        names = [name for name, _ in bundle.members]
        hashes = [merkle.leaf_hash(leaf) for leaf in bundle.leaves]
        for name in _carried(job, trace_specs(bytes(bundle.member("trace.json")))):
            index = names.index(name)
            proof = [b64encode(p) for p in merkle.inclusion_proof(hashes, index)]
            records.append({"of": side, "name": name, "index": index, "inclusion_proof": proof})
            parts.append((PREFIX[side] + name, bundle.member(name)))
    job_bytes, split = job_document(job)
    doc = {
        "type": EVIDENCE_TYPE, "version": 2, "kind": "equivocation", "step": None, "field": None,
        "reason": "two signed statements for the same job and step range whose outputs differ beyond the tolerance",
        "members": records, **split,
    }  # fmt: skip
    write_container(path, [
        ("evidence.json", canonical_json(doc)),
        ("envelope.json", first.envelope.to_bytes()),
        ("node.pub.json", canonical_json(public.to_json())),
        (SECOND_ENVELOPE, second.envelope.to_bytes()),
        ("job.json", job_bytes),
        *parts,
    ])  # fmt: skip
    return sha256_file(path)


def _step_range(statement: Mapping[str, Any]) -> tuple[int, int] | None:
    value = statement["predicate"].get("step_range")
    if isinstance(value, list) and len(value) == 2 and all(type(v) is int for v in value):
        return int(value[0]), int(value[1])
    return None


def check_equivocation_evidence(
    members: Mapping[str, memoryview], doc: dict[str, Any], public: PublicKey, envelope: Envelope, digest: str,
    base_dir: Path,
) -> EvidenceResult:  # fmt: skip
    """``check_evidence`` for kind ``equivocation`` (the container, evidence.json's members and
    node.pub.json already checked):

    1. Version 1 (two envelopes, nothing else) proves nothing: differing digests alone are what
       an honest re-prove on another platform signs.
    2. The members are exactly the format's, in order; the job is a version 2 spot job.
    3. Both envelopes are signed by the node, differ, and their statements are spot-check
       statements naming this job, this node and the same step range, each sealing a format 2
       bundle.
    4. Each side's carried members are included under its own signed root, its trace.json names
       the job's trace, and it carries exactly the output tensors and trace.json.
    5. The claim: some output of the first differs from the second's beyond the tolerance of the
       step that produces it, compared both ways.
    """
    from verimesh.spot.evidence import EvidenceResult

    names = list(members)
    job_id, step_range = "", None
    try:
        first_statement = envelope.statement()
        job_id, step_range = str(first_statement["predicate"].get("job_id")), _step_range(first_statement)
    except InvalidInputError:
        first_statement = None

    def result(ok: bool, reason: str, **details: Any) -> EvidenceResult:
        return EvidenceResult(ok, "equivocation", public.node_id, job_id, reason, digest, details, step_range)

    # 1.
    if doc["version"] == 1:
        if names[3:] != [SECOND_ENVELOPE]:
            raise InvalidInputError("version 1 equivocation evidence holds exactly two envelopes")
        return result(False, "version 1 equivocation evidence shows only that two statements differ, which an honest "
                             "node re-proving on another platform also signs; it proves no fraud")  # fmt: skip
    # 2.
    if names[3:5] != [SECOND_ENVELOPE, "job.json"]:
        raise InvalidInputError("equivocation evidence must hold the two envelopes, the node key and the job")
    second = Envelope.from_bytes(bytes(members[SECOND_ENVELOPE]), what="evidence second envelope")
    job = job_from_bytes(bytes(members["job.json"]), base_dir, what="evidence job.json")
    job_bytes = bytes(members["job.json"])
    if "shard" in doc:
        raise InvalidInputError("equivocation evidence concerns whole jobs and segments, not shards")
    split = doc.get("segment")
    if split is not None:
        from verimesh.jobs.segments import segment_view

        if not isinstance(split, dict) or set(split) != {"segments", "index"} or not isinstance(split["index"], int):
            raise InvalidInputError("evidence segment must be {segments, index}")
        job = segment_view(job, split["segments"], split["index"])
    if job_document(job) != (job_bytes, {} if split is None else {"segment": split}):
        raise InvalidInputError("evidence job.json is not the job's canonical document")
    job_id = job.job_id
    if doc["step"] is not None or doc["field"] is not None:
        raise InvalidInputError("equivocation evidence names no step and no field")
    if job.mode != "spot" or job.version != 2:
        return result(False, "equivocation evidence concerns version 2 spot-check jobs")
    # 3.
    if not (envelope.signed_by(public) and second.signed_by(public)):
        return result(False, "both envelopes must be signed by the node key in the evidence")
    if envelope.payload == second.payload:
        return result(False, "the two envelopes carry the same statement")
    statements = (first_statement, second.statement())
    for statement in statements:
        if statement is None or statement["predicateType"] != PREDICATE_TYPES.get(job.version):
            return result(False, "a statement is not a spot-check statement of this job's format")
        pred = statement["predicate"]
        if pred.get("job_id") != job.job_id or pred.get("node_id") != public.node_id:
            return result(False, "a statement is for another job or node")
        if _step_range(statement) != step_range or step_range is None:
            return result(False, "the statements are for different step ranges")
        commitment = pred.get("commitment")
        if not isinstance(commitment, dict) or commitment.get("algorithm") != SEAL_ALGORITHM:
            return result(False, "a statement does not seal a format 2 bundle")
    # 4.
    records = doc["members"]
    if not isinstance(records, list) or len(records) > 10_000:
        raise InvalidInputError("evidence members must be a list")
    by_side: dict[str, list[tuple[str, int, list[bytes]]]] = {side: [] for side in SIDES}
    for record in records:
        if not isinstance(record, dict) or set(record) != {"of", "name", "index", "inclusion_proof"}:
            raise InvalidInputError("evidence member record is malformed")
        side, name, index, proof = record["of"], record["name"], record["index"], record["inclusion_proof"]
        if side not in SIDES or not isinstance(name, str) or type(index) is not int or index < 0:
            raise InvalidInputError("evidence member record is malformed")
        if not isinstance(proof, list) or len(proof) > 64:
            raise InvalidInputError("evidence member record is malformed")
        by_side[side].append((name, index, [b64decode_strict(p, what="inclusion proof") for p in proof]))
    carried = [PREFIX[side] + name for side in SIDES for name, _, _ in by_side[side]]
    if [r["of"] for r in records] != sorted((r["of"] for r in records), key=SIDES.index) or names[5:] != carried:
        raise InvalidInputError("evidence members are not in the format's order")
    outputs: list[dict[str, np.ndarray]] = []
    for side, statement in zip(SIDES, statements, strict=True):
        assert statement is not None
        commitment = statement["predicate"]["commitment"]
        root = parse_digest(commitment.get("root"), what="commitment root")
        size = commitment.get("leaves")
        if type(size) is not int or not 0 < size <= 1_000_000:
            return result(False, f"the {side} statement's commitment has no valid member count")
        sealed: dict[str, tuple[int, memoryview]] = {}
        for name, index, path in by_side[side]:
            data = members[PREFIX[side] + name]
            if name in sealed or not merkle.verify_inclusion(merkle.leaf_hash(member_leaf(name, data)), index, size,
                                                             path, root):  # fmt: skip
                return result(False, f"{side} member {name!r} is not the one sealed at position {index}")
            sealed[name] = (index, data)
        if "trace.json" not in sealed or sealed["trace.json"][0] != size - 1:
            return result(False, f"the {side} side does not carry its sealed trace.json")
        try:
            specs = trace_specs(bytes(sealed["trace.json"][1]))
        except InvalidInputError:
            return result(False, f"the {side} sealed trace.json is malformed: that is a malformed claim, not this one")
        if tuple(name for name, _, _ in specs) != job.trace_names:
            return result(False, f"the {side} sealed trace is not the job's: that is a malformed claim, not this one")
        if [name for name, _, _ in by_side[side]] != _carried(job, specs):
            raise InvalidInputError(f"the {side} side must carry exactly the output tensors and trace.json")
        tensors: dict[str, np.ndarray] = {}
        for i, (name, dtype, shape) in enumerate(specs):
            if tensor_member(i) in sealed:
                index, data = sealed[tensor_member(i)]
                if index != i:
                    return result(False, f"{side} tensor member {tensor_member(i)} is not at its trace position")
                try:
                    tensors[name] = decode_tensor(TensorRef(name, dtype, shape, ""), data, what="evidence")
                except InvalidInputError:
                    return result(False, f"{side} output {name!r} does not fit its shape: a malformed claim")
        outputs.append(tensors)
    # 5.
    producer = {name: step.index for step in job.steps for name in step.outputs}
    final = set(job.final_output_names)
    metrics: dict[str, Any] = {}
    for name in job.output_names:
        if name not in producer:
            continue  # a model input passed through: bound to the job's input, not a result
        tolerance = job.policy.tolerance_for(producer[name])
        a, b = outputs[0][name], outputs[1][name]
        one = compare_tensors(name, a, b, tolerance, discrete=name in final)
        other = compare_tensors(name, b, a, tolerance, discrete=name in final)
        metrics[name] = one.metrics
        if not one.ok and not other.ok:
            return result(True, f"the node signed two results for job {job.job_id} steps {list(step_range or ())} "
                                f"that differ beyond the tolerance: {one.reason}", metrics=metrics)  # fmt: skip
    return result(False, "the two statements' outputs agree within the job's tolerance (an honest re-prove on "
                         "another platform): not equivocation", metrics=metrics)  # fmt: skip
