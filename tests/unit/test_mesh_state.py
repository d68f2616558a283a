"""The mesh's task board on its own (``mesh.state``): which node may lease which task."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from verimesh.mesh.state import MeshState


def _spec(device: str, segments: int | None = None) -> dict[str, object]:
    files = {"job": "sha256:" + "1" * 64, "model": "sha256:" + "2" * 64, "input": "sha256:" + "3" * 64, "steps": []}
    return {"files": files, "deadline": 60.0, "max_attempts": 3, "posted": [], "device": device,
            "segments": None if segments is None else [[i, i + 1] for i in range(segments)]}  # fmt: skip


def test_tasks_no_node_may_take_never_hide_the_ones_behind_them(tmp_path: Path) -> None:
    """A backlog of tasks a node cannot take (jobs for another device, segments waiting for their
    predecessors), however deep, does not keep a node from the job it may take behind them."""
    state = MeshState(sa.create_engine(f"sqlite:///{tmp_path / 'm.db'}"))
    state.join("cpu-node", "key", "cpu")
    for i in range(40):
        state.add_job(f"sha256:{i:064x}", "owner", _spec("cuda"))
    for i in range(10):
        state.add_job(f"sha256:{1000 + i:064x}", "owner", _spec("any", segments=8), positions=8)
    last = f"sha256:{'f' * 64}"
    state.add_job(last, "victim", _spec("any"))
    leases = []
    for n in range(11):  # the 10 split jobs' first segments, then the victim's job
        state.join(f"node-{n}", "key", "cpu")
        lease = state.lease(f"node-{n}", deadline_default=60)
        assert lease is not None and lease.position == 0
        leases.append(lease.job_id)
    assert leases[-1] == last
    state.join("gpu-node", "key", "cuda")
    gpu = state.lease("gpu-node", deadline_default=60)
    assert gpu is not None and gpu.job_id == f"sha256:{0:064x}"
    assert state.lease("cpu-node", deadline_default=60) is None  # nothing left a CPU node may take


def test_replicas_go_to_distinct_nodes_and_an_older_database_gains_the_column(tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'm.db'}")
    with engine.begin() as conn:  # the task table as a coordinator before replicas made it
        conn.execute(sa.text("CREATE TABLE mesh_tasks (task_id VARCHAR(40) PRIMARY KEY, job_id VARCHAR(71) NOT NULL, "
                             "position INTEGER NOT NULL, state VARCHAR(16) NOT NULL, node_id VARCHAR(64), "
                             "lease_id VARCHAR(32), leased_at FLOAT, lease_deadline FLOAT, attempts INTEGER NOT NULL, "
                             "excluded TEXT NOT NULL, bundle VARCHAR(71), verdict TEXT, history TEXT NOT NULL, "
                             "created FLOAT NOT NULL, updated FLOAT NOT NULL)"))  # fmt: skip
        conn.execute(sa.text("INSERT INTO mesh_tasks VALUES ('old', 'sha256:x', 0, 'done', NULL, NULL, NULL, NULL, "
                             "1, '[]', NULL, NULL, '[]', 0, 0)"))  # fmt: skip
    state = MeshState(engine)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT replica FROM mesh_tasks WHERE task_id = 'old'")).scalar_one() == 0
    job = f"sha256:{'e' * 64}"
    state.add_job(job, "owner", {**_spec("any"), "replicas": 3}, replicas=3)
    taken = []
    for n in range(4):
        state.join(f"node-{n}", "key", "cpu")
        lease = state.lease(f"node-{n}", deadline_default=60)
        taken.append(None if lease is None else lease.task_id)
        again = state.lease(f"node-{n}", deadline_default=60)  # a node's own lease comes back, never a second
        assert (again and again.task_id) == taken[-1]
    assert len(set(taken[:3])) == 3 and taken[3] is None
    doc = state.job(job)
    assert doc is not None and sorted(t["replica"] for t in doc["tasks"]) == [0, 1, 2]


def test_keys_that_walk_away_fail_a_task_only_on_an_admitted_mesh(tmp_path: Path) -> None:
    """On an open mesh a fresh key costs nothing: twenty keys that lease and give back a task only
    delay it (each is excluded from it). On a mesh of admitted nodes, CHURN x max_attempts
    unanswered leases fail it."""
    for churn, fails_after in ((None, None), (5, 15)):
        state = MeshState(sa.create_engine(f"sqlite:///{tmp_path / f'm-{churn}.db'}"), churn=churn)
        job = f"sha256:{'d' * 64}"
        state.add_job(job, "owner", _spec("any"))
        for n in range(20):
            state.join(f"node-{n}", "key", "cpu")
            lease = state.lease(f"node-{n}", deadline_default=60)
            if lease is None:
                break
            state.release(f"node-{n}", lease.task_id, lease.lease_id, "busy")
        doc = state.job(job)
        assert doc is not None
        if fails_after is None:
            assert doc["state"] == "open" and doc["tasks"][0]["state"] == "pending"
            assert len(doc["tasks"][0]["history"]) == 20
        else:
            assert doc["state"] == "failed" and len(doc["tasks"][0]["history"]) == fails_after


def test_a_heartbeat_after_the_timeout_does_not_bring_a_lost_lease_back(tmp_path: Path) -> None:
    """Review: the late node's own beat refreshed its last_seen before leases were expired, so on a
    mesh where nobody else asked in between, a node silent past the timeout kept its lease."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'm.db'}")
    state = MeshState(engine, heartbeat_timeout=3.0)
    state.join("late", "key", "cpu")
    job = f"sha256:{'a' * 64}"
    state.add_job(job, "owner", _spec("any"))
    lease = state.lease("late", deadline_default=60)
    assert lease is not None and state.heartbeat("late") == [lease.task_id]  # in time: it stands
    with engine.begin() as conn:  # silent for 10 s, and no other node asked meanwhile
        conn.execute(sa.text("UPDATE mesh_nodes SET last_seen = last_seen - 10"))
    assert state.heartbeat("late") == []
    again = state.lease("late", deadline_default=60)
    assert again is None  # the task is pending again, for another node: never the same
    with engine.connect() as conn:
        row = conn.execute(sa.text("SELECT state, excluded FROM mesh_tasks")).one()
    assert row.state == "pending" and "late" in row.excluded


def test_beats_close_together_are_written_once_and_a_lapsed_deadline_still_counts(tmp_path: Path) -> None:
    """A beat within a tenth of the timeout of the last one written changes nothing stored (the
    write lock is the mesh's busiest resource); one later is written; and a lease whose deadline
    passed is lost at the node's next beat however close together its beats come."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'm.db'}")
    state = MeshState(engine, heartbeat_timeout=30.0)

    def seen() -> float:
        with engine.connect() as conn:
            return float(conn.execute(sa.text("SELECT last_seen FROM mesh_nodes")).scalar_one())

    state.join("n", "key", "cpu")
    job = f"sha256:{'b' * 64}"
    state.add_job(job, "owner", _spec("any"))
    lease = state.lease("n", deadline_default=60)
    assert lease is not None
    first = seen()
    assert state.heartbeat("n") == [lease.task_id] and seen() == first  # read only
    with engine.begin() as conn:  # the last written beat, 4 s ago (a tenth of the timeout is 3 s)
        conn.execute(sa.text("UPDATE mesh_nodes SET last_seen = last_seen - 4"))
    assert state.heartbeat("n") == [lease.task_id] and seen() >= first  # written again (it was first - 4)
    with engine.begin() as conn:  # its deadline passed a moment ago
        conn.execute(sa.text("UPDATE mesh_tasks SET lease_deadline = :t"), {"t": seen() - 1})
    assert state.heartbeat("n") == []
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT state FROM mesh_tasks")).scalar_one() == "pending"
