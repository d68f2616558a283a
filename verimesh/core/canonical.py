"""Canonical encodings: RFC 8785 JSON, strict JSON parsing, strict base64.

Everything verimesh signs or digests goes through ``canonical_json``. Everything it reads from an
untrusted file goes through ``parse_json`` (bounded in bytes and in nesting depth, duplicate keys
and NaN refused) and, where the bytes themselves are covered by a signature or digest,
``parse_canonical_json``, which also refuses any encoding that is not the canonical one, so that
no byte of such a member is free.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import rfc8785

from verimesh.errors import InvalidInputError

MAX_JSON_BYTES = 16 * 1024 * 1024
# No verimesh document nests deeper than a few levels; tensors given as JSON need one level per
# dimension (at most 16). The bound is checked before parsing: json.loads recurses in C once per
# level and, with the recursion limit raised (py_ecc raises it to 100000 on import), a deep
# document overflows the C stack and kills the process instead of raising RecursionError.
MAX_JSON_DEPTH = 64

# Brackets kept (both kinds as "[" and "]": the depth does not care which) and everything else
# deleted, for bytes.translate: what is left is the nesting.
_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")


def canonical_json(value: Any) -> bytes:
    """RFC 8785 (JCS) serialisation. Floats are refused: verimesh documents use ints and strings."""
    _refuse_floats(value)
    try:
        return rfc8785.dumps(value)
    except (rfc8785.CanonicalizationError, TypeError, ValueError) as exc:  # pragma: no cover
        raise InvalidInputError(f"value cannot be canonicalised: {exc}") from exc


def _refuse_floats(value: Any) -> None:
    """Refuse floats and anything nested deeper than MAX_JSON_DEPTH (rfc8785 recurses per level).

    Iterative, so that a deep value is refused here rather than overflowing the stack."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, float):
            raise InvalidInputError("floats are not allowed in canonical documents; use strings")
        if isinstance(item, (dict, list, tuple)):
            if depth >= MAX_JSON_DEPTH:
                raise InvalidInputError(
                    f"value nests deeper than {MAX_JSON_DEPTH} levels",
                    code="json-too-deep",
                    hint="verimesh documents are shallow",
                )
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise InvalidInputError(f"duplicate JSON key {key!r}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise InvalidInputError(f"JSON constant {name} is not allowed")


def json_depth(data: bytes, *, stop_above: int | None = None) -> int:
    """The deepest nesting of ``[`` and ``{`` outside strings, without parsing: linear, no recursion,
    every pass over the bytes in C. With ``stop_above``, returns as soon as the depth exceeds it.

    Strings are skipped the way a JSON parser reads them: backslash pairs first, left to right (so
    ``\\\\"`` ends a string and ``\\"`` does not), then every quote toggles. An unterminated string
    runs to the end, where a parser stops too. On invalid JSON the result is an upper bound of the
    depth a parser reaches before it fails, which is what a bound needs."""
    text = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    outside = b"".join(text.split(b'"')[0::2])
    return _max_depth(outside.translate(_BRACKETS, delete=_NOT_BRACKETS), stop_above)


def _max_depth(brackets: bytes, stop_above: int | None) -> int:
    """Maximum prefix depth of a string of "[" and "]"; chunks that cannot reach the bound are counted
    with bytes.count instead of byte by byte."""
    limit = len(brackets) if stop_above is None else stop_above
    depth = deepest = 0
    for at in range(0, len(brackets), 64):
        chunk = brackets[at : at + 64]
        opens = chunk.count(b"[")
        if depth + opens <= deepest:  # this chunk cannot set a new maximum
            depth += 2 * opens - len(chunk)
            continue
        for byte in chunk:
            depth += 1 if byte == 0x5B else -1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    return deepest
    return deepest


def parse_json(data: bytes, *, what: str, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse untrusted JSON: size- and depth-bounded, UTF-8 only, duplicate keys and NaN/Infinity refused."""
    if len(data) > max_bytes:
        raise InvalidInputError(f"{what} is {len(data)} bytes, over the {max_bytes}-byte limit")
    # Cheap exact bound first: a document with few brackets cannot nest deeply.
    if data.count(b"[") + data.count(b"{") > max_depth and json_depth(data, stop_above=max_depth) > max_depth:
        raise InvalidInputError(
            f"{what} nests deeper than {max_depth} levels",
            code="json-too-deep",
            hint="verimesh documents are shallow; this file was not written by verimesh",
        )
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
