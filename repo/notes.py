"""Annotations of restore points: facts learnt after a backup (a verified boot, a check) that must not
change the immutable restore point itself. Each note is its own sealed, create-once object
``notes/<snapshot id>/<time ns>-<kind>``; they are listed per restore point and deleted with it.
"""

from __future__ import annotations

import time
from typing import Any

import msgpack

from . import format as fmt
from .repository import Repository


def add_note(repo: Repository, snapshot_id: str, kind: str, data: dict[str, Any]) -> str:
    if not kind.isidentifier():
        raise ValueError(f"bad note kind {kind!r}")
    name = f"{fmt.NOTE_PREFIX}{snapshot_id}/{time.time_ns()}-{kind}"
    plain = msgpack.packb({"kind": kind, "time": time.time_ns(), "data": data}, use_bin_type=True)
    obj = repo.envelope.pack_blob(fmt.BlobKind.NOTE, name.encode(), plain)
    repo.storage.put_bytes(name, obj)
    return name


def notes(repo: Repository, snapshot_id: str, kind: str | None = None) -> list[dict[str, Any]]:
    out = []
    for name in repo.storage.list(f"{fmt.NOTE_PREFIX}{snapshot_id}"):
        if kind and not name.endswith("-" + kind):
            continue
        plain = repo.envelope.open(fmt.BlobKind.NOTE, name.encode(), repo.storage.get(name))
        out.append(msgpack.unpackb(plain, raw=False))
    out.sort(key=lambda n: n["time"])
    return out


def delete_notes(repo: Repository, snapshot_id: str) -> None:
    for name in list(repo.storage.list(f"{fmt.NOTE_PREFIX}{snapshot_id}")):
        repo.storage.delete(name)
