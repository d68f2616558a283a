"""The ledger end to end: registration, settlement, slashing rules, checkpoints and proofs,
tamper detection, 8 concurrent verifiers, and a writer killed with SIGKILL."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import Keys, input_path, model_path, perturbed, step_evidence
from tests.integration.test_tamper import honest_trace, seal
from verimesh.cli.app import cli
from verimesh.core import merkle
from verimesh.errors import InvalidInputError, VerificationFailedError
from verimesh.jobs.job import Job, new_job
from verimesh.ledger.store import Checkpoint, Ledger, verify_ledger
from verimesh.settlement import node_standing, register_node, slash_with_evidence, verify_and_settle
from verimesh.signing.keys import PublicKey, generate_key, write_key_pair
from verimesh.workflows import prove

VECTORS_OK = True


@pytest.fixture()
def ledger(tmp_path: Path, keys: Keys) -> Ledger:
    op = generate_key()
    write_key_pair(tmp_path / "op.key", op)
    led = Ledger.create(str(tmp_path / "mesh.db"), op, operator_key_path=tmp_path / "op.key",
                        settings={"fraud_fraction": "0.25", "reward": "3"})  # fmt: skip
    register_node(led, keys.node.public, stake=1000)
    return led


def test_register_checks_possession_and_refuses_duplicates(ledger: Ledger, keys: Keys) -> None:
    with pytest.raises(InvalidInputError, match="already registered"):
        register_node(ledger, keys.node.public, stake=5)
    forged = PublicKey(keys.other.public.key, keys.node.public.proof_of_possession)
    with pytest.raises(VerificationFailedError, match="possession"):
        register_node(ledger, forged, stake=5)


def test_settle_accept_then_fraud_then_replayed_evidence(
    ledger: Ledger, jobs: dict[str, Job], keys: Keys, tmp_path: Path
) -> None:
    job = jobs["rescnn"]
    honest = prove(job, key=keys.node, out=tmp_path / "ok.vmb", device="cpu").bundle
    settled = verify_and_settle(honest, job=job, ledger=ledger)
    assert settled.verdict.status == "accept"
    assert [k for _, k in settled.appended] == ["receipt", "verdict", "reward"]
    assert settled.samples_in_force == len(job.steps) - 1  # a new node: every step
    again = verify_and_settle(honest, job=job, ledger=ledger)
    assert [k for _, k in again.appended] == ["receipt", "verdict"]  # one reward per job
    standing = node_standing(ledger, keys.node.node_id)
    assert (standing.rewards, standing.accepted, standing.stake) == (3, 2, 1000)

    # A fraud on another job: a fraction of the stake, citing the evidence digest.
    job2 = new_job(model_path("rescnn"), input_path("rescnn"), tmp_path / "job2.json")
    trace = honest_trace(job2)
    trace["logits"] = perturbed(trace["logits"])
    bad = seal(job2, trace, keys.node, tmp_path / "bad.vmb")
    settled = verify_and_settle(bad, job=job2, ledger=ledger, evidence_out=tmp_path / "bad.vme")
    assert settled.verdict.status == "reject"
    assert [k for _, k in settled.appended] == ["receipt", "verdict", "slash"]
    slash = ledger.entry(settled.appended[-1][0]).event
    from verimesh.core.digest import sha256_file

    assert (
        slash["amount"] == 250
        and slash["reason"] == "fraud"
        and slash["evidence_digest"] == sha256_file(tmp_path / "bad.vme")
    )
    standing = node_standing(ledger, keys.node.node_id)
    assert standing.stake == 750 and standing.streak == 0
    # The same evidence cannot slash twice.
    with pytest.raises(VerificationFailedError, match="already slashed"):
        slash_with_evidence(ledger, tmp_path / "bad.vme")
    assert verify_ledger(ledger).ok


def test_equivocation_takes_the_full_stake(ledger: Ledger, jobs: dict[str, Job], keys: Keys, tmp_path: Path) -> None:
    job = jobs["mlp"]
    honest = prove(job, key=keys.node, out=tmp_path / "a.vmb", device="cpu").bundle
    verify_and_settle(honest, job=job, ledger=ledger)
    trace = honest_trace(job)
    trace["logits"] = perturbed(trace["logits"], delta=2.0)
    other = seal(job, trace, keys.node, tmp_path / "b.vmb")
    settled = verify_and_settle(other, job=job, ledger=ledger)
    assert settled.equivocation_evidence is not None
    kinds = [k for _, k in settled.appended]
    assert kinds[:2] == ["receipt", "slash"]
    assert node_standing(ledger, keys.node.node_id).stake == 0
    from verimesh.spot.evidence import check_evidence

    result = check_evidence(Path(settled.equivocation_evidence))
    assert result.proves_fraud and result.kind == "equivocation"
    # A node without stake is refused before any work is done.
    with pytest.raises(VerificationFailedError, match="no stake"):
        verify_and_settle(honest, job=job, ledger=ledger)


def test_evidence_that_does_not_prove_fraud_is_refused(
    ledger: Ledger, jobs: dict[str, Job], keys: Keys, tmp_path: Path
) -> None:
    from verimesh.jobs.bundle import read_bundle
    from verimesh.spot.evidence import write_equivocation_evidence

    job = jobs["rescnn"]
    bundle = prove(job, key=keys.node, out=tmp_path / "r.vmb", device="cpu").bundle
    parsed = read_bundle(bundle)
    step_evidence(job, bundle, keys.node.public, tmp_path / "fake.vme")
    with pytest.raises(VerificationFailedError, match="does not prove fraud"):
        slash_with_evidence(ledger, tmp_path / "fake.vme")
    write_equivocation_evidence(
        tmp_path / "same.vme", first=parsed.envelope, second=parsed.envelope, public=keys.node.public
    )
    with pytest.raises(VerificationFailedError, match="does not prove fraud"):
        slash_with_evidence(ledger, tmp_path / "same.vme")
    assert node_standing(ledger, keys.node.node_id).stake == 1000


def test_unregistered_signer_is_refused(ledger: Ledger, jobs: dict[str, Job], keys: Keys, tmp_path: Path) -> None:
    bundle = prove(jobs["mlp"], key=keys.other, out=tmp_path / "r.vmb", device="cpu").bundle
    with pytest.raises(InvalidInputError, match="no node registered"):
        verify_and_settle(bundle, job=jobs["mlp"], ledger=ledger)


def test_adaptive_audit_relaxes_in_settlement(ledger: Ledger, keys: Keys, tmp_path: Path) -> None:
    from verimesh.ledger.reputation import NEW_NODE_STREAK

    with ledger.transaction() as txn:
        for i in range(NEW_NODE_STREAK + 10):
            txn.append({"kind": "verdict", "node_id": keys.node.node_id, "job_id": f"j{i}", "status": "accept"})
    job = new_job(model_path("transformer"), input_path("transformer"), tmp_path / "t.json")
    bundle = prove(job, key=keys.node, out=tmp_path / "t.vmb", device="cpu").bundle
    settled = verify_and_settle(bundle, job=job, ledger=ledger)
    assert settled.verdict.status == "accept"
    assert settled.samples_in_force is not None and settled.samples_in_force < len(job.steps) - 1


def test_checkpoint_inclusion_and_consistency(ledger: Ledger, tmp_path: Path) -> None:
    op_key = ledger.operator_key()
    ledger.append([{"kind": "verdict", "node_id": "vm-x", "job_id": str(i), "status": "accept"} for i in range(20)])
    first = ledger.checkpoint(op_key)
    ledger.append([{"kind": "verdict", "node_id": "vm-x", "job_id": str(i), "status": "accept"} for i in range(13)])
    second = ledger.checkpoint(op_key)
    assert first.verify(ledger.operator) and second.verify(ledger.operator)
    proof = ledger.consistency_proof(first.tree_size, second.tree_size)
    assert merkle.verify_consistency(first.tree_size, second.tree_size, first.root, second.root, proof)
    for seq in (0, 7, 20):
        entry = ledger.entry(seq)
        path = ledger.inclusion_proof(seq, second.tree_size)
        assert merkle.verify_inclusion(entry.leaf_hash, seq, second.tree_size, path, second.root)
    assert verify_ledger(ledger, checkpoint=first).ok


def _sql(db: Path, statement: str, *args: object) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute(statement, args)


@pytest.fixture()
def filled(ledger: Ledger, tmp_path: Path) -> tuple[Ledger, Path, Checkpoint]:
    ledger.append([{"kind": "verdict", "node_id": "vm-x", "job_id": str(i), "status": "accept"} for i in range(30)])
    cp = ledger.checkpoint(ledger.operator_key())
    (tmp_path / "cp.json").write_text(json.dumps(cp.to_json()))
    return ledger, tmp_path / "mesh.db", cp


def test_edited_row_is_found(filled: tuple[Ledger, Path, Checkpoint]) -> None:
    led, db, _ = filled
    body = led.entry(12).body.replace(b'"accept"', b'"reject"')
    _sql(db, "UPDATE ledger_entries SET body = ? WHERE seq = 12", body)
    report = verify_ledger(led)
    assert not report.ok and report.first_bad_entry == 12


def test_consistent_rewrite_is_found_by_the_signed_checkpoint(filled: tuple[Ledger, Path, Checkpoint]) -> None:
    """Rewrite an entry *and* every stored hash above it: only a signed root can tell."""
    led, db, _ = filled
    body = led.entry(5).body.replace(b'"accept"', b'"reject"')
    _sql(db, "UPDATE ledger_entries SET body = ? WHERE seq = 5", body)
    leaves = [e.leaf_hash for e in led.entries()]
    levels = [leaves]
    while len(levels[-1]) > 1:
        prev = levels[-1]
        levels.append([merkle.node_hash(prev[i], prev[i + 1]) for i in range(0, len(prev) - 1, 2)])
    with sqlite3.connect(db) as conn:
        for level, hashes in enumerate(levels):
            for idx, h in enumerate(hashes):
                conn.execute("UPDATE ledger_tree_nodes SET hash = ? WHERE level = ? AND idx = ?", (h, level, idx))
    report = verify_ledger(led)
    assert not report.ok
    assert report.first_bad_entry is not None and report.first_bad_entry <= 5
    assert any("do not give the root signed" in p for p in report.problems)


def test_deleted_inserted_reordered_truncated(filled: tuple[Ledger, Path, Checkpoint], tmp_path: Path) -> None:
    led, db, _ = filled
    with sqlite3.connect(db) as conn:
        a = conn.execute("SELECT body FROM ledger_entries WHERE seq = 3").fetchone()[0]
        b = conn.execute("SELECT body FROM ledger_entries WHERE seq = 4").fetchone()[0]
        conn.execute("UPDATE ledger_entries SET body = ? WHERE seq = 3", (b,))
        conn.execute("UPDATE ledger_entries SET body = ? WHERE seq = 4", (a,))
    assert verify_ledger(led).first_bad_entry == 3  # reordered
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE ledger_entries SET body = ? WHERE seq = 3", (a,))
        conn.execute("UPDATE ledger_entries SET body = ? WHERE seq = 4", (b,))
    assert verify_ledger(led).ok
    _sql(db, "DELETE FROM ledger_entries WHERE seq = 9")
    report = verify_ledger(led)
    assert not report.ok and report.first_bad_entry == 9  # deleted
    _sql(
        db,
        "INSERT INTO ledger_entries (seq, kind, node_id, body) VALUES (9, 'verdict', 'vm-x', ?)",
        b'{"kind":"verdict"}',
    )
    assert verify_ledger(led).first_bad_entry == 9  # inserted in its place
    # Truncation below a saved checkpoint.
    _sql(db, "DELETE FROM ledger_entries WHERE seq >= 20")
    _sql(db, "DELETE FROM ledger_tree_nodes WHERE (idx + 1) * (1 << level) > 20")
    report = verify_ledger(led, checkpoint=Checkpoint.from_file(tmp_path / "cp.json"))
    assert not report.ok and any("truncated" in p for p in report.problems)


def test_forged_checkpoint_is_refused(filled: tuple[Ledger, Path, Checkpoint]) -> None:
    led, _, cp = filled
    forged = Checkpoint(cp.ledger_id, cp.tree_size, cp.root, cp.time, generate_key().sign(cp.statement()))
    report = verify_ledger(led, checkpoint=forged)
    assert not report.ok and any("not signed" in p for p in report.problems)


def test_cli_ledger_flow(tmp_path: Path, keys: Keys, jobs: dict[str, Job], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    run = CliRunner().invoke
    write_key_pair(tmp_path / "op.key", generate_key())
    assert run(cli, ["ledger", "init", "--ledger", "mesh.db", "--operator-key", "op.key"]).exit_code == 0
    assert run(cli, ["ledger", "init", "--ledger", "mesh.db", "--operator-key", "op.key"]).exit_code == 3
    assert run(cli, ["ledger", "register", str(keys.node_pub), "--stake", "100", "--ledger", "mesh.db"]).exit_code == 0
    bundle = prove(jobs["mlp"], key=keys.node, out=tmp_path / "r.vmb", device="cpu").bundle
    job_file = jobs["mlp"].base_dir / "mlp.json"
    result = run(cli, ["verify", str(bundle), "--job", str(job_file), "--ledger", "mesh.db", "--json"])
    assert result.exit_code == 0, result.output
    assert [e["kind"] for e in json.loads(result.stdout)["ledger_entries"]] == ["receipt", "verdict", "reward"]
    assert run(cli, ["verify", str(bundle), "--job", str(job_file)]).exit_code == 2  # neither key nor ledger
    rep = json.loads(run(cli, ["ledger", "reputation", "--ledger", "mesh.db", "--json"]).stdout)
    assert rep["nodes"][0]["node_id"] == keys.node.node_id and rep["nodes"][0]["accepted"] == 1
    assert run(cli, ["ledger", "checkpoint", "--ledger", "mesh.db", "-o", "cp.json"]).exit_code == 0
    assert run(cli, ["ledger", "prove", "1", "--ledger", "mesh.db", "-o", "p.json"]).exit_code == 0
    write_key_pair(tmp_path / "x.key", generate_key())
    assert run(cli, ["ledger", "check-proof", "p.json", "--operator-key", "op.key.pub"]).exit_code == 0
    assert run(cli, ["ledger", "check-proof", "p.json", "--operator-key", "x.key.pub"]).exit_code == 1
    assert run(cli, ["ledger", "verify", "--ledger", "mesh.db", "--checkpoint", "cp.json"]).exit_code == 0
    shown = json.loads(
        run(cli, ["ledger", "show", "--ledger", "mesh.db", "--node", keys.node.node_id, "--json"]).stdout
    )
    assert [e["kind"] for e in shown["entries"]] == ["register", "receipt", "verdict", "reward"]
    _sql(tmp_path / "mesh.db", "UPDATE ledger_entries SET body = replace(body, 'accept', 'reject') WHERE seq = 2")
    tampered = run(cli, ["ledger", "verify", "--ledger", "mesh.db", "--json"])
    assert tampered.exit_code == 1 and json.loads(tampered.stdout)["first_bad_entry"] == 2
    assert run(cli, ["ledger", "show", "--ledger", "nope.db"]).exit_code == 3


@pytest.mark.slow
def test_eight_concurrent_verifiers_lose_nothing(tmp_path: Path, keys: Keys) -> None:
    op = generate_key()
    write_key_pair(tmp_path / "op.key", op)
    led = Ledger.create(str(tmp_path / "mesh.db"), op, operator_key_path=tmp_path / "op.key")
    register_node(led, keys.node.public, stake=100)
    procs = []
    for i in range(8):
        job = new_job(model_path("mlp"), input_path("mlp"), tmp_path / f"job{i}.json")
        prove(job, key=keys.node, out=tmp_path / f"r{i}.vmb", device="cpu")
        procs.append([sys.executable, "-m", "verimesh", "verify", f"r{i}.vmb", "--job", f"job{i}.json",
                      "--ledger", "mesh.db", "--json"])  # fmt: skip
    running = [
        subprocess.Popen(p, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in procs
    ]
    results = [p.communicate(timeout=300) for p in running]
    assert all(p.returncode == 0 for p in running), [r[1] for r in results]
    report = verify_ledger(led)
    assert report.ok, report.problems
    kinds = [e.kind for e in led.entries()]
    assert kinds.count("receipt") == kinds.count("verdict") == kinds.count("reward") == 8
    seqs = sorted(e["seq"] for r in results for e in json.loads(r[0])["ledger_entries"])
    assert seqs == list(range(1, 25))  # every reported entry is there, none twice


CRASH_WRITER = """
import sys
from verimesh.ledger.store import Ledger
led = Ledger.open(sys.argv[1])
i = 0
while True:
    batch = [{"kind": "verdict", "node_id": "vm-w", "job_id": f"{i}-{k}", "status": "accept"} for k in range(25)]
    seqs = led.append(batch)
    print(seqs[-1], flush=True)
    i += 1
"""


@pytest.mark.slow
def test_sigkill_mid_append_keeps_every_reported_entry(tmp_path: Path) -> None:
    op = generate_key()
    led = Ledger.create(str(tmp_path / "mesh.db"), op)
    for attempt in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", CRASH_WRITER, str(tmp_path / "mesh.db")], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        reported = -1
        deadline = time.monotonic() + 60
        while reported < 200 * (attempt + 1) and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if line:
                reported = int(line)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        report = verify_ledger(led)
        assert report.ok, report.problems
        assert report.size >= reported + 1  # every append the writer reported as committed is there
        assert report.size % 25 == 0  # and no half transaction


def test_a_password_in_the_ledger_url_is_never_shown(tmp_path: Path) -> None:
    url = f"postgresql+psycopg://verimesh:hunter2@/nodb?host={tmp_path}"  # no server there
    result = CliRunner().invoke(cli, ["ledger", "show", "--ledger", url])
    assert result.exit_code == 3 and "cannot open ledger" in result.output
    assert "hunter2" not in result.output and "***" in result.output
    assert len(result.output.strip().splitlines()) == 1
