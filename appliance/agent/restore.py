"""Restoring from the appliance: the local safe restore (repo.restore) reading blobs over HTTPS.

``RemoteBlobs`` is the one method restore and tree reading need from a repository (``get_blob``);
the appliance checks on every request that the blob belongs to one of the caller's restore points.
When the tenant's policy requires authorized restores, the approved files ticket goes with every
request (X-Ihb-Ticket); without it the appliance refuses and TicketRefused (exit 71) says why.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Callable
from typing import Any

from repo import format as fmt
from repo.errors import SnapshotNotFound
from repo.restore import RestoreOptions, restore_snapshot
from repo.snapshot import Snapshot

from .client import API, Client

TICKET_HEADER = "X-Ihb-Ticket"
_KIND = {fmt.BlobKind.DATA: "data", fmt.BlobKind.TREE: "tree"}


class RemoteBlobs:
    def __init__(self, client: Client) -> None:
        self.client = client

    def get_blob(self, kind: int, blob_id: bytes) -> bytes:
        return self.client.request("GET", f"{API}/blobs/{_KIND[kind]}/{blob_id.hex()}")


def list_snapshots(client: Client) -> list[dict[str, Any]]:
    r = client.json("GET", "/snapshots")
    return list(r.get("snapshots", []))


def resolve(client: Client, ref: str) -> dict[str, Any]:
    """``latest``, or an id prefix of at least 4 hex digits, among the restore points this token sees."""
    snaps = list_snapshots(client)
    if ref == "latest":
        if not snaps:
            raise SnapshotNotFound("this host has no restore points on the appliance yet")
        return snaps[-1]
    if len(ref) < 4:
        raise SnapshotNotFound(f"restore point id {ref!r} is too short; give at least 4 hex digits")
    hits = [s for s in snaps if s["id"].startswith(ref.lower())]
    if not hits:
        raise SnapshotNotFound(f"no restore point {ref!r} for this host; list them with `ihb agent snapshots`")
    if len(hits) > 1:
        raise SnapshotNotFound(f"restore point id {ref!r} is ambiguous; give more digits")
    return hits[0]


def fetch_snapshot(client: Client, sid: str) -> Snapshot:
    d = client.json("GET", f"/snapshots/{sid}")["snapshot"]
    t = dt.datetime.fromisoformat(d["time"].replace("Z", "+00:00"))
    return Snapshot(id=d["id"], kind=d["kind"], host=d["host"], time_ns=int(t.timestamp() * 1e9),
                    paths=d.get("paths", []), tags=d.get("tags", []), tree=base64.b64decode(d["root"]),
                    stats=d.get("stats", {}))


def restore(client: Client, ref: str, target: str, options: RestoreOptions,
            progress: Callable[[dict[str, Any], str], None] | None = None, ticket: str | None = None
            ) -> tuple[Snapshot, dict[str, Any], list[dict[str, str]]]:
    summary = resolve(client, ref)
    if ticket:
        client.headers[TICKET_HEADER] = ticket.strip()
    snap = fetch_snapshot(client, summary["id"])
    stats, errors = restore_snapshot(RemoteBlobs(client), snap, target, options, progress)  # type: ignore[arg-type]
    return snap, stats, errors
