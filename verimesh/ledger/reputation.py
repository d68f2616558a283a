"""Reputation, audit policy and slashing economics, derived from ledger events (docs/design.md §4, §6).

Nothing here is stored: a node's standing is a fold over its events, in log order.

- score: a Beta(1 + a, 1 + r) mean over accepted (a) and rejected (r) verdicts, each weighted
  ``DECAY ** (verdicts since)``, so old behaviour fades; a fraud slash counts as ``SLASH_PENALTY``
  rejects on top of its verdict;
- streak: consecutive accepted verdicts since the last reject, error or slash (BOINC's adaptive
  replication: trust is earned only on checked jobs, one failure resets it);
- stake: registered stake plus top-ups, minus withdrawals and slashes. A withdrawal unbonds:
  the amount stays slashable until it is released, ``unbonding_seconds`` later. A slash takes
  from the bonded stake first, then from the newest withdrawal still unbonding.

The log records each verdict once per (node, job, step range) and each reward and slash once
per claim (the store's unique claim column, re-checked by ``ledger verify``), so this fold
counts what the log says.

Audit policy: a node with a streak under ``NEW_NODE_STREAK`` or a score under ``MIN_SCORE`` has
every step checked. Past that, each ``STREAK_PER_LEVEL`` accepted jobs halve the share of
non-final steps checked, down to ``MAX_LEVEL`` halvings, never below the job's own ``samples``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any

DECAY = 0.95
NEW_NODE_STREAK = 10
STREAK_PER_LEVEL = 10
MAX_LEVEL = 4
MIN_SCORE = 0.8
SLASH_PENALTY = 3.0
DEFAULT_FRAUD_FRACTION = 0.5
DEFAULT_REWARD = 1


@dataclass(frozen=True)
class Unbonding:
    """A withdrawal not yet released: still slashable."""

    seq: int
    amount: int
    release_after: str


@dataclass(frozen=True)
class Standing:
    node_id: str
    registered: bool = False
    stake: int = 0  # bonded
    slashed: int = 0
    rewards: int = 0
    accepted: int = 0
    rejected: int = 0
    weighted_accepts: float = 0.0
    weighted_rejects: float = 0.0
    streak: int = 0
    slashes: tuple[str, ...] = field(default_factory=tuple)  # evidence digests
    unbonding: tuple[Unbonding, ...] = field(default_factory=tuple)
    withdrawn: int = 0  # released to the node

    @property
    def score(self) -> float:
        return (1 + self.weighted_accepts) / (2 + self.weighted_accepts + self.weighted_rejects)

    @property
    def slashable(self) -> int:
        """What a slash can take: the bonded stake and every withdrawal still unbonding."""
        return self.stake + sum(u.amount for u in self.unbonding)

    @property
    def audit_level(self) -> int:
        """0: every step checked; L: 1/2^L of the non-final steps (at least the job's samples)."""
        if self.streak < NEW_NODE_STREAK or self.score < MIN_SCORE:
            return 0
        return min(MAX_LEVEL, 1 + (self.streak - NEW_NODE_STREAK) // STREAK_PER_LEVEL)

    def samples_for(self, steps: int, job_samples: int) -> int:
        """Steps to check beside the last, for a job of ``steps`` steps (``Job.audit_units``: a
        generate job's generated positions)."""
        return samples_at(self.audit_level, steps, job_samples)

    def audit_rate(self, steps: int, job_samples: int) -> float:
        return (self.samples_for(steps, job_samples) + 1) / max(steps, 1)

    def to_json(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "registered": self.registered,
            "stake": self.stake,
            "slashed": self.slashed,
            "unbonding": sum(u.amount for u in self.unbonding),
            "withdrawn": self.withdrawn,
            "rewards": self.rewards,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "score": round(self.score, 6),
            "streak": self.streak,
            "audit_level": self.audit_level,
            "audit": "every step" if self.audit_level == 0 else f"last step + 1/{1 << self.audit_level} of the others",
            "slash_evidence": list(self.slashes),
        }


def samples_at(level: int, steps: int, job_samples: int) -> int:
    """Steps checked beside the last at audit ``level`` (0: every step; L: 1/2^L of the others,
    never fewer than the job's own ``samples``)."""
    others = max(steps - 1, 0)
    if level == 0:
        return others
    return min(others, max(job_samples, math.ceil(others / (1 << level))))


def take(standing: Standing, amount: int) -> Standing:
    """Take ``amount`` (at most the slashable stake): bonded first, then the newest unbonding."""
    from_bonded = min(amount, standing.stake)
    rest = amount - from_bonded
    pending = list(standing.unbonding)
    for i in range(len(pending) - 1, -1, -1):
        if rest <= 0:
            break
        cut = min(rest, pending[i].amount)
        pending[i] = replace(pending[i], amount=pending[i].amount - cut)
        rest -= cut
    return replace(standing, stake=standing.stake - from_bonded, unbonding=tuple(pending))


def apply(standing: Standing, event: Mapping[str, Any]) -> Standing:
    """One event's effect on a node's standing (events of other nodes must not be passed)."""
    kind = event.get("kind")
    if kind == "register":
        return replace(standing, registered=True, stake=standing.stake + int(event["stake"]))
    if kind == "top-up":
        return replace(standing, stake=standing.stake + int(event["amount"]))
    if kind == "withdraw":
        amount = int(event["amount"])
        pending = Unbonding(int(event["seq"]), amount, str(event["release_after"]))
        return replace(standing, stake=standing.stake - amount, unbonding=(*standing.unbonding, pending))
    if kind == "release":
        seq, amount = int(event["withdrawal"]), int(event["amount"])
        return replace(
            standing,
            unbonding=tuple(u for u in standing.unbonding if u.seq != seq),
            withdrawn=standing.withdrawn + amount,
        )
    if kind == "verdict":
        a, r = standing.weighted_accepts * DECAY, standing.weighted_rejects * DECAY
        if event.get("status") == "accept":
            return replace(
                standing,
                accepted=standing.accepted + 1,
                weighted_accepts=a + 1,
                weighted_rejects=r,
                streak=standing.streak + 1,
            )
        return replace(standing, rejected=standing.rejected + 1, weighted_accepts=a, weighted_rejects=r + 1, streak=0)
    if kind == "reward":
        return replace(standing, rewards=standing.rewards + int(event["amount"]))
    if kind == "slash":
        amount = int(event["amount"])
        penalty = SLASH_PENALTY if event.get("reason", "fraud") == "fraud" else 0.0
        taken = take(standing, amount)
        return replace(
            taken,
            slashed=standing.slashed + amount,
            streak=0,
            weighted_rejects=standing.weighted_rejects + penalty,
            slashes=(*standing.slashes, str(event["evidence_digest"])),
        )
    return standing


def standings(events: Iterable[Mapping[str, Any]]) -> dict[str, Standing]:
    out: dict[str, Standing] = {}
    for event in events:
        node = event.get("node_id")
        if isinstance(node, str) and event.get("kind") not in NOT_STANDING:
            out[node] = apply(out.get(node, Standing(node)), event)
    return out


# Events that name a node id but are not about a node's standing.
NOT_STANDING = frozenset({"verifier-add", "verifier-remove", "job", "commit", "checkpoint", "genesis", "settings"})


def standing_of(node_id: str, events: Iterable[Mapping[str, Any]]) -> Standing:
    result = Standing(node_id)
    for event in events:
        if event.get("node_id") == node_id and event.get("kind") not in NOT_STANDING:
            result = apply(result, event)
    return result


def fraud_slash(stake: int, fraction: float | Fraction | str) -> int:
    """A proven fraud takes ``floor(stake * fraction)``, at least 1, at most the stake (exact:
    the fraction is a decimal string in the log, never a float)."""
    if stake <= 0:
        return 0
    share = Fraction(str(fraction)) if not isinstance(fraction, Fraction) else fraction
    return int(min(stake, max(1, math.floor(stake * share))))


@dataclass(frozen=True)
class JobAccount:
    """A job the ledger knows: who posted it (a key in the log), its deposit and what it paid."""

    job_id: str
    owner: str
    deposit: int
    paid: int = 0

    @property
    def remaining(self) -> int:
        return self.deposit - self.paid


def job_account(job_id: str, events: Iterable[Mapping[str, Any]]) -> JobAccount | None:
    """The job's registration and the rewards paid from its deposit, in log order."""
    account: JobAccount | None = None
    for event in events:
        if event.get("job_id") != job_id:
            continue
        if event.get("kind") == "job" and account is None:
            account = JobAccount(job_id, str(event["owner"]), int(event["deposit"]))
        elif event.get("kind") == "reward" and account is not None:
            account = replace(account, paid=account.paid + int(event["amount"]))
    return account


def reward_due(reward: int, account: JobAccount) -> int:
    """What an accepted result earns: the reward in force, out of what is left of the deposit."""
    return max(0, min(reward, account.remaining))


def minimum_deterring_stake(gain: float, detection: float) -> float:
    """Cheating is irrational when slash >= gain * (1 - p) / p (docs/design.md §4)."""
    if detection <= 0:
        return math.inf
    return gain * (1 - detection) / detection
