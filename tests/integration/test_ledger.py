"""The ledger end to end: registration by signed request, settlement, slashing rules, checkpoints and
proofs, tamper detection, 8 concurrent verifiers (each with its own registered key), and a writer
killed with SIGKILL. The helpers at the top are shared by the other tests/*/test_ledger_*.py files."""

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
from verimesh.core.canonical import b64encode
from verimesh.core.digest import sha256_bytes
from verimesh.errors import InvalidInputError, VerificationFailedError
from verimesh.jobs.job import Job, new_job
from verimesh.ledger.events import sign_request
from verimesh.ledger.store import Checkpoint, Ledger, verify_ledger
from verimesh.settlement import (
    Settlement,
    audit_ledger,
    node_standing,
    register_job,
    register_node,
    slash_with_evidence,
    verify_and_settle,
)
from verimesh.signing.envelope import make_statement, sign_statement
from verimesh.signing.keys import PublicKey, SecretKey, generate_key, write_key_pair
from verimesh.workflows import prove

OWNER = generate_key()  # the job owner who posts the tests' jobs with a deposit


# -- helpers shared by the ledger tests --------------------------------------------------------------


def operator(led: Ledger) -> SecretKey:
    return led.operator_key()


def join(led: Ledger, key: SecretKey, stake: int, *, writer: SecretKey | None = None) -> int:
    """Register ``key``'s node with a request it signed itself."""
    request = sign_request(key, action="register", ledger_id=led.ledger_id, amount=stake)
    return register_node(led, request, writer=writer or operator(led))


def post(led: Ledger, job_id: str, *, deposit: int = 100, owner: SecretKey = OWNER) -> int:
    request = sign_request(owner, action="job", ledger_id=led.ledger_id, amount=deposit, job_id=job_id)
    return register_job(led, request, writer=operator(led))


def settle(bundle: Path, job: Job, led: Ledger, *, writer: SecretKey | None = None, **kwargs: object) -> Settlement:
    return verify_and_settle(bundle, job=job, ledger=led, writer=writer or operator(led), **kwargs)  # type: ignore[arg-type]


def kinds(settled: Settlement) -> list[str]:
    return [k for _, k in settled.appended]


def new_ledger(path: Path, **settings: object) -> Ledger:
    op = generate_key()
    write_key_pair(path.with_suffix(".op.key"), op)
    return Ledger.create(str(path), op, operator_key_path=path.with_suffix(".op.key"), settings=settings or None)


def history(led: Ledger, key: SecretKey, accepts: int) -> None:
    """``accepts`` accepted results of ``key``'s node on synthetic jobs the owner posted: each a
    receipt with an envelope the node signed, then the verdict (what settlement writes)."""
    op = operator(led)
    for i in range(accepts):
        job_id = "sha256:" + sha256_bytes(f"history-{key.node_id}-{i}".encode())[7:]
        post(led, job_id, deposit=10)
        predicate = {"job_id": job_id, "node_id": key.node_id, "mode": "spot", "step_range": [0, 2]}
        envelope = sign_statement(make_statement({"out": "sha256:" + "0" * 64}, "x/v", predicate), key)
        raw = envelope.to_bytes()
        claim = {"node_id": key.node_id, "job_id": job_id, "step_range": [0, 2]}
        with led.transaction(op) as txn:
            r = txn.append(
                {
                    "kind": "receipt",
                    **claim,
                    "subjects": envelope.statement()["subject"],
                    "envelope_digest": sha256_bytes(raw),
                    "envelope": b64encode(raw),
                }
            )
            txn.append(
                {
                    "kind": "verdict",
                    **claim,
                    "status": "accept",
                    "reason": "all checks passed",
                    "seed": "1",
                    "sampled_steps": [2],
                    "samples": 1,
                    "receipt": r,
                    "evidence_digest": None,
                    "verifier": op.node_id,
                }
            )


def filler(led: Ledger, n: int, *, deposit: int = 7) -> None:
    """``n`` rule-abiding entries (job posts) in one signed batch."""
    op = operator(led)
    with led.transaction(op) as txn:
        for i in range(n):
            job_id = "sha256:" + sha256_bytes(f"filler-{txn.size}-{i}".encode())[7:]
            request = sign_request(OWNER, action="job", ledger_id=led.ledger_id, amount=deposit, job_id=job_id)
            txn.append(
                {"kind": "job", "job_id": job_id, "owner": OWNER.node_id, "deposit": deposit, **request.to_json()}
            )


def fraud_bundle(job: Job, key: SecretKey, out: Path, *, output: int = 0) -> Path:
    """A sealed bundle by ``key`` whose final output is shifted: caught by the last step's re-check."""
    trace = honest_trace(job)
    name = job.output_names[output]
    trace[name] = perturbed(trace[name], delta=2.0)
    return seal(job, trace, key, out)


@pytest.fixture()
def ledger(tmp_path: Path, keys: Keys) -> Ledger:
    led = new_ledger(tmp_path / "mesh.db", fraud_fraction="0.25", reward=3)
    join(led, keys.node, 1000)
    return led


# -- registration and settlement -------------------------------------------------------------------


def test_register_needs_the_nodes_signed_request_and_refuses_duplicates(ledger: Ledger, keys: Keys) -> None:
    with pytest.raises(InvalidInputError, match="already registered"):
        join(ledger, keys.node, 5)
    request = sign_request(keys.node, action="register", ledger_id=ledger.ledger_id, amount=5)
    forged = {**request.to_json(), "request": {**request.request, "amount": 1}}  # the stake changed after signing
    from verimesh.ledger.events import SignedRequest

    with pytest.raises(InvalidInputError, match="not signed") as info:
        register_node(ledger, SignedRequest.from_json(forged), writer=operator(ledger))
    assert info.value.code == "bad-request"
    elsewhere = sign_request(keys.other, action="register", ledger_id="ledger-somewhere-else", amount=5)
    with pytest.raises(InvalidInputError, match="for ledger"):
        register_node(ledger, elsewhere, writer=operator(ledger))
    bad_pop = PublicKey(keys.other.public.key, keys.node.public.proof_of_possession)
    assert not bad_pop.check_possession()


def test_settle_accept_then_fraud_then_replayed_evidence(
    ledger: Ledger, jobs: dict[str, Job], keys: Keys, tmp_path: Path
) -> None:
    job = jobs["rescnn"]
    post(ledger, job.job_id)
    honest = prove(job, key=keys.node, out=tmp_path / "ok.vmb", device="cpu").bundle
    settled = settle(honest, job, ledger)
    assert settled.verdict.status == "accept"
    assert kinds(settled) == ["receipt", "verdict", "reward", "commit"]
    assert settled.samples_in_force == len(job.steps) - 1  # a new node: every step
    again = settle(honest, job, ledger)
    assert again.verdict.status == "accept" and kinds(again) == []  # one verdict per (node, job, step range)
    assert again.note is not None and "already has one" in again.note
    standing = node_standing(ledger, keys.node.node_id)
    assert (standing.rewards, standing.accepted, standing.stake) == (3, 1, 1000)

    # A fraud on another job: a fraction of the stake, citing the evidence it keeps.
    job2 = new_job(model_path("rescnn"), input_path("rescnn"), tmp_path / "job2.json")
    post(ledger, job2.job_id)
    bad = fraud_bundle(job2, keys.node, tmp_path / "bad.vmb")
    settled = settle(bad, job2, ledger, evidence_out=tmp_path / "bad.vme")
    assert settled.verdict.status == "reject"
    assert kinds(settled) == ["receipt", "verdict", "slash", "commit"]
    slash = ledger.entry(settled.appended[2][0]).event
    body = (tmp_path / "bad.vme").read_bytes()
    assert (slash["amount"], slash["reason"], slash["evidence_digest"]) == (250, "fraud", sha256_bytes(body))
    assert ledger.evidence(slash["evidence_digest"]) == body
    standing = node_standing(ledger, keys.node.node_id)
    assert standing.stake == 750 and standing.streak == 0
    # The same fraud claim cannot slash twice (exit 3: a refusal, not a reject).
    with pytest.raises(InvalidInputError, match="already slashed") as info:
        slash_with_evidence(ledger, tmp_path / "bad.vme", writer=operator(ledger))
    assert info.value.code == "already-slashed" and info.value.exit_code == 3
    report = audit_ledger(ledger)
    assert report.ok, (report.problems, report.violations)


def test_equivocation_takes_the_slashable_stake(
    ledger: Ledger, jobs: dict[str, Job], keys: Keys, tmp_path: Path
) -> None:
    """A second statement that does not verify is a fraud on its own (its evidence); the two
    bundles' outputs, differing beyond the tolerance, are equivocation evidence: the rest goes."""
    from verimesh.jobs.bundle import read_bundle
    from verimesh.spot.equivocation import write_equivocation_evidence
    from verimesh.spot.evidence import check_evidence

    job = jobs["mlp"]
    post(ledger, job.job_id)
    honest = prove(job, key=keys.node, out=tmp_path / "a.vmb", device="cpu").bundle
    settle(honest, job, ledger)
    other = fraud_bundle(job, keys.node, tmp_path / "b.vmb")
    settled = settle(other, job, ledger, evidence_out=tmp_path / "b.vme")
    assert settled.verdict.status == "reject" and settled.equivocation_evidence is None
    assert kinds(settled) == ["receipt", "slash", "commit"]
    assert ledger.entry(settled.appended[1][0]).event["reason"] == "fraud"
    assert node_standing(ledger, keys.node.node_id).stake == 750
    evidence = tmp_path / "eq.vme"
    write_equivocation_evidence(
        evidence, job=job, first=read_bundle(honest), second=read_bundle(other), public=keys.node.public
    )
    result = check_evidence(evidence)
    assert result.proves_fraud and result.kind == "equivocation" and result.step_range == (0, len(job.steps))
    slashed = slash_with_evidence(ledger, evidence, writer=operator(ledger))
    assert (slashed.reason, slashed.amount) == ("equivocation", 750)
    assert node_standing(ledger, keys.node.node_id).stake == 0
    # A node without stake is refused before any work is done (exit 3, not a reject).
    with pytest.raises(InvalidInputError, match="no stake") as info:
        settle(honest, job, ledger)
    assert info.value.exit_code == 3
    assert audit_ledger(ledger).ok


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
        slash_with_evidence(ledger, tmp_path / "fake.vme", writer=operator(ledger))
    write_equivocation_evidence(
        tmp_path / "same.vme", first=parsed.envelope, second=parsed.envelope, public=keys.node.public
    )
    with pytest.raises(VerificationFailedError, match="does not prove fraud"):
        slash_with_evidence(ledger, tmp_path / "same.vme", writer=operator(ledger))
    assert node_standing(ledger, keys.node.node_id).stake == 1000


def test_unregistered_signer_and_unknown_job_are_refused(
    ledger: Ledger, jobs: dict[str, Job], keys: Keys, tmp_path: Path
) -> None:
    bundle = prove(jobs["mlp"], key=keys.other, out=tmp_path / "r.vmb", device="cpu").bundle
    post(ledger, jobs["mlp"].job_id)
    with pytest.raises(InvalidInputError, match="no node registered"):
        settle(bundle, jobs["mlp"], ledger)
    mine = prove(jobs["rescnn"], key=keys.node, out=tmp_path / "m.vmb", device="cpu").bundle
    with pytest.raises(InvalidInputError, match="not registered") as info:
        settle(mine, jobs["rescnn"], ledger)  # nobody posted this job
    assert info.value.code == "unknown-job"


def test_adaptive_audit_relaxes_in_settlement(ledger: Ledger, keys: Keys, tmp_path: Path) -> None:
    from verimesh.ledger.reputation import NEW_NODE_STREAK

    history(ledger, keys.node, NEW_NODE_STREAK + 10)
    job = new_job(model_path("transformer"), input_path("transformer"), tmp_path / "t.json")
    post(ledger, job.job_id)
    bundle = prove(job, key=keys.node, out=tmp_path / "t.vmb", device="cpu").bundle
    settled = settle(bundle, job, ledger)
    assert settled.verdict.status == "accept"
    assert settled.samples_in_force is not None and settled.samples_in_force < len(job.steps) - 1
    assert audit_ledger(ledger).ok


# -- checkpoints and tamper detection --------------------------------------------------------------


def test_checkpoint_inclusion_and_consistency(ledger: Ledger, tmp_path: Path) -> None:
    op_key = ledger.operator_key()
    filler(ledger, 20)
    first = ledger.checkpoint(op_key)
    filler(ledger, 13)
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
    filler(ledger, 30)
    cp = ledger.checkpoint(ledger.operator_key())
    (tmp_path / "cp.json").write_text(json.dumps(cp.to_json()))
    return ledger, tmp_path / "mesh.db", cp


def test_edited_row_is_found(filled: tuple[Ledger, Path, Checkpoint]) -> None:
    led, db, _ = filled
    body = led.entry(12).body.replace(b'"deposit":7', b'"deposit":9')
    _sql(db, "UPDATE ledger_entries SET body = ? WHERE seq = 12", body)
    report = verify_ledger(led)
    assert not report.ok and report.first_bad_entry == 12


def rehash(led: Ledger, db: Path) -> None:
    """Recompute every stored tree hash from the entries as they now are."""
    leaves = [e.leaf_hash for e in led.entries()]
    levels = [leaves]
    while len(levels[-1]) > 1:
        prev = levels[-1]
        levels.append([merkle.node_hash(prev[i], prev[i + 1]) for i in range(0, len(prev) - 1, 2)])
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM ledger_tree_nodes")
        for level, hashes in enumerate(levels):
            conn.executemany(
                "INSERT INTO ledger_tree_nodes (level, idx, hash) VALUES (?, ?, ?)",
                [(level, idx, h) for idx, h in enumerate(hashes)],
            )


def test_consistent_rewrite_is_found_by_the_signed_roots(filled: tuple[Ledger, Path, Checkpoint]) -> None:
    """Rewrite an entry *and* every stored hash above it: only a signed root can tell."""
    led, db, _ = filled
    body = led.entry(5).body.replace(b'"deposit":7', b'"deposit":9')
    _sql(db, "UPDATE ledger_entries SET body = ? WHERE seq = 5", body)
    rehash(led, db)
    report = verify_ledger(led)
    assert not report.ok
    assert report.first_bad_entry is not None and report.first_bad_entry <= 5
    assert any("not signed by their writer" in p for p in report.problems)  # the batch's commit
    assert any("do not give the root signed" in p for p in report.problems)  # the checkpoint


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
    _sql(db, "INSERT INTO ledger_entries (seq, kind, node_id, body) VALUES (9, 'job', NULL, ?)", b'{"kind":"job"}')
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


# -- the CLI ---------------------------------------------------------------------------------------


def test_cli_ledger_flow(tmp_path: Path, keys: Keys, jobs: dict[str, Job], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    run = CliRunner().invoke
    write_key_pair(tmp_path / "op.key", generate_key())
    write_key_pair(tmp_path / "owner.key", OWNER)
    db = ["--ledger", "mesh.db"]
    assert run(cli, ["ledger", "init", *db, "--operator-key", "op.key"]).exit_code == 0
    assert run(cli, ["ledger", "init", *db, "--operator-key", "op.key"]).exit_code == 3
    # The node signs its request; the operator appends it.
    assert (
        run(
            cli,
            ["ledger", "request", "register", "--key", str(keys.node_file), "--amount", "100", *db, "-o", "reg.json"],
        ).exit_code
        == 0
    )
    result = run(cli, ["ledger", "register", "--request", "reg.json", *db, "--verifier-key", "op.key"])
    assert result.exit_code == 0, result.output
    job_file = jobs["mlp"].base_dir / "mlp.json"
    result = run(
        cli,
        [
            "ledger",
            "job",
            "register",
            "--key",
            "owner.key",
            "--job",
            str(job_file),
            "--deposit",
            "10",
            *db,
            "--verifier-key",
            "op.key",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    bundle = prove(jobs["mlp"], key=keys.node, out=tmp_path / "r.vmb", device="cpu").bundle
    verify = ["verify", str(bundle), "--job", str(job_file), *db]
    assert run(cli, [*verify, "--json"]).exit_code == 2  # a ledger write needs its writer's key
    result = run(cli, [*verify, "--verifier-key", "op.key", "--json"])
    assert result.exit_code == 0, result.output
    assert [e["kind"] for e in json.loads(result.stdout)["ledger_entries"]] == [
        "receipt",
        "verdict",
        "reward",
        "commit",
    ]
    assert run(cli, ["verify", str(bundle), "--job", str(job_file)]).exit_code == 2  # neither key nor ledger
    rep = json.loads(run(cli, ["ledger", "reputation", *db, "--json"]).stdout)
    assert rep["nodes"][0]["node_id"] == keys.node.node_id and rep["nodes"][0]["accepted"] == 1
    assert rep["nodes"][0]["rewards"] == 1
    result = run(cli, ["ledger", "settings", *db, "--set", "reward=2", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["settings"]["reward"] == 2
    assert run(cli, ["ledger", "checkpoint", *db, "-o", "cp.json"]).exit_code == 0
    assert run(cli, ["ledger", "prove", "1", *db, "-o", "p.json"]).exit_code == 0
    write_key_pair(tmp_path / "x.key", generate_key())
    assert run(cli, ["ledger", "check-proof", "p.json", "--operator-key", "op.key.pub"]).exit_code == 0
    assert run(cli, ["ledger", "check-proof", "p.json", "--operator-key", "x.key.pub"]).exit_code == 1
    result = run(cli, ["ledger", "verify", *db, "--checkpoint", "cp.json", "--operator-key", "op.key.pub", "--rules"])
    assert result.exit_code == 0 and "INTACT" in result.output and "every rule holds" in result.output, result.output
    assert "anchored to operator key" in result.output
    unanchored = run(cli, ["ledger", "verify", *db])
    assert unanchored.exit_code == 0 and "not anchored" in unanchored.output
    shown = json.loads(run(cli, ["ledger", "show", *db, "--node", keys.node.node_id, "--json"]).stdout)
    assert [e["kind"] for e in shown["entries"]] == ["register", "receipt", "verdict", "reward"]
    seq = shown["entries"][2]["seq"]
    _sql(tmp_path / "mesh.db", f"UPDATE ledger_entries SET body = replace(body, 'accept', 'reject') WHERE seq = {seq}")
    tampered = run(cli, ["ledger", "verify", *db, "--json"])
    assert tampered.exit_code == 1 and json.loads(tampered.stdout)["first_bad_entry"] == seq
    refused = run(cli, ["ledger", "reputation", *db])
    assert refused.exit_code == 3 and "ledger-tampered" in refused.output
    assert run(cli, ["ledger", "show", "--ledger", "nope.db"]).exit_code == 3


# -- concurrency and crashes -------------------------------------------------------------------------


@pytest.mark.slow
def test_eight_concurrent_verifiers_lose_nothing(tmp_path: Path, keys: Keys) -> None:
    led = new_ledger(tmp_path / "mesh.db")
    join(led, keys.node, 100)
    procs = []
    for i in range(8):
        job = new_job(model_path("mlp"), input_path("mlp"), tmp_path / f"job{i}.json")
        post(led, job.job_id)
        verifier = generate_key()
        write_key_pair(tmp_path / f"v{i}.key", verifier)
        led.add_verifier(operator(led), verifier.public)
        prove(job, key=keys.node, out=tmp_path / f"r{i}.vmb", device="cpu")
        procs.append(
            [
                sys.executable,
                "-m",
                "verimesh",
                "verify",
                f"r{i}.vmb",
                "--job",
                f"job{i}.json",
                "--ledger",
                "mesh.db",
                "--verifier-key",
                f"v{i}.key",
                "--json",
            ]
        )
    start = led.size()
    running = [
        subprocess.Popen(p, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in procs
    ]
    results = [p.communicate(timeout=300) for p in running]
    assert all(p.returncode == 0 for p in running), [r[1] for r in results]
    report = audit_ledger(led)
    assert report.ok, (report.problems, report.violations)
    entry_kinds = [e.kind for e in led.entries()]
    assert entry_kinds.count("receipt") == entry_kinds.count("verdict") == entry_kinds.count("reward") == 8
    seqs = sorted(e["seq"] for r in results for e in json.loads(r[0])["ledger_entries"])
    assert seqs == list(range(start, start + 32))  # every reported entry is there, none twice


CRASH_WRITER = """
import sys
from pathlib import Path
from verimesh.core.digest import sha256_bytes
from verimesh.ledger.events import sign_request
from verimesh.ledger.store import Ledger
from verimesh.signing.keys import load_secret_key
led = Ledger.open(sys.argv[1])
op = load_secret_key(Path(sys.argv[2]))
i = 0
while True:
    batch = []
    for k in range(24):
        job_id = "sha256:" + sha256_bytes(f"{sys.argv[3]}-{i}-{k}".encode())[7:]
        request = sign_request(op, action="job", ledger_id=led.ledger_id, amount=5, job_id=job_id)
        batch.append({"kind": "job", "job_id": job_id, "owner": op.node_id, "deposit": 5, **request.to_json()})
    seqs = led.append(batch, writer=op)
    print(seqs[-1] + 1, flush=True)  # the batch's signed commit
    i += 1
"""


@pytest.mark.slow
def test_sigkill_mid_append_keeps_every_reported_entry(tmp_path: Path) -> None:
    led = new_ledger(tmp_path / "mesh.db")
    base = led.size()
    key_file = tmp_path / "mesh.op.key"
    for attempt in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", CRASH_WRITER, str(tmp_path / "mesh.db"), str(key_file), str(attempt)],
            stdout=subprocess.PIPE,
            text=True,
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
        report = audit_ledger(led)
        assert report.ok, (report.problems, report.violations)
        assert report.size >= reported + 1  # every append the writer reported as committed is there
        assert (report.size - base) % 25 == 0  # and no half transaction


def test_a_password_in_the_ledger_url_is_never_shown(tmp_path: Path) -> None:
    url = f"postgresql+psycopg://verimesh:hunter2@/nodb?host={tmp_path}"  # no server there
    result = CliRunner().invoke(cli, ["ledger", "show", "--ledger", url])
    assert result.exit_code == 3 and "cannot open ledger" in result.output
    assert "hunter2" not in result.output and "***" in result.output
    assert len(result.output.strip().splitlines()) == 1
