"""Restore a file tree from a restore point, never writing outside the target.

Every entry is created relative to an open directory descriptor with O_NOFOLLOW/O_EXCL, names are
checked (no '/', '.', '..' or NUL), so neither crafted names nor symlinks inside the restore point can
lead outside TARGET. Existing files are left alone unless ``overwrite`` is set.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import pwd
import stat
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from .errors import IhbError, IntegrityError, InvalidArgument, PathNotFound, RestoreTargetExists, UnsafePath
from .format import BlobKind
from .reader import iter_content, shared_pool
from .repository import Repository
from .snapshot import Snapshot
from .tree import TYPE_DIR, Node, TreeReader, root_node

log = logging.getLogger(__name__)


class _Prefetcher:
    """Reads chunks ahead across file boundaries, in exactly the order the restore will ask for them
    (a second walk of the same tree), so decryption of the next files overlaps writing this one."""

    def __init__(self, repo: Repository, ids: Iterator[bytes], window: int = 24) -> None:
        self.repo, self.ids, self.window = repo, ids, window
        self.q: deque[tuple[bytes, Future[bytes]]] = deque()
        self._fill()

    def _fill(self) -> None:
        while len(self.q) < self.window:
            cid = next(self.ids, None)
            if cid is None:
                return
            self.q.append((cid, shared_pool().submit(self.repo.get_blob, BlobKind.DATA, cid)))

    def get(self, cid: bytes) -> bytes:
        while self.q:
            head, fut = self.q.popleft()
            self._fill()
            if head == cid:
                return fut.result()
        return self.repo.get_blob(BlobKind.DATA, cid)  # out of step (an include, a skipped file)


def _restore_order(tree: TreeReader, node: Node) -> Iterator[bytes]:
    """Chunk ids in the order Restore._children consumes them (depth-first, name order, first hard link)."""
    seen: set[int] = set()
    stack = [iter(tree.children(node))]
    while stack:
        child = next(stack[-1], None)
        if child is None:
            stack.pop()
            continue
        t = child.get("t")
        if t == TYPE_DIR:
            stack.append(iter(tree.children(child)))
        elif t == "f":
            hl = child.get("hl")
            if hl is not None:
                if hl in seen:
                    continue
                seen.add(hl)
            for cid, _ln in child.get("c", ()):
                if cid is not None:
                    yield cid


def check_name(name: bytes) -> None:
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise UnsafePath(f"refusing entry name {name!r}: it could escape the restore target")


@dataclass
class RestoreOptions:
    overwrite: bool = False
    includes: list[str] = field(default_factory=list)
    numeric_owner: bool = False


class Restore:
    def __init__(self, repo: Repository, snap: Snapshot, options: RestoreOptions,
                 progress: Callable[[dict[str, Any], str], None] | None = None) -> None:
        if snap.meta.get("content_key"):
            # File content sealed with a tenant's own key (docs/protocol.md §7): only the appliance can open it.
            raise InvalidArgument(
                f"restore point {snap.short_id} holds content sealed with tenant {snap.meta.get('tenant')!r}'s own key; "
                "restore it through the appliance (`ihb agent restore`)"
            )
        self.repo = repo
        self.snap = snap
        self.opt = options
        self.tree = TreeReader(repo)
        self.is_root = os.geteuid() == 0
        self.stats: dict[str, Any] = {"files": 0, "dirs": 0, "other": 0, "bytes": 0}
        self.errors: list[dict[str, str]] = []
        self._links: dict[int, bytes] = {}
        self.progress = progress
        self._last = 0.0
        self._pref: _Prefetcher | None = None

    def _err(self, path: bytes, e: BaseException) -> None:
        p = path.decode("utf-8", "replace")
        msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        log.error("restore of %s failed: %s", p, msg)
        self.errors.append({"path": p, "error": msg})

    def _owner(self, node: Node) -> tuple[int, int]:
        uid, gid = node.get("u", 0), node.get("g", 0)
        if not self.opt.numeric_owner:
            if node.get("U"):
                try:
                    uid = pwd.getpwnam(node["U"]).pw_uid
                except KeyError:
                    pass
            if node.get("G"):
                try:
                    gid = grp.getgrnam(node["G"]).gr_gid
                except KeyError:
                    pass
        return uid, gid

    def _apply_meta(self, node: Node, fd: int | None, name: bytes, dfd: int) -> None:
        """Owner, then mode (chown clears set-id bits), xattrs, then times last."""
        is_link = node["t"] == "l"
        target: Any = fd if fd is not None else name
        kw: dict[str, Any] = {} if fd is not None else {"dir_fd": dfd, "follow_symlinks": False}
        if self.is_root:
            uid, gid = self._owner(node)
            os.chown(target, uid, gid, **kw)
        if not is_link:
            os.chmod(target, stat.S_IMODE(node["m"]), **({} if fd is not None else {"dir_fd": dfd}))
            for k, v in (node.get("x") or {}).items():
                try:
                    os.setxattr(fd if fd is not None else _proc_path(dfd, name), k, v)
                except OSError as e:
                    if e.errno not in (errno.ENOTSUP, errno.EPERM):
                        raise
                    log.warning("xattr %r not restored on %r: %s", k, name, e.strerror)
        os.utime(target, ns=(node.get("at", node["mt"]), node["mt"]), **kw)

    def _tick(self, path: bytes) -> None:
        if self.progress and time.monotonic() - self._last > 0.2:
            self._last = time.monotonic()
            self.progress(dict(self.stats), path.decode("utf-8", "replace"))

    def _create_file(self, dfd: int, name: bytes, rel: bytes, node: Node) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(name, flags, 0o600, dir_fd=dfd)
        except FileExistsError:
            if not self.opt.overwrite:
                raise RestoreTargetExists(
                    f"{rel.decode(errors='replace')} already exists in the target; pass --overwrite or restore elsewhere"
                ) from None
            os.unlink(name, dir_fd=dfd)
            fd = os.open(name, flags, 0o600, dir_fd=dfd)
        try:
            pos = 0
            parts = (((None if cid is None else self._pref.get(cid)), ln) for cid, ln in node.get("c", [])) \
                if self._pref is not None else iter_content(self.repo, node.get("c", []))
            for data, ln in parts:
                if data is None:
                    pos += ln
                    os.lseek(fd, pos, os.SEEK_SET)
                else:
                    view = memoryview(data)
                    while view:
                        n = os.write(fd, view)
                        view = view[n:]
                    pos += ln
                    self.stats["bytes"] += ln
                self._tick(rel)
            os.ftruncate(fd, pos)
            self._apply_meta(node, fd, name, dfd)
        except BaseException:
            os.close(fd)
            os.unlink(name, dir_fd=dfd)  # never leave a partial file that looks restored
            raise
        os.close(fd)

    def _entry(self, dfd: int, node: Node, rel: bytes) -> None:
        name = node["n"]
        check_name(name)
        t = node["t"]
        if t == TYPE_DIR:
            try:
                os.mkdir(name, 0o700, dir_fd=dfd)
            except FileExistsError:
                st = os.lstat(name, dir_fd=dfd)
                if not stat.S_ISDIR(st.st_mode):
                    raise RestoreTargetExists(f"{rel.decode(errors='replace')} exists and is not a directory") from None
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            try:
                self.stats["dirs"] += 1
                self._children(sub, node, rel)
                self._apply_meta(node, sub, name, dfd)
            finally:
                os.close(sub)
            return
        hl = node.get("hl")
        if hl is not None and hl in self._links:
            if self.opt.overwrite:
                try:
                    os.unlink(name, dir_fd=dfd)
                except FileNotFoundError:
                    pass
            os.link(self._links[hl], name, src_dir_fd=self._root_fd, dst_dir_fd=dfd, follow_symlinks=False)
            self.stats["files"] += 1
            return
        if t == "f":
            self._create_file(dfd, name, rel, node)
            self.stats["files"] += 1
            if hl is not None:
                self._links[hl] = rel
            return
        if self.opt.overwrite:
            try:
                os.unlink(name, dir_fd=dfd)
            except FileNotFoundError:
                pass
        try:
            if t == "l":
                os.symlink(node["l"], name, dir_fd=dfd)
            elif t == "p":
                os.mkfifo(name, 0o600, dir_fd=dfd)
            elif t in "cb":
                os.mknod(name, (stat.S_IFCHR if t == "c" else stat.S_IFBLK) | 0o600, node.get("r", 0), dir_fd=dfd)
            else:
                return  # sockets are not restorable; their creator makes them again
        except FileExistsError:
            raise RestoreTargetExists(
                f"{rel.decode(errors='replace')} already exists in the target; pass --overwrite"
            ) from None
        self.stats["other"] += 1
        self._apply_meta(node, None, name, dfd)

    def _children(self, dfd: int, node: Node, rel: bytes) -> None:
        for child in self.tree.children(node):
            crel = rel + b"/" + child["n"] if rel else child["n"]
            try:
                self._entry(dfd, child, crel)
            except (IntegrityError, UnsafePath, OSError) as e:
                self._err(crel, e)

    def run(self, target: str) -> dict[str, Any]:
        os.makedirs(target, exist_ok=True)
        self._root_fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            root = root_node(self.snap.tree)
            if not self.opt.includes:
                self._pref = _Prefetcher(self.repo, _restore_order(TreeReader(self.repo), root))
                self._children(self._root_fd, root, b"")
            else:
                for inc in self.opt.includes:
                    self._restore_path(root, inc)
        finally:
            os.close(self._root_fd)
        self.stats["errors"] = len(self.errors)
        return self.stats

    def _restore_path(self, root: Node, inc: str) -> None:
        """Restore one path with its parent directories (created with their recorded metadata)."""
        comps = [c.encode("utf-8", "surrogateescape") for c in inc.split("/") if c and c != "."]
        node = root
        dfd = os.dup(self._root_fd)
        rel = b""
        try:
            for i, comp in enumerate(comps):
                check_name(comp)
                nxt = self.tree.lookup(node, comp) if node.get("t") == TYPE_DIR else None
                if nxt is None:
                    raise PathNotFound(f"{inc} is not in restore point {self.snap.short_id}")
                rel = rel + b"/" + comp if rel else comp
                if i == len(comps) - 1:
                    try:
                        self._entry(dfd, nxt, rel)
                    except (IntegrityError, OSError) as e:
                        self._err(rel, e)
                else:
                    try:
                        os.mkdir(comp, 0o755, dir_fd=dfd)
                    except FileExistsError:
                        pass
                    sub = os.open(comp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
                    os.close(dfd)
                    dfd = sub
                node = nxt
        finally:
            os.close(dfd)


def _proc_path(dfd: int, name: bytes) -> bytes:
    # setxattr has no dir_fd form; symlinks never reach here, so /proc/self/fd/N/name is race-free enough
    return f"/proc/self/fd/{dfd}/".encode() + name


def restore_snapshot(repo: Repository, snap: Snapshot, target: str, options: RestoreOptions | None = None,
                     progress: Callable[[dict[str, Any], str], None] | None = None) -> tuple[dict[str, Any], list[dict[str, str]]]:
    r = Restore(repo, snap, options or RestoreOptions(), progress)
    stats = r.run(target)
    return stats, r.errors


__all__ = ["RestoreOptions", "restore_snapshot", "check_name", "IhbError"]
