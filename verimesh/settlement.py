"""Settlement: the ledger side of the workflows (docs/design.md §6).

- ``register_node``: a node joins with a stake; its proof of possession is checked first.
- ``verify_and_settle``: ``verify`` with the node's key and audit policy taken from the ledger,
  then one transaction appends the receipt (the node's signed envelope), the verdict, and a
  reward (accept) or a fraud slash (a reject whose evidence the node's own signature proves).
  A second, different statement by the node for the same job and step range is equivocation:
  its evidence (the two envelopes) is written and the full stake slashed at once.
- ``slash_with_evidence``: any verifier may submit evidence; it is re-checked from scratch, and
  the same evidence never slashes twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from verimesh.core.canonical import b64encode
from verimesh.core.container import DEFAULT_LIMITS, Limits
from verimesh.core.digest import sha256_bytes, sha256_file
from verimesh.errors import InvalidInputError, VerificationFailedError
from verimesh.jobs.bundle import read_bundle
from verimesh.jobs.job import Job, load_job
from verimesh.jobs.runtime import StepRunner
from verimesh.jobs.verdict import Verdict
from verimesh.ledger.reputation import (
    DEFAULT_FRAUD_FRACTION,
    DEFAULT_REWARD,
    Standing,
    fraud_slash,
    standing_of,
    standings,
)
from verimesh.ledger.store import Ledger, Transaction
from verimesh.signing.envelope import Envelope
from verimesh.signing.keys import PublicKey
from verimesh.spot.evidence import check_evidence, store_evidence, write_equivocation_evidence
from verimesh.workflows import Samples, verify


@dataclass(frozen=True)
class Settlement:
    verdict: Verdict
    appended: tuple[tuple[int, str], ...]  # (seq, kind) of each new entry
    samples_in_force: int | None
    equivocation_evidence: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            **self.verdict.to_json(),
            "ledger_entries": [{"seq": s, "kind": k} for s, k in self.appended],
            "samples_in_force": self.samples_in_force,
            "equivocation_evidence": self.equivocation_evidence,
        }


def registered_key(ledger: Ledger, node_id: str) -> PublicKey | None:
    for entry in ledger.entries(node_id=node_id, kinds=["register"]):
        event = entry.event
        return PublicKey(bytes.fromhex(event["public_key"]), bytes.fromhex(event["proof_of_possession"]))
    return None


def node_standing(ledger: Ledger, node_id: str) -> Standing:
    return standing_of(node_id, (e.event for e in ledger.entries(node_id=node_id)))


def all_standings(ledger: Ledger) -> dict[str, Standing]:
    return standings(e.event for e in ledger.entries() if e.node_id is not None)


def register_node(ledger: Ledger, public: PublicKey, *, stake: int) -> int:
    """Append a registration after checking the proof of possession (about 1 s, py_ecc)."""
    if stake <= 0:
        raise InvalidInputError("stake must be a positive integer")
    if not public.check_possession():
        raise VerificationFailedError(f"node {public.node_id}: proof of possession does not verify", code="bad-pop")
    with ledger.transaction() as txn:
        if txn.events_of(public.node_id, ["register"]):
            raise InvalidInputError(f"node {public.node_id} is already registered")
        return txn.append(
            {"kind": "register", "node_id": public.node_id, "public_key": public.key.hex(),
             "proof_of_possession": public.proof_of_possession.hex(), "stake": stake}
        )  # fmt: skip


def _fraction(ledger: Ledger) -> float:
    return float(ledger.setting("fraud_fraction", str(DEFAULT_FRAUD_FRACTION)))


def _slash(txn: Transaction, standing: Standing, *, amount: int, reason: str, evidence_digest: str,
           job_id: str | None) -> int | None:  # fmt: skip
    """Append a slash citing its evidence; None when this evidence already slashed."""
    seq = txn.size
    if not txn.claim_evidence(evidence_digest, seq):
        return None
    return txn.append(
        {"kind": "slash", "node_id": standing.node_id, "amount": amount, "reason": reason,
         "evidence_digest": evidence_digest, "job_id": job_id}
    )  # fmt: skip


def _signer(ledger: Ledger, bundle: Path, limits: Limits) -> tuple[PublicKey, Envelope] | None:
    """The registered node among the bundle's signers, or None (unreadable bundle or unknown node)."""
    try:
        envelope = read_bundle(bundle, limits=limits).envelope
    except InvalidInputError:
        return None
    for signature in envelope.signatures:
        key = registered_key(ledger, signature.keyid)
        if key is not None:
            return key, envelope
    return None


def verify_and_settle(
    bundle: Path,
    *,
    job: Job | Path,
    ledger: Ledger,
    samples: Samples = None,
    seed: int | None = None,
    evidence_out: Path | None = None,
    runner: StepRunner | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> Settlement:
    """Verify with the node's registered key and the audit policy in force, then settle.

    1. Find the signer among registered nodes (none: the bundle cannot be settled; refused).
    2. Samples: the caller's, else the policy in force for the node's standing; a node with no
       stake left is refused.
    3. ``verify`` against the registered key.
    4. One transaction: the receipt if the signature verified (and an equivocation check against
       the node's earlier receipts for the job), the verdict, then a reward or a fraud slash.
    """
    job = job if isinstance(job, Job) else load_job(job)
    # 1.
    signer = _signer(ledger, bundle, limits)
    if signer is None:
        raise InvalidInputError(
            f"{bundle} is unreadable or signed by no node registered in this ledger",
            code="unknown-node",
            hint="register the node with `verimesh ledger register`, or verify with --node-key",
        )
    public, envelope = signer
    # 2.
    standing = node_standing(ledger, public.node_id)
    if standing.stake <= 0:
        raise VerificationFailedError(f"node {public.node_id} has no stake left", code="no-stake")
    in_force = samples if samples is not None else standing.samples_for(len(job.steps), job.policy.samples)
    # 3.
    verdict = verify(bundle, job=job, node_key=public, samples=in_force, seed=seed, evidence_out=evidence_out,
                     runner=runner, limits=limits)  # fmt: skip
    # 4.
    appended: list[tuple[int, str]] = []
    equivocation: str | None = None
    signature_ok = any(c.name == "signature" and c.ok for c in verdict.checks)
    with ledger.transaction() as txn:
        standing = standing_of(public.node_id, (e.event for e in txn.events_of(public.node_id, _KINDS)))
        if signature_ok:
            statement = envelope.statement()
            pred = statement["predicate"]
            receipt = {
                "kind": "receipt", "node_id": public.node_id, "job_id": pred.get("job_id"),
                "step_range": pred.get("step_range"), "subjects": statement["subject"],
                "envelope_digest": sha256_bytes(envelope.to_bytes()), "envelope": b64encode(envelope.to_bytes()),
            }  # fmt: skip
            earlier = _conflicting_receipt(txn, receipt)
            appended.append((txn.append(receipt), "receipt"))
            if earlier is not None:
                path, _ = store_evidence(
                    lambda out: write_equivocation_evidence(out, first=earlier, second=envelope, public=public)
                )
                digest = sha256_file(path)
                equivocation = str(path)
                seq = _slash(txn, standing, amount=standing.stake, reason="equivocation", evidence_digest=digest,
                             job_id=str(pred.get("job_id")))  # fmt: skip
                if seq is not None:
                    appended.append((seq, "slash"))
                    standing = standing_of(public.node_id, (e.event for e in txn.events_of(public.node_id, _KINDS)))
        verdict_event = {
            "kind": "verdict", "node_id": public.node_id, "job_id": job.job_id, "status": verdict.status,
            "reason": verdict.reason[:500], "seed": str(verdict.seed), "sampled_steps": list(verdict.sampled_steps),
            "samples": "all" if in_force == "all" else in_force, "evidence": verdict.evidence is not None,
            "verifier": ledger.meta["operator_node_id"],
        }  # fmt: skip
        appended.append((txn.append(verdict_event), "verdict"))
        if verdict.status == "accept":
            amount = int(ledger.setting("reward", str(DEFAULT_REWARD)))
            if txn.claim_reward(public.node_id, job.job_id, txn.size):
                reward = {"kind": "reward", "node_id": public.node_id, "job_id": job.job_id, "amount": amount}
                appended.append((txn.append(reward), "reward"))
        elif verdict.evidence is not None and standing.stake > 0:
            amount = fraud_slash(standing.stake, _fraction(ledger))
            digest = sha256_file(Path(verdict.evidence))
            seq = _slash(txn, standing, amount=amount, reason="fraud", evidence_digest=digest, job_id=job.job_id)
            if seq is not None:
                appended.append((seq, "slash"))
    return Settlement(verdict, tuple(appended), None if in_force == "all" else int(in_force), equivocation)


_KINDS = ("register", "verdict", "reward", "slash")


def _conflicting_receipt(txn: Transaction, receipt: dict[str, Any]) -> Envelope | None:
    """An earlier receipt by the same node for the same job and step range with other outputs."""
    from verimesh.core.canonical import b64decode_strict

    for entry in txn.events_of(str(receipt["node_id"]), ["receipt"]):
        event = entry.event
        same_claim = event.get("job_id") == receipt["job_id"] and event.get("step_range") == receipt["step_range"]
        if same_claim and event.get("subjects") != receipt["subjects"]:
            return Envelope.from_bytes(b64decode_strict(event["envelope"], what="receipt envelope"))
    return None


@dataclass(frozen=True)
class SlashResult:
    seq: int
    node_id: str
    amount: int
    reason: str
    evidence_digest: str

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "node_id": self.node_id, "amount": self.amount, "reason": self.reason,
                "evidence_digest": self.evidence_digest}  # fmt: skip


def slash_with_evidence(ledger: Ledger, evidence: Path) -> SlashResult:
    """Re-check the evidence, then slash: equivocation takes the stake, fraud a fraction of it.

    Refused (VerificationFailedError, exit 1) when the evidence does not prove fraud, names a node
    this ledger does not know, or already slashed.
    """
    result = check_evidence(evidence)
    if not result.proves_fraud:
        raise VerificationFailedError(f"evidence does not prove fraud: {result.reason}", code="evidence-not-proven")
    with ledger.transaction() as txn:
        events = txn.events_of(result.node_id, _KINDS)
        if not any(e.kind == "register" for e in events):
            raise VerificationFailedError(
                f"node {result.node_id} is not registered in this ledger", code="unknown-node"
            )
        standing = standing_of(result.node_id, (e.event for e in events))
        if standing.stake <= 0:
            raise VerificationFailedError(f"node {result.node_id} has no stake left to slash", code="no-stake")
        if result.kind == "equivocation":
            amount, reason = standing.stake, "equivocation"
        else:
            amount, reason = fraud_slash(standing.stake, _fraction(ledger)), "fraud"
        seq = _slash(txn, standing, amount=amount, reason=reason, evidence_digest=result.digest, job_id=result.job_id)
        if seq is None:
            raise VerificationFailedError("this evidence has already slashed", code="evidence-reused")
    return SlashResult(seq, result.node_id, amount, reason, result.digest)
