"""The LMDB index: a cache of what the packs and snapshot objects say, rebuildable from them.

Sub-databases and key encodings (the canonical reference, docs/format.md §5 mirrors it):

``chunks``     chunk id (32 B)            -> CHUNK_LOC: pack id, offset, stored length, plaintext length, kind
``packs``      pack id (16 B)             -> msgpack [stored size, blob count]
``snapshots``  snapshot id (64 hex, ascii) -> msgpack snapshot record (plaintext, see snapshot.py)
``files``      host NUL absolute path      -> msgpack [inode, size, mtime_ns, ctime_ns, content]
``catalog``    name NUL snapshot id NUL path -> msgpack [size, mtime_ns] (file catalog, see catalog.py)
``meta``       ascii key                   -> value (``repo_id``)

Invariants: every ``chunks`` value names a pack present in ``packs``; a pack is entered only after it
is durable in storage. LMDB transactions never outlive one function call, so no transaction spans
threads or awaits.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator

import lmdb
import msgpack

from .pack import BlobLoc

_DBS = (b"chunks", b"packs", b"snapshots", b"files", b"catalog", b"meta")
INDEX_VERSION = b"1"


class Index:
    def __init__(self, path: str, repo_id: str) -> None:
        os.makedirs(path, mode=0o700, exist_ok=True)
        self.path = path
        # A large sparse map: LMDB grows the file as needed; 1 TiB of address space is free on 64-bit.
        self.env = lmdb.open(
            path, map_size=1 << 40, max_dbs=len(_DBS) + 2, max_readers=512, readahead=False, metasync=True
        )
        self.db = {name.decode(): self.env.open_db(name) for name in _DBS}
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

    # --- catalog ------------------------------------------------------------------------------------
    def put_catalog(self, rows: Iterable[tuple[bytes, bytes]]) -> None:
        with self._wlock, self.env.begin(write=True) as txn:
            for k, v in rows:
                txn.put(k, v, db=self.db["catalog"])

    # --- whole-index maintenance --------------------------------------------------------------------
    def clear(self, names: Iterable[str]) -> None:
        with self._wlock, self.env.begin(write=True) as txn:
            for n in names:
                txn.drop(self.db[n], delete=False)
