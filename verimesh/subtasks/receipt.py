"""Receipts: a verifier's signed record that a split job was verified (docs/format.md §13).

A receipt is canonical JSON::

    {"type": "verimesh/receipt", "version": 1,
     "receipt": {job_id, kind: "whole" | "segments" | "shards", seed, subtasks: [{index, step_range, node_id,
                 node_key, statement, verdict, sampled_steps, [decided_by, replicas]}], outputs: {name: digest}},
     "signers": [verifier node ids, in signing order],
     "signature": base64 BLS signature}

Every signer signs the same message, ``"verimesh.receipt.v1\\0" || canonical(receipt)``;
``signature`` is their aggregate (``receipt cosign`` adds one), checked with FastAggregateVerify
against the verifier keys a checker pins, whose proofs of possession are checked first (a
rogue key cannot be aggregated in). ``check_receipt`` re-checks the signatures and the chain of
digests offline; with the parent job and the bundles, ``recheck_receipt`` verifies them again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from verimesh.core.canonical import b64decode_strict, b64encode, canonical_json, parse_canonical_json
from verimesh.core.digest import parse_digest
from verimesh.core.files import read_user_file
from verimesh.errors import InvalidInputError
from verimesh.signing import _bls
from verimesh.signing.keys import PublicKey, SecretKey, public_key_from_json
from verimesh.subtasks.chain import ChainVerdict

RECEIPT_TYPE = "verimesh/receipt"
RECEIPT_VERSION = 1
MAX_RECEIPT_BYTES = 4 * 1024 * 1024
MAX_SIGNERS = 64
_TAG = b"verimesh.receipt.v1\x00"
_SUBTASK_KEYS = frozenset(
    {"index", "step_range", "node_id", "node_key", "statement", "input_digest", "verdict", "sampled_steps"}
)


DECIDERS = ("quorum", "referee")  # who decides a replicated sub-task
MAX_REPLICAS = 8


def receipt_body(chain: ChainVerdict, *, decided_by: str | None = None,
                 replicas: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:  # fmt: skip
    """What the verifier signs: an accepted chain, sub-task by sub-task. A whole job run by
    replicas also records who decided (``decided_by``: the spot check, the quorum of agreeing
    replicas, or the referee's full verification) and every replica's answer (``replicas``:
    ``{replica, node_id, node_key, statement, verdict}``, the accepted one among them; a job
    owner's ``collect`` requires each one's settlement in the ledger)."""
    if not chain:
        raise InvalidInputError("a receipt records an accepted job; this one was not accepted")
    if (decided_by is None) != (replicas is None) or (decided_by is not None and chain.kind != "whole"):
        raise InvalidInputError("decided_by and replicas go together, on a whole job's receipt")
    body: dict[str, Any] = {
        "job_id": chain.job_id,
        "kind": chain.kind,
        "seed": chain.seed,
        "subtasks": [
            {
                "index": s.index,
                "step_range": list(s.step_range),
                "node_id": s.public.node_id,
                "node_key": s.public.to_json(),
                "statement": s.statement,
                "input_digest": s.input_digest,
                "verdict": s.verdict.status,
                "sampled_steps": list(s.sampled_steps),
            }
            for s in chain.segments
        ],
        "outputs": dict(sorted(chain.outputs.items())),
    }
    if decided_by is not None and replicas is not None:
        body["subtasks"][0].update(decided_by=decided_by, replicas=[dict(r) for r in replicas])
    return body


def _message(body: dict[str, Any]) -> bytes:
    return _TAG + canonical_json(body)


def sign_receipt(body: dict[str, Any], key: SecretKey) -> dict[str, Any]:
    return {
        "type": RECEIPT_TYPE,
        "version": RECEIPT_VERSION,
        "receipt": body,
        "signers": [key.node_id],
        "signature": b64encode(key.sign(_message(body))),
    }


def cosign_receipt(doc: dict[str, Any], key: SecretKey) -> dict[str, Any]:
    """Add ``key``'s signature to the aggregate (the receipt's structure is checked first; its
    signatures are the checker's to verify, against keys it pins)."""
    body, signers, signature = _parse(doc)
    if key.node_id in signers:
        raise InvalidInputError(f"{key.node_id} has already signed this receipt")
    if len(signers) >= MAX_SIGNERS:
        raise InvalidInputError(f"a receipt holds at most {MAX_SIGNERS} signers")
    aggregate = _bls.backend().aggregate([signature, key.sign(_message(body))])
    return {**doc, "signers": [*signers, key.node_id], "signature": b64encode(aggregate)}


def write_receipt(path: Path, doc: dict[str, Any]) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(canonical_json(doc) + b"\n")
    partial.replace(path)


def load_receipt(path: Path) -> dict[str, Any]:
    data = read_user_file(path, what="receipt", max_bytes=MAX_RECEIPT_BYTES)
    doc = parse_canonical_json(data.rstrip(b"\n"), what=f"receipt {path}", max_bytes=MAX_RECEIPT_BYTES)
    if not isinstance(doc, dict):
        raise InvalidInputError(f"receipt {path} is not a JSON object")
    _parse(doc)
    return doc


def _parse(doc: dict[str, Any]) -> tuple[dict[str, Any], list[str], bytes]:
    if set(doc) != {"type", "version", "receipt", "signers", "signature"} or doc.get("type") != RECEIPT_TYPE:
        raise InvalidInputError(f"not a verimesh receipt (type {RECEIPT_TYPE}, fields type, version, receipt, "
                                "signers, signature)")  # fmt: skip
    if doc["version"] != RECEIPT_VERSION:
        raise InvalidInputError(f"receipt version {doc['version']!r} is not supported")
    signers = doc["signers"]
    if (
        not isinstance(signers, list)
        or not 1 <= len(signers) <= MAX_SIGNERS
        or not all(isinstance(s, str) for s in signers)
        or len(set(signers)) != len(signers)
    ):
        raise InvalidInputError(f"receipt signers must be 1..{MAX_SIGNERS} distinct node ids")
    signature = b64decode_strict(doc["signature"], what="receipt signature")
    if len(signature) != _bls.SIGNATURE_BYTES:
        raise InvalidInputError("receipt signature is not a BLS signature")
    body = doc["receipt"]
    if not isinstance(body, dict) or set(body) != {"job_id", "kind", "seed", "subtasks", "outputs"}:
        raise InvalidInputError("receipt body must have exactly job_id, kind, seed, subtasks, outputs")
    return body, signers, signature


@dataclass(frozen=True)
class ReceiptCheck:
    ok: bool
    reason: str
    job_id: str | None = None
    signers: tuple[str, ...] = ()
    subtasks: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "reason": self.reason, "job_id": self.job_id, "signers": list(self.signers),
                "subtasks": self.subtasks}  # fmt: skip


def check_receipt(doc: dict[str, Any], verifier_keys: Sequence[PublicKey]) -> ReceiptCheck:
    """Offline: every signer is a pinned verifier key and the aggregate signature holds over the
    receipt; the sub-tasks form one chain (indices 0..n-1, contiguous ranges from step 0, each
    accepted, each node key the one its id names, sampled steps inside the range, distinct
    statements); the outputs are digests."""
    body, signers, signature = _parse(doc)

    def fail(reason: str) -> ReceiptCheck:
        return ReceiptCheck(False, reason, str(body.get("job_id")), tuple(signers))

    if not verifier_keys:
        raise InvalidInputError("pin at least one verifier key (--verifier-key)")
    pinned = {k.node_id: k for k in verifier_keys}
    foreign = [s for s in signers if s not in pinned]
    if foreign:
        return fail(f"signed by {foreign[0]}, which is not a pinned verifier key")
    unsigned = [n for n in pinned if n not in signers]
    if unsigned:
        return fail(f"not signed by the pinned verifier {unsigned[0]}")
    for key in pinned.values():
        if not key.check_possession():
            return fail(f"the key of {key.node_id} fails its proof of possession")
    keys = [pinned[s].key for s in signers]
    if not _bls.backend().fast_aggregate_verify(keys, _message(body), signature):
        return fail("the signature does not hold over this receipt with the pinned verifier keys")
    problem = _chain_problem(body)
    if problem:
        return fail(problem)
    subtasks = body["subtasks"]
    return ReceiptCheck(True, f"{len(subtasks)} sub-task{'' if len(subtasks) == 1 else 's'}, signed by {len(signers)} "
                        f"verifier{'' if len(signers) == 1 else 's'}", body["job_id"],
                        tuple(signers), len(subtasks))  # fmt: skip


def _chain_problem(body: dict[str, Any]) -> str | None:
    try:
        parse_digest(body["job_id"], what="receipt job id")
        kind, seed = body["kind"], body["seed"]
        if kind not in ("whole", "segments", "shards") or type(seed) is not int or seed < 0:
            return "receipt kind must be whole, segments or shards, with a non-negative integer seed"
        subtasks, outputs = body["subtasks"], body["outputs"]
        if not isinstance(subtasks, list) or not subtasks or not isinstance(outputs, dict) or not outputs:
            return "a receipt lists sub-tasks and outputs"
        if kind == "whole" and len(subtasks) != 1:
            return "a whole-job receipt lists exactly one sub-task (the job)"
        start, statements = 0, set()
        for i, sub in enumerate(subtasks):
            if not isinstance(sub, dict) or set(sub) - {"decided_by", "replicas"} != _SUBTASK_KEYS:
                return f"sub-task {i} is malformed"
            problem = _replicas_problem(sub, kind)
            if problem:
                return f"sub-task {i}: {problem}"
            if type(sub["index"]) is not int or any(type(x) is not int for x in sub["step_range"]):
                return f"sub-task {i}'s index and step range must be integers"
            a, b = sub["step_range"]
            if kind == "shards":  # every shard runs every step, on its own row
                if sub["index"] != i or a != 0 or [a, b] != subtasks[0]["step_range"] or not isinstance(b, int):
                    return f"sub-task {i} is not shard {i} over all of the job's steps"
            elif sub["index"] != i or a != start or not (isinstance(b, int) and b > a):
                return f"sub-task {i} does not continue the chain at step {start}"
            start = b
            parse_digest(sub["input_digest"], what=f"sub-task {i} input digest")
            if sub["verdict"] != "accept":
                return f"sub-task {i} was not accepted"
            if public_key_from_json(sub["node_key"], what=f"sub-task {i} node key").node_id != sub["node_id"]:
                return f"sub-task {i}'s node key is not the key of {sub['node_id']}"
            steps = sub["sampled_steps"]
            inside = isinstance(steps, list) and all(type(s) is int and a <= s < b for s in steps)
            if not inside or b - 1 not in steps:
                return f"sub-task {i}'s sampled steps are not inside its range, or miss its last step"
            parse_digest(sub["statement"], what=f"sub-task {i} statement")
            statements.add(sub["statement"])
        if len(statements) != len(subtasks):
            return "two sub-tasks name the same statement"
        for name, digest in outputs.items():
            parse_digest(digest, what=f"output {name!r}")
    except (KeyError, TypeError, ValueError, InvalidInputError) as exc:
        return f"the receipt is malformed: {exc}"
    return None


def _replicas_problem(sub: dict[str, Any], kind: str) -> str | None:
    """A replicated sub-task: who decided, and every replica's answer, the accepted one among them."""
    if "decided_by" not in sub and "replicas" not in sub:
        return None
    if kind != "whole" or set(sub) & {"decided_by", "replicas"} != {"decided_by", "replicas"}:
        return "decided_by and replicas go together, on a whole job's receipt"
    if sub["decided_by"] not in ("quorum", "referee"):  # the spot check alone decides only a job run once
        return "a replicated sub-task is decided by the quorum or the referee"
    replicas = sub["replicas"]
    if not isinstance(replicas, list) or not 2 <= len(replicas) <= MAX_REPLICAS:
        return f"replicas lists 2..{MAX_REPLICAS} answers"
    for r, answer in enumerate(replicas):
        if not isinstance(answer, dict) or set(answer) != {"replica", "node_id", "node_key", "statement", "verdict"}:
            return f"replica {r} is malformed"
        if answer["replica"] != r or not isinstance(answer["node_id"], str):
            return f"replica {r} is not numbered {r}"
        if answer["verdict"] not in ("accept", "reject", "unsettled"):
            return f"replica {r}'s verdict must be accept, reject or unsettled"
        if public_key_from_json(answer["node_key"], what=f"replica {r} node key").node_id != answer["node_id"]:
            return f"replica {r}'s node key is not the key of {answer['node_id']}"
        parse_digest(answer["statement"], what=f"replica {r} statement")
    if len({a["node_id"] for a in replicas}) != len(replicas):
        return "two replicas ran on one node"
    if not any(a["statement"] == sub["statement"] and a["node_id"] == sub["node_id"] and a["verdict"] == "accept"
               for a in replicas):  # fmt: skip
        return "the accepted answer is not one of its replicas"
    if sub["decided_by"] == "quorum" and any(a["verdict"] != "accept" for a in replicas):
        return "a quorum decides only when every replica was accepted"
    return None


def recheck_receipt(
    doc: dict[str, Any], *, job: Path, bundles: Sequence[Path], batch: Path | None = None
) -> ReceiptCheck:
    """``receipt check --full``: verify the bundles again (with the receipt's seed and node keys;
    a shards receipt also needs the ``batch`` that was split) and compare with what the receipt
    records: every statement, every output digest."""
    from verimesh.jobs.bundle import read_bundle
    from verimesh.subtasks.chain import verify_chain, verify_shards, verify_whole

    body, signers, _ = _parse(doc)
    subtasks = body["subtasks"]
    job_id = str(body["job_id"])

    def fail(reason: str) -> ReceiptCheck:
        return ReceiptCheck(False, reason, job_id, tuple(signers))

    if body["kind"] == "shards" and batch is None:
        raise InvalidInputError("a shards receipt is re-verified with the batch that was split (--shards FILE)")
    if len(bundles) != len(subtasks):
        return fail(f"the receipt lists {len(subtasks)} sub-tasks; {len(bundles)} bundles given")
    # Bundles in any order: each is paired with the sub-task whose statement it carries.
    by_statement = {s["statement"]: s for s in subtasks}
    paired = []
    for path in bundles:
        statement = read_bundle(path, version=2).envelope.statement_digest()
        if statement not in by_statement:
            return fail(f"{path} is not a bundle the receipt records")
        paired.append((by_statement.pop(statement), path))
    paired.sort(key=lambda pair: int(pair[0]["index"]))
    ordered = [path for _, path in paired]
    keys = [public_key_from_json(sub["node_key"], what="receipt node key") for sub, _ in paired]

    def run(seed: int | None) -> ChainVerdict:
        if body["kind"] == "whole":
            return verify_whole(ordered[0], job=job, node_key=keys[0], seed=seed)
        if body["kind"] == "shards":
            assert batch is not None
            return verify_shards(ordered, job=job, node_keys=keys, batch=batch, seed=seed)[0]
        return verify_chain(ordered, job=job, node_keys=keys, seed=seed)[0]

    # 1. The receipt's own verification, replayed: the same verdicts, statements, samples, outputs.
    replay = run(body["seed"])
    if replay.job_id != job_id:
        return fail("the receipt is for another job")
    if not replay:
        return fail(f"the bundles do not verify again: {replay.reason}")
    recorded = [(s["statement"], s["sampled_steps"], s["input_digest"]) for s in subtasks]
    replayed = [(s.statement, list(s.sampled_steps), s.input_digest) for s in replay.segments]
    if replayed != recorded or replay.outputs != body["outputs"]:
        return fail("the bundles verify, but not as the receipt records (statements, sampled steps, inputs or outputs)")
    # 2. An independent check with this checker's own randomness: a seed the verifier chose proves
    # nothing about the steps it did not sample.
    fresh = run(None)
    if not fresh:
        return fail(f"with a fresh seed ({fresh.seed}) the bundles do not verify: {fresh.reason}")
    return ReceiptCheck(True, f"{len(subtasks)} bundles verified again as recorded, and with a fresh seed "
                              f"{fresh.seed}", job_id, tuple(signers), len(subtasks))  # fmt: skip
