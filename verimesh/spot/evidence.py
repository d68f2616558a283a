"""Evidence files: self-contained proof that a node signed a wrong result (docs/format.md §6).

A canonical container with members, in this order::

    evidence.json        canonical JSON: type, version, kind, step, field, tensors (name, dtype,
                         shape, digest, leaf index, inclusion proof), reason
    envelope.json        the node's signed DSSE envelope
    node.pub.json        the node's public key (its id is the digest of this key)
    job.json             the job, canonical JSON (its job_id is recomputed)
    step.onnx            kind "step-mismatch": the disputed step model
    tensors/000000.bin   the committed tensors named in evidence.json

Kinds: ``step-mismatch`` (re-running the step on its committed inputs does not give its
committed outputs), ``binding`` (the signed statement or a committed input tensor contradicts
the job the node claims to have run) and ``equivocation`` (members evidence.json, envelope.json,
node.pub.json, second.envelope.json: two statements signed by the node for the same job and
step range with different outputs). ``check_evidence`` recomputes everything from the file;
nothing it says is taken on trust.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from verimesh.core import merkle
from verimesh.core.canonical import b64decode_strict, b64encode, canonical_json, parse_canonical_json
from verimesh.core.container import read_container_file, write_container
from verimesh.core.digest import parse_digest, sha256_bytes, sha256_file, tensor_bytes, tensor_digest
from verimesh.core.tensors import TensorRef
from verimesh.errors import InvalidInputError
from verimesh.jobs.bundle import decode_tensor, tensor_member
from verimesh.jobs.job import Job, job_from_bytes
from verimesh.jobs.modelsafety import check_model_bytes
from verimesh.signing.envelope import Envelope
from verimesh.signing.keys import PublicKey
from verimesh.spot.sealed_evidence import SEALED_KINDS, check_sealed_evidence
from verimesh.spot.spotcheck import PREDICATE_TYPES

EVIDENCE_TYPE = "verimesh/evidence"
EVIDENCE_DIR_ENV = "VERIMESH_EVIDENCE_DIR"
KINDS = ("step-mismatch", "binding", "equivocation")
MAX_REASON_CHARS = 2000
BINDING_FIELDS = ("model_digest", "input_digest", "input-tensor")


@dataclass(frozen=True)
class EvidenceResult:
    """``proves_fraud`` is True only when every check in the file was recomputed and holds."""

    proves_fraud: bool
    kind: str
    node_id: str
    job_id: str
    reason: str
    digest: str
    details: dict[str, Any] = field(default_factory=dict)
    step_range: tuple[int, int] | None = None  # of the signed statement the claim is about

    def to_json(self) -> dict[str, Any]:
        return {
            "proves_fraud": self.proves_fraud,
            "kind": self.kind,
            "node_id": self.node_id,
            "job_id": self.job_id,
            "step_range": list(self.step_range) if self.step_range else None,
            "reason": self.reason,
            "evidence_digest": self.digest,
            "details": self.details,
        }


def _tensor_records(
    names: Sequence[str], job: Job, tensors: dict[str, np.ndarray], leaf_hashes: Sequence[bytes]
) -> tuple[list[dict[str, Any]], list[tuple[str, bytes | memoryview]]]:
    order = job.trace_names
    records: list[dict[str, Any]] = []
    members: list[tuple[str, bytes | memoryview]] = []
    for i, name in enumerate(names):
        arr = tensors[name]
        index = order.index(name)
        proof = merkle.inclusion_proof(leaf_hashes, index)
        records.append(
            {
                "name": name,
                "dtype": arr.dtype.name,
                "shape": list(arr.shape),
                "digest": tensor_digest(name, arr),
                "leaf_index": index,
                "inclusion_proof": [b64encode(p) for p in proof],
            }
        )
        members.append((tensor_member(i), tensor_bytes(arr)))
    return records, members


def write_evidence(
    path: Path,
    *,
    kind: str,
    job: Job,
    envelope: Envelope,
    public: PublicKey,
    reason: str,
    tensors: dict[str, np.ndarray],
    tensor_names: Sequence[str],
    leaf_hashes: Sequence[bytes],
    step: int | None = None,
    step_model: bytes | None = None,
    binding_field: str | None = None,
) -> str:
    """Write an evidence file; returns its digest (what a slash cites)."""
    records, tensor_members = _tensor_records(tensor_names, job, tensors, leaf_hashes)
    doc = {
        "type": EVIDENCE_TYPE,
        "version": 1,
        "kind": kind,
        "step": step,
        "field": binding_field,
        "tensors": records,
        "reason": reason[:MAX_REASON_CHARS],
    }
    members: list[tuple[str, bytes | memoryview]] = [
        ("evidence.json", canonical_json(doc)),
        ("envelope.json", envelope.to_bytes()),
        ("node.pub.json", canonical_json(public.to_json())),
        ("job.json", job.canonical_bytes()),
    ]
    if step_model is not None:
        members.append(("step.onnx", step_model))
    members.extend(tensor_members)
    write_container(path, members)
    return sha256_bytes(path.read_bytes())


def write_equivocation_evidence(path: Path, *, first: Envelope, second: Envelope, public: PublicKey) -> str:
    """Two envelopes by one node for one job and step range with different outputs; returns the digest."""
    doc = {
        "type": EVIDENCE_TYPE, "version": 1, "kind": "equivocation", "step": None, "field": None, "tensors": [],
        "reason": "two signed statements for the same job and step range with different outputs",
    }  # fmt: skip
    members: list[tuple[str, bytes | memoryview]] = [
        ("evidence.json", canonical_json(doc)),
        ("envelope.json", first.to_bytes()),
        ("node.pub.json", canonical_json(public.to_json())),
        ("second.envelope.json", second.to_bytes()),
    ]
    write_container(path, members)
    return sha256_file(path)


def _check_equivocation(first: Envelope, second: Envelope, public: PublicKey, digest: str) -> EvidenceResult:
    def result(ok: bool, reason: str, job_id: str = "") -> EvidenceResult:
        return EvidenceResult(ok, "equivocation", public.node_id, job_id, reason, digest, {}, _signed_step_range(first))

    if not (first.signed_by(public) and second.signed_by(public)):
        return result(False, "both envelopes must be signed by the node key in the evidence")
    a, b = first.statement(), second.statement()
    pa, pb = a["predicate"], b["predicate"]
    job_id = str(pa.get("job_id"))
    if pa.get("node_id") != public.node_id or pb.get("node_id") != public.node_id:
        return result(False, "a statement names another node", job_id)
    if pa.get("job_id") != pb.get("job_id") or pa.get("step_range") != pb.get("step_range"):
        return result(False, "the statements are for different jobs or step ranges", job_id)
    if a["subject"] == b["subject"]:
        return result(False, "both statements claim the same outputs", job_id)
    return result(True, f"node signed two different outputs for job {job_id} steps {pa.get('step_range')}", job_id)


def check_evidence(path: Path) -> EvidenceResult:
    """Re-check an evidence file from scratch.

    1. Parse the container and evidence.json (canonical, bounded).
    2. Recompute the job id from job.json and the node id from node.pub.json.
    3. Check the envelope's signature by that node, and that its statement names this job and node.
    4. Check each tensor's digest and its inclusion proof against the signed commitment root.
    5. step-mismatch: check the step model's digest against the job, re-run it on the committed
       inputs and compare with the committed outputs under the job's tolerance.
       binding: compare the signed claim (or committed input tensor) with the job.
    """
    from verimesh.core.canonical import parse_json

    # 1.
    members = read_container_file(path, what="evidence")
    digest = sha256_file(path)
    names = list(members)
    if names[:3] != ["evidence.json", "envelope.json", "node.pub.json"]:
        if names[-1:] == ["envelope.json"] and "trace.json" in names:
            raise InvalidInputError(
                f"{path} is a bundle, not an evidence file", hint=f"verify it with `verimesh verify {path} --job ...`"
            )
        raise InvalidInputError(f"evidence {path} does not have the evidence members in order")
    doc = parse_canonical_json(bytes(members["evidence.json"]), what="evidence.json")
    version = doc.get("version") if isinstance(doc, dict) else None
    last = "members" if version == 2 else "tensors"
    expected = {"type", "version", "kind", "step", "field", last, "reason"}
    if version == 2 and isinstance(doc, dict):  # evidence against a segment or a shard of a split job
        expected.update({"segment"} & set(doc) or {"shard"} & set(doc))
    if not isinstance(doc, dict) or set(doc) != expected or doc["type"] != EVIDENCE_TYPE or version not in (1, 2):
        raise InvalidInputError("evidence.json is not verimesh evidence (version 1 or 2)")
    kind = doc["kind"]
    if kind not in KINDS + SEALED_KINDS:
        raise InvalidInputError(f"evidence kind {kind!r} is unknown")
    # The reason is the verifier's words, shown to people and proving nothing: one string, bounded.
    if not isinstance(doc["reason"], str) or len(doc["reason"]) > MAX_REASON_CHARS:
        raise InvalidInputError(f"evidence reason must be a string of at most {MAX_REASON_CHARS} characters")
    # 2.
    pub_bytes = bytes(members["node.pub.json"])
    pub_doc = parse_json(pub_bytes, what="evidence node.pub.json")
    try:
        public = PublicKey(bytes.fromhex(pub_doc["public_key"]), bytes.fromhex(pub_doc["proof_of_possession"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidInputError("evidence node.pub.json is malformed") from exc
    # Every byte of evidence is determined by what it proves: no member may be spelled two ways.
    if canonical_json(public.to_json()) != pub_bytes:
        raise InvalidInputError("evidence node.pub.json is not the canonical public key document")
    if not public.check_possession():  # else a flipped proof-of-possession bit re-encodes the same proof
        raise InvalidInputError("evidence node.pub.json carries a proof of possession that does not verify")
    envelope = Envelope.from_bytes(bytes(members["envelope.json"]), what="evidence envelope")
    if kind == "equivocation":  # outputs that differ beyond the tolerance, not digests alone
        from verimesh.spot.equivocation import check_equivocation_evidence

        return check_equivocation_evidence(members, doc, public, envelope, digest, path.parent)
    if names[3:4] != ["job.json"]:
        raise InvalidInputError(f"evidence {path} has no job.json")
    job = job_from_bytes(bytes(members["job.json"]), path.parent, what="evidence job.json")
    if job.canonical_bytes() != bytes(members["job.json"]):
        raise InvalidInputError("evidence job.json is not the job's canonical document")
    if "segment" in doc:
        from verimesh.jobs.segments import segment_view

        split = doc["segment"]
        if not isinstance(split, dict) or set(split) != {"segments", "index"} or not isinstance(split["index"], int):
            raise InvalidInputError("evidence segment must be {segments, index}")
        job = segment_view(job, split["segments"], split["index"])
    if "shard" in doc:
        from verimesh.core.tensors import TensorRef
        from verimesh.jobs.segments import shard_view

        row = doc["shard"]
        if not isinstance(row, dict) or set(row) != {"count", "index", "tensors"} or type(row["tensors"]) is not list:
            raise InvalidInputError("evidence shard must be {count, index, tensors}")
        refs = tuple(TensorRef.from_json(t, what="evidence shard input") for t in row["tensors"])
        job = shard_view(job, row["count"], row["index"], refs)
    step_range = _signed_step_range(envelope)

    def result(ok: bool, reason: str, **details: Any) -> EvidenceResult:
        return EvidenceResult(ok, kind, public.node_id, job.job_id, reason, digest, details, step_range)

    # Evidence re-runs spot-check steps (or a generate job's records): a zk job's outputs are
    # proven by its proofs, and its statement commits to no trace these kinds could speak about.
    if job.mode == "zk":
        return result(False, f"{kind} evidence concerns spot-check jobs (and generate jobs); this job is {job.mode}")
    try:
        predicate_type = envelope.statement()["predicateType"]
    except InvalidInputError:
        predicate_type = None
    if predicate_type != PREDICATE_TYPES.get(job.version):
        return result(False, "the signed statement is not a spot-check statement of this job's format")

    if version == 2:
        return check_sealed_evidence(members, doc, job, public, result)
    if job.version != 1:
        return result(False, "version 1 evidence concerns version 1 jobs only")

    # 3.
    if not envelope.signed_by(public):
        return result(False, "the envelope is not signed by the node key in the evidence")
    statement = envelope.statement()
    pred = statement["predicate"]
    if pred.get("job_id") != job.job_id or pred.get("node_id") != public.node_id:
        return result(False, "the signed statement is for another job or node")
    commitment = pred.get("commitment")
    if not isinstance(commitment, dict):
        return result(False, "the signed statement has no commitment")
    root = parse_digest(commitment.get("root"), what="commitment root")
    tree_size = commitment.get("leaves")
    if tree_size != len(job.trace_names):
        return result(False, "the signed commitment does not cover the job's trace")
    # 4.
    tensors: dict[str, np.ndarray] = {}
    if not isinstance(doc["tensors"], list) or names[4 + (kind == "step-mismatch") :] != [
        tensor_member(i) for i in range(len(doc["tensors"]))
    ]:
        raise InvalidInputError("evidence tensors do not match their members")
    for i, rec in enumerate(doc["tensors"]):
        entry, index, proof = _evidence_tensor(rec)
        data = members[tensor_member(i)]
        arr = decode_tensor(entry, data, what="evidence")
        if tensor_digest(entry.name, arr) != entry.digest:
            return result(False, f"tensor {entry.name!r} does not match its digest")
        if index >= len(job.trace_names) or job.trace_names[index] != entry.name:
            return result(False, f"tensor {entry.name!r} is not at leaf {index} of the job's trace")
        if not merkle.verify_inclusion(merkle.leaf_hash(parse_digest(entry.digest)), index, tree_size, proof, root):
            return result(False, f"tensor {entry.name!r} is not included under the signed root")
        tensors[entry.name] = arr
    # 5.
    if kind == "binding":
        return _check_binding(doc["field"], pred, job, tensors, result)
    step = doc["step"]
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < len(job.steps):
        raise InvalidInputError("evidence step index is out of range")
    model = bytes(members.get("step.onnx", b""))
    if sha256_bytes(model) != job.steps[step].digest:
        return result(False, f"step model does not match step {step} of the job")
    # Fraud is proven only by re-running a step verimesh will run: self-contained and deterministic.
    check_model_bytes(model, what=f"evidence step {step} model")
    needed = set(job.steps[step].inputs) | set(job.steps[step].outputs)
    if set(tensors) != needed:
        return result(False, f"evidence must carry exactly step {step}'s committed inputs and outputs")
    from verimesh.jobs.runtime import StepRunner
    from verimesh.spot.spotcheck import recheck_step

    runner = StepRunner(device="cpu", precision=job.policy.precision, optimization=job.policy.optimization)
    check = recheck_step(job, step, model, tensors, runner, job.policy.tolerance_for(step))
    metrics = {n: c.metrics for n, c in zip(job.steps[step].outputs, check.comparisons, strict=True)}
    if check.ok:
        return result(False, f"re-running step {step} matches the committed outputs; no fraud shown")
    return result(True, f"step {step} outputs do not follow from its committed inputs: {check.reason}", metrics=metrics)


def _signed_step_range(envelope: Envelope) -> tuple[int, int] | None:
    try:
        value = envelope.statement()["predicate"].get("step_range")
    except InvalidInputError:
        return None
    if (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return int(value[0]), int(value[1])
    return None


def evidence_dir() -> Path:
    """``$VERIMESH_EVIDENCE_DIR``, else the user data dir: where evidence is kept, named by digest."""
    env = os.environ.get(EVIDENCE_DIR_ENV)
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_data_dir("verimesh")) / "evidence"


def store_evidence(write: Callable[[Path], object], *, out: Path | None = None) -> tuple[Path, str | None]:
    """Write evidence into the store as ``<sha256>.vme``, then copy it to ``out`` if asked.

    Evidence must exist whatever the bundle is called and wherever it lies (a long name, a
    read-only inbox): the store is the verifier's own folder and the name is the digest. Returns
    the path to report (``out`` when the copy worked) and, when it did not, why."""
    folder = evidence_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".incoming-{os.getpid()}-{secrets.token_hex(4)}.vme"
        write(tmp)
        digest = sha256_file(tmp)
        final = folder / f"{digest.removeprefix('sha256:')}.vme"
        tmp.replace(final)
    except OSError as exc:
        raise InvalidInputError(
            f"cannot write evidence into {folder}: {exc.strerror or exc}",
            code="evidence-store", hint=f"set {EVIDENCE_DIR_ENV} to a writable folder",
        ) from exc  # fmt: skip
    if out is None:
        return final, None
    try:
        partial = out.with_name(out.name + ".partial")
        shutil.copyfile(final, partial)
        partial.replace(out)
    except OSError as exc:
        return final, f"could not write {out} ({exc.strerror or exc}); the evidence is at {final}"
    return out, None


def _check_binding(
    field_name: object,
    pred: dict[str, Any],
    job: Job,
    tensors: dict[str, np.ndarray],
    result: Callable[..., EvidenceResult],
) -> EvidenceResult:
    if field_name in ("model_digest", "input_digest"):
        claimed = pred.get(str(field_name))
        pinned = job.model_digest if field_name == "model_digest" else job.input_digest
        if claimed == pinned:
            return result(False, f"the signed {field_name} equals the job's")
        return result(True, f"the node signed {field_name} {claimed} for a job that pins {pinned}")
    if field_name == "input-tensor":
        pinned_inputs = {t.name: t.digest for t in job.input_tensors}
        for name, arr in tensors.items():
            if name in pinned_inputs and tensor_digest(name, arr) != pinned_inputs[name]:
                return result(True, f"the node committed input {name!r} that differs from the job's")
        return result(False, "the committed input tensors equal the job's")
    raise InvalidInputError(f"binding evidence field {field_name!r} is unknown")


def _evidence_tensor(rec: Any) -> tuple[TensorRef, int, list[bytes]]:
    if not isinstance(rec, dict) or set(rec) != {"name", "dtype", "shape", "digest", "leaf_index", "inclusion_proof"}:
        raise InvalidInputError("evidence tensor record is malformed")
    entry = TensorRef.from_json({k: rec[k] for k in ("name", "dtype", "shape", "digest")}, what="evidence tensor")
    index, proof = rec["leaf_index"], rec["inclusion_proof"]
    if (
        not isinstance(index, int)
        or isinstance(index, bool)
        or index < 0
        or not isinstance(proof, list)
        or len(proof) > 64
    ):
        raise InvalidInputError("evidence tensor leaf index or proof is malformed")
    return entry, index, [b64decode_strict(p, what="inclusion proof") for p in proof]
