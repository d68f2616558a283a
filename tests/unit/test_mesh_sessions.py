"""Node sessions (mesh.auth): one signed handshake, then a MAC per request, in process.

Every accept beside its refusals: a replayed, reordered-too-far, tampered, foreign, unknown or
expired session request is 401 and changes nothing; the handshake itself must carry the key's
own signature; a session opens only for a registered node; owner endpoints take no session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from verimesh.core.canonical import canonical_json
from verimesh.errors import InvalidInputError
from verimesh.ledger.events import sign_request
from verimesh.mesh.auth import (
    HEADER_COUNTER,
    HEADER_MAC,
    REPLAY_WINDOW,
    SESSIONS_PER_KEY,
    AuthError,
    ClientSession,
    SessionError,
    Sessions,
    sign_headers,
)
from verimesh.mesh.coordinator import Coordinator
from verimesh.signing.keys import SecretKey, generate_key

BODY = canonical_json({})


@pytest.fixture
def mesh(tmp_path: Path) -> tuple[Coordinator, TestClient]:
    coordinator = Coordinator(f"sqlite:///{tmp_path / 'm.db'}", generate_key(), isolate=False)
    return coordinator, TestClient(coordinator.app())


def _signed(coordinator: Coordinator, key: SecretKey, path: str, body: bytes) -> dict[str, str]:
    return sign_headers(key, coordinator=coordinator.ledger.ledger_id, method="POST", path=path, body=body)


def _register(coordinator: Coordinator, client: TestClient, key: SecretKey) -> None:
    request = sign_request(key, action="register", ledger_id=coordinator.ledger.ledger_id, amount=100)
    body = canonical_json({"request": request.to_json(), "device": "cpu"})
    response = client.post(
        "/v1/nodes/register", content=body, headers=_signed(coordinator, key, "/v1/nodes/register", body)
    )
    assert response.status_code == 200, response.text


def _open(coordinator: Coordinator, client: TestClient, key: SecretKey) -> tuple[ClientSession, Any]:
    session = ClientSession(key, coordinator.ledger.ledger_id)
    body = canonical_json(session.offer())
    response = client.post(
        "/v1/nodes/session", content=body, headers=_signed(coordinator, key, "/v1/nodes/session", body)
    )
    assert response.status_code == 200, response.text
    session.accept(response.json())
    return session, response.json()


def _beat(client: TestClient, headers: dict[str, str], body: bytes = BODY) -> Any:
    return client.post("/v1/nodes/heartbeat", content=body, headers=headers)


def test_a_session_authenticates_node_requests_once_and_only_once(mesh: tuple[Coordinator, TestClient]) -> None:
    coordinator, client = mesh
    node = generate_key()
    _register(coordinator, client, node)
    session, _ = _open(coordinator, client, node)
    first = session.headers(method="POST", path="/v1/nodes/heartbeat", body=BODY)
    assert _beat(client, first).status_code == 200
    replay = _beat(client, first)
    assert replay.status_code == 401 and "replayed" in replay.json()["error"]["message"]
    # Two threads of one node may send out of order: a later counter first, then the earlier one.
    early = session.headers(method="POST", path="/v1/nodes/heartbeat", body=BODY)
    late = session.headers(method="POST", path="/v1/nodes/heartbeat", body=BODY)
    assert _beat(client, late).status_code == 200 and _beat(client, early).status_code == 200
    assert _beat(client, early).status_code == 401
    # The lease endpoint takes it too (a node with stake gets a lease or 204).
    lease = session.headers(method="POST", path="/v1/lease", body=BODY)
    assert client.post("/v1/lease", content=BODY, headers=lease).status_code in (200, 204)


@pytest.mark.parametrize("change", ["body", "path", "method", "counter", "mac", "session"])
def test_a_tampered_session_request_is_refused(mesh: tuple[Coordinator, TestClient], change: str) -> None:
    coordinator, client = mesh
    node = generate_key()
    _register(coordinator, client, node)
    session, _ = _open(coordinator, client, node)
    headers = session.headers(method="POST", path="/v1/nodes/heartbeat", body=BODY)
    body = BODY
    if change == "body":
        body = canonical_json({"x": 1})
    elif change == "path":
        headers = session.headers(method="POST", path="/v1/lease", body=BODY)
    elif change == "method":
        headers = session.headers(method="GET", path="/v1/nodes/heartbeat", body=BODY)
    elif change == "counter":
        headers = {**headers, HEADER_COUNTER: str(int(headers[HEADER_COUNTER]) + 1)}
    elif change == "mac":
        headers = {
            **headers,
            HEADER_MAC: headers[HEADER_MAC][:-4] + ("AAA=" if headers[HEADER_MAC][-4:] != "AAA=" else "BBB="),
        }
    else:
        headers = {**headers, "x-verimesh-session": "0" * 32}
    refused = _beat(client, headers, body)
    assert refused.status_code == 401, refused.text
    expected = "session-unknown" if change == "session" else "unauthenticated"
    assert refused.json()["error"]["code"] == expected


def test_an_eavesdropper_with_the_handshake_and_its_answer_cannot_forge(mesh: tuple[Coordinator, TestClient]) -> None:
    coordinator, client = mesh
    node = generate_key()
    _register(coordinator, client, node)
    _, answer = _open(coordinator, client, node)
    # The eavesdropper knows the session id and both ephemeral public keys, not either private key:
    # its own ephemeral key derives another MAC key.
    eve = ClientSession(node, coordinator.ledger.ledger_id)
    eve.accept(answer)
    forged = _beat(client, eve.headers(method="POST", path="/v1/nodes/heartbeat", body=BODY))
    assert forged.status_code == 401 and "MAC does not verify" in forged.json()["error"]["message"]


def test_the_handshake_needs_the_keys_own_signature_and_a_registered_node(mesh: tuple[Coordinator, TestClient]) -> None:
    coordinator, client = mesh
    stranger, node = generate_key(), generate_key()
    offer = canonical_json(ClientSession(stranger, coordinator.ledger.ledger_id).offer())
    refused = client.post(
        "/v1/nodes/session", content=offer, headers=_signed(coordinator, stranger, "/v1/nodes/session", offer)
    )
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "unknown-node"
    assert client.post("/v1/nodes/session", content=offer).status_code == 401  # unsigned
    _register(coordinator, client, node)
    session, _ = _open(coordinator, client, node)
    # A session cannot open another, nor speak on the owner's endpoints.
    inner = canonical_json(ClientSession(node, coordinator.ledger.ledger_id).offer())
    nested = client.post("/v1/nodes/session", content=inner,
                         headers=session.headers(method="POST", path="/v1/nodes/session", body=inner))  # fmt: skip
    assert nested.status_code == 401 and "not a session" in nested.json()["error"]["message"]
    missing = canonical_json({"digests": []})
    owner = client.post("/v1/blobs/missing", content=missing,
                        headers=session.headers(method="POST", path="/v1/blobs/missing", body=missing))  # fmt: skip
    assert owner.status_code == 401
    for bad in ({}, {"ephemeral": "zz"}, {"ephemeral": "00" * 32, "x": 1}, [1]):
        body = canonical_json(bad)
        malformed = client.post(
            "/v1/nodes/session", content=body, headers=_signed(coordinator, node, "/v1/nodes/session", body)
        )
        assert malformed.status_code == 422, (bad, malformed.text)


def test_sessions_unit_rules() -> None:
    """Window, expiry and the per-key cap, on the Sessions object with a fixed clock."""
    coordinator = "c" * 64
    node = generate_key()
    sessions = Sessions(coordinator, lifetime=100)
    client = ClientSession(node, coordinator)
    client.accept(sessions.open(node.public, client.offer(), now=1000.0))

    def check(headers: dict[str, str], now: float = 1001.0) -> str:
        return sessions.check(headers, method="POST", path="/p", body=b"", now=now).node_id

    old = client.headers(method="POST", path="/p", body=b"")
    for _ in range(REPLAY_WINDOW + 1):
        check(client.headers(method="POST", path="/p", body=b""))
    with pytest.raises(SessionError, match="replayed"):  # further behind than the window: refused
        check(old)
    late = client.headers(method="POST", path="/p", body=b"")
    with pytest.raises(SessionError) as expired:
        check(late, now=1101.0)
    assert expired.value.code == "session-expired"
    assert check(late) == node.node_id  # the expired try did not take the counter
    state = sessions._open[client.session]
    assert state.window.bit_length() <= REPLAY_WINDOW  # a bounded window, however many counters
    opened = [sessions.open(node.public, ClientSession(node, coordinator).offer(), now=1000.0)["session"]
              for _ in range(SESSIONS_PER_KEY)]  # fmt: skip
    with pytest.raises(SessionError) as gone:  # the first session was the oldest of this key's
        check(client.headers(method="POST", path="/p", body=b""))
    assert gone.value.code == "session-unknown" and len(opened) == SESSIONS_PER_KEY
    with pytest.raises(InvalidInputError):
        sessions.open(node.public, {"ephemeral": "00" * 32}, now=1000.0)  # a low-order point: no shared secret
    with pytest.raises(AuthError):
        ClientSession(node, coordinator).accept({"session": "0" * 32, "ephemeral": "00" * 32, "expires": 1})
