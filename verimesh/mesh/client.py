"""The coordinator's HTTP API, as a node or a job owner calls it (``verimesh.mesh.Client``).

Every call that changes state, or reads what only its signer may read, is signed
(``mesh.auth``); the rest are plain reads. A coordinator that cannot be reached, or answers
with an error, raises ``MeshError`` (exit 3) carrying the HTTP status and the server's message.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from verimesh.core.canonical import canonical_json, parse_json
from verimesh.core.packing import NAME as PACKING
from verimesh.core.packing import pack, worth_packing
from verimesh.errors import InvalidInputError
from verimesh.ledger.events import sign_request
from verimesh.mesh.auth import AuthError, ClientSession, sign_headers
from verimesh.signing.keys import SecretKey

MAX_RESPONSE_JSON = 64 * 1024 * 1024
SESSION_PATH = "/v1/nodes/session"
_SIGNED_ONLY = frozenset({"/v1/nodes/register", SESSION_PATH})  # these carry the key's own signature
_SESSION_GONE = frozenset({"session-unknown", "session-expired"})


class MeshError(InvalidInputError):
    default_code = "coordinator-error"

    def __init__(self, message: str, *, status: int = 0, code: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, code=code, hint=hint)
        self.status = status


class Client:
    """One party (a node, or a job owner) talking to one coordinator."""

    def __init__(
        self,
        url: str,
        key: SecretKey | None = None,
        *,
        timeout: float = 60.0,
        token: str | None = None,
        sessions: bool = False,
    ) -> None:
        """``sessions``: a node's client MACs its requests in a session (mesh.auth) after it registered."""
        if not url.startswith(("http://", "https://")):
            raise InvalidInputError(f"coordinator URL must start with http:// or https://, got {url!r:.80}")
        self.url = url.rstrip("/")
        self.key = key
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, timeout=timeout, headers=headers, trust_env=False)
        self._info: dict[str, Any] | None = None
        self.sessions = sessions
        self._session: ClientSession | None = None
        self._session_lock = threading.RLock()
        # (route kind, seconds, bytes sent, bytes received) of each call, for `verimesh bench`
        self.timings: list[tuple[str, float, int, int]] = []

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- transport -------------------------------------------------------------------------------

    def _call(self, method: str, path: str, body: bytes = b"", *, signed: bool = True,
              ok: tuple[int, ...] = (200, 201, 202)) -> httpx.Response:  # fmt: skip
        """One request: signed with the key, or (a node's client, once registered) MACed in a
        session; a session the coordinator no longer knows (it restarted) is opened again, once."""
        in_session = signed and self.sessions and path not in _SIGNED_ONLY
        for attempt in (0, 1):
            headers: dict[str, str] = {}
            if signed:
                if self.key is None:
                    raise InvalidInputError("this call needs a key (--key)")
                if in_session:
                    headers = self._session_for().headers(method=method, path=path, body=body)
                else:
                    headers = sign_headers(self.key, coordinator=self.coordinator_id, method=method, path=path,
                                           body=body)  # fmt: skip
            started = time.perf_counter()
            try:
                response = self._http.request(method, path, content=body, headers=headers)
                if len(self.timings) < 100_000:
                    kind = f"{method} " + "/".join("*" if len(p) >= 16 else p for p in path.split("/"))
                    self.timings.append((kind, time.perf_counter() - started, len(body), len(response.content)))
            except httpx.HTTPError as exc:
                raise MeshError(f"cannot reach the coordinator at {self.url}: {exc}", code="coordinator-unreachable",
                                hint="is `verimesh serve` running there?") from exc  # fmt: skip
            if response.status_code in ok:
                return response
            message, code = response.text[:300], None
            try:
                error = response.json()["error"]
                message, code = str(error["message"])[:300], str(error["code"])[:64]
            except (ValueError, KeyError, TypeError):
                pass
            if in_session and attempt == 0 and response.status_code == 401 and code in _SESSION_GONE:
                with self._session_lock:
                    self._session = None
                continue
            break
        raise MeshError(f"the coordinator refused {method} {path}: {response.status_code} {message}",
                        status=response.status_code, code=code)  # fmt: skip

    def _session_for(self) -> ClientSession:
        """The open session, or a new one (one signed request) when there is none or it ends soon."""
        with self._session_lock:
            current = self._session
            if current is not None and time.time() < current.expires - 60:
                return current
            assert self.key is not None
            fresh = ClientSession(self.key, self.coordinator_id)
            answer = self._post_json(SESSION_PATH, fresh.offer())
            try:
                fresh.accept(answer)
            except AuthError as exc:
                raise MeshError(str(exc), code="bad-session") from exc
            self._session = fresh
            return fresh

    def _json(self, response: httpx.Response) -> Any:
        return parse_json(response.content, what="coordinator response", max_bytes=MAX_RESPONSE_JSON)

    def _post_json(self, path: str, doc: Any) -> Any:
        return self._json(self._call("POST", path, canonical_json(doc)))

    # -- reads -----------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        if self._info is None:
            doc = self._json(self._call("GET", "/v1/info", signed=False))
            if not isinstance(doc, dict) or not isinstance(doc.get("coordinator"), str):
                raise MeshError(f"{self.url} is not a verimesh coordinator")
            self._info = doc
        return self._info

    @property
    def coordinator_id(self) -> str:
        return str(self.info()["coordinator"])

    def status(self, job_id: str | None = None, *, jobs: int | None = None) -> Any:
        """One job, or the mesh (``jobs``: how many of the newest jobs to list; the coordinator's default)."""
        path = f"/v1/jobs/{job_id}" if job_id else "/v1/status" + ("" if jobs is None else f"?jobs={jobs}")
        return self._json(self._call("GET", path, signed=False))

    def receipt(self, job_id: str) -> bytes:
        """The signed receipt of a done job; only the job's owner may read it."""
        return self._call("GET", f"/v1/jobs/{job_id}/receipt").content

    def outputs(self, job_id: str) -> bytes:
        """The verified outputs (.npz); only the job's owner may read them."""
        return self._call("GET", f"/v1/jobs/{job_id}/outputs").content

    def proofs(self, job_id: str) -> list[dict[str, Any]]:
        """Inclusion proofs of a done job's ledger entries; only the job's owner may read them."""
        doc = self._json(self._call("GET", f"/v1/jobs/{job_id}/proofs"))
        if not isinstance(doc, dict) or not isinstance(doc.get("proofs"), list):
            raise MeshError("the coordinator's ledger proofs are malformed", code="bad-proofs")
        return list(doc["proofs"])

    # -- a node ----------------------------------------------------------------------------------

    def register(self, *, stake: int, device: str) -> dict[str, Any]:
        assert self.key is not None
        request = sign_request(self.key, action="register", ledger_id=str(self.info()["ledger_id"]), amount=stake)
        return dict(self._post_json("/v1/nodes/register", {"request": request.to_json(), "device": device}))

    def heartbeat(self) -> list[str]:
        return list(self._post_json("/v1/nodes/heartbeat", {})["leases"])

    def lease(self) -> dict[str, Any] | None:
        response = self._call("POST", "/v1/lease", canonical_json({}), ok=(200, 204))
        return None if response.status_code == 204 else dict(self._json(response))

    def file(self, task_id: str, digest: str) -> bytes:
        return self._call("GET", f"/v1/tasks/{task_id}/files/{digest}").content

    def packed(self, upload: bytes) -> bytes:
        """An upload as it travels: packed (core/packing.py) when the coordinator takes it so and
        that is smaller."""
        if PACKING not in (self.info().get("uploads") or ()):
            return upload
        packed = pack(upload)
        return packed if worth_packing(upload, packed) else upload

    def result(self, task_id: str, lease_id: str, bundle: bytes) -> dict[str, Any]:
        body = self.packed(bundle)
        return dict(self._json(self._call("POST", f"/v1/tasks/{task_id}/result/{lease_id}", body)))

    def commit(self, task_id: str, lease_id: str, commitment: bytes) -> dict[str, Any]:
        """Challenge mode: upload the commitment (an opened bundle of trace.json and the outputs);
        the challenge: the members to open and the deadline."""
        doc = self._json(self._call("POST", f"/v1/tasks/{task_id}/commit/{lease_id}", self.packed(commitment)))
        if not isinstance(doc, dict) or not isinstance(doc.get("challenge"), dict):
            raise MeshError("the coordinator's challenge is malformed", code="bad-challenge")
        challenge = doc["challenge"]
        if not isinstance(challenge.get("members"), list) or not all(isinstance(m, str) for m in challenge["members"]):
            raise MeshError("the coordinator's challenge is malformed", code="bad-challenge")
        return dict(challenge)

    def open(self, task_id: str, lease_id: str, opening: bytes) -> dict[str, Any]:
        """Challenge mode: the answer, the challenged members opened under the committed root."""
        return dict(self._json(self._call("POST", f"/v1/tasks/{task_id}/open/{lease_id}", self.packed(opening))))

    def release(self, task_id: str, lease_id: str, reason: str) -> None:
        self._post_json(f"/v1/tasks/{task_id}/release/{lease_id}", {"reason": reason[:300]})

    # -- a job owner -----------------------------------------------------------------------------

    def put_blob(self, data: bytes) -> str:
        from verimesh.core.digest import sha256_bytes

        digest = sha256_bytes(data)
        self._call("PUT", f"/v1/blobs/{digest}", data)
        return digest

    def missing_blobs(self, digests: list[str]) -> list[str]:
        return list(self._post_json("/v1/blobs/missing", {"digests": digests})["missing"])

    def submit_job(self, job_bytes: bytes, *, files: dict[str, Any], deposit: int, deadline: float,
                   max_attempts: int, post: list[str] | None = None,
                   segments: list[list[int]] | None = None, device: str = "any",
                   replicas: int = 1, min_level: int = 0,
                   shards: list[dict[str, Any]] | None = None, transfer: str = "full") -> dict[str, Any]:  # fmt: skip
        """Post a job: ``post`` names what the ledger settles (the job, or each of its segments,
        in order), each with ``deposit`` signed by this key; ``replicas``: run by that many
        distinct nodes (a whole job), each answer spot-checked, a quorum or a referee deciding;
        ``min_level``: leased only to nodes the ledger audits at that level or above; ``shards``:
        one ``{input, tensors}`` per row of a batch, each run as the whole job on that row;
        ``transfer``: ``challenge`` (a whole job run once: the node commits, then opens only the
        steps the coordinator samples) or ``full`` (the node uploads its whole bundle)."""
        assert self.key is not None
        job_doc = json.loads(job_bytes)
        ids = post or [str(job_doc["job_id"])]
        ledger_id = str(self.info()["ledger_id"])
        requests = [sign_request(self.key, action="job", ledger_id=ledger_id, amount=deposit, job_id=i).to_json()
                    for i in ids]  # fmt: skip
        doc = {"job": job_doc, "files": files, "requests": requests, "segments": segments,
               "deadline": round(deadline), "max_attempts": max_attempts, "device": device}  # fmt: skip
        if replicas != 1:
            doc["replicas"] = replicas
        if min_level:
            doc["min_level"] = min_level
        if shards is not None:
            doc["shards"] = shards
        if transfer != "full":
            doc["transfer"] = transfer
        return dict(self._post_json("/v1/jobs", doc))

    def wait(self, job_id: str, *, timeout: float, poll: float = 0.5) -> dict[str, Any]:
        """Poll until the job is done or failed (MeshError after ``timeout`` seconds)."""
        end = time.monotonic() + timeout
        while True:
            try:
                doc = self.status(job_id)
            except MeshError as exc:  # a coordinator restarting is not the job's end
                if exc.status != 0 or time.monotonic() > end:
                    raise
                time.sleep(poll)
                continue
            if doc["state"] in ("done", "failed"):
                return dict(doc)
            if time.monotonic() > end:
                raise MeshError(f"job {job_id[:19]}… is still {doc['state']} after {timeout:g} s", code="timeout",
                                hint="`verimesh status --coordinator URL JOB_ID` shows where it stands")  # fmt: skip
            time.sleep(poll)


def upload_job(client: Client, job_path: Path, *, input_blob: bytes) -> dict[str, Any]:
    """Upload every blob a job needs that the coordinator lacks; the job's ``files``."""
    from verimesh.jobs.job import load_job
    from verimesh.mesh.files import job_files

    job = load_job(job_path)
    blobs: dict[str, bytes] = {}
    model = job.resolve(job.model_path)
    for step in job.steps:
        blobs[step.digest] = job.read_step_model(step.index)
    from verimesh.core.digest import sha256_bytes

    blobs[sha256_bytes(input_blob)] = input_blob
    blobs[sha256_bytes(job.canonical_bytes())] = job.canonical_bytes()
    circuit_json = None
    if job.mode == "zk":  # the circuit the job pins, and each step's settings and verifying key
        circuit = job.load_circuit()
        circuit_json = (circuit.folder / "circuit.json").read_bytes()
        blobs[sha256_bytes(circuit_json)] = circuit_json
        for piece in circuit.steps:
            blobs[piece.settings_digest] = circuit.read(piece.settings, piece.settings_digest)
            blobs[piece.vk_digest] = circuit.read(piece.vk, piece.vk_digest)
    files = job_files(job, sha256_bytes(input_blob), circuit_json)
    missing = set(client.missing_blobs([*blobs, job.model_digest]))
    for digest, data in blobs.items():
        if digest in missing:
            client.put_blob(data)
    if job.model_digest in missing:
        job.check_model_file(model)
        client.put_blob(model.read_bytes())
    return files
