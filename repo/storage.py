"""Where packs and snapshot objects live: a narrow interface of immutable, create-once objects.

The repository never rewrites an object in place; it creates new ones and deletes old ones, which is
all an object store offers too. Names use '/' separators (``data/ab/<hex>``, ``snapshots/<hex>``).
"""

from __future__ import annotations

import errno
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Protocol

from .errors import IhbError, NoSpace, RepositoryNotFound


class Storage(Protocol):
    """The operations the repository needs from a backend (local directory now, S3 later)."""

    location: str

    def exists(self, name: str) -> bool: ...
    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes: ...
    def size(self, name: str) -> int: ...
    def put_bytes(self, name: str, data: bytes) -> None: ...
    def replace_bytes(self, name: str, data: bytes) -> None: ...
    def put_file(self, name: str, path: str) -> None: ...
    def list(self, prefix: str) -> Iterator[str]: ...
    def delete(self, name: str) -> None: ...
    def spool_dir(self) -> str: ...


class ObjectExists(IhbError):
    """An object with that name already exists (objects are created once)."""


def _raise_os(e: OSError, what: str) -> None:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        raise NoSpace(f"no space left on the repository's disk while writing {what}; free space and retry") from e
    raise e


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_dead_spool_files(d: str) -> int:
    """Delete the spool files in ``d`` whose writer is gone: names are ``KIND-<pid>-...`` and a pid that
    still runs (or belongs to another user) is left alone. Shared by every storage backend."""
    removed = 0
    if not os.path.isdir(d):
        return 0
    for fn in os.listdir(d):
        parts = fn.split("-")
        if len(parts) < 3 or not parts[1].isdigit():
            continue
        try:
            os.kill(int(parts[1]), 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        try:
            os.unlink(os.path.join(d, fn))
            removed += 1
        except FileNotFoundError:
            pass
    return removed


class LocalStorage:
    """A directory on a local filesystem. Durability: data fsync'ed, then linked into place, then the
    directory fsync'ed, so an object is either complete under its name or absent."""

    MAX_OPEN = 64  # pack file descriptors kept open for fast random reads (FUSE, restore)
    # A full pack is sealed, fsynced and indexed on a thread of its own while the next one fills:
    # done inline, every worker waited on each pack's fsync (BlobWriter._flush_locked).
    background_uploads = 1

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.location = self.root
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._fd_lock = threading.Lock()

    def _path(self, name: str) -> str:
        if name.startswith("/") or ".." in name.split("/"):
            raise ValueError(f"bad object name {name!r}")
        return os.path.join(self.root, name)

    def check_exists(self) -> None:
        if not os.path.isfile(os.path.join(self.root, "config")):
            raise RepositoryNotFound(f"no repository at {self.root}; create one with `ihb init --repo {self.root}`")

    def exists(self, name: str) -> bool:
        return os.path.exists(self._path(name))

    def _fd(self, name: str) -> int:
        with self._fd_lock:
            fd = self._fds.get(name)
            if fd is not None:
                self._fds.move_to_end(name)
                return fd
        fd = os.open(self._path(name), os.O_RDONLY | os.O_CLOEXEC)
        with self._fd_lock:
            old = self._fds.get(name)
            if old is not None:
                os.close(fd)
                return old
            self._fds[name] = fd
            while len(self._fds) > self.MAX_OPEN:
                _, victim = self._fds.popitem(last=False)
                os.close(victim)
        return fd

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        if length is None:
            with open(self._path(name), "rb") as f:
                f.seek(offset)
                return f.read()
        try:
            data = os.pread(self._fd(name), length, offset)
        except OSError as e:
            if e.errno == errno.EBADF:  # closed by eviction in another thread: retry once
                with self._fd_lock:
                    self._fds.pop(name, None)
                data = os.pread(self._fd(name), length, offset)
            else:
                raise
        return data

    def size(self, name: str) -> int:
        return os.stat(self._path(name)).st_size

    def get_into(self, name: str, offset: int, view: memoryview) -> int:
        """Read up to ``len(view)`` bytes at ``offset`` into ``view`` (fewer at the end of the object);
        the blob read path reuses one buffer per thread instead of allocating (and page-faulting in) a
        fresh one for every blob."""
        try:
            n = os.preadv(self._fd(name), [view], offset)
        except OSError as e:
            if e.errno != errno.EBADF:
                raise
            with self._fd_lock:  # closed by eviction in another thread: retry once
                self._fds.pop(name, None)
            n = os.preadv(self._fd(name), [view], offset)
        return n

    def _link_into_place(self, tmp: str, name: str) -> None:
        dest = self._path(name)
        try:
            # Inside the try: a full disk can refuse the directory too (tmpfs did), and the spool file
            # must not outlive the failure (a leaked 1 MiB pack kept the disk full for the next backup).
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            os.link(tmp, dest)  # fails if dest exists: create-once semantics
        except FileExistsError:
            raise ObjectExists(f"object {name} already exists") from None
        except OSError as e:
            _raise_os(e, name)
        finally:
            os.unlink(tmp)
        _fsync_dir(os.path.dirname(dest))

    def _spool_bytes(self, name: str, data: bytes) -> str:
        tmp = os.path.join(self.spool_dir(), f"put-{os.getpid()}-{threading.get_ident()}-{os.urandom(4).hex()}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            if os.path.exists(tmp):
                os.unlink(tmp)
            _raise_os(e, name)
        return tmp

    def put_bytes(self, name: str, data: bytes) -> None:
        self._link_into_place(self._spool_bytes(name, data), name)

    def replace_bytes(self, name: str, data: bytes) -> None:
        """The one exception to create-once: atomically replace a small object (the key file on
        ``ihb key import``); readers see the old or the new content, never a mix."""
        tmp = self._spool_bytes(name, data)
        dest = self._path(name)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        os.replace(tmp, dest)
        _fsync_dir(os.path.dirname(dest))

    def put_file(self, name: str, path: str) -> None:
        """Move a finished, fsync'ed spool file into place (the caller has fsync'ed it)."""
        self._link_into_place(path, name)

    def list(self, prefix: str) -> Iterator[str]:
        base = self._path(prefix.rstrip("/")) if prefix else self.root
        if not os.path.isdir(base):
            return
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            rel = os.path.relpath(dirpath, self.root)
            for fn in sorted(filenames):
                yield fn if rel == "." else f"{rel}/{fn}"

    def subdirs(self, prefix: str) -> dict[str, int]:
        """The directories directly under ``prefix`` with their mtimes in ns (Repository.sync_index
        lists only the ones that changed)."""
        base = self._path(prefix.rstrip("/"))
        try:
            with os.scandir(base) as it:
                return {e.name: e.stat(follow_symlinks=False).st_mtime_ns for e in it if e.is_dir(follow_symlinks=False)}
        except FileNotFoundError:
            return {}

    def delete(self, name: str) -> None:
        with self._fd_lock:
            fd = self._fds.pop(name, None)
            if fd is not None:
                os.close(fd)
        try:
            os.unlink(self._path(name))
        except FileNotFoundError:
            pass

    def spool_dir(self) -> str:
        d = os.path.join(self.root, "tmp")
        os.makedirs(d, exist_ok=True)
        return d

    def cleanup_spool(self) -> int:
        """Remove spool files left by writers that died (kill -9, power loss)."""
        return remove_dead_spool_files(os.path.join(self.root, "tmp"))

    def close(self) -> None:
        with self._fd_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
