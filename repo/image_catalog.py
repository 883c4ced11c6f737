"""Catalogue the files inside VM image restore points, so that one `ihb find` query sees every version
of /etc/nginx/nginx.conf across agents (file-level) and VMs (image-level).

The guest filesystems are read in-process through repo.guestfs, from the stored image itself (through
the chunk cache), after the restore point is committed: a failure here never fails a backup.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator

from .catalog import Catalog, EntryTuple, walk_guestfs
from .guestfs import open_disk
from .image import ImageReader
from .repository import Repository
from .snapshot import Snapshot

log = logging.getLogger(__name__)


class _Source:
    def __init__(self, reader: ImageReader) -> None:
        self.reader, self.size = reader, reader.size

    def read_at(self, offset: int, size: int) -> bytes:
        return self.reader.read(offset, size)


def image_entries(repo: Repository, snap: Snapshot) -> Iterator[EntryTuple]:
    """(path, size, mtime, digest, type) of every file in every readable guest filesystem."""
    for disk in snap.disks:
        try:
            gd = open_disk(_Source(ImageReader(repo, disk)))
        except Exception as e:  # noqa: BLE001 - an unreadable disk is simply not catalogued
            log.info("catalog: disk %s of %s is not readable: %s", disk.name, snap.short_id, e)
            continue
        for dv in gd.filesystems():
            for path, size, mtime, digest, t in walk_guestfs(dv.fs):
                yield path.encode("utf-8", "surrogateescape"), size, mtime, digest, t


def index_image_snapshot(repo: Repository, snap: Snapshot) -> int:
    if snap.kind != "image":
        return 0
    entries = image_entries(repo, snap)
    first = list(itertools.islice(entries, 1))
    if not first:
        return 0
    return Catalog(repo.index).add(snap, itertools.chain(first, entries))


def index_image_snapshot_quietly(repo: Repository, snap: Snapshot) -> None:
    try:
        n = index_image_snapshot(repo, snap)
        log.info("catalogued %d files inside %s", n, snap.short_id)
    except Exception as e:  # noqa: BLE001 - the restore point is committed; cataloguing is best effort
        log.warning("files inside %s are not in the catalog yet (%s)", snap.short_id, e)
