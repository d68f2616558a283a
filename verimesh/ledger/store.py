"""The tamper-evident event log (docs/design.md §6, docs/format.md §10): SQLAlchemy Core storage,
an RFC 9162 Merkle tree, and a signature by its writer on every transaction.

Every event is one canonical-JSON entry; entry ``seq`` is leaf ``seq`` of an RFC 9162 tree over
the entries' bytes. The hashes of all perfect subtrees are stored (table ``tree_nodes``: level l,
index i covers leaves [i*2^l, (i+1)*2^l)), so a root, an inclusion proof or a consistency proof
needs O(log n) hashes fetched in one query.

Entry 0 is the genesis: the ledger's id, the operator's public key and every setting. Each write
transaction ends with a ``commit`` entry: its writer's signature (the operator, or a verifier the
operator registered through the log) over the tree head and the first entry of the batch. So an
entry nobody authorized, a setting edited in ``ledger_meta`` (a cache of the log) or history
rewritten with another key shows in ``ledger verify``; ``--operator-key`` or a saved checkpoint
anchors that check outside the database.

Appends run in one write transaction each (SQLite: WAL, ``BEGIN IMMEDIATE``, synchronous FULL;
PostgreSQL: a table lock), so concurrent writers serialize and a crash loses nothing that was
committed. Reputation is never stored: ``verimesh.ledger.reputation`` derives it from the events.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy import event as sa_event

from verimesh.core import merkle
from verimesh.core.canonical import b64decode_strict, b64encode, canonical_json, parse_json
from verimesh.core.digest import format_digest, parse_digest, sha256_bytes
from verimesh.core.memo import Memo
from verimesh.errors import BackendUnavailableError, ConfigurationError, IntegrityError, InvalidInputError
from verimesh.ledger.events import (
    DEFAULT_SETTINGS,
    FORMAT,
    KINDS,
    MAX_CLOCK_SKEW_SECONDS,
    OPERATOR_KINDS,
    REQUEST_KINDS,
    VERSION,
    claim_of,
    commit_statement,
    decode_entry,
    encode_entry,
    governance_digest,
    is_time,
    job_id_of,
    meta_for,
    node_of,
    now,
    parse_setting,
    settings_problem,
    shape_problem,
    time_plus,
)
from verimesh.signing.keys import PublicKey, SecretKey, node_id_for

# Leaves proven included under a checkpoint's root, in this process (``LedgerView._check_included``).
_INCLUDED = Memo()

CHECKPOINT_TYPE = "verimesh/checkpoint"
GOVERNANCE_KINDS = frozenset({"genesis", "settings", "verifier-add", "verifier-remove"})
READ_ONLY = "verimesh_read_only"  # a connection execution option: reads only, a snapshot
MAX_BODY_BYTES = 1024 * 1024
MAX_EVIDENCE_BYTES = 256 * 1024 * 1024

metadata = sa.MetaData()
meta_table = sa.Table(
    "ledger_meta",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)
entries_table = sa.Table(
    "ledger_entries",
    metadata,
    # On SQLite an INTEGER PRIMARY KEY is the rowid: it can only hold integers.
    sa.Column("seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=False),
    sa.Column("kind", sa.String(16), nullable=False, index=True),
    sa.Column("node_id", sa.String(64), nullable=True, index=True),
    sa.Column("job_id", sa.String(71), nullable=True, index=True),
    # What the event takes once (events.claim_of): unique, so two writers racing for one reward
    # or one slash cannot both commit. Derived from the body; `ledger verify` checks it.
    sa.Column("claim", sa.String(255), nullable=True, unique=True),
    sa.Column("body", sa.LargeBinary, nullable=False),
)
nodes_table = sa.Table(
    "ledger_tree_nodes",
    metadata,
    sa.Column("level", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("idx", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("hash", sa.LargeBinary(32), nullable=False),
)
# Evidence a slash cites, by the SHA-256 of its bytes, so `ledger verify --rules` can re-check it.
evidence_table = sa.Table(
    "ledger_evidence",
    metadata,
    sa.Column("digest", sa.String(71), primary_key=True),
    sa.Column("body", sa.LargeBinary, nullable=False),
)


# SQLite engines -> the lock their writing threads queue on (``writing``).
_WRITE_GATES: weakref.WeakKeyDictionary[sa.Engine, threading.Lock] = weakref.WeakKeyDictionary()
_WRITING = threading.local()  # .engines: ids of the engines this thread is writing on
_BUSY_TIMEOUT_MS = 60000


@contextmanager
def writing(engine: sa.Engine) -> Iterator[sa.Connection]:
    """One write transaction on ``engine`` (``engine.begin()``). On SQLite the threads of one
    process queue for the database's write lock here, each woken the moment the one before it
    is done, and only the first asks SQLite for it (``_begin_immediate``): under SQLite's own
    busy handler a waiting writer sleeps in growing steps (up to 100 ms a try) and kept
    sleeping long after the lock came free (measured on the mesh bench: a lease waited 111 ms
    on average for a lock held 43% of the time)."""
    gate = _WRITE_GATES.get(engine)
    if gate is None:
        with engine.begin() as conn:
            yield conn
        return
    held: set[int] = _WRITING.__dict__.setdefault("engines", set())
    if id(engine) in held:  # SQLite's write lock is this thread's already: it would wait for itself
        raise RuntimeError("a write transaction inside another on the same database and thread")
    with gate:
        held.add(id(engine))
        try:
            with engine.begin() as conn:
                yield conn
        finally:
            held.discard(id(engine))


def _begin_immediate(conn: sa.Connection) -> None:
    """``BEGIN IMMEDIATE``, asked again every 0.2-2 ms while another process holds the write lock
    (for up to the busy timeout; then once more under SQLite's own handler, whose error the
    caller reports)."""
    raw = conn.connection.dbapi_connection
    assert raw is not None
    deadline = time.monotonic() + _BUSY_TIMEOUT_MS / 1e3
    delay = 0.0002
    raw.execute("PRAGMA busy_timeout = 0")
    try:
        while True:
            try:
                raw.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.Error as exc:  # any other error is asked again below, for SQLAlchemy to report
                if not isinstance(exc, sqlite3.OperationalError) or time.monotonic() > deadline \
                        or ("locked" not in str(exc) and "busy" not in str(exc)):  # fmt: skip
                    break
            time.sleep(delay)
            delay = min(delay * 1.5, 0.002)
    finally:
        raw.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def normalize_url(url: str) -> str:
    """A SQLAlchemy URL; a bare path means a SQLite file."""
    if "://" in url:
        return url
    return "sqlite:///" + str(Path(url).resolve())


def _driver_reason(exc: sa.exc.SQLAlchemyError) -> str:
    """The driver's own first line (no server, refused, no such database), not the SQL after it."""
    why = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {why[0][:300] if why else 'no detail'}"


def display_url(url: str) -> str:
    """The URL for messages and output: a password in it is never shown."""
    try:
        return sa.engine.make_url(normalize_url(url)).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "<unparsable ledger URL>"


def tampered(problem: str) -> IntegrityError:
    """What a read used for a decision raises on a ledger that does not verify."""
    return IntegrityError(
        f"the ledger does not verify: {problem}",
        code="ledger-tampered",
        hint="nothing was decided or written; run `verimesh ledger verify` to see every problem",
    )


@dataclass(frozen=True)
class Entry:
    seq: int
    kind: str
    node_id: str | None
    body: bytes
    job_id: str | None = None
    claim: str | None = None

    @property
    def event(self) -> dict[str, Any]:
        doc = decode_entry(self.body, what=f"ledger entry {self.seq}", max_bytes=MAX_BODY_BYTES)
        if not isinstance(doc, dict):
            raise InvalidInputError(f"ledger entry {self.seq} is not an object")
        return doc

    @property
    def leaf_hash(self) -> bytes:
        return merkle.leaf_hash(self.body)

    def row_problem(self, event: Mapping[str, Any]) -> str | None:
        """The stored columns must be what the body says: else the entry was moved or edited."""
        if (
            event.get("seq") != self.seq
            or event.get("kind") != self.kind
            or node_of(event) != self.node_id
            or job_id_of(event) != self.job_id
            or claim_of(event) != self.claim
        ):
            return f"entry {self.seq} does not match its own body (moved, reordered or edited)"
        return None


@dataclass(frozen=True)
class Genesis:
    """Entry 0: who the operator is and the settings the ledger started with."""

    ledger_id: str
    operator: PublicKey
    settings: dict[str, Any]
    event: dict[str, Any]

    @classmethod
    def from_event(cls, event: Mapping[str, Any]) -> Genesis:
        problem = shape_problem(event)
        if event.get("kind") != "genesis" or problem:
            raise InvalidInputError(f"entry 0 is not a genesis entry ({problem or event.get('kind')})")
        op = event["operator"]
        operator = PublicKey(bytes.fromhex(op["public_key"]), bytes.fromhex(op["proof_of_possession"]))
        return cls(str(event["ledger_id"]), operator, dict(event["settings"]), dict(event))


@dataclass(frozen=True)
class Checkpoint:
    """A signed tree head: the operator's signature over the canonical statement of (size, root)
    and, from version 2 on, ``governance``: the digest of the writers and settings in force at that
    size (``events.governance_digest``), so that no decision depends on how governance rows before
    it are labelled in the database."""

    ledger_id: str
    tree_size: int
    root: bytes
    time: str
    signature: bytes
    governance: str | None = None  # None: a version 1 checkpoint (verimesh 0.3)

    @property
    def version(self) -> int:
        return 1 if self.governance is None else 2

    def _members(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "type": CHECKPOINT_TYPE,
            "version": self.version,
            "ledger_id": self.ledger_id,
            "tree_size": self.tree_size,
            "root": format_digest(self.root),
            "time": self.time,
        }
        if self.governance is not None:
            doc["governance"] = self.governance
        return doc

    def statement(self) -> bytes:
        return canonical_json(self._members())

    def verify(self, operator: PublicKey) -> bool:
        return operator.verify(self.statement(), self.signature)

    def to_json(self) -> dict[str, Any]:
        return {**self._members(), "signature": b64encode(self.signature)}

    @classmethod
    def from_json(
        cls, doc: Any, *, what: str = "checkpoint", extra_keys: frozenset[str] = frozenset({"kind", "seq"})
    ) -> Checkpoint:
        """``extra_keys``: what a checkpoint entry of the ledger adds; a checkpoint file has none."""
        keys = {"type", "version", "ledger_id", "tree_size", "root", "time", "signature"}
        if isinstance(doc, dict) and doc.get("version") == 2 and not isinstance(doc.get("version"), bool):
            keys.add("governance")
        if not isinstance(doc, dict) or set(doc) - extra_keys != keys or doc["type"] != CHECKPOINT_TYPE:
            raise InvalidInputError(f"{what} is not a verimesh checkpoint")
        if doc["version"] not in (1, 2) or isinstance(doc["version"], bool):  # the signed statement says it
            raise InvalidInputError(f"{what} has unsupported version {doc['version']!r:.40}")
        size = doc["tree_size"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or not isinstance(doc["ledger_id"], str):
            raise InvalidInputError(f"{what} has a bad tree size or ledger id")
        if not isinstance(doc["time"], str):
            raise InvalidInputError(f"{what} has a bad time")
        governance = doc.get("governance")
        if governance is not None:
            parse_digest(governance, what=f"{what} governance")
        return cls(
            doc["ledger_id"],
            doc["tree_size"],
            parse_digest(doc["root"], what=f"{what} root"),
            str(doc["time"]),
            b64decode_strict(doc["signature"], what=f"{what} signature"),
            None if governance is None else str(governance),
        )

    @classmethod
    def from_file(cls, path: Path) -> Checkpoint:
        from verimesh.core.files import read_user_file

        doc = parse_json(read_user_file(path, what="checkpoint", max_bytes=65536), what=str(path))
        return cls.from_json(doc, what=f"checkpoint {path}", extra_keys=frozenset())


def _as_bytes(value: Any) -> bytes:
    """Column values as stored; a row edited behind our back may hold another type."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return str(value).encode("utf-8", "surrogateescape")


def _node_key(row: Any) -> tuple[int, int]:
    """A stored tree node's (level, idx). SQLite keeps whatever an editor writes in a column, so
    text or a fraction there is a damaged ledger (exit 3), never a crash."""
    level, idx = row.level, row.idx
    if type(level) is not int or type(idx) is not int or level < 0 or idx < 0:
        raise tampered(f"stored tree node key ({level!r:.40}, {idx!r:.40}) is malformed (edited)")
    return level, idx


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) or value is None else str(value)


def _rows_digests(conn: sa.Connection, counts: Sequence[int]) -> list[bytes]:
    """For each count n, a SHA-256 over what the whole-log check reads of entries 0..n-1 as
    stored: those rows, the tree nodes over them alone, and every evidence row; each column's
    value tagged and length-prefixed (``checkpoint``). One pass over the rows for all of them."""
    hashes = [hashlib.sha256() for _ in counts]

    def feed(row: Any, into: Sequence[Any]) -> None:
        for value in row:
            if value is None:
                tag, data = b"N", b""
            elif isinstance(value, (bytes, memoryview)):
                tag, data = b"B", bytes(value)
            else:
                tag, data = b"S" if isinstance(value, str) else b"V", str(value).encode("utf-8", "surrogateescape")
            for h in into:
                h.update(tag + len(data).to_bytes(8, "big"))
                h.update(data)

    entries = sa.select(entries_table).where(entries_table.c.seq < max(counts)).order_by(entries_table.c.seq)
    for row in conn.execute(entries.execution_options(yield_per=10_000)):
        feed(row, [h for h, n in zip(hashes, counts, strict=True) if row.seq < n])
    for h in hashes:
        h.update(b"\x00nodes")
    nodes = sa.select(nodes_table).order_by(nodes_table.c.level, nodes_table.c.idx)
    for row in conn.execute(nodes.execution_options(yield_per=50_000)):
        # a node wholly over entries 0..n-1 (or one whose key is not a count at all)
        odd = not isinstance(row.level, int) or not isinstance(row.idx, int) or row.level < 0 or row.idx < 0
        end = 0 if odd else (row.idx + 1) << min(row.level, 64)
        feed(row, [h for h, n in zip(hashes, counts, strict=True) if end <= n])
    for h in hashes:
        h.update(b"\x00evidence")
    for row in conn.execute(
        sa.select(evidence_table).order_by(evidence_table.c.digest).execution_options(yield_per=64)
    ):
        feed(row, hashes)
    return [h.digest() for h in hashes]


def _entry(row: Any) -> Entry:
    return Entry(
        int(row.seq), str(row.kind), _text(row.node_id), _as_bytes(row.body), _text(row.job_id), _text(row.claim)
    )


def _refuse_v1(meta: Mapping[str, str], target: str) -> None:
    if meta.get("format") == FORMAT and meta.get("version") == "1":
        raise InvalidInputError(
            f"{target} is a version 1 ledger (verimesh 0.2): its entries are not signed by their writers and its "
            "registrations carry no request signed by the node, so they cannot be carried over",
            code="ledger-v1",
            hint="keep it read-only as a record (verimesh 0.2 reads it) and start a version 2 ledger with "
            "`verimesh ledger init`; nodes register again with a signed request",
        )
    if meta.get("format") != FORMAT or meta.get("version") != str(VERSION):
        raise InvalidInputError(f"{target} is not a verimesh ledger (format {meta.get('format')!r:.60})")


class Ledger:
    """One ledger database. Open with ``Ledger.open(url)``; create with ``Ledger.create``.

    ``meta`` is the ``ledger_meta`` cache as read at open; decisions read the log itself
    (``view``), and ``ledger verify`` checks the cache against it."""

    def __init__(self, engine: sa.Engine, meta: Mapping[str, str], url: str) -> None:
        self.engine = engine
        self.meta = dict(meta)
        self.url = url
        try:
            self.operator = PublicKey(bytes.fromhex(meta["operator_public_key"]), bytes.fromhex(meta["operator_pop"]))
        except (KeyError, ValueError, InvalidInputError) as exc:
            raise InvalidInputError(f"{display_url(url)}: the ledger's operator key is unreadable") from exc
        self.ledger_id = meta.get("ledger_id", "")
        # (n, digest): entries 0..n-1, byte for byte as this process last checked them whole before
        # signing a checkpoint over them (``checkpoint``). Memory only: another process, or a
        # restart, checks the whole log again first.
        self._checked_rows: tuple[int, bytes] | None = None
        # The last checked view's walk of the log since its checkpoint (``LedgerView.build``): the
        # next view walks only what was appended since, once the rows it walked read the same.
        self._tail: _Tail | None = None
        self._tail_lock = threading.Lock()
        self.tail_stats = {"extended": 0, "walked": 0}

    # -- opening ---------------------------------------------------------------------------------

    @staticmethod
    def _engine(url: str) -> sa.Engine:
        url = normalize_url(url)
        try:
            engine = sa.create_engine(url, future=True)
        except (sa.exc.NoSuchModuleError, ImportError) as exc:  # mysql://, an uninstalled driver
            raise BackendUnavailableError(
                f"cannot use ledger URL {display_url(url)}: {exc}",
                hint="install its driver, or use a sqlite:/// or postgresql+psycopg:// ledger",
            ) from exc
        except sa.exc.ArgumentError as exc:
            raise ConfigurationError(f"cannot use ledger URL {display_url(url)}: {exc}") from exc
        if engine.dialect.name == "sqlite":

            @sa_event.listens_for(engine, "connect")
            def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
                dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
                # A row edited behind our back may hold text that is not UTF-8: read it without
                # raising, keeping every byte (verify then reports the entry instead of crashing).
                dbapi_conn.text_factory = lambda raw: raw.decode("utf-8", "surrogateescape")
                cur = dbapi_conn.cursor()
                cur.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
                cur.execute("PRAGMA journal_mode = WAL")
                cur.execute("PRAGMA synchronous = FULL")
                cur.close()

            @sa_event.listens_for(engine, "begin")
            def _sqlite_begin(conn: sa.Connection) -> None:
                # Writers: one at a time, no lock upgrades. Readers: a snapshot (WAL), never waiting.
                if conn.get_execution_options().get(READ_ONLY, False):
                    conn.exec_driver_sql("BEGIN DEFERRED")
                else:
                    _begin_immediate(conn)

            _WRITE_GATES[engine] = threading.Lock()
        return engine

    @classmethod
    def create(
        cls,
        url: str,
        operator: SecretKey,
        *,
        operator_key_path: Path | None = None,
        settings: Mapping[str, Any] | None = None,
        ledger_id: str | None = None,
    ) -> Ledger:
        """A new ledger whose genesis (entry 0, signed by ``operator``) holds its id and settings."""
        values = dict(DEFAULT_SETTINGS)
        for name, value in (settings or {}).items():
            values[name] = parse_setting(name, value) if isinstance(value, str) else value
        if operator_key_path is not None:
            values["operator_key_path"] = str(operator_key_path.resolve())
        problem = settings_problem(values, complete=True)
        if problem:
            raise InvalidInputError(f"cannot create the ledger: {problem}")
        genesis = {
            "kind": "genesis",
            "format": FORMAT,
            "version": VERSION,
            "ledger_id": ledger_id or "ledger-" + secrets.token_hex(8),
            "operator": {
                "public_key": operator.public.key.hex(),
                "proof_of_possession": operator.public.proof_of_possession.hex(),
            },
            "settings": values,
        }
        engine = cls._engine(url)
        meta = meta_for(genesis, values)
        try:
            with writing(engine) as conn:
                if sa.inspect(conn).has_table("ledger_meta"):
                    raise InvalidInputError(f"a ledger already exists at {display_url(url)}")
                metadata.create_all(conn)
                conn.execute(meta_table.insert(), [{"key": k, "value": v} for k, v in meta.items()])
                ledger = cls(engine, meta, url)
                txn = Transaction(ledger, conn, operator, authorized=True)
                txn.append(genesis)
                txn.finish()
        except sa.exc.SQLAlchemyError as exc:
            raise InvalidInputError(f"cannot create ledger at {display_url(url)}: {_driver_reason(exc)}") from exc
        return ledger

    @classmethod
    def open(cls, url: str) -> Ledger:
        path, target = normalize_url(url), display_url(url)
        if path.startswith("sqlite:///") and not Path(path[len("sqlite:///") :]).exists():
            raise InvalidInputError(f"no ledger at {target}", hint="create one with `verimesh ledger init`")
        engine = cls._engine(url)
        try:
            with engine.connect() as conn:
                conn.execution_options(**{READ_ONLY: True})
                if not sa.inspect(conn).has_table("ledger_meta"):
                    raise InvalidInputError(f"{target} is not a verimesh ledger")
                meta = {str(r.key): str(r.value) for r in conn.execute(sa.select(meta_table))}
        except sa.exc.SQLAlchemyError as exc:
            raise InvalidInputError(f"cannot open ledger {target}: {_driver_reason(exc)}") from exc
        _refuse_v1(meta, target)
        return cls(engine, meta, url)

    @contextmanager
    def reading(self) -> Iterator[sa.Connection]:
        """A connection for reads only: on SQLite a snapshot that neither waits for nor blocks writers."""
        with self.engine.connect() as conn:
            conn.execution_options(**{READ_ONLY: True})
            yield conn

    def setting(self, key: str) -> Any:
        """A setting as the ``ledger_meta`` cache has it (display only: decisions use ``view()``)."""
        import json

        raw = self.meta.get(f"setting.{key}")
        return DEFAULT_SETTINGS[key] if raw is None else json.loads(raw)

    # -- writing ---------------------------------------------------------------------------------

    @contextmanager
    def transaction(self, writer: SecretKey) -> Iterator[Transaction]:
        """One write transaction: the writer lock is held, appends are atomic together, and the
        batch ends with ``writer``'s signed commit. ``writer`` must be the operator or a verifier
        registered in the log."""
        try:
            with writing(self.engine) as conn:
                if self.engine.dialect.name == "postgresql":
                    conn.exec_driver_sql("LOCK TABLE ledger_entries IN SHARE ROW EXCLUSIVE MODE")
                txn = Transaction(self, conn, writer)
                yield txn
                txn.finish()
        except sa.exc.IntegrityError as exc:  # the unique claim column: someone else took it first
            raise InvalidInputError(
                f"ledger write refused: {_driver_reason(exc)}",
                code="claim-taken",
                hint="another writer recorded the same claim first; nothing was written",
            ) from exc
        except sa.exc.OperationalError as exc:
            raise InvalidInputError(f"ledger write failed: {exc.orig}") from exc

    def append(self, events: Sequence[Mapping[str, Any]], *, writer: SecretKey) -> list[int]:
        with self.transaction(writer) as txn:
            return [txn.append(e) for e in events]

    def store_evidence(self, conn: sa.Connection, body: bytes) -> str:
        """Keep evidence bytes by digest (inside the caller's transaction); returns the digest."""
        digest = sha256_bytes(body)
        exists = conn.execute(sa.select(evidence_table.c.digest).where(evidence_table.c.digest == digest)).first()
        if exists is None:
            conn.execute(evidence_table.insert(), [{"digest": digest, "body": body}])
        return digest

    def evidence(self, digest: str, conn: sa.Connection | None = None) -> bytes | None:
        def q(c: sa.Connection) -> bytes | None:
            row = c.execute(sa.select(evidence_table.c.body).where(evidence_table.c.digest == digest)).first()
            return None if row is None else _as_bytes(row.body)

        if conn is not None:
            return q(conn)
        with self.reading() as c:
            return q(c)

    # -- reading ---------------------------------------------------------------------------------

    def size(self, conn: sa.Connection | None = None) -> int:
        def q(c: sa.Connection) -> int:
            value = c.execute(sa.select(sa.func.max(entries_table.c.seq))).scalar()
            return 0 if value is None else int(value) + 1

        if conn is not None:
            return q(conn)
        with self.reading() as c:
            return q(c)

    def entry(self, seq: int, conn: sa.Connection | None = None) -> Entry:
        def q(c: sa.Connection) -> Any:
            return c.execute(sa.select(entries_table).where(entries_table.c.seq == seq)).first()

        if conn is not None:
            row = q(conn)
        else:
            with self.reading() as c:
                row = q(c)
        if row is None:
            raise InvalidInputError(f"ledger has no entry {seq}")
        return _entry(row)

    def _query(
        self,
        *,
        node_id: str | None = None,
        kinds: Sequence[str] | None = None,
        job_id: str | None = None,
        claim: str | None = None,
        since: int | None = None,
    ) -> sa.Select[Any]:
        query = sa.select(entries_table).order_by(entries_table.c.seq)
        if node_id is not None:
            query = query.where(entries_table.c.node_id == node_id)
        if kinds:
            query = query.where(entries_table.c.kind.in_(list(kinds)))
        if job_id is not None:
            query = query.where(entries_table.c.job_id == job_id)
        if claim is not None:
            query = query.where(entries_table.c.claim == claim)
        if since is not None:
            query = query.where(entries_table.c.seq >= since)
        return query

    def entries(
        self,
        *,
        node_id: str | None = None,
        kinds: Sequence[str] | None = None,
        job_id: str | None = None,
        conn: sa.Connection | None = None,
        since: int | None = None,
    ) -> Iterator[Entry]:
        """Entries as stored, unchecked (``view()`` checks what it returns)."""
        query = self._query(node_id=node_id, kinds=kinds, job_id=job_id, since=since)
        query = query.execution_options(yield_per=10_000)
        if conn is not None:
            for row in conn.execute(query):
                yield _entry(row)
            return
        with self.reading() as c:
            for row in c.execute(query):
                yield _entry(row)

    def _fetch_nodes(self, keys: set[tuple[int, int]], conn: sa.Connection) -> dict[tuple[int, int], bytes]:
        """Stored hashes of perfect subtrees (level, idx), in one indexed query per 400 keys."""
        found: dict[tuple[int, int], bytes] = {}
        wanted = sorted(keys)
        for at in range(0, len(wanted), 400):
            by_level: dict[int, list[int]] = {}
            for level, idx in wanted[at : at + 400]:
                by_level.setdefault(level, []).append(idx)
            # One OR term per level: SQLite searches the primary key for each (a row-value IN scans).
            where = sa.or_(
                *(sa.and_(nodes_table.c.level == lv, nodes_table.c.idx.in_(ix)) for lv, ix in by_level.items())
            )
            for row in conn.execute(sa.select(nodes_table).where(where)):
                found[_node_key(row)] = _as_bytes(row.hash)
        return found

    def _range_hashes(self, ranges: Sequence[tuple[int, int]], conn: sa.Connection | None = None) -> list[bytes]:
        parts = [merkle.perfect_parts(a, b) for a, b in ranges]
        wanted = sorted({p for ps in parts for p in ps})
        found: dict[tuple[int, int], bytes] = {}
        if wanted:
            # An OR of (level, idx) equalities: SQLite answers it with one index seek per key
            # (MULTI-INDEX OR, 0.1 ms for a proof at 10^5 entries); a row-value IN scans the table.
            query = sa.select(nodes_table).where(
                sa.or_(*(sa.and_(nodes_table.c.level == lv, nodes_table.c.idx == i) for lv, i in wanted))
            )

            def fetch(c: sa.Connection) -> None:
                for row in c.execute(query):
                    found[_node_key(row)] = _as_bytes(row.hash)

            if conn is not None:
                fetch(conn)
            else:
                with self.reading() as c:
                    fetch(c)
        missing = [p for p in wanted if p not in found]
        if missing:
            raise InvalidInputError(f"ledger tree is missing stored hashes {missing[:3]} (damaged?)")
        return [merkle.fold_parts([found[p] for p in ps]) for ps in parts]

    def root(self, size: int | None = None) -> bytes:
        size = self.size() if size is None else size
        if size == 0:
            return merkle.EMPTY_ROOT
        return self._range_hashes([(0, size)])[0]

    def inclusion_proof(self, seq: int, size: int) -> list[bytes]:
        return self._range_hashes(merkle.inclusion_ranges(seq, size))

    def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        return self._range_hashes(merkle.consistency_ranges(old_size, new_size))

    @contextmanager
    def view(self) -> Iterator[LedgerView]:
        """The log checked from its last checkpoint on (``LedgerView.build``), read from one
        snapshot (SQLite WAL, PostgreSQL repeatable read); raises IntegrityError (exit 3) on a
        ledger that does not verify. Writes check under their own lock (``Transaction.view``)."""
        try:
            with self.reading() as conn, conn.begin():
                if self.engine.dialect.name == "postgresql":  # one snapshot for every read of the check
                    conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                yield LedgerView.build(self, conn)
        except sa.exc.OperationalError as exc:
            raise InvalidInputError(f"ledger read failed: {exc.orig}") from exc

    # -- checkpoints -----------------------------------------------------------------------------

    def operator_key(self, path: Path | None = None, *, passphrase: str | None = None) -> SecretKey:
        from verimesh.signing.keys import load_secret_key

        remembered = self.setting("operator_key_path")
        where = path or (Path(remembered) if remembered else None)
        if where is None:
            raise ConfigurationError("this ledger does not know its operator key", hint="pass --operator-key")
        key = load_secret_key(where, passphrase=passphrase)
        if key.public.key != self.operator.key:
            raise InvalidInputError(f"{where} is not this ledger's operator key")
        return key

    def checkpoint(self, key: SecretKey) -> Checkpoint:
        """Check the log, then sign the current tree head and log it.

        An operator never signs what it has not checked: a row nobody signed, an edited setting,
        a broken hash, or a row before the last checkpoint edited since (a relabelled kind would
        hide it from every query by kind), an edited tree node or evidence row makes this refuse
        (IntegrityError) instead of covering it. The whole store is checked, except that what
        this process checked whole before (and signed over) is compared byte for byte with what
        it was then (``_rows_digests``: those entries, the tree nodes over them, every evidence
        row): the same bytes need no second check, and any change (a slash's new evidence too)
        sends the check through the whole log. The view checks the rows since the last
        checkpoint, as every decision does."""
        with self.transaction(key) as txn:
            # The entries since the last checkpoint walked from the store again (the kept tail
            # answers what this process decides, not what the store holds now), the rest below
            # compared with what this process checked or walked whole.
            view = txn.view(kept=False)
            if key.public.key != view.genesis.operator.key:
                raise InvalidInputError("only the ledger operator's key can sign checkpoints")
            size = txn.size
            remembered = self._checked_rows
            unchanged = False
            if remembered is not None and remembered[0] >= view.anchor:
                # What lies before the view's anchor is what this process checked (and nobody edited).
                was, checked = _rows_digests(txn.conn, [remembered[0], size])
                unchanged = was == remembered[1]
            if not unchanged:
                report = _verify(self, txn.conn, checkpoint=None, operator=None, rules=None, progress=None)
                if not report.ok:
                    raise tampered(report.problems[0] if report.problems else "the log does not verify")
                (checked,) = _rows_digests(txn.conn, [size])
            root = txn.root()
            governance = governance_digest(view.verifiers, view.settings)
            cp = Checkpoint(view.genesis.ledger_id, size, root, txn.time, b"", governance)
            cp = Checkpoint(cp.ledger_id, size, root, cp.time, key.sign(cp.statement()), governance)
            txn.append({"kind": "checkpoint", **{k: v for k, v in cp.to_json().items()}})
        self._checked_rows = (size, checked)
        return cp

    def latest_checkpoint(self, covering: int = 0) -> Checkpoint | None:
        """The newest checkpoint entry, if it covers more than ``covering`` entries (checkpoints are
        appended in order, so a later one never covers fewer)."""
        for entry in self.last_entries(kinds=["checkpoint"], limit=1):
            cp = Checkpoint.from_json(entry.event, what=f"checkpoint entry {entry.seq}")
            return cp if cp.tree_size > covering else None
        return None

    def changed_nodes(self, since: int, kinds: Sequence[str]) -> set[str] | None:
        """The node ids of entries of ``kinds`` at ``since`` or later; None when a governance entry
        (settings, a writer added or removed) is among them. Read from the columns, unchecked: it
        says which standings to read again (in a checked view), never what they are."""
        query = sa.select(entries_table.c.kind, entries_table.c.node_id).where(entries_table.c.seq >= since)
        changed: set[str] = set()
        with self.reading() as c:
            for kind, node_id in c.execute(query):
                if kind in GOVERNANCE_KINDS:
                    return None
                if kind in kinds and node_id is not None:
                    changed.add(str(node_id))
        return changed

    def last_entries(self, *, kinds: Sequence[str], limit: int) -> list[Entry]:
        """The newest ``limit`` entries of these kinds, oldest first, as stored (unchecked)."""
        query = self._query(kinds=kinds).order_by(None).order_by(entries_table.c.seq.desc()).limit(limit)
        with self.reading() as c:
            return [_entry(row) for row in c.execute(query)][::-1]

    def change_settings(self, operator: SecretKey, changes: Mapping[str, Any]) -> int:
        """Log a settings change signed by the operator; ``ledger_meta`` follows in the same transaction."""
        values = {k: parse_setting(k, v) if isinstance(v, str) else v for k, v in changes.items()}
        with self.transaction(operator) as txn:
            view = txn.view()
            if operator.public.key != view.genesis.operator.key:
                raise InvalidInputError("only the ledger operator changes settings", code="not-operator")
            return txn.append({"kind": "settings", "changes": values})

    def add_verifier(self, operator: SecretKey, public: PublicKey) -> int:
        """Let ``public`` write to the ledger (verdicts, settlements, slashes), signed by the operator."""
        if not public.check_possession():
            raise InvalidInputError(f"verifier {public.node_id}: proof of possession does not verify", code="bad-pop")
        with self.transaction(operator) as txn:
            view = txn.view()
            if operator.public.key != view.genesis.operator.key:
                raise InvalidInputError("only the ledger operator adds verifiers", code="not-operator")
            if public.node_id in view.verifiers or public.key == view.genesis.operator.key:
                raise InvalidInputError(f"{public.node_id} may already write to this ledger", code="already-verifier")
            return txn.append(
                {
                    "kind": "verifier-add",
                    "node_id": public.node_id,
                    "public_key": public.key.hex(),
                    "proof_of_possession": public.proof_of_possession.hex(),
                }
            )

    def remove_verifier(self, operator: SecretKey, node_id: str) -> int:
        with self.transaction(operator) as txn:
            view = txn.view()
            if operator.public.key != view.genesis.operator.key:
                raise InvalidInputError("only the ledger operator removes verifiers", code="not-operator")
            if node_id not in view.verifiers:
                raise InvalidInputError(f"{node_id} is not a verifier of this ledger", code="unknown-verifier")
            return txn.append({"kind": "verifier-remove", "node_id": node_id})


class Transaction:
    """Appends inside one write transaction; the frontier (right edge of the tree) is kept in memory.
    ``finish`` appends the writer's signed commit over the batch and flushes."""

    def __init__(self, ledger: Ledger, conn: sa.Connection, writer: SecretKey, *, authorized: bool = False) -> None:
        self.ledger = ledger
        self.conn = conn
        self.writer = writer
        self.size = ledger.size(conn)
        self.first = self.size
        self.time = now()
        # Entry times never go backwards along the log: this batch is dated no earlier than the
        # last entry (a writer whose clock ran a little ahead wrote it), and never far ahead of ours.
        # (A last entry dated beyond the skew makes every append refuse, after the checked view has
        # had its say: `ledger verify --rules` names an entry dated in the future.)
        self._floor = self._last_time()
        self._horizon = time_plus(self.time, MAX_CLOCK_SKEW_SECONDS)
        if self.time < self._floor <= time_plus(self.time, MAX_CLOCK_SKEW_SECONDS):
            self.time = self._floor
        if not authorized:
            self._authorize()
        self._edge: list[tuple[int, int, bytes]] | None = None  # the tree's right edge (``_frontier``)
        self._entries: list[dict[str, Any]] = []
        self._nodes: list[dict[str, Any]] = []
        self._settings: dict[str, Any] = {}
        self._view: LedgerView | None = None
        self._finished = False
        self.commit_seq: int | None = None

    def _authorize(self) -> None:
        """The writer is the operator, or a verifier whose latest verifier event in the log adds it."""
        key = self.writer.public.key
        if key == self.ledger.operator.key:
            return
        latest = None
        for entry in self.ledger.entries(
            node_id=self.writer.node_id, kinds=["verifier-add", "verifier-remove"], conn=self.conn
        ):
            latest = entry
        if latest is not None and latest.kind == "verifier-add":
            event = latest.event
            if event.get("public_key") == key.hex():
                return
        raise InvalidInputError(
            f"{self.writer.node_id} may not write to this ledger",
            code="writer-not-registered",
            hint="the operator registers verifiers with `verimesh ledger verifier add`",
        )

    def _last_time(self) -> str:
        """The time of the log's last entry ('' for an empty log, or one whose last body does not
        parse: the checked view refuses that ledger before anything is written)."""
        if self.size == 0:
            return ""
        try:
            stamp = self.ledger.entry(self.size - 1, self.conn).event.get("time")
        except InvalidInputError:
            return ""
        return str(stamp) if is_time(stamp) else ""

    def not_before(self, stamp: str) -> None:
        """Date this batch's entries no earlier than ``stamp`` (the time of a signed request it
        carries): a request signed on a clock a little ahead is appended at its own time; one dated
        more than the skew ahead of this machine's clock is refused."""
        if not is_time(stamp) or stamp <= self.time:
            return
        if stamp > time_plus(now(), MAX_CLOCK_SKEW_SECONDS):
            raise InvalidInputError(
                f"the request is dated {stamp}, more than {MAX_CLOCK_SKEW_SECONDS} s after this machine's clock",
                code="request-in-future",
                hint="the party signs a new request once its clock is right",
            )
        self.time = stamp

    def _time_problem(self, stamped: Mapping[str, Any]) -> str | None:
        """Why ``stamped`` may not be appended at its time; None when it may.

        1. Not earlier than the entry before it (times never go backwards along the log).
        2. Not more than the skew ahead of this machine's clock.
        3. Not earlier than the signed request it carries.
        4. A withdrawal is released after exactly ``unbonding_seconds`` after its time; a release
           comes at or after the withdrawal's release_after."""
        stamp = stamped["time"]
        # 1.
        if stamp < self._floor:
            return f"it is dated {stamp}, before the entry before it ({self._floor}): entry times never go backwards"
        # 2. (The clock is read again only when the cached horizon is passed: appends stay cheap.)
        if stamp > self._horizon:
            self._horizon = time_plus(now(), MAX_CLOCK_SKEW_SECONDS)
        if stamp > self._horizon:
            return f"it is dated {stamp}, more than {MAX_CLOCK_SKEW_SECONDS} s after this machine's clock"
        kind = stamped["kind"]
        # 3.
        if kind in REQUEST_KINDS and str(stamped["request"].get("time")) > stamp:
            return f"it is dated {stamp}, before the request it carries ({stamped['request'].get('time')})"
        # 4.
        if kind == "withdraw":
            # The view's settings (checked) when the caller built one, else the ledger_meta cache
            # (which every checked view compares with the log).
            settings = self._view.settings if self._view is not None else {"unbonding_seconds": self.ledger.setting(
                "unbonding_seconds")}  # fmt: skip
            delay = int({**settings, **self._settings}["unbonding_seconds"])
            if stamped["release_after"] != time_plus(stamp, delay):
                return f"its release_after is not its time + unbonding_seconds ({time_plus(stamp, delay)})"
        if kind == "release":
            self.flush()
            try:
                withdrawal = self.ledger.entry(int(stamped["withdrawal"]), self.conn).event
            except InvalidInputError:
                withdrawal = {}
            if withdrawal.get("kind") != "withdraw" or withdrawal.get("node_id") != stamped["node_id"]:
                return f"entry {stamped['withdrawal']} is not a withdrawal of {stamped['node_id']}"
            if stamp < str(withdrawal.get("release_after")):
                return f"it is dated {stamp}, before the withdrawal's release_after ({withdrawal.get('release_after')})"
        return None

    @property
    def operator(self) -> bool:
        return self.writer.public.key == self.ledger.operator.key

    def view(self, *, kept: bool = True) -> LedgerView:
        """The log checked from its last checkpoint on, read under this transaction's lock
        (``kept``: ``LedgerView.build``)."""
        if self._view is None:
            if self._entries or self.size != self.first:
                raise RuntimeError("Transaction.view() must come before the first append")
            self._view = LedgerView.build(self.ledger, self.conn, kept=kept)
            # The tree this batch extends is the one the view checked (not the stored nodes, which
            # the view compared once and anyone with the database could edit since).
            self._edge = list(self._view.frontier)
        return self._view

    def append(self, event: Mapping[str, Any]) -> int:
        if self._finished:
            raise RuntimeError("this transaction is finished")
        kind = event.get("kind")
        if kind not in KINDS or kind == "commit" or (kind == "genesis" and self.size != 0):
            raise InvalidInputError(f"ledger event kind {kind!r:.40} cannot be appended")
        if kind in OPERATOR_KINDS and not self.operator:
            raise InvalidInputError(f"only the ledger operator writes {kind} entries", code="not-operator")
        return self._append(event)

    def _append(self, event: Mapping[str, Any]) -> int:
        seq = self.size
        request = event.get("request")
        if event.get("kind") in REQUEST_KINDS and isinstance(request, dict) and isinstance(request.get("time"), str):
            self.not_before(request["time"])  # never dated before the request it carries
        stamped = {**event, "seq": seq, "time": event["time"] if event.get("kind") == "checkpoint" else self.time}
        problem = shape_problem(stamped)
        if problem:
            raise InvalidInputError(f"malformed ledger event: {problem}")
        problem = self._time_problem(stamped)
        if problem:
            raise InvalidInputError(
                f"ledger event {stamped['kind']} refused: {problem}",
                code="bad-entry-time",
                hint="entries are dated by the appending writer's clock, in log order",
            )
        body = encode_entry(stamped)
        if len(body) > MAX_BODY_BYTES:
            raise InvalidInputError(f"ledger event of {len(body)} bytes is over the limit")
        self._entries.append(
            {
                "seq": seq,
                "kind": stamped["kind"],
                "node_id": node_of(stamped),
                "job_id": job_id_of(stamped),
                "claim": claim_of(stamped),
                "body": body,
            }
        )
        if stamped["kind"] == "settings":
            self._settings.update(stamped["changes"])
        level, idx, h = 0, seq, merkle.leaf_hash(body)
        self._nodes.append({"level": 0, "idx": seq, "hash": h})
        frontier = self._frontier()
        while frontier and frontier[-1][0] == level:
            _, _, left = frontier.pop()
            level, idx, h = level + 1, idx >> 1, merkle.node_hash(left, h)
            self._nodes.append({"level": level, "idx": idx, "hash": h})
        frontier.append((level, idx, h))
        self.size += 1
        self._floor = stamped["time"]
        return seq

    def _frontier(self) -> list[tuple[int, int, bytes]]:
        """The right edge of the tree this batch extends: the checked view's, or (a batch that
        builds no view) read from the stored perfect subtrees."""
        if self._edge is None:
            keys = merkle.perfect_parts(0, self.first) if self.first else []
            ranges = [(i << lv, (i + 1) << lv) for lv, i in keys]
            hashes = self.ledger._range_hashes(ranges, self.conn) if keys else []
            self._edge = [(lv, i, h) for (lv, i), h in zip(keys, hashes, strict=True)]
        return self._edge

    def root(self) -> bytes:
        if not self._frontier():
            return merkle.EMPTY_ROOT
        return merkle.fold_parts([h for _, _, h in self._frontier()])

    def flush(self) -> None:
        if self._entries:
            self.conn.execute(entries_table.insert(), self._entries)
            self.conn.execute(nodes_table.insert(), self._nodes)
            self._entries, self._nodes = [], []

    def finish(self) -> None:
        """Sign the batch (one signature over the new tree head, not one per entry) and flush."""
        if self._finished:
            return
        if self.size > self.first:
            statement = commit_statement(
                ledger_id=self.ledger.ledger_id,
                writer=self.writer.node_id,
                first=self.first,
                tree_size=self.size,
                root=format_digest(self.root()),
            )
            self.commit_seq = self._append(
                {
                    "kind": "commit",
                    "writer": self.writer.node_id,
                    "first": self.first,
                    "tree_size": self.size,
                    "root": format_digest(self.root()),
                    "signature": b64encode(self.writer.sign(statement)),
                }
            )
        self.flush()
        if self._settings:
            for name, value in self._settings.items():
                key = f"setting.{name}"
                self.conn.execute(meta_table.delete().where(meta_table.c.key == key))
                self.conn.execute(meta_table.insert(), [{"key": key, "value": canonical_json(value).decode()}])
                self.ledger.meta[key] = canonical_json(value).decode()
        self._finished = True

    def entries(
        self, *, node_id: str | None = None, kinds: Sequence[str] | None = None, job_id: str | None = None
    ) -> list[Entry]:
        """Entries, checked by this transaction's view (this transaction's own appends included)."""
        self.flush()
        return self.view().entries(node_id=node_id, kinds=kinds, job_id=job_id)

    def claimed(self, claim: str) -> Entry | None:
        """The entry that took ``claim``, checked; None while it is free."""
        self.flush()
        return self.view().claimed(claim)

    def store_evidence(self, body: bytes) -> str:
        return self.ledger.store_evidence(self.conn, body)


# -- the checked reads ----------------------------------------------------------------------------


class _Frontier:
    """The right edge of an RFC 9162 tree grown one leaf at a time: its root at any size, and the
    perfect-subtree hashes completed along the way."""

    def __init__(self, parts: Sequence[tuple[int, int, bytes]] = (), *, keep: bool = False) -> None:
        self.parts = list(parts)
        self.completed: dict[tuple[int, int], bytes] | None = {} if keep else None

    def push(self, seq: int, leaf: bytes) -> None:
        level, idx, h = 0, seq, leaf
        if self.completed is not None:
            self.completed[(0, seq)] = h
        while self.parts and self.parts[-1][0] == level:
            _, _, left = self.parts.pop()
            level, idx, h = level + 1, idx >> 1, merkle.node_hash(left, h)
            if self.completed is not None:
                self.completed[(level, idx)] = h
        self.parts.append((level, idx, h))

    def root(self) -> bytes:
        return merkle.fold_parts([h for _, _, h in self.parts]) if self.parts else merkle.EMPTY_ROOT


class RuleHook(Protocol):
    """What ``verify_ledger`` feeds a rule book (``verimesh.ledger.rules``), entry by entry."""

    def start(self, load_evidence: Callable[[str], bytes | None]) -> None: ...
    def entry(self, seq: int, event: dict[str, Any]) -> None: ...
    def commit(self, writer: str, first: int, seq: int) -> None: ...
    def finish(self) -> list[tuple[int, str]]: ...


@dataclass
class _Walk:
    """Entries in log order, checked one by one: body, columns, shape, claims, and every batch's
    commit (writer allowed for what it wrote, signature over the recomputed root). Shared by the
    full ``verify_ledger`` and by a view's check of the tail."""

    frontier: _Frontier
    genesis: Genesis | None = None
    verifiers: dict[str, PublicKey] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    problems: list[tuple[int | None, str, bool]] = field(default_factory=list)  # (seq, message, exact entry)
    claims: set[bytes] = field(default_factory=set)
    tail_claims: dict[str, int] = field(default_factory=dict)
    rules: RuleHook | None = None
    start: int = 0  # the first entry walked: the first batch starts there
    expected: int = 0
    last_commit: int | None = None
    pending: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)  # (seq, kind, event) since commit
    leaves: list[bytes] = field(default_factory=list)
    keep_leaves: bool = False
    keep_claims: bool = False
    last_time: str = ""  # the time of the entry before the next one fed
    cited: list[tuple[int, str]] = field(default_factory=list)  # (seq, evidence digest) verdicts and slashes cite
    roots: dict[int, bytes] | None = None  # tree size -> root after each commit, where kept (a view's walk)

    def copy(self) -> _Walk:
        """An independent walk in the same state (to walk further without changing this one)."""
        frontier = _Frontier(self.frontier.parts)
        frontier.completed = None if self.frontier.completed is None else dict(self.frontier.completed)
        return replace(
            self, frontier=frontier, verifiers=dict(self.verifiers), settings=dict(self.settings),
            problems=list(self.problems), claims=set(self.claims), tail_claims=dict(self.tail_claims),
            pending=list(self.pending), leaves=list(self.leaves), cited=list(self.cited),
            roots=None if self.roots is None else dict(self.roots),
        )  # fmt: skip

    def bad(self, seq: int | None, message: str, exact: bool = True) -> None:
        self.problems.append((seq, message, exact))

    def feed(self, entry: Entry) -> None:
        # 1. Numbered with no gap; the body canonical; the columns what the body says.
        if entry.seq != self.expected:
            self.bad(self.expected, f"entry {self.expected} is missing (the next stored entry is {entry.seq})")
            self.expected = entry.seq
        self.expected += 1
        leaf = entry.leaf_hash
        root_before = self.frontier.root() if entry.kind == "commit" else None
        self.frontier.push(entry.seq, leaf)
        if self.keep_leaves:
            self.leaves.append(leaf)
        try:
            event = entry.event
        except InvalidInputError as exc:
            self.bad(entry.seq, f"entry {entry.seq} body is not canonical JSON: {exc.message}")
            return
        problem = entry.row_problem(event) or shape_problem(event)
        if problem:
            self.bad(entry.seq, problem if problem.startswith("entry") else f"entry {entry.seq}: {problem}")
            return
        kind = event["kind"]
        # 2. Times never go backwards along the log, and no entry is dated before the request it carries.
        stamp = event["time"]
        if stamp < self.last_time:
            self.bad(
                entry.seq,
                f"entry {entry.seq} is dated {stamp}, before the entry before it ({self.last_time}): entry times "
                "never go backwards",
            )
        self.last_time = max(self.last_time, stamp)
        if kind in REQUEST_KINDS and isinstance(event["request"].get("time"), str) and event["request"]["time"] > stamp:
            self.bad(entry.seq, f"entry {entry.seq} is dated {stamp}, before the request it carries")
        if kind in ("verdict", "slash") and event["evidence_digest"] is not None:
            self.cited.append((entry.seq, str(event["evidence_digest"])))
        if kind == "checkpoint" and "governance" in event:
            if event["tree_size"] != entry.seq:
                self.bad(entry.seq, f"checkpoint entry {entry.seq} signs a tree of {event['tree_size']} entries, not "
                                    "the log up to itself")  # fmt: skip
            elif self.genesis is not None and governance_digest(self.verifiers, self.settings) != event["governance"]:
                self.bad(entry.seq, f"checkpoint entry {entry.seq} pins other writers or settings than the log's")
        # Claims are taken once.
        if entry.claim is not None:
            token = hashlib.blake2b(entry.claim.encode(), digest_size=16).digest()
            if token in self.claims:
                self.bad(entry.seq, f"entry {entry.seq} takes {entry.claim!r} a second time")
            self.claims.add(token)
            if self.keep_claims:
                self.tail_claims[entry.claim] = entry.seq
        # 3. The genesis first; the operator's identity comes from it.
        if kind == "genesis":
            if entry.seq != 0:
                self.bad(entry.seq, f"entry {entry.seq} is a second genesis")
            else:
                self.genesis = Genesis.from_event(event)
                self.settings = dict(self.genesis.settings)
                if not self.genesis.operator.check_possession():
                    self.bad(0, "the genesis operator key's proof of possession does not verify")
        elif entry.seq == 0:
            self.bad(0, "entry 0 is not the genesis")
        if kind == "commit":
            self._commit(entry.seq, event, self.frontier.root() if root_before is None else root_before)
            if self.roots is not None:
                self.roots[entry.seq + 1] = self.frontier.root()
        else:
            self.pending.append((entry.seq, kind, event))
        if self.rules is not None and kind != "commit":
            self.rules.entry(entry.seq, event)

    def _commit(self, seq: int, event: dict[str, Any], root_before: bytes) -> None:
        # 4. A commit covers the entries since the previous one, is signed by an allowed writer
        # over the root recomputed here, and its writer may write what it covers.
        first = event["first"]
        batch, self.pending = self.pending, []
        expected_first = self.start if self.last_commit is None else self.last_commit + 1
        self.last_commit = seq
        if first != expected_first or event["tree_size"] != seq:
            self.bad(seq, f"commit {seq} claims entries [{first}, {event['tree_size']}), not the batch before it")
            return
        if self.genesis is None:
            self.bad(seq, f"commit {seq} comes before any genesis")
            return
        writer = event["writer"]
        operator = self.genesis.operator
        key = operator if writer == operator.node_id else self.verifiers.get(writer)
        if key is None:
            self.bad(
                seq,
                f"entries {first}..{seq - 1} are signed by {writer}, which may not write to this ledger",
                exact=False,
            )
            return
        root = format_digest(root_before)
        statement = commit_statement(
            ledger_id=self.genesis.ledger_id, writer=writer, first=first, tree_size=seq, root=root
        )
        try:
            signature = b64decode_strict(event["signature"], what="commit signature")
        except InvalidInputError:
            signature = b""
        if event["root"] != root or not key.verify(statement, signature):
            self.bad(
                seq, f"entries {first}..{seq - 1} are not signed by their writer {writer} (commit {seq})", exact=False
            )
            return
        for s, kind, ev in batch:
            if kind in OPERATOR_KINDS and key is not operator:
                self.bad(s, f"entry {s} ({kind}) is written by {writer}; only the operator writes it")
            elif kind == "verifier-add":
                try:
                    public = PublicKey(bytes.fromhex(ev["public_key"]), bytes.fromhex(ev["proof_of_possession"]))
                except InvalidInputError:
                    self.bad(s, f"entry {s}: the verifier key is malformed")
                    continue
                if public.node_id != ev["node_id"] or not public.check_possession():
                    self.bad(s, f"entry {s}: the verifier key does not match its id or its proof of possession")
                else:
                    self.verifiers[public.node_id] = public
            elif kind == "verifier-remove":
                self.verifiers.pop(ev["node_id"], None)
            elif kind == "settings":
                self.settings.update(ev["changes"])
        if self.rules is not None:
            self.rules.commit(writer, first, seq)

    def finish(self) -> None:
        if self.pending:
            s = self.pending[0][0]
            self.bad(s, f"entries {s}..{self.pending[-1][0]} are not signed by any writer (no commit follows them)")


_NODES_AFTER: dict[int, sa.TextClause] = {}


def _nodes_after(bits: int) -> sa.TextClause:
    """Counts the stored tree nodes whose range ends after the anchor (parameters a0..a{bits}: the
    anchor shifted by each level), and any at a level no tree of this size has."""
    if bits not in _NODES_AFTER:
        ranges = " OR ".join(f"(level = {lv} AND idx >= :a{lv})" for lv in range(bits + 1))
        _NODES_AFTER[bits] = sa.text(f"SELECT count(*) FROM ledger_tree_nodes WHERE {ranges} OR level > :bits")
    return _NODES_AFTER[bits]


@dataclass(frozen=True)
class _Tail:
    """What one checked view walked (``LedgerView._remember``): the log from its checkpoint entry
    on, entry by entry, and the walk's state after them; leaves proven under the checkpoint."""

    genesis_body: bytes
    checkpoint: Entry | None
    walk: _Walk
    walked: list[Entry]
    size: int
    proven: dict[int, bytes]
    kept_at: float  # time.monotonic() when it was kept: after its last entry was committed


class LedgerView:
    """What a decision may rely on: the log from its last checkpoint on, checked.

    ``build`` does, under the caller's connection (the writer lock, inside a transaction):

    1. Entries 0..n-1 are all there (count and largest seq agree).
    2. Entry 0 is a genesis; the latest checkpoint entry is signed by its operator, and the stored
       tree gives the checkpoint's root at its size.
    3. Every entry after that checkpoint: body, columns and shape; times in order (from the entry
       before the checkpoint on) and none before its request; each batch signed by an allowed
       writer over the root recomputed here; nothing after the last commit; the stored hashes of
       that part are the recomputed ones; no claim taken twice.
    4. The genesis, settings and verifier entries before the checkpoint are included under it
       and give the writers and settings digest it signed (a version 2 checkpoint; under a
       version 1 one every entry before it is read).
    5. ``ledger_meta`` holds exactly what the genesis and settings entries say.

    Entries a decision reads through ``entries`` are checked again one by one: those before the
    checkpoint by an inclusion proof under its root, those after by the recomputed leaf hashes.
    """

    def __init__(
        self,
        ledger: Ledger,
        conn: sa.Connection,
        *,
        size: int,
        genesis: Genesis,
        anchor: int,
        anchor_root: bytes,
        tail_leaves: list[bytes],
        settings: dict[str, Any],
        verifiers: dict[str, PublicKey],
    ) -> None:
        self.ledger, self.conn, self.size, self.genesis = ledger, conn, size, genesis
        self.anchor, self.anchor_root, self._tail_leaves = anchor, anchor_root, tail_leaves
        self.settings, self.verifiers = settings, verifiers
        self.frontier: tuple[tuple[int, int, bytes], ...] = ()  # the checked tree's right edge at ``size``
        self._proven: dict[int, bytes] = {}  # seq -> leaf hash proven included under the anchor's root
        self._checkpoint_entry: Entry | None = None
        self._walked: list[Entry] = []  # entries anchor..size-1, as walked (checked)
        self._claims: dict[str, int] = {}  # their claims -> seq

    @property
    def ledger_id(self) -> str:
        return self.genesis.ledger_id

    def may_write(self, public: PublicKey) -> bool:
        return public.key == self.genesis.operator.key or (
            public.node_id in self.verifiers and self.verifiers[public.node_id].key == public.key
        )

    @classmethod
    def build(cls, ledger: Ledger, conn: sa.Connection, *, kept: bool = True) -> LedgerView:
        """The checked view (``kept``: from this process's kept tail where it fits; else every
        entry since the checkpoint walked from the store, as ``Ledger.checkpoint`` asks)."""
        # 1.
        begun = time.monotonic()
        stored = conn.execute(
            sa.select(sa.func.count(), sa.func.min(entries_table.c.seq), sa.func.max(entries_table.c.seq))
        ).one()
        count, size = int(stored[0] or 0), 0 if stored[2] is None else int(stored[2]) + 1
        if count != size or (count and int(stored[1]) != 0):
            raise tampered(f"entries 0..{size - 1} are not all there, once each (stored: {count} rows)")
        if size == 0:
            raise tampered("the log is empty (no genesis)")
        # 2.
        try:
            genesis_entry = ledger.entry(0, conn)
            genesis = Genesis.from_event(genesis_entry.event)
        except InvalidInputError as exc:
            raise tampered(exc.message) from exc
        row = conn.execute(
            sa.select(entries_table).where(entries_table.c.kind == "checkpoint").order_by(entries_table.c.seq.desc())
        ).first()
        anchor, anchor_root, parts = 0, merkle.EMPTY_ROOT, []
        cp: Checkpoint | None = None
        cp_entry: Entry | None = None
        if row is not None:
            entry = cp_entry = _entry(row)
            try:
                event = entry.event
                cp = Checkpoint.from_json(event, what=f"checkpoint entry {entry.seq}")
            except InvalidInputError as exc:
                raise tampered(exc.message) from exc
            if entry.row_problem(event) or cp.ledger_id != genesis.ledger_id or not cp.verify(genesis.operator):
                raise tampered(f"checkpoint entry {entry.seq} is not signed by this ledger's operator")
            if cp.tree_size > entry.seq:
                raise tampered(f"checkpoint entry {entry.seq} claims a tree of {cp.tree_size} entries before it")
            anchor, anchor_root = cp.tree_size, cp.root
        view = cls(
            ledger,
            conn,
            size=size,
            genesis=genesis,
            anchor=anchor,
            anchor_root=anchor_root,
            tail_leaves=[],
            settings=dict(genesis.settings),
            verifiers={},
        )
        view._checkpoint_entry = cp_entry
        with ledger._tail_lock:
            tail = ledger._tail
        if tail is not None and tail.kept_at < begun and tail.size > size:
            # This snapshot began after the process had checked a longer log: entries were removed.
            raise tampered(f"the log ends at entry {size - 1}; this process checked it up to entry {tail.size - 1}")
        extended = kept and tail is not None and view._extend(tail, genesis_entry, cp_entry)
        if not extended:
            if anchor and cp_entry is not None:  # the tree below the checkpoint (kept with the walk after)
                keys = merkle.perfect_parts(0, anchor)
                found = ledger._fetch_nodes(set(keys), conn)
                if any(k not in found for k in keys):
                    raise tampered(f"stored hashes of the tree below checkpoint entry {cp_entry.seq} are missing")
                parts = [(lv, i, found[(lv, i)]) for lv, i in keys]
                if merkle.fold_parts([h for _, _, h in parts]) != anchor_root:
                    raise tampered(f"the stored tree does not give the root signed by checkpoint entry {cp_entry.seq}")
            view._walk_tail(cp, genesis_entry, parts, tail)
        # 5.
        meta = {str(r.key): str(r.value) for r in conn.execute(sa.select(meta_table))}
        expected = meta_for(genesis.event, view.settings)
        if meta != expected:
            changed = sorted(k for k in set(meta) | set(expected) if meta.get(k) != expected.get(k))
            raise tampered(f"ledger_meta disagrees with the log on {changed[:4]}")
        ledger.tail_stats["extended" if extended else "walked"] += 1
        return view

    def _walk_tail(self, cp: Checkpoint | None, genesis_entry: Entry, parts: list[tuple[int, int, bytes]],
                   before: _Tail | None) -> None:  # fmt: skip
        """Steps 3 and 4 from the checkpoint on, every entry since it walked."""
        ledger, conn, anchor, genesis = self.ledger, self.conn, self.anchor, self.genesis
        walk = _Walk(_Frontier(parts, keep=True), keep_leaves=True, keep_claims=True, start=anchor, expected=anchor,
                     roots={})  # fmt: skip
        walk.genesis, walk.settings = genesis, dict(genesis.settings)
        # 4. The verifiers and settings in force at the checkpoint (after it, the walk follows them).
        if anchor and cp is not None:
            before_anchor = self._governance_before(cp, genesis_entry)
            for e in before_anchor:
                ev = e.event
                if e.kind == "settings":
                    walk.settings.update(ev["changes"])
                elif e.kind == "verifier-add":
                    walk.verifiers[ev["node_id"]] = PublicKey(
                        bytes.fromhex(ev["public_key"]), bytes.fromhex(ev["proof_of_possession"])
                    )
                else:
                    walk.verifiers.pop(ev["node_id"], None)
            # The governance rows were found by their (editable) kind column: the operator's signed
            # digest of the writers and settings says whether they are all of them.
            if cp.governance is not None and governance_digest(walk.verifiers, walk.settings) != cp.governance:
                raise tampered(
                    f"the writers and settings before the last checkpoint are not the ones it signed (a verifier, "
                    f"settings or genesis entry before entry {anchor} hidden or edited)"
                )
            last = ledger.entry(anchor - 1, conn)
            self._check_included([last])
            try:
                walk.last_time = str(last.event.get("time", ""))
            except InvalidInputError as exc:
                raise tampered(exc.message) from exc
        # 3.
        walked = list(ledger.entries(conn=conn, since=anchor))
        for entry in walked:
            walk.feed(entry)
        computed = walk.frontier.completed or {}
        self._settle_walk(walk, walked, list(computed), list(walk.tail_claims))
        # Leaves proven under an earlier checkpoint stay proven under this one when the tree this
        # process walked up to it has this checkpoint's root (this tree extends that one).
        if before is not None and before.genesis_body == genesis_entry.body and before.walk.start == anchor \
                and before.checkpoint == self._checkpoint_entry:  # fmt: skip
            self._proven = before.proven  # the same checkpoint: proven under the same root
        elif before is not None and before.genesis_body == genesis_entry.body and before.walk.roots is not None \
                and before.walk.roots.get(anchor) == self.anchor_root and before.walk.start <= anchor:  # fmt: skip
            proven = before.proven
            for seq in range(before.walk.start, anchor):
                proven[seq] = before.walk.leaves[seq - before.walk.start]
            self._proven = proven
        self._remember(walk, walked, genesis_entry)

    def _extend(self, tail: _Tail, genesis_entry: Entry, cp_entry: Entry | None) -> bool:
        """Steps 3 and 4 from what this process checked last (``tail``), when that was the walk from
        this view's checkpoint and the entries it walked read the same now: only the entries
        appended since are walked (False: nothing done, the tail is walked whole)."""
        if (tail.genesis_body != genesis_entry.body or tail.checkpoint != cp_entry or tail.walk.start != self.anchor
                or tail.size > self.size):  # fmt: skip
            return False  # another checkpoint, or an older snapshot than the walk's: walked whole
        fresh = self._appended_since(tail)
        if fresh is None:
            return False
        self._proven = tail.proven
        if tail.size == self.size:
            self._take(tail.walk, tail.walked)
            return True
        walk = tail.walk.copy()
        done_keys = len(walk.frontier.completed or {})
        done_claims = len(walk.tail_claims)
        for entry in fresh:
            walk.feed(entry)
        added = list(walk.frontier.completed or {})[done_keys:]
        walked = tail.walked + fresh
        self._settle_walk(walk, walked, added, list(walk.tail_claims)[done_claims:])
        self._remember(walk, walked, genesis_entry)
        return True

    def _appended_since(self, tail: _Tail) -> list[Entry] | None:
        """The entries stored after ``tail``'s, when the store still ends that stretch as it was
        walked: its last entry byte for byte, and the stored tree's right edge over it the walked
        one. None: it does not (entries removed, then as many or more appended again, say), and
        the tail is walked whole, so a log cut and grown again is never extended from a memory
        of entries the store no longer holds."""
        start = tail.size - 1 if tail.walked else tail.size
        fresh = list(self.ledger.entries(conn=self.conn, since=start))
        if tail.walked:
            if not fresh or fresh[0] != tail.walked[-1]:
                return None
            fresh = fresh[1:]
        edge = tail.walk.frontier.parts
        if edge:
            stored = self.ledger._fetch_nodes({(lv, i) for lv, i, _ in edge}, self.conn)
            if any(stored.get((lv, i)) != h for lv, i, h in edge):
                return None
        return fresh

    def _settle_walk(self, walk: _Walk, walked: list[Entry], new_nodes: list[tuple[int, int]],
                     new_claims: list[str]) -> None:  # fmt: skip
        """The end of step 3: no problem found; the stored tree nodes from the anchor on are as many
        as the walk computed and the new ones are the computed ones (those compared before were
        the computed ones then: a writer here signs over the tree it computed, ``Transaction.view``);
        the new claims were not taken before the anchor."""
        conn, anchor, size = self.conn, self.anchor, self.size
        walk.finish()
        if walk.problems:
            raise tampered(walk.problems[0][1])
        computed = walk.frontier.completed or {}
        bits = max(size, 1).bit_length()
        bounds = {f"a{lv}": anchor >> lv for lv in range(bits + 1)}
        stored = int(conn.execute(_nodes_after(bits), {**bounds, "bits": bits}).scalar() or 0)
        expected = sum(1 for lv, i in computed if i >= anchor >> lv)
        found = self.ledger._fetch_nodes(set(new_nodes), conn) if new_nodes else {}
        for key in new_nodes:
            if found.get(key) != computed[key]:
                raise tampered(f"the stored hash of tree node ({key[0]}, {key[1]}) is not the recomputed one")
        if stored != expected:
            raise tampered("stored tree nodes after the last checkpoint are missing" if stored < expected
                           else "stored tree nodes after the last checkpoint are not the recomputed ones")  # fmt: skip
        for at in range(0, len(new_claims), 500):
            q = sa.select(entries_table.c.seq, entries_table.c.claim).where(
                entries_table.c.claim.in_(new_claims[at : at + 500]), entries_table.c.seq < anchor
            )
            for r in conn.execute(q):
                raise tampered(f"entry {walk.tail_claims[str(r.claim)]} takes {r.claim!r}, taken by entry {r.seq}")
        self._take(walk, walked)

    def _take(self, walk: _Walk, walked: list[Entry]) -> None:
        """This view's tail: the walk's (checked) entries, leaves and state; queries read the
        entries from the anchor on from here, never again from the store."""
        self._tail_leaves = walk.leaves
        self._walked = walked
        self._claims = walk.tail_claims
        self.settings, self.verifiers = dict(walk.settings), dict(walk.verifiers)
        self.frontier = tuple(walk.frontier.parts)

    def _remember(self, walk: _Walk, walked: list[Entry], genesis_entry: Entry) -> None:
        """Keep this walk for the next view (unless another thread kept a longer one meanwhile)."""
        tail = _Tail(genesis_entry.body, self._checkpoint_entry, walk, walked, self.size, self._proven,
                     time.monotonic())  # fmt: skip
        with self.ledger._tail_lock:
            held = self.ledger._tail
            if held is None or held.size <= self.size:
                self.ledger._tail = tail

    def _governance_before(self, cp: Checkpoint, genesis_entry: Entry) -> list[Entry]:
        """The settings and verifier entries before the anchor, each checked against its body. A
        version 2 checkpoint pins their digest, so they are looked up by kind (and each proven
        included); under a version 1 checkpoint every body before it is read and the root recomputed."""
        governance = sorted(GOVERNANCE_KINDS - {"genesis"})
        if cp.governance is not None:
            rows = [e for e in self.ledger.entries(kinds=list(governance), conn=self.conn) if e.seq < self.anchor]
            self._check_included([genesis_entry, *rows])
        else:
            frontier, rows = _Frontier(), []
            for e in self.ledger.entries(conn=self.conn):
                if e.seq >= self.anchor:
                    break
                frontier.push(e.seq, e.leaf_hash)
                try:
                    kind = e.event.get("kind")
                except InvalidInputError as exc:
                    raise tampered(exc.message) from exc
                if kind in governance:
                    rows.append(e)
            if frontier.root() != self.anchor_root:
                raise tampered("entries before the last checkpoint do not give its root (edited)")
        for e in rows:
            try:
                ev = e.event
            except InvalidInputError as exc:
                raise tampered(exc.message) from exc
            if e.row_problem(ev) or shape_problem(ev):
                raise tampered(f"entry {e.seq} does not match its own body (moved, reordered or edited)")
        return rows

    def _check_included(self, entries: Sequence[Entry]) -> None:
        """Entries before the anchor: an RFC 9162 inclusion proof each, under the checkpoint's root
        (whose signature the view checked). Whether a leaf is included at a position under a root
        is a fact about those bytes alone: one proven before, in this process, is not proven again."""
        size, root = self.anchor.to_bytes(8, "big"), self.anchor_root
        proven = self._proven
        entries = [e for e in entries if e.seq < self.anchor and proven.get(e.seq) != e.leaf_hash]
        memo = {e.seq: Memo.key("inclusion", size, root, e.seq.to_bytes(8, "big"), e.leaf_hash) for e in entries}
        early = []
        for e in entries:
            if _INCLUDED.get(memo[e.seq]) is None:
                early.append(e)
            else:
                proven[e.seq] = e.leaf_hash
        if not early:
            return
        wanted: set[tuple[int, int]] = set()
        ranges = {e.seq: merkle.inclusion_ranges(e.seq, self.anchor) for e in early}
        for rs in ranges.values():
            for a, b in rs:
                wanted.update(merkle.perfect_parts(a, b))
        found = self.ledger._fetch_nodes(wanted, self.conn)
        for e in early:
            try:
                path = [merkle.fold_parts([found[p] for p in merkle.perfect_parts(a, b)]) for a, b in ranges[e.seq]]
            except KeyError:
                raise tampered(f"stored hashes on the path of entry {e.seq} are missing") from None
            if not merkle.verify_inclusion(e.leaf_hash, e.seq, self.anchor, path, self.anchor_root):
                raise tampered(f"entry {e.seq} is not the one the last checkpoint signed (edited)")
            _INCLUDED.put(memo[e.seq], True)
            proven[e.seq] = e.leaf_hash

    def _check(self, entries: list[Entry]) -> list[Entry]:
        for e in entries:
            if e.seq >= self.size:
                continue  # appended by the caller's own transaction
            if e.seq >= self.anchor and self._tail_leaves[e.seq - self.anchor] != e.leaf_hash:
                raise tampered(f"entry {e.seq} changed while it was read")
            try:
                problem = e.row_problem(e.event)
            except InvalidInputError as exc:
                raise tampered(exc.message) from exc
            if problem:
                raise tampered(problem)
        self._check_included(entries)
        return entries

    def entries(
        self, *, node_id: str | None = None, kinds: Sequence[str] | None = None, job_id: str | None = None
    ) -> list[Entry]:
        """Entries (oldest first) by their columns: before the anchor, and appended by the caller's
        own transaction, as stored (those before the anchor checked one by one); from the anchor
        to ``size``, the view's own walked entries (an edited or relabelled row there changes
        nothing a decision reads)."""
        query = self.ledger._query(node_id=node_id, kinds=kinds, job_id=job_id).where(
            sa.or_(entries_table.c.seq < self.anchor, entries_table.c.seq >= self.size)
        )
        stored = [_entry(r) for r in self.conn.execute(query)]
        wanted = None if kinds is None else set(kinds)
        walked = [
            e for e in self._walked
            if (node_id is None or e.node_id == node_id) and (wanted is None or e.kind in wanted)
            and (job_id is None or e.job_id == job_id)
        ]  # fmt: skip
        before = self._check([e for e in stored if e.seq < self.anchor])
        return [*before, *walked, *(e for e in stored if e.seq >= self.size)]

    def claimed(self, claim: str) -> Entry | None:
        if claim in self._claims:
            return self._walked[self._claims[claim] - self.anchor]
        query = self.ledger._query(claim=claim).where(
            sa.or_(entries_table.c.seq < self.anchor, entries_table.c.seq >= self.size)
        )
        rows = [_entry(r) for r in self.conn.execute(query)]
        return self._check(rows)[0] if rows else None

    def scan(self) -> Iterator[Entry]:
        """Every entry, checked: before the anchor by recomputing the root over all of them (the
        error comes at the anchor, before any later entry is handed out), after it by the leaves."""
        frontier = _Frontier()
        for e in self.ledger.entries(conn=self.conn):
            if e.seq < self.anchor:
                frontier.push(e.seq, e.leaf_hash)
            else:
                if e.seq == self.anchor and frontier.root() != self.anchor_root:
                    raise tampered("entries before the last checkpoint do not give its root (edited)")
                self._check([e])
            try:
                problem = e.row_problem(e.event)
            except InvalidInputError as exc:
                raise tampered(exc.message) from exc
            if problem:
                raise tampered(problem)
            yield e
        if self.anchor >= self.size and frontier.root() != self.anchor_root:
            raise tampered("entries before the last checkpoint do not give its root (edited)")


# -- verification --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LedgerReport:
    ok: bool
    size: int
    root: bytes
    problems: tuple[str, ...]
    first_bad_entry: int | None
    checkpoints_checked: int
    anchor: str | None = None  # what the result is anchored to outside the database; None: nothing
    rules_checked: bool = False
    violations: tuple[str, ...] = ()
    commits_checked: int = 0

    @property
    def trust(self) -> str:
        if self.anchor:
            return f"anchored to {self.anchor}"
        return (
            "not anchored: checked against the operator key stored in this database, so only as good as "
            "the database; pass --operator-key KEY.pub or --checkpoint FILE kept elsewhere"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "intact": self.ok,
            "tree_size": self.size,
            "root": format_digest(self.root),
            "first_bad_entry": self.first_bad_entry,
            "checkpoints_checked": self.checkpoints_checked,
            "commits_checked": self.commits_checked,
            "problems": list(self.problems),
            "anchored": self.anchor is not None,
            "anchor": self.anchor,
            "trust": self.trust,
            "rules_checked": self.rules_checked,
            "violations": list(self.violations),
        }


def verify_ledger(
    ledger: Ledger,
    *,
    checkpoint: Checkpoint | None = None,
    operator: PublicKey | None = None,
    rules: RuleHook | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> LedgerReport:
    """Recompute everything from the entries' bytes.

    1. Entries are numbered 0..n-1 with no gap, each body canonical, well formed and naming its
       own seq, kind, node, job and claim; no claim is taken twice; entry times never go backwards
       and none is earlier than the request it carries; a version 2 checkpoint pins the writers
       and settings in force at its size.
    2. Entry 0 is the genesis; with ``operator`` (a key kept outside the database) its operator
       must be that key.
    3. Every batch ends with a commit signed, over the recomputed root, by a writer allowed to
       write it (the operator; a verifier the operator added before the batch); nothing follows
       the last commit.
    4. Each leaf hash and every stored subtree hash equals the one recomputed from the bodies.
    5. Every checkpoint entry is signed by the operator and its root is the recomputed root at its size.
    6. A given (external) checkpoint: same, and the log has not shrunk below it.
    7. ``ledger_meta`` holds exactly what the genesis and settings entries say; stored evidence
       hashes to its digest, and every evidence digest an entry cites is stored.
    8. With ``rules``: the protocol's rules replayed over the events (``verimesh.ledger.rules``).
    """
    with ledger.reading() as conn:
        return _verify(ledger, conn, checkpoint=checkpoint, operator=operator, rules=rules, progress=progress)


def _verify(
    ledger: Ledger,
    conn: sa.Connection,
    *,
    checkpoint: Checkpoint | None,
    operator: PublicKey | None,
    rules: RuleHook | None,
    progress: Callable[[int, int], None] | None,
) -> LedgerReport:
    total = ledger.size(conn)
    if rules is not None:
        rules.start(lambda digest: ledger.evidence(digest, conn))
    walk = _Walk(_Frontier(), keep_leaves=True, rules=rules)
    checkpoints: list[tuple[int, Checkpoint]] = []
    commits = 0
    # 1. 2. 3.
    for entry in ledger.entries(conn=conn):
        walk.feed(entry)
        if entry.kind == "commit":
            commits += 1
        if entry.kind == "checkpoint":
            try:
                checkpoints.append((entry.seq, Checkpoint.from_json(entry.event, what=f"checkpoint entry {entry.seq}")))
            except InvalidInputError as exc:
                walk.bad(entry.seq, exc.message)
        if progress is not None and entry.seq % 10_000 == 0:
            progress(entry.seq, total)
    walk.finish()
    genesis = walk.genesis
    if genesis is None:
        walk.bad(0, "the log has no genesis entry")
    elif operator is not None and genesis.operator.key != operator.key:
        walk.bad(
            0,
            f"the genesis names operator {genesis.operator.node_id}, not the given {operator.node_id} "
            "(history rewritten under another key)",
        )
    leaves = walk.leaves
    size = len(leaves)
    # 4. Recompute every perfect subtree level by level and compare with what is stored.
    levels = [leaves]
    while len(levels[-1]) > 1:
        prev = levels[-1]
        levels.append([merkle.node_hash(prev[i], prev[i + 1]) for i in range(0, len(prev) - 1, 2)])
    stored_count = 0
    query = sa.select(nodes_table).order_by(nodes_table.c.level, nodes_table.c.idx)
    for row in conn.execute(query.execution_options(yield_per=50_000)):
        stored_count += 1
        if not isinstance(row.level, int) or not isinstance(row.idx, int) or row.level < 0 or row.idx < 0:
            walk.bad(None, f"stored tree node key ({row.level!r}, {row.idx!r}) is malformed")
            continue
        level, idx, h = row.level, row.idx, _as_bytes(row.hash)
        if level >= len(levels) or idx >= len(levels[level]):
            walk.bad(
                None, f"stored tree node ({level}, {idx}) lies beyond the entries (log truncated or node inserted)"
            )
        elif levels[level][idx] != h:
            message = f"stored hash of leaves [{idx << level}, {(idx + 1) << level}) differs from the entries"
            walk.bad(idx << level, message, exact=level == 0)
    meta = {str(r.key): str(r.value) for r in conn.execute(sa.select(meta_table))}
    stored_evidence: set[str] = set()
    bad_evidence: list[str] = []
    for r in conn.execute(sa.select(evidence_table.c.digest, evidence_table.c.body)):
        stored_evidence.add(str(r.digest))
        if sha256_bytes(_as_bytes(r.body)) != r.digest:
            bad_evidence.append(str(r.digest))
    if stored_count != sum(len(lv) for lv in levels):
        walk.bad(None, f"{stored_count} stored tree nodes where the entries imply {sum(len(lv) for lv in levels)}")

    def root_at(n: int) -> bytes:
        if n == 0:
            return merkle.EMPTY_ROOT
        return merkle.fold_parts([levels[lv][i] for lv, i in merkle.perfect_parts(0, n)])

    # 5. and 6. An entry rewritten together with every stored hash shows only against a signed
    # root; the first bad entry then lies between the last checkpoint that still holds and the
    # first that does not.
    signed: list[tuple[str, Checkpoint]] = [(f"checkpoint entry {seq}", cp) for seq, cp in checkpoints]
    if checkpoint is not None:
        signed.append(("the given checkpoint", checkpoint))
    holding = [0]
    failing: list[tuple[str, Checkpoint]] = []
    for where, cp in sorted(signed, key=lambda item: item[1].tree_size):
        if genesis is None or cp.ledger_id != genesis.ledger_id or not cp.verify(genesis.operator):
            walk.bad(None, f"{where} is not signed by this ledger's operator")
        elif cp.tree_size > size:
            walk.bad(size, f"log truncated: {size} entries, {where} saw {cp.tree_size}")
        elif root_at(cp.tree_size) != cp.root:
            failing.append((where, cp))
        else:
            holding.append(cp.tree_size)
    for where, cp in failing:
        lo = max(n for n in holding if n <= cp.tree_size)
        walk.bad(lo, f"entries {lo}..{cp.tree_size - 1} do not give the root signed by {where}", exact=False)
    for seq, cp in checkpoints:
        if cp.tree_size > seq:
            walk.bad(seq, f"checkpoint entry {seq} claims a tree of {cp.tree_size} entries before it")
    # 7.
    if genesis is not None:
        expected = meta_for(genesis.event, walk.settings)
        changed = sorted(k for k in set(meta) | set(expected) if meta.get(k) != expected.get(k))
        if changed:
            walk.bad(None, f"ledger_meta disagrees with the log on {changed[:6]} (edited outside the log)")
    for digest in bad_evidence:
        walk.bad(None, f"stored evidence {digest} does not hash to its digest (edited)")
    # Evidence an entry cites is kept beside the log: a missing row is damage to the storage (the
    # writer stored it in the same transaction), so it is named here, not blamed on the writer.
    for seq, digest in walk.cited:
        if digest not in stored_evidence:
            walk.bad(seq, f"entry {seq} cites evidence {digest} that is not stored (a ledger_evidence row deleted)")
    # 8.
    violations: list[tuple[int, str]] = rules.finish() if rules is not None else []
    exact = [s for s, _, e in walk.problems if s is not None and e] + [s for s, _ in violations]
    ranges = [s for s, _, e in walk.problems if s is not None and not e]
    anchor = None
    if operator is not None:
        anchor = f"operator key {operator.node_id}"
    elif checkpoint is not None:
        anchor = f"the given checkpoint ({checkpoint.tree_size} entries)"
    return LedgerReport(
        not walk.problems and not violations,
        size,
        root_at(size),
        tuple(m for _, m, _ in walk.problems),
        min(exact or ranges) if exact or ranges else None,
        len(checkpoints),
        anchor,
        rules is not None,
        tuple(m for _, m in sorted(violations)),
        commits,
    )


INCLUSION_TYPE = "verimesh/inclusion-proof"


def inclusion_document(ledger: Ledger, seq: int) -> dict[str, Any]:
    """Entry ``seq`` with its RFC 9162 inclusion proof under the latest checkpoint covering it."""
    entry = ledger.entry(seq)
    cp = ledger.latest_checkpoint(covering=seq)
    if cp is None:
        raise InvalidInputError(f"no checkpoint covers entry {seq} yet", hint="run `verimesh ledger checkpoint` first")
    return {
        "type": INCLUSION_TYPE,
        "version": 1,
        "ledger_id": ledger.ledger_id,
        "seq": seq,
        "entry": b64encode(entry.body),
        "tree_size": cp.tree_size,
        "inclusion_proof": [b64encode(h) for h in ledger.inclusion_proof(seq, cp.tree_size)],
        "checkpoint": cp.to_json(),
    }


def check_inclusion_document(path: Path, operator: PublicKey) -> tuple[bool, dict[str, Any] | None, str]:
    """Offline: the checkpoint is the operator's, and the entry is at ``seq`` under its root."""
    from verimesh.core.files import read_user_file

    doc = parse_json(read_user_file(path, what="inclusion proof", max_bytes=MAX_BODY_BYTES * 2), what=str(path))
    keys = {"type", "version", "ledger_id", "seq", "entry", "tree_size", "inclusion_proof", "checkpoint"}
    if not isinstance(doc, dict) or set(doc) != keys or doc["type"] != INCLUSION_TYPE:
        raise InvalidInputError(f"{path} is not a verimesh inclusion proof")
    if doc["version"] != 1 or isinstance(doc["version"], bool):
        raise InvalidInputError(f"{path}: unsupported inclusion proof version {doc['version']!r:.40}")
    cp = Checkpoint.from_json(doc["checkpoint"], what="proof checkpoint", extra_keys=frozenset())
    body = b64decode_strict(doc["entry"], what="proof entry")
    if not isinstance(doc["inclusion_proof"], list) or len(doc["inclusion_proof"]) > 64:
        raise InvalidInputError("inclusion proof path is malformed")
    path_hashes = [b64decode_strict(h, what="proof hash") for h in doc["inclusion_proof"]]
    seq = doc["seq"]
    if isinstance(seq, bool) or not isinstance(seq, int):
        raise InvalidInputError("inclusion proof seq must be an integer")
    if cp.ledger_id != doc["ledger_id"] or cp.tree_size != doc["tree_size"]:
        return False, None, "the proof does not match its checkpoint"
    if not cp.verify(operator):
        return False, None, "the checkpoint is not signed by this operator"
    if not merkle.verify_inclusion(merkle.leaf_hash(body), seq, cp.tree_size, path_hashes, cp.root):
        return False, None, "the entry is not included under the signed root"
    event = Entry(seq, "", None, body).event
    if event.get("seq") != seq:
        return False, event, "the entry names another position"
    return True, event, f"entry {seq} ({event.get('kind')}) is in ledger {cp.ledger_id} of {cp.tree_size} entries"


__all__ = [
    "Checkpoint",
    "Entry",
    "Genesis",
    "Ledger",
    "LedgerReport",
    "LedgerView",
    "Transaction",
    "check_inclusion_document",
    "display_url",
    "inclusion_document",
    "node_id_for",
    "normalize_url",
    "verify_ledger",
]
