"""Reputation is a fold over events; the audit policy relaxes with a checked-valid streak and
resets on any failure."""

from __future__ import annotations

import math

from verimesh.ledger.reputation import (
    NEW_NODE_STREAK,
    STREAK_PER_LEVEL,
    Standing,
    fraud_slash,
    minimum_deterring_stake,
    standing_of,
)

NODE = "vm-aaaa"


def events(*statuses: str) -> list[dict[str, object]]:
    out: list[dict[str, object]] = [{"kind": "register", "node_id": NODE, "stake": 100}]
    out += [{"kind": "verdict", "node_id": NODE, "status": s} for s in statuses]
    return out


def test_new_node_is_audited_fully() -> None:
    s = standing_of(NODE, events())
    assert s.registered and s.stake == 100 and s.streak == 0
    assert s.audit_level == 0 and s.samples_for(16, 1) == 15 and s.audit_rate(16, 1) == 1.0


def test_audit_relaxes_with_streak_and_resets_on_failure() -> None:
    rates = [standing_of(NODE, events(*["accept"] * n)).samples_for(17, 1) for n in range(0, 60, 5)]
    assert rates == sorted(rates, reverse=True) and rates[0] == 16 and rates[-1] < 16
    trusted = standing_of(NODE, events(*["accept"] * (NEW_NODE_STREAK + 3 * STREAK_PER_LEVEL)))
    assert trusted.audit_level == 4 - 0 if trusted.audit_level == 4 else trusted.audit_level >= 3
    assert trusted.samples_for(17, 1) == math.ceil(16 / 2**trusted.audit_level)
    assert trusted.samples_for(17, 5) >= 5  # never below the job's own samples
    failed = standing_of(NODE, events(*["accept"] * 40, "reject"))
    assert failed.streak == 0 and failed.audit_level == 0 and failed.samples_for(17, 1) == 16
    errored = standing_of(NODE, events(*["accept"] * 40, "error"))
    assert errored.streak == 0


def test_score_decays_old_behaviour() -> None:
    recent_bad = standing_of(NODE, events(*["accept"] * 30, *["reject"] * 3))
    old_bad = standing_of(NODE, events(*["reject"] * 3, *["accept"] * 30))
    assert old_bad.score > recent_bad.score
    assert 0 < recent_bad.score < 1


def test_slashes_reduce_stake_and_reset_streak() -> None:
    evs = events(*["accept"] * 12)
    evs.append({"kind": "slash", "node_id": NODE, "amount": 40, "evidence_digest": "sha256:" + "1" * 64})
    s = standing_of(NODE, evs)
    assert s.stake == 60 and s.slashed == 40 and s.streak == 0 and s.slashes == ("sha256:" + "1" * 64,)


def test_other_nodes_events_are_ignored() -> None:
    evs = [*events("accept"), {"kind": "slash", "node_id": "vm-other", "amount": 100, "evidence_digest": "x"}]
    assert standing_of(NODE, evs).stake == 100


def test_economics() -> None:
    assert fraud_slash(1000, 0.5) == 500 and fraud_slash(1, 0.5) == 1 and fraud_slash(0, 0.5) == 0
    assert minimum_deterring_stake(10, 0.5) == 10 and minimum_deterring_stake(10, 0.0) == math.inf
    assert Standing("x").score == 0.5
