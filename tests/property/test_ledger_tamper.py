"""Random edits to the rows of a SQLite ledger (entries, their columns, stored hashes, the
``ledger_meta`` cache) are always found by `ledger verify`, which never crashes on them; edits that
only a signed root can expose are found through the batch signatures and the checkpoint."""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from verimesh.core.digest import sha256_bytes
from verimesh.ledger.events import sign_request
from verimesh.ledger.store import Ledger, verify_ledger
from verimesh.signing.keys import generate_key

SIZE = (
    37  # genesis and its commit, 3 registrations and a commit, 28 job posts and a commit, a checkpoint and its commit
)
NODES = [generate_key() for _ in range(3)]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ledger")
    op = generate_key()
    led = Ledger.create(str(d / "mesh.db"), op)
    led.append(
        [{"kind": "register", "node_id": k.node_id, "stake": 10 + i,
          **sign_request(k, action="register", ledger_id=led.ledger_id, amount=10 + i).to_json()}
         for i, k in enumerate(NODES)],
        writer=op,
    )  # fmt: skip
    jobs = []
    for i in range(28):
        job_id = "sha256:" + sha256_bytes(b"job %d" % i)[7:]
        request = sign_request(op, action="job", ledger_id=led.ledger_id, amount=5, job_id=job_id)
        jobs.append({"kind": "job", "job_id": job_id, "owner": op.node_id, "deposit": 5, **request.to_json()})
    led.append(jobs, writer=op)
    led.checkpoint(op)
    with sqlite3.connect(d / "mesh.db") as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert verify_ledger(led).ok and verify_ledger(led).size == SIZE
    return d / "mesh.db"


edits = st.one_of(
    st.tuples(st.just("flip-body"), st.integers(0, SIZE - 1), st.integers(0, 10_000), st.integers(1, 255)),
    st.tuples(st.just("delete"), st.integers(0, SIZE - 1)),
    st.tuples(st.just("swap"), st.integers(0, SIZE - 1), st.integers(0, SIZE - 1)),
    st.tuples(st.just("kind"), st.integers(0, SIZE - 1), st.sampled_from(["verdict", "slash", "job", "commit", "x"])),
    st.tuples(st.just("node"), st.integers(0, SIZE - 1), st.sampled_from([NODES[0].node_id, "vm-9", ""])),
    st.tuples(st.just("claim"), st.integers(0, SIZE - 1), st.sampled_from([None, "job:x", "request:y"])),
    st.tuples(
        st.just("meta"),
        st.sampled_from(["setting.reward", "setting.fraud_fraction", "ledger_id"]),
        st.sampled_from(["", "7", '"0.9"', None]),
    ),
    st.tuples(st.just("text-body"), st.integers(0, SIZE - 1)),
    st.tuples(st.just("hash"), st.integers(0, 5), st.integers(0, SIZE - 1), st.binary(min_size=0, max_size=40)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=60)),
)


def apply_edit(db: Path, edit: tuple[object, ...]) -> bool:
    """Apply one edit; False when it happened to change nothing."""
    kind = edit[0]
    with sqlite3.connect(db) as conn:
        cur = conn.cursor()
        present = {r[0] for r in cur.execute("SELECT seq FROM ledger_entries")}
        if kind in ("flip-body", "delete", "kind", "node", "claim", "text-body") and edit[1] not in present:
            return False  # an earlier edit removed the row
        if kind == "swap" and not {edit[1], edit[2]} <= present:
            return False
        if kind == "flip-body":
            _, seq, offset, mask = edit
            stored = cur.execute("SELECT body FROM ledger_entries WHERE seq = ?", (seq,)).fetchone()[0]
            body = bytearray(stored.encode() if isinstance(stored, str) else stored)
            body[int(offset) % len(body)] ^= int(mask)  # type: ignore[call-overload]
            cur.execute("UPDATE ledger_entries SET body = ? WHERE seq = ?", (bytes(body), seq))
        elif kind == "delete":
            cur.execute("DELETE FROM ledger_entries WHERE seq = ?", (edit[1],))
        elif kind == "swap":
            a, b = edit[1], edit[2]
            if a == b:
                return False
            ra = cur.execute("SELECT kind, node_id, body FROM ledger_entries WHERE seq = ?", (a,)).fetchone()
            rb = cur.execute("SELECT kind, node_id, body FROM ledger_entries WHERE seq = ?", (b,)).fetchone()
            cur.execute("UPDATE ledger_entries SET kind = ?, node_id = ?, body = ? WHERE seq = ?", (*rb, a))
            cur.execute("UPDATE ledger_entries SET kind = ?, node_id = ?, body = ? WHERE seq = ?", (*ra, b))
        elif kind == "meta":
            _, key, value = edit
            old = cur.execute("SELECT value FROM ledger_meta WHERE key = ?", (key,)).fetchone()
            if value is None:
                return cur.execute("DELETE FROM ledger_meta WHERE key = ?", (key,)).rowcount == 1
            if old is not None and old[0] == value:
                return False
            cur.execute("INSERT OR REPLACE INTO ledger_meta (key, value) VALUES (?, ?)", (key, value))
        elif kind in ("kind", "node", "claim"):
            column = {"kind": "kind", "node": "node_id", "claim": "claim"}[str(kind)]
            old = cur.execute(f"SELECT {column} FROM ledger_entries WHERE seq = ?", (edit[1],)).fetchone()[0]
            if old == edit[2]:
                return False
            try:
                cur.execute(f"UPDATE ledger_entries SET {column} = ? WHERE seq = ?", (edit[2], edit[1]))
            except sqlite3.IntegrityError:
                return False  # the unique claim column refused the edit itself
        elif kind == "text-body":
            cur.execute("UPDATE ledger_entries SET body = CAST(body AS TEXT) || ' ' WHERE seq = ?", (edit[1],))
        elif kind == "hash":
            _, level, idx, value = edit
            row = cur.execute("SELECT hash FROM ledger_tree_nodes WHERE level = ? AND idx = ?", (level, idx)).fetchone()
            if row is None or row[0] == value:
                return False
            cur.execute("UPDATE ledger_tree_nodes SET hash = ? WHERE level = ? AND idx = ?", (value, level, idx))
        elif kind == "append":
            sql = "INSERT OR IGNORE INTO ledger_entries (seq, kind, node_id, body) VALUES (?, 'job', NULL, ?)"
            return cur.execute(sql, (SIZE, edit[1])).rowcount == 1
    return True


def contents(db: Path) -> tuple[list[tuple[object, ...]], ...]:
    with sqlite3.connect(db) as conn:
        conn.text_factory = bytes
        entries = conn.execute(
            "SELECT seq, kind, node_id, claim, typeof(body), body FROM ledger_entries ORDER BY seq"
        ).fetchall()
        nodes = conn.execute(
            "SELECT level, idx, typeof(hash), hash FROM ledger_tree_nodes ORDER BY level, idx"
        ).fetchall()
        meta = conn.execute("SELECT key, value FROM ledger_meta ORDER BY key").fetchall()
    return entries, nodes, meta


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(edits, min_size=1, max_size=3))
@example([("flip-body", 0, 0, 128), ("text-body", 0)])  # a body made non-UTF-8 text once crashed the reader
def test_random_row_edits_are_always_found(pristine: Path, edit_list: list[tuple[object, ...]]) -> None:
    with tempfile.TemporaryDirectory() as d:
        db = Path(d) / "mesh.db"
        shutil.copy(pristine, db)
        before = contents(db)
        for e in edit_list:
            apply_edit(db, e)
        if contents(db) == before:
            return  # the edits cancelled out (two swaps of the same rows, say)
        report = verify_ledger(Ledger.open(str(db)))
        assert not report.ok, edit_list
        assert report.problems
