"""A replayed request is refused before it is charged to its key's rate: whoever saw one signed
request of a node on the wire must not be able to drain that node's rate (and make it miss a
challenge's deadline). In process, with a burst of 3 so that a dozen charged replays would tell."""

from __future__ import annotations

from pathlib import Path

from starlette.testclient import TestClient

from verimesh.core.canonical import canonical_json
from verimesh.mesh.auth import sign_headers
from verimesh.mesh.coordinator import Coordinator
from verimesh.signing.keys import generate_key


def test_replays_are_refused_before_they_are_charged(tmp_path: Path) -> None:
    coordinator = Coordinator(f"sqlite:///{tmp_path / 'm.db'}", generate_key(), rate=0.001, burst=3, isolate=False)
    client = TestClient(coordinator.app())
    node, body = generate_key(), canonical_json({})

    def signed() -> dict[str, str]:
        return sign_headers(node, coordinator=coordinator.ledger.ledger_id, method="POST", path="/v1/lease", body=body)

    seen = signed()
    assert client.post("/v1/lease", content=body, headers=seen).status_code == 403  # signed, not registered
    for _ in range(12):
        replay = client.post("/v1/lease", content=body, headers=seen)
        assert replay.status_code == 401 and "replayed" in replay.json()["error"]["message"]
    assert client.post("/v1/lease", content=body, headers=signed()).status_code == 403  # not 429
    assert client.post("/v1/lease", content=body, headers=signed()).status_code == 403
    assert client.post("/v1/lease", content=body, headers=signed()).status_code == 429  # the burst of 3 is spent
