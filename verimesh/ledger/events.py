"""What a ledger entry may say (docs/format.md §10): kinds, who may write each, their members,
the claim each one takes, signed requests by the party an event speaks for, and settings.

Pure functions over event dictionaries; nothing here touches the database. The store refuses an
event whose shape is wrong before it is written, and ``ledger verify`` names one that is.
"""

from __future__ import annotations

import json
import re
import secrets
import time as _time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from verimesh.core.canonical import MAX_JSON_DEPTH, b64decode_strict, b64encode, canonical_json, parse_canonical_json
from verimesh.core.digest import sha256_bytes
from verimesh.errors import InvalidInputError
from verimesh.signing.keys import PublicKey, SecretKey, node_id_for

FORMAT = "verimesh/ledger"
VERSION = 2
REQUEST_TYPE = "verimesh/ledger-request"
COMMIT_TYPE = "verimesh/ledger-commit"

# The operator alone writes the ledger's identity, configuration and writers, and signs checkpoints.
OPERATOR_KINDS = frozenset({"genesis", "settings", "verifier-add", "verifier-remove", "checkpoint"})
# Any writer (the operator or a registered verifier): node and job business, each event either
# carrying the signed request of the party it speaks for or following from signed material.
WRITER_KINDS = frozenset({"register", "top-up", "withdraw", "release", "job", "receipt", "verdict", "reward", "slash"})
KINDS = OPERATOR_KINDS | WRITER_KINDS | {"commit"}
REQUEST_ACTIONS = ("register", "top-up", "withdraw", "job")
# How far ahead of the appending writer's clock an entry may be dated: a writer's clock that runs a
# little fast (or a request signed on one) is tolerated; a date chosen to skip a delay is not.
MAX_CLOCK_SKEW_SECONDS = 300
# Entries that carry a request signed by the party they speak for; none is dated before its request.
REQUEST_KINDS = frozenset({"register", "top-up", "withdraw", "job"})

# Settings: every one has a default, a type, and is changed only by a logged, operator-signed event.
DEFAULT_SETTINGS: dict[str, Any] = {
    "fraud_fraction": "0.5",  # a decimal string: canonical JSON has no floats
    "reward": 1,
    "unbonding_seconds": 7 * 24 * 3600,
    "operator_key_path": "",
}

_TIME = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_NODE = re.compile(r"^vm-[0-9a-f]{20}$")
_HEX = re.compile(r"^[0-9a-f]*$")
_DECIMAL = re.compile(r"^(0\.[0-9]{1,9}|1|1\.0{1,9})$")


# -- entry bytes ------------------------------------------------------------------------------------

_SAFE_INT = 2**53 - 1  # RFC 8785's integer domain


def _plain(value: Any) -> bool:
    """Strings, booleans, null, safe integers, lists, and objects with ASCII keys, shallow enough:
    for these the standard library's sorted compact JSON *is* RFC 8785 (same escapes, and code
    point order is UTF-16 order for ASCII keys). Anything else takes the full encoder."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        kind = type(item)
        if kind is str or kind is bool or item is None:
            continue
        if kind is int:
            if -_SAFE_INT <= item <= _SAFE_INT:
                continue
            return False
        if depth >= MAX_JSON_DEPTH:
            return False
        if kind is dict:
            for key, child in item.items():
                if type(key) is not str or not key.isascii():
                    return False
                stack.append((child, depth + 1))
        elif kind is list or kind is tuple:
            stack.extend((child, depth + 1) for child in item)
        else:
            return False
    return True


def _dumps(value: Any) -> bytes | None:
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode("utf-8")
    except UnicodeEncodeError:
        return None  # a lone surrogate: the full encoder refuses it with its own message


def encode_entry(value: Any) -> bytes:
    """``canonical_json(value)``, several times faster for the plain values entries are made of."""
    fast = _dumps(value) if _plain(value) else None
    return canonical_json(value) if fast is None else fast


def decode_entry(data: bytes, *, what: str, max_bytes: int) -> Any:
    """``parse_canonical_json(data)`` (bounded, canonical form required), with the fast encoder's
    round trip as the check where the value is plain; anything else goes the full way."""
    if len(data) > max_bytes or data.count(b"[") + data.count(b"{") > MAX_JSON_DEPTH:
        return parse_canonical_json(data, what=what, max_bytes=max_bytes)
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return parse_canonical_json(data, what=what, max_bytes=max_bytes)  # for its message
    if not _plain(value):
        return parse_canonical_json(data, what=what, max_bytes=max_bytes)
    if _dumps(value) != data:  # also refuses duplicate keys: the re-encoding has one of each
        raise InvalidInputError(f"{what} is not in canonical (RFC 8785) form")
    return value


def now() -> str:
    return _time.strftime("%Y-%m-%dT%H:%M:%SZ", _time.gmtime())


def is_time(value: Any) -> bool:
    """``value`` is a time in the ledger's format (``YYYY-MM-DDTHH:MM:SSZ``, UTC): such times
    compare as strings in the order of the instants they name."""
    return isinstance(value, str) and bool(_TIME.match(value))


def time_plus(stamp: str, seconds: int) -> str:
    """``stamp`` (UTC, our format) plus ``seconds``, in the same format."""
    import calendar

    base = calendar.timegm(_time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ"))
    return _time.strftime("%Y-%m-%dT%H:%M:%SZ", _time.gmtime(base + seconds))


def step_range_text(step_range: Any) -> str:
    return f"{step_range[0]}-{step_range[1]}"


def claim_key(what: str, node_id: str, job_id: str, step_range: Any) -> str:
    """The once-only key of a verdict, reward or slash: about a node, a job and a step range."""
    return f"{what}:{node_id}:{job_id}:{step_range_text(step_range)}"


def claim_of(event: Mapping[str, Any]) -> str | None:
    """What an event takes once and for all (a unique column in the store); None for the rest.

    A stake request (register, top-up, withdraw) takes its digest; a job its id; a receipt its
    envelope; a verdict and a reward their (node, job, step range); a slash its (reason, node,
    job, step range): the claim, never the bytes that encode the proof.
    """
    kind = event.get("kind")
    try:
        if kind in ("register", "top-up", "withdraw"):
            return f"request:{request_digest(event['request'])}"
        if kind == "release":
            return f"release:{event['withdrawal']}"
        if kind == "job":
            return f"job:{event['job_id']}"
        if kind == "receipt":
            return f"receipt:{event['envelope_digest']}"
        if kind in ("verdict", "reward"):
            return claim_key(str(kind), event["node_id"], event["job_id"], event["step_range"])
        if kind == "slash":
            return claim_key(f"slash:{event['reason']}", event["node_id"], event["job_id"], event["step_range"])
    except (KeyError, TypeError, IndexError):
        return None
    return None


def job_id_of(event: Mapping[str, Any]) -> str | None:
    value = event.get("job_id")
    return value if isinstance(value, str) else None


# -- shapes ---------------------------------------------------------------------------------------


def _is_int(value: Any, *, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_hex(value: Any, length: int) -> bool:
    return isinstance(value, str) and len(value) == length and bool(_HEX.match(value))


def _is_range(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(_is_int(v) for v in value) and value[0] <= value[1]


def _is_digest(value: Any) -> bool:
    return isinstance(value, str) and bool(_DIGEST.match(value))


def _is_node(value: Any) -> bool:
    return isinstance(value, str) and bool(_NODE.match(value))


_COMMON = {"kind", "seq", "time"}


def _positive(v: Any) -> bool:
    return _is_int(v, minimum=1)


def _is_obj(v: Any) -> bool:
    return isinstance(v, dict)


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_time(v: Any) -> bool:
    return isinstance(v, str) and bool(_TIME.match(v))


def _is_operator(v: Any) -> bool:
    return (
        isinstance(v, dict)
        and set(v) == {"public_key", "proof_of_possession"}
        and _is_hex(v["public_key"], 96)
        and _is_hex(v["proof_of_possession"], 192)
    )


_REQUESTED = {"request": _is_obj, "signature": _is_str}
_CLAIM = {"node_id": _is_node, "job_id": _is_digest, "step_range": _is_range}
# kind -> {member: check}; every member required, no other allowed.
_SHAPES: dict[str, dict[str, Callable[[Any], bool]]] = {
    "genesis": {
        "format": lambda v: v == FORMAT,
        "version": lambda v: v == VERSION,
        "ledger_id": lambda v: isinstance(v, str) and 0 < len(v) <= 64,
        "operator": _is_operator,
        "settings": lambda v: settings_problem(v, complete=True) is None,
    },
    "settings": {"changes": lambda v: bool(v) and settings_problem(v, complete=False) is None},
    "verifier-add": {
        "node_id": _is_node,
        "public_key": lambda v: _is_hex(v, 96),
        "proof_of_possession": lambda v: _is_hex(v, 192),
    },
    "verifier-remove": {"node_id": _is_node},
    "register": {"node_id": _is_node, "stake": _positive, **_REQUESTED},
    "top-up": {"node_id": _is_node, "amount": _positive, **_REQUESTED},
    "withdraw": {"node_id": _is_node, "amount": _positive, "release_after": _is_time, **_REQUESTED},
    "release": {"node_id": _is_node, "withdrawal": _is_int, "amount": _is_int},
    "job": {"job_id": _is_digest, "owner": _is_node, "deposit": _positive, **_REQUESTED},
    "receipt": {
        **_CLAIM,
        "subjects": lambda v: isinstance(v, list),
        "envelope_digest": _is_digest,
        "envelope": _is_str,
    },
    "verdict": {
        **_CLAIM,
        "status": lambda v: v in ("accept", "reject"),
        "reason": lambda v: isinstance(v, str) and len(v) <= 500,
        "seed": _is_str,
        "sampled_steps": lambda v: isinstance(v, list) and all(_is_int(s) for s in v),
        "samples": lambda v: v == "all" or _is_int(v),
        "receipt": _is_int,
        "evidence_digest": lambda v: v is None or _is_digest(v),
        "verifier": _is_node,
    },
    "reward": {**_CLAIM, "amount": _positive, "verdict": _is_int},
    "slash": {
        **_CLAIM,
        "amount": _positive,
        "reason": lambda v: v in ("fraud", "equivocation"),
        "evidence_digest": _is_digest,
    },
    "checkpoint": {
        "type": lambda v: v == "verimesh/checkpoint",
        "version": lambda v: v == 2,
        "ledger_id": _is_str,
        "tree_size": _is_int,
        "root": _is_digest,
        "governance": _is_digest,
        "signature": _is_str,
    },
    "commit": {"writer": _is_node, "first": _is_int, "tree_size": _is_int, "root": _is_digest, "signature": _is_str},
}
# The checkpoint entry's own ``time`` is the signed checkpoint time (one member, two roles).
# Version 1 checkpoints (no ``governance``) are still read: verimesh 0.3 wrote them.
_CHECKPOINT_V1 = {k: v for k, v in _SHAPES["checkpoint"].items() if k != "governance"} | {"version": lambda v: v == 1}


def shape_problem(event: Mapping[str, Any]) -> str | None:
    """Why ``event`` (as stored: with kind, seq and time) is not a well-formed entry; None if it is."""
    kind = event.get("kind")
    shape = _SHAPES.get(kind) if isinstance(kind, str) else None
    if kind == "checkpoint" and "governance" not in event:
        shape = _CHECKPOINT_V1
    if shape is None:
        return f"unknown kind {kind!r:.40}"
    expected = _COMMON | set(shape)
    if set(event) != expected:
        extra, missing = sorted(set(event) - expected), sorted(expected - set(event))
        return f"{kind} entry has members {extra} it should not have and lacks {missing}"
    if not _is_int(event["seq"]) or not isinstance(event["time"], str) or not _TIME.match(event["time"]):
        return f"{kind} entry has a bad seq or time"
    for member, check in shape.items():
        try:
            ok = bool(check(event[member]))
        except (KeyError, TypeError, ValueError, IndexError):
            ok = False
        if not ok:
            return f"{kind} entry has a bad {member!r}"
    return None


def node_of(event: Mapping[str, Any]) -> str | None:
    """The node an event concerns (the store's ``node_id`` column): not the job owner, not a writer."""
    if event.get("kind") in ("job", "genesis", "settings", "checkpoint", "commit"):
        return None
    value = event.get("node_id")
    return value if isinstance(value, str) else None


# -- settings -------------------------------------------------------------------------------------


def settings_problem(values: Any, *, complete: bool) -> str | None:
    if not isinstance(values, dict):
        return "settings must be an object"
    unknown = sorted(set(values) - set(DEFAULT_SETTINGS))
    if unknown:
        return f"unknown settings {unknown}"
    if complete and set(values) != set(DEFAULT_SETTINGS):
        return f"genesis settings must name {sorted(DEFAULT_SETTINGS)}"
    for name, value in values.items():
        if name == "fraud_fraction" and not (isinstance(value, str) and _DECIMAL.match(value) and Fraction(value) > 0):
            return "fraud_fraction must be a decimal string in (0, 1]"
        if name in ("reward", "unbonding_seconds") and not _is_int(value):
            return f"{name} must be a non-negative integer"
        if name == "operator_key_path" and not (isinstance(value, str) and len(value) <= 4096):
            return "operator_key_path must be a string"
    return None


def parse_setting(name: str, text: str) -> Any:
    """A setting given on the command line, as the log stores it."""
    if name not in DEFAULT_SETTINGS:
        raise InvalidInputError(f"unknown setting {name!r}", hint=f"known: {', '.join(sorted(DEFAULT_SETTINGS))}")
    value: Any = text
    if name in ("reward", "unbonding_seconds"):
        try:
            value = int(text)
        except ValueError as exc:
            raise InvalidInputError(f"setting {name} must be an integer, got {text!r:.40}") from exc
    elif name == "fraud_fraction":
        try:
            fraction = Fraction(text)
        except (ValueError, ZeroDivisionError) as exc:
            raise InvalidInputError(f"fraud_fraction must be a decimal, got {text!r:.40}") from exc
        value = _decimal_text(fraction)
    problem = settings_problem({name: value}, complete=False)
    if problem:
        raise InvalidInputError(problem)
    return value


def _decimal_text(fraction: Fraction) -> str:
    if fraction == 1:
        return "1"
    text = f"{float(fraction):.9f}".rstrip("0")
    if Fraction(text) != fraction:
        raise InvalidInputError(f"fraud_fraction {fraction} needs more than 9 decimal places")
    return text


def meta_for(genesis: Mapping[str, Any], settings: Mapping[str, Any]) -> dict[str, str]:
    """The ``ledger_meta`` rows the log implies: a cache, checked by ``ledger verify``."""
    operator = genesis["operator"]
    rows = {
        "format": FORMAT,
        "version": str(VERSION),
        "ledger_id": str(genesis["ledger_id"]),
        "operator_public_key": str(operator["public_key"]),
        "operator_pop": str(operator["proof_of_possession"]),
        "operator_node_id": node_id_for(bytes.fromhex(operator["public_key"])),
    }
    rows.update({f"setting.{k}": canonical_json(v).decode() for k, v in sorted(settings.items())})
    return rows


def governance_digest(verifiers: Mapping[str, PublicKey], settings: Mapping[str, Any]) -> str:
    """What a checkpoint pins besides the root: the writers (verifier node id -> public key) and
    the settings in force at its size. A decision read takes the governance entries before its
    checkpoint from the database; this digest, signed by the operator, says they are all there."""
    doc = {"settings": dict(settings), "verifiers": {n: k.key.hex() for n, k in sorted(verifiers.items())}}
    return sha256_bytes(canonical_json(doc))


def fraction_of(settings: Mapping[str, Any]) -> Fraction:
    return Fraction(str(settings.get("fraud_fraction", DEFAULT_SETTINGS["fraud_fraction"])))


# -- signed requests ------------------------------------------------------------------------------


def request_digest(request: Any) -> str:
    return sha256_bytes(canonical_json(request))


@dataclass(frozen=True)
class SignedRequest:
    """What a node (or a job owner) asks of one ledger, signed by its own key: register with a
    stake, top up, withdraw, or post a job with a deposit. The proof of possession alone is
    public; this signature is not, so nobody else can register or move a node's stake."""

    request: dict[str, Any]
    signature: bytes

    @property
    def action(self) -> str:
        return str(self.request["action"])

    @property
    def node_id(self) -> str:
        return str(self.request["node_id"])

    @property
    def amount(self) -> int:
        return int(self.request["amount"])

    @property
    def public(self) -> PublicKey:
        return PublicKey(bytes.fromhex(self.request["public_key"]), bytes.fromhex(self.request["proof_of_possession"]))

    @property
    def digest(self) -> str:
        return request_digest(self.request)

    def to_json(self) -> dict[str, Any]:
        return {"request": self.request, "signature": b64encode(self.signature)}

    def problem(self, *, ledger_id: str, action: str, check_possession: bool = True) -> str | None:
        """Why this request does not authorize ``action`` on ledger ``ledger_id``; None when it does."""
        return request_problem(
            self.request,
            b64encode(self.signature),
            ledger_id=ledger_id,
            action=action,
            check_possession=check_possession,
        )

    @classmethod
    def from_json(cls, doc: Any, *, what: str = "request") -> SignedRequest:
        if not isinstance(doc, dict) or set(doc) != {"request", "signature"}:
            raise InvalidInputError(f"{what} is not a signed ledger request")
        problem = _request_shape(doc["request"])
        if problem:
            raise InvalidInputError(f"{what}: {problem}")
        return cls(doc["request"], b64decode_strict(doc["signature"], what=f"{what} signature"))


def _request_shape(request: Any) -> str | None:
    keys = {
        "type",
        "version",
        "action",
        "ledger_id",
        "node_id",
        "public_key",
        "proof_of_possession",
        "amount",
        "nonce",
        "time",
    }
    if not isinstance(request, dict):
        return "the request is not an object"
    action = request.get("action")
    wanted = keys | ({"job_id"} if action == "job" else set())
    if set(request) != wanted or request["type"] != REQUEST_TYPE or request["version"] != 1:
        return "the request is not a verimesh ledger request (version 1)"
    if action not in REQUEST_ACTIONS:
        return f"unknown request action {action!r:.40}"
    if not (_is_hex(request["public_key"], 96) and _is_hex(request["proof_of_possession"], 192)):
        return "the request's public key is malformed"
    if not _is_int(request["amount"], minimum=1) or not _is_hex(request["nonce"], 32):
        return "the request's amount or nonce is malformed"
    if not isinstance(request["ledger_id"], str) or not is_time(request["time"]):
        return "the request's ledger id or time is malformed"
    if action == "job" and not _is_digest(request["job_id"]):
        return "the request's job id is malformed"
    if request["node_id"] != node_id_for(bytes.fromhex(request["public_key"])):
        return "the request's node id is not its key's"
    return None


def request_problem(
    request: Any,
    signature: Any,
    *,
    ledger_id: str,
    action: str,
    check_possession: bool = True,
    check_signature: bool = True,
) -> str | None:
    """1. The request is well formed; 2. for this action and this ledger; 3. its key's proof of
    possession verifies; 4. the key's signature over the canonical request verifies."""
    # 1.
    problem = _request_shape(request)
    if problem:
        return problem
    # 2.
    if request["action"] != action:
        return f"the request asks for {request['action']!r}, not {action!r}"
    if request["ledger_id"] != ledger_id:
        return f"the request is for ledger {request['ledger_id']!r:.80}, not this one"
    public = PublicKey(bytes.fromhex(request["public_key"]), bytes.fromhex(request["proof_of_possession"]))
    # 3.
    if check_possession and not public.check_possession():
        return "the request's proof of possession does not verify"
    # 4.
    try:
        raw = b64decode_strict(signature, what="request signature")
    except InvalidInputError:
        return "the request's signature is not canonical base64"
    if check_signature and not public.verify(canonical_json(request), raw):
        return f"the request is not signed by {request['node_id']}"
    return None


def sign_request(
    key: SecretKey, *, action: str, ledger_id: str, amount: int, job_id: str | None = None
) -> SignedRequest:
    """A request by ``key``'s owner (a node, or a job owner for ``job``), signed now."""
    if action not in REQUEST_ACTIONS:
        raise InvalidInputError(f"unknown request action {action!r}")
    if amount <= 0:
        raise InvalidInputError("the amount (stake, top-up, withdrawal or deposit) must be a positive integer")
    request: dict[str, Any] = {
        "type": REQUEST_TYPE,
        "version": 1,
        "action": action,
        "ledger_id": ledger_id,
        "node_id": key.node_id,
        "public_key": key.public.key.hex(),
        "proof_of_possession": key.public.proof_of_possession.hex(),
        "amount": amount,
        "nonce": secrets.token_hex(16),
        "time": now(),
    }
    if action == "job":
        if job_id is None:
            raise InvalidInputError("a job request names its job id")
        request["job_id"] = job_id
    problem = _request_shape(request)
    if problem:
        raise InvalidInputError(problem)
    return SignedRequest(request, key.sign(canonical_json(request)))


def commit_statement(*, ledger_id: str, writer: str, first: int, tree_size: int, root: str) -> bytes:
    """What a writer signs at the end of each transaction: the entries [first, tree_size) are its,
    and the tree of the first ``tree_size`` entries has this root."""
    return canonical_json(
        {
            "type": COMMIT_TYPE,
            "version": 1,
            "ledger_id": ledger_id,
            "writer": writer,
            "first": first,
            "tree_size": tree_size,
            "root": root,
        }
    )
