"""Mounting and unmounting: options, kernel read-ahead, daemonising, signals.

``mount()`` validates everything it can in the calling process (repository, passphrase, restore
point, mount point) so mistakes reach the terminal, then serves in the foreground or forks a daemon
that reports "ready" or its error through a pipe before the parent returns. The daemon serves until
``fusermount3 -u``/``ihb umount`` or SIGTERM/SIGINT/SIGHUP, and always unmounts on the way out.

Large reads: the kernel sends FUSE requests no larger than the mount's read-ahead allows; the default
128 KiB caps sequential reads near 560 MB/s here. Raising the read-ahead of the mount's backing device
(``/sys/class/bdi/0:NN/read_ahead_kb``) to 4 MiB or more yields 1 MiB requests (1.2-1.5 GB/s). It has
to be written after the kernel's INIT exchange, which would otherwise lower it again.
"""

from __future__ import annotations

import errno
import faulthandler
import gc
import logging
import logging.handlers
import os
import select
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyfuse3
import trio

from repo.errors import IhbError

from .ops import DEFAULT_THREADS, Operations
from .vfs import DEFAULT_CACHE_BYTES, Vfs

if TYPE_CHECKING:
    from repo.repository import Repository

log = logging.getLogger(__name__)

READ_AHEAD_KB = 8192  # per-mount kernel read-ahead (see the module docstring)
READY_TIMEOUT = 60.0
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class MountError(IhbError):
    """The restore points could not be mounted."""

    exit_code = 45


@dataclass
class MountOptions:
    mountpoint: str
    snapshot: str | None = None  # id prefix, `latest` or `HOST@latest`: that restore point at the root
    foreground: bool = False
    cache_bytes: int = DEFAULT_CACHE_BYTES
    allow_other: bool | None = None  # None: when permitted (root, or user_allow_other in fuse.conf)
    read_ahead_kb: int = READ_AHEAD_KB
    threads: int = DEFAULT_THREADS
    max_tasks: int = 64


def allow_other_permitted() -> bool:
    if os.geteuid() == 0:
        return True
    try:
        with open("/etc/fuse.conf") as f:
            return any(line.strip() == "user_allow_other" for line in f)
    except OSError:
        return False


def fuse_options(allow_other: bool, fsname: str = "ihb") -> set[str]:
    """Read-only, with kernel-side permission checks (never access()).

    No ``max_read=``: libfuse then insists that init() set the same ``conn.max_read``, which pyfuse3
    cannot do, and ends the session. The request size comes from the read-ahead (tune_read_ahead) and
    libfuse's own max_pages negotiation (1 MiB)."""
    opts = {f"fsname={fsname}", "subtype=ihb", "ro", "default_permissions"}
    if allow_other:
        opts.add("allow_other")
    return opts


def _unescape(field: str) -> str:
    """Octal escapes of /proc/self/mountinfo (\\040 for a space)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _real(path: str) -> str:
    """realpath() of the parent only: resolving the mount point itself would stat it, a request our
    own loop may be unable to answer."""
    path = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def mount_entry(mountpoint: str) -> tuple[str, str] | None:
    """(``MAJ:MIN``, filesystem type) of what is mounted at ``mountpoint``, read from
    /proc/self/mountinfo without touching the mount (which may not be serving yet, or be dead)."""
    mp = _real(mountpoint)
    found = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 4 and _unescape(parts[4]) == mp:
                    sep = parts.index("-", 5) if "-" in parts[5:] else -1
                    fstype = parts[sep + 1] if 0 < sep < len(parts) - 1 else ""
                    found = (parts[2], fstype)  # the last match is the top of the stack
    except OSError:
        return None
    return found


def tune_read_ahead(mountpoint: str, kb: int) -> bool:
    """Raise the mount's BDI read-ahead so the kernel sends large requests (root only)."""
    entry = mount_entry(mountpoint)
    if entry is None:
        log.info("cannot find %s in /proc/self/mountinfo; read-ahead left at the default", mountpoint)
        return False
    path = f"/sys/class/bdi/{entry[0]}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(kb))
        return True
    except OSError as e:
        log.info("cannot raise read-ahead (%s: %s); large sequential reads will be slower", path, e.strerror)
        return False


def check_mountpoint(path: str) -> str:
    mp = os.path.abspath(path)
    try:
        os.stat(mp)
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise MountError(f"{mp} is a dead FUSE mount (its process ended); run `ihb umount {mp}` first") from None
        raise MountError(f"mount point {mp} cannot be used: {e.strerror}; create the directory first") from None
    if not os.path.isdir(mp):
        raise MountError(f"mount point {mp} is not a directory")
    entry = mount_entry(mp)
    if entry is not None and entry[1] == "fuse.ihb":
        raise MountError(f"{mp} is already an ihb mount; unmount it first with `ihb umount {mp}`")
    return mp


# --- serving ------------------------------------------------------------------------------------------
_pending_signal: list[int] = []


def _early_signal(signum: int, frame: object) -> None:
    """A signal between mounting and the start of the loop: remembered, acted on when the loop starts."""
    _pending_signal.append(signum)


async def _watch_signals() -> None:
    """SIGTERM/SIGINT/SIGHUP arrive as loop events (no handler runs in the loop thread, where
    trio.from_thread would refuse to call pyfuse3.terminate); main() then returns and we unmount."""
    with trio.open_signal_receiver(*_SIGNALS) as signals:
        if not _pending_signal:
            async for signum in signals:
                log.info("signal %d: unmounting", signum)
                break
    pyfuse3.terminate()


async def _when_ready(initialized: trio.Event, mountpoint: str, opts: MountOptions,
                      notify: Callable[[str | None], None] | None) -> None:
    await initialized.wait()  # init() ran inside the INIT handler: its reply is out by the time we wake
    if opts.read_ahead_kb > 0:
        tune_read_ahead(mountpoint, opts.read_ahead_kb)
    log.info("mounted at %s", mountpoint)
    if notify is not None:
        notify(None)


async def _main(ops: Operations, initialized: trio.Event, mountpoint: str, opts: MountOptions,
                notify: Callable[[str | None], None] | None) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_signals)
        nursery.start_soon(_when_ready, initialized, mountpoint, opts, notify)
        await pyfuse3.main(max_tasks=opts.max_tasks)
        nursery.cancel_scope.cancel()


def advise_index(repo: Repository) -> None:
    """Ask the kernel to load the LMDB index in the background: every cold chunk read looks up a
    random index page, and one 4 KiB disk read per chunk halves cold sequential reads of images."""
    path = os.path.join(repo.index.path, "data.mdb")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


def keep_freed_memory() -> None:
    """Let glibc's malloc keep what the mount frees: decrypted chunks (256 KiB and up) then come from
    and return to its heap, instead of fresh mmaps or trimmed pages that each cost a page fault and a
    page clear on reuse (~8% of a sequential read's CPU). What is kept is bounded by the chunk cache."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return
    mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: the largest value glibc takes
    mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD


def serve(repo: Repository, mountpoint: str, opts: MountOptions, snapshot_id: str | None = None,
          notify: Callable[[str | None], None] | None = None) -> None:
    """Mount and serve until unmounted or signalled; unmounts on every way out."""
    snap = repo.get_snapshot(snapshot_id) if snapshot_id else None
    # The mount keeps hundreds of thousands of small objects (inodes, decoded pages) alive; with the
    # default thresholds the cyclic GC rescans them all the time (half the time of listing 100,000 files).
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    keep_freed_memory()
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1`: where is every thread?
    advise_index(repo)
    _pending_signal.clear()
    vfs = Vfs(repo, snapshot=snap, cache_bytes=opts.cache_bytes)
    try:
        initialized = trio.Event()
        ops = Operations(vfs, threads=opts.threads, on_init=initialized.set)
        allow_other = allow_other_permitted() if opts.allow_other is None else opts.allow_other
        old = {s: signal.signal(s, _early_signal) for s in _SIGNALS}
        try:
            try:
                pyfuse3.init(ops, mountpoint, fuse_options(allow_other))
            except RuntimeError as e:
                raise MountError(f"cannot mount at {mountpoint}: {e} (is /dev/fuse usable and fusermount3 installed?)"
                                 ) from None
            try:
                trio.run(_main, ops, initialized, mountpoint, opts, notify)
            finally:
                pyfuse3.close(unmount=True)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
    finally:
        vfs.close()


def mount(open_repo: Callable[[], Repository], opts: MountOptions) -> None:
    """What ``ihb mount`` does. ``open_repo`` must be callable twice (the daemon reopens the repository:
    LMDB environments and threads do not survive fork)."""
    mp = check_mountpoint(opts.mountpoint)
    if opts.foreground:
        with open_repo() as repo:
            serve(repo, mp, opts, repo.get_snapshot(opts.snapshot).id if opts.snapshot else None)
        return
    with open_repo() as repo:  # mistakes (passphrase, lock, restore point) reach the terminal
        sid = repo.get_snapshot(opts.snapshot).id if opts.snapshot else None
    _daemonize(lambda notify: _serve_reopened(open_repo, mp, opts, sid, notify))


def _serve_reopened(open_repo: Callable[[], Repository], mp: str, opts: MountOptions, sid: str | None,
                    notify: Callable[[str | None], None]) -> None:
    with open_repo() as repo:
        serve(repo, mp, opts, sid, notify)


def _daemonize(run: Callable[[Callable[[str | None], None]], None]) -> None:
    """Fork; the child detaches and serves, the parent returns once the child reports ready (or raises
    MountError with the child's reason)."""
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(w)
        msg = _read_report(r, READY_TIMEOUT)
        os.close(r)
        if msg == "ok":
            return
        _reap(pid)
        raise MountError(msg or "the mount process ended before the filesystem was ready")
    # The daemon.
    code = 0
    reported = False

    def notify(err: str | None) -> None:
        nonlocal reported
        if not reported:
            reported = True
            os.write(w, b"ok" if err is None else err.encode("utf-8", "replace"))
            os.close(w)

    try:
        os.close(r)
        os.setsid()
        os.chdir("/")
        _detach_stdio()
        run(notify)
    except BaseException as e:
        code = e.exit_code if isinstance(e, IhbError) else 1
        if isinstance(e, SystemExit):
            code = e.code if isinstance(e.code, int) else 1
        log.error("mount failed: %s", e)
        try:
            notify(str(e) or type(e).__name__)
        except OSError:
            pass
    finally:
        logging.shutdown()
        os._exit(code)


def _read_report(fd: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    buf = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    if not buf and time.monotonic() >= deadline:
        return f"the filesystem did not become ready within {timeout:.0f} s"
    return buf.decode("utf-8", "replace")


def _reap(pid: int) -> None:
    for _ in range(50):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        time.sleep(0.1)


def _detach_stdio() -> None:
    """The daemon keeps no terminal or pipe open (a caller waiting for EOF would hang); its log goes to
    syslog when there is one."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    if os.path.exists("/dev/log"):
        try:
            h = logging.handlers.SysLogHandler(address="/dev/log")
            h.setFormatter(logging.Formatter("ihb-mount[%(process)d]: %(levelname)s: %(message)s"))
            root.addHandler(h)
        except OSError:
            pass
