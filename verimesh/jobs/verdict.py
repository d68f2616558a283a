"""Verdicts are values: a status, every named check, the seed, and where the evidence went."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from verimesh.errors import VerificationFailedError

Status = Literal["accept", "reject", "error"]


@dataclass(frozen=True)
class Check:
    """One named check: what was compared, and got vs expected when it failed."""

    name: str
    ok: bool
    detail: str = ""
    expected: str | None = None
    got: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "ok": self.ok, "detail": self.detail}
        if self.expected is not None or self.got is not None:
            out["expected"], out["got"] = self.expected, self.got
        if self.metrics:
            out["metrics"] = self.metrics
        return out


@dataclass(frozen=True)
class Verdict:
    status: Status
    checks: tuple[Check, ...]
    job_id: str | None = None
    node_id: str | None = None
    seed: int | None = None
    sampled_steps: tuple[int, ...] = ()
    evidence: str | None = None
    outputs: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # An accept needs at least one check and every check passed; anything else cannot accept.
        if self.status == "accept" and (not self.checks or not all(c.ok for c in self.checks)):
            raise ValueError("an accepting verdict needs checks, all of them passed")

    def __bool__(self) -> bool:
        return self.status == "accept"

    @property
    def accepted(self) -> bool:
        return bool(self)

    @property
    def reason(self) -> str:
        failed = [c for c in self.checks if not c.ok]
        if not failed:
            return "all checks passed" if self.status == "accept" else "no checks ran"
        first = failed[0]
        return f"{first.name}: {first.detail}" if first.detail else first.name

    def raise_for_reject(self) -> None:
        if not self:
            raise VerificationFailedError(f"verification {self.status}: {self.reason}", code=f"verdict-{self.status}")

    def to_json(self) -> dict[str, Any]:
        return {
            "verdict": self.status,
            "reason": self.reason,
            "job_id": self.job_id,
            "node_id": self.node_id,
            "seed": self.seed,
            "sampled_steps": list(self.sampled_steps),
            "outputs": self.outputs,
            "evidence": self.evidence,
            "checks": [c.to_json() for c in self.checks],
        }
