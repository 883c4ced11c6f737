"""Small JSON state files of the service (approvals, restore requests): changed under an exclusive
flock on a side lock file and replaced atomically (write, fsync, rename), so that concurrent CLI
processes and the server never lose each other's changes and a crash leaves the old or the new file."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def exclusive(lock_path: str) -> Iterator[None]:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked_append(path: str) -> Iterator[int]:
    """The fd of an append-only log (created 0600), held under an exclusive flock: writers of one
    line at a time (job records, the audit log) never interleave, readers of the fd see the whole file."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


def write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json_list(path: str) -> list[Any]:
    """The file's JSON list, or [] before the first write."""
    try:
        with open(path) as f:
            return list(json.load(f))
    except FileNotFoundError:
        return []
