"""The repository: opens storage, key and index, stores and fetches blobs, and records restore points.

Write ordering (docs/format.md §8): a pack is durable in storage before the index names it; every
blob a snapshot references is durable before the snapshot object is written; the snapshot object
is the commit point. Readers trust the snapshot objects and packs, never the index alone.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack

from . import format as fmt
from .crypto import Envelope, KeyMaterial, scratch
from .errors import (
    ChunkMissing,
    IntegrityError,
    InvalidArgument,
    RepositoryExists,
    RepositoryLocked,
    SnapshotNotFound,
    UnsupportedFormat,
)
from .index import Index
from .pack import BlobLoc, EmptyPack, PackWriter, read_trailer
from .sessions import Session
from .snapshot import Snapshot
from .storage import LocalStorage, Storage

if TYPE_CHECKING:
    from .storage_s3 import S3Lock, S3Storage

log = logging.getLogger(__name__)

PassphraseSource = Callable[[], bytes | None]


@dataclass(frozen=True)
class RepoConfig:
    """The plaintext ``config`` object (§2.1)."""

    format_version: int
    repo_id: str
    encryption: str
    compression_level: int
    cdc_min: int
    cdc_avg: int
    cdc_max: int
    image_chunk_size: int
    pack_size: int
    key_check: str

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, indent=1, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes, where: str) -> RepoConfig:
        try:
            doc = json.loads(data)
            version = int(doc["format_version"])
        except (ValueError, KeyError, TypeError) as e:
            raise IntegrityError(f"the repository config at {where} is damaged: {e}") from None
        if version not in fmt.SUPPORTED_VERSIONS:
            newest = max(fmt.SUPPORTED_VERSIONS)
            raise UnsupportedFormat(
                f"repository {where} uses format version {version}, this ihb reads up to {newest}; upgrade ihb"
            )
        try:
            return cls(**{k: doc[k] for k in cls.__dataclass_fields__})
        except KeyError as e:
            raise IntegrityError(f"the repository config at {where} lacks {e}") from None


def default_cache_root() -> str:
    env = os.environ.get("IHB_CACHE_DIR")
    if env:
        return env
    if os.geteuid() == 0:
        return "/var/cache/ihb"
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ihb")


class _Lock:
    """flock(2) on the repository's lock file: shared for backups and reads, exclusive for prune, GC and
    repair. The kernel drops it when the holder dies (kill -9 included), so a stale lock cannot exist
    on a local repository."""

    def __init__(self, path: str, exclusive: bool, wait: float) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        op = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(self.fd, op | fcntl.LOCK_NB)
                return
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    os.close(self.fd)
                    what = "an exclusive" if exclusive else "a shared"
                    raise RepositoryLocked(
                        f"cannot take {what} lock on {path}: another ihb process (prune, gc, repair or a backup) "
                        "is using the repository; retry when it has finished"
                    ) from None
                time.sleep(0.1)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Repository:
    def __init__(
        self, storage: Storage, config: RepoConfig, key: KeyMaterial, index: Index, lock: _Lock | S3Lock | None
    ) -> None:
        self.storage = storage
        self.config = config
        self.key = key
        self.envelope = Envelope(key, config.compression_level)
        self.index = index
        self._lock = lock
        self._session: Session | None = None  # registered by the first writer(), ended by close()
        self._index_prefetched = False  # the first writer() asks for it; the appliance makes one per upload

    # --- lifecycle -----------------------------------------------------------------------------------
    @staticmethod
    def storage_for(location: str, cache_dir: str | None = None) -> LocalStorage | S3Storage:
        """``s3://...`` is a bucket (repo/storage_s3.py, boto3 imported only then); anything else a directory."""
        if location.startswith("s3://"):
            from .storage_s3 import S3Storage

            return S3Storage.from_location(location, cache_dir or default_cache_root())
        return LocalStorage(location)

    @classmethod
    def init(
        cls,
        location: str,
        passphrase: bytes | None,
        encryption: str = "aes-256-gcm",
        compression_level: int = 3,
        pack_size: int = fmt.DEFAULT_PACK_SIZE,
        image_chunk_size: int = fmt.DEFAULT_IMAGE_CHUNK,
    ) -> None:
        storage = cls.storage_for(location)
        if storage.exists(fmt.CONFIG_NAME):
            raise RepositoryExists(f"a repository already exists at {location}")
        if image_chunk_size < 4096 or image_chunk_size & (image_chunk_size - 1):
            raise InvalidArgument("--image-chunk-size must be a power of two of at least 4096")
        if not 0 <= compression_level <= 22:
            raise InvalidArgument("--compression must be a zstd level from 0 (off) to 22")
        if isinstance(storage, LocalStorage):
            os.makedirs(location, mode=0o700, exist_ok=True)
            if os.listdir(location):
                raise RepositoryExists(f"{location} is not empty; choose an empty or new directory")
        else:
            storage.prepare_init()  # creates the bucket if needed; refuses a non-empty prefix
        key = KeyMaterial.generate(encryption)
        env = Envelope(key)
        check = env.pack_blob(fmt.BlobKind.KEY, b"key-check", b"ihb key check")
        config = RepoConfig(
            format_version=fmt.FORMAT_VERSION,
            repo_id=os.urandom(16).hex(),
            encryption=encryption,
            compression_level=compression_level,
            cdc_min=fmt.DEFAULT_CDC_MIN,
            cdc_avg=fmt.DEFAULT_CDC_AVG,
            cdc_max=fmt.DEFAULT_CDC_MAX,
            image_chunk_size=image_chunk_size,
            pack_size=pack_size,
            key_check=check.hex(),
        )
        storage.put_bytes(fmt.KEY_NAME, key.wrap(passphrase))
        for d in ("data", "snapshots"):
            if isinstance(storage, LocalStorage):
                os.makedirs(os.path.join(location, d), exist_ok=True)
        # The config is written last: its presence marks a complete repository.
        storage.put_bytes(fmt.CONFIG_NAME, config.to_json())

    @classmethod
    def open(
        cls,
        location: str,
        passphrase: PassphraseSource = lambda: None,
        *,
        exclusive: bool = False,
        lock: bool = True,
        lock_wait: float = 5.0,
        cache_dir: str | None = None,
    ) -> Repository:
        storage = cls.storage_for(location, cache_dir)
        storage.check_exists()
        config = RepoConfig.from_json(storage.get(fmt.CONFIG_NAME), storage.location)
        key_doc = storage.get(fmt.KEY_NAME)
        key = KeyMaterial.unwrap(key_doc, None if b'"kdf": "none"' in key_doc else passphrase())
        cls._verify_key(key, config)
        lk: _Lock | S3Lock | None = None
        if lock:  # a bucket can be shared by appliances: lease objects in it (S3Lock), not flock
            lk = (_Lock(os.path.join(storage.root, fmt.LOCK_NAME), exclusive, lock_wait)
                  if isinstance(storage, LocalStorage) else storage.lock(exclusive, lock_wait))
        index_dir = os.path.join(cache_dir or default_cache_root(), config.repo_id, "index")
        try:
            index = Index(index_dir, config.repo_id)
        except lmdb_errors() as e:
            if lk:
                lk.release()
            raise IntegrityError(f"the index at {index_dir} cannot be opened ({e}); run `ihb check --repair`") from e
        repo = cls(storage, config, key, index, lk)
        if lk is not None:
            storage.cleanup_spool()
        repo.sync_index()
        return repo

    @staticmethod
    def _verify_key(key: KeyMaterial, config: RepoConfig) -> None:
        try:
            Envelope(key).open(fmt.BlobKind.KEY, b"key-check", bytes.fromhex(config.key_check))
        except IntegrityError:
            raise IntegrityError("the key does not belong to this repository (key check failed)") from None

    def close(self) -> None:
        if self._session is not None:
            self._session.end()
            self._session = None
        self.index.close()
        if self._lock:
            self._lock.release()
            self._lock = None
        close = getattr(self.storage, "close", None)  # LocalStorage: fds; S3Storage: thread pools
        if close is not None:
            close()

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- index reconciliation --------------------------------------------------------------------------
    def sync_index(self) -> tuple[int, int]:
        """Bring the index in line with storage: enter packs and snapshots it does not know (written by a
        crashed or concurrent writer, or by another appliance), forget ones that are gone."""
        subdirs = getattr(self.storage, "subdirs", None)
        if subdirs is None:  # object stores: list every pack
            known = set(self.index.packs())  # before the listing (see _sync_pack_dirs)
            added, removed = self._sync_packs(self.storage.list(fmt.DATA_PREFIX), known)
        else:
            added, removed = self._sync_pack_dirs(subdirs(fmt.DATA_PREFIX))
        snaps_known = {sid for sid, _ in self.index.snapshot_records()}
        snaps_disk = set()
        for name in self.storage.list(fmt.SNAPSHOT_PREFIX):
            sid = name.rsplit("/", 1)[-1]
            snaps_disk.add(sid)
            if sid not in snaps_known:
                try:
                    snap = self._read_snapshot_object(sid)
                except IntegrityError as e:
                    log.error("skipping damaged restore point %s: %s", sid[:12], e)
                    continue
                self.index.put_snapshot(sid, snap.to_record())
                added += 1
        for sid in snaps_known - snaps_disk:
            self.index.delete_snapshot(sid)
        return added, removed + len(snaps_known - snaps_disk)

    def _sync_packs(self, names: Iterable[str], known: set[bytes]) -> tuple[int, int]:
        """Index the packs among ``names`` that ``known`` lacks; forget the known ones not among them."""
        on_disk: set[bytes] = set()
        added = 0
        for name in names:
            pid = fmt.pack_id_from_name(name)
            if pid is None:
                continue
            on_disk.add(pid)
            if pid not in known:
                try:
                    entries = read_trailer(self.storage, self.envelope, name)
                    size = self.storage.size(name)
                except EmptyPack as e:
                    log.warning("ignoring %s", e)
                    continue
                except IntegrityError as e:
                    log.error("skipping damaged pack: %s", e)
                    continue
                except FileNotFoundError:  # deleted since the listing (GC of an unindexed leftover)
                    continue
                self.index.add_pack(pid, size, entries)
                added += 1
        for pid in known - on_disk:
            self.index.remove_pack(pid)
        return added, len(known - on_disk)

    def _sync_pack_dirs(self, mtimes: dict[str, int]) -> tuple[int, int]:
        """Local storage: list only the pack directories whose mtime changed since a listing that is
        known complete, instead of every pack at every open (O(packs): seconds for a repository of
        hundreds of thousands). A directory's mtime changes whenever a pack is linked in or deleted,
        but only at the clock's granularity: a listing vouches for an mtime only if it started at
        least RACY_NS after we first saw that mtime (so a later change falls in a later tick and
        shows), both instants on our own clock (a file server's clock may be skewed)."""
        added = removed = 0
        states = self.index.pack_dir_states()
        updates: dict[str, tuple[int, int, bool] | None] = {}
        # A safety net for file systems that do not keep directory mtimes (some FUSE object-store
        # mounts): every directory is listed again at least every FULL_LISTING_NS.
        start = time.time_ns()
        full = start - self.index.last_full_listing() >= FULL_LISTING_NS
        for byte in range(256):
            d = f"{byte:02x}"
            mtime, state = mtimes.get(d), states.get(d)
            if not full and mtime is not None and state is not None and state[0] == mtime and state[2]:
                continue
            now = time.time_ns()
            known = self.index.packs_with_prefix(byte)  # before the listing, as in sync_index: a pack that
            # GC deletes and forgets in between must not come back into the index from a stale listing
            if mtime is None and state is None and not known:
                continue  # no such directory, and nothing indexed in it
            names = list(self.storage.list(f"{fmt.DATA_PREFIX}{d}/")) if mtime is not None else []
            a, r = self._sync_packs(names, known)
            added, removed = added + a, removed + r
            if mtime is None:
                updates[d] = None
            elif state is not None and state[0] == mtime:
                updates[d] = (mtime, state[1], now - state[1] >= RACY_NS)
            else:
                updates[d] = (mtime, now, False)
        if updates or full:
            self.index.put_pack_dir_states(updates, full_listing=start if full else None)
        return added, removed

    # --- blobs ---------------------------------------------------------------------------------------
    def chunk_id(self, data: bytes | memoryview) -> fmt.ChunkId:
        return self.envelope.chunk_id(data)

    def has_blob(self, blob_id: bytes) -> bool:
        return self.index.get_chunk(blob_id) is not None

    def read_stored(self, loc: BlobLoc) -> bytes:
        return self.storage.get(fmt.pack_name(loc.pack), loc.offset, loc.length)

    def _read_stored_scratch(self, loc: BlobLoc) -> bytes | memoryview:
        """``read_stored`` into this thread's scratch buffer where the storage can (local packs): valid
        until the thread's next blob read, which is all ``get_blob`` needs."""
        get_into = getattr(self.storage, "get_into", None)
        if get_into is None:
            return self.read_stored(loc)
        view = scratch("stored", loc.length)
        return view[: get_into(fmt.pack_name(loc.pack), loc.offset, view)]

    def get_blob(self, kind: int, blob_id: bytes) -> bytes:
        return self._get_blob(kind, blob_id, view=False)  # type: ignore[return-value]

    def get_blob_view(self, kind: int, blob_id: bytes) -> bytes | memoryview:
        """``get_blob`` without copying a blob stored uncompressed: a read-only view of its own buffer."""
        return self._get_blob(kind, blob_id, view=True)

    def _get_blob(self, kind: int, blob_id: bytes, view: bool) -> bytes | memoryview:
        loc = self.index.get_chunk(blob_id)
        if loc is None:
            loc = self.index.get_condemned(blob_id)  # awaiting a GC sweep: still readable (gc.py)
        if loc is None:
            raise ChunkMissing(f"chunk {blob_id.hex()[:16]} is missing from the repository; run `ihb check`")
        try:
            stored = self._read_stored_scratch(loc)
        except FileNotFoundError:
            # GC may have compacted the pack since the lookup; it re-indexes live blobs before deleting.
            moved = self.index.get_chunk(blob_id)
            if moved is None or moved.pack == loc.pack:
                raise ChunkMissing(
                    f"pack {loc.pack.hex()[:16]} holding chunk {blob_id.hex()[:16]} is missing; run `ihb check --repair`"
                ) from None
            loc = moved
            stored = self._read_stored_scratch(loc)
        if view:
            data = self.envelope.open_view(loc.kind, blob_id, stored, loc.raw_len)
        else:
            data = self.envelope.open(loc.kind, blob_id, stored)
        if len(data) != loc.raw_len:
            raise IntegrityError(f"chunk {blob_id.hex()[:16]} has the wrong length")
        return data

    def writer(self, session: Session | None = None) -> BlobWriter:
        """A deduplicating writer. A writer may reference any blob it finds in the index, so it must be
        covered by a writer session (sessions.py) until its restore point is committed: pass your own
        (one per upload session, e.g. the server), or the first writer registers one for this Repository
        object, ended by ``close()``."""
        if session is None and self._session is None:
            self._session = Session.begin(self, "writer", f"pid {os.getpid()}")
        if not self._index_prefetched:
            self._index_prefetched = True
            self.index.prefetch()
        return BlobWriter(self)

    # --- snapshots -----------------------------------------------------------------------------------
    def _read_snapshot_object(self, sid: str) -> Snapshot:
        raw = self.storage.get(fmt.SNAPSHOT_PREFIX + sid)
        plain = self.envelope.open(fmt.BlobKind.SNAPSHOT, bytes.fromhex(sid), raw)
        return Snapshot.from_plain(sid, plain)

    def store_snapshot(self, snap: Snapshot) -> Snapshot:
        """The commit point of a backup: all referenced blobs must already be durable."""
        plain = snap.to_plain()
        sid = self.envelope.chunk_id(plain).hex()
        obj = self.envelope.pack_blob(fmt.BlobKind.SNAPSHOT, bytes.fromhex(sid), plain)
        self.storage.put_bytes(fmt.SNAPSHOT_PREFIX + sid, obj)
        stored = Snapshot.from_plain(sid, plain)
        self.index.put_snapshot(sid, stored.to_record())
        return stored

    def snapshots(self) -> list[Snapshot]:
        snaps = [Snapshot.from_record(sid, rec) for sid, rec in self.index.snapshot_records()]
        snaps.sort(key=lambda s: (s.time_ns, s.id))
        return snaps

    def get_snapshot(self, ref: str) -> Snapshot:
        """Find a restore point by id prefix (at least 4 hex digits) or `latest`/`HOST@latest`."""
        snaps = self.snapshots()
        if ref == "latest" or ref.endswith("@latest"):
            host = ref[:-7] if ref.endswith("@latest") else None
            cand = [s for s in snaps if host is None or host in (s.host, s.vm)]
            if not cand:
                raise SnapshotNotFound(f"no restore point matches {ref!r}; list them with `ihb snapshots`")
            return cand[-1]
        if len(ref) < 4:
            raise SnapshotNotFound(f"restore point id {ref!r} is too short; give at least 4 hex digits")
        matches = [s for s in snaps if s.id.startswith(ref.lower())]
        if not matches:
            raise SnapshotNotFound(f"no restore point {ref!r}; list them with `ihb snapshots`")
        if len(matches) > 1:
            raise SnapshotNotFound(f"restore point id {ref!r} is ambiguous; give more digits")
        return matches[0]

    def load_snapshot(self, sid: str) -> Snapshot:
        return self._read_snapshot_object(sid)

    def delete_snapshot(self, sid: str) -> None:
        self.storage.delete(fmt.SNAPSHOT_PREFIX + sid)
        self.index.delete_snapshot(sid)


#: See Repository._sync_pack_dirs: far above any file system's timestamp granularity.
RACY_NS = 2_000_000_000
#: ... and every pack directory is listed again after this long whatever its mtime says.
FULL_LISTING_NS = 3600 * 1_000_000_000


def lmdb_errors() -> tuple[type[BaseException], ...]:
    import lmdb

    return (lmdb.Error,)


class BlobWriter:
    """Deduplicating writer for one backup session, safe for concurrent ``add`` from worker threads.

    Hashing, compression and encryption run outside the lock (the C code releases the GIL); only the
    append to the pack file is serialised. Files-cache rows queued with ``defer_files_row`` are committed
    together with the next pack, because they are only valid once their chunks are durable.
    """

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.env = repo.envelope
        self._lock = threading.Lock()
        self._pack: PackWriter | None = None
        self._pending: set[bytes] = set()  # ids appended to the open pack or being sealed
        self._files_rows: list[tuple[bytes, bytes]] = []
        self.stats = {"chunks": 0, "new_chunks": 0, "bytes": 0, "new_bytes": 0, "stored_bytes": 0}
        self.closed = False
        # Storages with slow puts (S3) ask for packs to be uploaded by one background thread, at most
        # this many in flight, while packing goes on; the index still only learns of a pack once it is durable.
        self._up_max = int(getattr(repo.storage, "background_uploads", 0))
        self._up_pool: ThreadPoolExecutor | None = None
        self._commit_pool: ThreadPoolExecutor | None = None
        #: Set once a pack failed to commit (its error, as it failed) or the backup was aborted: no later
        #: pack reaches the index, since its rows could point into the missing one.
        self._commit_error: BaseException | None = None
        # (index commit, upload, pack) per pack in flight, oldest first
        self._uploads: deque[tuple[Future[list[tuple[bytes, BlobLoc]]], Future[list[tuple[bytes, BlobLoc]]],
                                   PackWriter]] = deque()

    def add(self, kind: int, data: bytes | memoryview, blob_id: bytes | None = None) -> bytes:
        if blob_id is None:
            blob_id = self.env.chunk_id(data)
        n = len(data)
        if not self._claim(blob_id, n):
            return blob_id
        try:
            stored = self.env.pack_blob(kind, blob_id, data)
        except BaseException:
            with self._lock:
                self._pending.discard(blob_id)
            raise
        self._append(kind, blob_id, stored, n)
        return blob_id

    def add_compressed(self, kind: int, blob_id: bytes, body: bytes, raw_len: int) -> bool:
        """Store a blob whose compressed body (compression byte + payload, as ``Envelope.compress``
        makes it) was produced elsewhere, e.g. by a network agent. The caller vouches that ``body``
        decompresses to ``raw_len`` bytes whose id is ``blob_id``. Returns True if it was new."""
        if not self._claim(blob_id, raw_len):
            return False
        try:
            stored = self.env.seal(kind, blob_id, body)
        except BaseException:
            with self._lock:
                self._pending.discard(blob_id)
            raise
        self._append(kind, blob_id, stored, raw_len)
        return True

    def _claim(self, blob_id: bytes, n: int) -> bool:
        """Count a blob; True if it is new and this caller must store it. The index lookup runs outside
        the lock: on a cold index it waits on the disk, and under the lock every worker waited in turn.
        A blob leaves ``_pending`` only after its pack is indexed, so a lookup that misses it while its
        pack is being indexed still finds it pending."""
        with self._lock:
            self.stats["chunks"] += 1
            self.stats["bytes"] += n
            if blob_id in self._pending:
                return False
        known = self.repo.index.get_chunk(blob_id) is not None
        with self._lock:
            if known or blob_id in self._pending:
                return False
            self._pending.add(blob_id)
            return True

    def _append(self, kind: int, blob_id: bytes, stored: bytes, n: int) -> None:
        with self._lock:
            if self._pack is None:
                self._pack = PackWriter(self.repo.storage, self.env)
            self._pack.append(kind, blob_id, stored, n)
            self.stats["new_chunks"] += 1
            self.stats["new_bytes"] += n
            self.stats["stored_bytes"] += len(stored)
            if self._pack.size >= self.repo.config.pack_size:
                self._flush_locked()

    def count_reused(self, content: list[list[Any]]) -> None:
        """Account for chunks reused through the files cache (never read, never hashed)."""
        with self._lock:
            for cid, ln in content:
                if cid is not None:
                    self.stats["chunks"] += 1
                    self.stats["bytes"] += ln

    def defer_files_row(self, key: bytes, value: bytes) -> None:
        with self._lock:
            self._files_rows.append((key, value))

    def _flush_locked(self) -> None:
        pack, self._pack = self._pack, None
        rows, self._files_rows = self._files_rows, []
        if pack is None:
            self._wait_uploads_locked(0)  # the rows may name chunks of packs still uploading
            self.repo.index.put_files(rows)
            return
        if not self._up_max:
            entries = pack.finish()
            self.repo.index.add_pack(pack.pack_id, pack.size, entries, rows)
            self._pending.difference_update(bid for bid, _ in entries)
            return
        try:
            self._wait_uploads_locked(self._up_max - 1)
        except BaseException:
            pack.abort()  # in neither self._pack nor self._uploads now: abort() would not find its spool file
            raise
        if self._up_pool is None or self._commit_pool is None:
            # Packs upload side by side (one at a time left the object store idle between packs), but
            # the index learns of them in order, on one thread: a pack's files-cache rows may name
            # chunks of earlier packs, which must be durable and indexed first.
            self._up_pool = ThreadPoolExecutor(self._up_max, thread_name_prefix="ihb-pack-upload")
            self._commit_pool = ThreadPoolExecutor(1, thread_name_prefix="ihb-pack-commit")
        up = self._up_pool.submit(pack.finish)  # seal, fsync, upload: durable from here on
        self._uploads.append((self._commit_pool.submit(self._commit_pack, up, pack, rows), up, pack))

    def _commit_pack(self, up: Future[list[tuple[bytes, BlobLoc]]], pack: PackWriter,
                     rows: list[tuple[bytes, bytes]]) -> list[tuple[bytes, BlobLoc]]:
        try:
            entries = up.result()
            if self._commit_error is not None:
                # The earlier error again, not a vaguer one of our own: the backup's worker threads race
                # to report one, and the user must see the cause (disk full: exit 30) whichever wins.
                raise self._commit_error
            self.repo.index.add_pack(pack.pack_id, pack.size, entries, rows)
            return entries
        except BaseException as e:
            if self._commit_error is None:
                self._commit_error = e
            raise

    def _wait_uploads_locked(self, keep: int) -> None:
        """Wait until at most ``keep`` uploads are in flight; re-raises an upload's error."""
        while len(self._uploads) > keep:
            commit, _up, _pack = self._uploads.popleft()
            self._pending.difference_update(bid for bid, _ in commit.result())

    def flush(self) -> None:
        """Make every blob added so far durable and indexed."""
        with self._lock:
            self._flush_locked()
            self._wait_uploads_locked(0)

    def abort(self) -> None:
        with self._lock:
            if self._pack is not None:
                self._pack.abort()
                self._pack = None
            if self._commit_error is None:  # nothing more reaches the index
                self._commit_error = IntegrityError("the backup was aborted; its later packs are not indexed")
            while self._uploads:
                commit, up, pack = self._uploads.popleft()
                if up.cancel():
                    pack.abort()  # never started: remove its spool file
                for fut in (up, commit):
                    try:
                        fut.result()
                    except Exception as e:  # noqa: BLE001 - aborting already; the first error was reported
                        log.debug("pack upload failed during abort: %s", e)
            self._pending.clear()
            self._files_rows.clear()
        self.closed = True


def iter_all_blob_ids(repo: Repository) -> Iterator[bytes]:
    for bid, _ in repo.index.iter_chunks():
        yield bid


def pack_record(size: int, count: int) -> bytes:
    return msgpack.packb([size, count])
