"""The checked tail a process keeps (``LedgerView`` walks only what was appended since its last
view): each view is the one a process that remembers nothing builds, an edited or relabelled row
changes nothing a decision here reads and is found by every other reader, and a writer signs over
the tree it checked, never over stored nodes edited since."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import pytest

from tests.conftest import Keys
from tests.integration.test_ledger import fraud_bundle, join, new_ledger, operator, post, settle
from verimesh.errors import IntegrityError
from verimesh.jobs.job import Job
from verimesh.ledger.events import sign_request
from verimesh.ledger.store import Ledger, LedgerView, verify_ledger, writing
from verimesh.settlement import node_standing, top_up, withdraw
from verimesh.signing.keys import SecretKey, generate_key


def _same(a: LedgerView, b: LedgerView, node_ids: list[str]) -> None:
    assert (a.size, a.anchor, a.anchor_root, a.frontier) == (b.size, b.anchor, b.anchor_root, b.frontier)
    assert a.settings == b.settings and a.verifiers.keys() == b.verifiers.keys()
    assert a._tail_leaves == b._tail_leaves
    for node_id in node_ids:
        assert a.entries(node_id=node_id) == b.entries(node_id=node_id)
        assert a.entries(node_id=node_id, kinds=["register", "top-up"]) == b.entries(
            node_id=node_id, kinds=["register", "top-up"]
        )
    assert a.entries(kinds=["settings"]) == b.entries(kinds=["settings"])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_every_view_is_the_one_a_fresh_process_builds(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    led = new_ledger(tmp_path / "l.db", reward=3)
    op = operator(led)
    nodes: list[SecretKey] = []
    for step in range(40):
        action = rng.choice(["join", "top-up", "settings", "checkpoint", "none"] if nodes else ["join"])
        if action == "join":
            nodes.append(generate_key())
            join(led, nodes[-1], 100)
        elif action == "top-up":
            key = rng.choice(nodes)
            top_up(led, sign_request(key, action="top-up", ledger_id=led.ledger_id, amount=5), writer=op)
        elif action == "settings":
            led.change_settings(op, {"reward": rng.randint(1, 9)})
        elif action == "checkpoint":
            led.checkpoint(op)
        ids = [k.public.node_id for k in nodes]
        with led.view() as kept, Ledger.open(led.url).view() as fresh:
            _same(kept, fresh, ids)
        if step % 7 == 0:  # a standing read here equals one read by another process
            assert node_standing(led, ids[0]) == node_standing(Ledger.open(led.url), ids[0])
    assert led.tail_stats["extended"] > led.tail_stats["walked"]
    assert verify_ledger(led).ok


def test_a_view_walks_only_the_entries_appended_since(tmp_path: Path, keys: Keys) -> None:
    led = new_ledger(tmp_path / "l.db")
    join(led, keys.node, 100)
    with led.view():
        pass
    fed: list[int] = []
    original = Ledger.entries

    def counting(self: Ledger, **kwargs: object) -> object:
        for e in original(self, **kwargs):  # type: ignore[arg-type]
            fed.append(e.seq)
            yield e

    size = led.size()
    top_up(led, sign_request(keys.node, action="top-up", ledger_id=led.ledger_id, amount=5), writer=operator(led))
    Ledger.entries = counting  # type: ignore[assignment,method-assign]
    try:
        with led.view() as view:
            assert view.size == size + 2
    finally:
        Ledger.entries = original  # type: ignore[method-assign]
    # the entry it walked last (read again: still as walked?), then the top-up and its commit
    assert fed == [size - 1, size, size + 1]


def test_a_relabelled_slash_still_counts_here_and_is_found_everywhere_else(
    tmp_path: Path, keys: Keys, jobs: dict[str, Job]
) -> None:
    """A row after the checkpoint whose node column is edited would hide a slash from a query by
    node: this process answers from the rows it walked; every other process refuses the ledger."""
    led = new_ledger(tmp_path / "mesh.db", fraud_fraction="0.5", reward=3)
    join(led, keys.node, 1000)
    post(led, jobs["mlp"].job_id, deposit=100)
    led.checkpoint(operator(led))
    settled = settle(fraud_bundle(jobs["mlp"], keys.node, tmp_path / "cheat.vmb"), jobs["mlp"], led)
    assert settled.verdict.status == "reject"
    slash = next(seq for seq, kind in settled.appended if kind == "slash")
    before = node_standing(led, keys.node.node_id)
    assert before.stake == 500 and before.slashes
    with sqlite3.connect(tmp_path / "mesh.db") as conn:
        conn.execute("UPDATE ledger_entries SET node_id = 'vm-nobody' WHERE seq = ?", (slash,))
    assert node_standing(led, keys.node.node_id) == before  # the slash still counts here
    with pytest.raises(IntegrityError):
        node_standing(Ledger.open(led.url), keys.node.node_id)
    with pytest.raises(IntegrityError):  # nor does this process sign a checkpoint over it
        led.checkpoint(operator(led))
    assert not verify_ledger(led).ok


def test_a_writer_never_signs_over_an_edited_stored_node(tmp_path: Path, keys: Keys) -> None:
    """An edited node on the stored tree's right edge: the process that checked the tree sees its
    edge differ, walks the store and refuses to write; restored, it writes a commit that verifies."""
    led = new_ledger(tmp_path / "l.db")
    join(led, keys.node, 100)
    with led.view():
        pass  # this process has checked the tree
    with sqlite3.connect(tmp_path / "l.db") as conn:  # the right edge's top node, edited
        level, idx, original = conn.execute(
            "SELECT level, idx, hash FROM ledger_tree_nodes ORDER BY level DESC LIMIT 1"
        ).fetchone()
        conn.execute("UPDATE ledger_tree_nodes SET hash = ? WHERE level = ? AND idx = ?", (b"\x00" * 32, level, idx))
    request = sign_request(keys.node, action="top-up", ledger_id=led.ledger_id, amount=5)
    with pytest.raises(IntegrityError):
        top_up(led, request, writer=operator(led))
    assert not verify_ledger(Ledger.open(led.url)).ok  # the edited node is found everywhere
    with sqlite3.connect(tmp_path / "l.db") as conn:
        conn.execute("UPDATE ledger_tree_nodes SET hash = ? WHERE level = ? AND idx = ?", (original, level, idx))
    top_up(led, request, writer=operator(led))
    report = verify_ledger(Ledger.open(led.url))
    assert report.ok, report.problems  # and the commit written meanwhile signs the true root


def test_a_checkpoint_walks_the_kept_stretch_from_the_store_again(tmp_path: Path, keys: Keys) -> None:
    """Review: a row relabelled after this process walked it (a withdrawal hidden from queries by
    node) was in neither the store digest the checkpoint compares (it ends at the previous
    checkpoint) nor a walk (the view answered from memory): the operator signed over it, and the
    node could withdraw the same stake again in any other process."""
    led = new_ledger(tmp_path / "l.db")
    join(led, keys.node, 1000)
    op = operator(led)
    led.checkpoint(op)
    seq = withdraw(led, sign_request(keys.node, action="withdraw", ledger_id=led.ledger_id, amount=1000), writer=op)
    assert node_standing(led, keys.node.node_id).stake == 0
    with sqlite3.connect(tmp_path / "l.db") as conn:
        conn.execute("UPDATE ledger_entries SET node_id = 'vm-nobody' WHERE seq = ?", (seq,))
    with pytest.raises(IntegrityError, match=f"entry {seq}"):
        led.checkpoint(op)
    assert node_standing(led, keys.node.node_id).stake == 0  # and nothing here forgot the withdrawal


def test_a_row_deleted_and_a_filler_at_a_negative_seq_is_found(
    tmp_path: Path, keys: Keys, jobs: dict[str, Job]
) -> None:
    """Review: the count of rows equalled max(seq) + 1 with a slash before the checkpoint deleted
    and a row at seq -1 inserted, so no view saw the gap and the slash vanished everywhere."""
    led = new_ledger(tmp_path / "mesh.db", fraud_fraction="0.5", reward=3)
    join(led, keys.node, 1000)
    post(led, jobs["mlp"].job_id, deposit=100)
    settled = settle(fraud_bundle(jobs["mlp"], keys.node, tmp_path / "cheat.vmb"), jobs["mlp"], led)
    slash = next(seq for seq, kind in settled.appended if kind == "slash")
    led.checkpoint(operator(led))
    with sqlite3.connect(tmp_path / "mesh.db") as conn:
        conn.execute("DELETE FROM ledger_entries WHERE seq = ?", (slash,))
        conn.execute("INSERT INTO ledger_entries (seq, kind, node_id, job_id, claim, body) "
                     "VALUES (-1, 'zzz', NULL, NULL, NULL, x'00')")  # fmt: skip
    for process in (led, Ledger.open(led.url)):
        with pytest.raises(IntegrityError, match="not all there"):
            node_standing(process, keys.node.node_id)


def test_a_log_cut_short_after_this_process_checked_it_is_refused(tmp_path: Path, keys: Keys) -> None:
    """Review: the last batches deleted (rows and the tree nodes over them) rolled a withdrawal
    back; the process that had checked the longer log now refuses the shorter one (a process that
    never saw it cannot tell: a saved checkpoint or `ledger verify --checkpoint` anchors that)."""
    led = new_ledger(tmp_path / "l.db")
    op = operator(led)
    join(led, keys.node, 1000)
    led.checkpoint(op)
    cut = led.size()
    withdraw(led, sign_request(keys.node, action="withdraw", ledger_id=led.ledger_id, amount=1000), writer=op)
    assert node_standing(led, keys.node.node_id).stake == 0
    with sqlite3.connect(tmp_path / "l.db") as conn:
        conn.execute("DELETE FROM ledger_entries WHERE seq >= ?", (cut,))
        conn.execute("DELETE FROM ledger_tree_nodes WHERE ((idx + 1) << level) > ?", (cut,))
    with pytest.raises(IntegrityError, match="checked it up to entry"):
        node_standing(led, keys.node.node_id)
    with pytest.raises(IntegrityError):
        top_up(led, sign_request(keys.node, action="top-up", ledger_id=led.ledger_id, amount=1), writer=op)


@pytest.mark.parametrize("regrown", [2, 4])
def test_a_log_cut_and_grown_again_is_walked_from_the_store(tmp_path: Path, keys: Keys, regrown: int) -> None:
    """Review: the last batch deleted and as many entries or more appended by another process:
    this process extended its memory of the deleted entries (a withdrawal the store no longer
    holds) and signed its next commit over a tree that is not the stored one. It now sees the
    stored end differ from the one it walked and walks the store: its view is every other
    process's, and what it writes next verifies."""
    led = new_ledger(tmp_path / "l.db")
    op = operator(led)
    join(led, keys.node, 1000)
    led.checkpoint(op)
    cut = led.size()
    withdraw(led, sign_request(keys.node, action="withdraw", ledger_id=led.ledger_id, amount=1000), writer=op)
    assert node_standing(led, keys.node.node_id).stake == 0
    with sqlite3.connect(tmp_path / "l.db") as conn:
        conn.execute("DELETE FROM ledger_entries WHERE seq >= ?", (cut,))
        conn.execute("DELETE FROM ledger_tree_nodes WHERE ((idx + 1) << level) > ?", (cut,))
    other = Ledger.open(led.url)
    for _ in range(regrown // 2):  # each top-up is two entries (it and its commit)
        top_up(other, sign_request(keys.node, action="top-up", ledger_id=led.ledger_id, amount=5), writer=op)
    assert led.size() >= cut + 2
    with led.view() as kept, Ledger.open(led.url).view() as fresh:
        _same(kept, fresh, [keys.node.node_id])
    assert node_standing(led, keys.node.node_id).stake == 1000 + 5 * (regrown // 2)
    top_up(led, sign_request(keys.node, action="top-up", ledger_id=led.ledger_id, amount=1), writer=op)
    report = verify_ledger(Ledger.open(led.url))
    assert report.ok, report.problems


def test_a_write_inside_another_on_one_thread_fails_at_once(tmp_path: Path) -> None:
    """SQLite's write lock is held by the outer transaction: the inner one would poll for it until
    the busy timeout (a minute) and then fail; it is refused at once, and the lock is free after."""
    led = new_ledger(tmp_path / "l.db")
    with writing(led.engine):
        with pytest.raises(RuntimeError, match="inside another"):
            with writing(led.engine):
                pass
    with writing(led.engine) as conn:
        assert conn.exec_driver_sql("SELECT 1").scalar() == 1
