"""Bounded work in a child process: a job owner's model may run forever (a ``Loop`` with a trip
count of 10^12 is a valid, small ONNX file), and onnxruntime cannot be interrupted.

``Sandbox`` keeps one child process (started with ``spawn``: nothing of the parent's threads or
locks is inherited) that builds its handler once, from a module-level ``factory`` and its
arguments, and then runs one call at a time. A call that does not answer within its timeout is
``timeout``: the child is killed (an SQL transaction it had open rolls back) and the next call
starts a fresh one. The coordinator verifies in one; a node proves in one.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
from collections.abc import Callable
from typing import Any, Literal

from verimesh.core.processes import die_with_parent

Outcome = tuple[Literal["ok", "error", "timeout", "died"], Any]


def _serve(conn: multiprocessing.connection.Connection, factory: Callable[..., Callable[[Any], Any]],
           args: tuple[Any, ...], parent: int) -> None:  # fmt: skip
    die_with_parent(parent)
    handler = factory(*args)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None or os.getppid() != parent:
            return
        try:
            answer: tuple[str, Any] = ("ok", handler(message))
        except Exception as exc:  # noqa: BLE001 (reported to the parent, which decides; the child lives on)
            answer = ("error", f"{type(exc).__name__}: {exc}"[:500])
        try:
            conn.send(answer)
        except (BrokenPipeError, EOFError, OSError):  # the parent is gone
            return


class Sandbox:
    def __init__(self, factory: Callable[..., Callable[[Any], Any]], *args: Any) -> None:
        self._factory = factory
        self._args = args
        self._ctx = multiprocessing.get_context("spawn")
        self._proc: Any = None
        self._conn: multiprocessing.connection.Connection | None = None

    def _start(self) -> multiprocessing.connection.Connection:
        if self._proc is None or not self._proc.is_alive() or self._conn is None:
            self.close()
            parent, child = self._ctx.Pipe()
            self._proc = self._ctx.Process(target=_serve, args=(child, self._factory, self._args, os.getpid()),
                                           daemon=True)  # fmt: skip
            self._proc.start()
            child.close()
            self._conn = parent
        return self._conn

    def call(self, message: Any, *, timeout: float) -> Outcome:
        conn = self._start()
        try:
            conn.send(message)
            if not conn.poll(timeout):
                self.kill()
                return ("timeout", None)
            outcome: Outcome = conn.recv()
            return outcome
        except (EOFError, OSError):
            self.kill()
            return ("died", None)

    def kill(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=10)
        self._proc = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def close(self) -> None:
        if self._conn is not None and self._proc is not None and self._proc.is_alive():
            try:
                self._conn.send(None)
                self._proc.join(timeout=10)
            except (OSError, EOFError):
                pass
        self.kill()
