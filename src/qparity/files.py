"""Paths for every public entry point: type checks, reading, and writing without leaving partial files.

Every failure is a QParityError naming the path and what to do: `ArgumentTypeError` for a path that is not
a str or os.PathLike, `FileAccessError` (also an OSError) for a file that cannot be read or written.
"""
from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from typing import Iterator

from .errors import ArgumentTypeError, FileAccessError


def path_of(value, role: str) -> str:
    """`value` as a str path; `role` names it in the error ("the model file")."""
    if isinstance(value, bytes) or not isinstance(value, (str, os.PathLike)):
        raise ArgumentTypeError(f"{role} must be a path (str or os.PathLike), got {type(value).__name__}")
    path = os.fspath(value)
    if not isinstance(path, str) or not path:
        raise ArgumentTypeError(f"{role} must be a non-empty path, got {value!r}")
    return path


def require_file(value, role: str) -> str:
    """The path of an existing, readable regular file."""
    path = path_of(value, role)
    if os.path.isdir(path):
        raise FileAccessError(f"{role} {path!r} is a directory, not a file")
    if not os.path.exists(path):
        raise FileAccessError(f"{role} {path!r} does not exist")
    if not os.access(path, os.R_OK):
        raise FileAccessError(f"{role} {path!r} is not readable (permission denied)")
    return path


def read_bytes(value, role: str) -> bytes:
    path = require_file(value, role)
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as error:
        raise FileAccessError(f"cannot read {role} {path!r}: {error.strerror or error}") from error


@contextmanager
def replacing(value, role: str) -> Iterator[str]:
    """Yield a temporary path next to `value` (same suffix); once the body succeeds it replaces `value`.

    The temporary file lives in the destination's directory so os.replace is atomic (a rename on one file
    system): readers see the old file or the new one, never a partial one. It is removed on any failure.
    """
    path = path_of(value, role)
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise FileAccessError(f"cannot write {role} {path!r}: it is a directory")
    if not os.path.isdir(directory):
        raise FileAccessError(f"cannot write {role} {path!r}: the directory {directory!r} does not exist")
    name, suffix = os.path.splitext(os.path.basename(path))
    temporary = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp{suffix}")
    try:
        # os.open with O_EXCL, not tempfile.mkstemp: the file gets the umask's permissions, as open() gives.
        os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as error:
        raise FileAccessError(f"cannot write {role} {path!r}: {error.strerror or error}") from error
    try:
        yield temporary
        os.replace(temporary, path)
    except FileAccessError:
        raise
    except OSError as error:
        raise FileAccessError(f"cannot write {role} {path!r}: {error.strerror or error}") from error
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
