"""`ledger verify --rules`: every rule re-checked from the log, each violation named at its entry; and
the stake rules end to end (top-up, withdrawal with unbonding, release, slashing what is unbonding).

The rule breakers here are registered verifiers using the Transaction API with their own key: the
log is intact (every batch is signed by an allowed writer), so only the rules can tell."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Keys
from tests.integration.test_ledger import fraud_bundle, join, new_ledger, operator, post
from verimesh.core.canonical import b64encode
from verimesh.errors import InvalidInputError
from verimesh.jobs.job import Job
from verimesh.ledger.events import sign_request
from verimesh.ledger.store import Ledger, verify_ledger
from verimesh.settlement import (
    audit_ledger,
    node_standing,
    release,
    slash_with_evidence,
    top_up,
    withdraw,
)
from verimesh.signing.keys import SecretKey, generate_key
from verimesh.workflows import prove, verify


@pytest.fixture()
def mesh(tmp_path: Path, keys: Keys, jobs: dict[str, Job]) -> Ledger:
    led = new_ledger(tmp_path / "mesh.db", fraud_fraction="0.5", reward=3)
    join(led, keys.node, 1000)
    post(led, jobs["mlp"].job_id)
    return led


@pytest.fixture(scope="module")
def fraud_evidence(tmp_path_factory: pytest.TempPathFactory, keys: Keys, jobs: dict[str, Job]) -> Path:
    folder = tmp_path_factory.mktemp("fraud")
    bad = fraud_bundle(jobs["mlp"], keys.node, folder / "bad.vmb")
    verdict = verify(bad, job=jobs["mlp"], node_key=keys.node.public, evidence_out=folder / "bad.vme")
    assert verdict.status == "reject" and verdict.evidence is not None
    return folder / "bad.vme"


def rogue(led: Ledger) -> SecretKey:
    key = generate_key()
    led.add_verifier(operator(led), key.public)
    return key


def request(key: SecretKey, led: Ledger, action: str, amount: int) -> dict[str, Any]:
    return sign_request(key, action=action, ledger_id=led.ledger_id, amount=amount).to_json()


def claim(keys: Keys, jobs: dict[str, Job], job: str = "mlp") -> dict[str, Any]:
    return {"node_id": keys.node.node_id, "job_id": jobs[job].job_id, "step_range": [0, len(jobs[job].steps)]}


def violation(led: Ledger, seq: int, words: str) -> None:
    assert verify_ledger(led).ok  # the log is intact: each batch signed by an allowed writer
    report = audit_ledger(led)
    assert not report.ok and report.first_bad_entry == seq, report.violations
    assert any(v.startswith(f"entry {seq}:") and words in v for v in report.violations), report.violations


def test_a_verdict_without_the_nodes_receipt(mesh: Ledger, keys: Keys, jobs: dict[str, Job]) -> None:
    event = {
        "kind": "verdict",
        **claim(keys, jobs),
        "status": "accept",
        "reason": "all checks passed",
        "seed": "1",
        "sampled_steps": [],
        "samples": 0,
        "receipt": 2,
        "evidence_digest": None,
    }
    writer = rogue(mesh)
    seq = mesh.append([{**event, "verifier": writer.node_id}], writer=writer)[0]
    violation(mesh, seq, "only a bundle whose signature verifies changes a standing")


def test_a_reject_without_evidence(mesh: Ledger, keys: Keys, jobs: dict[str, Job], tmp_path: Path) -> None:
    from verimesh.core.digest import sha256_bytes
    from verimesh.jobs.bundle import read_bundle

    envelope = read_bundle(prove(jobs["mlp"], key=keys.node, out=tmp_path / "ok.vmb", device="cpu").bundle).envelope
    raw = envelope.to_bytes()
    writer = rogue(mesh)
    with mesh.transaction(writer) as txn:
        r = txn.append(
            {
                "kind": "receipt",
                **claim(keys, jobs),
                "subjects": envelope.statement()["subject"],
                "envelope_digest": sha256_bytes(raw),
                "envelope": b64encode(raw),
            }
        )
        seq = txn.append(
            {
                "kind": "verdict",
                **claim(keys, jobs),
                "status": "reject",
                "reason": "seal",
                "seed": "1",
                "sampled_steps": [],
                "samples": 0,
                "receipt": r,
                "evidence_digest": None,
                "verifier": writer.node_id,
            }
        )
    violation(mesh, seq, "nobody's fault")


def test_a_slash_of_the_wrong_amount_or_reason(
    mesh: Ledger, keys: Keys, jobs: dict[str, Job], fraud_evidence: Path
) -> None:
    writer = rogue(mesh)
    with mesh.transaction(writer) as txn:
        digest = txn.store_evidence(fraud_evidence.read_bytes())
        seq = txn.append(
            {"kind": "slash", **claim(keys, jobs), "amount": 1000, "reason": "fraud", "evidence_digest": digest}
        )
    violation(mesh, seq, "slashes 1000 where the rules take 500")


def test_fraud_evidence_cited_for_equivocation(
    mesh: Ledger, keys: Keys, jobs: dict[str, Job], fraud_evidence: Path
) -> None:
    writer = rogue(mesh)
    with mesh.transaction(writer) as txn:
        digest = txn.store_evidence(fraud_evidence.read_bytes())
        seq = txn.append(
            {"kind": "slash", **claim(keys, jobs), "amount": 1000, "reason": "equivocation", "evidence_digest": digest}
        )
    violation(mesh, seq, "evidence for a equivocation claim")


def test_evidence_about_another_claim(mesh: Ledger, keys: Keys, jobs: dict[str, Job], fraud_evidence: Path) -> None:
    writer = rogue(mesh)
    with mesh.transaction(writer) as txn:
        digest = txn.store_evidence(fraud_evidence.read_bytes())
        seq = txn.append(
            {
                "kind": "slash",
                **claim(keys, jobs, "rescnn"),
                "amount": 500,
                "reason": "fraud",
                "evidence_digest": digest,
            }
        )
    violation(mesh, seq, "not this claim")


def test_stored_evidence_edited(mesh: Ledger, keys: Keys, fraud_evidence: Path, tmp_path: Path) -> None:
    import sqlite3

    slash_with_evidence(mesh, fraud_evidence, writer=operator(mesh))
    with sqlite3.connect(tmp_path / "mesh.db") as conn:
        conn.execute("UPDATE ledger_evidence SET body = body || x'00'")
    report = verify_ledger(mesh)
    assert not report.ok and any("does not hash to its digest" in p for p in report.problems)


def test_stake_moved_without_the_nodes_signature(mesh: Ledger, keys: Keys) -> None:
    writer = rogue(mesh)
    forged = request(keys.other, mesh, "top-up", 10**6)  # signed, but by another key
    seq = mesh.append([{"kind": "top-up", "node_id": keys.node.node_id, "amount": 10**6, **forged}], writer=writer)[0]
    violation(mesh, seq, "not what the node's registered key asked for")
    with pytest.raises(InvalidInputError, match="not registered"):
        top_up(mesh, sign_request(keys.other, action="top-up", ledger_id=mesh.ledger_id, amount=5), writer=writer)


def test_a_withdrawal_beyond_the_stake_or_released_early(
    mesh: Ledger, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    from verimesh.ledger.store import Transaction

    writer = rogue(mesh)
    early = [
        {
            "kind": "withdraw",
            "node_id": keys.node.node_id,
            "amount": 5000,
            "release_after": "2000-01-01T00:00:00Z",
            **request(keys.node, mesh, "withdraw", 5000),
        }
    ]
    with pytest.raises(InvalidInputError, match="release_after") as info:
        mesh.append(early, writer=writer)  # the store refuses an unbonding delay that is not the setting's
    assert info.value.code == "bad-entry-time"
    monkeypatch.setattr(Transaction, "_time_problem", lambda self, stamped: None)  # a client of its own
    seq = mesh.append(early, writer=writer)[0]
    violation(mesh, seq, "withdraws 5000 of a bonded stake of 1000")
    with pytest.raises(InvalidInputError, match="cannot withdraw"):
        withdraw(
            mesh,
            sign_request(keys.node, action="withdraw", ledger_id=mesh.ledger_id, amount=5000),
            writer=operator(mesh),
        )


def test_a_release_before_the_unbonding_delay(mesh: Ledger, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    from verimesh.ledger.store import Transaction

    seq = withdraw(
        mesh, sign_request(keys.node, action="withdraw", ledger_id=mesh.ledger_id, amount=100), writer=operator(mesh)
    )
    with pytest.raises(InvalidInputError, match="no withdrawal past its unbonding delay"):
        release(mesh, keys.node.node_id, writer=operator(mesh))
    early = [{"kind": "release", "node_id": keys.node.node_id, "withdrawal": seq, "amount": 100}]
    writer = rogue(mesh)
    with pytest.raises(InvalidInputError, match="before the withdrawal's release_after") as info:
        mesh.append(early, writer=writer)  # the store refuses it at append
    assert info.value.code == "bad-entry-time"
    # A writer with a client of its own skips that check: the rules still name the entry.
    monkeypatch.setattr(Transaction, "_time_problem", lambda self, stamped: None)
    bad = mesh.append(early, writer=writer)[0]
    violation(mesh, bad, "before")


def test_a_second_registration(mesh: Ledger, keys: Keys) -> None:
    seq = mesh.append(
        [{"kind": "register", "node_id": keys.node.node_id, "stake": 5, **request(keys.node, mesh, "register", 5)}],
        writer=rogue(mesh),
    )[0]
    violation(mesh, seq, "a second time")
    assert node_standing(mesh, keys.node.node_id).stake == 1000  # readers count the first one only


def test_a_request_is_used_once(mesh: Ledger, keys: Keys) -> None:
    once = sign_request(keys.node, action="top-up", ledger_id=mesh.ledger_id, amount=5)
    top_up(mesh, once, writer=operator(mesh))
    with pytest.raises(InvalidInputError, match="already used"):
        top_up(mesh, once, writer=operator(mesh))
    assert node_standing(mesh, keys.node.node_id).stake == 1005


# -- stake end to end ----------------------------------------------------------------------------------


def test_a_slash_reaches_stake_that_is_unbonding(mesh: Ledger, keys: Keys, fraud_evidence: Path) -> None:
    withdraw(
        mesh, sign_request(keys.node, action="withdraw", ledger_id=mesh.ledger_id, amount=800), writer=operator(mesh)
    )
    standing = node_standing(mesh, keys.node.node_id)
    assert (standing.stake, standing.slashable) == (200, 1000)
    result = slash_with_evidence(mesh, fraud_evidence, writer=operator(mesh))
    assert result.amount == 500  # half of what is slashable, not of what is bonded
    standing = node_standing(mesh, keys.node.node_id)
    assert (standing.stake, standing.slashable, standing.slashed) == (0, 500, 500)
    assert audit_ledger(mesh).ok


def test_withdraw_then_release_after_the_delay(tmp_path: Path, keys: Keys) -> None:
    led = new_ledger(tmp_path / "mesh.db", unbonding_seconds=0)
    join(led, keys.node, 100)
    top_up(led, sign_request(keys.node, action="top-up", ledger_id=led.ledger_id, amount=50), writer=operator(led))
    withdraw(led, sign_request(keys.node, action="withdraw", ledger_id=led.ledger_id, amount=120), writer=operator(led))
    released = release(led, keys.node.node_id, writer=operator(led))
    standing = node_standing(led, keys.node.node_id)
    assert len(released) == 1 and (standing.stake, standing.withdrawn, standing.slashable) == (30, 120, 30)
    assert audit_ledger(led).ok


def test_a_fraud_slash_lowers_the_score(mesh: Ledger, keys: Keys, fraud_evidence: Path) -> None:
    before = node_standing(mesh, keys.node.node_id)
    slash_with_evidence(mesh, fraud_evidence, writer=operator(mesh))
    after = node_standing(mesh, keys.node.node_id)
    assert after.score < before.score and after.streak == 0 and after.rejected == before.rejected


def test_an_entry_shape_the_protocol_does_not_know_is_refused(mesh: Ledger, keys: Keys) -> None:
    with pytest.raises(InvalidInputError, match="malformed"):
        mesh.append(
            [{"kind": "top-up", "node_id": keys.node.node_id, "amount": -5, "request": {}, "signature": ""}],
            writer=operator(mesh),
        )
    with pytest.raises(InvalidInputError, match="cannot be appended"):
        mesh.append([{"kind": "commit", "writer": keys.node.node_id}], writer=operator(mesh))
    with pytest.raises(InvalidInputError, match="only the ledger operator"):
        mesh.append(
            [
                {
                    "kind": "verifier-add",
                    "node_id": keys.other.node_id,
                    "public_key": keys.other.public.key.hex(),
                    "proof_of_possession": keys.other.public.proof_of_possession.hex(),
                }
            ],
            writer=rogue(mesh),
        )
