"""Settlement: the ledger side of the workflows (docs/design.md §6, docs/format.md §10).

Every function here writes in one transaction signed by its ``writer`` (the ledger operator or a
verifier the operator registered), after checking the log since its last checkpoint
(``Ledger.view``): a ledger that does not verify is refused (exit 3) before anything is decided.

- ``register_node``, ``top_up``, ``withdraw``, ``release``: stake moves only on a request signed
  by the node's own key (``verimesh.ledger.events.sign_request``); a withdrawal unbonds, and
  stays slashable, for ``unbonding_seconds``.
- ``register_job``: a job owner posts a job with a deposit; only registered jobs earn rewards,
  paid out of that deposit, never to the job's owner.
- ``verify_and_settle``: ``verify`` with the node's key and audit policy taken from the ledger,
  then only an outcome the node's own signature is to blame for changes its standing: the
  receipt, one verdict per (node, job, step range), a reward, or a fraud slash whose evidence
  re-checks. A second, different statement by the node for a (node, job, step range) that
  already has a verdict is a duplicate: if it verifies nothing is written (no reward, no slash:
  an honest node may re-prove on another platform and sign other bits); if not, its own evidence
  slashes it as a fraud. Equivocation is proven only by evidence (``spot.equivocation``) that the
  two committed outputs differ beyond the job's tolerance, through ``slash_with_evidence``.
- ``settle_chain``: the same for a job split into segments, verified as one chain: every segment
  settled with its own node (accept), or only the node whose signature proves the fault (reject).
- ``slash_with_evidence``: any writer may submit evidence; it is re-checked from scratch and
  slashes once per (node, job, step range) claim, whatever bytes encode it.
- ``audit_ledger``: ``ledger verify`` with the rules replayed, evidence re-checked here (the
  ledger layer may not import the spot mechanism).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from verimesh.core.canonical import b64encode
from verimesh.core.container import DEFAULT_LIMITS, Limits
from verimesh.core.digest import sha256_bytes, sha256_file
from verimesh.core.tensors import write_tensor_file
from verimesh.errors import InvalidInputError, VerificationFailedError
from verimesh.jobs.bundle import read_bundle
from verimesh.jobs.job import Job, load_job
from verimesh.jobs.runtime import StepRunner
from verimesh.jobs.verdict import Verdict
from verimesh.ledger.events import SignedRequest, claim_key, fraction_of, sign_request, time_plus
from verimesh.ledger.reputation import JobAccount, Standing, apply, fraud_slash, job_account, reward_due, standing_of
from verimesh.ledger.reputation import standings as fold_standings
from verimesh.ledger.rules import EvidenceClaim, RuleBook, receipt_problem
from verimesh.ledger.store import Checkpoint, Ledger, LedgerReport, LedgerView, Transaction, verify_ledger
from verimesh.signing.envelope import Envelope
from verimesh.signing.keys import PublicKey, SecretKey
from verimesh.spot.evidence import EvidenceResult, check_evidence
from verimesh.subtasks.chain import ChainVerdict, SegmentResult, verify_chain
from verimesh.workflows import Samples, committed_outputs, verify

MAX_EVIDENCE_BYTES = 256 * 1024 * 1024
NODE_KINDS = ("register", "top-up", "withdraw", "release", "verdict", "reward", "slash")

__all__ = [
    "NODE_KINDS",
    "Prefetched",
    "Settlement",
    "SlashResult",
    "all_standings",
    "audit_ledger",
    "node_standing",
    "register_job",
    "register_node",
    "registered_key",
    "release",
    "sign_request",
    "slash_with_evidence",
    "top_up",
    "verify_and_settle",
    "withdraw",
]


@dataclass(frozen=True)
class Settlement:
    verdict: Verdict
    appended: tuple[tuple[int, str], ...]  # (seq, kind) of each new entry, the writer's commit last
    samples_in_force: int | None
    equivocation_evidence: str | None = None  # always None: settlement proves no equivocation (see verify_and_settle)
    note: str | None = None  # why the ledger recorded less than the verdict (or nothing)
    verified_by: str = "here"  # or the fleet verifier whose prefetched verdict was taken

    def to_json(self) -> dict[str, Any]:
        return {
            **self.verdict.to_json(),
            "ledger_entries": [{"seq": s, "kind": k} for s, k in self.appended],
            "samples_in_force": self.samples_in_force,
            "equivocation_evidence": self.equivocation_evidence,
            "ledger_note": self.note,
            "verified_by": self.verified_by,
        }


@dataclass(frozen=True)
class Prefetched:
    """A verdict a verifier fleet reached ahead of settlement (docs/design.md §12), with what it
    was reached on. ``verify_and_settle`` takes it only when every one of those is what it would
    verify with itself: the same bundle bytes, job, registered key, samples in force and seed;
    otherwise it verifies here. A reject still has its evidence re-checked before any slash."""

    bundle_digest: str
    job_id: str
    node_key: str  # the registered public key, hex
    samples: Samples
    seed: int
    verdict: Verdict
    verifier: str

    def fits(self, bundle: Path, job: Job, public: PublicKey, samples: Samples, seed: int | None) -> bool:
        return (
            seed is not None
            and self.verdict.status in ("accept", "reject")
            and (self.job_id, self.node_key, self.samples, self.seed) == (job.job_id, public.key.hex(), samples, seed)
            and sha256_file(bundle) == self.bundle_digest
        )


# -- reads ----------------------------------------------------------------------------------------


def _registration(view: LedgerView, event: dict[str, Any]) -> PublicKey | None:
    """The key a registration entry registers, its request re-verified: the log is not trusted
    for it (a registration its node did not sign registers nobody)."""
    request = SignedRequest.from_json({"request": event["request"], "signature": event["signature"]})
    if request.problem(ledger_id=view.ledger_id, action="register") is None and request.node_id == event["node_id"]:
        return request.public
    return None


def registered_key(view: LedgerView, node_id: str) -> PublicKey | None:
    for entry in view.entries(node_id=node_id, kinds=["register"]):
        public = _registration(view, entry.event)
        if public is not None:
            return public
    return None


def _counted(view: LedgerView, events: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """A node's events as the rules count them: its first registration whose request verifies, no other."""
    registered: set[str] = set()
    for event in events:
        if event["kind"] == "register":
            if event["node_id"] in registered or _registration(view, event) is None:
                continue
            registered.add(event["node_id"])
        yield event


def _standing(view: LedgerView, node_id: str) -> Standing:
    return standing_of(node_id, _counted(view, (e.event for e in view.entries(node_id=node_id, kinds=NODE_KINDS))))


def _account(view: LedgerView, job_id: str) -> JobAccount | None:
    """The job's account, from its first post whose owner's request verifies (a post nobody signed
    posts nothing) and the rewards paid since."""
    events = [e.event for e in view.entries(job_id=job_id, kinds=["job", "reward"])]
    for i, event in enumerate(events):
        if event["kind"] != "job":
            continue
        request = SignedRequest.from_json({"request": event["request"], "signature": event["signature"]})
        if request.problem(ledger_id=view.ledger_id, action="job") is None and request.node_id == event["owner"]:
            return job_account(job_id, events[i:])
    return None


def node_standing(ledger: Ledger, node_id: str) -> Standing:
    with ledger.view() as view:
        return _standing(view, node_id)


def standings_of(ledger: Ledger, node_ids: Iterable[str]) -> dict[str, Standing]:
    """These nodes' standings, read in one checked view of the ledger (one view for many nodes:
    building it, which checks the log since the last checkpoint, is most of the cost)."""
    with ledger.view() as view:
        return {node_id: _standing(view, node_id) for node_id in dict.fromkeys(node_ids)}


def all_standings(ledger: Ledger) -> dict[str, Standing]:
    """Every node's standing, from every entry (all of them checked first)."""
    with ledger.view() as view:
        events = list(_counted(view, (e.event for e in view.scan() if e.node_id is not None and e.kind in NODE_KINDS)))
    return fold_standings(events)


def _writer_view(txn: Transaction) -> LedgerView:
    view = txn.view()
    if not view.may_write(txn.writer.public):
        raise InvalidInputError(
            f"{txn.writer.node_id} may not write to this ledger",
            code="writer-not-registered",
            hint="the operator registers verifiers with `verimesh ledger verifier add`",
        )
    return view


# -- stake ----------------------------------------------------------------------------------------


def _refuse_request(request: SignedRequest, view: LedgerView, action: str) -> None:
    problem = request.problem(ledger_id=view.ledger_id, action=action)
    if problem:
        raise InvalidInputError(
            f"{action} refused: {problem}",
            code="bad-request",
            hint="the party it speaks for signs it: `verimesh ledger request ...`",
        )


def register_node(ledger: Ledger, request: SignedRequest, *, writer: SecretKey) -> int:
    """Register the node that signed ``request`` (for this ledger, with its declared stake)."""
    with ledger.transaction(writer) as txn:
        view = _writer_view(txn)
        _refuse_request(request, view, "register")
        txn.not_before(str(request.request["time"]))
        if registered_key(view, request.node_id) is not None or txn.claimed(f"request:{request.digest}"):
            raise InvalidInputError(
                f"node {request.node_id} is already registered",
                code="already-registered",
                hint="add stake with `verimesh ledger stake top-up`",
            )
        return txn.append(
            {"kind": "register", "node_id": request.node_id, "stake": request.amount, **request.to_json()}
        )


def _own_request(txn: Transaction, request: SignedRequest, action: str) -> tuple[LedgerView, Standing]:
    view = _writer_view(txn)
    _refuse_request(request, view, action)
    txn.not_before(str(request.request["time"]))
    public = registered_key(view, request.node_id)
    if public is None or public.key != request.public.key:
        raise InvalidInputError(f"node {request.node_id} is not registered in this ledger", code="unknown-node")
    taken = txn.claimed(f"request:{request.digest}")
    if taken is not None:
        raise InvalidInputError(
            f"this request was already used (entry {taken.seq})", code="request-reused", hint="sign a new request"
        )
    return view, _standing(view, request.node_id)


def top_up(ledger: Ledger, request: SignedRequest, *, writer: SecretKey) -> int:
    with ledger.transaction(writer) as txn:
        _own_request(txn, request, "top-up")
        return txn.append({"kind": "top-up", "node_id": request.node_id, "amount": request.amount, **request.to_json()})


def withdraw(ledger: Ledger, request: SignedRequest, *, writer: SecretKey) -> int:
    """Start unbonding ``request.amount`` of the bonded stake; it stays slashable until released."""
    with ledger.transaction(writer) as txn:
        view, standing = _own_request(txn, request, "withdraw")
        if request.amount > standing.stake:
            raise InvalidInputError(
                f"node {request.node_id} has {standing.stake} bonded; cannot withdraw {request.amount}",
                code="stake-too-low",
            )
        delay = int(view.settings["unbonding_seconds"])
        return txn.append(
            {
                "kind": "withdraw",
                "node_id": request.node_id,
                "amount": request.amount,
                "release_after": time_plus(txn.time, delay),
                **request.to_json(),
            }
        )


def release(ledger: Ledger, node_id: str, *, writer: SecretKey) -> list[int]:
    """Release every withdrawal of the node whose unbonding delay has passed (what slashes left)."""
    with ledger.transaction(writer) as txn:
        view = _writer_view(txn)
        standing = _standing(view, node_id)
        due = [u for u in standing.unbonding if u.release_after <= txn.time]
        if not due:
            waiting = min((u.release_after for u in standing.unbonding), default=None)
            raise InvalidInputError(
                f"node {node_id} has no withdrawal past its unbonding delay"
                + (f" (the next is due {waiting})" if waiting else ""),
                code="nothing-due",
            )
        return [
            txn.append({"kind": "release", "node_id": node_id, "withdrawal": u.seq, "amount": u.amount}) for u in due
        ]


def register_job(ledger: Ledger, request: SignedRequest, *, writer: SecretKey) -> int:
    """Post the job ``request`` names with its owner's deposit; rewards for it come out of that deposit."""
    with ledger.transaction(writer) as txn:
        view = _writer_view(txn)
        _refuse_request(request, view, "job")
        txn.not_before(str(request.request["time"]))
        job_id = str(request.request["job_id"])
        taken = txn.claimed(f"job:{job_id}")
        if taken is not None:
            raise InvalidInputError(f"job {job_id} is already registered (entry {taken.seq})", code="job-registered")
        return txn.append(
            {"kind": "job", "job_id": job_id, "owner": request.node_id, "deposit": request.amount, **request.to_json()}
        )


# -- evidence -------------------------------------------------------------------------------------


def _check_evidence_bytes(body: bytes) -> EvidenceResult:
    """check_evidence on a private copy: the bytes stored are the bytes checked."""
    with tempfile.TemporaryDirectory(prefix="verimesh-evidence-") as tmp:
        path = Path(tmp) / f"{sha256_bytes(body).removeprefix('sha256:')}.vme"
        path.write_bytes(body)
        return check_evidence(path)


def _evidence_claim(body: bytes) -> EvidenceClaim:
    try:
        r = _check_evidence_bytes(body)
    except InvalidInputError as exc:
        return EvidenceClaim(False, "malformed", "", "", None, exc.message)
    return EvidenceClaim(r.proves_fraud, r.kind, r.node_id, r.job_id, r.step_range, r.reason)


def _read_evidence(path: Path) -> bytes:
    from verimesh.core.files import read_user_file

    return read_user_file(path, what="evidence", max_bytes=MAX_EVIDENCE_BYTES)


def _proves(result: EvidenceResult, node_id: str, job_id: str, step_range: tuple[int, int], *, fraud: bool) -> bool:
    return (
        result.proves_fraud
        and (result.node_id, result.job_id, result.step_range) == (node_id, job_id, step_range)
        and (result.kind != "equivocation") == fraud
    )


# -- settling a verification ----------------------------------------------------------------------


def _own_statement(envelope: Envelope, public: PublicKey, job_id: str) -> tuple[dict[str, Any], tuple[int, int]] | None:
    """The node's statement for this job: its own signature verifies and it names the node and the
    job with a step range. Anything else (another signer, a replay) is nobody's fault here."""
    try:
        statement = envelope.statement()
    except InvalidInputError:
        return None
    pred = statement["predicate"]
    rng = pred.get("step_range")
    well_formed = isinstance(rng, list) and len(rng) == 2 and all(type(v) is int and v >= 0 for v in rng)
    if not well_formed or pred.get("node_id") != public.node_id or pred.get("job_id") != job_id:
        return None
    if not envelope.signed_by(public):
        return None
    return statement, (rng[0], rng[1])


class _Settle:
    """The appends of one settlement, the node's standing and the job's account kept current."""

    def __init__(
        self, txn: Transaction, view: LedgerView, public: PublicKey, job_id: str, envelope: Envelope | None = None
    ) -> None:
        self.txn, self.view, self.public, self.job_id, self.envelope = txn, view, public, job_id, envelope
        self.standing = _standing(view, public.node_id)
        self.account = _account(view, job_id)
        self.appended: list[tuple[int, str]] = []

    def free(self, claim: str) -> bool:
        return self.txn.claimed(claim) is None

    def append(self, event: dict[str, Any]) -> int:
        seq = self.txn.append(event)
        self.appended.append((seq, str(event["kind"])))
        self.standing = apply(self.standing, {**event, "seq": seq})
        return seq

    def receipt(self, statement: dict[str, Any], claim: tuple[int, int]) -> int:
        """The node's envelope, logged once (an earlier receipt of the same envelope is reused),
        after the receipt rule ``ledger verify --rules`` applies to it holds (else nothing is
        written: a receipt the rules refuse would be held against this writer for good)."""
        assert self.envelope is not None
        raw = self.envelope.to_bytes()
        taken = self.txn.claimed(f"receipt:{sha256_bytes(raw)}")
        if taken is not None:
            return taken.seq
        event = {
            "kind": "receipt",
            "node_id": self.public.node_id,
            "job_id": self.job_id,
            "step_range": list(claim),
            "subjects": statement["subject"],
            "envelope_digest": sha256_bytes(raw),
            "envelope": b64encode(raw),
        }
        problem, signed = receipt_problem(event, self.public)
        if problem is None and (signed is None or not self.public.verify(*signed)):
            problem = f"the receipt's envelope is not signed by {self.public.node_id}"
        if problem:
            raise InvalidInputError(
                f"settlement refused: {problem}",
                code="receipt-refused",
                hint="nothing was written; the bundle's envelope is not one the ledger's rules accept",
            )
        return self.append(event)

    def slash(self, reason: str, claim: tuple[int, int], evidence: bytes) -> int | None:
        """Slash once per (reason, node, job, step range), with the evidence kept in the ledger."""
        if not self.free(claim_key(f"slash:{reason}", self.public.node_id, self.job_id, list(claim))):
            return None
        slashable = self.standing.slashable
        amount = slashable if reason == "equivocation" else fraud_slash(slashable, fraction_of(self.view.settings))
        if amount <= 0:
            return None
        digest = self.txn.store_evidence(evidence)
        return self.append(
            {
                "kind": "slash",
                "node_id": self.public.node_id,
                "job_id": self.job_id,
                "step_range": list(claim),
                "amount": amount,
                "reason": reason,
                "evidence_digest": digest,
            }
        )


def _find_signer(view: LedgerView, envelope: Envelope | None) -> PublicKey | None:
    """The registered key to verify ``envelope`` with: the key of the node its statement names when
    that node's signature verifies, else the first registered signer whose signature verifies, else
    (nothing verifies: the verdict says so, and blames no one) the statement's node or the first
    registered key id. Signatures are not sealed: a junk one put first must not choose the key."""
    if envelope is None:
        return None
    try:
        named = envelope.statement()["predicate"].get("node_id")
    except InvalidInputError:
        named = None
    candidates = [named] if isinstance(named, str) else []
    candidates += [s.keyid for s in envelope.signatures if s.keyid not in candidates]
    keys = [k for k in (registered_key(view, c) for c in candidates) if k is not None]
    for key in keys:
        if envelope.signed_by(key):
            return key
    return keys[0] if keys else None


def _envelope_of(bundle: Path, job: Job, limits: Limits) -> Envelope | None:
    """The bundle's envelope, or None when the bundle cannot be read (then no node signed it)."""
    try:
        return read_bundle(bundle, limits=limits, version=job.version).envelope
    except InvalidInputError:
        return None


def _require_writer(view: LedgerView, writer: SecretKey) -> None:
    if not view.may_write(writer.public):
        raise InvalidInputError(
            f"{writer.node_id} may not write to this ledger",
            code="writer-not-registered",
            hint="pass --verifier-key with the operator's or a registered verifier's key",
        )


def _registered_signer(view: LedgerView, bundle: Path, envelope: Envelope | None, hint: str) -> PublicKey:
    public = _find_signer(view, envelope)
    if public is None:
        raise InvalidInputError(
            f"{bundle} is unreadable or signed by no node registered in this ledger", code="unknown-node", hint=hint
        )
    return public


def _refuse_self(public: PublicKey, writer: SecretKey) -> None:
    if public.node_id == writer.node_id:
        raise InvalidInputError(
            f"{writer.node_id} may not verify its own result",
            code="self-verification",
            hint="another verifier settles this node's bundles",
        )


def _require_stake(public: PublicKey, standing: Standing) -> None:
    # What a fraud could still take: the bonded stake and every withdrawal still unbonding (a node
    # that withdraws all of it right after cheating is still re-checked and slashed).
    if standing.slashable <= 0:
        raise InvalidInputError(
            f"node {public.node_id} has no stake left",
            code="no-stake",
            hint="the node adds stake with `verimesh ledger stake top-up`",
        )


def _refuse_segment(job: Job) -> None:
    if job.segment is not None:
        raise InvalidInputError(
            "a segment is settled only with its chain, which the ledger cannot do yet",
            code="segment-not-settled",
            hint="verify the chain with --node-keys (no --ledger); post and settle the whole job instead",
        )


def registered_signer(
    bundle: Path, *, job: Job | Path, ledger: Ledger, limits: Limits = DEFAULT_LIMITS
) -> tuple[PublicKey, Samples]:
    """Read only: the registered key of the node that signed ``bundle`` and the audit policy in
    force for it (what ``verify_and_settle`` verifies with), from a ledger checked since its last
    checkpoint. An unreadable bundle or an unregistered signer is refused (exit 3)."""
    job = job if isinstance(job, Job) else load_job(job)
    envelope = _envelope_of(bundle, job, limits)
    with ledger.view() as view:
        public = _registered_signer(view, bundle, envelope, "register the node with `verimesh ledger register`, "
                                    "or give --node-key")  # fmt: skip
        standing = _standing(view, public.node_id)
    return public, standing.samples_for(job.audit_units, job.policy.samples)


def _fleet_reject_holds(verdict: Verdict, envelope: Envelope | None, public: PublicKey, job_id: str) -> bool:
    """The fleet's reject comes with evidence that proves this node's fraud for this claim, and
    the evidence is about this very statement (the envelope it carries is this bundle's)."""
    from verimesh.core.container import read_container

    own = _own_statement(envelope, public, job_id) if envelope is not None else None
    if verdict.evidence is None or own is None or envelope is None:
        return False
    try:
        body = _read_evidence(Path(verdict.evidence))
        carried = bytes(read_container(body, what="evidence").get("envelope.json", b""))
    except (InvalidInputError, OSError):
        return False
    if carried != envelope.to_bytes():
        return False
    return _proves(_check_evidence_bytes(body), public.node_id, job_id, own[1], fraud=True)


def verify_and_settle(
    bundle: Path,
    *,
    job: Job | Path,
    ledger: Ledger,
    writer: SecretKey,
    samples: Samples = None,
    seed: int | None = None,
    evidence_out: Path | None = None,
    runner: StepRunner | None = None,
    limits: Limits = DEFAULT_LIMITS,
    outputs_out: Path | None = None,
    prefetched: Prefetched | None = None,
    srs: Path | None = None,
) -> Settlement:
    """Verify with the node's registered key and the audit policy in force, then settle
    (``outputs_out``: on an accept, also write the verified output values there; ``prefetched``:
    a verifier fleet's verdict, taken in place of step 3 only when it fits, ``Prefetched``;
    ``srs``: a zk job's SRS, if not where its circuit recorded it).

    1. Check the log since its last checkpoint and that ``writer`` may write; find the bundle's
       signer among registered nodes (the statement's node when its signature verifies); the job
       must be registered; the writer is not that node; a node with nothing slashable left
       (bonded or unbonding) is refused (all exit 3, nothing written).
    2. Samples: the caller's, else the policy in force for the node's standing.
    3. ``verify`` against the registered key.
    4. One transaction, the log checked again under the writer lock:
       a. an outcome the node's signature is to blame for (an accept, or a reject with evidence):
          the receipt (after the receipt rule of ``--rules`` holds for it), the verdict once per
          (node, job, step range) unless the node posted the job, then a reward out of the
          owner's deposit, or for a fraud the evidence re-checked, kept, and the fraud fraction
          of the slashable stake, once per claim. A second statement for a claim that already
          has a verdict is a duplicate: accepted, it writes nothing (two statements that both
          verify are not equivocation); rejected, its own evidence slashes it as a fraud;
       b. anything else (a signature by another key, a replay to another job, a broken seal)
          changes no standing: nothing is written for it.

    A segment of a split job is refused: its links name statements only the chain verifies, so
    alone it proves nothing about its inputs (``settle_chain`` settles the whole chain).
    """
    job = job if isinstance(job, Job) else load_job(job)
    _refuse_segment(job)
    # 1.
    envelope = _envelope_of(bundle, job, limits)
    with ledger.view() as view:
        _require_writer(view, writer)
        public = _registered_signer(view, bundle, envelope, "register the node with `verimesh ledger register`, "
                                    "or verify with --node-key")  # fmt: skip
        if _account(view, job.job_id) is None:
            raise InvalidInputError(
                f"job {job.job_id} is not registered in this ledger",
                code="unknown-job",
                hint="its owner posts it with a deposit: `verimesh ledger job register`",
            )
        _refuse_self(public, writer)
        standing = _standing(view, public.node_id)
    _require_stake(public, standing)
    # 2.
    in_force = samples if samples is not None else standing.samples_for(job.audit_units, job.policy.samples)
    # 3.
    verified_by = "here"
    taken = prefetched is not None and prefetched.fits(bundle, job, public, in_force, seed)
    if taken and prefetched is not None and prefetched.verdict.status == "reject":
        # A fleet reject stands only with evidence that proves this node's fraud; any other (no
        # evidence, or evidence that does not re-check: a verifier on other hardware, say) is
        # decided here, so the fleet can never exclude a node the verifier here would accept.
        taken = _fleet_reject_holds(prefetched.verdict, envelope, public, job.job_id)
    if taken and prefetched is not None:
        verdict, verified_by = prefetched.verdict, prefetched.verifier
        if verdict.status == "accept" and outputs_out is not None:
            write_tensor_file(outputs_out, committed_outputs(bundle, job, limits))
    else:
        verdict = verify(
            bundle,
            job=job,
            node_key=public,
            samples=in_force,
            seed=seed,
            evidence_out=evidence_out,
            runner=runner,
            limits=limits,
            outputs_out=outputs_out,
            srs=srs,
        )
    in_force_count = None if in_force == "all" else int(in_force)
    assert envelope is not None  # a signer was found in it
    # 4.
    notes: list[str] = []
    with ledger.transaction(writer) as txn:
        view = _writer_view(txn)
        settle = _Settle(txn, view, public, job.job_id, envelope)
        own = _own_statement(envelope, public, job.job_id)
        # a. (b: the rest)
        attributable = verdict.status == "accept" or (verdict.status == "reject" and verdict.evidence is not None)
        if not attributable or own is None:
            notes.append(
                "nothing recorded: the outcome is not attributable to the node (no evidence its own signature proves)"
            )
        else:
            statement, claim = own
            evidence: bytes | None = None
            if verdict.status == "reject":
                assert verdict.evidence is not None
                evidence = _read_evidence(Path(verdict.evidence))
                if not _proves(_check_evidence_bytes(evidence), public.node_id, job.job_id, claim, fraud=True):
                    evidence = None
                    notes.append("nothing recorded: the evidence does not re-check")
            if verdict.status == "accept" or evidence is not None:
                _record(settle, verdict, statement, claim, in_force, evidence, notes)
    appended = list(settle.appended)
    if txn.commit_seq is not None:
        appended.append((txn.commit_seq, "commit"))
    return Settlement(verdict, tuple(appended), in_force_count, None, "; ".join(notes) or None, verified_by)


@dataclass(frozen=True)
class ChainSettlement:
    """A chain's verdict and what the ledger recorded for its segments, in one transaction."""

    verdict: ChainVerdict
    appended: tuple[tuple[int, str], ...]
    samples_in_force: int | None
    note: str | None = None
    values: dict[str, Any] = field(default_factory=dict, repr=False)  # the job's outputs, on an accept

    def to_json(self) -> dict[str, Any]:
        return {
            **self.verdict.to_json(),
            "ledger_entries": [{"seq": seq, "kind": kind} for seq, kind in self.appended],
            "samples_in_force": "all" if self.samples_in_force is None else self.samples_in_force,
            "ledger_note": self.note,
        }


def settle_chain(
    bundles: Sequence[Path],
    *,
    job: Job | Path,
    ledger: Ledger,
    writer: SecretKey,
    samples: Samples = None,
    seed: int | None = None,
    evidence_out: Path | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> ChainSettlement:
    """``verify --ledger`` of a job split into segments: each segment settled with its own node.

    1. Each bundle's signer is a registered node with something slashable, not the writer; each
       segment's sub-job (``segment_id``) is posted (its owner's deposit pays that segment).
    2. Samples: the caller's, else the strictest policy in force among the chain's nodes.
    3. ``verify_chain`` with those keys.
    4. One transaction: on an accept, every segment's receipt, verdict and reward as for a whole
       job (claim: node, segment id, step range); on a reject, only what a node's own signature
       is to blame for: the failing segment's evidence re-checked and its fraud slashed. A chain
       rejected for a reason nobody's signature proves (a missing segment, another split, a link
       to a statement the verifier was not given) records nothing.
    """
    from verimesh.jobs.segments import views_of

    parent = job if isinstance(job, Job) else load_job(job)
    if parent.segment is not None:
        raise InvalidInputError("settle a chain against the job that was split, not one of its segments")
    envelopes = [_envelope_of(bundle, parent, limits) for bundle in bundles]
    publics: list[PublicKey] = []
    in_force: Samples = samples
    with ledger.view() as view:
        _require_writer(view, writer)
        strictest = 0
        for bundle, envelope in zip(bundles, envelopes, strict=True):
            public = _registered_signer(view, bundle, envelope, "register the node with `verimesh ledger register`")
            _refuse_self(public, writer)
            standing = _standing(view, public.node_id)
            _require_stake(public, standing)
            strictest = max(strictest, standing.samples_for(parent.audit_units, parent.policy.samples))
            publics.append(public)
        if in_force is None:
            in_force = strictest
    verdict, values = verify_chain(bundles, job=parent, node_keys=publics, samples=in_force, seed=seed,
                              evidence_out=evidence_out, limits=limits)  # fmt: skip
    notes: list[str] = []
    views = {}
    if verdict.segments:
        first = envelopes[[str(b) for b in bundles].index(verdict.segments[0].bundle)]
        assert first is not None
        views = dict(enumerate(views_of(parent, first.statement()["predicate"]["segment"]["segments"])))
    with ledger.transaction(writer) as txn:
        view = _writer_view(txn)
        outcomes = _chain_outcomes(verdict)
        missing = [seg.index for seg, _ in outcomes if _account(view, views[seg.index].job_id) is None]
        if missing:
            raise InvalidInputError(
                f"segment(s) {missing} of job {parent.job_id[:19]}… are not posted in this ledger",
                code="unknown-job",
                hint="the owner posts each segment with a deposit: `ledger job register --job parts/seg-K.json`",
            )
        recorded: list[tuple[int, str]] = []
        for seg, outcome in outcomes:
            envelope = envelopes[[str(b) for b in bundles].index(seg.bundle)]
            assert envelope is not None
            sub = views[seg.index]
            settle = _Settle(txn, view, seg.public, sub.job_id, envelope)
            own = _own_statement(envelope, seg.public, sub.job_id)
            if own is None:
                notes.append(f"segment {seg.index}: nothing recorded (not the node's own statement)")
                continue
            statement, claim = own
            evidence: bytes | None = None
            if outcome.status == "reject":
                evidence = _read_evidence(Path(str(outcome.evidence)))
                if not _proves(_check_evidence_bytes(evidence), seg.public.node_id, sub.job_id, claim, fraud=True):
                    notes.append(f"segment {seg.index}: nothing recorded (the evidence does not re-check)")
                    continue
            _record(settle, outcome, statement, claim, in_force, evidence, notes)
            recorded.extend(settle.appended)
        if verdict.status != "accept" and not recorded:
            notes.append("nothing recorded: the chain's reject is not attributable to a node's own signature")
    appended = list(recorded)
    if txn.commit_seq is not None:
        appended.append((txn.commit_seq, "commit"))
    count = None if in_force == "all" else int(in_force or 0)
    return ChainSettlement(verdict, tuple(appended), count, "; ".join(notes) or None, values)


def _chain_outcomes(verdict: ChainVerdict) -> list[tuple[SegmentResult, Verdict]]:
    """(segment, the verdict to record for it): every segment of an accepted chain; of a rejected
    one only the segment whose node's signature proves the fault (its own reject with evidence,
    or the later node of a broken link, whose link evidence is its reject)."""
    if verdict.status == "accept":
        return [(seg, seg.verdict) for seg in verdict.segments]
    out = [(seg, seg.verdict) for seg in verdict.segments if seg.verdict.status == "reject" and seg.verdict.evidence]
    failed = next((c for c in verdict.checks if not c.ok), None)
    if verdict.link_evidence and failed is not None and failed.name.startswith("link-"):
        later = int(failed.name.rsplit("-", 1)[1])
        seg = next(s for s in verdict.segments if s.index == later)
        v = seg.verdict
        rejected = Verdict("reject", (*v.checks, failed), v.job_id, v.node_id, v.seed, v.sampled_steps,
                           verdict.link_evidence)  # fmt: skip
        out.append((seg, rejected))
    return out


def _record(
    settle: _Settle,
    verdict: Verdict,
    statement: dict[str, Any],
    claim: tuple[int, int],
    in_force: Samples,
    evidence: bytes | None,
    notes: list[str],
) -> None:
    """The receipt, the verdict once per claim, then the reward or the fraud slash."""
    node, job_id = settle.public.node_id, settle.job_id
    account = settle.account
    counted = account is not None and account.owner != node
    verdict_seq: int | None = None
    if not counted:
        notes.append("no verdict recorded: the node's own key posted this job")
    elif not settle.free(claim_key("verdict", node, job_id, list(claim))):
        notes.append(
            "no verdict recorded: this (node, job, step range) already has one (a duplicate result: "
            + ("no reward, no slash" if verdict.status == "accept" else "its own evidence goes to the fraud rule")
            + ")"
        )
    else:
        receipt_seq = settle.receipt(statement, claim)
        digest = sha256_bytes(evidence) if evidence is not None else None
        if evidence is not None:
            settle.txn.store_evidence(evidence)
        verdict_seq = settle.append(
            {
                "kind": "verdict",
                "node_id": node,
                "job_id": job_id,
                "step_range": list(claim),
                "status": verdict.status,
                "reason": verdict.reason[:500],
                "seed": str(verdict.seed),
                "sampled_steps": list(verdict.sampled_steps),
                "samples": "all" if in_force == "all" else int(in_force or 0),
                "receipt": receipt_seq,
                "evidence_digest": digest,
                "verifier": settle.txn.writer.node_id,
            }
        )
    if verdict.status == "accept":
        if (
            verdict_seq is not None
            and account is not None
            and settle.free(claim_key("reward", node, job_id, list(claim)))
        ):
            amount = reward_due(int(settle.view.settings["reward"]), account)
            if amount > 0:
                settle.append(
                    {
                        "kind": "reward",
                        "node_id": node,
                        "job_id": job_id,
                        "step_range": list(claim),
                        "amount": amount,
                        "verdict": verdict_seq,
                    }
                )
            else:
                notes.append("no reward: the job's deposit is spent")
    elif evidence is not None:
        settle.receipt(statement, claim)
        if settle.slash("fraud", claim, evidence) is None:
            notes.append("no slash: this fraud claim was already slashed, or nothing is left to slash")


@dataclass(frozen=True)
class SlashResult:
    seq: int
    node_id: str
    amount: int
    reason: str
    evidence_digest: str
    job_id: str = ""
    step_range: tuple[int, int] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "node_id": self.node_id,
            "amount": self.amount,
            "reason": self.reason,
            "evidence_digest": self.evidence_digest,
            "job_id": self.job_id,
            "step_range": list(self.step_range) if self.step_range else None,
        }


def slash_with_evidence(ledger: Ledger, evidence: Path, *, writer: SecretKey) -> SlashResult:
    """Re-check the evidence, then slash: equivocation takes the slashable stake, fraud a fraction.

    1. The evidence file is read once and re-checked from those bytes: not proven is a reject
       (VerificationFailedError, exit 1).
    2. Refused (exit 3, nothing written): a node this ledger does not know, no stake left, or a
       claim (reason, node, job, step range) that already slashed, whatever file encoded it.
    3. One transaction: the evidence kept in the ledger, the slash citing its digest.
    """
    # 1.
    body = _read_evidence(evidence)
    result = _check_evidence_bytes(body)
    if not result.proves_fraud:
        raise VerificationFailedError(f"evidence does not prove fraud: {result.reason}", code="evidence-not-proven")
    if result.step_range is None:
        raise InvalidInputError("the evidence names no step range of a signed statement", code="evidence-unclaimed")
    reason = "equivocation" if result.kind == "equivocation" else "fraud"
    # 2. 3.
    with ledger.transaction(writer) as txn:
        view = _writer_view(txn)
        public = registered_key(view, result.node_id)
        if public is None:
            raise InvalidInputError(f"node {result.node_id} is not registered in this ledger", code="unknown-node")
        settle = _Settle(txn, view, public, result.job_id)
        claim = claim_key(f"slash:{reason}", result.node_id, result.job_id, list(result.step_range))
        taken = txn.claimed(claim)
        if taken is not None:
            raise InvalidInputError(
                f"this {reason} claim (node {result.node_id}, job {result.job_id}, steps {list(result.step_range)}) "
                f"already slashed at entry {taken.seq}",
                code="already-slashed",
                hint="one fraud claim slashes once, whatever evidence file encodes it",
            )
        if settle.standing.slashable <= 0:
            raise InvalidInputError(f"node {result.node_id} has no stake left to slash", code="no-stake")
        before = settle.standing.slashed
        seq = settle.slash(reason, result.step_range, body)
        assert seq is not None  # the claim is free and there is stake: the slash is written
        amount = settle.standing.slashed - before
    return SlashResult(seq, result.node_id, amount, reason, sha256_bytes(body), result.job_id, result.step_range)


# -- auditing -------------------------------------------------------------------------------------


def audit_ledger(
    ledger: Ledger,
    *,
    operator: PublicKey | None = None,
    checkpoint: Checkpoint | None = None,
    rules: bool = True,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> LedgerReport:
    """``verify_ledger``, with the protocol's rules replayed when ``rules`` (evidence re-checked)."""
    book = RuleBook(check_evidence=_evidence_claim, workers=workers) if rules else None
    return verify_ledger(ledger, checkpoint=checkpoint, operator=operator, rules=book, progress=progress)
