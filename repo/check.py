"""Verify a repository, and repair its index from the packs.

``check``: every pack trailer and restore point authenticates, every tree page decodes, every chunk a
restore point references is indexed. ``read_data``: every blob of every pack authenticates and its
plaintext hashes to its id; damaged chunks are named together with the files that use them.
``repair``: rebuild the LMDB index from the packs and snapshot objects alone, then drop damaged
chunks from it so that the next backup stores them again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack

from . import format as fmt
from .errors import IntegrityError
from .pack import EmptyPack, read_trailer
from .reader import shared_pool
from .repository import Repository
from .snapshot import Snapshot
from .tree import TYPE_DIR, TreeReader, root_node

log = logging.getLogger(__name__)


@dataclass
class CheckReport:
    errors: list[str] = field(default_factory=list)
    damaged_chunks: list[str] = field(default_factory=list)
    affected: list[dict[str, str]] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=lambda: {"packs": 0, "snapshots": 0, "chunks": 0, "blobs_read": 0})
    repaired: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and not self.damaged_chunks

    def to_obj(self) -> dict[str, Any]:
        return {"ok": self.ok, "errors": self.errors, "damaged_chunks": self.damaged_chunks,
                "affected": self.affected, "stats": self.stats, "repaired": self.repaired}


def image_map_ids(repo: Repository, snap: Snapshot) -> Iterator[tuple[str, bytes, int]]:
    """(disk name, chunk id, chunk index) for every stored chunk of an image restore point."""
    for disk in snap.disks:
        for pno, pid in enumerate(disk.pages):
            if pid is None:
                continue
            yield disk.name, pid, -1
            entries = msgpack.unpackb(repo.get_blob(fmt.BlobKind.IMAGE_MAP, pid))
            for i, cid in enumerate(entries):
                if cid:
                    yield disk.name, cid, pno * fmt.IMAGE_MAP_PAGE + i


def referenced(repo: Repository, snap: Snapshot, report: CheckReport | None = None) -> Iterator[tuple[bytes, str]]:
    """Every blob id a restore point references, with a human-readable location."""
    if snap.kind == "image":
        for disk, cid, idx in image_map_ids(repo, snap):
            yield cid, f"{disk} map page" if idx < 0 else f"{disk} @ {idx * (snap.disks[0].chunk_size if snap.disks else 0)}"
        return
    tree = TreeReader(repo, cache_pages=16)
    stack = [(root_node(snap.tree), b"")]
    while stack:
        node, path = stack.pop()
        for _first, pid in node.get("d", ()):
            yield pid, (path.decode("utf-8", "replace") or "/") + " (directory)"
            try:
                entries = tree.page(pid)
            except IntegrityError as e:
                if report is not None:
                    report.errors.append(f"restore point {snap.short_id}: directory {path.decode(errors='replace') or '/'}: {e}")
                continue
            for child in entries:
                cpath = path + b"/" + child["n"]
                if child.get("t") == TYPE_DIR:
                    stack.append((child, cpath))
                for cid, _ln in child.get("c", ()):
                    if cid is not None:
                        yield cid, cpath.decode("utf-8", "replace")


def _verify_pack(repo: Repository, name: str) -> tuple[int, list[bytes], str | None]:
    env = repo.envelope
    try:
        entries = read_trailer(repo.storage, env, name)
    except IntegrityError as e:
        return 0, [], str(e)
    except OSError as e:
        return 0, [], f"pack {name}: {e}"
    bad: list[bytes] = []
    data = repo.storage.get(name)
    for bid, loc in entries:
        try:
            plain = env.open(loc.kind, bid, memoryview(data)[loc.offset : loc.offset + loc.length])
            if loc.kind in (fmt.BlobKind.DATA, fmt.BlobKind.TREE, fmt.BlobKind.IMAGE_MAP) and env.chunk_id(plain) != bid:
                raise IntegrityError("plaintext does not hash to its id")
        except IntegrityError:
            bad.append(bid)
    return len(entries), bad, None


def check_repository(repo: Repository, read_data: bool = False, repair: bool = False,
                     progress: Callable[[str], None] | None = None) -> CheckReport:
    report = CheckReport()
    if repair:
        log.info("rebuilding the index from packs and restore points")
        repo.index.clear(["chunks", "packs", "snapshots", "catalog", "condemned", "gc"])
        repo.sync_index()
        report.repaired.append("index rebuilt from packs")
    pack_names = [n for n in repo.storage.list(fmt.DATA_PREFIX) if fmt.pack_id_from_name(n)]
    # An empty pack the index never knew (pack.EmptyPack) is not damage; --repair removes it.
    known = repo.index.packs()
    empty: set[str] = set()
    for n in pack_names:
        if fmt.pack_id_from_name(n) not in known:
            try:
                read_trailer(repo.storage, repo.envelope, n)
            except EmptyPack:
                empty.add(n)
            except IntegrityError:
                pass  # reported below with the other packs
    if empty:
        pack_names = [n for n in pack_names if n not in empty]
        report.stats["empty_leftover_packs"] = len(empty)
        for n in sorted(empty):
            if repair:
                repo.storage.delete(n)
                report.repaired.append(f"removed empty leftover pack {n}")
            else:
                log.warning("empty pack %s was left by an interrupted upload; `ihb check --repair` removes it", n)
    report.stats["packs"] = len(pack_names)
    damaged: set[bytes] = set()
    if read_data:
        for i, (count, bad, err) in enumerate(shared_pool().map(lambda n: _verify_pack(repo, n), pack_names)):
            if progress:
                progress(f"read {i + 1}/{len(pack_names)} packs")
            report.stats["blobs_read"] += count
            if err:
                report.errors.append(err)
            damaged.update(bad)
    else:
        for name in pack_names:
            try:
                read_trailer(repo.storage, repo.envelope, name)
            except IntegrityError as e:
                report.errors.append(str(e))
    # Restore points: decrypt each object, walk its trees, check every reference is indexed.
    for sid in [n.rsplit("/", 1)[-1] for n in repo.storage.list(fmt.SNAPSHOT_PREFIX)]:
        try:
            snap = repo.load_snapshot(sid)
        except IntegrityError as e:
            report.errors.append(f"restore point {sid[:12]}: {e}")
            continue
        report.stats["snapshots"] += 1
        seen_missing: set[bytes] = set()
        try:
            for cid, where in referenced(repo, snap, report):
                report.stats["chunks"] += 1
                if cid in damaged:
                    report.affected.append({"snapshot": snap.short_id, "path": where, "chunk": cid.hex()})
                elif cid not in seen_missing and not repo.has_blob(cid) and repo.index.get_condemned(cid) is None:
                    seen_missing.add(cid)
                    report.errors.append(f"restore point {snap.short_id}: {where}: chunk {cid.hex()[:16]} is missing")
        except IntegrityError as e:
            report.errors.append(f"restore point {snap.short_id}: {e}")
            if any(x.hex() in str(e) for x in damaged):
                pass
    report.damaged_chunks = sorted(c.hex() for c in damaged)
    if repair:
        from .catalog import rebuild as rebuild_catalog

        rebuild_catalog(repo, clear=True)
        report.repaired.append("file catalog rebuilt")
    if repair and damaged:
        repo.index.remove_chunks(damaged)
        report.repaired.append(
            f"{len(damaged)} damaged chunks dropped from the index; the next backup of their source stores them again"
        )
    return report


def repository_info(repo: Repository) -> dict[str, Any]:
    """Sizes and ratios: what the restore points hold, what is unique, what is stored."""
    snaps = repo.snapshots()
    original = sum(int(s.stats.get("bytes", 0)) for s in snaps)
    unique = 0
    stored = 0
    chunks = 0
    for _cid, loc in repo.index.iter_chunks():
        chunks += 1
        unique += loc.raw_len
        stored += loc.length
    packs = repo.index.packs()
    on_disk = sum(size for size, _ in packs.values())
    return {
        "location": repo.storage.location,
        "repo_id": repo.config.repo_id,
        "format_version": repo.config.format_version,
        "encryption": repo.config.encryption,
        "compression_level": repo.config.compression_level,
        "snapshots": len(snaps),
        "hosts": sorted({s.host for s in snaps if s.kind == "files"}),
        "vms": sorted({s.vm for s in snaps if s.vm}),
        "original_bytes": original,
        "unique_bytes": unique,
        "stored_chunk_bytes": stored,
        "pack_bytes": on_disk,
        "packs": len(packs),
        "chunks": chunks,
        "dedup_ratio": round(original / unique, 2) if unique else None,
        "compression_ratio": round(unique / stored, 2) if stored else None,
    }
