"""A small pool of threads for work over bytes that releases the GIL (CRC-32, BLAKE3).

Kept for the process's life: starting threads for every bundle cost more than the CRCs of a
small one. Work below ``threshold`` bytes, or on one core, runs on the caller's thread.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")
_POOL: ThreadPoolExecutor | None = None


def map_bytes(fn: Callable[[T], R], items: Sequence[T], *, total_bytes: int, threshold: int = 4 << 20) -> list[R]:
    """``[fn(item) for item in items]``, on every core when the work is large enough."""
    global _POOL
    cores = os.cpu_count() or 1
    if total_bytes < threshold or cores < 2 or len(items) < 2:
        return [fn(item) for item in items]
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=min(4, cores), thread_name_prefix="verimesh-bytes")
    return list(_POOL.map(fn, items))
