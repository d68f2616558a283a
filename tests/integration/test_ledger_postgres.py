"""The ledger on PostgreSQL (docs/design.md §6: several verifiers sharing one ledger), against a throwaway
local server started for this module: settlement, checkpoints and proofs, the same rules and
attacks as on SQLite (`ledger verify --rules`, rows nobody signed, an edited setting, a rogue
verifier), and concurrent writers in separate processes, each with its own key, losing nothing.

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
from tests.integration.test_ledger import OWNER, filler, fraud_bundle, join, kinds, post, settle
from verimesh.cli.app import cli
from verimesh.core import merkle
from verimesh.errors import IntegrityError, InvalidInputError
from verimesh.jobs.job import Job
from verimesh.ledger.store import Ledger, verify_ledger
from verimesh.settlement import audit_ledger, node_standing, slash_with_evidence
from verimesh.signing.keys import SecretKey, generate_key, write_key_pair
from verimesh.workflows import prove, verify

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
    subprocess.run(
        [*as_user, initdb, "-D", str(data), "-A", "trust", "-U", "verimesh", "-E", "UTF8", "--no-sync"],
        check=True,
        capture_output=True,
    )
    options = f"-k {base} -c listen_addresses='' -c fsync=off"
    subprocess.run(
        [*as_user, pg_ctl, "-D", str(data), "-o", options, "-l", str(base / "log"), "-w", "start"],
        check=True,
        capture_output=True,
    )
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


def pg_ledger(url: str, tmp_path: Path, **settings: object) -> tuple[Ledger, SecretKey]:
    op = generate_key()
    write_key_pair(tmp_path / "op.key", op)
    return Ledger.create(url, op, operator_key_path=tmp_path / "op.key", settings=settings or None), op


def test_settlement_checkpoints_and_proofs(url: str, jobs: dict[str, Job], keys: Keys, tmp_path: Path) -> None:
    led, op = pg_ledger(url, tmp_path)
    join(led, keys.node, 1000)
    job = jobs["mlp"]
    post(led, job.job_id)
    bundle = prove(job, key=keys.node, out=tmp_path / "ok.vmb", device="cpu").bundle
    settled = settle(bundle, job, led)
    assert settled.verdict.status == "accept"
    assert kinds(settled) == ["receipt", "verdict", "reward", "commit"]
    assert kinds(settle(bundle, job, led)) == []  # counted once
    first = led.checkpoint(op)
    filler(led, 37)
    second = led.checkpoint(op)
    proof = led.consistency_proof(first.tree_size, second.tree_size)
    assert merkle.verify_consistency(first.tree_size, second.tree_size, first.root, second.root, proof)
    for seq in (0, 3, 20, second.tree_size - 1):
        path = led.inclusion_proof(seq, second.tree_size)
        assert merkle.verify_inclusion(led.entry(seq).leaf_hash, seq, second.tree_size, path, second.root)
    assert verify_ledger(Ledger.open(url), checkpoint=first, operator=op.public).ok


def test_the_rules_on_postgres(url: str, jobs: dict[str, Job], keys: Keys, tmp_path: Path) -> None:
    """Fraud and equivocation slash once per claim; a rogue verifier's made-up slash is named."""
    led, op = pg_ledger(url, tmp_path, fraud_fraction="0.5")
    join(led, keys.node, 1000)
    job = jobs["mlp"]
    post(led, job.job_id)
    from verimesh.jobs.bundle import read_bundle
    from verimesh.spot.equivocation import write_equivocation_evidence

    ok = prove(job, key=keys.node, out=tmp_path / "ok.vmb", device="cpu").bundle
    settle(ok, job, led)
    bad = fraud_bundle(job, keys.node, tmp_path / "bad.vmb")
    settled = settle(bad, job, led)  # a second statement that does not verify: a fraud of its own
    assert kinds(settled)[:2] == ["receipt", "slash"] and node_standing(led, keys.node.node_id).stake == 500
    verdict = verify(bad, job=job, node_key=keys.node.public, evidence_out=tmp_path / "bad.vme")
    assert verdict.status == "reject"
    with pytest.raises(InvalidInputError, match=r"already slashed"):
        slash_with_evidence(led, tmp_path / "bad.vme", writer=op)
    write_equivocation_evidence(
        tmp_path / "eq.vme", job=job, first=read_bundle(ok), second=read_bundle(bad), public=keys.node.public
    )
    assert slash_with_evidence(led, tmp_path / "eq.vme", writer=op).amount == 500
    assert node_standing(led, keys.node.node_id).stake == 0
    with pytest.raises(InvalidInputError, match=r"already slashed"):
        slash_with_evidence(led, tmp_path / "eq.vme", writer=op)
    report = audit_ledger(led)
    assert report.ok, (report.problems, report.violations)
    rogue = generate_key()
    led.add_verifier(op, rogue.public)
    claim = {"node_id": keys.node.node_id, "job_id": job.job_id, "step_range": [0, 1]}
    seq = led.append(
        [{"kind": "slash", **claim, "amount": 5, "reason": "fraud", "evidence_digest": "sha256:" + "e" * 64}],
        writer=rogue,
    )[0]
    report = audit_ledger(led)
    assert report.first_bad_entry == seq and any("not stored" in p for p in report.problems)


def test_an_edited_row_or_setting_is_found_and_refused(url: str, keys: Keys, tmp_path: Path) -> None:
    led, _ = pg_ledger(url, tmp_path)
    join(led, keys.node, 1000)
    filler(led, 25)
    seq = next(e.seq for e in led.entries(kinds=["register"]))
    body = led.entry(seq).body.replace(b'"stake":1000', b'"stake":9000')
    with led.engine.begin() as conn:
        conn.execute(sa.text("UPDATE ledger_entries SET body = :b WHERE seq = :s"), {"b": body, "s": seq})
    report = verify_ledger(led)
    assert not report.ok and report.first_bad_entry == seq
    with pytest.raises(IntegrityError):
        node_standing(led, keys.node.node_id)
    with led.engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE ledger_entries SET body = :b WHERE seq = :s"),
            {"b": body.replace(b'"stake":9000', b'"stake":1000'), "s": seq},
        )
        conn.execute(sa.text("UPDATE ledger_meta SET value = '\"0.99\"' WHERE key = 'setting.fraud_fraction'"))
    report = verify_ledger(led)
    assert not report.ok and any("ledger_meta" in p for p in report.problems)
    with pytest.raises(IntegrityError, match="ledger_meta"):
        node_standing(led, keys.node.node_id)


WRITER = """
import sys
from pathlib import Path
from verimesh.core.digest import sha256_bytes
from verimesh.ledger.events import sign_request
from verimesh.ledger.store import Ledger
from verimesh.signing.keys import load_secret_key
led = Ledger.open(sys.argv[1])
key = load_secret_key(Path(sys.argv[2]))
for i in range(40):
    batch = []
    for k in range(4):
        job_id = "sha256:" + sha256_bytes(f"{sys.argv[2]}-{i}-{k}".encode())[7:]
        request = sign_request(key, action="job", ledger_id=led.ledger_id, amount=3, job_id=job_id)
        batch.append({"kind": "job", "job_id": job_id, "owner": key.node_id, "deposit": 3, **request.to_json()})
    seqs = led.append(batch, writer=key)
    print(*seqs, seqs[-1] + 1, flush=True)
"""


def test_concurrent_writers_lose_nothing(url: str, tmp_path: Path) -> None:
    """Four processes, four verifier keys, append at once: the table lock serialises them, every
    reported seq is there, every batch is signed by its own writer."""
    led, op = pg_ledger(url, tmp_path)
    base = led.size()
    for w in range(4):
        verifier = generate_key()
        write_key_pair(tmp_path / f"w{w}.key", verifier)
        led.add_verifier(op, verifier.public)
    start = led.size()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, url, str(tmp_path / f"w{w}.key")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(4)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
    reported = sorted(int(s) for out, _ in outputs for s in out.split())
    assert reported == list(range(start, start + 4 * 40 * 5))  # none lost, none twice
    assert led.size() == start + 800 and base < start
    report = audit_ledger(led)
    assert report.ok, (report.problems, report.violations)
    assert report.commits_checked == 1 + 4 + 160  # genesis, the four verifier adds, one per batch


def test_cli_on_postgres(url: str, keys: Keys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_key_pair(tmp_path / "op.key", generate_key())
    run = CliRunner().invoke
    assert run(cli, ["ledger", "init", "--ledger", url, "--operator-key", "op.key"]).exit_code == 0
    result = run(
        cli,
        [
            "ledger",
            "register",
            "--key",
            str(keys.node_file),
            "--stake",
            "10",
            "--ledger",
            url,
            "--verifier-key",
            "op.key",
        ],
    )
    assert result.exit_code == 0, result.output
    assert run(cli, ["ledger", "checkpoint", "--ledger", url, "-o", "cp.json"]).exit_code == 0
    result = run(cli, ["ledger", "verify", "--ledger", url, "--checkpoint", "cp.json", "--rules"])
    assert result.exit_code == 0 and "INTACT" in result.output
    assert OWNER.node_id != keys.node.node_id
