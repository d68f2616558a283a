"""Signed requests between nodes, job owners and a coordinator (docs/design.md §10).

Every request that changes state, and every read of something only one party may see, carries
four headers::

    X-Verimesh-Key        the signer's BLS public key and proof of possession, hex, "KEY:POP"
    X-Verimesh-Time       UTC seconds since the epoch (an integer)
    X-Verimesh-Nonce      32 hex digits, never used twice by one key within the window
    X-Verimesh-Signature  base64 BLS signature over the message below

The signed message binds the request to one coordinator (its ledger id), one method and path,
one moment and one body::

    "verimesh.mesh.request.v1\\0" || canonical({"coordinator", "method", "path", "node_id",
                                                "time", "nonce", "body": sha256(body)})

A request the coordinator cannot tie to its signer is refused 401 (unsigned, malformed, a bad
signature, a time outside the window, a nonce seen before); a signer that is not allowed what
it asks is refused 403 by the caller of ``check``. Keys whose proof of possession verified are
cached: the check then costs one signature verification.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass

from verimesh.core.canonical import b64decode_strict, b64encode, canonical_json
from verimesh.core.digest import sha256_bytes
from verimesh.errors import InvalidInputError
from verimesh.signing.keys import PublicKey, SecretKey

TAG = b"verimesh.mesh.request.v1\x00"
WINDOW_SECONDS = 120
HEADER_KEY = "x-verimesh-key"
HEADER_TIME = "x-verimesh-time"
HEADER_NONCE = "x-verimesh-nonce"
HEADER_SIGNATURE = "x-verimesh-signature"
_KEY = re.compile(r"^[0-9a-f]{96}:[0-9a-f]{192}$")
_NONCE = re.compile(r"^[0-9a-f]{32}$")
_TIME = re.compile(r"^[0-9]{1,12}$")


class AuthError(Exception):
    """A request that does not authenticate (HTTP 401)."""


def message(*, coordinator: str, method: str, path: str, node_id: str, stamp: int, nonce: str, body: bytes) -> bytes:
    doc = {
        "coordinator": coordinator,
        "method": method.upper(),
        "path": path,
        "node_id": node_id,
        "time": stamp,
        "nonce": nonce,
        "body": sha256_bytes(body),
    }
    return TAG + canonical_json(doc)


def sign_headers(key: SecretKey, *, coordinator: str, method: str, path: str, body: bytes) -> dict[str, str]:
    """The headers that authenticate one request by ``key`` to ``coordinator``."""
    stamp, nonce = int(time.time()), secrets.token_hex(16)
    signed = message(coordinator=coordinator, method=method, path=path, node_id=key.node_id, stamp=stamp,
                     nonce=nonce, body=body)  # fmt: skip
    public = key.public
    return {
        HEADER_KEY: f"{public.key.hex()}:{public.proof_of_possession.hex()}",
        HEADER_TIME: str(stamp),
        HEADER_NONCE: nonce,
        HEADER_SIGNATURE: b64encode(key.sign(signed)),
    }


@dataclass(frozen=True)
class Signed:
    """An authenticated request: who signed it, and the nonce the caller must record once."""

    public: PublicKey
    nonce: str
    stamp: int

    @property
    def node_id(self) -> str:
        return self.public.node_id


class Verifier:
    """Checks request signatures for one coordinator; caches keys whose possession proof holds."""

    def __init__(self, coordinator: str, *, window: int = WINDOW_SECONDS) -> None:
        self.coordinator = coordinator
        self.window = window
        self._possessed: dict[str, PublicKey] = {}

    def _key(self, text: str) -> PublicKey:
        cached = self._possessed.get(text)
        if cached is not None:
            return cached
        if not _KEY.match(text):
            raise AuthError("malformed X-Verimesh-Key (want KEY_HEX:POP_HEX)")
        key_hex, pop_hex = text.split(":")
        try:
            public = PublicKey(bytes.fromhex(key_hex), bytes.fromhex(pop_hex))
        except (ValueError, InvalidInputError) as exc:
            raise AuthError("malformed public key") from exc
        if not public.check_possession():
            raise AuthError("the key's proof of possession does not verify")
        if len(self._possessed) > 100_000:  # forget the oldest key, not every key
            self._possessed.pop(next(iter(self._possessed)))
        self._possessed[text] = public
        return public

    def check(
        self, headers: Mapping[str, str], *, method: str, path: str, body: bytes, now: float | None = None
    ) -> Signed:
        """The signer of a request, or AuthError saying why it does not authenticate."""
        values = {h: headers.get(h) for h in (HEADER_KEY, HEADER_TIME, HEADER_NONCE, HEADER_SIGNATURE)}
        missing = [h for h, v in values.items() if not v]
        if missing:
            raise AuthError(f"unsigned request (missing {', '.join(missing)})")
        stamp_text, nonce = str(values[HEADER_TIME]), str(values[HEADER_NONCE])
        if not _TIME.match(stamp_text) or not _NONCE.match(nonce):
            raise AuthError("malformed X-Verimesh-Time or X-Verimesh-Nonce")
        stamp = int(stamp_text)
        current = time.time() if now is None else now
        if abs(current - stamp) > self.window:
            raise AuthError(f"request time is more than {self.window} s from the coordinator's clock")
        public = self._key(str(values[HEADER_KEY]))
        try:
            signature = b64decode_strict(values[HEADER_SIGNATURE], what="signature")
        except InvalidInputError as exc:
            raise AuthError("malformed X-Verimesh-Signature") from exc
        signed = message(coordinator=self.coordinator, method=method, path=path, node_id=public.node_id,
                         stamp=stamp, nonce=nonce, body=body)  # fmt: skip
        if not public.verify(signed, signature):
            raise AuthError("the signature does not verify for this coordinator, method, path, time and body")
        return Signed(public, nonce, stamp)
