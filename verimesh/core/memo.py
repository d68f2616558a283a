"""A bounded, thread-safe memo of results of pure checks, keyed by a digest of their inputs.

A check that is a pure function of its bytes (a BLS verification, a Merkle inclusion proof under
a given root) gives the same answer for the same bytes: remembering it is sound, and any changed
byte is another key, checked afresh. Keys are SHA-256 over a kind tag and length-prefixed parts,
so moving bytes from one part to the next is another key. Oldest out first past ``limit``.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict


class Memo:
    def __init__(self, limit: int = 1 << 17) -> None:
        self.limit = limit
        self._seen: OrderedDict[bytes, bool] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(kind: str, *parts: bytes) -> bytes:
        h = hashlib.sha256(kind.encode() + b"\x00")
        for part in parts:
            h.update(len(part).to_bytes(8, "big"))
            h.update(part)
        return h.digest()

    def get(self, key: bytes) -> bool | None:
        with self._lock:
            return self._seen.get(key)

    def put(self, key: bytes, value: bool) -> bool:
        with self._lock:
            self._seen[key] = value
            if len(self._seen) > self.limit:
                self._seen.popitem(last=False)
        return value
