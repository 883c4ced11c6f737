"""Restore points: what was backed up, from where, when, and the root of its data.

A restore point is either ``files`` (a tree of directory pages, see tree.py) or ``image`` (VM disks as
fixed-size chunk maps, see image.py). The whole record is one encrypted object; the index keeps a
plaintext copy (``to_record``) so listing never touches storage.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field, replace
from typing import Any

import msgpack

from .errors import IntegrityError

SNAPSHOT_VERSION = 1


@dataclass(frozen=True)
class DiskRecord:
    """One VM disk in an image restore point."""

    name: str
    size: int
    chunk_size: int
    pages: list[bytes | None]  # chunk-map page ids; None = a page that is all holes
    stats: dict[str, int] = field(default_factory=dict)

    def to_obj(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "cs": self.chunk_size, "pages": self.pages, "stats": self.stats}

    @classmethod
    def from_obj(cls, o: dict[str, Any]) -> DiskRecord:
        return cls(o["name"], o["size"], o["cs"], list(o["pages"]), dict(o.get("stats", {})))


@dataclass(frozen=True)
class Snapshot:
    id: str
    kind: str  # "files" | "image"
    host: str
    time_ns: int
    paths: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    tree: bytes | None = None  # root directory node (msgpack) for files restore points
    disks: list[DiskRecord] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    errors: list[dict[str, str]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)  # vm settings, consistency, tenant, ...
    parent: str | None = None

    @property
    def vm(self) -> str | None:
        v = self.meta.get("vm")
        return v if isinstance(v, str) else None

    @property
    def short_id(self) -> str:
        return self.id[:8]

    @property
    def time(self) -> _dt.datetime:
        return _dt.datetime.fromtimestamp(self.time_ns / 1e9, tz=_dt.UTC)

    def time_label(self) -> str:
        """Directory-safe time used in mounts: 2026-11-24T20-30-05Z."""
        return self.time.strftime("%Y-%m-%dT%H-%M-%SZ")

    def _obj(self, with_tree: bool = True) -> dict[str, Any]:
        return {
            "v": SNAPSHOT_VERSION,
            "kind": self.kind,
            "host": self.host,
            "time": self.time_ns,
            "paths": self.paths,
            "tags": self.tags,
            "tree": self.tree,
            "disks": [d.to_obj() for d in self.disks],
            "stats": self.stats,
            "errors": self.errors,
            "meta": self.meta,
            "parent": self.parent,
        }

    def to_plain(self) -> bytes:
        return msgpack.packb(self._obj(), use_bin_type=True)

    def to_record(self) -> bytes:
        return self.to_plain()

    @classmethod
    def from_plain(cls, sid: str, plain: bytes) -> Snapshot:
        try:
            o = msgpack.unpackb(plain, raw=False)
            if o.get("v", 0) > SNAPSHOT_VERSION:
                raise IntegrityError(f"restore point {sid[:12]} was written by a newer ihb")
            return cls(
                id=sid,
                kind=o["kind"],
                host=o["host"],
                time_ns=o["time"],
                paths=list(o.get("paths", [])),
                tags=list(o.get("tags", [])),
                tree=o.get("tree"),
                disks=[DiskRecord.from_obj(d) for d in o.get("disks", [])],
                stats=dict(o.get("stats", {})),
                errors=list(o.get("errors", [])),
                meta=dict(o.get("meta", {})),
                parent=o.get("parent"),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise IntegrityError(f"restore point {sid[:12]} is malformed: {e}") from None

    from_record = from_plain

    def with_id(self, sid: str) -> Snapshot:
        return replace(self, id=sid)

    def summary(self) -> dict[str, Any]:
        """The JSON shape used by `ihb snapshots --json` and the API."""
        d: dict[str, Any] = {
            "id": self.id,
            "short_id": self.short_id,
            "kind": self.kind,
            "host": self.host,
            "time": self.time.isoformat().replace("+00:00", "Z"),
            "paths": self.paths,
            "tags": self.tags,
            "stats": self.stats,
            "errors": len(self.errors),
            "parent": self.parent,
        }
        if self.kind == "image":
            d["vm"] = self.vm
            d["disks"] = [{"name": x.name, "size": x.size} for x in self.disks]
            d["consistency"] = self.meta.get("consistency")
        if "tenant" in self.meta:
            d["tenant"] = self.meta["tenant"]
        return d
