"""The coordinator's state: jobs, tasks, leases, nodes, nonces and blobs, in the ledger's database.

Every change is one SQL transaction (on SQLite ``BEGIN IMMEDIATE``: one writer at a time; on
PostgreSQL the rows a change reads are locked ``FOR UPDATE``), so a coordinator killed at any
moment restarts from a consistent state: a task is pending, leased (to one node, until a
deadline), verifying (its result stored, not yet settled), done or failed, never two of these.

Task life::

    pending --lease--> leased --result--> verifying --accept--> done
       ^                 |                    |
       +-- lease lost ---+      reject/error -+--> pending (that node excluded), or failed
           (deadline or heartbeat missed: that node excluded)     after ``max_attempts``

A node never gets a task it lost, answered wrongly, or already holds, nor two tasks of one job.
A job run by R replicas has R tasks per position; each replica's answer is spot-checked alone
(done when it passes), and the last one's verdict waits for the quorum's decision over all R
(``decide_replicas``): a replica the referee finds wrong ends ``rejected`` (its node excluded).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from verimesh.core.digest import sha256_bytes
from verimesh.ledger.store import READ_ONLY, writing

metadata = sa.MetaData()

blobs = sa.Table(
    "mesh_blobs",
    metadata,
    sa.Column("digest", sa.String(71), primary_key=True),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("data", sa.LargeBinary, nullable=False),
    # Who uploaded it, when, and whether a job or a task refers to it yet: an upload nothing refers
    # to counts against its uploader's quota and is collected after the coordinator's blob TTL.
    sa.Column("uploader", sa.String(64)),
    sa.Column("created", sa.Float, nullable=False, default=0.0),
    sa.Column("referenced", sa.Boolean, nullable=False, default=True),
)
nodes = sa.Table(
    "mesh_nodes",
    metadata,
    sa.Column("node_id", sa.String(64), primary_key=True),
    sa.Column("public_key", sa.String(300), nullable=False),
    sa.Column("device", sa.String(16), nullable=False),
    sa.Column("joined", sa.Float, nullable=False),
    sa.Column("last_seen", sa.Float, nullable=False),
    sa.Column("banned", sa.String(300)),
    # Challenges left unanswered (committed, then not opened in time, or given back): a node that
    # commits and walks away whenever the sample would hit its wrong step is excluded at MAX_MISSED.
    sa.Column("missed", sa.Integer, nullable=False, default=0),
)
nonces = sa.Table(
    "mesh_nonces",
    metadata,
    sa.Column("node_id", sa.String(64), primary_key=True),
    sa.Column("nonce", sa.String(32), primary_key=True),
    sa.Column("stamp", sa.BigInteger, nullable=False, index=True),
)
jobs = sa.Table(
    "mesh_jobs",
    metadata,
    sa.Column("job_id", sa.String(71), primary_key=True),
    sa.Column("owner", sa.String(64), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("updated", sa.Float, nullable=False),
    sa.Column("spec", sa.Text, nullable=False),  # JSON: files, deadline, max_attempts, posted, segments
    sa.Column("outputs", sa.String(71)),  # blob digest of the verified outputs (.npz)
    sa.Column("receipt", sa.String(71)),  # blob digest of the signed receipt
    sa.Column("error", sa.String(500)),
)
tasks = sa.Table(
    "mesh_tasks",
    metadata,
    sa.Column("task_id", sa.String(40), primary_key=True),
    sa.Column("job_id", sa.String(71), nullable=False, index=True),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("replica", sa.Integer, nullable=False, default=0),  # 0 .. R-1: one of R runs of the sub-task
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("node_id", sa.String(64)),
    sa.Column("lease_id", sa.String(32)),
    sa.Column("leased_at", sa.Float),
    sa.Column("lease_deadline", sa.Float),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("excluded", sa.Text, nullable=False),  # JSON list of node ids
    sa.Column("bundle", sa.String(71)),
    # Challenge mode: JSON {commitment, seed, samples, steps, members, deadline, bytes} once the
    # lease holder committed (docs/design.md §10); the answer must come before ``deadline``.
    sa.Column("challenge", sa.Text),
    sa.Column("verdict", sa.Text),  # JSON: the last verdict (accept, or the reject that freed the task)
    sa.Column("history", sa.Text, nullable=False),  # JSON list: what happened to each attempt
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("updated", sa.Float, nullable=False),
)

CHURN = 5  # leases without an answer a task allows per judged attempt
MAX_MISSED = 3  # unanswered challenges that exclude a node


@dataclass(frozen=True)
class Lease:
    task_id: str
    job_id: str
    lease_id: str
    deadline: float
    spec: dict[str, Any]
    position: int = 0
    inputs: tuple[tuple[int, str], ...] = ()  # a segment's predecessors: (position, bundle digest)
    challenge: dict[str, Any] | None = None  # a resumed lease: the challenge its holder still owes

    def to_json(self) -> dict[str, Any]:
        doc = {"task_id": self.task_id, "job_id": self.job_id, "lease_id": self.lease_id,
               "deadline": self.deadline, "files": self.spec["files"], "position": self.position,
               "segments": self.spec.get("segments"), "inputs": {str(k): d for k, d in self.inputs},
               "transfer": self.spec.get("transfer", "full")}  # fmt: skip
        if self.challenge is not None:
            doc["challenge"] = challenge_view(self.challenge)
        shards = self.spec.get("shards")
        if shards:  # the whole job on one row: its input blob and the tensors it pins
            doc["shard"] = {"count": len(shards), **shards[self.position]}
        return doc


def challenge_view(challenge: dict[str, Any]) -> dict[str, Any]:
    """What the node is told of its challenge: the members to open, by when (and the sample)."""
    return {k: challenge[k] for k in ("members", "deadline", "steps", "seed", "samples")}


@dataclass(frozen=True)
class Verifying:
    """A stored result waiting for its verdict (``challenge``: the sample it was challenged with)."""

    task_id: str
    job_id: str
    node_id: str
    bundle: str
    position: int = 0
    replica: int = 0
    challenge: dict[str, Any] | None = None


@dataclass(frozen=True)
class Decision:
    """What a quorum decides for one replica (``MeshState.decide_replicas``): ``done`` (its answer
    stands), ``rejected`` (it stays in the job's record, its node excluded: ``ban``), or ``redo``
    (pending again without its node; counted as a judged answer when ``outcome`` says rejected)."""

    task_id: str
    action: str
    outcome: str
    verdict: dict[str, Any]
    ban: str | None = None


class StateError(Exception):
    """A request the state refuses: ``status`` is the HTTP status that says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _row_json(value: str | None, default: Any) -> Any:
    return default if value is None else json.loads(value)


class MeshState:
    """The mesh tables of one database (beside the ledger's), each method one transaction."""

    def __init__(self, engine: sa.Engine, *, heartbeat_timeout: float = 15.0, churn: int | None = CHURN) -> None:
        self.engine = engine
        self.heartbeat_timeout = heartbeat_timeout
        self.beat_written_every = heartbeat_timeout / 10  # ``heartbeat``; a node beats every third of it
        self.churn = churn  # None: leases that end without an answer never fail a task (an open mesh)
        self._postgres = engine.dialect.name == "postgresql"
        metadata.create_all(engine)
        columns = {c["name"] for c in sa.inspect(engine).get_columns("mesh_tasks")}
        if "replica" not in columns:
            with self._txn() as conn:  # a database from before replicas: every task was the only run
                conn.execute(sa.text("ALTER TABLE mesh_tasks ADD COLUMN replica INTEGER NOT NULL DEFAULT 0"))
        if "challenge" not in columns:  # from before challenges: every result was a full bundle
            with self._txn() as conn:
                conn.execute(sa.text("ALTER TABLE mesh_tasks ADD COLUMN challenge TEXT"))
        if "missed" not in {c["name"] for c in sa.inspect(engine).get_columns("mesh_nodes")}:
            with self._txn() as conn:
                conn.execute(sa.text("ALTER TABLE mesh_nodes ADD COLUMN missed INTEGER NOT NULL DEFAULT 0"))

    @contextmanager
    def _read(self) -> Iterator[sa.Connection]:
        """A connection for reads only (on SQLite a snapshot: it neither takes nor waits for the write lock)."""
        with self.engine.connect() as conn:
            conn.execution_options(**{READ_ONLY: True})
            yield conn

    @contextmanager
    def _txn(self) -> Iterator[sa.Connection]:
        with writing(self.engine) as conn:
            yield conn

    def _locked(self, query: sa.Select[Any]) -> sa.Select[Any]:
        return query.with_for_update() if self._postgres else query

    # -- blobs -----------------------------------------------------------------------------------

    @staticmethod
    def _keep(conn: sa.Connection, data: bytes) -> str:
        digest = sha256_bytes(data)
        if conn.execute(sa.select(blobs.c.digest).where(blobs.c.digest == digest)).first() is None:
            conn.execute(blobs.insert().values(digest=digest, size=len(data), data=data, created=time.time(),
                                               referenced=True))  # fmt: skip
        else:
            conn.execute(blobs.update().where(blobs.c.digest == digest).values(referenced=True))
        return digest

    def upload(self, uploader: str, data: bytes, *, quota: int) -> str:
        """A blob a job owner uploads before submitting: refused (StateError 413) when it would
        take the uploader's blobs that no job refers to yet over ``quota`` bytes."""
        digest = sha256_bytes(data)
        with self._txn() as conn:
            if conn.execute(sa.select(blobs.c.digest).where(blobs.c.digest == digest)).first() is not None:
                return digest
            pending = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(blobs.c.size), 0)).where(
                blobs.c.uploader == uploader, blobs.c.referenced == sa.false())).scalar_one()  # fmt: skip
            if int(pending) + len(data) > quota:
                raise StateError(413, f"over this key's quota of {quota} bytes of uploads no job refers to yet")
            conn.execute(blobs.insert().values(digest=digest, size=len(data), data=data, uploader=uploader,
                                               created=time.time(), referenced=False))  # fmt: skip
        return digest

    def collect_blobs(self, ttl: float) -> int:
        """Delete uploads no job referred to within ``ttl`` seconds; how many."""
        with self._txn() as conn:
            gone = conn.execute(blobs.delete().where(blobs.c.referenced == sa.false(),
                                                     blobs.c.created < time.time() - ttl))  # fmt: skip
        return int(gone.rowcount or 0)

    def blob(self, digest: str) -> bytes | None:
        with self._read() as conn:
            row = conn.execute(sa.select(blobs.c.data).where(blobs.c.digest == digest)).first()
        return None if row is None else bytes(row.data)

    def has_blobs(self, digests: Sequence[str]) -> list[str]:
        """The digests of ``digests`` that are not stored."""
        with self._read() as conn:
            found = {r.digest for r in conn.execute(sa.select(blobs.c.digest).where(blobs.c.digest.in_(digests)))}
        return [d for d in digests if d not in found]

    # -- nonces ----------------------------------------------------------------------------------

    def seen_nonce(self, node_id: str, nonce: str) -> bool:
        """Read only: this key used this nonce already (a replay)."""
        with self._read() as conn:
            row = conn.execute(sa.select(nonces.c.nonce).where(nonces.c.node_id == node_id, nonces.c.nonce == nonce))
            return row.first() is not None

    def use_nonce(self, node_id: str, nonce: str, stamp: int, *, window: int) -> bool:
        """Record a request's nonce; False when this key already used it (a replay)."""
        now = int(time.time())
        try:
            with self._txn() as conn:
                conn.execute(nonces.insert().values(node_id=node_id, nonce=nonce, stamp=stamp))
                if secrets.randbelow(64) == 0:  # forget nonces no request inside the window can reuse
                    conn.execute(nonces.delete().where(nonces.c.stamp < now - 2 * window))
        except sa.exc.IntegrityError:
            return False
        return True

    # -- nodes -----------------------------------------------------------------------------------

    def join(self, node_id: str, public_key: str, device: str) -> None:
        now = time.time()
        with self._txn() as conn:
            row = conn.execute(sa.select(nodes.c.node_id).where(nodes.c.node_id == node_id)).first()
            if row is None:
                conn.execute(nodes.insert().values(node_id=node_id, public_key=public_key, device=device,
                                                   joined=now, last_seen=now, banned=None))  # fmt: skip
            else:
                conn.execute(nodes.update().where(nodes.c.node_id == node_id).values(device=device, last_seen=now))

    def node(self, node_id: str) -> dict[str, Any] | None:
        with self._read() as conn:
            row = conn.execute(sa.select(nodes).where(nodes.c.node_id == node_id)).first()
        return None if row is None else dict(row._mapping)

    def heartbeat(self, node_id: str) -> list[str]:
        """The node is alive: its leases stand (until their deadlines). Returns its live task ids.

        A beat within ``beat_written_every`` of the last one written is not written (it would
        move ``last_seen`` by less than a tenth of the timeout; the write lock is the mesh's
        busiest resource): its node is live and none of its leases lapsed, so nothing is lost."""
        now = time.time()
        with self._read() as conn:
            seen = conn.execute(sa.select(nodes.c.last_seen).where(nodes.c.node_id == node_id)).scalar_one_or_none()
            if seen is not None and 0 <= now - float(seen) < self.beat_written_every:
                held = conn.execute(sa.select(tasks.c.task_id, tasks.c.lease_deadline).where(
                    tasks.c.node_id == node_id, tasks.c.state == "leased")).all()  # fmt: skip
                if all(float(r.lease_deadline) >= now for r in held):
                    return [r.task_id for r in held]
        with self._txn() as conn:
            self._expire(conn, now)  # first: a beat after the timeout does not bring a lost lease back
            conn.execute(nodes.update().where(nodes.c.node_id == node_id).values(last_seen=now))
            rows = conn.execute(
                sa.select(tasks.c.task_id).where(tasks.c.node_id == node_id, tasks.c.state == "leased")
            ).all()
        return [r.task_id for r in rows]

    def nodes(self) -> list[dict[str, Any]]:
        with self._read() as conn:
            return [dict(r._mapping) for r in conn.execute(sa.select(nodes).order_by(nodes.c.joined))]

    # -- jobs ------------------------------------------------------------------------------------

    def add_job(self, job_id: str, owner: str, spec: dict[str, Any], positions: int = 1, replicas: int = 1) -> bool:
        """A new job and its tasks (``replicas`` of each position, for distinct nodes); False when
        the job exists already (nothing changes)."""
        now = time.time()
        with self._txn() as conn:
            if conn.execute(sa.select(jobs.c.job_id).where(jobs.c.job_id == job_id)).first() is not None:
                return False
            conn.execute(jobs.insert().values(job_id=job_id, owner=owner, state="open", created=now, updated=now,
                                              spec=json.dumps(spec, sort_keys=True)))  # fmt: skip
            files = spec["files"]
            pinned = [files["job"], files["model"], files["input"], *files["steps"], *files.get("circuit", ()),
                      *(d["input"] for d in spec.get("shards") or ())]  # fmt: skip
            conn.execute(blobs.update().where(blobs.c.digest.in_(pinned)).values(referenced=True))
            conn.execute(
                tasks.insert(),
                [
                    {"task_id": secrets.token_hex(16), "job_id": job_id, "position": i, "replica": r,
                     "state": "pending", "attempts": 0, "excluded": "[]", "history": "[]", "created": now,
                     "updated": now}
                    for i in range(positions) for r in range(replicas)
                ],
            )  # fmt: skip
        return True

    def job(self, job_id: str) -> dict[str, Any] | None:
        with self._read() as conn:
            found = self._job_docs(conn, sa.select(jobs).where(jobs.c.job_id == job_id))
        return found[0] if found else None

    def jobs(self, limit: int = 200) -> list[dict[str, Any]]:
        """The ``limit`` newest jobs with their tasks, in two queries (one snapshot)."""
        with self._read() as conn:
            return self._job_docs(conn, sa.select(jobs).order_by(jobs.c.created.desc()).limit(limit))

    def _job_docs(self, conn: sa.Connection, query: sa.Select[Any]) -> list[dict[str, Any]]:
        docs = []
        for row in conn.execute(query):
            doc = dict(row._mapping)
            doc["spec"] = json.loads(doc["spec"])
            doc["tasks"] = []
            docs.append(doc)
        by_id = {d["job_id"]: d for d in docs}
        ids = list(by_id)
        for at in range(0, len(ids), 500):
            chunk = ids[at : at + 500]
            for r in conn.execute(
                sa.select(tasks).where(tasks.c.job_id.in_(chunk)).order_by(tasks.c.position, tasks.c.replica)
            ):
                by_id[r.job_id]["tasks"].append(self._task_doc(r))
        return docs

    @staticmethod
    def _task_doc(row: Any) -> dict[str, Any]:
        doc = dict(row._mapping)
        doc["excluded"] = json.loads(doc["excluded"])
        doc["history"] = json.loads(doc["history"])
        doc["verdict"] = _row_json(doc["verdict"], None)
        challenge = _row_json(doc.pop("challenge", None), None)
        if challenge is not None:  # its size and sample; the seed is the operator's to publish
            doc["challenge"] = {k: challenge[k] for k in ("steps", "samples", "members", "bytes")}
        doc.pop("lease_id")
        return doc

    # -- leases ----------------------------------------------------------------------------------

    def _expire(self, conn: sa.Connection, now: float) -> None:
        """Leases past their deadline, or held by a node whose heartbeat stopped, are lost."""
        stale = now - self.heartbeat_timeout
        rows = conn.execute(
            self._locked(
                sa.select(tasks, nodes.c.last_seen)
                .join(nodes, nodes.c.node_id == tasks.c.node_id)
                .where(tasks.c.state == "leased", sa.or_(tasks.c.lease_deadline < now, nodes.c.last_seen < stale))
            )
        ).all()
        for row in rows:
            why = "deadline" if row.lease_deadline < now else "heartbeat"
            if row.challenge is not None:
                self._missed(conn, row.node_id, f"challenge not answered ({why} missed)")
                self._free(conn, row, f"lease lost: challenge not answered ({why} missed)", now)
                continue
            self._free(conn, row, f"lease lost ({why} missed)", now)

    def _missed(self, conn: sa.Connection, node_id: str, why: str) -> None:
        """A node left a challenge unanswered: a strike; at MAX_MISSED it is excluded. A
        commitment it walks away from costs it the task, the reward and, repeated, the mesh: a
        node that opened only the samples that miss its wrong steps would otherwise lose nothing."""
        missed = int(conn.execute(sa.select(nodes.c.missed).where(nodes.c.node_id == node_id)).scalar_one() or 0) + 1
        values: dict[str, Any] = {"missed": missed}
        if missed >= MAX_MISSED:
            values["banned"] = f"excluded: {missed} challenges left unanswered (last: {why})"[:300]
        conn.execute(nodes.update().where(nodes.c.node_id == node_id, nodes.c.banned.is_(None)).values(**values))

    def _free(self, conn: sa.Connection, row: Any, why: str, now: float, verdict: Any = None) -> None:
        """Back to pending without the node that held it. The task fails after ``max_attempts``
        answers that were judged (rejected and slashed, or unverifiable), or, on a mesh whose
        nodes the operator admitted (``churn``), after CHURN times as many leases that ended
        without an answer (given back, or lost). On an open mesh a fresh key costs nothing, so
        unanswered leases never fail a task: each such key is excluded from it and only delays it."""
        excluded = [*json.loads(row.excluded), row.node_id]
        history = [*json.loads(row.history), {"node_id": row.node_id, "outcome": why, "time": now}]
        spec = json.loads(conn.execute(sa.select(jobs.c.spec).where(jobs.c.job_id == row.job_id)).scalar_one())
        limit = int(spec.get("max_attempts", 3))
        judged = sum(1 for h in history if h["outcome"].startswith(("rejected", "error")))
        failed = judged >= limit or (self.churn is not None and len(history) >= self.churn * limit)
        values: dict[str, Any] = {
            "state": "failed" if failed else "pending", "node_id": None, "lease_id": None, "leased_at": None,
            "lease_deadline": None, "bundle": None, "excluded": json.dumps(excluded), "history": json.dumps(history),
            "updated": now, "challenge": None,
        }  # fmt: skip
        if verdict is not None:
            values["verdict"] = json.dumps(verdict, sort_keys=True)
        conn.execute(tasks.update().where(tasks.c.task_id == row.task_id).values(**values))
        if failed:
            conn.execute(jobs.update().where(jobs.c.job_id == row.job_id).values(
                state="failed", updated=now, error=f"task {row.position}: {len(history)} leases; last: {why}"[:500]
            ))  # fmt: skip

    def lease(self, node_id: str, *, deadline_default: float, level: int = 0) -> Lease | None:
        """The node's current lease, else the oldest pending task it may take (of its device, for
        its audit ``level``, never a second sub-task of one job), leased to it now.

        The task is chosen from a snapshot, without the write lock (the scan is most of a
        lease's work); under the lock the choice is taken only if that task row is unchanged
        since (same ``updated``) and its job's other tasks still allow it, else the scan runs
        again there."""
        now = time.time()
        with self._read() as conn:  # the common idle case, and the choice, without the write lock
            busy = conn.execute(sa.select(tasks.c.task_id).where(
                sa.or_(tasks.c.state == "pending", tasks.c.state == "leased")).limit(1)).first()  # fmt: skip
            if busy is None:
                return None
            held = conn.execute(self._held_by(node_id)).first()
            chosen = None if held is not None else next(self._eligible(conn, node_id, level), None)
        with self._txn() as conn:
            self._expire(conn, now)  # first, as for a heartbeat
            conn.execute(nodes.update().where(nodes.c.node_id == node_id).values(last_seen=now))
            held = conn.execute(self._held_by(node_id)).first()
            if held is not None:
                return self._lease_of(conn, held)
            if chosen is not None:
                row = conn.execute(self._locked(sa.select(tasks).join(jobs, jobs.c.job_id == tasks.c.job_id).where(
                    tasks.c.task_id == chosen[0].task_id, tasks.c.updated == chosen[0].updated,
                    jobs.c.state == "open"))).first()  # fmt: skip
                if row is not None and self._may_take(
                    conn, row, node_id, level, chosen[1], self._device(conn, node_id)
                ):
                    return self._take(conn, row, chosen[1], node_id, now, deadline_default)
            for row, spec in self._eligible(conn, node_id, level):
                return self._take(conn, row, spec, node_id, now, deadline_default)
        return None

    @staticmethod
    def _held_by(node_id: str) -> sa.Select[Any]:
        return sa.select(tasks).where(tasks.c.node_id == node_id, tasks.c.state == "leased").limit(1)

    def _eligible(self, conn: sa.Connection, node_id: str, level: int) -> Iterator[tuple[Any, dict[str, Any]]]:
        """Pending tasks this node may take, oldest first, each with its job's spec."""
        specs: dict[str, dict[str, Any]] = {}
        device = self._device(conn, node_id)
        for row in self._pending(conn):
            if row.job_id not in specs:
                specs[row.job_id] = json.loads(
                    conn.execute(sa.select(jobs.c.spec).where(jobs.c.job_id == row.job_id)).scalar_one()
                )
            if self._may_take(conn, row, node_id, level, specs[row.job_id], device):
                yield row, specs[row.job_id]

    @staticmethod
    def _device(conn: sa.Connection, node_id: str) -> str | None:
        return conn.execute(sa.select(nodes.c.device).where(nodes.c.node_id == node_id)).scalar_one_or_none()

    @staticmethod
    def _may_take(conn: sa.Connection, row: Any, node_id: str, level: int, spec: dict[str, Any],
                  device: str | None) -> bool:  # fmt: skip
        if row.state != "pending" or node_id in json.loads(row.excluded):
            return False
        if spec.get("device", "any") not in ("any", device):
            return False  # the job asked for another device than this node's
        if int(spec.get("min_level", 0)) > level:
            return False  # the job asked for nodes the ledger trusts more
        siblings = conn.execute(
            sa.select(tasks.c.position, tasks.c.state, tasks.c.node_id, tasks.c.history)
            .where(tasks.c.job_id == row.job_id, tasks.c.task_id != row.task_id)
        ).all()  # fmt: skip
        if spec.get("segments") and any(t.position < row.position and t.state != "done" for t in siblings):
            return False  # a segment starts from its predecessors' verified outputs (shards run in parallel)
        # one node never runs two sub-tasks of one job
        return not any(t.node_id == node_id or node_id in {h["node_id"] for h in json.loads(t.history)}
                       for t in siblings)  # fmt: skip

    def _take(self, conn: sa.Connection, row: Any, spec: dict[str, Any], node_id: str, now: float,
              deadline_default: float) -> Lease:  # fmt: skip
        deadline = now + float(spec.get("deadline", deadline_default))
        lease_id = secrets.token_hex(16)
        conn.execute(
            tasks.update()
            .where(tasks.c.task_id == row.task_id, tasks.c.state == "pending")
            .values(state="leased", node_id=node_id, lease_id=lease_id, leased_at=now,
                    lease_deadline=deadline, attempts=row.attempts + 1, updated=now)
        )  # fmt: skip
        return Lease(row.task_id, row.job_id, lease_id, deadline, spec, row.position,
                     self._inputs(conn, row.job_id, row.position))  # fmt: skip

    def _pending(self, conn: sa.Connection, page: int = 64) -> Iterator[Any]:
        """Pending tasks of open jobs, oldest first, a page at a time: tasks no node may take (a
        segment waiting for its predecessors, a job for another device) never hide the ones
        behind them, however many there are."""
        offset = 0
        while True:
            rows = conn.execute(
                self._locked(
                    sa.select(tasks)
                    .join(jobs, jobs.c.job_id == tasks.c.job_id)
                    .where(tasks.c.state == "pending", jobs.c.state == "open")
                    .order_by(tasks.c.created, tasks.c.position, tasks.c.replica, tasks.c.task_id)
                    .limit(page)
                    .offset(offset)
                )
            ).all()
            yield from rows
            if len(rows) < page:
                return
            offset += page

    def _inputs(self, conn: sa.Connection, job_id: str, position: int) -> tuple[tuple[int, str], ...]:
        rows = conn.execute(sa.select(tasks.c.position, tasks.c.bundle).where(
            tasks.c.job_id == job_id, tasks.c.position < position, tasks.c.state == "done"
        ).order_by(tasks.c.position)).all()  # fmt: skip
        return tuple((int(r.position), str(r.bundle)) for r in rows)

    def _lease_of(self, conn: sa.Connection, row: Any) -> Lease:
        spec = json.loads(conn.execute(sa.select(jobs.c.spec).where(jobs.c.job_id == row.job_id)).scalar_one())
        return Lease(row.task_id, row.job_id, row.lease_id, row.lease_deadline, spec, row.position,
                     self._inputs(conn, row.job_id, row.position), _row_json(row.challenge, None))  # fmt: skip

    def resume(self, *, answer_within: float) -> None:
        """After the coordinator was down: the nodes holding leases are seen now, and every
        challenge's deadline is at least ``answer_within`` from now (an outage must not strike an
        honest node that could not reach the coordinator)."""
        now = time.time()
        with self._txn() as conn:
            held = conn.execute(self._locked(sa.select(tasks).where(tasks.c.state == "leased"))).all()
            holders = sorted({r.node_id for r in held if r.node_id is not None})
            if holders:
                conn.execute(nodes.update().where(nodes.c.node_id.in_(holders)).values(last_seen=now))
            for row in held:
                if row.challenge is None:
                    continue
                doc = json.loads(row.challenge)
                deadline = max(float(doc["deadline"]), now + answer_within)
                doc["deadline"] = deadline
                conn.execute(tasks.update().where(tasks.c.task_id == row.task_id).values(
                    challenge=json.dumps(doc, sort_keys=True),
                    lease_deadline=max(float(row.lease_deadline), deadline)))  # fmt: skip

    def lease_of(self, node_id: str, task_id: str) -> Lease | None:
        """The node's lease on the task, when it holds one."""
        with self._read() as conn:
            row = conn.execute(sa.select(tasks).where(tasks.c.task_id == task_id, tasks.c.node_id == node_id,
                                                      tasks.c.state == "leased")).first()  # fmt: skip
            return None if row is None else self._lease_of(conn, row)

    def done_bundles(self, job_id: str) -> dict[int, str]:
        """Position -> bundle digest of the job's done tasks."""
        with self._read() as conn:
            rows = conn.execute(sa.select(tasks.c.position, tasks.c.bundle)
                                .where(tasks.c.job_id == job_id, tasks.c.state == "done")).all()  # fmt: skip
        return {int(r.position): str(r.bundle) for r in rows}

    def redo_from(self, job_id: str, position: int, outcome: str, verdict: dict[str, Any],
                  ban: tuple[str, str] | None = None) -> None:  # fmt: skip
        """A chain that failed at ``position`` when verified whole (or whose segment's node can no
        longer settle): that task is freed without its node (counted as a judged answer only when
        ``outcome`` says rejected or error), and every later one, done or waiting for its verdict
        on those outputs, goes back to pending (their nodes did nothing wrong, and may take them
        again). ``ban``: (node id, reason), in the same transaction."""
        now = time.time()
        with self._txn() as conn:
            if ban is not None:
                conn.execute(nodes.update().where(nodes.c.node_id == ban[0]).values(banned=ban[1][:300]))
            rows = conn.execute(self._locked(sa.select(tasks).where(tasks.c.job_id == job_id,
                                                                    tasks.c.position >= position))).all()  # fmt: skip
            for row in rows:
                if row.position == position:
                    self._free(conn, row, outcome, now, verdict)
                elif row.state in ("done", "verifying", "leased"):
                    history = [
                        *json.loads(row.history),
                        {"node_id": row.node_id, "outcome": f"redone: segment {position} failed", "time": now},
                    ]
                    conn.execute(tasks.update().where(tasks.c.task_id == row.task_id).values(
                        state="pending", node_id=None, lease_id=None, leased_at=None, lease_deadline=None,
                        bundle=None, challenge=None, history=json.dumps(history), updated=now))  # fmt: skip

    def free_done(self, job_id: str, position: int, outcome: str, verdict: dict[str, Any],
                  ban: tuple[str, str] | None = None) -> None:  # fmt: skip
        """A done shard found wrong when the whole batch was verified: that task alone goes back to
        pending without its node (a judged answer), ``ban`` in the same transaction."""
        now = time.time()
        with self._txn() as conn:
            if ban is not None:
                conn.execute(nodes.update().where(nodes.c.node_id == ban[0]).values(banned=ban[1][:300]))
            row = conn.execute(self._locked(sa.select(tasks).where(
                tasks.c.job_id == job_id, tasks.c.position == position, tasks.c.state == "done"))).first()  # fmt: skip
            if row is not None:
                self._free(conn, row, outcome, now, verdict)

    def holds(self, node_id: str, task_id: str) -> bool:
        """The node holds a live lease on the task (it may read the task's files)."""
        with self._read() as conn:
            row = conn.execute(sa.select(tasks.c.node_id, tasks.c.state, tasks.c.lease_deadline)
                               .where(tasks.c.task_id == task_id)).first()  # fmt: skip
        return (
            row is not None and row.node_id == node_id and row.state == "leased" and row.lease_deadline >= time.time()
        )

    def check_lease(self, node_id: str, task_id: str, lease_id: str) -> None:
        """StateError unless the node holds this live lease (read only: ``submit`` decides again)."""
        with self._read() as conn:
            row = conn.execute(sa.select(tasks).where(tasks.c.task_id == task_id)).first()
        if row is None:
            raise StateError(404, "no such task")
        if row.node_id != node_id or row.lease_id != lease_id or row.state != "leased":
            lost = node_id in json.loads(row.excluded)
            raise StateError(409 if lost else 403, "the lease was lost (too late)" if lost
                             else "this task is not leased to you")  # fmt: skip
        if row.lease_deadline < time.time():
            raise StateError(409, "the lease was lost (too late)")

    def _held(self, conn: sa.Connection, node_id: str, task_id: str, lease_id: str) -> Any:
        """The task row, locked, when the node holds this live lease (StateError otherwise; a lease
        whose holder missed its heartbeat was lost, whatever the holder sends now)."""
        self._expire(conn, time.time())
        row = conn.execute(self._locked(sa.select(tasks).where(tasks.c.task_id == task_id))).first()
        if row is None:
            raise StateError(404, "no such task")
        if row.node_id != node_id or row.lease_id != lease_id:
            lost = node_id in json.loads(row.excluded)
            raise StateError(409 if lost else 403, "the lease was lost (too late)" if lost
                             else "this task is not leased to you")  # fmt: skip
        if row.state != "leased":
            raise StateError(409, f"the task is {row.state}, not waiting for a result")
        return row

    def submit(self, node_id: str, task_id: str, lease_id: str, data: bytes, *,
               answer_bytes: int | None = None) -> str:  # fmt: skip
        """Store a node's result (``data``: its bundle) for its own live lease, blob and task in
        one transaction, and return the bundle's digest (StateError otherwise, nothing stored).
        ``answer_bytes`` (the size of what it opened): the result is the opened bundle that
        answers the lease's challenge, the size noted beside it; a full bundle is refused once
        the holder committed (it would answer a sample it chose)."""
        now = time.time()
        with self._txn() as conn:
            row = self._held(conn, node_id, task_id, lease_id)
            challenged = answer_bytes is not None
            if challenged != (row.challenge is not None):
                raise StateError(409, "this lease is waiting for the answer to its challenge" if row.challenge
                                 else "this lease has no challenge to answer: commit first")  # fmt: skip
            bundle = self._keep(conn, data)
            values: dict[str, Any] = {"state": "verifying", "bundle": bundle, "updated": now}
            if challenged:
                doc = json.loads(row.challenge)
                doc["bytes"] = {**doc.get("bytes", {}), "answer": answer_bytes}
                values["challenge"] = json.dumps(doc, sort_keys=True)
            conn.execute(tasks.update().where(tasks.c.task_id == task_id).values(**values))
        return bundle

    def challenge(self, node_id: str, task_id: str, lease_id: str, challenge: dict[str, Any],
                  answer_within: float, commitment: bytes) -> dict[str, Any]:  # fmt: skip
        """Record the holder's commitment (its bytes kept in the same transaction) and the
        challenge drawn for it; the lease now ends at the answer's deadline. One commitment per
        lease: a second, other one is refused, and not kept (a node must not re-commit until a
        sample suits it); the same one again gets the same challenge."""
        now = time.time()
        with self._txn() as conn:
            row = self._held(conn, node_id, task_id, lease_id)
            if row.challenge is not None:
                held = json.loads(row.challenge)
                if held["commitment"] != challenge["commitment"]:
                    raise StateError(409, "this lease has a commitment already; its challenge stands")
                return dict(held)
            if self._keep(conn, commitment) != challenge["commitment"]:
                raise ValueError("the challenge names another commitment than the one kept")
            deadline = min(float(row.lease_deadline), now + answer_within)
            doc = {**challenge, "deadline": deadline}
            conn.execute(tasks.update().where(tasks.c.task_id == task_id).values(
                challenge=json.dumps(doc, sort_keys=True), lease_deadline=deadline, updated=now))  # fmt: skip
            return doc

    def verifying(self) -> list[Verifying]:
        with self._read() as conn:
            rows = conn.execute(sa.select(tasks).where(tasks.c.state == "verifying").order_by(tasks.c.updated)).all()
        return [Verifying(r.task_id, r.job_id, r.node_id, r.bundle, r.position, r.replica, _row_json(r.challenge, None))
                for r in rows]  # fmt: skip

    def decide(
        self, task_id: str, *, accepted: bool, verdict: dict[str, Any], outcome: str,
        finish: tuple[bytes, bytes] | None = None, ban: str | None = None, fail_job: str | None = None,
    ) -> None:  # fmt: skip
        """Record the verdict of a stored result: done (with ``finish``: the job's outputs and
        receipt, kept as blobs with the job done, in the same transaction), or pending again without that node
        (``ban``: the node excluded from the mesh, in the same transaction; ``fail_job``: the job
        itself fails, blamed on no node)."""
        now = time.time()
        with self._txn() as conn:
            row = conn.execute(self._locked(sa.select(tasks).where(tasks.c.task_id == task_id))).first()
            if row is None or row.state != "verifying":
                return
            if ban is not None:
                conn.execute(nodes.update().where(nodes.c.node_id == row.node_id).values(banned=ban[:300]))
            if fail_job is not None:
                history = [*json.loads(row.history), {"node_id": row.node_id, "outcome": outcome, "time": now}]
                conn.execute(tasks.update().where(tasks.c.task_id == task_id).values(
                    state="failed", verdict=json.dumps(verdict, sort_keys=True), history=json.dumps(history),
                    updated=now))  # fmt: skip
                conn.execute(jobs.update().where(jobs.c.job_id == row.job_id)
                             .values(state="failed", error=fail_job[:500], updated=now))  # fmt: skip
                return
            if accepted:
                history = [*json.loads(row.history), {"node_id": row.node_id, "outcome": outcome, "time": now}]
                conn.execute(tasks.update().where(tasks.c.task_id == task_id).values(
                    state="done", verdict=json.dumps(verdict, sort_keys=True), history=json.dumps(history), updated=now
                ))  # fmt: skip
                if finish is not None:
                    outputs, receipt = self._keep(conn, finish[0]), self._keep(conn, finish[1])
                    conn.execute(jobs.update().where(jobs.c.job_id == row.job_id, jobs.c.state == "open")
                                 .values(state="done", outputs=outputs, receipt=receipt, updated=now))  # fmt: skip
            else:
                self._free(conn, row, outcome, now, verdict)

    def decide_replicas(self, job_id: str, decisions: Sequence[Decision], finish: tuple[bytes, bytes] | None) -> None:
        """A quorum's decision over a job's replicas, in one transaction: each replica's outcome
        (only those still done or verifying: a repeat after a crash changes nothing), and with
        ``finish`` the job done with those outputs and receipt."""
        now = time.time()
        with self._txn() as conn:
            rows = {r.task_id: r for r in conn.execute(self._locked(sa.select(tasks).where(tasks.c.job_id == job_id)))}
            for decision in decisions:
                row = rows.get(decision.task_id)
                if row is None or row.state not in ("done", "verifying"):
                    continue
                if decision.ban is not None:
                    conn.execute(nodes.update().where(nodes.c.node_id == row.node_id).values(banned=decision.ban[:300]))
                if decision.action == "redo":
                    self._free(conn, row, decision.outcome, now, decision.verdict)
                    continue
                history = [*json.loads(row.history), {"node_id": row.node_id, "outcome": decision.outcome, "time": now}]
                conn.execute(tasks.update().where(tasks.c.task_id == row.task_id).values(
                    state="done" if decision.action == "done" else "rejected", updated=now,
                    verdict=json.dumps(decision.verdict, sort_keys=True), history=json.dumps(history)))  # fmt: skip
            if finish is not None:
                outputs, receipt = self._keep(conn, finish[0]), self._keep(conn, finish[1])
                conn.execute(jobs.update().where(jobs.c.job_id == job_id, jobs.c.state == "open")
                             .values(state="done", outputs=outputs, receipt=receipt, updated=now))  # fmt: skip

    def release(self, node_id: str, task_id: str, lease_id: str, reason: str) -> None:
        """A node gives back a task it cannot run (it is not offered that task again)."""
        now = time.time()
        with self._txn() as conn:
            row = conn.execute(self._locked(sa.select(tasks).where(tasks.c.task_id == task_id))).first()
            if row is None or row.node_id != node_id or row.lease_id != lease_id or row.state != "leased":
                raise StateError(409, "this task is not leased to you")
            if row.challenge is not None:  # given back after seeing the challenge: as if unanswered
                self._missed(conn, node_id, f"given back after its challenge: {reason}")
            self._free(conn, row, f"released by the node: {reason}"[:300], now)

    def counts(self) -> dict[str, int]:
        with self._read() as conn:
            rows = conn.execute(sa.select(tasks.c.state, sa.func.count()).group_by(tasks.c.state)).all()
        return {str(r[0]): int(r[1]) for r in rows}

    def task_job(self, task_id: str) -> str | None:
        with self._read() as conn:
            row = conn.execute(sa.select(tasks.c.job_id).where(tasks.c.task_id == task_id)).first()
        return None if row is None else str(row.job_id)
