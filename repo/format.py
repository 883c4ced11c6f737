"""Every magic number, struct layout and version of the on-disk format (docs/format.md is the spec).

This module is the only place that knows byte layouts; each constant names the section of
docs/format.md it implements.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import NewType

# §1 Versions. A repository records the format version that wrote it; a reader refuses newer ones.
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})

ChunkId = NewType("ChunkId", bytes)  # 32-byte keyed BLAKE3 of the plaintext (§4)
PackId = NewType("PackId", bytes)  # 16 random bytes (§3)
SnapshotId = NewType("SnapshotId", str)  # 64 hex chars, keyed BLAKE3 of the snapshot plaintext (§6)

ID_LEN = 32
PACK_ID_LEN = 16


class BlobKind(IntEnum):
    """§3.2 What a blob holds. Bound into the AEAD associated data, so a blob cannot change role."""

    DATA = 0  # file or disk content
    TREE = 1  # a page of directory entries
    IMAGE_MAP = 2  # a page of an image's chunk map
    SNAPSHOT = 3  # a restore point record (stored as its own object, not in packs)
    PACK_TRAILER = 4  # the index of one pack, at its end
    KEY = 5  # the wrapped master key
    NOTE = 6  # an annotation of a restore point (verification result, lock, ...), own object


class Compression(IntEnum):
    """§3.3 First plaintext byte of every blob: how the rest is compressed."""

    NONE = 0
    ZSTD = 1


# §3.1 Pack file layout: header, blobs back to back, trailer envelope, trailer footer.
PACK_MAGIC = b"IHBPACK\x01"
PACK_END_MAGIC = b"IHBPEND\x01"
PACK_FOOTER = struct.Struct("<I8s")  # trailer envelope length, PACK_END_MAGIC

# §3.4 Pack trailer entry (msgpack list): [kind, chunk id, offset, length, plaintext length]

# §5 LMDB index: chunks sub-database value.
CHUNK_LOC = struct.Struct("<16sQIIB")  # pack id, offset, stored length, plaintext length, kind

# §4 Envelope: AES-256-GCM nonce | ciphertext | tag; associated data = AAD_PREFIX + kind + object id.
AAD_PREFIX = b"ihb1"
NONCE_LEN = 12
TAG_LEN = 16
PLAIN_CHECK_LEN = 16  # encryption "none": trailing keyed BLAKE3 of kind+id+plaintext

# §2 Repository layout (names inside the storage).
CONFIG_NAME = "config"
KEY_NAME = "keys/repokey"
DATA_PREFIX = "data/"
SNAPSHOT_PREFIX = "snapshots/"
NOTE_PREFIX = "notes/"
LOCK_NAME = "lock"

# §7 Defaults, justified by measurement in docs/benchmarks.md.
DEFAULT_CDC_MIN = 256 * 1024
DEFAULT_CDC_AVG = 1024 * 1024  # pyfastcdc's avg excludes min: we pass avg - min
DEFAULT_CDC_MAX = 4 * 1024 * 1024
DEFAULT_IMAGE_CHUNK = 256 * 1024
DEFAULT_PACK_SIZE = 32 * 1024 * 1024
IMAGE_MAP_PAGE = 4096  # chunk-map entries per page (1 GiB of disk at 256 KiB chunks)
TREE_PAGE_ENTRIES = 1000  # directory entries per tree page
TREE_PAGE_BYTES = 2 * 1024 * 1024


def pack_name(pack_id: bytes) -> str:
    h = pack_id.hex()
    return f"{DATA_PREFIX}{h[:2]}/{h}"


def pack_id_from_name(name: str) -> PackId | None:
    base = name.rsplit("/", 1)[-1]
    if len(base) != PACK_ID_LEN * 2:
        return None
    try:
        return PackId(bytes.fromhex(base))
    except ValueError:
        return None
