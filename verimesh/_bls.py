"""BLS12-381 signature backends, ciphersuite BLS_SIG_BLS12381G2_XMD:SHA-256_SSWU_RO_POP_.

py_ecc is the reference and the test oracle; milagro-bls-binding (same ciphersuite, about 100x
faster) is used when importable. ``VERIMESH_BLS_BACKEND=py_ecc`` forces the reference. Proofs of
possession always use py_ecc (milagro has no PopProve/PopVerify); they run once per key.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from functools import cache
from typing import Protocol

from py_ecc.bls import G2ProofOfPossession as _ref  # type: ignore[attr-defined]

from verimesh.errors import ConfigurationError

SECRET_KEY_BYTES = 32
PUBLIC_KEY_BYTES = 48
SIGNATURE_BYTES = 96
CURVE_ORDER = 0x73EDA753299D7D483339D80809A1D80553BDA402FFFE5BFEFFFFFFFF00000001


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
        return bytes(_ref.SkToPk(sk))

    def sign(self, sk: int, message: bytes) -> bytes:
        return bytes(_ref.Sign(sk, message))

    def verify(self, pk: bytes, message: bytes, signature: bytes) -> bool:
        try:
            return bool(_ref.Verify(pk, message, signature))  # type: ignore[arg-type]
        except (ValueError, TypeError, AssertionError):
            return False

    def aggregate(self, signatures: Sequence[bytes]) -> bytes:
        return bytes(_ref.Aggregate(list(signatures)))  # type: ignore[arg-type]

    def fast_aggregate_verify(self, pks: Sequence[bytes], message: bytes, signature: bytes) -> bool:
        try:
            return bool(_ref.FastAggregateVerify(list(pks), message, signature))  # type: ignore[arg-type]
        except (ValueError, TypeError, AssertionError):
            return False

    def aggregate_verify(self, pks: Sequence[bytes], messages: Sequence[bytes], signature: bytes) -> bool:
        try:
            return bool(_ref.AggregateVerify(list(pks), list(messages), signature))  # type: ignore[arg-type]
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


def fast_backend_available() -> bool:
    return importlib.util.find_spec("milagro_bls_binding") is not None


@cache
def backend(name: str | None = None) -> Backend:
    """The backend named, or ``$VERIMESH_BLS_BACKEND``, or the fastest importable one."""
    choice = name or os.environ.get("VERIMESH_BLS_BACKEND") or ("milagro" if fast_backend_available() else "py_ecc")
    if choice == "py_ecc":
        return PyEccBackend()
    if choice == "milagro":
        return MilagroBackend()
    raise ConfigurationError(f"unknown BLS backend {choice!r}", hint="use 'milagro' or 'py_ecc'")


def keygen(ikm: bytes) -> int:
    return int(_ref.KeyGen(ikm))


def pop_prove(sk: int) -> bytes:
    return bytes(_ref.PopProve(sk))


def pop_verify(pk: bytes, proof: bytes) -> bool:
    try:
        return bool(_ref.PopVerify(pk, proof))  # type: ignore[arg-type]
    except (ValueError, TypeError, AssertionError):
        return False
