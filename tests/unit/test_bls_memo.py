"""The memo of BLS checks answers only for the very bytes it checked: any changed byte of key,
message or signature is checked afresh (and fails), whatever was checked before."""

from __future__ import annotations

from verimesh.core.memo import Memo
from verimesh.signing.keys import generate_key


def test_a_check_is_remembered_only_for_the_same_bytes() -> None:
    alice, bob = generate_key(), generate_key()
    message = b"verimesh memo test message"
    signature = alice.sign(message)
    assert alice.public.verify(message, signature) and alice.public.verify(
        message, signature
    )  # the second from the memo
    assert not alice.public.verify(message + b"!", signature)
    assert not bob.public.verify(message, signature)  # the same message and signature under another key
    flipped = bytearray(signature)
    flipped[-1] ^= 1
    assert not alice.public.verify(message, bytes(flipped))
    assert not alice.public.verify(message, bytes(flipped))  # a failure is remembered as a failure
    assert alice.public.verify(message, signature)


def test_a_length_split_cannot_alias_two_inputs() -> None:
    """(key, message, signature) are length-prefixed in the memo key: moving bytes from one part
    to the next is another key."""
    assert Memo.key("verify:x", b"ab", b"c") != Memo.key("verify:x", b"a", b"bc")
    assert Memo.key("verify:x", b"a") != Memo.key("verify:y", b"a")


def test_the_memo_is_bounded() -> None:
    memo = Memo(limit=4)
    for i in range(10):
        memo.put(bytes([i]), True)
    assert memo.get(bytes([0])) is None and memo.get(bytes([9])) is True
