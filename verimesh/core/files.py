"""Reading user-supplied files: bounded in size, every failure a one-line InvalidInputError."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

from verimesh.errors import InvalidInputError


def open_input(path: Path, *, what: str) -> io.BufferedReader:
    """``path`` opened for reading without blocking on it: a FIFO or a socket is refused (opening
    a FIFO with no writer would wait forever), a regular file or a device is returned."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as exc:
        raise InvalidInputError(f"{what} {path} not found") from exc
    except IsADirectoryError as exc:
        raise InvalidInputError(f"{what} {path} is a directory") from exc
    except OSError as exc:
        raise InvalidInputError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    mode = os.fstat(fd).st_mode
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISDIR(mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "a pipe or socket, not a file"
        raise InvalidInputError(f"{what} {path} is {kind}")
    return io.BufferedReader(io.FileIO(fd, "rb"))


def read_user_file(path: Path, *, what: str, max_bytes: int) -> bytes:
    """The bytes of ``path``; refuses a missing, unreadable or larger-than-``max_bytes`` file.

    The read itself is bounded, not only the size the file reports: a device or pipe reports 0
    (``/dev/zero`` would otherwise be read until memory runs out) and a file may grow while it is
    read."""
    try:
        with open_input(path, what=what) as fh:
            info = os.fstat(fh.fileno())
            if stat.S_ISREG(info.st_mode) and info.st_size > max_bytes:
                raise InvalidInputError(f"{what} {path} is {info.st_size} bytes, over the {max_bytes}-byte limit")
            data = fh.read(max_bytes + 1)
    except OSError as exc:  # open_input has named a missing file, a directory or a pipe already
        raise InvalidInputError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    if len(data) > max_bytes:
        raise InvalidInputError(f"{what} {path} is over the {max_bytes}-byte limit")
    return data
