"""`ihb mount` and `ihb umount`: restore points as a read-only filesystem."""

from __future__ import annotations

import os
import shutil
import subprocess

import click

from appliance.restore_requests import any_ticket_required
from appliance.units import parse_size
from fusefs.mount import MountError, MountOptions, mount
from repo.errors import InvalidArgument, TicketRefused
from repo.repository import Repository, default_cache_root

from . import cli
from .common import Ctx, common_options
from .ticket import gate, ticket_option


@cli.command("mount")
@common_options
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--snapshot", "-s", "snapshot", metavar="ID",
              help="Mount only this restore point at the root (id prefix, `latest` or `HOST@latest`).")
@click.option("-f", "--foreground", is_flag=True, help="Stay in the foreground (logs on stderr; Ctrl-C unmounts).")
@click.option("--cache-size", default="256M", show_default=True, metavar="SIZE",
              help="Memory for decompressed chunks: 512M, 2G, ... (a plain number is MiB; at least 8M).")
@ticket_option
def mount_cmd(ctx: Ctx, mountpoint: str, snapshot: str | None, foreground: bool, cache_size: str,
              ticket: str | None) -> None:
    """Mount the repository's restore points read-only at MOUNTPOINT.

    \b
    by-host/HOST/TIME/...      file-level restore points; by-host/HOST/latest links the newest
    vms/VM/TIME/DISK.raw       VM disks as raw images of their virtual size; vms/VM/latest
    by-id/ID/...               any restore point by id

    New restore points appear while mounted. Copy files out with ordinary tools, or point a hypervisor
    at a DISK.raw. Runs in the background once the mount is ready (-f to stay in the foreground);
    unmount with `ihb umount MOUNTPOINT`. The mount holds a shared repository lock, so prune and gc
    wait until it is unmounted.

    When a tenant's policy requires authorized restores, its restore points are mounted one at a
    time with --snapshot ID --ticket SECRET (exit code 71 otherwise; see `ihb restore-request`).
    """
    cache_bytes = parse_size(cache_size, "--cache-size", unit=1 << 20)
    if cache_bytes < 8 << 20:
        raise InvalidArgument(f"--cache-size {cache_size!r} is below the 8 MiB a mount needs")
    cached: list[bytes | None] = []

    def passphrase() -> bytes | None:
        if not cached:  # asked once, even though the daemon reopens the repository
            cached.append(ctx.passphrase())
        return cached[0]

    # Absolute paths: the daemon reopens the repository after chdir("/").
    repo_path = ctx.repo_path if "://" in ctx.repo_path else os.path.abspath(ctx.repo_path)
    cache_dir = os.path.abspath(ctx.cfg.cache_dir or default_cache_root())

    def open_repo() -> Repository:
        return Repository.open(repo_path, passphrase, cache_dir=cache_dir)

    auth = None
    if ticket or any_ticket_required(ctx.cfg):
        if snapshot is None:
            raise TicketRefused("some tenants require authorized restores, so the whole repository cannot be "
                                "mounted: mount one restore point with --snapshot ID --ticket SECRET (ask with "
                                "`ihb restore-request create ID --kind mount`)")
        with open_repo() as repo:
            snap = repo.get_snapshot(snapshot)
        snapshot = snap.id  # the restore point the ticket was checked for, even if `latest` moves on
        auth = gate(ctx, snap, kind=("mount", "instant"), paths=[], target=os.path.abspath(mountpoint), ticket=ticket)
    opts = MountOptions(mountpoint=mountpoint, snapshot=snapshot, foreground=foreground,
                        cache_bytes=cache_bytes)
    mount(open_repo, opts)
    if auth is not None:
        auth.done("mounted")


@cli.command("umount")
@click.argument("mountpoint", type=click.Path())
@click.option("-z", "--lazy", is_flag=True, help="Detach now even if busy; unmount when no longer in use.")
def umount_cmd(mountpoint: str, lazy: bool) -> None:
    """Unmount an `ihb mount` (same as `fusermount3 -u MOUNTPOINT`)."""
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool is None:
        raise MountError("fusermount3 is not installed; install the fuse3 package")
    res = subprocess.run([tool, "-uz" if lazy else "-u", mountpoint], capture_output=True, text=True)
    if res.returncode != 0:
        why = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit status {res.returncode}"
        raise MountError(f"cannot unmount {mountpoint}: {why}; if it is busy, close what uses it or pass --lazy")
