"""The coordinator: job board, verifier and ledger writer in one process (``verimesh serve``).

HTTP API (JSON unless noted; every state change signed, ``mesh.auth``)::

    GET  /v1/info                              who this is: ledger id, operator key
    GET  /v1/status[?jobs=N]                   nodes, the N newest jobs (200), ledger head (read-only)
    GET  /v1/jobs/{job_id}                     one job and its tasks (read-only)
    GET  /v1/jobs/{job_id}/receipt       owner the signed receipt of a done job
    GET  /v1/jobs/{job_id}/outputs       owner the verified outputs (.npz)
    GET  /v1/jobs/{job_id}/proofs        owner inclusion proofs of the job's ledger entries
    POST /v1/blobs/missing               any   which of these digests are not stored
    PUT  /v1/blobs/{digest}              any   a file a job will pin (bytes; digest checked)
    POST /v1/jobs                        owner {job, files, request, deadline, max_attempts}
    POST /v1/nodes/register              node  {request: signed ledger registration, device}
    POST /v1/nodes/session               node  {ephemeral} -> {session, ephemeral, expires}: later
                                               node requests may carry a session MAC instead of a
                                               signature (mesh.auth; 401 session-unknown: open another)
    POST /v1/nodes/heartbeat             node  {}
    POST /v1/lease                       node  {} -> 200 a lease, or 204 nothing to do
    GET  /v1/tasks/{task}/files/{digest} node  a file of a task it holds a live lease on
    POST /v1/tasks/{task}/result/{lease} node  the bundle (bytes), for its own live lease
    POST /v1/tasks/{task}/commit/{lease} node  challenge mode: the commitment (an opened bundle of
                                               trace.json and the outputs) -> the challenge
    POST /v1/tasks/{task}/open/{lease}   node  challenge mode: the challenged members, opened
    POST /v1/tasks/{task}/release/{lease} node {reason}: give back a task it cannot run

Refusals are JSON ``{"error": {"code", "message"}}``: 400/422 malformed, 401 unsigned, replayed,
expired or badly signed, 403 signed by a party not allowed the request (an unregistered node, a
banned one, a lease that is not its own), 404, 409 a late or duplicate answer, 413 too large,
429 over the signer's rate.

Results are verified by one verifier thread, in the order they arrived, with the ledger's audit
policy for the node and a seed only the operator can derive (its deterministic BLS signature
over the task and the bundle digest, or in challenge mode the commitment's: unpredictable to the
node, the same after a restart, so a result re-verified after a crash meets the same sample).
``verify_and_settle`` records the verdict, reward or slash in the ledger; the task is then done
(the job with it, its receipt signed by the operator) or pending again for another node, in one
transaction.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from verimesh import __version__
from verimesh.core.canonical import canonical_json, parse_json
from verimesh.core.container import DEFAULT_LIMITS
from verimesh.core.digest import parse_digest, sha256_bytes, sha256_file
from verimesh.core.packing import NAME as PACKING
from verimesh.core.packing import is_packed, unpack
from verimesh.core.tensors import TensorRef, write_tensor_file
from verimesh.errors import InvalidInputError, VerificationFailedError
from verimesh.fleet.verifiers import Verifiers
from verimesh.jobs.bundle import merge_openings, opened_names, read_bundle
from verimesh.jobs.job import Job, job_from_bytes
from verimesh.jobs.segments import MAX_SEGMENTS, check_ranges, segment_view, views_of
from verimesh.jobs.tolerance import DEFAULT_TOLERANCES, Tolerance, compare_tensors
from verimesh.ledger.events import SignedRequest
from verimesh.ledger.reputation import MAX_LEVEL, Standing
from verimesh.ledger.store import Ledger, inclusion_document
from verimesh.mesh.auth import HEADER_SESSION, AuthError, SessionError, Sessions, Signed, Verifier
from verimesh.mesh.files import JOB_NAME, MAX_CIRCUIT_JSON, check_files, job_files, materialize
from verimesh.mesh.sandbox import Sandbox
from verimesh.mesh.state import CHURN, Decision, MeshState, StateError, Verifying, challenge_view
from verimesh.settlement import (
    NODE_KINDS,
    Prefetched,
    all_standings,
    node_standing,
    register_job,
    register_node,
    registered_key,
    registered_signer,
    settle_chain,
    slash_with_evidence,
    standings_of,
    verify_and_settle,
)
from verimesh.signing.keys import PublicKey, SecretKey
from verimesh.spot.spotcheck import challenged_members, commitment_members, sample_steps, seeded_rng
from verimesh.subtasks.chain import ChainVerdict, whole_verdict
from verimesh.subtasks.receipt import MAX_REPLICAS, receipt_body, sign_receipt
from verimesh.workflows import check_generate_layout, verify

log = logging.getLogger("verimesh.mesh")

BOND_CACHE = 5000  # nodes whose standing the lease gate keeps (those the ledger's growth names are read again)
BOND_REFRESH_S = 30.0  # and every cached standing at least this often
TRANSFERS = ("challenge", "full")  # what a node uploads: commitment then sampled openings, or the full bundle

MAX_JSON = 12 * 1024 * 1024  # a submission: a job document (8 MiB at most) and its requests
DEVICES = ("cpu", "cuda", "auto")
JOB_DEVICES = ("any", "cpu", "cuda")  # which nodes a job's tasks may be leased to
_SEED_TAG = b"verimesh.mesh.seed.v1\x00"
CHECKPOINT_EVERY = 32
CHECKPOINT_SHARE = 16  # and at least a sixteenth of the log between checkpoints (``_checkpoint_if_due``)
BLOB_CACHE_BYTES = 256 * 1024 * 1024  # blobs kept in memory by a coordinator process (``_stored``)
BLOB_CACHE_ITEM = 64 * 1024 * 1024  # and the largest one kept
HANDLER_THREADS = 8  # request handlers at once (the rest queue on the event loop)
UPLOAD_THREADS = 4  # upload handlers at once, beside those
UPLOAD_PACKINGS = (PACKING,)  # what a node's uploads may be packed as (core/packing.py), besides plain bytes
STATUS_JOBS = 200  # the newest jobs /v1/status shows (counts cover every job; /v1/jobs/ID shows any one)
SETTLED_KINDS = ("receipt", "verdict", "reward")  # what the ledger records of a settled job


class HTTPError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message[:500]}}, status_code=status)


class _Buckets:
    """Token buckets per signer: ``rate`` requests a second, bursts of ``burst``."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, who: str) -> bool:
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(who, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens < 1:
                self._buckets[who] = (tokens, now)
                return False
            if len(self._buckets) > 100_000:  # forget the longest-idle signer, not everyone's count
                self._buckets.pop(next(iter(self._buckets)))
            self._buckets.pop(who, None)
            self._buckets[who] = (tokens - 1, now)
            return True


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Coordinator:
    """One mesh: the ledger at ``ledger_url`` (created with ``operator`` when absent), its
    mesh tables beside it, and the HTTP app (``app``) that ``serve`` runs on uvicorn."""

    def __init__(
        self,
        ledger_url: str,
        operator: SecretKey,
        *,
        deadline: float = 300.0,
        heartbeat_timeout: float = 15.0,
        max_upload: int = 512 * 1024 * 1024,
        read_token: str | None = None,
        rate: float = 200.0,
        burst: float = 400.0,
        ledger_settings: dict[str, Any] | None = None,
        verify_timeout: float = 600.0,
        isolate: bool = True,
        admission: str = "open",
        blob_quota: int = 2 * 1024 * 1024 * 1024,
        blob_ttl: float = 3600.0,
        fleet: Verifiers | None = None,
        answer_within: float = 60.0,
        srs: Path | None = None,
    ) -> None:
        try:
            self.ledger = Ledger.open(ledger_url)
        except InvalidInputError as exc:
            if not str(exc.message).startswith("no ledger at"):
                raise
            self.ledger = Ledger.create(ledger_url, operator, settings=ledger_settings)
        if self.ledger.operator.key != operator.public.key:
            raise InvalidInputError("--operator-key is not this ledger's operator key", code="not-operator")
        self.operator = operator
        self.deadline = deadline
        self.max_upload = max_upload
        self.read_token = read_token
        self.state = MeshState(self.ledger.engine, heartbeat_timeout=heartbeat_timeout,
                               churn=None if admission == "open" else CHURN)  # fmt: skip
        self.auth = Verifier(self.ledger.ledger_id)
        self.sessions = Sessions(self.ledger.ledger_id)
        self._buckets = _Buckets(rate, burst)
        self._registered: dict[str, PublicKey] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._standings: tuple[float, dict[str, Any]] = (0.0, {})
        self._bonds: tuple[int, dict[str, Standing]] = (-1, {})  # ledger size, node id -> standing then
        self._bonds_read = 0.0  # when every cached standing was last read again
        self.verify_timeout = verify_timeout
        self._retried: set[str] = set()
        self.blob_quota, self.blob_ttl = blob_quota, blob_ttl
        self._collected = 0.0
        if admission not in ("open", "ledger"):
            raise InvalidInputError(f"admission must be open or ledger, not {admission!r}")
        self.admission = admission
        self.srs = srs.resolve() if srs is not None else None  # zk jobs: the SRS proofs are checked with
        self.srs_digest = sha256_file(self.srs) if self.srs is not None else None
        self._sandbox = (Sandbox(verifier_child, ledger_url, operator, heartbeat_timeout, admission, self.srs)
                         if isolate else None)  # fmt: skip
        self.fleet = fleet  # verifies ahead of settlement (``_prefetch``); settlement stays here
        self.answer_within = answer_within  # seconds a node has to open its challenged members
        self._jobs: dict[str, Job] = {}  # job document digest -> parsed job (challenges sample on it)
        self._upload_threads: anyio.CapacityLimiter | None = None  # made on the server's event loop
        self._blobs: OrderedDict[str, bytes] = OrderedDict()  # digest -> bytes that match it (``_stored``)
        self._blobs_size = 0
        self._blobs_lock = threading.Lock()

    # -- identity --------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        return {
            "coordinator": self.ledger.ledger_id,
            "ledger_id": self.ledger.ledger_id,
            "operator": self.operator.node_id,
            "operator_key": self.operator.public.to_json(),
            "heartbeat_timeout": self.state.heartbeat_timeout,
            "admission": self.admission,
            "uploads": list(UPLOAD_PACKINGS),
            "version": __version__,
        }

    def _registered_key(self, node_id: str) -> PublicKey | None:
        key = self._registered.get(node_id)
        if key is None:
            with self.ledger.view() as view:
                key = registered_key(view, node_id)
            if key is not None:
                self._registered[node_id] = key  # a registration is never undone
        return key

    # -- the HTTP app ----------------------------------------------------------------------------

    def app(self) -> Starlette:
        routes = [
            Route("/", self._wrap(self._dashboard, read=True), methods=["GET"]),
            Route("/v1/info", self._wrap(self._info), methods=["GET"]),
            Route("/v1/status", self._wrap(self._status, read=True), methods=["GET"]),
            Route("/v1/jobs", self._wrap(self._submit), methods=["POST"]),
            Route("/v1/jobs/{job_id}", self._wrap(self._job, read=True), methods=["GET"]),
            Route("/v1/jobs/{job_id}/receipt", self._wrap(self._receipt), methods=["GET"]),
            Route("/v1/jobs/{job_id}/outputs", self._wrap(self._outputs), methods=["GET"]),
            Route("/v1/jobs/{job_id}/proofs", self._wrap(self._proofs), methods=["GET"]),
            Route("/v1/blobs/missing", self._wrap(self._missing), methods=["POST"]),
            Route("/v1/blobs/{digest}", self._wrap(self._put_blob, upload=True), methods=["PUT"]),
            Route("/v1/nodes/register", self._wrap(self._register), methods=["POST"]),
            Route("/v1/nodes/session", self._wrap(self._session), methods=["POST"]),
            Route("/v1/nodes/heartbeat", self._wrap(self._heartbeat), methods=["POST"]),
            Route("/v1/lease", self._wrap(self._lease), methods=["POST"]),
            Route("/v1/tasks/{task_id}/files/{digest}", self._wrap(self._file), methods=["GET"]),
            Route("/v1/tasks/{task_id}/result/{lease_id}", self._wrap(self._result, upload=True), methods=["POST"]),
            Route("/v1/tasks/{task_id}/commit/{lease_id}", self._wrap(self._commit, upload=True), methods=["POST"]),
            Route("/v1/tasks/{task_id}/open/{lease_id}", self._wrap(self._open, upload=True), methods=["POST"]),
            Route("/v1/tasks/{task_id}/release/{lease_id}", self._wrap(self._release), methods=["POST"]),
        ]

        @asynccontextmanager
        async def lifespan(_app: Starlette) -> AsyncIterator[None]:
            # Handlers run in a few threads, not anyio's 40: on the GIL, a thread holding the
            # database's write lock waited its turn behind every other runnable one (measured:
            # 20 nodes, 8 threads instead of 40, ~12% more tasks/s and ~15% less CPU a task).
            anyio.to_thread.current_default_thread_limiter().total_tokens = HANDLER_THREADS
            self._upload_threads = anyio.CapacityLimiter(UPLOAD_THREADS)
            self.start()
            try:
                yield
            finally:
                await run_in_threadpool(self.stop)

        return Starlette(routes=routes, lifespan=lifespan)

    def _wrap(
        self, handler: Callable[[Request, bytes], Any], *, read: bool = False, upload: bool = False
    ) -> Callable[[Request], Awaitable[Response]]:
        """An endpoint: read-token check for the views; the body read within its limit (a file
        upload: --max-upload-mb; anything else: MAX_JSON) before any signature is checked."""
        limit = self.max_upload if upload else min(self.max_upload, MAX_JSON)

        async def endpoint(request: Request) -> Response:
            try:
                if read:
                    self._check_read_token(request)
                body = await self._body(request, limit)
                # Uploads (unpacked, hashed and stored in their thread) have threads of their own:
                # large ones never hold up a heartbeat or a lease.
                limiter = self._upload_threads if upload else None
                result = await anyio.to_thread.run_sync(handler, request, body, limiter=limiter)
            except HTTPError as exc:
                return _error(exc.status, exc.code, exc.message)
            except SessionError as exc:
                return _error(401, exc.code, str(exc))
            except AuthError as exc:
                return _error(401, "unauthenticated", str(exc))
            except StateError as exc:
                return _error(exc.status, "refused", exc.message)
            except InvalidInputError as exc:
                return _error(422, exc.code, exc.message)
            if isinstance(result, Response):
                return result
            if result is None:
                return Response(status_code=204)
            return JSONResponse(result)

        return endpoint

    def _check_read_token(self, request: Request) -> None:
        if self.read_token is None:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        given = given or request.query_params.get("token", "")
        if not hashlib.sha256(given.encode()).digest() == hashlib.sha256(self.read_token.encode()).digest():
            raise HTTPError(401, "read-token", "this view needs the coordinator's read token")

    async def _body(self, request: Request, limit: int) -> bytes:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise HTTPError(413, "too-large", f"the body is over this request's {limit} byte limit")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPError(413, "too-large", f"the body is over this request's {limit} byte limit")
            chunks.append(chunk)
        return b"".join(chunks)

    def _signed(self, request: Request, body: bytes, *, session: bool = False) -> Signed:
        """The signer of a request: a BLS-signed one (its nonce recorded in the database), or, where
        ``session`` allows it, one MACed in a session the signer opened (its counter taken in memory)."""
        if request.headers.get(HEADER_SESSION):
            if not session:
                raise AuthError("this request must be signed with the key (X-Verimesh-Signature), not a session")
            # The counter is taken before the rate bucket is charged: a replay drains nothing.
            signed = self.sessions.check(request.headers, method=request.method, path=request.url.path, body=body)
            if not self._buckets.take(signed.node_id):
                raise HTTPError(429, "rate-limited", "too many requests from this key; slow down")
            return signed
        signed = self.auth.check(request.headers, method=request.method, path=request.url.path, body=body)
        # A replay is refused before it is charged to its key: whoever saw one signed request of a
        # node must not drain that node's rate (and make it miss a challenge's deadline).
        if self.state.seen_nonce(signed.node_id, signed.nonce):
            raise AuthError("this request was already seen (replayed nonce)")
        if not self._buckets.take(signed.node_id):
            raise HTTPError(429, "rate-limited", "too many requests from this key; slow down")
        if not self.state.use_nonce(signed.node_id, signed.nonce, signed.stamp, window=self.auth.window):
            raise AuthError("this request was already seen (replayed nonce)")
        return signed

    def _node(self, request: Request, body: bytes, *, session: bool = True) -> Signed:
        """A signed (or session) request by a registered, unbanned node with this key."""
        signed = self._signed(request, body, session=session)
        key = self._registered_key(signed.node_id)
        if key is None or key.key != signed.public.key:
            raise HTTPError(403, "unknown-node", "this key is not a node registered with this coordinator")
        row = self.state.node(signed.node_id)
        if row is None:
            raise HTTPError(403, "unknown-node", "register with /v1/nodes/register first")
        if row["banned"]:
            raise HTTPError(403, "banned", f"this node is excluded from the mesh: {row['banned']}")
        return signed

    @staticmethod
    def _json_body(body: bytes) -> Any:
        try:
            return parse_json(body, what="request body", max_bytes=MAX_JSON)
        except InvalidInputError as exc:
            raise HTTPError(400, "malformed", exc.message) from exc

    # -- read-only views -------------------------------------------------------------------------

    def _info(self, request: Request, body: bytes) -> Any:
        return self.info()

    def _standing_view(self) -> dict[str, Any]:
        stamp, cached = self._standings
        if time.monotonic() - stamp > 2.0:
            cached = {n: {"stake": s.stake, "slashed": s.slashed, "slashable": s.slashable, "score": round(s.score, 4),
                          "audit_level": s.audit_level, "accepted": s.accepted, "rejected": s.rejected}
                      for n, s in all_standings(self.ledger).items()}  # fmt: skip
            self._standings = (time.monotonic(), cached)
        return cached

    def status(self, jobs: int = STATUS_JOBS) -> dict[str, Any]:
        """Nodes, the ``jobs`` newest jobs, task counts over all jobs, the ledger head, recent slashes."""
        now = time.time()
        standings = self._standing_view()
        node_rows = [
            {
                "node_id": n["node_id"], "device": n["device"],
                "online": now - n["last_seen"] <= self.state.heartbeat_timeout and not n["banned"],
                "last_seen": round(n["last_seen"], 3), "banned": n["banned"], "missed": int(n.get("missed") or 0),
                **standings.get(n["node_id"], {}),
            }
            for n in self.state.nodes()
        ]  # fmt: skip
        size = self.ledger.size()
        head = self.ledger.root(size).hex() if size else None
        slashes = [
            {"seq": e.seq, "time": e.event.get("time"), "node_id": e.event.get("node_id"),
             "job_id": e.event.get("job_id"), "amount": e.event.get("amount"), "reason": e.event.get("reason"),
             "evidence_digest": e.event.get("evidence_digest")}
            for e in self.ledger.last_entries(kinds=["slash"], limit=20)
        ]  # fmt: skip
        checkpoint = None
        for e in self.ledger.last_entries(kinds=["checkpoint"], limit=1):
            checkpoint = {"seq": e.seq, "tree_size": e.event.get("tree_size"), "time": e.event.get("time")}
        views = [self._job_view(j) for j in self.state.jobs(jobs)] if jobs else []
        return {"coordinator": self.ledger.ledger_id, "time": round(now, 3), "nodes": node_rows,
                "jobs": views, "tasks": self.state.counts(),
                "ledger": {"size": size, "root": head, "checkpoint": checkpoint}, "slashes": slashes}  # fmt: skip

    @staticmethod
    def _job_view(doc: dict[str, Any]) -> dict[str, Any]:
        return {
            "job_id": doc["job_id"], "owner": doc["owner"], "state": doc["state"], "created": doc["created"],
            "updated": doc["updated"], "error": doc["error"], "receipt": doc["receipt"] is not None,
            "device": doc["spec"].get("device", "any"), "replicas": doc["spec"].get("replicas", 1),
            "min_level": doc["spec"].get("min_level", 0), "transfer": doc["spec"].get("transfer", "full"),
            "tasks": [
                {"task_id": t["task_id"], "position": t["position"], "replica": t["replica"], "state": t["state"],
                 "node_id": t["node_id"],
                 "attempts": t["attempts"], "history": t["history"],
                 **({"challenge": {"steps": t["challenge"]["steps"], "samples": t["challenge"]["samples"],
                                   "tensors": len(t["challenge"]["members"]), "bytes": t["challenge"]["bytes"]}}
                    if t.get("challenge") else {}),
                 "verdict": None if t["verdict"] is None else {k: t["verdict"].get(k) for k in
                                                               ("verdict", "reason", "node_id", "decided_by",
                                                                "samples_in_force", "settle_s",
                                                                "distance_to_referee", "verified_by")}}
                for t in doc["tasks"]
            ],
        }  # fmt: skip

    def _status(self, request: Request, body: bytes) -> Any:
        raw = request.query_params.get("jobs", str(STATUS_JOBS))
        if not raw.isdigit() or not 0 <= int(raw) <= STATUS_JOBS:
            raise HTTPError(422, "bad-jobs", f"jobs is a count of the newest jobs to show, 0..{STATUS_JOBS}")
        return self.status(int(raw))

    def _job(self, request: Request, body: bytes) -> Any:
        doc = self.state.job(request.path_params["job_id"])
        if doc is None:
            raise HTTPError(404, "unknown-job", "no such job")
        return self._job_view(doc)

    def _receipt(self, request: Request, body: bytes) -> Any:
        signed = self._signed(request, body)
        doc = self.state.job(request.path_params["job_id"])
        if doc is not None and doc["owner"] != signed.node_id:  # it pins the outputs' digests
            raise HTTPError(403, "not-owner", "only the job's owner reads its receipt")
        if doc is None or doc["receipt"] is None:
            raise HTTPError(404, "no-receipt", "no such job, or it is not done")
        return Response(self.state.blob(doc["receipt"]), media_type="application/json")

    def _owned_job(self, request: Request, body: bytes, what: str) -> dict[str, Any]:
        """The job of the path, for a request its owner signed (404 unknown, 403 another signer)."""
        signed = self._signed(request, body)
        doc = self.state.job(request.path_params["job_id"])
        if doc is None:
            raise HTTPError(404, "unknown-job", "no such job")
        if doc["owner"] != signed.node_id:
            raise HTTPError(403, "not-owner", f"only the job's owner reads its {what}")
        return doc

    def _outputs(self, request: Request, body: bytes) -> Any:
        doc = self._owned_job(request, body, "outputs")
        if doc["outputs"] is None:
            raise HTTPError(404, "not-done", f"the job is {doc['state']}")
        return Response(self.state.blob(doc["outputs"]), media_type="application/octet-stream")

    def _proofs(self, request: Request, body: bytes) -> Any:
        """A done job's settlement in the ledger (the nodes' receipts, the verdicts, the rewards),
        each entry with its RFC 9162 inclusion proof under an operator-signed checkpoint (signed
        now when none covers them yet): the owner checks offline that the job was settled."""
        doc = self._owned_job(request, body, "ledger proofs")
        if doc["state"] != "done":
            raise HTTPError(404, "not-done", f"the job is {doc['state']}")
        settled_by = {t["node_id"] for t in doc["tasks"] if t["state"] == "done"}
        slashed = {t["node_id"] for t in doc["tasks"] if t["state"] == "rejected"}  # a referee's rejected replicas
        entries = sorted(
            (e for job_id in doc["spec"]["posted"]
             for e in self.ledger.entries(job_id=job_id, kinds=[*SETTLED_KINDS, "slash"])
             if (e.kind in SETTLED_KINDS and e.event.get("node_id") in settled_by)
             or (e.kind == "slash" and e.event.get("node_id") in slashed)),
            key=lambda e: e.seq,
        )  # fmt: skip
        if not entries:
            raise HTTPError(404, "not-settled", "the ledger holds no settlement of this job")
        if self.ledger.latest_checkpoint(covering=entries[-1].seq) is None:
            self.ledger.checkpoint(self.operator)
        return {"proofs": [inclusion_document(self.ledger, e.seq) for e in entries]}

    def _dashboard(self, request: Request, body: bytes) -> Any:
        from verimesh.mesh.dashboard import PAGE

        return HTMLResponse(PAGE)

    # -- job owners ------------------------------------------------------------------------------

    def _missing(self, request: Request, body: bytes) -> Any:
        self._signed(request, body)
        doc = self._json_body(body)
        digests = doc.get("digests") if isinstance(doc, dict) else None
        if not isinstance(digests, list) or len(digests) > 100_000:
            raise HTTPError(400, "malformed", 'want {"digests": [...]}')
        for d in digests:
            parse_digest(d, what="digest")
        return {"missing": self.state.has_blobs([str(d) for d in digests])}

    def _put_blob(self, request: Request, body: bytes) -> Any:
        signed = self._signed(request, body)
        digest = request.path_params["digest"]
        parse_digest(digest, what="blob digest")
        if sha256_bytes(body) != digest:
            raise HTTPError(422, "digest-mismatch", "the body does not match the digest in the path")
        self.state.upload(signed.node_id, body, quota=self.blob_quota)
        return {"digest": digest}

    def _submit(self, request: Request, body: bytes) -> Any:
        signed = self._signed(request, body)
        doc = self._json_body(body)
        keys = {"job", "files", "requests", "segments", "deadline", "max_attempts"}
        if not isinstance(doc, dict) or set(doc) - {"device", "replicas", "min_level", "shards", "transfer"} != keys:
            raise HTTPError(400, "malformed", f"a submission is {{{', '.join(sorted(keys))}}} and optionally "
                            "device, replicas, min_level, shards and transfer")  # fmt: skip
        shard_docs = _shard_docs(doc.get("shards"))
        if shard_docs is not None and (doc["segments"] is not None or doc.get("replicas", 1) != 1):
            raise HTTPError(422, "bad-shards", "shards run the whole job on each row: not with segments or replicas")
        device, replicas, min_level = doc.get("device", "any"), doc.get("replicas", 1), doc.get("min_level", 0)
        if type(min_level) is not int or not 0 <= min_level <= MAX_LEVEL:
            raise HTTPError(422, "bad-min-level", f"min_level must be an audit level, 0 .. {MAX_LEVEL}")
        if device not in JOB_DEVICES:
            raise HTTPError(422, "bad-device", f"device must be one of {', '.join(JOB_DEVICES)}")
        if type(replicas) is not int or not 1 <= replicas <= MAX_REPLICAS:
            raise HTTPError(422, "bad-replicas", f"replicas must be 1 .. {MAX_REPLICAS}")
        if replicas > 1 and doc["segments"] is not None:
            raise HTTPError(422, "bad-replicas", "replicas run whole jobs; a job split into segments runs once "
                            "(not yet: replicated segments)")  # fmt: skip
        transfer = doc.get("transfer", "full")
        if transfer not in TRANSFERS:
            raise HTTPError(422, "bad-transfer", f"transfer must be one of {', '.join(TRANSFERS)}")
        zk = isinstance(doc["files"], dict) and "circuit" in doc["files"]
        if zk and (doc["segments"] is not None or shard_docs is not None or replicas != 1):
            raise HTTPError(422, "bad-mode", "a zk job is proven whole, once: not with segments, shards or replicas")
        if transfer == "challenge" and (doc["segments"] is not None or shard_docs is not None or replicas != 1 or zk):
            raise HTTPError(422, "bad-transfer", "challenges are for whole jobs run once: segments, shards and "
                            "replicas ship full bundles (their successors, batch and referee read every "
                            "tensor)")  # fmt: skip
        deadline, attempts = doc["deadline"], doc["max_attempts"]
        if type(deadline) is not int or not 1 <= deadline <= 7 * 86400:
            raise HTTPError(422, "bad-deadline", "deadline must be an integer number of seconds, 1 .. 7 days")
        if type(attempts) is not int or not 1 <= attempts <= 20:
            raise HTTPError(422, "bad-attempts", "max_attempts must be 1 .. 20")
        if not isinstance(doc["requests"], list) or not 1 <= len(doc["requests"]) <= MAX_SEGMENTS:
            raise HTTPError(400, "malformed", f"requests: 1..{MAX_SEGMENTS} signed job requests")
        requests = [SignedRequest.from_json(r, what="job request") for r in doc["requests"]]
        if any(r.public.key != signed.public.key for r in requests):
            raise HTTPError(403, "not-owner", "a job request is signed by another key than this request")
        reward = int(self.ledger.setting("reward") or 0)
        if replicas > 1 and any(not isinstance(r.request.get("amount"), int) or r.request["amount"] < replicas * reward
                                for r in requests):  # fmt: skip
            raise HTTPError(422, "deposit-too-small", f"{replicas} replicas are paid {reward} each: the deposit must "
                            f"be at least {replicas * reward}")  # fmt: skip
        files = check_files(doc["files"])
        job_bytes = canonical_json(doc["job"])
        if sha256_bytes(job_bytes) != files["job"]:
            raise HTTPError(422, "digest-mismatch", "files.job is not the digest of the job document")
        with tempfile.TemporaryDirectory(prefix="verimesh-submit-") as tmp:
            probe = job_from_bytes(job_bytes, Path(tmp), what="submitted job")
            if probe.mode == "generate" and (doc["segments"] is not None or shard_docs is not None or replicas != 1
                                             or transfer != "full"):  # fmt: skip
                raise HTTPError(422, "bad-mode", "a generate job runs whole, once, and ships its full bundle "
                                "(a record per token is small): not with segments, shards, replicas or "
                                "challenges")  # fmt: skip
            if (probe.mode == "zk") != zk:
                raise HTTPError(422, "files-mismatch", "a zk job's files name its circuit, and only a zk job's do")
            circuit_json = self._zk_circuit(files) if zk else None
            if job_files(probe, files["input"], circuit_json) != files:
                raise HTTPError(422, "files-mismatch", "files name other blobs than the job pins")
            ranges = None if doc["segments"] is None else check_ranges(doc["segments"], len(probe.steps))
            # The ledger posts what is settled: the job, or each of its segments or shards (docs/design.md §9).
            posted = [probe.job_id] if ranges is None else [v.job_id for v in views_of(probe, ranges)]
            if shard_docs is not None:
                missing = self.state.has_blobs([d["input"] for d in shard_docs])
                if missing:
                    raise HTTPError(422, "missing-blobs", f"upload these first: {missing[:5]}")
                posted = [self._shard_of(probe, shard_docs, k, Path(tmp)).job_id for k in range(len(shard_docs))]
            if [r.request.get("job_id") for r in requests] != posted:
                raise HTTPError(422, "job-mismatch", "the job requests must post " +
                                ("the job" if ranges is None else "each segment, in order"))  # fmt: skip
            missing = self.state.has_blobs([files["job"], files["model"], files["input"], *files["steps"],
                                            *files.get("circuit", ())])  # fmt: skip
            if missing:
                raise HTTPError(422, "missing-blobs", f"upload these first: {missing[:5]}")
            _refuse_strict_tolerance(probe)
            # What the nodes and the verifier will run: every step safe and as pinned, the input as pinned.
            job, _ = materialize(files, self._stored, Path(tmp), with_model=False)
            models = job.read_step_models()
            job.read_input()
            if job.mode == "generate":  # the decode layout it pins must be its model's graph
                check_generate_layout(job, models[0])
        existing = self.state.job(job.job_id)
        if existing is not None:
            if existing["owner"] != signed.node_id:
                raise HTTPError(409, "job-exists", "this job was submitted by another owner")
            if existing["spec"].get("shards") != shard_docs:
                raise HTTPError(409, "job-exists", "this job was submitted with another batch (or none)")
            return {"job_id": job.job_id, "state": existing["state"], "created": False}
        for ledger_request, job_id in zip(requests, posted, strict=True):
            try:
                register_job(self.ledger, ledger_request, writer=self.operator)
            except InvalidInputError as exc:
                if exc.code != "job-registered":
                    raise
                if self._ledger_job_owner(job_id) != signed.node_id:
                    raise HTTPError(409, "job-exists", "this job is posted in the ledger by another owner") from exc
        spec = {"files": files, "deadline": float(deadline), "max_attempts": attempts, "posted": posted,
                "segments": None if ranges is None else [list(r) for r in ranges], "device": device,
                "replicas": replicas, "min_level": min_level, "shards": shard_docs, "transfer": transfer}  # fmt: skip
        self.state.add_job(job.job_id, signed.node_id, spec, positions=len(posted), replicas=replicas)
        self._checkpoint_if_due()
        self._wake.set()
        return {"job_id": job.job_id, "state": "open", "created": True, "subtasks": len(posted), "replicas": replicas}

    def _zk_circuit(self, files: dict[str, Any]) -> bytes:
        """A zk submission's circuit.json, when this coordinator holds the SRS it pins (else 422)."""
        if self.srs_digest is None:
            raise HTTPError(422, "no-srs", "this coordinator checks no zk proofs: it was started without --srs")
        missing = self.state.has_blobs(files["circuit"][:1])
        if missing:
            raise HTTPError(422, "missing-blobs", f"upload these first: {missing}")
        body = self._stored(files["circuit"][0])
        doc = parse_json(body, what="circuit.json", max_bytes=MAX_CIRCUIT_JSON)
        pinned = (
            doc.get("srs", {}).get("digest") if isinstance(doc, dict) and isinstance(doc.get("srs"), dict) else None
        )
        if pinned != self.srs_digest:
            raise HTTPError(422, "wrong-srs", f"the circuit pins SRS {str(pinned)[:80]}, this coordinator holds "
                            f"{self.srs_digest}: build the circuit with the mesh's SRS")  # fmt: skip
        return body

    def _ledger_job_owner(self, job_id: str) -> str | None:
        for entry in self.ledger.entries(kinds=["job"]):
            event = entry.event
            if event.get("job_id") == job_id:
                return str(event.get("owner"))
        return None

    def _stored(self, digest: str) -> bytes:
        """A stored blob's bytes. Blobs are named by their SHA-256: those that match their name
        are kept in memory (``_blobs``), so the model steps every job of one model shares are read
        from the database once, not once per lease and per verification."""
        with self._blobs_lock:
            if digest in self._blobs:
                self._blobs.move_to_end(digest)
                return self._blobs[digest]
        data = self.state.blob(digest)
        if data is None:
            raise InvalidInputError(f"blob {digest[:19]}… is not stored")
        if len(data) <= BLOB_CACHE_ITEM and sha256_bytes(data) == digest:
            with self._blobs_lock:
                self._blobs[digest] = data
                self._blobs_size += len(data)
                while self._blobs_size > BLOB_CACHE_BYTES:
                    self._blobs_size -= len(self._blobs.popitem(last=False)[1])
        return data

    # -- nodes -----------------------------------------------------------------------------------

    def _register(self, request: Request, body: bytes) -> Any:
        signed = self._signed(request, body)
        doc = self._json_body(body)
        if not isinstance(doc, dict) or set(doc) != {"request", "device"} or doc["device"] not in DEVICES:
            raise HTTPError(400, "malformed", f"want {{request, device}} with device one of {DEVICES}")
        ledger_request = SignedRequest.from_json(doc["request"], what="registration")
        if ledger_request.public.key != signed.public.key:
            raise HTTPError(403, "not-owner", "the registration is signed by another key than this request")
        if signed.public.key == self.operator.public.key:
            raise HTTPError(403, "operator", "the coordinator's operator cannot be a node of its own mesh")
        created = False
        if self._registered_key(signed.node_id) is None and self.admission == "ledger":
            raise HTTPError(403, "not-admitted", "this mesh admits only nodes its operator registered in the ledger "
                            "(`verimesh ledger register`)")  # fmt: skip
        if self._registered_key(signed.node_id) is None:
            register_node(self.ledger, ledger_request, writer=self.operator)
            self._checkpoint_if_due()
            created = True
        self.state.join(signed.node_id, f"{signed.public.key.hex()}:{signed.public.proof_of_possession.hex()}",
                        str(doc["device"]))  # fmt: skip
        return {"node_id": signed.node_id, "registered": created}

    def _session(self, request: Request, body: bytes) -> Any:
        """Open a session (mesh.auth): a request signed with the node's key, carrying its ephemeral key."""
        signed = self._node(request, body, session=False)
        return self.sessions.open(signed.public, self._json_body(body))

    def _heartbeat(self, request: Request, body: bytes) -> Any:
        signed = self._node(request, body)
        return {"leases": self.state.heartbeat(signed.node_id)}

    def _lease(self, request: Request, body: bytes) -> Any:
        signed = self._node(request, body)
        stake, level = self._bonded(signed.node_id)
        if stake <= 0:  # its answers could be neither paid nor slashed
            raise HTTPError(403, "no-stake", "this node has no bonded stake that a slash could take: it gets no "
                            "tasks until it tops up (`verimesh ledger stake top-up`)")  # fmt: skip
        lease = self.state.lease(signed.node_id, deadline_default=self.deadline, level=level)
        if lease is None:
            return None
        doc = lease.to_json()
        if level == 0 and doc["transfer"] == "challenge" and lease.challenge is None:
            doc["transfer"] = "full"  # its audit checks every step: the full bundle is the smaller upload
        return doc

    def _bonded(self, node_id: str) -> tuple[int, int]:
        """The node's bonded stake and audit level, as of the ledger's current size (read again
        whenever the ledger grew: a slash or a withdrawal a moment ago counts). Stake only
        unbonding does not count: a node that is withdrawing everything takes no new task it
        could walk away from."""
        standing = self._standing_now(node_id)
        return standing.stake, standing.audit_level

    def _standing_now(self, node_id: str) -> Standing:
        """The node's standing as of the ledger's current size. When the ledger grew, the nodes
        whose entries it grew by are read again, together in one view (a standing is a function of
        the node's own entries; a governance entry, or BOND_REFRESH_S without a full read, reads
        every node asked about lately again)."""
        size = self.ledger.size()
        known_size, table = self._bonds
        if known_size == size and node_id in table:
            return table[node_id]
        full = known_size < 0 or time.monotonic() - self._bonds_read > BOND_REFRESH_S
        changed = None if full else self.ledger.changed_nodes(known_size, NODE_KINDS) if known_size != size else set()
        if changed is None:
            keep: dict[str, Standing] = {}
            read = [*[n for n in table if n != node_id][-(BOND_CACHE - 1) :], node_id]
            self._bonds_read = time.monotonic()
        else:
            keep = {n: s for n, s in table.items() if n not in changed}
            read = [n for n in table if n in changed] + ([] if node_id in keep else [node_id])
        fresh = standings_of(self.ledger, read) if read else {}
        merged = {**keep, **fresh}
        if len(merged) > BOND_CACHE:
            merged = dict(list(merged.items())[-BOND_CACHE:])
        self._bonds = (size, merged)
        return merged[node_id]

    def _file(self, request: Request, body: bytes) -> Any:
        signed = self._node(request, body)
        task_id, digest = request.path_params["task_id"], request.path_params["digest"]
        if not self.state.holds(signed.node_id, task_id):
            raise HTTPError(403, "not-your-lease", "you hold no live lease on this task")
        job_id = self.state.task_job(task_id)
        doc = self.state.job(job_id) if job_id else None
        files = doc["spec"]["files"] if doc else {}
        allowed = {files.get("job"), files.get("model"), files.get("input"), *files.get("steps", []),
                   *files.get("circuit", [])}  # fmt: skip
        if doc is not None and doc["spec"].get("shards"):  # a shard reads its own row
            position = next(t["position"] for t in doc["tasks"] if t["task_id"] == task_id)
            allowed.add(doc["spec"]["shards"][position]["input"])
        if doc is not None and doc["spec"].get("segments"):  # a segment reads its predecessors' bundles
            position = next(t["position"] for t in doc["tasks"] if t["task_id"] == task_id)
            allowed |= {d for k, d in self.state.done_bundles(str(job_id)).items() if k < position}
        if digest not in allowed:
            raise HTTPError(403, "not-in-task", "this file is not one of the task's")
        return Response(self._stored(digest), media_type="application/octet-stream")

    def _result(self, request: Request, body: bytes) -> Any:
        signed = self._node(request, body)
        task_id, lease_id = request.path_params["task_id"], request.path_params["lease_id"]
        if not body:
            raise HTTPError(400, "malformed", "the body is the bundle's bytes")
        self.state.check_lease(signed.node_id, task_id, lease_id)  # before anything is unpacked or stored
        held = self.state.lease_of(signed.node_id, task_id)
        if held is not None and held.challenge is not None:  # another bundle now would fish for another sample
            raise HTTPError(409, "challenged", "this lease is waiting for the answer to its challenge")
        body = self._unpacked(body)
        if not body:
            raise HTTPError(400, "malformed", "the body is the bundle's bytes")
        digest = self.state.submit(signed.node_id, task_id, lease_id, body)
        self._wake.set()
        return JSONResponse({"task_id": task_id, "state": "verifying", "bundle": digest}, status_code=202)

    def _unpacked(self, body: bytes) -> bytes:
        """An upload as the node made it: packed ones (core/packing.py) unpacked within the upload limit."""
        if not is_packed(body):
            return body
        try:
            return unpack(body, limit=self.max_upload)
        except InvalidInputError as exc:
            raise HTTPError(413 if exc.code == "too-large" else 400, exc.code, exc.message) from exc

    # -- challenges: commit, then open only the sampled steps (docs/design.md §10) -----------------

    def _challenged_job(self, task_id: str) -> Job:
        """The whole job a challenge-mode task runs (409 for a task that takes a full bundle)."""
        job_id = self.state.task_job(task_id)
        doc = self.state.job(job_id) if job_id is not None else None
        if doc is None:
            raise HTTPError(404, "not-found", "no such task")
        if doc["spec"].get("transfer", "full") != "challenge":
            raise HTTPError(409, "full-transfer", "this task takes a full bundle: POST it to /result")
        digest = doc["spec"]["files"]["job"]
        job = self._jobs.get(digest)
        if job is None:
            with tempfile.TemporaryDirectory(prefix="verimesh-job-") as tmp:
                job = job_from_bytes(self._stored(digest), Path(tmp), what="job")
            if len(self._jobs) > 1000:
                self._jobs.clear()
            self._jobs[digest] = job
        return job

    def _commit(self, request: Request, body: bytes) -> Any:
        """The lease holder's commitment: its signed envelope, trace.json and outputs, each proven
        under the signed root. The sample is drawn now, from the operator's randomness over the
        commitment (so after it), and the node is told which members to open, and by when."""
        signed = self._node(request, body)
        task_id, lease_id = request.path_params["task_id"], request.path_params["lease_id"]
        self.state.check_lease(signed.node_id, task_id, lease_id)
        job = self._challenged_job(task_id)
        sent = len(body)
        body = self._unpacked(body)  # the seed is drawn over the commitment itself, however it travelled
        try:
            carried = opened_names(body, limits=DEFAULT_LIMITS)
        except InvalidInputError as exc:
            raise HTTPError(422, "bad-commitment", f"the commitment is not an opened bundle: {exc.message}") from exc
        if sorted(carried) != sorted(commitment_members(job)):
            raise HTTPError(422, "bad-commitment", "a commitment opens trace.json and the outputs, nothing else: "
                            + ", ".join(commitment_members(job)))  # fmt: skip
        digest = sha256_bytes(body)
        seed = self.seed_for(task_id, digest)
        samples = self._standing_now(signed.node_id).samples_for(job.audit_units, job.policy.samples)
        steps = sample_steps(job, samples, seeded_rng(seed))
        drawn = {"commitment": digest, "seed": seed, "samples": samples, "steps": list(steps),
                 "members": list(challenged_members(job, steps)), "bytes": {"commitment": sent}}  # fmt: skip
        challenge = self.state.challenge(signed.node_id, task_id, lease_id, drawn, self.answer_within, body)
        return {"task_id": task_id, "challenge": challenge_view(challenge)}

    def _open(self, request: Request, body: bytes) -> Any:
        """The answer to a challenge: exactly the challenged members, each proven under the root of
        the committed envelope, before the challenge's deadline (after it the lease is lost)."""
        signed = self._node(request, body)
        task_id, lease_id = request.path_params["task_id"], request.path_params["lease_id"]
        self.state.check_lease(signed.node_id, task_id, lease_id)
        lease = self.state.lease_of(signed.node_id, task_id)
        challenge = lease.challenge if lease is not None else None
        if challenge is None:
            raise HTTPError(409, "no-challenge", "this lease has no challenge to answer: commit first")
        sent = len(body)
        body = self._unpacked(body)
        try:
            carried = opened_names(body, limits=DEFAULT_LIMITS)
            if sorted(carried) != sorted(challenge["members"]):
                raise InvalidInputError("it must open exactly the challenged members: " +
                                        ", ".join(challenge["members"][:20]))  # fmt: skip
            merged = merge_openings(self._stored(challenge["commitment"]), body, limits=DEFAULT_LIMITS)
        except InvalidInputError as exc:
            raise HTTPError(422, "bad-opening", f"the answer is not the challenge's opening: {exc.message}") from exc
        digest = self.state.submit(signed.node_id, task_id, lease_id, merged, answer_bytes=sent)
        self._wake.set()
        return JSONResponse({"task_id": task_id, "state": "verifying", "bundle": digest}, status_code=202)

    def _release(self, request: Request, body: bytes) -> Any:
        signed = self._node(request, body)
        doc = self._json_body(body)
        reason = doc.get("reason") if isinstance(doc, dict) else None
        if not isinstance(reason, str):
            raise HTTPError(400, "malformed", 'want {"reason": "..."}')
        self.state.release(signed.node_id, request.path_params["task_id"], request.path_params["lease_id"], reason)
        self._wake.set()
        return {"released": True}

    # -- the verifier ----------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            # Time the coordinator was down is no node's: every lease holder gets a fresh heartbeat
            # window and every challenge its full answer time, counted from now.
            self.state.resume(answer_within=self.answer_within)
            self._stop.clear()
            self._thread = threading.Thread(target=self._verifier_loop, name="verimesh-verifier", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if self._sandbox is not None:
            self._sandbox.close()

    def _verifier_loop(self) -> None:
        while not self._stop.is_set():
            try:
                if time.monotonic() - self._collected > 60:  # uploads no job took, past their time
                    self._collected = time.monotonic()
                    self.state.collect_blobs(self.blob_ttl)
                done = self.verify_pending()
            except Exception:  # the loop must outlive one bad pass; the task stays verifying
                log.exception("verifier pass failed")
                done = 0
            if not done:
                self._wake.wait(timeout=0.5)
                self._wake.clear()

    def seed_for(self, task_id: str, bundle: str) -> int:
        """The verifier's randomness for one result: the operator's deterministic signature."""
        signature = self.operator.sign(_SEED_TAG + task_id.encode() + b"\x00" + bundle.encode())
        return int.from_bytes(hashlib.sha256(signature).digest()[:8], "big") >> 11

    def verify_pending(self) -> int:
        """Verify and settle every stored result (in arrival order) in the verifier's child
        process, each within ``verify_timeout``; how many were decided.

        A verification that runs past the limit is the job's own doing (its model costs more
        than any verifier will spend): the child is killed, the job fails and no node is blamed.
        One that fails otherwise is an error for that answer: the task goes to another node. No
        item is ever retried in a loop that would block the ones behind it."""
        count = 0
        items = list(self.state.verifying())
        # With a fleet, results go to it a few at a time (two per actor): settlement of the first
        # ones never waits on every result pending.
        chunk = max(1, 2 * len(getattr(self.fleet, "actors", ()))) if self.fleet is not None else len(items) or 1
        for start in range(0, len(items), chunk):
            batch = items[start : start + chunk]
            with tempfile.TemporaryDirectory(prefix="verimesh-prefetch-") as tmp:
                ahead = self._prefetch(batch, Path(tmp)) if self.fleet is not None else {}
                for item in batch:
                    if self._stop.is_set():
                        return count
                    count += self._settle_item(item, ahead.get(item.task_id))
        return count

    def _settle_item(self, item: Verifying, prefetched: Prefetched | None) -> bool:
        """One stored result: verified (or its fleet verdict taken) and settled, in the child;
        False when it is left for the next pass."""
        if self._sandbox is None:
            self._verify_item((item, prefetched))
        else:
            status, detail = self._sandbox.call((item, prefetched), timeout=self._time_limit(item))
            if status == "timeout" and self._settled_already(item) and item.task_id not in self._retried:
                self._retried.add(item.task_id)  # the ledger took its verdict just before the kill: once more
                return False
            if status == "timeout":
                why = f"verification ran past {self.verify_timeout:g} s: the job's model is too costly to verify"
                self.state.decide(item.task_id, accepted=False, outcome=f"error: {why}", fail_job=why,
                                  verdict={"verdict": "error", "reason": why, "node_id": item.node_id})  # fmt: skip
            elif status != "ok":
                why = f"the verifier failed ({detail or 'its process died'})"
                self.state.decide(item.task_id, accepted=False, outcome=f"error: {why}",
                                  verdict={"verdict": "error", "reason": why, "node_id": item.node_id})  # fmt: skip
        return True

    def _prefetch(self, items: list[Verifying], folder: Path) -> dict[str, Prefetched]:
        """Verify the whole-job results among ``items`` on the fleet, together, each with the lease
        holder's registered key, the samples in force for it now and the result's seed. Settlement
        takes a verdict only if these still hold when its turn comes (an earlier settlement may
        have moved the node's audit level); a fleet failure (an actor lost, a time limit) decides
        nothing: the result is verified in the child as before. Segments and replicas are
        verified in the child."""
        from verimesh.fleet.verifiers import VerifyTask

        assert self.fleet is not None
        tasks, keys = [], {}
        for number, item in enumerate(items):
            try:
                doc = self.state.job(item.job_id)
                spec = doc["spec"] if doc is not None else None
                if spec is None or spec.get("segments") or spec.get("shards") or spec.get("replicas", 1) > 1:
                    continue
                if item.challenge:  # verified here, on the sample it was challenged with
                    continue
                if spec["files"].get("circuit"):  # a zk proof: checked here, with the coordinator's SRS
                    continue
                place = folder / str(number)
                job, _ = materialize(spec["files"], self._stored, place, with_model=False)
                bundle = place / "result.vmb"
                bundle.write_bytes(self._stored(item.bundle))
                # The lease holder's key and audit level, from the ledger: the bundle itself is
                # parsed only by the fleet and the child (a bundle its holder did not sign fails
                # there, and settlement's own signer then does not fit this verdict).
                public = self._registered_key(item.node_id)
                if public is None:
                    continue
                samples = node_standing(self.ledger, item.node_id).samples_for(job.audit_units, job.policy.samples)
                seed = self.seed_for(item.task_id, item.bundle)
                keys[item.task_id] = (sha256_file(bundle), job.job_id, public.key.hex(), samples, seed)
            except Exception:  # noqa: BLE001 (anything wrong with one result: the child verifies and decides it)
                continue
            tasks.append(VerifyTask(item.task_id, bundle, job.base_dir / JOB_NAME, public, samples, seed, job.job_id))
        ahead: dict[str, Prefetched] = {}
        try:
            for outcome in self.fleet.run(tasks, timeout=self.verify_timeout):
                digest, job_id, node_key, samples, seed = keys[outcome.label]
                ahead[outcome.label] = Prefetched(digest, job_id, node_key, samples, seed, outcome.verdict,
                                                  outcome.verifier)  # fmt: skip
        except Exception:  # a fleet that fails decides nothing: what it did not answer, the child verifies
            log.exception("the verifier fleet failed a pass; its results are verified here")
        return ahead

    def _time_limit(self, item: Verifying) -> float:
        """--verify-timeout for one answer; the answer that completes a replicated job's set may
        also settle every replica and, on a disagreement, verify each in full and run the model
        once more: it gets the limit once per replica, and once more."""
        doc = self.state.job(item.job_id)
        if doc is not None and doc["spec"].get("shards"):  # the last row checks and settles every row
            return self.verify_timeout * (2 * len(doc["spec"]["shards"]) + 1)
        replicas = int(doc["spec"].get("replicas", 1)) if doc is not None else 1
        return self.verify_timeout * (1 if replicas <= 1 else replicas + 2)

    def _settled_already(self, item: Verifying) -> bool:
        """The ledger holds a verdict by this task's node for its job (or one of its segments)."""
        doc = self.state.job(item.job_id)
        ids = {item.job_id, *(doc["spec"]["posted"] if doc is not None else ())}
        return any(e.event.get("job_id") in ids for e in self.ledger.entries(node_id=item.node_id, kinds=["verdict"]))

    def _verify_item(self, message: tuple[Verifying, Prefetched | None]) -> str:
        item, prefetched = message
        self._verify_one(item, prefetched)
        self._checkpoint_if_due()
        return "decided"

    def _holder_signed(self, bundle: Path, job: Job, node_id: str) -> PublicKey:
        """The lease holder's registered key, when the bundle's statement is its own and signed by
        it (a bundle of another node's is nobody's answer to this lease: an error, no one blamed)."""
        holder = self._registered_key(node_id)
        try:
            envelope = read_bundle(bundle, version=job.version).envelope
        except InvalidInputError as exc:
            raise InvalidInputError(exc.message.replace(f"bundle {bundle} ", "it ").replace(str(bundle), "it")) from exc
        named = envelope.statement()["predicate"].get("node_id")
        if holder is None or named != node_id or not envelope.signed_by(holder):
            raise InvalidInputError(f"the bundle is not a statement of the lease holder {node_id} signed by it")
        return holder

    def _checkpoint_if_due(self) -> None:
        """Sign a checkpoint every CHECKPOINT_EVERY entries, or every 1/CHECKPOINT_SHARE of the log
        when that is more: a process that starts walks the log from the last checkpoint on (the
        coordinator's own processes keep what they walked), and a checkpoint reads the whole store
        first (to sign nothing it has not checked), so at a fixed interval its cost per entry
        grew with the log."""
        size = self.ledger.size()
        latest = self.ledger.latest_checkpoint()  # the verifier's child process checkpoints too
        if size - (latest.tree_size if latest is not None else 0) >= max(CHECKPOINT_EVERY, size // CHECKPOINT_SHARE):
            self.ledger.checkpoint(self.operator)

    def _verify_one(self, item: Verifying, prefetched: Prefetched | None = None) -> None:
        job_doc = self.state.job(item.job_id)
        assert job_doc is not None
        spec = job_doc["spec"]
        with tempfile.TemporaryDirectory(prefix="verimesh-verify-") as tmp:
            folder = Path(tmp)
            parent, _ = materialize(spec["files"], self._stored, folder, with_model=False)
            ranges, shards = spec.get("segments"), spec.get("shards")
            if shards:
                job = self._shard_of(parent, shards, item.position, folder)
            else:
                job = parent if not ranges else segment_view(parent, check_ranges(ranges, len(parent.steps)),
                                                             item.position)  # fmt: skip
            bundle = folder / "result.vmb"
            bundle.write_bytes(self._stored(item.bundle))
            try:
                public = self._holder_signed(bundle, job, item.node_id)
            except InvalidInputError as exc:  # garbage, or another node's bundle: the uploader's doing
                self._excluded(item, f"its upload is not a bundle of its own: {exc.message}",
                               {"verdict": "error", "reason": exc.message, "node_id": item.node_id})  # fmt: skip
                return
            try:
                # A challenged answer is verified with the sample it was challenged with (drawn
                # from the commitment); a full bundle with one drawn from the bundle itself.
                seed = int(item.challenge["seed"]) if item.challenge else self.seed_for(item.task_id, item.bundle)
                if shards:
                    self._verify_shard(item, parent, job, bundle, seed, folder, shards)
                elif ranges:
                    self._verify_segment(item, parent, job, bundle, public, seed, folder, ranges, spec["posted"])
                elif spec.get("replicas", 1) > 1:
                    self._verify_replica(item, job, bundle, public, seed, folder)
                else:
                    self._verify_whole(item, job, bundle, public, seed, folder, prefetched)
            except InvalidInputError as exc:
                verdict_doc: dict[str, Any] = {"verdict": "error", "reason": exc.message, "node_id": item.node_id,
                                               "decided_by": "spot"}  # fmt: skip
                # A node with nothing slashable left cannot answer for its result: the task goes
                # to another node, counted against no one (the lease gate keeps it from more).
                outcome = f"lost: {exc.message}" if exc.code == "no-stake" else f"error: {exc.message}"
                self.state.decide(item.task_id, accepted=False, verdict=verdict_doc, outcome=outcome)

    def _verify_whole(self, item: Verifying, job: Job, bundle: Path, public: PublicKey, seed: int,
                      folder: Path, prefetched: Prefetched | None = None) -> None:  # fmt: skip
        outputs = folder / "outputs.npz"
        started = time.perf_counter()
        samples = int(item.challenge["samples"]) if item.challenge else None
        settled = verify_and_settle(bundle, job=job, ledger=self.ledger, writer=self.operator, seed=seed,
                                    samples=samples, outputs_out=outputs, prefetched=prefetched,
                                    srs=self.srs)  # fmt: skip
        verdict = settled.verdict
        verdict_doc = {**verdict.to_json(), "decided_by": "spot", "samples_in_force": settled.samples_in_force,
                       "verified_by": settled.verified_by,
                       "settle_s": round(time.perf_counter() - started, 6),
                       "ledger_entries": [list(e) for e in settled.appended]}  # fmt: skip
        if job.mode == "zk":
            verdict_doc["decided_by"] = "zk"
        if verdict.status == "accept":
            # A zk verdict re-runs no step, and its proofs cover every one: the receipt says so.
            proven = replace(verdict, sampled_steps=tuple(range(len(job.steps)))) if job.mode == "zk" else verdict
            chain = whole_verdict(proven, bundle=bundle, job=job, public=public)
            finish = self._finish(chain, outputs.read_bytes())
            how = "zk proof" if job.mode == "zk" else "spot check"
            self.state.decide(item.task_id, accepted=True, verdict=verdict_doc, outcome=f"accepted ({how})",
                              finish=finish)  # fmt: skip
            return
        if job.mode == "zk" and verdict.status == "reject" and _circuit_dependent(verdict):
            # The proof is checked against the owner's circuit (its circuit.json's scales, shapes,
            # visibility): a proof that does not hold may be the circuit's doing as well as the
            # node's, and proves neither. The task goes to another node, counted as a judged
            # attempt (a job whose circuit no node can satisfy fails), and no node is blamed.
            why = f"the zk proof does not hold ({verdict.reason[:200]}): the node's or the circuit's doing, unproven"
            self.state.decide(item.task_id, accepted=False, verdict=verdict_doc, outcome=f"error: {why}")
            return
        self._rejected(item, verdict.reason, verdict_doc, {job.job_id})

    def _finish(self, chain: ChainVerdict, outputs: bytes, decided_by: str | None = None,
                replicas: list[dict[str, Any]] | None = None) -> tuple[bytes, bytes]:  # fmt: skip
        """The job's outputs and its signed receipt, for ``decide`` to keep with the job's end."""
        receipt = sign_receipt(receipt_body(chain, decided_by=decided_by, replicas=replicas), self.operator)
        return outputs, canonical_json(receipt) + b"\n"

    # -- replicas and the quorum -----------------------------------------------------------------

    def _verify_replica(self, item: Verifying, job: Job, bundle: Path, public: PublicKey, seed: int,
                        folder: Path) -> None:  # fmt: skip
        """One of R replicas of a whole job: spot-checked alone first, at its node's audit level
        (agreeing never stands in for it: colluding nodes must not pass by agreeing). A wrong
        answer is slashed and its replica redone by another node; a passing one waits for the
        others, and the last to pass calls the quorum (``_quorum``)."""
        started = time.perf_counter()
        verdict = verify(bundle, job=job, node_key=public, samples=self._spot_samples(item.node_id, job), seed=seed)
        verdict_doc = {**verdict.to_json(), "decided_by": "spot", "replica": item.replica,
                       "settle_s": round(time.perf_counter() - started, 6)}  # fmt: skip
        if verdict.status != "accept":
            if verdict.status == "reject":
                self._slash(verdict.evidence)
            self._rejected(item, verdict.reason, verdict_doc, {job.job_id})
            return
        doc = self.state.job(item.job_id)
        assert doc is not None
        others = [t for t in doc["tasks"] if t["task_id"] != item.task_id]
        waiting = Decision(item.task_id, "done", "accepted (spot check); waiting for the other replicas", verdict_doc)
        gone = [Decision(t["task_id"], "redo", f"redone: {why}", t["verdict"] or {})
                for t in others if t["state"] == "done" and (why := self._cannot_settle(t["node_id"]))]  # fmt: skip
        if gone or any(t["state"] != "done" for t in others):
            self.state.decide_replicas(item.job_id, [waiting, *gone], None)
            return
        answers = sorted([*((t["replica"], t["task_id"], t["node_id"], t["bundle"]) for t in others),
                          (item.replica, item.task_id, item.node_id, item.bundle)])  # fmt: skip
        self._quorum(item.job_id, job, answers, folder)

    def _spot_samples(self, node_id: str, job: Job) -> int:
        """Steps a replica's spot check re-runs beside the last: the node's audit policy."""
        return node_standing(self.ledger, node_id).samples_for(job.audit_units, job.policy.samples)

    def _cannot_settle(self, node_id: str) -> str | None:
        """Why a node that passed its spot check can no longer be settled with (excluded since, or
        nothing slashable left): its replica is redone, no one blamed."""
        node = self.state.node(node_id)
        if node is not None and node["banned"]:
            return f"its node {node_id} was excluded"
        if node_standing(self.ledger, node_id).slashable <= 0:
            return f"its node {node_id} has nothing slashable left"
        return None

    def _quorum(self, job_id: str, job: Job, answers: list[tuple[int, str, str, str]], folder: Path) -> None:
        """Every replica passed its spot check. Their outputs agree (within twice the job's
        tolerance: two honest runs each within it of the truth): each is settled at its node's
        policy (the same seed as its spot check), and, all accepted, the quorum decides. They
        disagree, or a settlement rejects one: the referee verifies every answer in full, slashes
        and excludes the failing ones, and the first passing answer is the job's. None passes:
        every replica is redone. One mesh transaction records it all; the ledger's writes repeat
        idempotently when a crash comes before it (the same seeds; a second verdict for a claim
        writes nothing, a second reject slashes once)."""
        paths: dict[int, Path] = {}
        for replica, _task, _node, digest in answers:
            paths[replica] = folder / f"replica-{replica}.vmb"
            paths[replica].write_bytes(self._stored(digest))
        agree = _outputs_agree([_bundle_outputs(paths[r], job) for r, *_ in answers], job)
        results: dict[int, tuple[str, Any]] = {}  # replica -> ("accept" | "reject" | "unsettled", detail)
        for pass_ in ("quorum", "referee") if agree else ("referee",):
            for replica, task_id, node_id, digest in answers:
                if results.get(replica, ("",))[0] in ("reject", "unsettled"):
                    continue
                out = folder / f"outputs-{replica}.npz"
                try:
                    settled = verify_and_settle(paths[replica], job=job, ledger=self.ledger, writer=self.operator,
                                                seed=self.seed_for(task_id, digest), outputs_out=out,
                                                samples=None if pass_ == "quorum" else "all")  # fmt: skip
                except InvalidInputError as exc:
                    slashed = self._slashed_for(node_id, {job.job_id})  # by this pass, before a crash
                    results[replica] = ("reject", exc.message) if slashed else ("unsettled", exc.message)
                    continue
                results[replica] = (settled.verdict.status if settled.verdict.status == "accept" else "reject",
                                    settled)  # fmt: skip
            if all(status == "accept" for status, _ in results.values()):
                break
        decided_by = "quorum" if agree and all(status == "accept" for status, _ in results.values()) else "referee"
        distance: dict[int, float] = {}
        if decided_by == "referee":
            distance = _distances_to_own_run(job, {r: paths[r] for r, (status, _) in results.items()
                                                   if status == "accept"})  # fmt: skip
        self._record_quorum(job_id, job, answers, paths, results, decided_by, folder, distance)

    def _record_quorum(self, job_id: str, job: Job, answers: list[tuple[int, str, str, str]],
                       paths: dict[int, Path], results: dict[int, tuple[str, Any]], decided_by: str,
                       folder: Path, distance: dict[int, float]) -> None:  # fmt: skip
        """The decision, recorded: the job's answer is the quorum's lowest replica, or the
        referee's passing answer closest to the referee's own run of the model (an answer that
        passes every step's check may still have drifted inside each step's tolerance: the honest
        one is the one nearest the truth, never whichever replica came first)."""
        accepted = [a for a in answers if results[a[0]][0] == "accept"]
        accepted.sort(key=lambda a: (distance.get(a[0], 0.0), a[0]))
        decisions: list[Decision] = []
        replicas = []
        for replica, task_id, node_id, _digest in answers:
            status, detail = results[replica]
            statement = read_bundle(paths[replica], version=job.version).envelope.statement_digest()
            public = self._registered_key(node_id)
            assert public is not None
            replicas.append({"replica": replica, "node_id": node_id, "node_key": public.to_json(),
                             "statement": statement, "verdict": status})  # fmt: skip
            if status == "accept":
                verdict_doc = {**detail.verdict.to_json(), "decided_by": decided_by, "replica": replica,
                               "samples_in_force": detail.samples_in_force,
                               "ledger_entries": [list(e) for e in detail.appended]}  # fmt: skip
                if replica in distance:
                    verdict_doc["distance_to_referee"] = distance[replica]
                chosen = " (its outputs are the job's)" if replica == accepted[0][0] else ""
                decisions.append(Decision(task_id, "done", f"accepted by the {decided_by}{chosen}", verdict_doc))
                continue
            reason = detail if isinstance(detail, str) else detail.verdict.reason
            verdict_doc = {"verdict": "reject" if status == "reject" else "error", "reason": reason,
                           "node_id": node_id, "decided_by": decided_by, "replica": replica}  # fmt: skip
            action = "rejected" if accepted else "redo"
            if status == "unsettled":  # its node can no longer answer for it: no one blamed
                decisions.append(Decision(task_id, action, f"not settled: {reason}", verdict_doc))
            elif self._slashed_for(node_id, {job.job_id}):
                decisions.append(Decision(task_id, action, f"rejected by the referee and slashed: {reason}"[:300],
                                          verdict_doc, ban=f"slashed for job {job_id[:19]}…: {reason}"))  # fmt: skip
            else:
                decisions.append(Decision(task_id, action, f"excluded: refused by the referee: {reason}"[:300],
                                          verdict_doc, ban=f"excluded for job {job_id[:19]}…: {reason}"))  # fmt: skip
        finish = None
        if accepted:
            replica, _task, node_id, _digest = accepted[0]
            public = self._registered_key(node_id)
            assert public is not None
            chain = whole_verdict(results[replica][1].verdict, bundle=paths[replica], job=job, public=public)
            outputs = (folder / f"outputs-{replica}.npz").read_bytes()
            finish = self._finish(chain, outputs, decided_by, replicas)
        self.state.decide_replicas(job_id, decisions, finish)
        self._standings = (0.0, {})

    def _slashed_for(self, node_id: str, job_ids: set[str]) -> bool:
        """The ledger holds a slash of the node for one of these jobs (written now, or before a
        crash that came between the ledger's transaction and the mesh's)."""
        return any(e.event.get("job_id") in job_ids for e in self.ledger.entries(node_id=node_id, kinds=["slash"]))

    def _rejected(self, item: Verifying, reason: str, verdict_doc: dict[str, Any], job_ids: set[str]) -> None:
        """A result that is not accepted is its node's own doing (an honest node's answer to its own
        lease is sealed, signed by it and within the verifier's limits): the node is excluded.
        Slashed, the answer counts as a judged attempt of the job; unslashed (no evidence its
        signature proves: a broken seal, a replay), it does not: a key that uploads garbage is
        excluded without using up the owner's attempts."""
        if not self._slashed_for(item.node_id, job_ids):
            self._excluded(item, f"its answer was refused with nothing to slash: {reason}", verdict_doc)
            return
        ban = f"slashed for job {item.job_id[:19]}…: {reason}"
        self.state.decide(item.task_id, accepted=False, verdict=verdict_doc,
                          outcome=f"rejected and slashed: {reason}"[:300], ban=ban)  # fmt: skip
        self._standings = (0.0, {})

    def _excluded(self, item: Verifying, why: str, verdict_doc: dict[str, Any]) -> None:
        """The lease holder answered with something no honest node uploads: it is excluded from
        the mesh and the task goes to another node, not counted against the job's attempts."""
        self.state.decide(item.task_id, accepted=False, verdict=verdict_doc, outcome=f"excluded: {why}"[:300],
                          ban=f"excluded for job {item.job_id[:19]}…: {why}")  # fmt: skip

    def _slash(self, evidence: str | None) -> None:
        """Slash with a reject's evidence (re-checked by the settlement; once per claim)."""
        if evidence is None:
            return
        try:
            slash_with_evidence(self.ledger, Path(evidence), writer=self.operator)
        except (InvalidInputError, VerificationFailedError) as exc:
            log.info("no slash: %s", exc.message)

    def _verify_segment(self, item: Verifying, parent: Job, view: Job, bundle: Path, public: PublicKey, seed: int,
                        folder: Path, ranges: list[list[int]], posted: list[str]) -> None:  # fmt: skip
        """One segment, on its own (its links are checked with the chain); after the last one, the
        whole chain is verified again with a fresh seed and settled (``settle_chain``)."""
        started = time.perf_counter()
        verdict = verify(bundle, job=view, node_key=public, seed=seed)
        verdict_doc = {**verdict.to_json(), "decided_by": "spot", "settle_s": round(time.perf_counter() - started, 6)}
        if verdict.status != "accept":
            if verdict.status == "reject":
                self._slash(verdict.evidence)
            self._rejected(item, verdict.reason, verdict_doc, {view.job_id})
            return
        if item.position < len(ranges) - 1:
            self.state.decide(item.task_id, accepted=True, verdict=verdict_doc, outcome="accepted (spot check)")
            return
        # The last segment: the chain, verified as one job and settled in one transaction, with
        # every segment's node still able to answer for its part.
        gone = self._unsettleable(item.job_id, item.position + 1)  # this segment's node too
        if gone is not None:
            position, why = gone
            self.state.redo_from(item.job_id, position, f"redone: {why}", verdict_doc)
            return
        done = self.state.done_bundles(item.job_id)
        paths = []
        for position, digest in sorted({**done, item.position: item.bundle}.items()):
            path = folder / f"seg-{position}.vmb"
            path.write_bytes(self._stored(digest))
            paths.append(path)
        chain_seed = self.seed_for(item.job_id, "".join(sorted(done.values())) + item.bundle)
        try:
            settled = settle_chain(paths, job=parent, ledger=self.ledger, writer=self.operator, seed=chain_seed)
        except InvalidInputError as exc:  # the ledger refuses the chain: never the last node's fault
            self.state.decide(item.task_id, accepted=False, verdict=verdict_doc, outcome=f"error: {exc.message}",
                              fail_job=f"the chain could not be settled: {exc.message}")  # fmt: skip
            return
        chain = settled.verdict
        chain_doc = {**verdict_doc, "chain": chain.to_json(), "ledger_entries": [list(e) for e in settled.appended]}
        if chain.status == "accept":
            out = folder / "outputs.npz"
            write_tensor_file(out, settled.values)
            finish = self._finish(chain, out.read_bytes())
            self.state.decide(item.task_id, accepted=True, verdict=chain_doc,
                              outcome="accepted (spot check, then the chain)", finish=finish)  # fmt: skip
            return
        failed = next((s.index for s in chain.segments if s.verdict.status != "accept"), None)
        link = next((c.name for c in chain.checks if not c.ok and c.name.startswith("link-")), None)
        if link is not None:
            failed = int(link.rsplit("-", 1)[1])
        failed = item.position if failed is None else failed
        culprit = next((s.public.node_id for s in chain.segments if s.index == failed), item.node_id)
        slashed = self._slashed_for(culprit, set(posted))
        ban = (culprit, f"slashed for job {item.job_id[:19]}…: {chain.reason}") if slashed else None
        outcome = f"rejected with the chain{' and slashed' if slashed else ''}: {chain.reason}"[:300]
        self.state.redo_from(item.job_id, failed, outcome, chain_doc, ban=ban)  # one transaction, the last task with it
        if slashed:
            self._standings = (0.0, {})

    def _shard_of(self, parent: Job, shards: list[dict[str, Any]], index: int, folder: Path) -> Job:
        """Shard ``index``: the parent job on that row, its input written beside the job files (the
        row's tensors checked against the model's inputs and against the ones the shard pins)."""
        from verimesh.core.tensors import load_input_file
        from verimesh.jobs.segments import check_batchable, shard_view

        check_batchable(parent)
        doc = shards[index]
        refs = tuple(TensorRef.from_json(t, what=f"shard {index} input tensor") for t in doc["tensors"])
        name = f"shard-{index}.npz"
        path = parent.base_dir / name
        path.write_bytes(self._stored(doc["input"]))
        values = load_input_file(path, parent.model_inputs)
        if [r.name for r in refs] != [s.name for s in parent.model_inputs] or any(
            TensorRef.of(r.name, values[r.name]) != r or values[r.name].shape[:1] != (1,) for r in refs
        ):
            raise InvalidInputError(f"shard {index}'s input blob does not hold the one row its tensors pin")
        return shard_view(parent, len(shards), index, refs, name)

    def _verify_shard(self, item: Verifying, parent: Job, view: Job, bundle: Path, seed: int, folder: Path,
                      shards: list[dict[str, Any]]) -> None:  # fmt: skip
        """One row, spot-checked on arrival with the node's audit level (a reject slashes with its
        evidence and the row goes to another node); nothing is paid yet. After the last row, the
        batch is verified as one (``verify_shards``, a seed derived from every row's bundle) and
        each row settled with that seed's share of it: paid once per row, or a row that fails
        then slashed through its own evidence and redone alone (rows settled before it stay
        settled: a claim is paid once)."""
        from verimesh.core.tensors import load_input_file
        from verimesh.spot.spotcheck import derived_seed
        from verimesh.subtasks.chain import verify_shards

        started = time.perf_counter()
        public, samples = registered_signer(bundle, job=view, ledger=self.ledger)
        verdict = verify(bundle, job=view, node_key=public, samples=samples, seed=seed)
        verdict_doc = {**verdict.to_json(), "decided_by": "spot", "samples_in_force": samples,
                       "settle_s": round(time.perf_counter() - started, 6)}  # fmt: skip
        if verdict.status != "accept":
            if verdict.status == "reject":
                self._slash(verdict.evidence)
            self._rejected(item, verdict.reason, verdict_doc, {view.job_id})
            return
        done = {**self.state.done_bundles(item.job_id), item.position: item.bundle}
        if len(done) < len(shards):
            self.state.decide(item.task_id, accepted=True, verdict=verdict_doc, outcome="accepted (spot check)")
            return
        nodes = {t["position"]: t["node_id"] for t in (self.state.job(item.job_id) or {"tasks": []})["tasks"]}
        paths, keys, views, rows = [], [], [], []
        for k in range(len(shards)):
            path = folder / f"shard-{k}.vmb"
            path.write_bytes(self._stored(done[k]))
            paths.append(path)
            key = self._registered_key(str(nodes.get(k)))
            if key is None:
                raise InvalidInputError(f"shard {k}'s node is not registered")
            keys.append(key)
            views.append(view if k == item.position else self._shard_of(parent, shards, k, folder))
            rows.append(load_input_file(views[k].resolve(views[k].input_path), parent.model_inputs))
        batch = {s.name: np.concatenate([r[s.name] for r in rows]) for s in parent.model_inputs}
        batch_seed = self.seed_for(item.job_id, "".join(done[k] for k in range(len(shards))))
        chain, values = verify_shards(paths, job=parent, node_keys=keys, batch=batch, seed=batch_seed)
        chain_doc = {**verdict_doc, "chain": chain.to_json()}
        failed = next((s.index for s in chain.segments if s.verdict.status != "accept"), None)
        if chain.status != "accept" and failed is None:  # about no row: the batch itself (never a node's doing)
            self.state.decide(item.task_id, accepted=False, verdict=chain_doc, outcome=f"error: {chain.reason}",
                              fail_job=f"the batch could not be verified as one: {chain.reason}"[:300])  # fmt: skip
            return
        entries: list[list[Any]] = []
        for k in range(len(shards)):  # in row order, up to the first that fails: each paid once
            try:
                settled = verify_and_settle(paths[k], job=views[k], ledger=self.ledger, writer=self.operator,
                                            seed=derived_seed(batch_seed, k))  # fmt: skip
            except InvalidInputError as exc:  # its node can no longer answer for it: the row alone is redone
                self._redo_row(item, k, f"redone: {exc.message}", verdict_doc, chain_doc, None)
                return
            entries += [list(e) for e in settled.appended]
            if settled.verdict.status != "accept":
                culprit = str(nodes.get(k))
                slashed = self._slashed_for(culprit, {views[k].job_id})
                why = f"rejected with the batch{' and slashed' if slashed else ''}: {settled.verdict.reason}"[:300]
                ban = (culprit, f"slashed for job {item.job_id[:19]}…: {settled.verdict.reason}") if slashed else None
                self._redo_row(item, k, why, verdict_doc, chain_doc, ban)
                if slashed:
                    self._standings = (0.0, {})
                return
        if chain.status != "accept":  # the batch check and the settlement disagree: decide nothing now
            raise InvalidInputError(f"the batch check rejected row {failed} but its settlement accepted it")
        out = folder / "outputs.npz"
        write_tensor_file(out, values)
        finish = self._finish(chain, out.read_bytes())
        self.state.decide(item.task_id, accepted=True, verdict={**chain_doc, "ledger_entries": entries},
                          outcome="accepted (spot check, then the batch)", finish=finish)  # fmt: skip

    def _redo_row(self, item: Verifying, row: int, why: str, verdict_doc: dict[str, Any], chain_doc: dict[str, Any],
                  ban: tuple[str, str] | None) -> None:  # fmt: skip
        """Row ``row`` goes to another node; the row that arrived last is done unless it is that one."""
        if row == item.position:
            self.state.decide(item.task_id, accepted=False, verdict=chain_doc, outcome=why,
                              ban=None if ban is None else ban[1])  # fmt: skip
            return
        self.state.decide(item.task_id, accepted=True, verdict=verdict_doc, outcome="accepted (spot check)")
        self.state.free_done(item.job_id, row, why, chain_doc, ban=ban)

    def _unsettleable(self, job_id: str, before: int) -> tuple[int, str] | None:
        """The first done segment before ``before`` whose node can no longer be settled with (it
        was excluded, or has nothing slashable left): its segment is redone, no one else blamed."""
        rows = {t["position"]: t for t in (self.state.job(job_id) or {"tasks": []})["tasks"]}
        for position in range(before):
            node_id = rows[position]["node_id"] if position in rows else None
            if node_id is None:
                continue
            node = self.state.node(node_id)
            if node is not None and node["banned"]:
                return position, f"its node {node_id} was excluded"
            if node_standing(self.ledger, node_id).slashable <= 0:
                return position, f"its node {node_id} has nothing slashable left"
        return None

    # -- running ---------------------------------------------------------------------------------

    def serve(
        self, host: str = "127.0.0.1", port: int = 8470, *, on_ready: Callable[[str], None] | None = None
    ) -> None:
        import uvicorn

        if not is_loopback(host) and self.read_token is None:
            raise InvalidInputError(f"--host {host} is beyond loopback: give --read-token for the read-only views",
                                    code="read-token-needed")  # fmt: skip
        _check_bindable(host, port)
        config = uvicorn.Config(self.app(), host=host, port=port, log_level="warning", access_log=False,
                                lifespan="on", timeout_graceful_shutdown=5)  # fmt: skip
        server = uvicorn.Server(config)
        if on_ready is not None:
            original = server.startup

            async def startup(sockets: Any = None) -> None:
                await original(sockets=sockets)
                bound = [s.getsockname() for srv in server.servers for s in srv.sockets]
                on_ready(f"http://{bound[0][0]}:{bound[0][1]}" if bound else f"http://{host}:{port}")

            server.startup = startup  # type: ignore[method-assign]
        server.run()


def _check_bindable(host: str, port: int) -> None:
    """A port another process holds is a one-line refusal before uvicorn starts (uvicorn's own
    message is its log line, not verimesh's)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise InvalidInputError(f"cannot listen on {host}:{port}: {exc}", code="cannot-listen") from exc
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise InvalidInputError(
                f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                code="cannot-listen",
                hint="another process holds the port: stop it, or pick --port",
            ) from exc


def _bundle_outputs(path: Path, job: Job) -> dict[str, np.ndarray]:
    """The output values a bundle commits (one that passed its spot check)."""
    parsed = read_bundle(path, version=job.version)
    return {name: np.array(parsed.tensors[name]) for name in job.output_names}


def _distances_to_own_run(job: Job, bundles: dict[int, Path]) -> dict[int, float]:
    """Each answer's outputs against the referee's own run of the whole model from the pinned
    input: the largest relative Frobenius distance over the outputs."""
    from verimesh.jobs.runtime import StepRunner
    from verimesh.spot.spotcheck import run_steps

    if len(bundles) < 2:
        return {r: 0.0 for r in bundles}
    runner = StepRunner(device="cpu", precision=job.policy.precision, optimization=job.policy.optimization)
    own = run_steps(job, None, job.read_input(), runner)
    distances = {}
    for replica, path in bundles.items():
        theirs = _bundle_outputs(path, job)
        distances[replica] = max(
            float(np.linalg.norm((theirs[n].astype(np.float64) - own[n]).ravel()))
            / max(float(np.linalg.norm(own[n].astype(np.float64).ravel())), 1e-30)
            for n in job.output_names
        )
    return distances


def _outputs_agree(outputs: list[dict[str, np.ndarray]], job: Job) -> bool:
    """Every pair of answers within twice the tolerance of the job's last step."""
    tol = job.policy.tolerance_for(len(job.steps) - 1)
    doubled = Tolerance(**{k: 2 * v for k, v in asdict(tol).items()})
    return all(
        set(a) == set(b) and all(compare_tensors(n, a[n], b[n], doubled).ok for n in a)
        for i, a in enumerate(outputs) for b in outputs[i + 1:]
    )  # fmt: skip


def _shard_docs(value: Any) -> list[dict[str, Any]] | None:
    """A submission's ``shards``: one ``{input, tensors}`` per row, or None."""
    from verimesh.jobs.segments import MAX_SHARDS

    if value is None:
        return None
    if not isinstance(value, list) or not 1 <= len(value) <= min(MAX_SHARDS, MAX_SEGMENTS):
        raise HTTPError(400, "malformed", f"shards: 1..{min(MAX_SHARDS, MAX_SEGMENTS)} rows")
    for doc in value:
        if not isinstance(doc, dict) or set(doc) != {"input", "tensors"} or not isinstance(doc["tensors"], list):
            raise HTTPError(400, "malformed", "each shard is {input, tensors}")
        parse_digest(doc["input"], what="shard input digest")
        for t in doc["tensors"]:
            TensorRef.from_json(t, what="shard input tensor")
    return [{"input": d["input"], "tensors": list(d["tensors"])} for d in value]


def verifier_child(ledger_url: str, operator: SecretKey, heartbeat_timeout: float, admission: str = "open",
                   srs: Path | None = None) -> Callable[[tuple[Verifying, Prefetched | None]], str]:  # fmt: skip
    """The verifier's child process (``mesh.sandbox``): the same coordinator state, verifying in place."""
    coordinator = Coordinator(ledger_url, operator, heartbeat_timeout=heartbeat_timeout, isolate=False,
                              admission=admission, srs=srs)  # fmt: skip
    return coordinator._verify_item


def _circuit_dependent(verdict: Any) -> bool:
    """A zk reject whose failed check reads the owner's circuit (the proofs, their chain, the
    quantized input and outputs), not only the node's signed statement and sealed bytes."""
    failed = next((c for c in verdict.checks if not c.ok), None)
    if failed is None:
        return False
    name = str(failed.name)
    return (name.startswith(("proof-step-", "chain-")) or name == "input-binding"
            or (name == "output-binding" and "proven output" in str(failed.detail)))  # fmt: skip


def _refuse_strict_tolerance(job: Job) -> None:
    """A job owner may not set a tolerance tighter than the defaults of its precision class: an
    impossible tolerance would reject (and slash) an honest node whose hardware rounds otherwise."""
    floor = DEFAULT_TOLERANCES.get(job.policy.precision)
    if floor is None:
        raise InvalidInputError(f"precision class {job.policy.precision!r} does not run over the mesh")
    policy = job.policy
    for tolerance in (policy.tolerance, *policy.step_tolerances, *policy.window_tolerances):
        tighter = [k for k, v in asdict(floor).items() if getattr(tolerance, k) < v]
        if tighter:
            raise InvalidInputError(
                f"the job's tolerance is tighter than the {policy.precision} defaults ({', '.join(tighter)}): "
                "an honest node on other hardware could be rejected",
                code="tolerance-too-strict",
                hint="submit without a calibration profile tighter than the defaults",
            )
