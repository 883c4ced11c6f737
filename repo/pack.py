"""Append-only pack files: many sealed blobs in one object, indexed by an authenticated trailer.

A pack is written to a spool file, fsync'ed, and only then linked into the storage; its trailer lets
the LMDB index be rebuilt from the packs alone (docs/format.md §3).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import msgpack

from . import format as fmt
from .crypto import Envelope
from .errors import IntegrityError
from .storage import Storage, _raise_os


@dataclass(frozen=True)
class BlobLoc:
    """Where a blob lives: the LMDB ``chunks`` value (§5)."""

    pack: bytes
    offset: int
    length: int
    raw_len: int
    kind: int

    def encode(self) -> bytes:
        return fmt.CHUNK_LOC.pack(self.pack, self.offset, self.length, self.raw_len, self.kind)

    @classmethod
    def decode(cls, b: bytes) -> BlobLoc:
        return cls(*fmt.CHUNK_LOC.unpack(b))


class PackWriter:
    """One pack being filled. Not thread-safe: the caller serialises ``append``."""

    def __init__(self, storage: Storage, envelope: Envelope) -> None:
        self.storage = storage
        self.envelope = envelope
        self.pack_id = fmt.PackId(os.urandom(fmt.PACK_ID_LEN))
        self.path = os.path.join(storage.spool_dir(), f"pack-{os.getpid()}-{self.pack_id.hex()}.tmp")
        # 1 MiB buffer: one write(2) per ~16 small blobs rather than one per blob (each also drops and
        # retakes the GIL); nothing reads a pack before finish() has flushed and fsynced it.
        self._f = open(self.path, "wb", buffering=1 << 20)  # noqa: SIM115 - closed in finish()/abort()
        self.entries: list[tuple[int, bytes, int, int, int]] = []
        self.size = 0
        self._failed: BaseException | None = None
        self._write(fmt.PACK_MAGIC)

    def _write(self, b: bytes) -> None:
        if self._failed is not None:  # a concurrent writer hit the error first: report the same one
            raise self._failed
        try:
            self._f.write(b)
        except OSError as e:
            self.abort()
            try:
                _raise_os(e, "a pack")
            except BaseException as err:
                self._failed = err
                raise
        self.size += len(b)

    def append(self, kind: int, blob_id: bytes, stored: bytes, raw_len: int) -> BlobLoc:
        off = self.size
        self._write(stored)
        self.entries.append((kind, blob_id, off, len(stored), raw_len))
        return BlobLoc(self.pack_id, off, len(stored), raw_len, kind)

    def finish(self) -> list[tuple[bytes, BlobLoc]]:
        """Seal the trailer, fsync, link the pack into storage; returns its entries for the index."""
        trailer = self.envelope.pack_blob(
            fmt.BlobKind.PACK_TRAILER, self.pack_id, msgpack.packb(self.entries, use_bin_type=True)
        )
        self._write(trailer)
        self._write(fmt.PACK_FOOTER.pack(len(trailer), fmt.PACK_END_MAGIC))
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
        except OSError as e:
            self.abort()
            _raise_os(e, "a pack")
        self.storage.put_file(fmt.pack_name(self.pack_id), self.path)
        return [(bid, BlobLoc(self.pack_id, off, ln, raw, kind)) for kind, bid, off, ln, raw in self.entries]

    def abort(self) -> None:
        try:
            self._f.close()
        except OSError:
            pass  # flushing the buffered tail failed too (disk full): the pack is discarded anyway
        finally:
            if os.path.exists(self.path):
                os.unlink(self.path)


class EmptyPack(IntegrityError):
    """A pack object of 0 bytes: it holds nothing, so nothing can be lost with it. Left by an upload that
    died before its first byte (some object stores keep such a PUT); `check --repair` removes one the
    index never knew."""


def read_trailer(storage: Storage, envelope: Envelope, name: str) -> list[tuple[bytes, BlobLoc]]:
    """Read a pack's trailer; raises IntegrityError if the pack is truncated or damaged."""
    pack_id = fmt.pack_id_from_name(name)
    if pack_id is None:
        raise IntegrityError(f"{name}: not a pack name")
    size = storage.size(name)
    if size == 0:
        raise EmptyPack(f"empty pack {name} left by an interrupted upload")
    if size < len(fmt.PACK_MAGIC) + fmt.PACK_FOOTER.size:
        raise IntegrityError(f"pack {name} is truncated ({size} bytes)")
    footer = storage.get(name, size - fmt.PACK_FOOTER.size, fmt.PACK_FOOTER.size)
    tlen, magic = fmt.PACK_FOOTER.unpack(footer)
    if magic != fmt.PACK_END_MAGIC or tlen > size - fmt.PACK_FOOTER.size - len(fmt.PACK_MAGIC):
        raise IntegrityError(f"pack {name} has a damaged footer")
    raw = storage.get(name, size - fmt.PACK_FOOTER.size - tlen, tlen)
    try:
        entries = msgpack.unpackb(envelope.open(fmt.BlobKind.PACK_TRAILER, pack_id, raw), raw=False)
        return [(bytes(bid), BlobLoc(pack_id, off, ln, raw_len, kind)) for kind, bid, off, ln, raw_len in entries]
    except IntegrityError as e:
        raise IntegrityError(f"pack {name}: trailer damaged: {e}") from None
    except (ValueError, TypeError) as e:
        raise IntegrityError(f"pack {name}: trailer malformed: {e}") from None
