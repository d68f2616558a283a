"""The coordinator's read side in process: /v1/status's job count, and the lease gate's standings
(read again exactly for the nodes the ledger's growth names; every one on a governance entry)."""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.testclient import TestClient

from verimesh.ledger.events import sign_request
from verimesh.mesh import coordinator as coordinator_module
from verimesh.mesh.coordinator import STATUS_JOBS, Coordinator
from verimesh.settlement import NODE_KINDS, register_node
from verimesh.signing.keys import generate_key


@pytest.fixture
def coordinator(tmp_path: Path) -> Coordinator:
    return Coordinator(f"sqlite:///{tmp_path / 'm.db'}", generate_key(), isolate=False)


def test_status_takes_a_count_of_the_newest_jobs(coordinator: Coordinator) -> None:
    client = TestClient(coordinator.app())
    doc = client.get("/v1/status?jobs=0").json()
    assert doc["jobs"] == [] and doc["tasks"] == {} and doc["ledger"]["size"] >= 1
    assert client.get(f"/v1/status?jobs={STATUS_JOBS}").status_code == 200
    for bad in (str(STATUS_JOBS + 1), "-1", "x", "1e3", ""):
        refused = client.get(f"/v1/status?jobs={bad}")
        assert refused.status_code == 422 and refused.json()["error"]["code"] == "bad-jobs", bad


def test_the_lease_gate_reads_again_only_the_nodes_the_ledger_grew_by(
    coordinator: Coordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger, operator = coordinator.ledger, coordinator.operator
    a, b, c = generate_key(), generate_key(), generate_key()
    for key, stake in ((a, 10), (b, 20)):
        register_node(ledger, sign_request(key, action="register", ledger_id=ledger.ledger_id, amount=stake),
                      writer=operator)  # fmt: skip
    read: list[list[str]] = []
    real = coordinator_module.standings_of
    monkeypatch.setattr(coordinator_module, "standings_of", lambda led, ids: read.append(list(ids)) or real(led, ids))
    assert coordinator._bonded(a.node_id)[0] == 10 and coordinator._bonded(b.node_id)[0] == 20
    assert read == [[a.node_id], [b.node_id]]
    assert coordinator._bonded(a.node_id)[0] == 10 and len(read) == 2  # the ledger did not grow
    before = ledger.size()
    register_node(ledger, sign_request(c, action="register", ledger_id=ledger.ledger_id, amount=30), writer=operator)
    assert ledger.changed_nodes(before, NODE_KINDS) == {c.node_id}
    assert coordinator._bonded(a.node_id)[0] == 10 and len(read) == 2  # c's registration changes nobody else
    assert coordinator._bonded(c.node_id)[0] == 30 and read[-1] == [c.node_id]
    before = ledger.size()
    ledger.change_settings(operator, {"fraud_fraction": "0.5"})  # governance: every standing is read again
    assert ledger.changed_nodes(before, NODE_KINDS) is None
    assert coordinator._bonded(b.node_id)[0] == 20
    assert sorted(read[-1]) == sorted([a.node_id, b.node_id, c.node_id])


def test_blobs_are_kept_in_memory_only_when_they_match_their_name(
    coordinator: Coordinator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    from verimesh.core.digest import sha256_bytes

    good, bad = b"step bytes" * 100, b"the real bytes"
    digest = coordinator.state.upload("owner", good, quota=1 << 20)
    forged = sha256_bytes(b"what the name promises")
    with sqlite3.connect(tmp_path / "m.db") as conn:
        conn.execute("INSERT INTO mesh_blobs (digest, size, data, created, referenced) VALUES (?, ?, ?, 0, 1)",
                     (forged, len(bad), bad))  # fmt: skip
    reads: list[str] = []
    real = coordinator.state.blob
    monkeypatch.setattr(coordinator.state, "blob", lambda d: reads.append(d) or real(d))
    assert coordinator._stored(digest) == good and coordinator._stored(digest) == good
    assert reads == [digest]  # read from the database once
    with sqlite3.connect(tmp_path / "m.db") as conn:  # edited since: the bytes its name pins are served
        conn.execute("UPDATE mesh_blobs SET data = ? WHERE digest = ?", (b"edited", digest))
    assert coordinator._stored(digest) == good
    assert coordinator._stored(forged) == bad and coordinator._stored(forged) == bad
    assert reads == [digest, forged, forged]  # a blob that does not match its name is never kept
