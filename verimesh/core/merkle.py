"""RFC 9162 (Certificate Transparency v2) Merkle tree hashing, inclusion and consistency proofs.

leaf hash = SHA-256(0x00 || leaf), node hash = SHA-256(0x01 || left || right), and MTH splits a
list of n > 1 leaves at k, the largest power of two smaller than n (RFC 9162 §2.1.1). The proof
verifiers follow RFC 9162 §2.1.3.2 and §2.1.4.2 step by step; they return False on any malformed
proof rather than raising.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(leaf: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + leaf).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """Largest power of two strictly smaller than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def root_from_leaf_hashes(hashes: Sequence[bytes]) -> bytes:
    """MTH over already-hashed leaves, computed bottom-up (same result as the recursive split)."""
    if not hashes:
        return EMPTY_ROOT
    level = list(hashes)
    while len(level) > 1:
        nxt = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


# Proofs are lists of subtree hashes MTH(D[a:b]). The ranges depend only on sizes and indices,
# so a tree held in memory and one held in a database (ledger) share these definitions and only
# differ in how a range's hash is obtained. Every range starts at a multiple of a power of two
# at least as large as its own split, so each decomposes into O(log n) perfect subtrees.


def inclusion_ranges(index: int, size: int) -> list[tuple[int, int]]:
    """The ranges whose hashes form PATH(index, D[size]) (RFC 9162 §2.1.3.1), leaf to root."""
    if not 0 <= index < size:
        raise ValueError(f"leaf index {index} outside a tree of {size}")
    out: list[tuple[int, int]] = []
    a, b = 0, size
    while b - a > 1:
        k = _split(b - a)
        if index < a + k:
            out.append((a + k, b))
            b = a + k
        else:
            out.append((a, a + k))
            a = a + k
    return out[::-1]


def consistency_ranges(old_size: int, new_size: int) -> list[tuple[int, int]]:
    """The ranges whose hashes form PROOF(old_size, D[new_size]) (RFC 9162 §2.1.4.1)."""
    if not 0 < old_size <= new_size:
        raise ValueError(f"old size {old_size} outside 1..{new_size}")

    def subproof(m: int, a: int, b: int, complete: bool) -> list[tuple[int, int]]:
        n = b - a
        if m == n:
            return [] if complete else [(a, b)]
        k = _split(n)
        if m <= k:
            return subproof(m, a, a + k, complete) + [(a + k, b)]
        return subproof(m - k, a + k, b, False) + [(a, a + k)]

    return subproof(old_size, 0, new_size, True)


def perfect_parts(a: int, b: int) -> list[tuple[int, int]]:
    """MTH(D[a:b]) as perfect subtrees (level, index), left to right: level l, index i covers
    leaves [i * 2^l, (i + 1) * 2^l). ``a`` must be aligned as the proof ranges are."""
    parts = []
    while b > a:
        n = b - a
        k = n if n & (n - 1) == 0 else _split(n)
        level = k.bit_length() - 1
        if a % k:
            raise ValueError(f"range [{a}, {b}) is not aligned")
        parts.append((level, a >> level))
        a += k
    return parts


def fold_parts(hashes: Sequence[bytes]) -> bytes:
    """Combine perfect-subtree hashes (left to right) the way MTH's split does: right-nested."""
    acc = hashes[-1]
    for h in reversed(hashes[:-1]):
        acc = node_hash(h, acc)
    return acc


def inclusion_proof(hashes: Sequence[bytes], index: int) -> list[bytes]:
    """PATH(index, D[n]) over leaf hashes held in memory."""
    return [root_from_leaf_hashes(hashes[a:b]) for a, b in inclusion_ranges(index, len(hashes))]


def consistency_proof(hashes: Sequence[bytes], old_size: int) -> list[bytes]:
    """PROOF(old_size, D[n]) over leaf hashes held in memory."""
    return [root_from_leaf_hashes(hashes[a:b]) for a, b in consistency_ranges(old_size, len(hashes))]


def verify_inclusion(leaf: bytes, index: int, tree_size: int, proof: Sequence[bytes], root: bytes) -> bool:
    """RFC 9162 §2.1.3.2: does ``leaf`` (a leaf *hash*) sit at ``index`` under ``root``?"""
    # 1. leaf_index must be below tree_size.
    if not 0 <= index < tree_size or len(leaf) != 32 or len(root) != 32:
        return False
    if any(len(p) != 32 for p in proof):
        return False
    # 2. fn = leaf_index, sn = tree_size - 1, r = leaf hash.
    fn, sn, r = index, tree_size - 1, leaf
    # 3. for each p in the path ...
    for p in proof:
        if sn == 0:  # 3.1 the proof is longer than the tree is deep
            return False
        if fn & 1 or fn == sn:  # 3.2
            r = node_hash(p, r)
            if not fn & 1:  # 3.2.2 shift until LSB(fn) is set or fn is 0
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:  # 3.3
            r = node_hash(r, p)
        fn >>= 1  # 3.4
        sn >>= 1
    # 4. sn must be 0 and r the root.
    return sn == 0 and r == root


def verify_consistency(old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]) -> bool:
    """RFC 9162 §2.1.4.2: is the tree of ``new_size`` an append-only extension of ``old_size``?"""
    # A proof from the empty tree proves nothing; callers must not ask for one.
    if not 0 < old_size <= new_size:
        return False
    if old_size == new_size:
        return not proof and old_root == new_root
    if any(len(p) != 32 for p in proof) or len(old_root) != 32 or len(new_root) != 32:
        return False
    # 1. if first is an exact power of 2, prepend first_hash to the path.
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    if not path:
        return False
    # 2. fn = first - 1, sn = second - 1.
    fn, sn = old_size - 1, new_size - 1
    # 3. if LSB(fn) is set, shift fn and sn right until it is not.
    while fn & 1:
        fn >>= 1
        sn >>= 1
    # 4. fr = sr = c[0].
    fr = sr = path[0]
    # 5. for each subsequent c.
    for c in path[1:]:
        if sn == 0:  # 5.1
            return False
        if fn & 1 or fn == sn:  # 5.2
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:  # 5.3
            sr = node_hash(sr, c)
        fn >>= 1  # 5.4
        sn >>= 1
    # 6. fr == first_hash, sr == second_hash, sn == 0.
    return fr == old_root and sr == new_root and sn == 0
