"""An agent backup: the local walker (repo.backup) writing through the appliance instead of packs.

``RemoteRepository`` gives ``repo.backup.Backup`` the few things it takes from a repository: the
chunker parameters (the tenant's seed), a files cache (the same LMDB files cache as local backups,
keyed by host and path, holding *tenant* ids), a blob writer (``Uploader``) and ``store_snapshot``
(the commit). ``Uploader`` gathers hashed, compressed chunks into batches; one background thread asks
the appliance which of a batch's ids it has and sends only the missing ones. Files-cache rows are
written only after the appliance acknowledged (made durable) every chunk they name.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import queue
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any

import blake3
from pyfastcdc import FastCDC

from repo import format as fmt
from repo.backup import Backup, BackupOptions, ProgressFn
from repo.crypto import Envelope
from repo.errors import InvalidArgument, SourceError
from repo.index import Index
from repo.snapshot import Snapshot
from repo.tree import TYPE_FILE, DirBuilder, Node

from .client import API, Client, Parts, Transient
from .errors import DumpFailed, MissingReferences, ServerRejected, ServerUnreachable

log = logging.getLogger(__name__)

FRAME_HEAD = 41  # struct "<B32sII": kind, tenant id, plaintext length, body length
# One batch = one have? query and one upload request = one pack on the appliance (its default pack
# size). Each acknowledgement costs the appliance a few fsyncs, so batches are large; the price is
# memory (two batches queued plus one filling) and what an interrupted run sends again (< 1 batch).
BATCH_BYTES = int(os.environ.get("IHB_TESTONLY_AGENT_BATCH", 32 * 1024 * 1024))
BATCH_ITEMS = 8192
REQUEST_BYTES = max(BATCH_BYTES, 1024 * 1024) + 4 * 1024 * 1024  # < the server's 64 MiB body limit


class _Aborted(Exception):
    """Set as the sender's error once the walker gave up, so queued batches are dropped."""


@dataclass
class Batch:
    items: list[tuple[int, bytes, int, bytes]] = field(default_factory=list)  # kind, tid, raw length, body
    rows: list[tuple[bytes, bytes]] = field(default_factory=list)  # files-cache rows valid once sent
    size: int = 0


class Uploader:
    """The BlobWriter of an agent backup (same interface as repo.repository.BlobWriter)."""

    def __init__(self, client: Client, session: str, id_key: bytes, level: int, files: Index,
                 max_have: int = 20000, depth: int = 2) -> None:
        self.client = client
        self.session = session
        self.id_key = id_key
        # Only Envelope.compress() is used (the repository's compression byte + zstd format); it needs
        # the level and no key material, which the agent must not have.
        self.compressor = Envelope.__new__(Envelope)
        self.compressor.level = level
        self.files = files
        self.max_have = max_have
        self.stats = {"chunks": 0, "new_chunks": 0, "bytes": 0, "new_bytes": 0, "stored_bytes": 0,
                      "sent_chunks": 0, "sent_bytes": 0, "have_queries": 0}
        self._lock = threading.Lock()  # the walker side; the sender thread never takes it
        self._slock = threading.Lock()  # the sender's counters
        self._cur = Batch()
        self._q: queue.Queue[Batch | None] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ihb-upload", daemon=True)
        self._thread.start()
        self.closed = False

    # --- BlobWriter interface (called from the walker and from worker threads) ---------------------------
    def add(self, kind: int, data: bytes | memoryview, blob_id: bytes | None = None) -> bytes:
        if self.error is not None:
            raise self.error
        tid = blake3.blake3(data, key=self.id_key).digest()
        body = self.compressor.compress(data)
        with self._lock:
            self.stats["chunks"] += 1
            self.stats["bytes"] += len(data)
            b = self._cur
            b.items.append((kind, tid, len(data), body))
            b.size += len(body) + FRAME_HEAD
            if b.size >= BATCH_BYTES or len(b.items) >= BATCH_ITEMS:
                self._ship_locked()
        return tid

    def count_reused(self, content: list[list[Any]]) -> None:
        with self._lock:
            for cid, ln in content:
                if cid is not None:
                    self.stats["chunks"] += 1
                    self.stats["bytes"] += ln

    def defer_files_row(self, key: bytes, value: bytes) -> None:
        with self._lock:
            self._cur.rows.append((key, value))

    def _ship_locked(self) -> None:
        b, self._cur = self._cur, Batch()
        if b.items or b.rows:
            self._q.put(b)  # blocks when the sender is `depth` batches behind: backpressure

    def flush(self) -> None:
        with self._lock:
            self._ship_locked()
        self._q.join()
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        self.closed = True
        if self.error is None:
            self.error = _Aborted("upload aborted")
        while True:  # unblock the sender and anyone waiting in put()
            try:
                self._q.get_nowait()
                self._q.task_done()
            except queue.Empty:
                break

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=30)

    # --- the sender thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            b = self._q.get()
            try:
                if b is None:
                    return
                if self.error is None:
                    self._send(b)
            except BaseException as e:  # handed to the walker at its next add() or flush()
                self.error = e
            finally:
                self._q.task_done()

    def _have(self, tids: list[bytes]) -> list[bool]:
        out: list[bool] = []
        for i in range(0, len(tids), self.max_have):
            part = tids[i : i + self.max_have]
            self.stats["have_queries"] += 1
            r = self.client.json("POST", f"/sessions/{self.session}/have", {"ids": [t.hex() for t in part]})
            have = r.get("have") if isinstance(r, dict) else None
            if not isinstance(have, list) or len(have) != len(part):
                raise ServerRejected("the appliance answered the have? query with the wrong number of answers")
            out.extend(bool(h) for h in have)
        return out

    def _send(self, b: Batch) -> None:
        seen: set[bytes] = set()
        items = []
        for it in b.items:
            if it[1] not in seen:
                seen.add(it[1])
                items.append(it)
        failures = 0
        while items:
            try:
                have = self._have([it[1] for it in items])
                missing = [it for it, h in zip(items, have, strict=True) if not h]
                group: list[tuple[int, bytes, int, bytes]] = []
                size = 0
                for it in missing:
                    if group and size + len(it[3]) + FRAME_HEAD > REQUEST_BYTES:
                        self._post(group)
                        group, size = [], 0
                    group.append(it)
                    size += len(it[3]) + FRAME_HEAD
                if group:
                    self._post(group)
                items = []
            except Transient as e:
                # The connection dropped mid-batch: ask again what arrived, send the rest.
                failures += 1
                if failures > 30:
                    raise ServerUnreachable(f"uploading to the appliance keeps failing ({e}); run the backup "
                                            "again later: it resumes where it stopped") from None
                time.sleep(min(0.2 * failures, 3.0))
        if b.rows:
            self.files.put_files(b.rows)

    def _post(self, group: list[tuple[int, bytes, int, bytes]]) -> None:
        parts = []
        for kind, tid, raw, body in group:
            parts.append(bytes((kind,)) + tid + raw.to_bytes(4, "little") + len(body).to_bytes(4, "little"))
            parts.append(body)
        payload = Parts(parts)
        try:
            self.client.request("POST", f"{API}/sessions/{self.session}/blobs", payload, retry=False)
        except ServerRejected as e:
            if getattr(e, "status", 0) == 409 and getattr(e, "detail", {}).get("missing"):
                raise MissingReferences(str(e)) from None
            raise
        with self._slock:
            self.stats["sent_chunks"] += len(group)
            self.stats["sent_bytes"] += len(payload)
            for kind, _tid, raw, body in group:
                if kind == fmt.BlobKind.DATA:
                    self.stats["new_chunks"] += 1
                    self.stats["new_bytes"] += raw
                    self.stats["stored_bytes"] += len(body)


class _FilesCache:
    """The files-cache part of repo.index.Index, as Backup uses it. Rows are written only after their
    chunks were acknowledged, so "all chunks present" holds whenever a row exists; if the appliance has
    since dropped them (garbage collection), the commit says so and the agent runs without the cache."""

    def __init__(self, index: Index) -> None:
        self.index = index
        self.files_key = index.files_key
        self.get_file = index.get_file

    def has_chunks(self, ids: Iterable[bytes]) -> list[bool]:
        return [True for _ in ids]


class RemoteRepository:
    """What repo.backup.Backup needs from a repository, served by the appliance."""

    def __init__(self, client: Client, params: dict[str, Any], session: str, files: Index,
                 extra: dict[str, Any]) -> None:
        ch = params["chunker"]
        self.client = client
        self.session = session
        self.params = params
        self.envelope = SimpleNamespace(chunker_seed=int(ch["seed"]))
        self.config = SimpleNamespace(cdc_min=int(ch["min"]), cdc_avg=int(ch["avg"]), cdc_max=int(ch["max"]))
        self.index = _FilesCache(files)
        self.files = files
        self.extra = extra
        self.uploader: Uploader | None = None

    def writer(self) -> Uploader:
        self.uploader = Uploader(self.client, self.session, bytes.fromhex(self.params["id_key"]),
                                 int(self.params["compression_level"]), self.files,
                                 int(self.params.get("limits", {}).get("max_have_ids", 20000)))
        return self.uploader

    def store_snapshot(self, snap: Snapshot) -> Snapshot:
        assert self.uploader is not None
        self.uploader.flush()
        doc = {"root": base64.b64encode(snap.tree or b"").decode(), "paths": snap.paths, "tags": snap.tags,
               "time_ns": snap.time_ns, "stats": {k: v for k, v in snap.stats.items() if isinstance(v, int | float)},
               "errors": snap.errors, **self.extra}
        try:
            r = self.client.json("POST", f"/sessions/{self.session}/commit", doc)
        except ServerRejected as e:
            if getattr(e, "status", 0) == 409 and getattr(e, "detail", {}).get("missing"):
                raise MissingReferences(str(e)) from None
            raise
        s = r["snapshot"]
        return Snapshot(id=s["id"], kind="files", host=s["host"], time_ns=snap.time_ns, paths=s.get("paths", []),
                        tags=s.get("tags", []), stats=s.get("stats", {}), errors=snap.errors,
                        meta={"tenant": s.get("tenant")})


@dataclass
class Stream:
    """A dump command whose standard output becomes the file NAME at the top of the restore point."""

    name: str
    command: list[str]


class AgentBackup(Backup):
    """repo.backup.Backup plus dump streams, and with no paths required when streams are given."""

    def __init__(self, repo: RemoteRepository, options: BackupOptions, streams: list[Stream],
                 progress: ProgressFn | None = None) -> None:
        super().__init__(repo, options, progress)  # type: ignore[arg-type]
        self.streams = {s.name.encode(): s for s in streams}
        for n in self.streams:
            if not n or b"/" in n or n in (b".", b".."):
                raise InvalidArgument(f"--stdin-name {n.decode()!r} must be a plain file name")

    def _synthetic_dir(self, path: bytes, trie: dict[bytes, Any], builder: DirBuilder) -> None:
        if path or not self.streams:
            super()._synthetic_dir(path, trie, builder)
            return
        for name in sorted(set(trie) | set(self.streams)):  # one sorted root, streams among the paths
            if name in self.streams:
                if name in trie:
                    raise InvalidArgument(f"--stdin-name {name.decode()!r} collides with a backed-up path")
                self._stream_entry(name, self.streams[name], builder)
            else:
                super()._synthetic_dir(path, {name: trie[name]}, builder)

    def _stream_entry(self, name: bytes, s: Stream, builder: DirBuilder) -> None:
        c = self.repo.config
        cdc = FastCDC(c.cdc_avg - c.cdc_min, min_size=c.cdc_min, max_size=c.cdc_max, seed=self.repo.envelope.chunker_seed)
        try:
            proc = subprocess.Popen(s.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, bufsize=0)
        except OSError as e:
            raise DumpFailed(f"cannot run dump command {' '.join(s.command)!r}: {e.strerror}") from None
        parts: list[list[Any]] = []
        size = 0
        try:
            assert proc.stdout is not None
            for ch in cdc.cut_stream(proc.stdout):
                data = bytes(ch.data)
                parts.append([self.pipe.submit(self.writer.add, fmt.BlobKind.DATA, data), len(data)])
                size += len(data)
                self.stats["read_bytes"] += len(data)
                self._tick(name)
        finally:
            if proc.stdout is not None:
                proc.stdout.close()
            rc = proc.wait()
        if rc != 0:
            raise DumpFailed(f"dump command {' '.join(s.command)!r} exited with status {rc}; "
                             "the backup was not committed")
        now = time.time_ns()
        node: Node = {"n": name, "t": TYPE_FILE, "m": stat.S_IFREG | 0o600, "u": os.getuid(), "g": os.getgid(),
                      "s": size, "mt": now, "at": now, "ct": now, "nl": 1}
        self.stats["files"] += 1
        self.stats["bytes"] += size

        def finish(node: Node = node) -> Node:
            node["c"] = [[p[0].result() if isinstance(p[0], Future) else p[0], p[1]] for p in parts]
            return node

        builder.add(name, finish)

    def _has_other_sources(self) -> bool:
        return bool(self.streams)

    def _extra_paths(self) -> list[str]:
        return [f"/{n.decode(errors='replace')}" for n in sorted(self.streams)]

    def _write_tree(self, trie: dict[bytes, Any]) -> list[list[Any]]:
        try:
            return super()._write_tree(trie)
        except BaseException:
            self.writer.close()
            raise

    def _snapshot(self, pages: list[list[Any]], start: int, t0: float, paths: list[str]) -> Snapshot:
        snap = super()._snapshot(pages, start, t0, paths)
        return replace(snap, meta={})  # the appliance sets tenant and the rest

    def _commit(self, snap: Snapshot) -> Snapshot:
        try:
            stored = self.repo.store_snapshot(snap)
        finally:
            self.writer.close()
        stored.stats.update({k: snap.stats[k] for k in snap.stats if k not in stored.stats})
        return stored

    def run(self, paths: Iterable[str]) -> Snapshot:
        paths = list(paths)
        if not paths and not self.streams:
            raise InvalidArgument("give at least one path to back up, or --stdin-name NAME -- COMMAND")
        return super().run(paths)


@dataclass
class AgentJob:
    paths: list[str]
    streams: list[Stream] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    excludes: list[str] = field(default_factory=list)
    one_file_system: bool = False
    use_files_cache: bool = True
    cache_dir: str = ""
    threads: int | None = None


def _state_dir(cache_dir: str, params: dict[str, Any], tenant: str, host: str) -> str:
    d = os.path.join(cache_dir, "agent", f"{params['server_id']}-{params['key_id']}", tenant, host)
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d


def open_session(client: Client, state_dir: str, paths: list[str]) -> tuple[str, bool]:
    """Resume the session a previous, interrupted run left open, or open a new one."""
    sfile = os.path.join(state_dir, "session.json")
    resume = None
    try:
        with open(sfile) as f:
            resume = json.load(f).get("session")
    except (OSError, ValueError):
        pass
    body: dict[str, Any] = {"paths": paths}
    if isinstance(resume, str):
        body["resume"] = resume
    r = client.json("POST", "/sessions", body)
    tmp = sfile + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"session": r["session"]}, f)
    os.replace(tmp, sfile)
    return r["session"], bool(r.get("resumed"))


def run_backup(client: Client, job: AgentJob, progress: ProgressFn | None = None) -> tuple[Snapshot, dict[str, Any]]:
    t0 = time.monotonic()
    me = client.json("GET", "/whoami")
    params = client.json("GET", "/agent/params")
    log.debug("connected in %.3f s", time.monotonic() - t0)
    sdir = _state_dir(job.cache_dir, params, me["tenant"], me["host"])
    files = Index(os.path.join(sdir, "files"), f"agent-{params['server_id']}-{params['key_id']}")
    info: dict[str, Any] = {"tenant": me["tenant"], "host": me["host"]}
    try:
        sid, resumed = open_session(client, sdir, job.paths)
        log.debug("session %s open at %.3f s", sid[:8], time.monotonic() - t0)
        info.update(session=sid, resumed=resumed)
        extra = {"streams": [{"name": s.name, "command": s.command} for s in job.streams]}
        use_cache = job.use_files_cache
        for attempt in (1, 2):
            remote = RemoteRepository(client, params, sid, files, extra)
            opts = BackupOptions(host=me["host"], tags=job.tags, excludes=job.excludes,
                                 one_file_system=job.one_file_system, use_files_cache=use_cache, threads=job.threads)
            try:
                snap = AgentBackup(remote, opts, job.streams, progress).run(job.paths)
                log.debug("committed at %.3f s", time.monotonic() - t0)
                break
            except MissingReferences:
                if attempt == 2 or not use_cache:
                    raise
                log.warning("the appliance no longer has chunks the files cache names; reading every file again")
                files.clear(["files"])
                use_cache = False
        else:  # pragma: no cover - the loop breaks or raises
            raise AssertionError
        try:
            os.unlink(os.path.join(sdir, "session.json"))
        except FileNotFoundError:
            pass
        return snap, info
    except (DumpFailed, SourceError, InvalidArgument):
        # The run itself is wrong (not the network): abandon the session rather than resume it later.
        sid = info.get("session")
        if sid:
            try:
                client.json("DELETE", f"/sessions/{sid}", retry=False)
            except Exception:  # noqa: BLE001 - best effort; the session is only bookkeeping
                pass
            try:
                os.unlink(os.path.join(sdir, "session.json"))
            except FileNotFoundError:
                pass
        raise
    finally:
        files.close()


def run_hook(command: str, phase: str, env_extra: dict[str, str]) -> int:
    """Hooks run through the shell, with IHB_HOOK and IHB_BACKUP_STATUS in the environment."""
    env = dict(os.environ, IHB_HOOK=phase, **env_extra)
    shell = shutil.which("sh") or "/bin/sh"
    return subprocess.run([shell, "-c", command], env=env, stdin=subprocess.DEVNULL, check=False).returncode


def with_hooks(pre: str | None, post: str | None, fn: Callable[[], Any]) -> tuple[Any, int | None]:
    """Run ``fn`` between the hooks; the post hook always runs. Returns (result, post-hook status)."""
    from .errors import HookFailed

    status = "failed"
    try:
        if pre:
            rc = run_hook(pre, "pre", {"IHB_BACKUP_STATUS": "starting"})
            if rc != 0:
                raise HookFailed(f"--pre-hook {pre!r} exited with status {rc}; nothing was backed up")
        result = fn()
        status = "ok"
    finally:
        post_rc = run_hook(post, "post", {"IHB_BACKUP_STATUS": status}) if post else None
        if post_rc:
            log.warning("--post-hook %r exited with status %d", post, post_rc)
    return result, post_rc
