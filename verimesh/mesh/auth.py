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

import hmac
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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


# -- sessions: one signature, then a MAC per request ------------------------------------------------
#
# A registered node opens a session with one signed request (``POST /v1/nodes/session``) whose body
# carries an ephemeral X25519 public key; the coordinator answers with a session id and its own
# ephemeral key. Both derive the session's MAC key from the X25519 secret with HKDF-SHA256 (salt: the
# session id; info: the coordinator, the node and both ephemeral keys), so someone who saw the
# handshake and its answer cannot compute it, and the node's signature over its ephemeral key keeps a
# man in the middle from putting its own in. Each later request then carries::
#
#     X-Verimesh-Session  the session id, 32 hex digits
#     X-Verimesh-Counter  a decimal counter, never used twice in the session
#     X-Verimesh-Mac      base64 HMAC-SHA256 under the session key over
#         "verimesh.mesh.session-request.v1\0" || canonical({"coordinator", "method", "path", "node_id",
#                                                            "session", "counter", "body": sha256(body)})
#
# Sessions live in the coordinator's memory only: a restarted coordinator knows none (401
# ``session-unknown``) and a client opens another, so a request recorded before a restart cannot be
# replayed after it. Within a session a counter is accepted once, up to REPLAY_WINDOW behind the
# highest seen (two threads of a node may send out of order). A MAC costs microseconds where a BLS
# verification costs 1.5 ms and a nonce a database write.

SESSION_TAG = b"verimesh.mesh.session-request.v1\x00"
_KDF_INFO = b"verimesh.mesh.session-key.v1\x00"
HEADER_SESSION = "x-verimesh-session"
HEADER_COUNTER = "x-verimesh-counter"
HEADER_MAC = "x-verimesh-mac"
SESSION_SECONDS = 3600
REPLAY_WINDOW = 4096
SESSIONS_PER_KEY = 4
MAX_SESSIONS = 50_000  # about 40 MB of sessions at most: the oldest goes first
_SESSION = re.compile(r"^[0-9a-f]{32}$")
_COUNTER = re.compile(r"^[1-9][0-9]{0,15}$")
_EPHEMERAL = re.compile(r"^[0-9a-f]{64}$")


class SessionError(AuthError):
    """A session request the coordinator cannot take: ``code`` says whether a new session helps."""

    def __init__(self, message: str, code: str = "unauthenticated") -> None:
        super().__init__(message)
        self.code = code


def _session_key(shared: bytes, *, session: str, coordinator: str, node_id: str, node_half: str, ours: str) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    info = _KDF_INFO + canonical_json(
        {"coordinator": coordinator, "node_id": node_id, "node_ephemeral": node_half, "coordinator_ephemeral": ours}
    )
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=bytes.fromhex(session), info=info).derive(shared)


def session_message(
    *, coordinator: str, method: str, path: str, node_id: str, session: str, counter: int, body: bytes
) -> bytes:
    doc = {
        "coordinator": coordinator,
        "method": method.upper(),
        "path": path,
        "node_id": node_id,
        "session": session,
        "counter": counter,
        "body": sha256_bytes(body),
    }
    return SESSION_TAG + canonical_json(doc)


def _mac(key: bytes, message_bytes: bytes) -> bytes:
    return hmac.new(key, message_bytes, "sha256").digest()


class ClientSession:
    """A node's half of a session: its ephemeral key until the answer, then the MAC key and counter."""

    def __init__(self, key: SecretKey, coordinator: str) -> None:
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        self.node_id = key.node_id
        self.coordinator = coordinator
        self._ephemeral = X25519PrivateKey.generate()
        self.session = ""
        self.expires = 0.0
        self._key = b""
        self._counter = 0
        self._lock = threading.Lock()

    def offer(self) -> dict[str, str]:
        """The handshake's body: the node's ephemeral public key."""
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        return {"ephemeral": self._ephemeral.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()}

    def accept(self, answer: Any) -> None:
        """The coordinator's answer: {session, ephemeral, expires}; raises AuthError on anything else."""
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

        if not isinstance(answer, dict) or set(answer) != {"session", "ephemeral", "expires"}:
            raise AuthError("the coordinator's session answer is malformed")
        session, ours, expires = answer["session"], answer["ephemeral"], answer["expires"]
        if not isinstance(session, str) or not _SESSION.match(session) or not isinstance(ours, str) \
                or not _EPHEMERAL.match(ours) or not isinstance(expires, (int, float)):  # fmt: skip
            raise AuthError("the coordinator's session answer is malformed")
        try:
            shared = self._ephemeral.exchange(X25519PublicKey.from_public_bytes(bytes.fromhex(ours)))
        except ValueError as exc:
            raise AuthError("the coordinator's ephemeral key is not a usable X25519 key") from exc
        self._key = _session_key(shared, session=session, coordinator=self.coordinator, node_id=self.node_id,
                                 node_half=self.offer()["ephemeral"], ours=ours)  # fmt: skip
        self.session, self.expires = session, float(expires)

    def headers(self, *, method: str, path: str, body: bytes) -> dict[str, str]:
        with self._lock:
            self._counter += 1
            counter = self._counter
        signed = session_message(coordinator=self.coordinator, method=method, path=path, node_id=self.node_id,
                                 session=self.session, counter=counter, body=body)  # fmt: skip
        mac = b64encode(_mac(self._key, signed))
        return {HEADER_SESSION: self.session, HEADER_COUNTER: str(counter), HEADER_MAC: mac}


@dataclass
class _Session:
    public: PublicKey
    key: bytes
    expires: float
    highest: int = 0  # the highest counter taken
    window: int = 0  # bit i: counter highest - i was taken (REPLAY_WINDOW bits: 512 bytes a session)

    def take(self, counter: int) -> bool:
        """Take ``counter`` once; False for one taken before or further than the window behind."""
        if counter > self.highest:
            self.window = ((self.window << (counter - self.highest)) | 1) & ((1 << REPLAY_WINDOW) - 1)
            self.highest = counter
            return True
        behind = self.highest - counter
        if behind >= REPLAY_WINDOW or self.window >> behind & 1:
            return False
        self.window |= 1 << behind
        return True


class Sessions:
    """The coordinator's open sessions (memory only) and the check of a session request."""

    def __init__(self, coordinator: str, *, lifetime: float = SESSION_SECONDS) -> None:
        self.coordinator = coordinator
        self.lifetime = lifetime
        self._open: OrderedDict[str, _Session] = OrderedDict()
        self._by_key: dict[bytes, list[str]] = {}  # each key's sessions, oldest first
        self._lock = threading.Lock()

    def open(self, public: PublicKey, offer: Any, *, now: float | None = None) -> dict[str, Any]:
        """A new session for ``public`` (whose signed request carried ``offer``): the answer to send."""
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        if not isinstance(offer, dict) or set(offer) != {"ephemeral"} or not isinstance(offer["ephemeral"], str) \
                or not _EPHEMERAL.match(offer["ephemeral"]):  # fmt: skip
            raise InvalidInputError("want {ephemeral: 64 hex digits, an X25519 public key}", code="malformed")
        ephemeral = X25519PrivateKey.generate()
        ours = ephemeral.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
        try:
            shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(bytes.fromhex(offer["ephemeral"])))
        except ValueError as exc:
            raise InvalidInputError("the ephemeral key is not a usable X25519 key", code="malformed") from exc
        session = secrets.token_hex(16)
        key = _session_key(shared, session=session, coordinator=self.coordinator, node_id=public.node_id,
                           node_half=offer["ephemeral"], ours=ours)  # fmt: skip
        expires = (time.time() if now is None else now) + self.lifetime
        with self._lock:
            mine = self._by_key.setdefault(public.key, [])
            while len(mine) >= SESSIONS_PER_KEY:
                self._open.pop(mine.pop(0), None)
            while len(self._open) >= MAX_SESSIONS:
                oldest, state = self._open.popitem(last=False)
                theirs = self._by_key.get(state.public.key, [])
                if oldest in theirs:
                    theirs.remove(oldest)
                if not theirs:
                    self._by_key.pop(state.public.key, None)
            self._open[session] = _Session(public, key, expires)
            mine.append(session)
        return {"session": session, "ephemeral": ours, "expires": round(expires, 3)}

    def check(self, headers: Mapping[str, str], *, method: str, path: str, body: bytes,
              now: float | None = None) -> Signed:  # fmt: skip
        """The node behind a session request, its counter taken; SessionError saying why not."""
        session, counter_text, mac_text = (headers.get(h) for h in (HEADER_SESSION, HEADER_COUNTER, HEADER_MAC))
        if not session or not counter_text or not mac_text:
            raise SessionError("a session request needs X-Verimesh-Session, X-Verimesh-Counter and X-Verimesh-Mac")
        if not _SESSION.match(session) or not _COUNTER.match(counter_text):
            raise SessionError("malformed X-Verimesh-Session or X-Verimesh-Counter")
        try:
            mac = b64decode_strict(mac_text, what="MAC")
        except InvalidInputError as exc:
            raise SessionError("malformed X-Verimesh-Mac") from exc
        counter = int(counter_text)
        current = time.time() if now is None else now
        with self._lock:
            state = self._open.get(session)
        if state is None:
            raise SessionError("this coordinator has no such session (it may have restarted)", "session-unknown")
        if current > state.expires:
            raise SessionError("the session expired", "session-expired")
        signed = session_message(coordinator=self.coordinator, method=method, path=path,
                                 node_id=state.public.node_id, session=session, counter=counter, body=body)  # fmt: skip
        if not hmac.compare_digest(_mac(state.key, signed), mac):
            raise SessionError("the MAC does not verify for this session, method, path, counter and body")
        with self._lock:  # the counter is taken once, whichever of two racing requests comes first
            if not state.take(counter):
                raise SessionError("this request was already seen (replayed session counter)")
        return Signed(state.public, f"session:{session}:{counter}", int(current))
