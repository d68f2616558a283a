"""The protocol's rules, replayed over the log (`ledger verify --rules`, docs/format.md §10).

``RuleBook`` is fed every well-formed entry in log order by ``store.verify_ledger`` and names
each entry that breaks a rule, the way a tampered hash is named:

- register: carries a request signed by the node for this ledger and this stake (the proof of
  possession alone is public); once per node.
- top-up, withdraw: a request signed by the registered key, used once; a withdrawal no larger
  than the bonded stake, released no earlier than ``unbonding_seconds`` later and for what the
  slashes left of it.
- job: a request signed by the job owner's key for this job and deposit; once per job.
- receipt: the envelope (one signature per key id) verifies under the node's registered key and
  says what the receipt says (``receipt_problem``, which settlement applies before it writes).
- verdict: follows a receipt of the same (node, job, step range), for a job the ledger knows that
  the node did not post; a reject cites evidence that re-checks; written by the writer that
  signed its batch, which is not the node.
- reward: follows an accepted verdict for that claim, out of the job owner's deposit, never to
  the job's owner, of the amount in force.
- slash: cites evidence that re-checks and proves this (node, job, step range) and this
  reason; takes what the rules say (all the slashable stake for equivocation, the fraud
  fraction of it for fraud); stake never goes below zero.
- no entry is dated more than the clock skew after the time of the check.

Cited evidence that is not stored (or whose stored bytes are another file) is damage to the
storage, which the store's own walk names; the rule of the entry citing it is then unchecked,
never held against its writer.

Claims taken twice (a second verdict, reward or slash for one claim) are found by the store's
own walk. Evidence is re-checked by a function passed in (``verimesh.settlement`` passes
``spot.evidence.check_evidence``): this layer may not import the spot mechanism.
BLS checks are batched and, for large logs, spread over the machine's cores.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

from verimesh.core.canonical import b64decode_strict, canonical_json
from verimesh.core.digest import sha256_bytes
from verimesh.errors import InvalidInputError
from verimesh.ledger.events import MAX_CLOCK_SKEW_SECONDS, fraction_of, now, request_problem, time_plus
from verimesh.ledger.reputation import JobAccount, Standing, apply, fraud_slash, reward_due
from verimesh.signing.envelope import Envelope, pae
from verimesh.signing.keys import PublicKey

PARALLEL_AT = 4096  # signature checks below this run inline
CHUNK = 1024


@dataclass(frozen=True)
class EvidenceClaim:
    """What re-checked evidence proves: a fraud (or not) of a kind, by a node, on a job's step range."""

    proves: bool
    kind: str
    node_id: str
    job_id: str
    step_range: tuple[int, int] | None
    reason: str


EvidenceChecker = Callable[[bytes], EvidenceClaim]


def receipt_problem(event: dict[str, Any], registered: PublicKey) -> tuple[str | None, tuple[bytes, bytes] | None]:
    """The receipt rule, shared by ``--rules`` and by settlement before it writes one: the envelope
    parses (one signature per key id), ``envelope_digest`` is its digest, its statement names the
    entry's node, job, step range and subjects, and it carries exactly one signature by the node.
    Returns (why not, None), or (None, (message, signature)) for the caller to verify under
    ``registered`` (``--rules`` batches those checks)."""
    try:
        raw = b64decode_strict(event["envelope"], what="receipt envelope")
        envelope = Envelope.from_bytes(raw, what="receipt envelope")
        statement = envelope.statement()
    except InvalidInputError as exc:
        return f"the receipt's envelope is unreadable: {exc.message}", None
    pred = statement["predicate"]
    if sha256_bytes(raw) != event["envelope_digest"]:
        return "the receipt's envelope digest is not the envelope's", None
    if (pred.get("node_id"), pred.get("job_id"), pred.get("step_range")) != (
        event["node_id"],
        event["job_id"],
        event["step_range"],
    ) or statement["subject"] != event["subjects"]:
        return "the receipt does not say what its envelope says (node, job, step range or outputs)", None
    mine = [s for s in envelope.signatures if s.keyid == registered.node_id]
    if len(mine) != 1:
        return f"the receipt's envelope carries {len(mine)} signatures by {registered.node_id}", None
    return None, (pae(envelope.payload_type, envelope.payload), mine[0].sig)


def _verify_chunk(items: list[tuple[bytes, bytes, bytes]]) -> list[bool]:
    """In a worker process: (public key, message, signature) -> verifies."""
    from verimesh.signing import _bls

    backend = _bls.backend()
    return [backend.verify(pk, msg, sig) for pk, msg, sig in items]


class _Signatures:
    """BLS checks queued with the entry and message to blame; run inline or on a process pool."""

    def __init__(self, workers: int | None) -> None:
        self.workers = workers if workers is not None else (os.cpu_count() or 1)
        self._sigs: list[tuple[int, str, bytes, bytes, bytes]] = []
        self._pool: ProcessPoolExecutor | None = None
        self._futures: list[tuple[list[tuple[int, str]], Future[list[bool]]]] = []
        self.failed: list[tuple[int, str]] = []

    def signature(self, seq: int, problem: str, public: bytes, message: bytes, signature: bytes) -> None:
        self._sigs.append((seq, problem, public, message, signature))
        if len(self._sigs) >= PARALLEL_AT and self.workers > 1:
            self._submit()

    def _submit(self) -> None:
        if self._pool is None:
            import multiprocessing

            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        batch, self._sigs = self._sigs, []
        for at in range(0, len(batch), CHUNK):
            chunk = batch[at : at + CHUNK]
            blame = [(s, p) for s, p, _, _, _ in chunk]
            self._futures.append((blame, self._pool.submit(_verify_chunk, [(k, m, g) for _, _, k, m, g in chunk])))
        # Bound what is in flight (messages are kilobytes each): wait for the oldest.
        while len(self._futures) > 4 * self.workers:
            self._collect(self._futures.pop(0))

    def _collect(self, item: tuple[list[tuple[int, str]], Future[list[bool]]]) -> None:
        blame, future = item
        for (seq, problem), ok in zip(blame, future.result(), strict=True):
            if not ok:
                self.failed.append((seq, problem))

    def finish(self) -> list[tuple[int, str]]:
        try:
            if self._pool is not None and self._sigs:
                self._submit()
            for item in self._futures:
                self._collect(item)
            results = _verify_chunk([(k, m, g) for _, _, k, m, g in self._sigs])
            self.failed += [(s, p) for (s, p, _, _, _), ok in zip(self._sigs, results, strict=True) if not ok]
        finally:
            if self._pool is not None:
                self._pool.shutdown(cancel_futures=True)
        return self.failed


@dataclass
class _Node:
    public: PublicKey
    standing: Standing


class RuleBook:
    """Feed it entries in log order (``entry``, ``commit``), then ``finish`` for the violations."""

    def __init__(
        self,
        *,
        check_evidence: EvidenceChecker,
        workers: int | None = None,
    ) -> None:
        self._load_evidence: Callable[[str], bytes | None] = lambda digest: None
        self._check_evidence = check_evidence
        self._signatures = _Signatures(workers)
        self.violations: list[tuple[int, str]] = []
        self.ledger_id = ""
        self.settings: dict[str, Any] = {}
        self.nodes: dict[str, _Node] = {}
        self.jobs: dict[str, JobAccount] = {}
        self.receipts: dict[int, tuple[str, str, tuple[int, int]]] = {}
        self.verdicts: dict[int, tuple[str, str, tuple[int, int], str]] = {}
        self._batch_verdicts: list[tuple[int, str]] = []
        self._evidence: dict[str, EvidenceClaim | str | None] = {}
        self.evidence_checked = 0
        # Entries dated beyond this (the clock now, plus the skew a writer's append tolerates).
        self._horizon = time_plus(now(), MAX_CLOCK_SKEW_SECONDS)

    def bad(self, seq: int, message: str) -> None:
        self.violations.append((seq, f"entry {seq}: {message}"))

    # -- the feed --------------------------------------------------------------------------------

    def start(self, load_evidence: Callable[[str], bytes | None]) -> None:
        """``load_evidence``: stored evidence bytes by digest (None when not stored)."""
        self._load_evidence = load_evidence

    def entry(self, seq: int, event: dict[str, Any]) -> None:
        kind = event["kind"]
        if event["time"] > self._horizon:
            self.bad(seq, f"the entry is dated {event['time']}, in the future of this check ({now()})")
        handler = getattr(self, "_" + kind.replace("-", "_"), None)
        if handler is not None:
            handler(seq, event)

    def commit(self, writer: str, first: int, seq: int) -> None:
        for s, verifier in self._batch_verdicts:
            if verifier != writer:
                self.bad(s, f"the verdict names verifier {verifier} but {writer} wrote it")
        self._batch_verdicts = []

    def finish(self) -> list[tuple[int, str]]:
        for seq, problem in self._signatures.finish():
            self.bad(seq, problem)
        return sorted(self.violations)

    # -- identity and configuration ------------------------------------------------------------

    def _genesis(self, seq: int, event: dict[str, Any]) -> None:
        self.ledger_id = str(event["ledger_id"])
        self.settings = dict(event["settings"])

    def _settings(self, seq: int, event: dict[str, Any]) -> None:
        self.settings.update(event["changes"])

    # -- stake -----------------------------------------------------------------------------------

    def _request(self, seq: int, event: dict[str, Any], action: str) -> PublicKey | None:
        """The request of the party an event speaks for. Registrations and job posts are checked at
        once (who a node or a job owner is decides everything after, and readers check them the
        same way); a stake request's signature is queued with the other BLS checks."""
        request = event["request"]
        now = action in ("register", "job")
        problem = request_problem(
            request, event["signature"], ledger_id=self.ledger_id, action=action, check_possession=now,
            check_signature=now,
        )  # fmt: skip
        if problem:
            self.bad(seq, problem)
            return None
        public = PublicKey(bytes.fromhex(request["public_key"]), bytes.fromhex(request["proof_of_possession"]))
        if not now:
            problem = f"the {action} request is not signed by {request['node_id']}"
            signature = b64decode_strict(event["signature"], what="signature")
            self._signatures.signature(seq, problem, public.key, canonical_json(request), signature)
        return public

    def _node(self, seq: int, node_id: str, what: str) -> _Node | None:
        node = self.nodes.get(node_id)
        if node is None:
            self.bad(seq, f"{what} for node {node_id}, which is not registered")
        return node

    def _apply(self, seq: int, node: _Node, event: dict[str, Any]) -> None:
        node.standing = apply(node.standing, event)
        if node.standing.stake < 0 or any(u.amount < 0 for u in node.standing.unbonding):
            self.bad(seq, f"the stake of {node.standing.node_id} goes below zero")

    def _register(self, seq: int, event: dict[str, Any]) -> None:
        public = self._request(seq, event, "register")
        if public is None:
            return
        if public.node_id != event["node_id"] or event["request"]["amount"] != event["stake"]:
            self.bad(seq, "the registration does not say what the node's request says (node or stake)")
            return
        if event["node_id"] in self.nodes:
            self.bad(seq, f"registers {event['node_id']} a second time")
            return
        node = _Node(public, Standing(event["node_id"]))
        self.nodes[event["node_id"]] = node
        self._apply(seq, node, event)

    def _own_request(self, seq: int, event: dict[str, Any], action: str) -> _Node | None:
        public = self._request(seq, event, action)
        node = self._node(seq, event["node_id"], f"a {action}")
        if public is None or node is None:
            return None
        if public.key != node.public.key or event["request"]["amount"] != event["amount"]:
            self.bad(seq, f"the {action} is not what the node's registered key asked for")
            return None
        return node

    def _top_up(self, seq: int, event: dict[str, Any]) -> None:
        node = self._own_request(seq, event, "top-up")
        if node is not None:
            self._apply(seq, node, event)

    def _withdraw(self, seq: int, event: dict[str, Any]) -> None:
        node = self._own_request(seq, event, "withdraw")
        if node is None:
            return
        if event["amount"] > node.standing.stake:
            self.bad(seq, f"withdraws {event['amount']} of a bonded stake of {node.standing.stake}")
            return
        due = time_plus(event["time"], int(self.settings["unbonding_seconds"]))
        if event["release_after"] != due:
            self.bad(seq, f"the withdrawal is released after {event['release_after']}, not {due} (unbonding delay)")
            return
        self._apply(seq, node, event)

    def _release(self, seq: int, event: dict[str, Any]) -> None:
        node = self._node(seq, event["node_id"], "a release")
        if node is None:
            return
        pending = {u.seq: u for u in node.standing.unbonding}.get(event["withdrawal"])
        if pending is None:
            self.bad(seq, f"releases withdrawal {event['withdrawal']}, which is not unbonding for this node")
        elif event["time"] < pending.release_after:
            self.bad(seq, f"releases withdrawal {pending.seq} before {pending.release_after} (unbonding delay)")
        elif event["amount"] != pending.amount:
            self.bad(seq, f"releases {event['amount']} where {pending.amount} is left of withdrawal {pending.seq}")
        else:
            self._apply(seq, node, event)

    # -- jobs and results ----------------------------------------------------------------------

    def _job(self, seq: int, event: dict[str, Any]) -> None:
        public = self._request(seq, event, "job")
        if public is None:
            return
        request = event["request"]
        if (
            request["job_id"] != event["job_id"]
            or public.node_id != event["owner"]
            or request["amount"] != event["deposit"]
        ):
            self.bad(seq, "the job entry does not say what its owner's request says (job, owner or deposit)")
            return
        self.jobs.setdefault(event["job_id"], JobAccount(event["job_id"], event["owner"], event["deposit"]))

    def _receipt(self, seq: int, event: dict[str, Any]) -> None:
        node = self._node(seq, event["node_id"], "a receipt")
        if node is None:
            return
        problem, signed = receipt_problem(event, node.public)
        if problem or signed is None:
            self.bad(seq, problem or "the receipt is unreadable")
            return
        self._signatures.signature(
            seq, f"the receipt's envelope is not signed by {node.public.node_id}", node.public.key, *signed
        )
        self.receipts[seq] = (event["node_id"], event["job_id"], (event["step_range"][0], event["step_range"][1]))

    def _claim(self, event: dict[str, Any]) -> tuple[str, str, tuple[int, int]]:
        return event["node_id"], event["job_id"], (event["step_range"][0], event["step_range"][1])

    def _counted_job(self, seq: int, event: dict[str, Any], what: str) -> JobAccount | None:
        account = self.jobs.get(event["job_id"])
        if account is None:
            self.bad(seq, f"{what} for job {event['job_id']}, which the ledger does not know")
        elif account.owner == event["node_id"]:
            self.bad(seq, f"{what} for a job the node's own key posted")
            return None
        return account

    def _verdict(self, seq: int, event: dict[str, Any]) -> None:
        node = self._node(seq, event["node_id"], "a verdict")
        if node is None:
            return
        claim = self._claim(event)
        if self.receipts.get(event["receipt"]) != claim:
            self.bad(
                seq,
                f"the verdict does not follow a receipt of its node, job and step range (entry "
                f"{event['receipt']}): only a bundle whose signature verifies changes a standing",
            )
            return
        if self._counted_job(seq, event, "a verdict") is None:
            return
        if event["verifier"] == event["node_id"]:
            self.bad(seq, f"the verdict is by {event['verifier']} on its own result: a node never verifies itself")
            return
        self._batch_verdicts.append((seq, event["verifier"]))
        if event["status"] == "accept" and event["evidence_digest"] is not None:
            self.bad(seq, "an accepting verdict cites evidence")
            return
        if event["status"] == "reject":
            if event["evidence_digest"] is None:
                self.bad(seq, "a reject without evidence is nobody's fault and changes no standing")
                return
            if not self._proven(seq, event["evidence_digest"], claim, fraud=True):
                return
        self.verdicts[seq] = (*claim, event["status"])
        self._apply(seq, node, event)

    def _reward(self, seq: int, event: dict[str, Any]) -> None:
        node = self._node(seq, event["node_id"], "a reward")
        if node is None:
            return
        if self.verdicts.get(event["verdict"]) != (*self._claim(event), "accept"):
            self.bad(seq, f"the reward does not follow an accepting verdict for its claim (entry {event['verdict']})")
            return
        account = self._counted_job(seq, event, "a reward")
        if account is None:
            return
        due = reward_due(int(self.settings["reward"]), account)
        if event["amount"] != due:
            self.bad(
                seq,
                f"the reward is {event['amount']} where the rules pay {due} (reward in force, deposit left "
                f"{account.remaining})",
            )
            return
        self.jobs[account.job_id] = JobAccount(account.job_id, account.owner, account.deposit, account.paid + due)
        self._apply(seq, node, event)

    def _slash(self, seq: int, event: dict[str, Any]) -> None:
        node = self._node(seq, event["node_id"], "a slash")
        if node is None:
            return
        if not self._proven(seq, event["evidence_digest"], self._claim(event), fraud=event["reason"] == "fraud"):
            return
        slashable = node.standing.slashable
        if event["reason"] == "equivocation":
            due = slashable
        else:
            due = fraud_slash(slashable, fraction_of(self.settings))
        if event["amount"] != due or due <= 0:
            self.bad(seq, f"slashes {event['amount']} where the rules take {due} of a slashable stake of {slashable}")
            return
        self._apply(seq, node, event)

    def _proven(self, seq: int, digest: str, claim: tuple[str, str, tuple[int, int]], *, fraud: bool) -> bool:
        """The evidence is stored, re-checks, and proves this claim (fraud, or equivocation).

        Evidence that is not stored, or whose stored bytes are another file, is damage to the
        storage, which ``ledger verify`` names; it is not the writer's doing (the writer stored it
        in the same transaction), so it is not held against the entry: the rule is unchecked and
        the entry counts as written."""
        if digest not in self._evidence:
            body = self._load_evidence(digest)
            if body is None or sha256_bytes(body) != digest:
                self._evidence[digest] = None
            else:
                self.evidence_checked += 1
                self._evidence[digest] = self._check_evidence(body)
        result = self._evidence[digest]
        if result is None:
            return True
        if isinstance(result, str):
            self.bad(seq, result)
            return False
        if not result.proves:
            self.bad(seq, f"cites evidence {digest} that does not prove fraud: {result.reason}")
            return False
        if (result.node_id, result.job_id, result.step_range) != claim:
            self.bad(
                seq,
                f"cites evidence about node {result.node_id}, job {result.job_id}, steps "
                f"{result.step_range}, not this claim",
            )
            return False
        if (result.kind != "equivocation") != fraud:
            self.bad(seq, f"cites {result.kind} evidence for a {'fraud' if fraud else 'equivocation'} claim")
            return False
        return True
