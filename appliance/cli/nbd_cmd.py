"""`ihb nbd-export`: serve disks of an image restore point over NBD (copy-on-write overlay for writes)."""

from __future__ import annotations

import os
import signal
import threading

import click

from appliance.hypervisor.nbd_server import DiskExport, NBDServer, Overlay
from repo.errors import InvalidArgument
from repo.image import ImageReader

from . import cli
from .common import Ctx, common_options
from .restore_disk_cmd import find_image_snapshot
from .ticket import gate, ticket_option


@cli.command("nbd-export")
@common_options
@click.argument("ref")
@click.option("--disk", "disks", multiple=True, help="Disk(s) to export (default: all); export name = disk name.")
@click.option("--listen", default="127.0.0.1:10809", show_default=True, help="TCP address to listen on.")
@click.option("--socket", "unix", type=click.Path(), help="Listen on this UNIX socket instead of TCP.")
@click.option("--overlay-dir", type=click.Path(file_okay=False),
              help="Keep writes in copy-on-write overlays here (kept across restarts). Without it: read-only.")
@ticket_option
def nbd_export(ctx: Ctx, ref: str, disks: tuple[str, ...], listen: str, unix: str | None, overlay_dir: str | None,
               ticket: str | None) -> None:
    """Serve the disks of REF (VM@SNAPSHOT or VM@latest) over NBD until interrupted.

    The restore point is never written: with --overlay-dir, writes go to an overlay file per disk.
    """
    repo = ctx.open_repo()
    snap = find_image_snapshot(repo, ref)
    chosen = [d for d in snap.disks if not disks or d.name in disks]
    if not chosen:
        raise InvalidArgument(f"restore point {snap.short_id} has no disk {', '.join(disks)}")
    gate(ctx, snap, kind=("instant", "mount"), paths=list(disks), target=unix or listen, ticket=ticket).done("serving")
    exports = {}
    for d in chosen:
        reader = ImageReader(repo, d)
        ov = None
        if overlay_dir:
            os.makedirs(overlay_dir, exist_ok=True)
            ov = Overlay(os.path.join(overlay_dir, f"{snap.vm}-{snap.short_id}-{d.name}.overlay"), d.size)
        exports[d.name] = DiskExport(d.name, d.size, reader.read, ov)
    if unix:
        server = NBDServer(exports, unix=unix)
        where = f"nbd+unix:///{chosen[0].name}?socket={unix}"
    else:
        host, _, port = listen.rpartition(":")
        server = NBDServer(exports, host=host or "127.0.0.1", port=int(port))
        where = f"nbd://{listen}/{chosen[0].name}"
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    ctx.emit({"message_type": "serving", "url": where, "exports": list(exports), "snapshot": snap.id},
             lambda: click.echo(f"serving {', '.join(exports)} of {snap.vm}@{snap.short_id} at {where} "
                                f"({'copy-on-write overlay in ' + overlay_dir if overlay_dir else 'read-only'})"))
    import sys

    sys.stdout.flush()
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        for e in exports.values():
            if e.overlay is not None:
                e.overlay.flush()
        server.server_close()
        repo.close()
