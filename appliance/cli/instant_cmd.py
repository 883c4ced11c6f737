"""`ihb instant-recover` (boot a VM straight from a restore point, migrate it live to production
storage) and `ihb verify-boot` (prove a restore point still boots)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any

import click

from appliance.config import data_dir
from appliance.hypervisor import instant
from appliance.hypervisor.qmp import GuestAgent
from appliance.sla import record_verification
from repo.errors import IhbError, InvalidArgument
from repo.notes import add_note, notes
from repo.repository import default_cache_root
from repo.snapshot import Snapshot

from . import cli
from .common import Ctx, common_options
from .restore_disk_cmd import find_image_snapshot
from .ticket import TICKET_ENV, gate, ticket_option


class _StartByDefault(click.Group):
    """`ihb instant-recover VM@SNAP` means `ihb instant-recover start VM@SNAP`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["start", *args]
        return super().parse_args(ctx, args)


def _mount_snapshot(ctx: Ctx, snap: Snapshot, mnt: str) -> None:
    """Mount the one restore point at ``mnt`` in a separate daemon (`ihb mount --snapshot`)."""
    os.makedirs(mnt, exist_ok=True)
    if os.path.ismount(mnt):
        return
    env = dict(os.environ)
    env["IHB_REPO"] = ctx.repo_path if "://" in ctx.repo_path else os.path.abspath(ctx.repo_path)
    env["IHB_CACHE_DIR"] = os.path.abspath(ctx.cfg.cache_dir or default_cache_root())
    pw = ctx.passphrase()
    if pw is not None:
        env["IHB_PASSPHRASE"] = pw.decode()
    p = subprocess.run([sys.executable, "-m", "appliance.cli", "mount", "--snapshot", snap.id, mnt],
                       env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise instant.RecoveryError(f"cannot mount restore point {snap.short_id}: {p.stderr.strip()}")


def _umount(mnt: str) -> None:
    if os.path.ismount(mnt):
        subprocess.run(["fusermount3", "-u", mnt], capture_output=True)


def _workdir(snap: Snapshot, workdir: str | None) -> str:
    return os.path.abspath(workdir or os.path.join(data_dir(), "instant", f"{snap.vm}-{snap.short_id}"))


@cli.group("instant-recover", cls=_StartByDefault)
def instant_recover() -> None:
    """Boot a VM straight from an image restore point; move it live to production storage.

    \b
    ihb instant-recover VM@SNAPSHOT [--migrate-to DIR]   start (same as `start`)
    ihb instant-recover migrate --workdir W --to DIR     copy the running VM's disks, then pivot
    ihb instant-recover status|stop --workdir W
    """


@instant_recover.command("start")
@common_options
@click.argument("ref")
@click.option("--workdir", type=click.Path(file_okay=False), help="Overlays and state (default: under /var/lib/ihb/instant).")
@click.option("--no-network", is_flag=True, help="Start the VM without a network card.")
@click.option("--memory", type=int, help="MiB of memory (default: as recorded with the restore point).")
@click.option("--cpus", type=int, help="CPUs (default: as recorded).")
@click.option("--wait-serial", metavar="REGEX", help="Also wait for this on the serial console.")
@click.option("--wait-agent", is_flag=True, help="Also wait until the guest agent answers.")
@click.option("--timeout", default=300.0, show_default=True, help="Seconds to wait for the guest.")
@click.option("--migrate-to", type=click.Path(file_okay=False), help="Then migrate the disks live to this directory.")
@ticket_option
def start_cmd(ctx: Ctx, ref: str, workdir: str | None, no_network: bool, memory: int | None, cpus: int | None,
              wait_serial: str | None, wait_agent: bool, timeout: float, migrate_to: str | None,
              ticket: str | None) -> None:
    """Boot REF (VM@SNAPSHOT or VM@latest) from the backup; writes go to overlays, never to the backup."""
    t0 = time.monotonic()
    with ctx.open_repo() as repo:
        snap = find_image_snapshot(repo, ref)
    auth = gate(ctx, snap, kind="instant", paths=[], target=migrate_to or "", ticket=ticket)
    if ticket:
        os.environ[TICKET_ENV] = ticket  # the mount below (`ihb mount --snapshot`) checks it too
    wd = _workdir(snap, workdir)
    mnt = os.path.join(wd, "mnt")
    _mount_snapshot(ctx, snap, mnt)
    try:
        s = instant.start(snap, wd, mnt, lambda disk: os.path.join(mnt, f"{disk}.raw"), network=not no_network,
                          memory_mb=memory, cpus=cpus, wait_serial=wait_serial, wait_agent=wait_agent,
                          timeout=timeout, t0=t0)
    except BaseException as e:
        _umount(mnt)
        auth.done(f"failed: {e}")
        raise
    if migrate_to:
        s = instant.migrate(s, migrate_to)
    auth.done("running" + (f", migrated to {migrate_to}" if migrate_to else ""))
    ctx.emit(instant.session_summary(s), lambda: click.echo(
        f"{s.vm} is running from restore point {snap.short_id}: QEMU up {s.timings['running']:.2f} s after the "
        f"command" + "".join(f", {k} {v:.2f} s" for k, v in s.timings.items() if k not in ("running", "overlays"))
        + f"\n  workdir {wd}; overlays keep the guest's writes"
        + (f"\n  migrated to {', '.join(s.migrated_to.values())}" if s.migrated_to else
           f"\n  migrate with: ihb instant-recover migrate --workdir {wd} --to DIR")))


@instant_recover.command("migrate")
@click.option("--workdir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--to", "target", required=True, type=click.Path(file_okay=False), help="Production storage directory.")
@click.option("--json", "json_out", is_flag=True)
def migrate_cmd(workdir: str, target: str, json_out: bool) -> None:
    """Copy the running VM's disks to TARGET while it runs (block mirror), then pivot to them."""
    s = instant.Session.load(workdir)
    t0 = time.monotonic()
    s = instant.migrate(s, os.path.abspath(target))
    _umount(s.mountpoint)  # the VM no longer reads from the backup
    out = {**instant.session_summary(s), "seconds": round(time.monotonic() - t0, 2)}
    if json_out:
        import json

        click.echo(json.dumps(out, indent=1))
    else:
        click.echo(f"{s.vm} now runs from {', '.join(s.migrated_to.values())} ({out['seconds']} s); "
                   "it no longer needs the appliance")


@instant_recover.command("status")
@click.option("--workdir", required=True, type=click.Path(exists=True, file_okay=False))
def status_cmd(workdir: str) -> None:
    """Show a recovery's state (running, migrating, migrated, stopped)."""
    import json

    click.echo(json.dumps(instant.session_summary(instant.Session.load(workdir)), indent=1))


@instant_recover.command("stop")
@click.option("--workdir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--discard", is_flag=True, help="Also delete the overlays (the guest's writes).")
def stop_cmd(workdir: str, discard: bool) -> None:
    """Stop the recovered VM and unmount; the overlays stay unless --discard."""
    s = instant.Session.load(workdir)
    instant.stop(s)
    _umount(s.mountpoint)
    if discard:
        for ov in s.overlays.values():
            if os.path.exists(ov):
                os.unlink(ov)
    click.echo(f"{s.vm} stopped")


SIGN_OF_LIFE = r"(login:|IHBGUEST: (MARKER|READY|OVERLAY)|Reached target|Welcome to)"


@cli.command("verify-boot")
@common_options
@click.argument("ref")
@click.option("--expect", default=SIGN_OF_LIFE, show_default=True, metavar="REGEX",
              help="A line on the serial console that proves the guest came up.")
@click.option("--timeout", default=300.0, show_default=True, help="Seconds to wait for a sign of life.")
@ticket_option
def verify_boot(ctx: Ctx, ref: str, expect: str, timeout: float, ticket: str | None) -> None:
    """Boot REF in an isolated VM (no network, throwaway overlay), wait for a sign of life (guest agent or
    a serial line), record the result with the restore point, shut it down. Exit 0 if it booted, 47 if not."""
    t0 = time.monotonic()
    with ctx.open_repo() as repo:
        snap = find_image_snapshot(repo, ref)
    # Refused up front (71) rather than recorded as "does not boot" when the tenant needs a ticket.
    gate(ctx, snap, kind=("instant", "mount"), paths=[], target="", ticket=ticket).done("verify-boot")
    if ticket:
        os.environ[TICKET_ENV] = ticket
    try:
        rx = re.compile(expect)
    except re.error as e:
        raise InvalidArgument(f"--expect is not a valid regular expression: {e}") from None
    result: dict[str, Any] = {"snapshot": snap.id, "vm": snap.vm, "ok": False}
    with tempfile.TemporaryDirectory(prefix="ihb-verify-") as wd:
        mnt = os.path.join(wd, "mnt")
        _mount_snapshot(ctx, snap, mnt)
        s = None
        try:
            s = instant.start(snap, wd, mnt, lambda d: os.path.join(mnt, f"{d}.raw"), network=False, t0=t0)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    with open(s.serial, errors="replace") as f:
                        m = rx.search(f.read())
                    if m:
                        result.update(ok=True, evidence=f"serial: {m.group(0)}")
                        break
                except FileNotFoundError:
                    pass
                try:
                    with GuestAgent(s.qga).connect(timeout=0.5) as ga:
                        ga.ping(timeout=1.0)
                    result.update(ok=True, evidence="guest agent answered")
                    break
                except (OSError, TimeoutError, IhbError, Exception):  # noqa: BLE001 - any failure = not yet
                    pass
                if s.qemu_pid() is None:
                    result["evidence"] = "the VM stopped before showing a sign of life"
                    break
                time.sleep(0.5)
            else:
                result["evidence"] = f"no sign of life within {timeout:.0f} s"
            try:
                with open(s.serial, errors="replace") as f:
                    result["console_tail"] = f.read()[-2000:]
            except FileNotFoundError:
                pass
        except instant.RecoveryError as e:
            result["evidence"] = str(e)
        finally:
            if s is not None:
                instant.stop(s)
            _umount(mnt)
    result["seconds"] = round(time.monotonic() - t0, 2)
    with ctx.open_repo() as repo:
        add_note(repo, snap.id, "verify_boot", {k: v for k, v in result.items() if k != "console_tail"})
        history = notes(repo, snap.id, "verify_boot")
    result["verifications"] = len(history)
    record_verification(ctx.cfg, "verify-boot", bool(result["ok"]), host=snap.vm or snap.host, snapshot=snap.id,
                        detail=str(result.get("evidence", "")), seconds=result["seconds"])
    ctx.emit(result, lambda: click.echo(
        f"{snap.vm}@{snap.short_id} {'BOOTS' if result['ok'] else 'DOES NOT BOOT'} ({result.get('evidence')}, "
        f"{result['seconds']} s); recorded with the restore point"))
    if not result["ok"]:
        sys.exit(47)
