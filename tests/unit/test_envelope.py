from __future__ import annotations

import json

import pytest

from verimesh.core.canonical import canonical_json
from verimesh.errors import InvalidInputError
from verimesh.signing.envelope import Envelope, make_statement, pae, sign_statement
from verimesh.signing.keys import generate_key

DIGEST = "sha256:" + "ab" * 32


def test_pae_matches_the_dsse_spec_example() -> None:
    assert (
        pae("http://example.com/HelloWorld", b"hello world")
        == b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


def test_sign_and_verify_and_cosign() -> None:
    worker, verifier, stranger = generate_key(), generate_key(), generate_key()
    env = sign_statement(make_statement({"out": DIGEST}, "https://verimesh.dev/x/v1", {"k": 1}), worker)
    parsed = Envelope.from_bytes(env.to_bytes())
    assert parsed == env and parsed.signed_by(worker.public) and not parsed.signed_by(stranger.public)
    both = parsed.with_signature(verifier)
    assert both.signed_by(worker.public) and both.signed_by(verifier.public) and len(both.signatures) == 2
    assert parsed.statement()["subject"] == [{"name": "out", "digest": {"sha256": "ab" * 32}}]


def test_tampered_payload_or_keyid_fails() -> None:
    key = generate_key()
    env = sign_statement(make_statement({"out": DIGEST}, "t", {"k": 1}), key)
    doc = env.to_json()
    other = Envelope.from_bytes(
        canonical_json(
            {
                **doc,
                "payload": Envelope(env.payload_type, env.payload.replace(b'"k":1', b'"k":2'), ()).to_json()["payload"],
            }
        )
    )
    assert not other.signed_by(key.public)
    renamed = Envelope.from_bytes(
        canonical_json({**doc, "signatures": [{"keyid": "vm-x", "sig": doc["signatures"][0]["sig"]}]})
    )
    assert not renamed.signed_by(key.public)


def test_non_canonical_envelopes_are_refused() -> None:
    key = generate_key()
    env = sign_statement(make_statement({"out": DIGEST}, "t", {}), key)
    with pytest.raises(InvalidInputError, match="canonical"):
        Envelope.from_bytes(json.dumps(env.to_json(), indent=1).encode())
    with pytest.raises(InvalidInputError, match="duplicate"):
        Envelope.from_bytes(b'{"payload":"","payload":"","payloadType":"x","signatures":[]}')
    with pytest.raises(InvalidInputError):
        Envelope.from_bytes(canonical_json({**env.to_json(), "signatures": []}))
