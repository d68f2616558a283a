"""Reputation, audit policy and slashing economics, derived from ledger events (docs/design.md §4, §6).

Nothing here is stored: a node's standing is a fold over its events, in log order.

- score: a Beta(1 + a, 1 + r) mean over accepted (a) and rejected (r) verdicts, each weighted
  ``DECAY ** (verdicts since)``, so old behaviour fades;
- streak: consecutive accepted verdicts since the last reject, error or slash (BOINC's adaptive
  replication: trust is earned only on checked jobs, one failure resets it);
- stake: registered stake minus slashes, plus nothing else (rewards are paid out, not staked).

Audit policy: a node with a streak under ``NEW_NODE_STREAK`` or a score under ``MIN_SCORE`` has
every step checked. Past that, each ``STREAK_PER_LEVEL`` accepted jobs halve the share of
non-final steps checked, down to ``MAX_LEVEL`` halvings, never below the job's own ``samples``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

DECAY = 0.95
NEW_NODE_STREAK = 10
STREAK_PER_LEVEL = 10
MAX_LEVEL = 4
MIN_SCORE = 0.8
DEFAULT_FRAUD_FRACTION = 0.5
DEFAULT_REWARD = 1


@dataclass(frozen=True)
class Standing:
    node_id: str
    registered: bool = False
    stake: int = 0
    slashed: int = 0
    rewards: int = 0
    accepted: int = 0
    rejected: int = 0
    weighted_accepts: float = 0.0
    weighted_rejects: float = 0.0
    streak: int = 0
    slashes: tuple[str, ...] = field(default_factory=tuple)  # evidence digests

    @property
    def score(self) -> float:
        return (1 + self.weighted_accepts) / (2 + self.weighted_accepts + self.weighted_rejects)

    @property
    def audit_level(self) -> int:
        """0: every step checked; L: 1/2^L of the non-final steps (at least the job's samples)."""
        if self.streak < NEW_NODE_STREAK or self.score < MIN_SCORE:
            return 0
        return min(MAX_LEVEL, 1 + (self.streak - NEW_NODE_STREAK) // STREAK_PER_LEVEL)

    def samples_for(self, steps: int, job_samples: int) -> int:
        """Steps to check beside the last, for a job of ``steps`` steps."""
        others = max(steps - 1, 0)
        if self.audit_level == 0:
            return others
        return min(others, max(job_samples, math.ceil(others / (1 << self.audit_level))))

    def audit_rate(self, steps: int, job_samples: int) -> float:
        return (self.samples_for(steps, job_samples) + 1) / max(steps, 1)

    def to_json(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id, "registered": self.registered, "stake": self.stake, "slashed": self.slashed,
            "rewards": self.rewards, "accepted": self.accepted, "rejected": self.rejected,
            "score": round(self.score, 6), "streak": self.streak, "audit_level": self.audit_level,
            "audit": "every step" if self.audit_level == 0 else f"last step + 1/{1 << self.audit_level} of the others",
            "slash_evidence": list(self.slashes),
        }  # fmt: skip


def apply(standing: Standing, event: dict[str, Any]) -> Standing:
    """One event's effect on a node's standing (events of other nodes must not be passed)."""
    kind = event.get("kind")
    if kind == "register":
        return replace(standing, registered=True, stake=standing.stake + int(event["stake"]))
    if kind == "verdict":
        a, r = standing.weighted_accepts * DECAY, standing.weighted_rejects * DECAY
        if event.get("status") == "accept":
            return replace(standing, accepted=standing.accepted + 1, weighted_accepts=a + 1, weighted_rejects=r,
                           streak=standing.streak + 1)  # fmt: skip
        return replace(standing, rejected=standing.rejected + 1, weighted_accepts=a, weighted_rejects=r + 1, streak=0)
    if kind == "reward":
        return replace(standing, rewards=standing.rewards + int(event["amount"]))
    if kind == "slash":
        amount = int(event["amount"])
        return replace(standing, stake=standing.stake - amount, slashed=standing.slashed + amount, streak=0,
                       slashes=(*standing.slashes, str(event["evidence_digest"])))  # fmt: skip
    return standing


def standings(events: Iterable[dict[str, Any]]) -> dict[str, Standing]:
    out: dict[str, Standing] = {}
    for event in events:
        node = event.get("node_id")
        if isinstance(node, str):
            out[node] = apply(out.get(node, Standing(node)), event)
    return out


def standing_of(node_id: str, events: Iterable[dict[str, Any]]) -> Standing:
    result = Standing(node_id)
    for event in events:
        if event.get("node_id") == node_id:
            result = apply(result, event)
    return result


def fraud_slash(stake: int, fraction: float) -> int:
    return int(min(stake, max(1, math.floor(stake * fraction)))) if stake > 0 else 0


def minimum_deterring_stake(gain: float, detection: float) -> float:
    """Cheating is irrational when slash >= gain * (1 - p) / p (docs/design.md §4)."""
    if detection <= 0:
        return math.inf
    return gain * (1 - detection) / detection
