"""Canonical encodings: RFC 8785 JSON, strict JSON parsing, strict base64.

Everything verimesh signs or digests goes through ``canonical_json``. Everything it reads from an
untrusted file goes through ``parse_json`` (bounded, duplicate keys and NaN refused) and, where
the bytes themselves are covered by a signature or digest, ``parse_canonical_json``, which also
refuses any encoding that is not the canonical one, so that no byte of such a member is free.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import rfc8785

from verimesh.errors import InvalidInputError

MAX_JSON_BYTES = 16 * 1024 * 1024


def canonical_json(value: Any) -> bytes:
    """RFC 8785 (JCS) serialisation. Floats are refused: verimesh documents use ints and strings."""
    _refuse_floats(value)
    try:
        return rfc8785.dumps(value)
    except (rfc8785.CanonicalizationError, TypeError, ValueError) as exc:  # pragma: no cover
        raise InvalidInputError(f"value cannot be canonicalised: {exc}") from exc


def _refuse_floats(value: Any) -> None:
    if isinstance(value, float):
        raise InvalidInputError("floats are not allowed in canonical documents; use strings")
    if isinstance(value, dict):
        for item in value.values():
            _refuse_floats(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _refuse_floats(item)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise InvalidInputError(f"duplicate JSON key {key!r}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise InvalidInputError(f"JSON constant {name} is not allowed")


def parse_json(data: bytes, *, what: str, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parse untrusted JSON: size-bounded, UTF-8 only, duplicate keys and NaN/Infinity refused."""
    if len(data) > max_bytes:
        raise InvalidInputError(f"{what} is {len(data)} bytes, over the {max_bytes}-byte limit")
    try:
        text = data.decode("utf-8")
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except InvalidInputError as exc:
        raise InvalidInputError(f"{what}: {exc.message}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InvalidInputError(f"{what} is not valid JSON: {exc}") from exc


def parse_canonical_json(data: bytes, *, what: str, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parse JSON that must be byte-for-byte in RFC 8785 form."""
    value = parse_json(data, what=what, max_bytes=max_bytes)
    try:
        canonical = canonical_json(value)
    except InvalidInputError as exc:
        raise InvalidInputError(f"{what}: {exc.message}") from exc
    if canonical != data:
        raise InvalidInputError(f"{what} is not in canonical (RFC 8785) form")
    return value


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode_strict(text: object, *, what: str) -> bytes:
    """Standard base64 with padding; any non-canonical spelling (stray bits, whitespace) refused."""
    if not isinstance(text, str):
        raise InvalidInputError(f"{what} must be a base64 string")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise InvalidInputError(f"{what} is not valid base64") from exc
    if base64.b64encode(raw).decode("ascii") != text:
        raise InvalidInputError(f"{what} is not canonical base64")
    return raw
