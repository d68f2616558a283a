"""The second hostile review of the ledger (A1-A7, A10 and a node verifying itself): each attack
refused or found, each beside the honest path it must leave alone (an honest node is not slashed,
an honest verifier is not blamed)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Keys, perturbed
from tests.integration.test_ledger import fraud_bundle, join, kinds, new_ledger, operator, post, settle
from tests.integration.test_ledger_attacks import cli_run, rogue_verifier, with_envelope
from tests.integration.test_tamper import honest_trace, seal
from verimesh.core.canonical import b64encode
from verimesh.core.container import read_container_file, write_container
from verimesh.core.digest import sha256_bytes
from verimesh.errors import IntegrityError, InvalidInputError, VerificationFailedError
from verimesh.jobs.bundle import read_bundle
from verimesh.jobs.job import Job
from verimesh.ledger import events
from verimesh.ledger.events import sign_request, time_plus
from verimesh.ledger.rules import receipt_problem
from verimesh.ledger.store import Checkpoint, Ledger, Transaction, verify_ledger
from verimesh.settlement import (
    audit_ledger,
    node_standing,
    register_node,
    release,
    slash_with_evidence,
    withdraw,
)
from verimesh.signing.envelope import Envelope, Signature
from verimesh.signing.keys import SecretKey, generate_key
from verimesh.spot.equivocation import write_equivocation_evidence
from verimesh.spot.evidence import check_evidence
from verimesh.workflows import prove, verify


@pytest.fixture()
def mesh(tmp_path: Path, keys: Keys, jobs: dict[str, Job]) -> Ledger:
    """The node registered (stake 1000), the mlp job posted, unbonding an hour."""
    led = new_ledger(tmp_path / "mesh.db", fraud_fraction="0.5", reward=3, unbonding_seconds=3600)
    join(led, keys.node, 1000)
    post(led, jobs["mlp"].job_id, deposit=100)
    return led


@pytest.fixture(scope="module")
def honest(tmp_path_factory: pytest.TempPathFactory, keys: Keys, jobs: dict[str, Job]) -> Path:
    return prove(jobs["mlp"], key=keys.node, out=tmp_path_factory.mktemp("b") / "ok.vmb", device="cpu").bundle


@pytest.fixture(scope="module")
def other_platform(tmp_path_factory: pytest.TempPathFactory, keys: Keys, jobs: dict[str, Job]) -> Path:
    """The node's honest result on another platform: the output 1e-6 off, inside the tolerance."""
    job = jobs["mlp"]
    trace = honest_trace(job)
    name = job.output_names[0]
    trace[name] = perturbed(trace[name], delta=1e-6)
    return seal(job, trace, keys.node, tmp_path_factory.mktemp("p") / "gpu.vmb")


def withdraw_request(key: SecretKey, led: Ledger, amount: int) -> Any:
    return sign_request(key, action="withdraw", ledger_id=led.ledger_id, amount=amount)


def unchecked_times(monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer with a client of its own: none of the store's checks on entry times."""
    monkeypatch.setattr(Transaction, "_time_problem", lambda self, stamped: None)
    monkeypatch.setattr(Transaction, "not_before", lambda self, stamp: None)


# -- A1: entry times ----------------------------------------------------------------------------------


def test_a_backdated_or_future_batch_is_refused_at_append(mesh: Ledger, keys: Keys) -> None:
    op = operator(mesh)
    seq = withdraw(mesh, withdraw_request(keys.node, mesh, 100), writer=op)
    due = mesh.entry(seq).event["release_after"]
    for stamp, words in (("2000-01-01T00:00:00Z", "never go backwards"), (due, "after this machine's clock")):
        with pytest.raises(InvalidInputError, match=words) as info, mesh.transaction(op) as txn:
            txn.time = stamp  # the writer picks the time: the store does not take it
            txn.append({"kind": "release", "node_id": keys.node.node_id, "withdrawal": seq, "amount": 100})
        assert info.value.code == "bad-entry-time"
    # A withdrawal whose release_after is not its own time + unbonding_seconds.
    with pytest.raises(InvalidInputError, match="release_after") as info, mesh.transaction(op) as txn:
        txn.time = "2000-01-01T00:00:00Z"
        request = withdraw_request(keys.node, mesh, 50)
        txn.append(
            {
                "kind": "withdraw",
                "node_id": keys.node.node_id,
                "amount": 50,
                "release_after": time_plus(txn.time, 3600),
                **request.to_json(),
            }
        )
    assert node_standing(mesh, keys.node.node_id).withdrawn == 0 and audit_ledger(mesh).ok


def test_a_backdated_log_is_found_by_verify_rules_and_decisions(
    mesh: Ledger, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    unchecked_times(monkeypatch)
    rogue = rogue_verifier(mesh)
    request = withdraw_request(keys.node, mesh, 1000)
    with mesh.transaction(rogue) as txn:  # the A1 attack, signed by a registered writer
        txn.time = "2000-01-01T00:00:00Z"
        w = txn.append(
            {
                "kind": "withdraw",
                "node_id": keys.node.node_id,
                "amount": 1000,
                "release_after": time_plus(txn.time, 3600),
                **request.to_json(),
            }
        )
    with mesh.transaction(rogue) as txn:
        txn.time = "2000-01-01T02:00:00Z"
        txn.append({"kind": "release", "node_id": keys.node.node_id, "withdrawal": w, "amount": 1000})
    report = verify_ledger(mesh)
    assert not report.ok and report.first_bad_entry == w
    assert any("never go backwards" in p for p in report.problems)
    assert any("before the request it carries" in p for p in report.problems)
    assert not audit_ledger(mesh).ok
    with pytest.raises(IntegrityError, match="never go backwards"):
        node_standing(mesh, keys.node.node_id)  # a decision read refuses it too


def test_an_entry_dated_in_the_future_is_named_by_the_rules(
    mesh: Ledger, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    unchecked_times(monkeypatch)
    with mesh.transaction(rogue_verifier(mesh)) as txn:
        txn.time = time_plus(events.now(), 86400)  # a day ahead: every later entry would have to follow
        seq = txn.append(
            {"kind": "top-up", "node_id": keys.node.node_id, "amount": 5,
             **sign_request(keys.node, action="top-up", ledger_id=mesh.ledger_id, amount=5).to_json()}
        )  # fmt: skip
    report = audit_ledger(mesh)
    assert report.first_bad_entry == seq and any("in the future" in v for v in report.violations)
    monkeypatch.undo()
    with pytest.raises(InvalidInputError, match="never go backwards"):  # an honest writer cannot follow it
        join(mesh, keys.other, 10)


def test_a_request_signed_a_little_ahead_is_appended_at_its_own_time(
    tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    led = new_ledger(tmp_path / "skew.db", unbonding_seconds=0)
    ahead = time_plus(events.now(), 120)  # the node's clock runs two minutes fast
    monkeypatch.setattr(events, "now", lambda: ahead)
    request = sign_request(keys.node, action="register", ledger_id=led.ledger_id, amount=100)
    far = time_plus(ahead, 3600)
    monkeypatch.setattr(events, "now", lambda: far)
    too_far = sign_request(keys.other, action="register", ledger_id=led.ledger_id, amount=100)
    monkeypatch.undo()
    seq = register_node(led, request, writer=operator(led))
    assert led.entry(seq).event["time"] == ahead
    with pytest.raises(InvalidInputError, match="after this machine's clock") as info:
        register_node(led, too_far, writer=operator(led))
    assert info.value.code == "request-in-future"
    # Honest unbonding: withdraw, then release once the (zero) delay is over; every rule holds.
    withdraw(led, withdraw_request(keys.node, led, 40), writer=operator(led))
    assert len(release(led, keys.node.node_id, writer=operator(led))) == 1
    assert node_standing(led, keys.node.node_id).withdrawn == 40
    report = audit_ledger(led)
    assert report.ok, (report.problems, report.violations)


# -- A2: an honest re-prove on another platform -------------------------------------------------------


def test_an_honest_re_prove_on_another_platform_is_not_slashed(
    mesh: Ledger, keys: Keys, jobs: dict[str, Job], honest: Path, other_platform: Path, tmp_path: Path
) -> None:
    job = jobs["mlp"]
    assert verify(other_platform, job=job, node_key=keys.node.public, samples="all").status == "accept"
    first = settle(honest, job, mesh)
    assert kinds(first) == ["receipt", "verdict", "reward", "commit"]
    second = settle(other_platform, job, mesh)
    assert second.verdict.status == "accept" and kinds(second) == [] and second.equivocation_evidence is None
    assert second.note is not None and "duplicate" in second.note and "no slash" in second.note
    standing = node_standing(mesh, keys.node.node_id)
    assert (standing.stake, standing.slashed, standing.rewards, standing.accepted) == (1000, 0, 3, 1)
    # The two bundles as equivocation evidence: their outputs agree within the tolerance.
    evidence = tmp_path / "eq.vme"
    write_equivocation_evidence(
        evidence, job=job, first=read_bundle(honest), second=read_bundle(other_platform), public=keys.node.public
    )
    result = check_evidence(evidence)
    assert not result.proves_fraud and "within the job's tolerance" in result.reason
    with pytest.raises(VerificationFailedError, match="does not prove fraud"):
        slash_with_evidence(mesh, evidence, writer=operator(mesh))
    assert node_standing(mesh, keys.node.node_id).stake == 1000
    code, _ = cli_run(
        "ledger",
        "slash",
        "--evidence",
        str(evidence),
        "--ledger",
        mesh.url,
        "--verifier-key",
        str(Path(mesh.url.removeprefix("sqlite:///")).with_suffix(".op.key")),
    )
    assert code == 1 and node_standing(mesh, keys.node.node_id).stake == 1000
    report = audit_ledger(mesh)
    assert report.ok, (report.problems, report.violations)


def test_equivocation_evidence_needs_outputs_beyond_the_tolerance(
    mesh: Ledger, keys: Keys, jobs: dict[str, Job], honest: Path, tmp_path: Path
) -> None:
    from verimesh.spot.evidence import write_equivocation_evidence as write_v1

    job = jobs["mlp"]
    bad = fraud_bundle(job, keys.node, tmp_path / "bad.vmb")
    # Version 1 (two envelopes whose subjects differ, nothing else) proves nothing any more.
    write_v1(
        tmp_path / "v1.vme",
        first=read_bundle(honest).envelope,
        second=read_bundle(bad).envelope,
        public=keys.node.public,
    )
    result = check_evidence(tmp_path / "v1.vme")
    assert not result.proves_fraud and "proves no fraud" in result.reason
    with pytest.raises(VerificationFailedError):
        slash_with_evidence(mesh, tmp_path / "v1.vme", writer=operator(mesh))
    # Version 2 with a carried output that is not the sealed one proves nothing either.
    evidence = tmp_path / "eq.vme"
    write_equivocation_evidence(
        evidence, job=job, first=read_bundle(honest), second=read_bundle(bad), public=keys.node.public
    )
    assert check_evidence(evidence).proves_fraud
    members = read_container_file(evidence, what="evidence")
    target = next(n for n in members if n.startswith("second/tensors/"))
    forged = [
        (n, bytes(m) if n != target else bytes(members["sealed/" + n.removeprefix("second/")]))
        for n, m in members.items()
    ]
    write_container(tmp_path / "forged.vme", forged)
    result = check_evidence(tmp_path / "forged.vme")
    assert not result.proves_fraud and "not the one sealed" in result.reason
    # The real thing slashes the whole slashable stake, once.
    slashed = slash_with_evidence(mesh, evidence, writer=operator(mesh))
    assert (slashed.reason, slashed.amount) == ("equivocation", 1000)
    assert audit_ledger(mesh).ok


# -- A3: a repeated signature in the (unsealed) envelope --------------------------------------------------


def test_a_duplicated_signature_is_refused_and_blames_no_verifier(
    mesh: Ledger, keys: Keys, jobs: dict[str, Job], honest: Path, tmp_path: Path
) -> None:
    genuine = read_bundle(honest).envelope
    doubled = Envelope(genuine.payload_type, genuine.payload, (*genuine.signatures, genuine.signatures[0]))
    with pytest.raises(InvalidInputError, match="more than once"):
        Envelope.from_bytes(doubled.to_bytes())
    relayed = with_envelope(honest, doubled, tmp_path / "relayed.vmb")
    with pytest.raises(InvalidInputError) as info:
        settle(relayed, jobs["mlp"], mesh)
    assert info.value.exit_code == 3
    assert verify(relayed, job=jobs["mlp"], node_key=keys.node.public).status == "error"
    # The receipt rule settlement applies before it writes is the one --rules applies.
    raw = doubled.to_bytes()
    event = {
        "node_id": keys.node.node_id,
        "job_id": jobs["mlp"].job_id,
        "step_range": [0, len(jobs["mlp"].steps)],
        "subjects": genuine.statement()["subject"],
        "envelope_digest": sha256_bytes(raw),
        "envelope": b64encode(raw),
    }
    problem, _ = receipt_problem(event, keys.node.public)
    assert problem is not None and "more than once" in problem
    # The honest bundle, and one co-signed by a verifier (another key id), settle; every rule holds.
    cosigned = with_envelope(honest, genuine.with_signature(keys.other), tmp_path / "cosigned.vmb")
    assert Envelope.from_bytes(read_container_file(cosigned, what="b")["envelope.json"].tobytes()) is not None
    settled = settle(cosigned, jobs["mlp"], mesh)
    assert kinds(settled) == ["receipt", "verdict", "reward", "commit"]
    report = audit_ledger(mesh)
    assert report.ok, (report.problems, report.violations)


# -- A4: a junk signature put first --------------------------------------------------------------------


def test_a_junk_first_signature_does_not_choose_the_key(
    mesh: Ledger, keys: Keys, jobs: dict[str, Job], honest: Path, tmp_path: Path
) -> None:
    join(mesh, keys.other, 100)  # another registered node, whose key id the relay borrows
    genuine = read_bundle(honest).envelope
    junk = Envelope(
        genuine.payload_type, genuine.payload, (Signature(keys.other.node_id, bytes(96)), *genuine.signatures)
    )
    relayed = with_envelope(honest, junk, tmp_path / "junk.vmb")
    settled = settle(relayed, jobs["mlp"], mesh)
    assert settled.verdict.status == "accept" and "reward" in kinds(settled)
    # A cheat wrapped the same way, with the honest node's key id in front, is still its own.
    cheat = fraud_bundle(jobs["mlp"], keys.other, tmp_path / "cheat.vmb")
    env = read_bundle(cheat).envelope
    wrapped = with_envelope(
        cheat,
        Envelope(env.payload_type, env.payload, (Signature(keys.node.node_id, bytes(96)), *env.signatures)),
        tmp_path / "c.vmb",
    )
    caught = settle(wrapped, jobs["mlp"], mesh)
    assert caught.verdict.status == "reject" and "slash" in kinds(caught)
    assert node_standing(mesh, keys.other.node_id).slashed == 50
    assert node_standing(mesh, keys.node.node_id).slashed == 0
    assert audit_ledger(mesh).ok


# -- A5: text in the tree table ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE ledger_tree_nodes SET level = 'x' WHERE level = 0 AND idx = 2",
        "UPDATE ledger_tree_nodes SET idx = 'y' WHERE level = 0 AND idx = 2",
    ],
)
def test_text_in_the_tree_table_is_a_clean_ledger_error(mesh: Ledger, tmp_path: Path, sql: str) -> None:
    mesh.checkpoint(operator(mesh))
    db = tmp_path / "mesh.db"
    with sqlite3.connect(db) as conn:
        conn.execute(sql)
    op_key = str(db.with_suffix(".op.key"))
    for args in (["reputation"], ["settings"], ["checkpoint", "--operator-key", op_key], ["verify"]):
        code, output = cli_run("ledger", *args, "--ledger", str(db))
        assert code in (1, 3) and "Traceback" not in output, (args, output)
        if args[0] != "verify":
            assert code == 3 and "ledger-tampered" in output, (args, output)


# -- A6: governance rows relabelled before a checkpoint -------------------------------------------------


def test_a_revoked_verifier_stays_revoked_after_a_kind_column_edit(
    mesh: Ledger, keys: Keys, jobs: dict[str, Job], honest: Path, tmp_path: Path
) -> None:
    rogue = rogue_verifier(mesh)
    kept = rogue_verifier(mesh)  # an honest verifier the operator keeps
    removed = next(e.seq for e in mesh.entries(kinds=["verifier-add"]) if e.node_id == rogue.node_id)
    mesh.remove_verifier(operator(mesh), rogue.node_id)
    cp = mesh.checkpoint(operator(mesh))
    assert cp.version == 2 and cp.governance is not None
    assert Checkpoint.from_json(cp.to_json(), extra_keys=frozenset()) == cp
    # Honest path: the kept verifier settles after the checkpoint and every rule holds.
    assert settle(honest, jobs["mlp"], mesh, writer=kept).verdict.status == "accept"
    remove_seq = next(e.seq for e in mesh.entries(kinds=["verifier-remove"]))
    assert remove_seq > removed
    with sqlite3.connect(tmp_path / "mesh.db") as conn:
        conn.execute("UPDATE ledger_entries SET kind = 'receipt' WHERE seq = ?", (remove_seq,))
    cheat = fraud_bundle(jobs["mlp"], keys.node, tmp_path / "cheat.vmb")
    # This process checked the writers before the checkpoint already and keeps what it checked:
    # the rogue stays refused here. Another process, reading the edited rows, finds the edit.
    with pytest.raises(InvalidInputError, match="may not write"):
        settle(cheat, jobs["mlp"], mesh, writer=rogue)
    other = Ledger.open(mesh.url)
    with pytest.raises(IntegrityError, match="not the ones it signed"):
        settle(cheat, jobs["mlp"], other, writer=rogue)
    with pytest.raises(IntegrityError):
        join(other, generate_key(), 5, writer=rogue)
    with pytest.raises(IntegrityError):  # a checkpoint compares the whole log with what it checked
        mesh.checkpoint(operator(mesh))


def test_a_checkpoint_checks_the_whole_log_before_signing(mesh: Ledger, tmp_path: Path) -> None:
    mesh.checkpoint(operator(mesh))
    job_row = next(e.seq for e in mesh.entries(kinds=["job"]))
    with sqlite3.connect(tmp_path / "mesh.db") as conn:  # a row before the checkpoint, relabelled
        conn.execute("UPDATE ledger_entries SET kind = 'receipt' WHERE seq = ?", (job_row,))
    with pytest.raises(IntegrityError, match=f"entry {job_row} does not match its own body"):
        mesh.checkpoint(operator(mesh))
    with sqlite3.connect(tmp_path / "mesh.db") as conn:
        conn.execute("UPDATE ledger_entries SET kind = 'job' WHERE seq = ?", (job_row,))
    assert mesh.checkpoint(operator(mesh)).tree_size == mesh.size() - 2  # the log as it is: signed


def test_a_checkpoint_after_one_this_process_signed_checks_the_rest_and_still_finds_old_edits(
    mesh: Ledger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole-log check is skipped only for rows this process checked before, byte for byte the
    same: an edit to any of them (or another process, which remembers nothing) checks it all."""
    from verimesh.ledger import store

    full = []
    real = store._verify
    monkeypatch.setattr(store, "_verify", lambda *a, **k: full.append(1) or real(*a, **k))
    mesh.checkpoint(operator(mesh))
    assert len(full) == 1  # nothing remembered yet: the whole log
    join(mesh, generate_key(), 5)
    second = mesh.checkpoint(operator(mesh))
    assert len(full) == 1  # the same rows as before, and the new ones in the view's check
    row = max(e.seq for e in mesh.entries(kinds=["register"]))
    assert row < second.tree_size
    with sqlite3.connect(tmp_path / "mesh.db") as conn:  # a row the remembered check covered, relabelled
        conn.execute("UPDATE ledger_entries SET kind = 'receipt' WHERE seq = ?", (row,))
    with pytest.raises(IntegrityError, match=f"entry {row} does not match its own body"):
        mesh.checkpoint(operator(mesh))
    assert len(full) == 2
    with sqlite3.connect(tmp_path / "mesh.db") as conn:
        conn.execute("UPDATE ledger_entries SET kind = 'register' WHERE seq = ?", (row,))
    other = Ledger.open(mesh.url)  # another process: checks everything before its first checkpoint
    other.checkpoint(operator(mesh))
    assert len(full) == 3
    mesh.checkpoint(operator(mesh))  # what this one remembers ends before the other's checkpoint
    assert len(full) == 4


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE ledger_tree_nodes SET hash = zeroblob(32) WHERE level = 0 AND idx = 2",  # below the anchor
        "INSERT INTO ledger_evidence VALUES ('sha256:' || hex(zeroblob(32)), x'00')",  # evidence nobody hashed
    ],
)
def test_a_remembered_check_still_sees_an_edited_tree_node_or_evidence_row(
    mesh: Ledger, tmp_path: Path, sql: str
) -> None:
    mesh.checkpoint(operator(mesh))
    with sqlite3.connect(tmp_path / "mesh.db") as conn:
        conn.execute(sql)
    join(mesh, generate_key(), 5)
    with pytest.raises(IntegrityError):
        mesh.checkpoint(operator(mesh))


# -- A7: evidence rows deleted ------------------------------------------------------------------------------


def test_deleted_evidence_is_storage_damage_not_the_writers_fault(
    mesh: Ledger, keys: Keys, jobs: dict[str, Job], tmp_path: Path
) -> None:
    cheat = fraud_bundle(jobs["mlp"], keys.node, tmp_path / "cheat.vmb")
    slash = settle(cheat, jobs["mlp"], mesh).appended
    assert verify_ledger(mesh).ok and audit_ledger(mesh).ok  # honest: evidence kept, nobody blamed
    with sqlite3.connect(tmp_path / "mesh.db") as conn:
        conn.execute("DELETE FROM ledger_evidence")
    report = verify_ledger(mesh)
    verdict_seq = next(s for s, k in slash if k == "verdict")
    assert not report.ok and report.first_bad_entry == verdict_seq
    assert any("not stored" in p and "deleted" in p for p in report.problems)
    audited = audit_ledger(mesh)
    assert audited.violations == () and any("not stored" in p for p in audited.problems)


# -- A10: withdrawing everything right after cheating ------------------------------------------------------


def test_a_cheater_that_withdrew_everything_is_still_slashed(
    mesh: Ledger, keys: Keys, jobs: dict[str, Job], honest: Path, tmp_path: Path
) -> None:
    join(mesh, keys.other, 100)
    withdraw(mesh, withdraw_request(keys.other, mesh, 100), writer=operator(mesh))
    cheat = fraud_bundle(jobs["mlp"], keys.other, tmp_path / "cheat.vmb")
    settled = settle(cheat, jobs["mlp"], mesh, evidence_out=tmp_path / "c.vme")
    assert settled.verdict.status == "reject" and "slash" in kinds(settled)
    standing = node_standing(mesh, keys.other.node_id)
    assert (standing.stake, standing.slashed, standing.slashable) == (0, 50, 50)
    # Honest path: a node whose stake is all unbonding is verified and paid as usual.
    withdraw(mesh, withdraw_request(keys.node, mesh, 1000), writer=operator(mesh))
    assert settle(honest, jobs["mlp"], mesh).verdict.status == "accept"
    assert node_standing(mesh, keys.node.node_id).slashed == 0
    assert audit_ledger(mesh).ok


# -- a node that is also a verifier ---------------------------------------------------------------------


def test_a_node_never_verifies_its_own_result(
    mesh: Ledger, keys: Keys, jobs: dict[str, Job], honest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mesh.add_verifier(operator(mesh), keys.node.public)
    with pytest.raises(InvalidInputError, match="its own result") as info:
        settle(honest, jobs["mlp"], mesh, writer=keys.node)
    assert info.value.code == "self-verification" and node_standing(mesh, keys.node.node_id).accepted == 0
    # Written anyway (a client of its own): the rules name the verdict.
    job = jobs["mlp"]
    envelope = read_bundle(honest).envelope
    raw = envelope.to_bytes()
    claim = {"node_id": keys.node.node_id, "job_id": job.job_id, "step_range": [0, len(job.steps)]}
    with mesh.transaction(keys.node) as txn:
        r = txn.append(
            {
                "kind": "receipt",
                **claim,
                "subjects": envelope.statement()["subject"],
                "envelope_digest": sha256_bytes(raw),
                "envelope": b64encode(raw),
            }
        )
        v = txn.append(
            {
                "kind": "verdict",
                **claim,
                "status": "accept",
                "reason": "all checks passed",
                "seed": "1",
                "sampled_steps": [len(job.steps) - 1],
                "samples": 0,
                "receipt": r,
                "evidence_digest": None,
                "verifier": keys.node.node_id,
            }
        )
    report = audit_ledger(mesh)
    assert report.first_bad_entry == v and any("never verifies itself" in x for x in report.violations)


def test_another_verifier_settles_a_verifier_nodes_result(
    mesh: Ledger, keys: Keys, jobs: dict[str, Job], honest: Path
) -> None:
    mesh.add_verifier(operator(mesh), keys.node.public)
    settled = settle(honest, jobs["mlp"], mesh, writer=rogue_verifier(mesh))
    assert kinds(settled) == ["receipt", "verdict", "reward", "commit"]
    assert audit_ledger(mesh).ok
