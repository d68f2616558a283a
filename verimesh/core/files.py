"""Reading user-supplied files: bounded in size, every failure a one-line InvalidInputError."""

from __future__ import annotations

from pathlib import Path

from verimesh.errors import InvalidInputError


def read_user_file(path: Path, *, what: str, max_bytes: int) -> bytes:
    """The bytes of ``path``; refuses a missing, unreadable or larger-than-``max_bytes`` file."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise InvalidInputError(f"{what} {path} is {size} bytes, over the {max_bytes}-byte limit")
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise InvalidInputError(f"{what} {path} not found") from exc
    except IsADirectoryError as exc:
        raise InvalidInputError(f"{what} {path} is a directory") from exc
    except OSError as exc:
        raise InvalidInputError(f"cannot read {what} {path}: {exc.strerror}") from exc
