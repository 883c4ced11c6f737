"""The LMDB index: a cache of what the packs and snapshot objects say, rebuildable from them.

Sub-databases and key encodings (the canonical reference, docs/format.md §5 mirrors it):

``chunks``     chunk id (32 B)            -> CHUNK_LOC: pack id, offset, stored length, plaintext length, kind
``packs``      pack id (16 B)             -> msgpack [stored size, blob count]
``snapshots``  snapshot id (64 hex, ascii) -> msgpack snapshot record (plaintext, see snapshot.py)
``files``      host NUL absolute path      -> msgpack [inode, size, mtime_ns, ctime_ns, content]
``meta``       ascii key                   -> value (``repo_id``)
``condemned``  chunk id (32 B)            -> CHUNK_LOC of a blob GC's mark took out of ``chunks`` (gc.py):
                                             writers cannot find it, readers still can (``get_blob``)
``gc``         ``state``                  -> msgpack {t_c, t_m, cutoff, scanned}: the pending condemnation

The file catalog (catalog.py; built for name and path queries over tens of millions of entries). A
*lineage* is one series of restore points whose files are compared with each other (same tenant, host,
kind and backed-up paths); within it restore points get consecutive ordinals, and a file's history is
stored as *runs*: "unchanged from ordinal a through b". A file present in 100 restore points unchanged
costs one row, not 100. Integers are big-endian so keys sort numerically.

``catalog``     ``v``                          -> catalog format version (ascii); absent = rebuild
                ``N`` / ``P``                  -> next lineage id (u32) / next path id (u64)
                ``F``                          -> committed length (u64) of ``<index dir>/catalog-names``,
                                                   the distinct folded names, NUL-terminated (infix globs)
                ``L`` + 16 B lineage key hash   -> lineage id (u32)
                ``l`` + lineage id              -> msgpack {tenant, host, kind, source, next, head, pending}
                ``H`` + host + NUL + lineage id -> b"" (the lineages of a host)
                ``S`` + snapshot id (64 hex)    -> msgpack [lineage id, ordinal, time_ns, entries]
                ``O`` + lineage id + ordinal    -> snapshot id (32 B) + time_ns (u64): existing restore
                                                   points only; prune deletes the row
``cat_pathkey`` host NUL absolute path          -> path id (u64)
``cat_paths``   path id (u64)                   -> host NUL absolute path
``cat_names``   lower-cased base name           -> path id (u64), one duplicate per path (DUPSORT)
``cat_rnames``  reversed lower-cased base name  -> b"" (suffix queries such as ``*.conf``)
``cat_runs``    lineage id + path id + first ordinal (u32) -> ``CAT_RUN``: last ordinal (u32), size (u64),
                                                   mtime_ns (i64), type (1 B), content digest (0 or 16 B)

Invariants: every ``chunks`` value names a pack present in ``packs``; a pack is entered only after it
is durable in storage; a ``condemned`` row exists only while ``gc`` holds a state, and its chunk id is
not in ``chunks`` unless a writer stored the blob again or a repair re-entered it (then it is live).
A ``catalog`` ``S`` row is written last, after the runs of its restore point. LMDB transactions never
outlive one function call, so no transaction spans threads or awaits.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import lmdb
import msgpack

from .pack import BlobLoc

_DBS = (b"chunks", b"packs", b"snapshots", b"files", b"catalog", b"meta",
        b"cat_pathkey", b"cat_paths", b"cat_names", b"cat_rnames", b"cat_runs", b"condemned", b"gc", b"packdirs")
_DUPFIXED = frozenset({b"cat_names"})  # sorted duplicate values of one fixed size (postings)
INDEX_VERSION = b"1"
_FULL_LISTING = b"full"  # packdirs row: when every pack directory was last listed


class Index:
    def __init__(self, path: str, repo_id: str) -> None:
        os.makedirs(path, mode=0o700, exist_ok=True)
        self.path = path
        # A large sparse map: LMDB grows the file as needed; 1 TiB of address space is free on 64-bit.
        self.env = lmdb.open(
            path, map_size=1 << 40, max_dbs=len(_DBS) + 2, max_readers=512, readahead=False, metasync=True
        )
        self.db = {name.decode(): self.env.open_db(name, dupsort=name in _DUPFIXED, dupfixed=name in _DUPFIXED)
                   for name in _DBS}
        self._wlock = threading.Lock()  # one LMDB write transaction at a time per process
        with self.env.begin(write=True) as txn:
            meta = self.db["meta"]
            stored = txn.get(b"repo_id", db=meta)
            if stored is None:
                txn.put(b"repo_id", repo_id.encode(), db=meta)
                txn.put(b"version", INDEX_VERSION, db=meta)
            elif stored.decode() != repo_id:
                raise RuntimeError(f"index at {path} belongs to repository {stored.decode()}, not {repo_id}")

    def close(self) -> None:
        self.env.close()

    def prefetch(self, max_fraction_of_ram: int = 16) -> bool:
        """Read the whole index into the page cache, on a thread of its own, if it is small next to
        RAM (<= 1/16). A writer looks up one random chunk id per chunk: with the index cold and LMDB's
        readahead off (right for an index larger than RAM) each lookup is a 4 KiB page fault. The 1,719
        lookups of a 1% VM incremental took 0.32-0.40 s cold; after one sequential read of the 14 MB
        index (8-10 ms) they took 0.04 s. ``posix_fadvise(WILLNEED)``, tried first, left them at
        0.32-0.40 s: the kernel's asynchronous readahead had not brought the pages in when they were
        needed."""
        data = os.path.join(self.path, "data.mdb")
        try:
            size = os.path.getsize(data)
            if size > os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // max_fraction_of_ram:
                return False
            fd = os.open(data, os.O_RDONLY | os.O_CLOEXEC)
        except (OSError, ValueError):
            return False

        def read_all() -> None:
            buf = bytearray(1 << 20)
            try:
                while os.readv(fd, [buf]) > 0:  # reads release the GIL: lookups go on meanwhile
                    pass
            except OSError:
                pass  # only a hint: the lookups read what they need themselves
            finally:
                os.close(fd)

        threading.Thread(target=read_all, name="ihb-index-prefetch", daemon=True).start()
        return True

    # --- chunks -------------------------------------------------------------------------------------
    def get_chunk(self, chunk_id: bytes) -> BlobLoc | None:
        with self.env.begin(db=self.db["chunks"]) as txn:
            v = txn.get(chunk_id)
        return BlobLoc.decode(v) if v is not None else None

    def has_chunks(self, ids: Iterable[bytes]) -> list[bool]:
        with self.env.begin(db=self.db["chunks"]) as txn:
            return [txn.get(i) is not None for i in ids]

    def iter_chunks(self) -> Iterator[tuple[bytes, BlobLoc]]:
        with self.env.begin(db=self.db["chunks"]) as txn:
            for k, v in txn.cursor():
                yield bytes(k), BlobLoc.decode(v)

    def chunk_count(self) -> int:
        with self.env.begin() as txn:
            return int(txn.stat(self.db["chunks"])["entries"])

    def add_pack(
        self,
        pack_id: bytes,
        size: int,
        entries: list[tuple[bytes, BlobLoc]],
        files: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        """Enter a durable pack and its blobs (and files-cache rows that depend on them) in one commit."""
        with self._wlock, self.env.begin(write=True) as txn:
            txn.put(pack_id, msgpack.packb([size, len(entries)]), db=self.db["packs"])
            chunks = self.db["chunks"]
            for bid, loc in entries:
                # First copy wins: a duplicate from a concurrent writer stays unreferenced until GC.
                txn.put(bid, loc.encode(), db=chunks, overwrite=False)
            if files:
                fdb = self.db["files"]
                for k, v in files:
                    txn.put(k, v, db=fdb)

    def remove_pack(self, pack_id: bytes) -> None:
        with self._wlock, self.env.begin(write=True) as txn:
            txn.delete(pack_id, db=self.db["packs"])
            cur = txn.cursor(db=self.db["chunks"])
            stale = [k for k, v in cur if BlobLoc.decode(v).pack == pack_id]
            for k in stale:
                txn.delete(k, db=self.db["chunks"])

    def remove_chunks(self, ids: Iterable[bytes]) -> None:
        with self._wlock, self.env.begin(write=True) as txn:
            for i in ids:
                txn.delete(i, db=self.db["chunks"])

    def packs(self) -> dict[bytes, tuple[int, int]]:
        with self.env.begin(db=self.db["packs"]) as txn:
            return {bytes(k): tuple(msgpack.unpackb(v)) for k, v in txn.cursor()}  # type: ignore[misc]

    def packs_with_prefix(self, first_byte: int) -> set[bytes]:
        """The packs whose id starts with this byte: the ones stored in one pack directory."""
        out: set[bytes] = set()
        with self.env.begin(db=self.db["packs"]) as txn:
            cur = txn.cursor()
            if cur.set_range(bytes((first_byte,))):
                for k in cur.iternext(values=False):
                    if k[0] != first_byte:
                        break
                    out.add(bytes(k))
        return out

    # --- pack directory signatures (Repository.sync_index) ------------------------------------------
    def pack_dir_states(self) -> dict[str, tuple[int, int, bool]]:
        """Per pack directory: (its mtime in ns, when we first saw that mtime, whether a listing that
        started at least ``RACY_NS`` later agreed with the index). See Repository._sync_pack_dirs."""
        with self.env.begin(db=self.db["packdirs"]) as txn:
            return {bytes(k).decode(): tuple(msgpack.unpackb(v))  # type: ignore[misc]
                    for k, v in txn.cursor() if bytes(k) != _FULL_LISTING}

    def last_full_listing(self) -> int:
        """When every pack directory was last listed (ns; 0: never)."""
        with self.env.begin(db=self.db["packdirs"]) as txn:
            v = txn.get(_FULL_LISTING)
        return int(msgpack.unpackb(v)) if v is not None else 0

    def put_pack_dir_states(self, states: dict[str, tuple[int, int, bool] | None],
                            full_listing: int | None = None) -> None:
        """One transaction (one fsync) for every directory listed; None forgets a directory.
        ``full_listing``: every directory was listed, starting at that time (ns)."""
        with self._wlock, self.env.begin(write=True) as txn:
            db = self.db["packdirs"]
            for name, state in states.items():
                if state is None:
                    txn.delete(name.encode(), db=db)
                else:
                    txn.put(name.encode(), msgpack.packb(list(state)), db=db)
            if full_listing is not None:
                txn.put(_FULL_LISTING, msgpack.packb(full_listing), db=db)

    # --- snapshots ----------------------------------------------------------------------------------
    def put_snapshot(self, snap_id: str, record: bytes) -> None:
        with self._wlock, self.env.begin(write=True) as txn:
            txn.put(snap_id.encode(), record, db=self.db["snapshots"])

    def delete_snapshot(self, snap_id: str) -> None:
        with self._wlock, self.env.begin(write=True) as txn:
            txn.delete(snap_id.encode(), db=self.db["snapshots"])

    def snapshot_records(self) -> Iterator[tuple[str, bytes]]:
        with self.env.begin(db=self.db["snapshots"]) as txn:
            items = [(bytes(k).decode(), bytes(v)) for k, v in txn.cursor()]
        yield from items

    # --- files cache --------------------------------------------------------------------------------
    @staticmethod
    def files_key(host: str, path: bytes) -> bytes:
        return host.encode() + b"\0" + path

    def get_file(self, key: bytes) -> bytes | None:
        with self.env.begin(db=self.db["files"]) as txn:
            v = txn.get(key)
        return bytes(v) if v is not None else None

    def put_files(self, rows: list[tuple[bytes, bytes]]) -> None:
        if not rows:
            return
        with self._wlock, self.env.begin(write=True) as txn:
            for k, v in rows:
                txn.put(k, v, db=self.db["files"])

    # --- GC (gc.py): compare-and-set on chunk rows, never blind overwrites ---------------------------
    def move_chunks(self, pack_id: bytes, size: int, entries: list[tuple[bytes, BlobLoc]],
                    from_packs: set[bytes]) -> int:
        """Enter a durable compacted pack and point its blobs at it, but only rows that still point into
        one of ``from_packs`` (a concurrent writer's copy is left alone). One commit."""
        n = 0
        with self._wlock, self.env.begin(write=True) as txn:
            txn.put(pack_id, msgpack.packb([size, len(entries)]), db=self.db["packs"])
            db = self.db["chunks"]
            for bid, loc in entries:
                v = txn.get(bid, db=db)
                if v is None or BlobLoc.decode(v).pack in from_packs:
                    txn.put(bid, loc.encode(), db=db)
                    n += 1
        return n

    def forget_packs(self, pack_ids: Iterable[bytes]) -> None:
        """Drop pack rows whose blobs GC has already moved or removed (no chunk scan)."""
        with self._wlock, self.env.begin(write=True) as txn:
            for p in pack_ids:
                txn.delete(p, db=self.db["packs"])

    def condemn(self, rows: Iterable[tuple[bytes, BlobLoc]], state: bytes) -> int:
        """GC's mark, in one commit: move every row that still points where GC saw it from ``chunks`` to
        ``condemned``, and record the pending condemnation."""
        n = 0
        with self._wlock, self.env.begin(write=True) as txn:
            chunks, cond = self.db["chunks"], self.db["condemned"]
            for bid, loc in rows:
                v = txn.get(bid, db=chunks)
                if v is not None and BlobLoc.decode(v).pack == loc.pack:
                    txn.delete(bid, db=chunks)
                    txn.put(bid, v, db=cond)
                    n += 1
            txn.put(b"state", state, db=self.db["gc"])
        return n

    def get_condemned(self, chunk_id: bytes) -> BlobLoc | None:
        with self.env.begin(db=self.db["condemned"]) as txn:
            v = txn.get(chunk_id)
        return BlobLoc.decode(v) if v is not None else None

    def iter_condemned(self) -> Iterator[tuple[bytes, BlobLoc]]:
        with self.env.begin(db=self.db["condemned"]) as txn:
            rows = [(bytes(k), BlobLoc.decode(v)) for k, v in txn.cursor()]
        yield from rows

    def gc_state(self) -> bytes | None:
        with self.env.begin(db=self.db["gc"]) as txn:
            v = txn.get(b"state")
        return bytes(v) if v is not None else None

    def put_gc_state(self, state: bytes) -> None:
        with self._wlock, self.env.begin(write=True) as txn:
            txn.put(b"state", state, db=self.db["gc"])

    def rescue(self, ids: Iterable[bytes], packs: set[bytes] | None = None) -> int:
        """Move condemned rows back into ``chunks`` (first copy wins); with ``packs``, only rows whose
        pack is in it. Returns how many rows became indexed."""
        n = 0
        with self._wlock, self.env.begin(write=True) as txn:
            chunks, cond = self.db["chunks"], self.db["condemned"]
            for bid in ids:
                v = txn.get(bid, db=cond)
                if v is None:
                    continue
                txn.delete(bid, db=cond)
                if (packs is None or BlobLoc.decode(v).pack in packs) and txn.put(bid, v, db=chunks, overwrite=False):
                    n += 1
        return n

    def end_gc(self) -> None:
        """The sweep is done (or the condemnation given up): forget the condemned rows and the state."""
        with self._wlock, self.env.begin(write=True) as txn:
            txn.drop(self.db["condemned"], delete=False)
            txn.delete(b"state", db=self.db["gc"])

    # --- raw transactions (catalog.py) --------------------------------------------------------------
    @contextmanager
    def write_txn(self) -> Iterator[lmdb.Transaction]:
        """One write transaction under this process's writer lock; must not span threads or awaits."""
        with self._wlock, self.env.begin(write=True) as txn:
            yield txn

    def read_txn(self) -> lmdb.Transaction:
        return self.env.begin()

    # --- whole-index maintenance --------------------------------------------------------------------
    def clear(self, names: Iterable[str]) -> None:
        names = set(names)
        if "packs" in names:
            names.add("packdirs")  # what the directory signatures vouched for is gone
        with self._wlock, self.env.begin(write=True) as txn:
            for n in names:
                txn.drop(self.db[n], delete=False)
