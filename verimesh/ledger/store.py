"""The tamper-evident event log (docs/design.md §6): SQLAlchemy Core storage, RFC 9162 Merkle tree.

Every event is one canonical-JSON entry; entry ``seq`` is leaf ``seq`` of an RFC 9162 tree over
the entries' bytes. The hashes of all perfect subtrees are stored (table ``tree_nodes``: level l,
index i covers leaves [i*2^l, (i+1)*2^l)), so a root, an inclusion proof or a consistency proof
needs O(log n) hashes fetched in one query. Appends run in one write transaction each (SQLite:
WAL, ``BEGIN IMMEDIATE``, synchronous FULL; PostgreSQL: a table lock), so concurrent writers
serialize and a crash loses nothing that was committed.

Reputation is never stored: ``verimesh.ledger.reputation`` derives it from the events.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event as sa_event

from verimesh.core import merkle
from verimesh.core.canonical import b64decode_strict, b64encode, canonical_json, parse_canonical_json, parse_json
from verimesh.core.digest import format_digest, parse_digest
from verimesh.errors import BackendUnavailableError, ConfigurationError, InvalidInputError
from verimesh.signing.keys import PublicKey, SecretKey

FORMAT = "verimesh/ledger"
CHECKPOINT_TYPE = "verimesh/checkpoint"
KINDS = ("register", "receipt", "verdict", "reward", "slash", "checkpoint")
MAX_BODY_BYTES = 1024 * 1024

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
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("node_id", sa.String(64), nullable=True, index=True),
    sa.Column("body", sa.LargeBinary, nullable=False),
)
nodes_table = sa.Table(
    "ledger_tree_nodes",
    metadata,
    sa.Column("level", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("idx", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("hash", sa.LargeBinary(32), nullable=False),
)
# Derived indexes that make two rules atomic under concurrency; `ledger verify` rebuilds them.
slash_evidence_table = sa.Table(
    "ledger_slash_evidence",
    metadata,
    sa.Column("evidence_digest", sa.String(71), primary_key=True),
    sa.Column("seq", sa.BigInteger, nullable=False),
)
rewards_table = sa.Table(
    "ledger_rewards",
    metadata,
    sa.Column("node_id", sa.String(64), primary_key=True),
    sa.Column("job_id", sa.String(71), primary_key=True),
    sa.Column("seq", sa.BigInteger, nullable=False),
)


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


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True)
class Entry:
    seq: int
    kind: str
    node_id: str | None
    body: bytes

    @property
    def event(self) -> dict[str, Any]:
        doc = parse_canonical_json(self.body, what=f"ledger entry {self.seq}", max_bytes=MAX_BODY_BYTES)
        if not isinstance(doc, dict):
            raise InvalidInputError(f"ledger entry {self.seq} is not an object")
        return doc

    @property
    def leaf_hash(self) -> bytes:
        return merkle.leaf_hash(self.body)


@dataclass(frozen=True)
class Checkpoint:
    """A signed tree head: the operator's signature over the canonical statement of (size, root)."""

    ledger_id: str
    tree_size: int
    root: bytes
    time: str
    signature: bytes

    def statement(self) -> bytes:
        return canonical_json(
            {"type": CHECKPOINT_TYPE, "version": 1, "ledger_id": self.ledger_id, "tree_size": self.tree_size,
             "root": format_digest(self.root), "time": self.time}
        )  # fmt: skip

    def verify(self, operator: PublicKey) -> bool:
        return operator.verify(self.statement(), self.signature)

    def to_json(self) -> dict[str, Any]:
        return {
            "type": CHECKPOINT_TYPE, "version": 1, "ledger_id": self.ledger_id, "tree_size": self.tree_size,
            "root": format_digest(self.root), "time": self.time, "signature": b64encode(self.signature),
        }  # fmt: skip

    @classmethod
    def from_json(
        cls, doc: Any, *, what: str = "checkpoint", extra_keys: frozenset[str] = frozenset({"kind", "seq"})
    ) -> Checkpoint:
        """``extra_keys``: what a checkpoint entry of the ledger adds; a checkpoint file has none."""
        keys = {"type", "version", "ledger_id", "tree_size", "root", "time", "signature"}
        if not isinstance(doc, dict) or set(doc) - extra_keys != keys or doc["type"] != CHECKPOINT_TYPE:
            raise InvalidInputError(f"{what} is not a verimesh checkpoint")
        if doc["version"] != 1 or isinstance(doc["version"], bool):  # the signed statement says version 1
            raise InvalidInputError(f"{what} has unsupported version {doc['version']!r:.40}")
        size = doc["tree_size"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or not isinstance(doc["ledger_id"], str):
            raise InvalidInputError(f"{what} has a bad tree size or ledger id")
        if not isinstance(doc["time"], str):
            raise InvalidInputError(f"{what} has a bad time")
        return cls(
            doc["ledger_id"], doc["tree_size"], parse_digest(doc["root"], what=f"{what} root"), str(doc["time"]),
            b64decode_strict(doc["signature"], what=f"{what} signature"),
        )  # fmt: skip

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


def _entry(row: Any) -> Entry:
    node = row.node_id if isinstance(row.node_id, str) or row.node_id is None else str(row.node_id)
    return Entry(int(row.seq), str(row.kind), node, _as_bytes(row.body))


class Ledger:
    """One ledger database. Open with ``Ledger.open(url)``; create with ``Ledger.create``."""

    def __init__(self, engine: sa.Engine, meta: Mapping[str, str]) -> None:
        self.engine = engine
        self.meta = dict(meta)
        self.operator = PublicKey(bytes.fromhex(meta["operator_public_key"]), bytes.fromhex(meta["operator_pop"]))
        self.ledger_id = meta["ledger_id"]

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
                cur.execute("PRAGMA busy_timeout = 60000")
                cur.execute("PRAGMA journal_mode = WAL")
                cur.execute("PRAGMA synchronous = FULL")
                cur.close()

            @sa_event.listens_for(engine, "begin")
            def _sqlite_begin(conn: sa.Connection) -> None:
                conn.exec_driver_sql("BEGIN IMMEDIATE")  # one writer at a time, no lock upgrades

        return engine

    @classmethod
    def create(
        cls,
        url: str,
        operator: SecretKey,
        *,
        operator_key_path: Path | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> Ledger:
        engine = cls._engine(url)
        try:
            with engine.begin() as conn:
                if sa.inspect(conn).has_table("ledger_meta"):
                    raise InvalidInputError(f"a ledger already exists at {display_url(url)}")
                metadata.create_all(conn)
                meta = {
                    "format": FORMAT,
                    "version": "1",
                    "ledger_id": "ledger-" + secrets.token_hex(8),
                    "created": now(),
                    "operator_public_key": operator.public.key.hex(),
                    "operator_pop": operator.public.proof_of_possession.hex(),
                    "operator_node_id": operator.node_id,
                    "operator_key_path": str(operator_key_path.resolve()) if operator_key_path else "",
                    **(settings or {}),
                }
                conn.execute(meta_table.insert(), [{"key": k, "value": v} for k, v in meta.items()])
        except sa.exc.SQLAlchemyError as exc:
            raise InvalidInputError(f"cannot create ledger at {display_url(url)}: {_driver_reason(exc)}") from exc
        return cls(engine, meta)

    @classmethod
    def open(cls, url: str) -> Ledger:
        path, target = normalize_url(url), display_url(url)
        if path.startswith("sqlite:///") and not Path(path[len("sqlite:///") :]).exists():
            raise InvalidInputError(f"no ledger at {target}", hint="create one with `verimesh ledger init`")
        engine = cls._engine(url)
        try:
            with engine.connect() as conn:
                if not sa.inspect(conn).has_table("ledger_meta"):
                    raise InvalidInputError(f"{target} is not a verimesh ledger")
                meta = {r.key: r.value for r in conn.execute(sa.select(meta_table))}
        except sa.exc.SQLAlchemyError as exc:
            raise InvalidInputError(f"cannot open ledger {target}: {_driver_reason(exc)}") from exc
        if meta.get("format") != FORMAT or meta.get("version") != "1":
            raise InvalidInputError(f"{target} is not a verimesh ledger (format {meta.get('format')!r})")
        return cls(engine, meta)

    def setting(self, key: str, default: str) -> str:
        return self.meta.get(key, default)

    # -- writing ---------------------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """One write transaction: the writer lock is held, appends are atomic together."""
        try:
            with self.engine.begin() as conn:
                if self.engine.dialect.name == "postgresql":
                    conn.exec_driver_sql("LOCK TABLE ledger_entries IN SHARE ROW EXCLUSIVE MODE")
                txn = Transaction(self, conn)
                yield txn
                txn.flush()
        except sa.exc.OperationalError as exc:
            raise InvalidInputError(f"ledger write failed: {exc.orig}") from exc

    def append(self, events: Sequence[Mapping[str, Any]]) -> list[int]:
        with self.transaction() as txn:
            return [txn.append(e) for e in events]

    # -- reading ---------------------------------------------------------------------------------

    def size(self, conn: sa.Connection | None = None) -> int:
        def q(c: sa.Connection) -> int:
            value = c.execute(sa.select(sa.func.max(entries_table.c.seq))).scalar()
            return 0 if value is None else int(value) + 1

        if conn is not None:
            return q(conn)
        with self.engine.connect() as c:
            return q(c)

    def entry(self, seq: int) -> Entry:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(entries_table).where(entries_table.c.seq == seq)).first()
        if row is None:
            raise InvalidInputError(f"ledger has no entry {seq}")
        return _entry(row)

    def entries(self, *, node_id: str | None = None, kinds: Sequence[str] | None = None) -> Iterator[Entry]:
        query = sa.select(entries_table).order_by(entries_table.c.seq)
        if node_id is not None:
            query = query.where(entries_table.c.node_id == node_id)
        if kinds:
            query = query.where(entries_table.c.kind.in_(list(kinds)))
        with self.engine.connect() as conn:
            for row in conn.execution_options(stream_results=True, yield_per=10_000).execute(query):
                yield _entry(row)

    def _range_hashes(self, ranges: Sequence[tuple[int, int]], conn: sa.Connection | None = None) -> list[bytes]:
        parts = [merkle.perfect_parts(a, b) for a, b in ranges]
        wanted = sorted({p for ps in parts for p in ps})
        found: dict[tuple[int, int], bytes] = {}
        if wanted:
            # An OR of (level, idx) equalities: SQLite answers it with one index seek per key
            # (MULTI-INDEX OR, 0.1 ms for a proof at 10^5 entries); a row-value IN scans the table.
            col = nodes_table.c
            query = sa.select(nodes_table).where(sa.or_(*(sa.and_(col.level == lv, col.idx == i) for lv, i in wanted)))

            def fetch(c: sa.Connection) -> None:
                for row in c.execute(query):
                    found[(int(row.level), int(row.idx))] = _as_bytes(row.hash)

            if conn is not None:
                fetch(conn)
            else:
                with self.engine.connect() as c:
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

    # -- checkpoints -----------------------------------------------------------------------------

    def operator_key(self, path: Path | None = None, *, passphrase: str | None = None) -> SecretKey:
        from verimesh.signing.keys import load_secret_key

        where = path or (Path(self.meta["operator_key_path"]) if self.meta.get("operator_key_path") else None)
        if where is None:
            raise ConfigurationError("this ledger does not know its operator key", hint="pass --operator-key")
        key = load_secret_key(where, passphrase=passphrase)
        if key.public.key != self.operator.key:
            raise InvalidInputError(f"{where} is not this ledger's operator key")
        return key

    def checkpoint(self, key: SecretKey) -> Checkpoint:
        """Sign the current tree head and log the checkpoint as an entry of its own."""
        if key.public.key != self.operator.key:
            raise InvalidInputError("only the ledger operator's key can sign checkpoints")
        with self.transaction() as txn:
            size = txn.size
            root = txn.root()
            cp = Checkpoint(self.ledger_id, size, root, now(), b"")
            cp = Checkpoint(cp.ledger_id, size, root, cp.time, key.sign(cp.statement()))
            txn.append({"kind": "checkpoint", **{k: v for k, v in cp.to_json().items()}})
        return cp

    def latest_checkpoint(self, covering: int = 0) -> Checkpoint | None:
        best = None
        for entry in self.entries(kinds=["checkpoint"]):
            cp = Checkpoint.from_json(entry.event, what=f"checkpoint entry {entry.seq}")
            if cp.tree_size > covering:
                best = cp
        return best


class Transaction:
    """Appends inside one write transaction; the frontier (right edge of the tree) is kept in memory."""

    def __init__(self, ledger: Ledger, conn: sa.Connection) -> None:
        self.ledger = ledger
        self.conn = conn
        self.size = ledger.size(conn)
        keys = merkle.perfect_parts(0, self.size) if self.size else []
        hashes = ledger._range_hashes([(i << lv, (i + 1) << lv) for lv, i in keys], conn) if keys else []
        self._frontier = [(lv, i, h) for (lv, i), h in zip(keys, hashes, strict=True)]
        self._entries: list[dict[str, Any]] = []
        self._nodes: list[dict[str, Any]] = []

    def append(self, event: Mapping[str, Any]) -> int:
        kind = event.get("kind")
        if kind not in KINDS:
            raise InvalidInputError(f"unknown ledger event kind {kind!r}")
        seq = self.size
        body = canonical_json({"time": now(), **event, "seq": seq})
        if len(body) > MAX_BODY_BYTES:
            raise InvalidInputError(f"ledger event of {len(body)} bytes is over the limit")
        node_id = event.get("node_id")
        self._entries.append({"seq": seq, "kind": kind, "node_id": node_id, "body": body})
        level, idx, h = 0, seq, merkle.leaf_hash(body)
        self._nodes.append({"level": 0, "idx": seq, "hash": h})
        while self._frontier and self._frontier[-1][0] == level:
            _, _, left = self._frontier.pop()
            level, idx, h = level + 1, idx >> 1, merkle.node_hash(left, h)
            self._nodes.append({"level": level, "idx": idx, "hash": h})
        self._frontier.append((level, idx, h))
        self.size += 1
        return seq

    def root(self) -> bytes:
        if not self._frontier:
            return merkle.EMPTY_ROOT
        return merkle.fold_parts([h for _, _, h in self._frontier])

    def flush(self) -> None:
        if self._entries:
            self.conn.execute(entries_table.insert(), self._entries)
            self.conn.execute(nodes_table.insert(), self._nodes)
            self._entries, self._nodes = [], []

    def events_of(self, node_id: str, kinds: Sequence[str]) -> list[Entry]:
        self.flush()
        query = (
            sa.select(entries_table)
            .where(entries_table.c.node_id == node_id, entries_table.c.kind.in_(list(kinds)))
            .order_by(entries_table.c.seq)
        )
        return [_entry(r) for r in self.conn.execute(query)]

    def claim_evidence(self, digest: str, seq: int) -> bool:
        """Record that ``digest`` slashed; False if it already did (the same evidence slashes once)."""
        self.flush()
        exists = self.conn.execute(
            sa.select(slash_evidence_table.c.seq).where(slash_evidence_table.c.evidence_digest == digest)
        ).first()
        if exists is not None:
            return False
        self.conn.execute(slash_evidence_table.insert(), [{"evidence_digest": digest, "seq": seq}])
        return True

    def claim_reward(self, node_id: str, job_id: str, seq: int) -> bool:
        self.flush()
        exists = self.conn.execute(
            sa.select(rewards_table.c.seq).where(rewards_table.c.node_id == node_id, rewards_table.c.job_id == job_id)
        ).first()
        if exists is not None:
            return False
        self.conn.execute(rewards_table.insert(), [{"node_id": node_id, "job_id": job_id, "seq": seq}])
        return True


# -- verification --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LedgerReport:
    ok: bool
    size: int
    root: bytes
    problems: tuple[str, ...]
    first_bad_entry: int | None
    checkpoints_checked: int

    def to_json(self) -> dict[str, Any]:
        return {
            "intact": self.ok, "tree_size": self.size, "root": format_digest(self.root),
            "first_bad_entry": self.first_bad_entry, "checkpoints_checked": self.checkpoints_checked,
            "problems": list(self.problems),
        }  # fmt: skip


def verify_ledger(ledger: Ledger, *, checkpoint: Checkpoint | None = None) -> LedgerReport:
    """Recompute everything from the entries' bytes.

    1. Entries are numbered 0..n-1 with no gap, and each body names its own seq, kind and node.
    2. Each leaf hash and every stored subtree hash equals the one recomputed from the bodies.
    3. Every checkpoint entry is signed by the operator and its root is the recomputed root at its size.
    4. A given (external) checkpoint: same, and the log has not shrunk below it.
    5. The derived tables (slash evidence, rewards) match the events.
    """
    problems: list[str] = []
    exact: list[int] = []  # entries known to be bad
    ranges: list[int] = []  # starts of ranges known to hold a bad entry (interior hashes, signed roots)

    def bad(seq: int | None, message: str, *, exact_entry: bool = True) -> None:
        problems.append(message)
        if seq is not None:
            (exact if exact_entry else ranges).append(seq)

    # 1.
    leaves: list[bytes] = []
    checkpoints: list[tuple[int, Checkpoint]] = []
    slashes: dict[str, int] = {}
    rewards: dict[tuple[str, str], int] = {}
    expected = 0
    for entry in ledger.entries():
        if entry.seq != expected:
            bad(expected, f"entry {expected} is missing (the next stored entry is {entry.seq})")
            expected = entry.seq
        try:
            event = entry.event
        except InvalidInputError as exc:
            bad(entry.seq, f"entry {entry.seq} body is not canonical JSON: {exc.message}")
            event = {}
        if event and (
            event.get("seq") != entry.seq or event.get("kind") != entry.kind or event.get("node_id") != entry.node_id
        ):
            bad(entry.seq, f"entry {entry.seq} does not match its own body (moved, reordered or edited)")
        if event.get("kind") == "checkpoint":
            try:
                checkpoints.append((entry.seq, Checkpoint.from_json(event, what=f"checkpoint entry {entry.seq}")))
            except InvalidInputError as exc:
                bad(entry.seq, exc.message)
        elif event.get("kind") == "slash" and isinstance(event.get("evidence_digest"), str):
            slashes[event["evidence_digest"]] = entry.seq
        elif event.get("kind") == "reward":
            rewards[(str(event.get("node_id")), str(event.get("job_id")))] = entry.seq
        leaves.append(entry.leaf_hash)
        expected += 1
    size = len(leaves)
    # 2. Recompute every perfect subtree level by level and compare with what is stored.
    levels = [leaves]
    while len(levels[-1]) > 1:
        prev = levels[-1]
        levels.append([merkle.node_hash(prev[i], prev[i + 1]) for i in range(0, len(prev) - 1, 2)])
    stored_count = 0
    with ledger.engine.connect() as conn:
        query = sa.select(nodes_table).order_by(nodes_table.c.level, nodes_table.c.idx)
        for row in conn.execution_options(stream_results=True, yield_per=50_000).execute(query):
            stored_count += 1
            if not isinstance(row.level, int) or not isinstance(row.idx, int) or row.level < 0 or row.idx < 0:
                bad(None, f"stored tree node key ({row.level!r}, {row.idx!r}) is malformed")
                continue
            level, idx, h = row.level, row.idx, _as_bytes(row.hash)
            if level >= len(levels) or idx >= len(levels[level]):
                bad(None, f"stored tree node ({level}, {idx}) lies beyond the entries (log truncated or node inserted)")
            elif levels[level][idx] != h:
                message = f"stored hash of leaves [{idx << level}, {(idx + 1) << level}) differs from the entries"
                bad(idx << level, message, exact_entry=level == 0)
        stored_slashes = {r.evidence_digest: int(r.seq) for r in conn.execute(sa.select(slash_evidence_table))}
        stored_rewards = {(r.node_id, r.job_id): int(r.seq) for r in conn.execute(sa.select(rewards_table))}
    if stored_count != sum(len(lv) for lv in levels):
        bad(None, f"{stored_count} stored tree nodes where the entries imply {sum(len(lv) for lv in levels)}")

    def root_at(n: int) -> bytes:
        if n == 0:
            return merkle.EMPTY_ROOT
        return merkle.fold_parts([levels[lv][i] for lv, i in merkle.perfect_parts(0, n)])

    # 3. and 4. An entry rewritten together with every stored hash shows only against a signed
    # root; the first bad entry then lies between the last checkpoint that still holds and the
    # first that does not.
    signed: list[tuple[str, Checkpoint]] = [(f"checkpoint entry {seq}", cp) for seq, cp in checkpoints]
    if checkpoint is not None:
        signed.append(("the given checkpoint", checkpoint))
    holding = [0]
    failing: list[tuple[str, Checkpoint]] = []
    for where, cp in sorted(signed, key=lambda item: item[1].tree_size):
        if cp.ledger_id != ledger.ledger_id or not cp.verify(ledger.operator):
            bad(None, f"{where} is not signed by this ledger's operator")
        elif cp.tree_size > size:
            bad(size, f"log truncated: {size} entries, {where} saw {cp.tree_size}")
        elif root_at(cp.tree_size) != cp.root:
            failing.append((where, cp))
        else:
            holding.append(cp.tree_size)
    for where, cp in failing:
        lo = max(n for n in holding if n <= cp.tree_size)
        bad(lo, f"entries {lo}..{cp.tree_size - 1} do not give the root signed by {where}", exact_entry=False)
    for seq, cp in checkpoints:
        if cp.tree_size > seq:
            bad(seq, f"checkpoint entry {seq} claims a tree of {cp.tree_size} entries before it")
    # 5.
    if stored_slashes != slashes:
        bad(None, "slash-evidence index does not match the slash events")
    if stored_rewards != rewards:
        bad(None, "reward index does not match the reward events")
    return LedgerReport(
        not problems,
        size,
        root_at(size),
        tuple(problems),
        min(exact or ranges) if exact or ranges else None,
        len(checkpoints),
    )


INCLUSION_TYPE = "verimesh/inclusion-proof"


def inclusion_document(ledger: Ledger, seq: int) -> dict[str, Any]:
    """Entry ``seq`` with its RFC 9162 inclusion proof under the latest checkpoint covering it."""
    entry = ledger.entry(seq)
    cp = ledger.latest_checkpoint(covering=seq)
    if cp is None:
        raise InvalidInputError(f"no checkpoint covers entry {seq} yet", hint="run `verimesh ledger checkpoint` first")
    return {
        "type": INCLUSION_TYPE, "version": 1, "ledger_id": ledger.ledger_id, "seq": seq,
        "entry": b64encode(entry.body), "tree_size": cp.tree_size,
        "inclusion_proof": [b64encode(h) for h in ledger.inclusion_proof(seq, cp.tree_size)],
        "checkpoint": cp.to_json(),
    }  # fmt: skip


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
