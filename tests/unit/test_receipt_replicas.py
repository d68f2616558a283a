"""A replicated sub-task in a receipt: who decided and every replica's answer, checked offline.
Each forged variant is signed by the pinned verifier key, so only the structure can refuse it."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from verimesh.signing.keys import generate_key
from verimesh.subtasks.receipt import check_receipt, sign_receipt

VERIFIER = generate_key()
NODES = [generate_key() for _ in range(3)]


def _digest(c: str) -> str:
    return "sha256:" + c * 64


def _body(decided_by: str = "quorum", verdicts: tuple[str, ...] = ("accept", "accept", "accept")) -> dict[str, Any]:
    replicas = [{"replica": r, "node_id": NODES[r].node_id, "node_key": NODES[r].public.to_json(),
                 "statement": _digest(str(r + 1)), "verdict": v} for r, v in enumerate(verdicts)]  # fmt: skip
    return {
        "job_id": _digest("a"), "kind": "whole", "seed": 7, "outputs": {"y": _digest("b")},
        "subtasks": [{"index": 0, "step_range": [0, 3], "node_id": NODES[0].node_id,
                      "node_key": NODES[0].public.to_json(), "statement": _digest("1"),
                      "input_digest": _digest("c"), "verdict": "accept",
                      "sampled_steps": [0, 1, 2], "decided_by": decided_by, "replicas": replicas}],
    }  # fmt: skip


def _check(body: dict[str, Any]) -> tuple[bool, str]:
    result = check_receipt(sign_receipt(body, VERIFIER), [VERIFIER.public])
    return result.ok, result.reason


def test_a_quorum_and_a_referee_receipt_hold() -> None:
    assert _check(_body())[0]
    assert _check(_body("referee", ("accept", "reject", "unsettled")))[0]


def _forged() -> list[tuple[str, dict[str, Any]]]:
    cases = []
    quorum_with_reject = _body("quorum", ("accept", "reject", "accept"))
    cases.append(("a quorum decides only when every replica was accepted", quorum_with_reject))
    unknown = _body("majority")
    cases.append(("decided by the quorum or the referee", unknown))
    cases.append(("decided by the quorum or the referee", _body("spot")))
    wrong_key = _body()
    wrong_key["subtasks"][0]["replicas"][1]["node_key"] = NODES[2].public.to_json()
    cases.append(("is not the key of", wrong_key))
    same_node = _body()
    same_node["subtasks"][0]["replicas"][2].update(node_id=NODES[1].node_id, node_key=NODES[1].public.to_json())
    cases.append(("two replicas ran on one node", same_node))
    not_among = _body()
    not_among["subtasks"][0]["replicas"][0]["statement"] = _digest("9")
    cases.append(("the accepted answer is not one of its replicas", not_among))
    rejected_chosen = _body("referee", ("reject", "accept", "accept"))
    cases.append(("the accepted answer is not one of its replicas", rejected_chosen))
    one = _body()
    one["subtasks"][0]["replicas"] = one["subtasks"][0]["replicas"][:1]
    cases.append(("replicas lists 2..", one))
    half = _body()
    del half["subtasks"][0]["replicas"]
    cases.append(("go together", half))
    renumbered = _body()
    renumbered["subtasks"][0]["replicas"][1]["replica"] = 5
    cases.append(("is not numbered", renumbered))
    extra = _body()
    extra["subtasks"][0]["replicas"][1]["weight"] = 2
    cases.append(("is malformed", extra))
    segments = copy.deepcopy(_body())
    segments["kind"] = "segments"
    cases.append(("go together, on a whole job's receipt", segments))
    return cases


@pytest.mark.parametrize(("why", "body"), _forged(), ids=[why[:30] for why, _ in _forged()])
def test_a_forged_replica_record_does_not_hold_even_when_signed(why: str, body: dict[str, Any]) -> None:
    ok, reason = _check(body)
    assert not ok and why in reason, reason
