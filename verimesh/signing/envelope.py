"""DSSE envelopes carrying in-toto Statement v1 payloads (docs/format.md §4).

The payload is the statement in RFC 8785 canonical JSON; each signature is a BLS signature over
the DSSE pre-authentication encoding ``PAE(payloadType, payload)``; ``keyid`` is the signer's
node id. The envelope file itself is canonical JSON too, so no byte of it is free to change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from verimesh.core.canonical import b64decode_strict, b64encode, canonical_json, parse_canonical_json
from verimesh.core.digest import parse_digest
from verimesh.errors import InvalidInputError
from verimesh.signing.keys import PublicKey, SecretKey

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
MAX_SIGNATURES = 64


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding."""
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


@dataclass(frozen=True)
class Signature:
    keyid: str
    sig: bytes


@dataclass(frozen=True)
class Envelope:
    payload_type: str
    payload: bytes
    signatures: tuple[Signature, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "payloadType": self.payload_type,
            "payload": b64encode(self.payload),
            "signatures": [{"keyid": s.keyid, "sig": b64encode(s.sig)} for s in self.signatures],
        }

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_json())

    @classmethod
    def from_bytes(cls, data: bytes, *, what: str = "envelope") -> Envelope:
        doc = parse_canonical_json(data, what=what, max_bytes=1024 * 1024)
        if not isinstance(doc, dict) or set(doc) != {"payloadType", "payload", "signatures"}:
            raise InvalidInputError(f"{what} is not a DSSE envelope")
        sigs = doc["signatures"]
        if doc["payloadType"] != PAYLOAD_TYPE:
            raise InvalidInputError(f"{what}: payloadType must be {PAYLOAD_TYPE}")
        if not isinstance(sigs, list) or not 1 <= len(sigs) <= MAX_SIGNATURES:
            raise InvalidInputError(f"{what}: needs 1..{MAX_SIGNATURES} signatures")
        parsed: list[Signature] = []
        for s in sigs:
            if not isinstance(s, dict) or set(s) != {"keyid", "sig"} or not isinstance(s["keyid"], str):
                raise InvalidInputError(f"{what}: malformed signature entry")
            # One signature per key id: the envelope is outside the seal, so anyone relaying it
            # could repeat a signature, and readers that count a key's signatures would disagree.
            if any(p.keyid == s["keyid"] for p in parsed):
                raise InvalidInputError(f"{what}: key id {s['keyid'][:40]!r} signs it more than once")
            parsed.append(Signature(s["keyid"], b64decode_strict(s["sig"], what=f"{what} signature")))
        payload = b64decode_strict(doc["payload"], what=f"{what} payload")
        return cls(PAYLOAD_TYPE, payload, tuple(parsed))

    def statement(self) -> dict[str, Any]:
        """The payload as a checked in-toto Statement v1 (subjects and predicate left to the caller)."""
        doc = parse_canonical_json(self.payload, what="statement", max_bytes=1024 * 1024)
        if not isinstance(doc, dict) or set(doc) != {"_type", "subject", "predicateType", "predicate"}:
            raise InvalidInputError("statement must have exactly _type, subject, predicateType, predicate")
        if doc["_type"] != STATEMENT_TYPE:
            raise InvalidInputError(f"statement _type must be {STATEMENT_TYPE}")
        if not isinstance(doc["subject"], list) or not isinstance(doc["predicate"], dict):
            raise InvalidInputError("statement subject must be a list and predicate an object")
        names = []
        for subject in doc["subject"]:
            if not isinstance(subject, dict) or set(subject) != {"name", "digest"}:
                raise InvalidInputError("statement subject entries need exactly name and digest")
            if not isinstance(subject["name"], str):
                raise InvalidInputError("statement subject names must be strings")
            names.append(subject["name"])
            digest = subject["digest"]
            if not isinstance(digest, dict) or set(digest) != {"sha256"}:
                raise InvalidInputError("statement subject digest must be {sha256: hex}")
            parse_digest("sha256:" + str(digest["sha256"]), what="subject digest")
        # One entry per name, in name order: a consumer reading the first entry for a name must
        # read the one that was verified (a fake digest listed before the real one is refused).
        if names != sorted(set(names)):
            raise InvalidInputError("statement subjects must be unique and sorted by name")
        return doc

    def statement_digest(self) -> str:
        """``sha256:`` digest of the signed statement (the payload): what a later segment names as
        the statement it built on, and what a receipt lists; co-signatures do not change it."""
        from verimesh.core.digest import sha256_bytes

        return sha256_bytes(self.payload)

    def signed_by(self, public: PublicKey) -> bool:
        """True when a signature with this key's node id verifies over the PAE."""
        message = pae(self.payload_type, self.payload)
        return any(s.keyid == public.node_id and public.verify(message, s.sig) for s in self.signatures)

    def with_signature(self, key: SecretKey) -> Envelope:
        """Add a co-signature (a verifier attesting to the same statement)."""
        if any(s.keyid == key.node_id for s in self.signatures):
            return self
        sig = Signature(key.node_id, key.sign(pae(self.payload_type, self.payload)))
        return Envelope(self.payload_type, self.payload, (*self.signatures, sig))


def make_statement(subjects: dict[str, str], predicate_type: str, predicate: dict[str, Any]) -> bytes:
    """Canonical statement bytes; ``subjects`` maps names to ``sha256:`` digests."""
    subject = [{"name": n, "digest": {"sha256": parse_digest(d).hex()}} for n, d in sorted(subjects.items())]
    return canonical_json(
        {"_type": STATEMENT_TYPE, "subject": subject, "predicateType": predicate_type, "predicate": predicate}
    )


def sign_statement(statement: bytes, key: SecretKey) -> Envelope:
    return Envelope(PAYLOAD_TYPE, statement, ()).with_signature(key)
