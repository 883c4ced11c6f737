"""`ihb vm backup|list`: image restore points of running QEMU/KVM VMs, driven over QMP."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from appliance.hypervisor.vmbackup import (
    VMBackupError,
    VMBackupOptions,
    backup_many,
    backup_vm,
    targets_in_dir,
)
from repo.errors import InvalidArgument

from . import cli
from .common import Ctx, Progress, common_options, human_bytes, tenant_option

#: Exit status of `vm backup --all` when at least one VM failed (the others' restore points stand).
EXIT_SOME_FAILED = VMBackupError.exit_code


@cli.group("vm")
def vm_group() -> None:
    """Image backups of running QEMU/KVM virtual machines (QMP, dirty bitmaps, NBD)."""


@contextmanager
def _terminate_as_interrupt(cancel: threading.Event) -> Iterator[None]:
    """SIGTERM behaves like Ctrl-C: the backup stops at the next block and its ``finally`` merges the
    dirty bitmaps back and removes the fleece nodes (a plain SIGTERM would skip all of that)."""

    def handler(signum: int, frame: Any) -> None:
        cancel.set()
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _human_result(r: dict[str, Any]) -> str:
    if not r.get("ok"):
        return f"FAILED  {r['vm']}: {r.get('error')}"
    st = r.get("stats", {})
    disks = ", ".join(
        f"{name} {ds.get('mode')} read {human_bytes(ds.get('read_bytes', 0))}"
        + (f" (free-skipped {human_bytes(ds['free_skipped_bytes'])})" if ds.get("free_skipped_bytes") else "")
        for name, ds in r.get("disk_stats", {}).items()
    )
    return (f"ok      {r['vm']}: restore point {r['short_id']} ({r.get('consistency')}-consistent), {disks}; "
            f"new {human_bytes(st.get('new_bytes', 0))} in {st.get('duration', 0):.1f} s")


@vm_group.command("backup")
@common_options
@click.option("--qmp", "qmp_path", type=click.Path(), help="QMP socket of the VM (-qmp unix:PATH,server=on).")
@click.option("--vm", "vm_name", help="VM name recorded in the restore point (default: QEMU's -name, else the "
              "socket's file name).")
@click.option("--all", "all_vms", is_flag=True, help="Back up every VM whose QMP socket is in --qmp-dir.")
@click.option("--qmp-dir", type=click.Path(file_okay=False), help="Directory of NAME.qmp sockets (and optional "
              "NAME.qga guest-agent sockets) for --all.")
@click.option("--parallel", type=click.IntRange(1, 64), default=2, show_default=True,
              help="VMs backed up at the same time with --all.")
@click.option("--full", is_flag=True, help="Copy every allocated block, even when an incremental is possible.")
@click.option("--agent-socket", type=click.Path(), help="qemu-guest-agent socket (default: found through QMP).")
@click.option("--no-agent", is_flag=True, help="Do not quiesce through the guest agent (crash-consistent).")
@click.option("--agent-timeout", type=float, default=5.0, show_default=True,
              help="Seconds to wait for the guest agent before taking a crash-consistent backup.")
@click.option("--no-trim", is_flag=True, help="Do not ask the guest agent to fstrim before the snapshot.")
@click.option("--no-skip-free", is_flag=True, help="Read blocks the guest file systems mark free too.")
@click.option("--app-consistent", is_flag=True, help="The guest's fsfreeze hooks quiesce its applications: "
              "record application consistency when the freeze succeeds.")
@click.option("--disk", "disks", multiple=True, help="Only this disk (repeatable; default: all writable disks).")
@click.option("--scratch-dir", type=click.Path(file_okay=False),
              help="Where fleece overlays grow while the backup runs (QEMU must be able to write there).")
@click.option("--tag", "tags", multiple=True, help="Tag the restore point (repeatable).")
@tenant_option
def vm_backup(ctx: Ctx, qmp_path: str | None, vm_name: str | None, all_vms: bool, qmp_dir: str | None,
              parallel: int, full: bool, agent_socket: str | None, no_agent: bool, agent_timeout: float,
              no_trim: bool, no_skip_free: bool, app_consistent: bool, disks: tuple[str, ...],
              scratch_dir: str | None, tags: tuple[str, ...], tenant: str | None) -> None:
    """Back up a running VM (all its disks at one point in time) through its QMP socket.

    The guest agent, when it answers, trims and freezes the guest file systems around one QMP
    transaction; without it the restore point is crash-consistent and recorded as such. Dirty
    bitmaps make the next run incremental; a failed or interrupted run never loses changes.
    """
    opts = VMBackupOptions(full=full, agent_socket=agent_socket, use_agent=not no_agent, agent_timeout=agent_timeout,
                           trim=not no_trim, skip_free=not no_skip_free, disks=disks, scratch_dir=scratch_dir,
                           tags=tags, app_consistent=app_consistent, tenant=tenant or "")
    cancel = threading.Event()
    if all_vms:
        if qmp_path or vm_name or agent_socket or disks:
            raise InvalidArgument("--all takes --qmp-dir, not --qmp/--vm/--agent-socket/--disk")
        if not qmp_dir:
            raise InvalidArgument("--all needs --qmp-dir DIR")
        targets = targets_in_dir(qmp_dir)
        if not targets:
            raise InvalidArgument(f"no QMP sockets (NAME.qmp) in {qmp_dir}")

        def on_result(r: dict[str, Any]) -> None:
            if not ctx.json:
                click.echo(_human_result(r))

        with _terminate_as_interrupt(cancel), ctx.open_repo() as repo:
            results = backup_many(repo, targets, opts, parallel=parallel, cancel=cancel, on_result=on_result)
        failed = [r for r in results if not r["ok"]]
        ctx.emit({"message_type": "vm_backup_all", "ok": not failed, "results": results},
                 lambda: click.echo(f"{len(results) - len(failed)} of {len(results)} VMs backed up"
                                    + (f"; failed: {', '.join(r['vm'] for r in failed)}" if failed else "")))
        if failed:
            click.get_current_context().exit(EXIT_SOME_FAILED)
        return
    if not qmp_path:
        raise InvalidArgument("give --qmp SOCKET (or --all --qmp-dir DIR)")
    progress = Progress(enabled=None if not ctx.json else False)
    with _terminate_as_interrupt(cancel), ctx.open_repo() as repo:
        try:
            res = backup_vm(repo, qmp_path, vm_name, opts, progress=progress, cancel=cancel)
        finally:
            progress.done()
    summary = res.summary()
    ctx.emit({"message_type": "summary", **summary}, lambda: click.echo(_human_result(summary)))


@vm_group.command("list")
@common_options
@click.option("--vm", "vm_name", help="Only this VM.")
def vm_list(ctx: Ctx, vm_name: str | None) -> None:
    """List image restore points by VM, oldest first, with their consistency and backup mode."""
    with ctx.open_repo() as repo:
        snaps = [s for s in repo.snapshots() if s.kind == "image" and (vm_name is None or s.vm == vm_name)]
    by_vm: dict[str, list[dict[str, Any]]] = {}
    for s in snaps:
        cbt = s.meta.get("cbt") or {}
        d = s.summary()
        d.update({"mode": s.meta.get("mode", "full"), "generation": cbt.get("generation"),
                  "read_bytes": s.stats.get("read_bytes"), "source": s.meta.get("source")})
        by_vm.setdefault(s.vm or "?", []).append(d)

    def human() -> None:
        for vm, rows in sorted(by_vm.items()):
            click.echo(f"{vm}:")
            for d in rows:
                disks = ", ".join(f"{x['name']} {human_bytes(x['size'])}" for x in d["disks"])
                gen = f"gen {d['generation']}" if d["generation"] is not None else "no CBT"
                click.echo(f"  {d['short_id']}  {d['time'][:19].replace('T', ' ')}  {d['mode']:<11}  "
                           f"{(d['consistency'] or '?'):<11}  {gen:<7}  {disks}")
        click.echo(f"{len(snaps)} image restore points of {len(by_vm)} VMs")

    ctx.emit(by_vm, human)
