"""The ledger on PostgreSQL (docs/design.md §6: several verifiers sharing one ledger), against a throwaway
local server started for this module: settlement, checkpoints and proofs, an edited row found,
and concurrent writers in separate processes losing nothing.

Needs PostgreSQL's server binaries (initdb, pg_ctl): on PATH, or where Debian's postgresql package puts them
(/usr/lib/postgresql/<version>/bin). `make install` installs them (`make system-deps`); without them this module
fails, never skips."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from tests.conftest import Keys
from verimesh.cli.app import cli
from verimesh.core import merkle
from verimesh.jobs.job import Job
from verimesh.ledger.store import Ledger, verify_ledger
from verimesh.settlement import register_node, verify_and_settle
from verimesh.signing.keys import generate_key, write_key_pair
from verimesh.workflows import prove

pytestmark = pytest.mark.slow


DEBIAN_PG = Path("/usr/lib/postgresql")


def pg_binaries() -> tuple[str, str]:
    """initdb and pg_ctl: from PATH, else from the newest /usr/lib/postgresql/<version>/bin (Debian keeps
    them off PATH). Missing binaries fail the tests: `make system-deps` installs them."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        return initdb, pg_ctl
    bindirs = [d for d in DEBIAN_PG.glob("*/bin") if (d / "initdb").is_file() and (d / "pg_ctl").is_file()]
    if bindirs:
        newest = max(bindirs, key=lambda d: [int(n) if n.isdigit() else -1 for n in d.parent.name.split(".")])
        return str(newest / "initdb"), str(newest / "pg_ctl")
    pytest.fail(
        f"PostgreSQL server binaries (initdb, pg_ctl) are neither on PATH nor in {DEBIAN_PG}/<version>/bin: "
        "run `make system-deps` (it installs Debian's postgresql package)"
    )


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """A PostgreSQL cluster in a temp dir, listening only on a Unix socket there; the base URL."""
    initdb, pg_ctl = pg_binaries()
    base = Path(tempfile.mkdtemp(prefix="verimesh-pg-"))  # not under pytest's 0700 tmp: the server user reads it
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        shutil.chown(base, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data = base / "data"
    subprocess.run([*as_user, initdb, "-D", str(data), "-A", "trust", "-U", "verimesh", "-E", "UTF8", "--no-sync"],
                   check=True, capture_output=True)  # fmt: skip
    options = f"-k {base} -c listen_addresses='' -c fsync=off"
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-o", options, "-l", str(base / "log"), "-w", "start"],
                   check=True, capture_output=True)  # fmt: skip
    try:
        yield f"postgresql+psycopg://verimesh@/{{db}}?host={base}"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture()
def url(server: str) -> str:
    """A fresh database per test."""
    name = "t_" + uuid.uuid4().hex[:12]
    engine = sa.create_engine(server.format(db="postgres"), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    engine.dispose()
    return server.format(db=name)


def test_settlement_checkpoints_and_proofs(url: str, jobs: dict[str, Job], keys: Keys, tmp_path: Path) -> None:
    op = generate_key()
    led = Ledger.create(url, op)
    register_node(led, keys.node.public, stake=1000)
    job = jobs["mlp"]
    bundle = prove(job, key=keys.node, out=tmp_path / "ok.vmb", device="cpu").bundle
    settled = verify_and_settle(bundle, job=job, ledger=led)
    assert settled.verdict.status == "accept"
    assert [k for _, k in settled.appended] == ["receipt", "verdict", "reward"]
    first = led.checkpoint(op)
    led.append([{"kind": "verdict", "node_id": "vm-x", "job_id": str(i), "status": "accept"} for i in range(37)])
    second = led.checkpoint(op)
    proof = led.consistency_proof(first.tree_size, second.tree_size)
    assert merkle.verify_consistency(first.tree_size, second.tree_size, first.root, second.root, proof)
    for seq in (0, 3, 20, second.tree_size - 1):
        path = led.inclusion_proof(seq, second.tree_size)
        assert merkle.verify_inclusion(led.entry(seq).leaf_hash, seq, second.tree_size, path, second.root)
    assert verify_ledger(Ledger.open(url), checkpoint=first).ok


def test_an_edited_row_is_found(url: str) -> None:
    led = Ledger.create(url, generate_key())
    led.append([{"kind": "verdict", "node_id": "vm-x", "job_id": str(i), "status": "accept"} for i in range(25)])
    body = led.entry(11).body.replace(b'"accept"', b'"reject"')
    with led.engine.begin() as conn:
        conn.execute(sa.text("UPDATE ledger_entries SET body = :b WHERE seq = 11"), {"b": body})
    report = verify_ledger(led)
    assert not report.ok and report.first_bad_entry == 11


WRITER = """
import sys
from verimesh.ledger.store import Ledger
led = Ledger.open(sys.argv[1])
for i in range(40):
    seqs = led.append([{"kind": "verdict", "node_id": "vm-" + sys.argv[2], "job_id": f"{i}-{k}",
                        "status": "accept"} for k in range(5)])
    print(*seqs, flush=True)
"""


def test_concurrent_writers_lose_nothing(url: str) -> None:
    """Four processes append at once: the table lock serialises them, every reported seq is there."""
    led = Ledger.create(url, generate_key())
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, url, str(w)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for w in range(4)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
    reported = sorted(int(s) for out, _ in outputs for s in out.split())
    assert reported == list(range(4 * 40 * 5))  # none lost, none twice
    assert led.size() == 800
    report = verify_ledger(led)
    assert report.ok, report.problems


def test_cli_on_postgres(url: str, keys: Keys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_key_pair(tmp_path / "op.key", generate_key())
    run = CliRunner().invoke
    assert run(cli, ["ledger", "init", "--ledger", url, "--operator-key", "op.key"]).exit_code == 0
    assert run(cli, ["ledger", "register", str(keys.node_pub), "--stake", "10", "--ledger", url]).exit_code == 0
    assert run(cli, ["ledger", "checkpoint", "--ledger", url, "-o", "cp.json"]).exit_code == 0
    result = run(cli, ["ledger", "verify", "--ledger", url, "--checkpoint", "cp.json"])
    assert result.exit_code == 0 and "INTACT" in result.output
