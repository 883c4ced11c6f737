"""File-level backup: walk paths, chunk and deduplicate file data, write tree pages, commit a snapshot.

The walker runs on the calling thread (stat, read, FastCDC); hashing, compression and encryption run on
the worker pool. Unreadable files are reported, skipped and recorded in the restore point.
"""

from __future__ import annotations

import errno
import fnmatch
import grp
import logging
import os
import pwd
import stat
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import msgpack

from . import format as fmt
from .catalog import index_snapshot
from .chunker import FileChunker
from .errors import InvalidArgument, SourceError
from .extents import data_extents
from .repository import BlobWriter, Repository
from .snapshot import Snapshot
from .tree import TYPE_DIR, TYPE_FILE, DirBuilder, Node, pack_node
from .workers import Pipeline

log = logging.getLogger(__name__)

ProgressFn = Callable[[dict[str, Any], str], None]


@dataclass
class BackupOptions:
    host: str
    tags: list[str] = field(default_factory=list)
    excludes: list[str] = field(default_factory=list)
    one_file_system: bool = False
    use_files_cache: bool = True
    meta: dict[str, Any] = field(default_factory=dict)
    threads: int | None = None


_TYPE = {
    stat.S_IFREG: TYPE_FILE,
    stat.S_IFDIR: TYPE_DIR,
    stat.S_IFLNK: "l",
    stat.S_IFCHR: "c",
    stat.S_IFBLK: "b",
    stat.S_IFIFO: "p",
    stat.S_IFSOCK: "s",
}


class _Names:
    """uid/gid to name, cached (restores map by name first, like tar)."""

    def __init__(self) -> None:
        self.users: dict[int, str | None] = {}
        self.groups: dict[int, str | None] = {}

    def user(self, uid: int) -> str | None:
        if uid not in self.users:
            try:
                self.users[uid] = pwd.getpwuid(uid).pw_name
            except KeyError:
                self.users[uid] = None
        return self.users[uid]

    def group(self, gid: int) -> str | None:
        if gid not in self.groups:
            try:
                self.groups[gid] = grp.getgrgid(gid).gr_name
            except KeyError:
                self.groups[gid] = None
        return self.groups[gid]


def read_xattrs(path: bytes) -> dict[bytes, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return {}
        raise
    out: dict[bytes, bytes] = {}
    for n in names:
        try:
            out[n.encode("utf-8", "surrogateescape")] = os.getxattr(path, n, follow_symlinks=False)
        except OSError as e:
            if e.errno not in (errno.ENODATA, errno.ENOTSUP):
                raise
    return out


def meta_node(name: bytes, st: os.stat_result, names: _Names) -> Node:
    node: Node = {
        "n": name,
        "t": _TYPE.get(stat.S_IFMT(st.st_mode), "f"),
        "m": st.st_mode,
        "u": st.st_uid,
        "g": st.st_gid,
        "s": st.st_size if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode) else 0,
        "mt": st.st_mtime_ns,
        "at": st.st_atime_ns,
        "ct": st.st_ctime_ns,
        "nl": st.st_nlink,
    }
    u, g = names.user(st.st_uid), names.group(st.st_gid)
    if u:
        node["U"] = u
    if g:
        node["G"] = g
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        node["r"] = st.st_rdev
    return node


class Backup:
    def __init__(self, repo: Repository, options: BackupOptions, progress: ProgressFn | None = None) -> None:
        self.repo = repo
        self.opt = options
        self.progress = progress
        self.names = _Names()
        env = repo.envelope
        c = repo.config
        self.chunker = FileChunker(c.cdc_min, c.cdc_avg, c.cdc_max, env.chunker_seed)
        self.errors: list[dict[str, str]] = []
        self.stats: dict[str, Any] = {"files": 0, "dirs": 0, "other": 0, "bytes": 0, "cached_files": 0, "read_bytes": 0}
        self._hardlinks: dict[tuple[int, int], tuple[int, list[Any]]] = {}
        self._last_progress = 0.0
        self._excl = [p.encode() if isinstance(p, str) else p for p in options.excludes]
        self.writer: BlobWriter
        self.pipe: Pipeline

    # --- helpers --------------------------------------------------------------------------------------
    def _error(self, path: bytes, e: BaseException) -> None:
        msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        p = path.decode("utf-8", "replace")
        log.warning("skipped %s: %s", p, msg)
        self.errors.append({"path": p, "error": msg})

    def _excluded(self, path: bytes, name: bytes) -> bool:
        return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(path, p) for p in self._excl)

    def _tick(self, path: bytes) -> None:
        if self.progress is None:
            return
        now = time.monotonic()
        if now - self._last_progress >= 0.2:
            self._last_progress = now
            s = dict(self.stats)
            s.update(self.writer.stats)
            self.progress(s, path.decode("utf-8", "replace"))

    # --- file content ---------------------------------------------------------------------------------
    def _content(self, path: bytes, st: os.stat_result) -> Callable[[], list[list[Any]]]:
        """Returns a resolver for the file's content list; raises OSError if the file cannot be read."""
        ckey = self.repo.index.files_key(self.opt.host, path)
        if self.opt.use_files_cache:
            row = self.repo.index.get_file(ckey)
            if row is not None:
                ino, size, mt, ct, content = msgpack.unpackb(row)
                if (ino, size, mt, ct) == (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns):
                    ids = [c[0] for c in content if c[0] is not None]
                    if all(self.repo.index.has_chunks(ids)):
                        self.stats["cached_files"] += 1
                        self.writer.count_reused(content)
                        return lambda: content
        key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if 0 < st.st_size <= self.chunker.min_size and st.st_blocks * 512 >= st.st_size:
            # Small file: one chunk. Read it on the pool too, so several small reads are in flight
            # (reading them one after another kept the walker waiting on the disk most of the time).
            fut = self.pipe.submit(self._small_file, path, st.st_size)
            self.stats["read_bytes"] += st.st_size
            self._tick(path)

            def resolve_small() -> list[list[Any]] | None:
                content = fut.result()
                if isinstance(content, OSError):
                    self._error(path, content)
                    return None  # the entry is left out of its directory page
                if self.opt.use_files_cache:
                    self.writer.defer_files_row(ckey, msgpack.packb([*key, content]))
                return content

            return resolve_small  # type: ignore[return-value]
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(path, flags | os.O_NOATIME)
        except PermissionError:
            fd = os.open(path, flags)
        parts: list[list[Any]] = []
        try:
            sparse = st.st_blocks * 512 < st.st_size
            extents = data_extents(fd, st.st_size) if sparse else [(0, st.st_size, True)]
            for off, ln, is_data in extents:
                if not is_data:
                    parts.append([None, ln])
                    continue
                for data in self.chunker.chunks(fd, off, ln):
                    fut = self.pipe.submit(self.writer.add, fmt.BlobKind.DATA, data)
                    parts.append([fut, len(data)])
                    self.stats["read_bytes"] += len(data)
                    self._tick(path)
        finally:
            os.close(fd)

        def resolve() -> list[list[Any]]:
            content = [[p[0].result() if isinstance(p[0], Future) else p[0], p[1]] for p in parts]
            if self.opt.use_files_cache:
                self.writer.defer_files_row(ckey, msgpack.packb([*key, content]))
            return content

        return resolve

    def _small_file(self, path: bytes, size: int) -> list[list[Any]] | OSError:
        """Worker task: read a small file whole and store it as one chunk. A read error is returned, not
        raised: the pipeline re-raises task exceptions, and an unreadable file must only be skipped."""
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            try:
                fd = os.open(path, flags | os.O_NOATIME)
            except PermissionError:
                fd = os.open(path, flags)
            try:
                data = os.read(fd, size + 1)  # one byte more: notice a file that grew meanwhile
                if len(data) > size:
                    data += os.read(fd, 1 << 30)
            finally:
                os.close(fd)
        except OSError as e:
            return e
        if not data:
            return []
        return [[self.writer.add(fmt.BlobKind.DATA, data), len(data)]]

    # --- tree walk ------------------------------------------------------------------------------------
    def _entry(self, path: bytes, name: bytes, st: os.stat_result, dev: int, builder: DirBuilder) -> None:
        node = meta_node(name, st, self.names)
        mode = st.st_mode
        try:
            if node["t"] != "l":
                x = read_xattrs(path)
                if x:
                    node["x"] = x
            if stat.S_ISDIR(mode):
                self.stats["dirs"] += 1
                if self.opt.one_file_system and st.st_dev != dev:
                    node["d"] = []  # a mount point: recorded, not crossed
                else:
                    node["d"] = self._walk_dir(path, st.st_dev)
                builder.add(name, node)
                return
            if stat.S_ISLNK(mode):
                node["l"] = os.readlink(path)
                self.stats["other"] += 1
                builder.add(name, node)
                return
            if not stat.S_ISREG(mode):
                self.stats["other"] += 1
                builder.add(name, node)
                return
            self.stats["files"] += 1
            self.stats["bytes"] += st.st_size
            if st.st_nlink > 1:
                hk = (st.st_dev, st.st_ino)
                known = self._hardlinks.get(hk)
                if known is not None:
                    node["hl"] = known[0]
                    resolver = known[1][0]
                else:
                    resolver = self._content(path, st)
                    holder = [resolver]
                    self._hardlinks[hk] = (len(self._hardlinks) + 1, holder)
                    node["hl"] = len(self._hardlinks)
            else:
                resolver = self._content(path, st)
        except OSError as e:
            self._error(path, e)
            return

        def finish(node: Node = node, resolver: Callable[[], list[list[Any]]] = resolver) -> Node | None:
            content = resolver()
            if content is None:  # unreadable after all (small files are read on the pool)
                return None
            node["c"] = content
            return node

        builder.add(name, finish)

    def _walk_dir(self, path: bytes, dev: int) -> list[list[Any]]:
        builder = DirBuilder(self.writer)
        try:
            with os.scandir(path) as it:
                names = sorted(e.name for e in it)
        except OSError as e:
            self._error(path, e)
            return builder.finish()
        for name in names:
            child = path.rstrip(b"/") + b"/" + name
            if self._excl and self._excluded(child, name):
                continue
            try:
                st = os.lstat(child)
            except OSError as e:
                self._error(child, e)
                continue
            self._entry(child, name, st, dev, builder)
        return builder.finish()

    def _synthetic_dir(self, path: bytes, trie: dict[bytes, Any], builder: DirBuilder) -> None:
        """Intermediate directories of the requested paths (``/var`` and ``/var/lib`` for ``/var/lib/pg``)."""
        for name in sorted(trie):
            child = (path.rstrip(b"/") + b"/" + name) if path else b"/" + name
            sub = trie[name]
            try:
                st = os.lstat(child)
            except OSError as e:
                raise SourceError(f"cannot back up {child.decode(errors='replace')}: {e.strerror}") from None
            if sub is None:
                self._entry(child, name, st, st.st_dev, builder)
            else:
                node = meta_node(name, st, self.names)
                inner = DirBuilder(self.writer)
                self._synthetic_dir(child, sub, inner)
                node["d"] = inner.finish()
                builder.add(name, node)

    # --- the job --------------------------------------------------------------------------------------
    # run() is a fixed sequence of small steps; the network agent (appliance/agent) overrides the few
    # that differ (other sources than paths, remote commit) instead of copying the walk.
    def _has_other_sources(self) -> bool:
        return False

    def _extra_paths(self) -> list[str]:
        return []

    def _plan(self, paths: Iterable[str]) -> tuple[list[str], dict[bytes, Any]]:
        abs_paths = []
        for p in paths:
            ap = os.path.abspath(p)
            if not os.path.lexists(ap):
                raise SourceError(f"cannot back up {p}: no such file or directory")
            abs_paths.append(ap)
        if not abs_paths and not self._has_other_sources():
            raise InvalidArgument("give at least one path to back up")
        trie: dict[bytes, Any] = {}
        for ap in abs_paths:
            comps = [c.encode("utf-8", "surrogateescape") for c in ap.split("/") if c]
            if not comps:
                raise InvalidArgument("backing up / as a whole: list its top-level directories instead")
            node = trie
            for c in comps[:-1]:
                nxt = node.setdefault(c, {})
                if nxt is None:
                    break  # a parent is already backed up whole
                node = nxt
            else:
                node[comps[-1]] = None
        return abs_paths, trie

    def _write_tree(self, trie: dict[bytes, Any]) -> list[list[Any]]:
        """Walk, store every chunk and page, and make them durable; returns the root's pages."""
        self.writer = self.repo.writer()
        self.pipe = Pipeline(self.opt.threads)
        try:
            root = DirBuilder(self.writer)
            self._synthetic_dir(b"", trie, root)
            pages = root.finish()
            self.pipe.drain()
            self.writer.flush()
        except BaseException:
            self.pipe.close(cancel=True)
            self.writer.abort()
            raise
        self.pipe.close()
        return pages

    def _snapshot(self, pages: list[list[Any]], start: int, t0: float, paths: list[str]) -> Snapshot:
        rst = os.stat("/")
        root_node: Node = {"n": b"", "t": TYPE_DIR, "m": stat.S_IFDIR | 0o755, "u": rst.st_uid, "g": rst.st_gid,
                           "s": 0, "mt": rst.st_mtime_ns, "at": rst.st_atime_ns, "ct": rst.st_ctime_ns, "nl": 2,
                           "d": pages}
        stats = dict(self.stats)
        stats.update(self.writer.stats)
        stats["duration"] = round(time.monotonic() - t0, 3)
        stats["errors"] = len(self.errors)
        return Snapshot(id="", kind="files", host=self.opt.host, time_ns=start, paths=paths,
                        tags=list(self.opt.tags), tree=pack_node(root_node), stats=stats, errors=self.errors,
                        meta=dict(self.opt.meta))

    def _commit(self, snap: Snapshot) -> Snapshot:
        stored = self.repo.store_snapshot(snap)
        # docs/format.md §8: the catalog comes after the commit; a failure here loses no data, and
        # `ihb catalog rebuild` (or check --repair) catalogues the restore point later.
        try:
            index_snapshot(self.repo, stored)
        except Exception as e:  # noqa: BLE001 - the restore point is committed; never fail the backup now
            log.warning("restore point %s is not in the file catalog yet (%s); run `ihb catalog rebuild`",
                        stored.short_id, e)
        return stored

    def run(self, paths: Iterable[str]) -> Snapshot:
        abs_paths, trie = self._plan(paths)
        start = time.time_ns()
        t0 = time.monotonic()
        pages = self._write_tree(trie)
        return self._commit(self._snapshot(pages, start, t0, abs_paths + self._extra_paths()))


def backup_paths(
    repo: Repository, paths: Iterable[str], options: BackupOptions, progress: ProgressFn | None = None
) -> Snapshot:
    return Backup(repo, options, progress).run(paths)
