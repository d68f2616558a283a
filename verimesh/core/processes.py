"""Child processes that never outlive their parent."""

from __future__ import annotations

import os
import signal


def die_with_parent(parent: int) -> None:
    """Called first in a child process: it is killed when the process that started it dies, even
    by SIGKILL (Linux's parent-death signal), and exits now if that process is already gone. A
    coordinator killed with -9 must not leave a verifier writing beside its restarted successor,
    nor a node killed mid-proof an ezkl worker proving for no one."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(0)
