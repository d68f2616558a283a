"""BLS12-381 signature backends, ciphersuite BLS_SIG_BLS12381G2_XMD:SHA-256_SSWU_RO_POP_.

py_ecc is the reference and the test oracle. The fast backends, both byte-identical to it
(tests/unit/test_keys.py): blspy (Chia's binding of blst, PopSchemeMPL; about 2 ms a
verification here) when importable, else milagro-bls-binding (about 5 ms).
``VERIMESH_BLS_BACKEND=py_ecc|milagro|blspy`` picks one. Proofs of possession always use py_ecc;
they run once per key.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Sequence
from functools import cache
from typing import Any, Protocol

from verimesh.core.memo import Memo
from verimesh.errors import ConfigurationError

SECRET_KEY_BYTES = 32
PUBLIC_KEY_BYTES = 48
SIGNATURE_BYTES = 96
CURVE_ORDER = 0x73EDA753299D7D483339D80809A1D80553BDA402FFFE5BFEFFFFFFFF00000001


@cache
def _reference() -> Any:
    """py_ecc's POP ciphersuite, imported on first use: it takes most of a second to import and
    only key generation, proofs of possession and the reference backend need it. py_ecc raises the
    interpreter's recursion limit on import; with it a deeply nested input would overflow the C
    stack in C-level recursion (json, numpy) and kill the process, so the limit is put back."""
    limit = sys.getrecursionlimit()
    from py_ecc.bls import G2ProofOfPossession  # type: ignore[attr-defined]

    sys.setrecursionlimit(limit)
    return G2ProofOfPossession


class Backend(Protocol):
    name: str

    def sk_to_pk(self, sk: int) -> bytes: ...
    def sign(self, sk: int, message: bytes) -> bytes: ...
    def verify(self, pk: bytes, message: bytes, signature: bytes) -> bool: ...
    def aggregate(self, signatures: Sequence[bytes]) -> bytes: ...
    def fast_aggregate_verify(self, pks: Sequence[bytes], message: bytes, signature: bytes) -> bool: ...
    def aggregate_verify(self, pks: Sequence[bytes], messages: Sequence[bytes], signature: bytes) -> bool: ...


class PyEccBackend:
    name = "py_ecc"

    def sk_to_pk(self, sk: int) -> bytes:
        return bytes(_reference().SkToPk(sk))

    def sign(self, sk: int, message: bytes) -> bytes:
        return bytes(_reference().Sign(sk, message))

    def verify(self, pk: bytes, message: bytes, signature: bytes) -> bool:
        try:
            return bool(_reference().Verify(pk, message, signature))
        except (ValueError, TypeError, AssertionError):
            return False

    def aggregate(self, signatures: Sequence[bytes]) -> bytes:
        return bytes(_reference().Aggregate(list(signatures)))

    def fast_aggregate_verify(self, pks: Sequence[bytes], message: bytes, signature: bytes) -> bool:
        try:
            return bool(_reference().FastAggregateVerify(list(pks), message, signature))
        except (ValueError, TypeError, AssertionError):
            return False

    def aggregate_verify(self, pks: Sequence[bytes], messages: Sequence[bytes], signature: bytes) -> bool:
        try:
            return bool(_reference().AggregateVerify(list(pks), list(messages), signature))
        except (ValueError, TypeError, AssertionError):
            return False


class MilagroBackend:
    name = "milagro"

    def __init__(self) -> None:
        import warnings

        with warnings.catch_warnings():
            # The binding warns that it is unmaintained; its output is checked byte-for-byte
            # against py_ecc in tests/unit/test_keys.py, and py_ecc stays the fallback.
            warnings.simplefilter("ignore", DeprecationWarning)
            import milagro_bls_binding

        self._m = milagro_bls_binding

    def sk_to_pk(self, sk: int) -> bytes:
        return bytes(self._m.SkToPk(sk.to_bytes(SECRET_KEY_BYTES, "big")))

    def sign(self, sk: int, message: bytes) -> bytes:
        return bytes(self._m.Sign(sk.to_bytes(SECRET_KEY_BYTES, "big"), message))

    def verify(self, pk: bytes, message: bytes, signature: bytes) -> bool:
        if len(pk) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
            return False
        return bool(self._m.Verify(pk, message, signature))

    def aggregate(self, signatures: Sequence[bytes]) -> bytes:
        return bytes(self._m.Aggregate(list(signatures)))

    def fast_aggregate_verify(self, pks: Sequence[bytes], message: bytes, signature: bytes) -> bool:
        if not pks or any(len(p) != PUBLIC_KEY_BYTES for p in pks) or len(signature) != SIGNATURE_BYTES:
            return False
        return bool(self._m.FastAggregateVerify(list(pks), message, signature))

    def aggregate_verify(self, pks: Sequence[bytes], messages: Sequence[bytes], signature: bytes) -> bool:
        if not pks or len(pks) != len(messages) or len(signature) != SIGNATURE_BYTES:
            return False
        if any(len(p) != PUBLIC_KEY_BYTES for p in pks):
            return False
        return bool(self._m.AggregateVerify(list(pks), list(messages), signature))


class BlspyBackend:
    """blspy's PopSchemeMPL is this ciphersuite (DST ``BLS_SIG_BLS12381G2_XMD:SHA-256_SSWU_RO_POP_``).

    Points are parsed with full validation (on curve, in the subgroup, the identity refused as a
    public key); a malformed point raises ValueError or RuntimeError, which is a failed check."""

    name = "blspy"

    def __init__(self) -> None:
        import blspy

        self._b = blspy
        self._scheme = blspy.PopSchemeMPL

    def sk_to_pk(self, sk: int) -> bytes:
        return bytes(self._b.PrivateKey.from_bytes(sk.to_bytes(SECRET_KEY_BYTES, "big")).get_g1())

    def sign(self, sk: int, message: bytes) -> bytes:
        return bytes(self._scheme.sign(self._b.PrivateKey.from_bytes(sk.to_bytes(SECRET_KEY_BYTES, "big")), message))

    def verify(self, pk: bytes, message: bytes, signature: bytes) -> bool:
        try:
            return bool(
                self._scheme.verify(self._b.G1Element.from_bytes(pk), message, self._b.G2Element.from_bytes(signature))
            )
        except (ValueError, RuntimeError):
            return False

    def aggregate(self, signatures: Sequence[bytes]) -> bytes:
        return bytes(self._scheme.aggregate([self._b.G2Element.from_bytes(s) for s in signatures]))

    def fast_aggregate_verify(self, pks: Sequence[bytes], message: bytes, signature: bytes) -> bool:
        if not pks:
            return False
        try:
            keys = [self._b.G1Element.from_bytes(p) for p in pks]
            return bool(self._scheme.fast_aggregate_verify(keys, message, self._b.G2Element.from_bytes(signature)))
        except (ValueError, RuntimeError):
            return False

    def aggregate_verify(self, pks: Sequence[bytes], messages: Sequence[bytes], signature: bytes) -> bool:
        if not pks or len(pks) != len(messages):
            return False
        try:
            keys = [self._b.G1Element.from_bytes(p) for p in pks]
            return bool(self._scheme.aggregate_verify(keys, list(messages), self._b.G2Element.from_bytes(signature)))
        except (ValueError, RuntimeError):
            return False


FAST_BACKENDS = {"blspy": "blspy", "milagro": "milagro_bls_binding"}


def available_backends() -> tuple[str, ...]:
    """Importable fast backends, fastest first."""
    return tuple(name for name, module in FAST_BACKENDS.items() if importlib.util.find_spec(module) is not None)


def fast_backend_available() -> bool:
    return bool(available_backends())


@cache
def backend(name: str | None = None) -> Backend:
    """The backend named, or ``$VERIMESH_BLS_BACKEND``, or the fastest importable one."""
    choice = name or os.environ.get("VERIMESH_BLS_BACKEND") or next(iter(available_backends()), "py_ecc")
    if choice == "py_ecc":
        return PyEccBackend()
    if choice == "milagro":
        return MilagroBackend()
    if choice == "blspy":
        return BlspyBackend()
    raise ConfigurationError(f"unknown BLS backend {choice!r}", hint="use 'blspy', 'milagro' or 'py_ecc'")


def keygen(ikm: bytes) -> int:
    return int(_reference().KeyGen(ikm))


def pop_prove(sk: int) -> bytes:
    return bytes(_reference().PopProve(sk))


# Results of checks made in this process: a check is a pure function of its bytes (core/memo.py), so
# a commit a ledger view re-verifies since its last checkpoint, or a registration re-read, is checked once.
_MEMO = Memo()


def verify(pk: bytes, message: bytes, signature: bytes) -> bool:
    """``backend().verify``, answered from the memo for bytes this process has checked before."""
    chosen = backend()
    key = Memo.key("verify:" + chosen.name, pk, message, signature)
    known = _MEMO.get(key)
    return known if known is not None else _MEMO.put(key, chosen.verify(pk, message, signature))


def signed(pk: bytes, message: bytes, signature: bytes) -> None:
    """Remember a signature this process just made with the secret key of ``pk``: it verifies
    (BLS signing is deterministic), so a view walking its own commit does not check it again."""
    _MEMO.put(Memo.key("verify:" + backend().name, pk, message, signature), True)


def pop_verify(pk: bytes, proof: bytes) -> bool:
    """Proof of possession (memoized like ``verify``)."""
    key = Memo.key("pop:" + os.environ.get("VERIMESH_BLS_BACKEND", ""), pk, proof)
    known = _MEMO.get(key)
    return known if known is not None else _MEMO.put(key, _pop_verify(pk, proof))


def _pop_verify(pk: bytes, proof: bytes) -> bool:
    """Proof of possession; blspy's (about 2 ms) when importable, else py_ecc's (about 1 s)."""
    if importlib.util.find_spec("blspy") is not None and os.environ.get("VERIMESH_BLS_BACKEND") != "py_ecc":
        import blspy

        try:
            return bool(
                blspy.PopSchemeMPL.pop_verify(blspy.G1Element.from_bytes(pk), blspy.G2Element.from_bytes(proof))
            )
        except (ValueError, RuntimeError):
            return False
    try:
        return bool(_reference().PopVerify(pk, proof))
    except (ValueError, TypeError, AssertionError):
        return False
