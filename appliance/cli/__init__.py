"""The `ihb` command line: one click group, one module per command family.

All errors derived from IhbError end here as one line on stderr and their exit code; tracebacks
only with --debug (or IHB_DEBUG=1).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

import click

from repo.errors import IhbError

# Command name -> the module that defines it, so that `ihb backup` imports only backup_cmd (not the
# server, FUSE or S3 code: a second of start-up on a busy appliance). A table, not a scan of the modules'
# sources at every start (that cost 20 ms per command); tests/arch/test_layers.py checks it against
# the commands the modules really define.
COMMANDS: dict[str, str] = {
    "agent": "agent_cmd", "audit": "audit_cmd", "backup": "backup_cmd",
    "catalog": "catalog_cmd", "find": "catalog_cmd", "versions": "catalog_cmd",
    "backup-image": "image_cmd", "instant-recover": "instant_cmd", "verify-boot": "instant_cmd",
    "mount": "mount_cmd", "umount": "mount_cmd", "nbd-export": "nbd_cmd", "notify": "notify_cmd",
    "approvals": "prune_cmd", "approve": "prune_cmd", "delete-tenant": "prune_cmd", "gc": "prune_cmd",
    "lock": "prune_cmd", "locks": "prune_cmd", "prune": "prune_cmd", "unlock": "prune_cmd",
    "check": "repo_cmds", "info": "repo_cmds", "init": "repo_cmds", "key": "repo_cmds",
    "alerts": "report_cmd", "jobs": "report_cmd", "report": "report_cmd",
    "restore": "restore_cmd", "restore-disk": "restore_disk_cmd", "restore-file": "restore_file_cmd",
    "restore-request": "restore_request_cmd", "serve": "serve_cmd", "sla": "sla_cmd",
    "cat": "snapshot_cmds", "diff": "snapshot_cmds", "ls": "snapshot_cmds", "snapshots": "snapshot_cmds",
    "sync": "sync_cmd", "token": "token_cmd", "vm": "vm_cmd",
}


def _command_modules() -> dict[str, str]:
    return {name: f"{__name__}.{stem}" for name, stem in COMMANDS.items()}


class IhbGroup(click.Group):
    _lazy: dict[str, str] | None = None

    def _modules(self) -> dict[str, str]:
        if self._lazy is None:
            self._lazy = _command_modules()
        return self._lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self._modules()))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        cmd = super().get_command(ctx, name)
        if cmd is None and name in self._modules():
            import importlib

            importlib.import_module(self._modules()[name])
            cmd = super().get_command(ctx, name)
        return cmd

    def invoke(self, ctx: click.Context) -> Any:
        debug = os.environ.get("IHB_DEBUG") == "1" or "--debug" in sys.argv
        try:
            return super().invoke(ctx)
        except IhbError as e:
            if debug:
                raise
            if "--json" in sys.argv:
                click.echo(json.dumps({"message_type": "exit_error", "code": e.exit_code, "message": str(e)}))
            click.echo(f"ihb: error: {e}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("ihb: interrupted", err=True)
            ctx.exit(130)
        except OSError as e:
            if debug:
                raise
            where = f" ({e.filename})" if e.filename else ""
            click.echo(f"ihb: error: {e.strerror or e}{where}", err=True)
            ctx.exit(74)


@click.group(cls=IhbGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.option("-v", "--verbose", count=True, help="More log output.")
@click.version_option(package_name="interhost-backup")
def cli(debug: bool, verbose: int) -> None:
    """ihb — the interhost backup appliance: deduplicated, encrypted restore points of servers and VMs."""
    level = logging.DEBUG if debug else (logging.INFO if verbose else logging.WARNING)
    logging.basicConfig(level=level, format="ihb: %(levelname)s: %(message)s" if not debug else None)


def load_all_commands() -> None:
    """Import every command module beside this file (for docs and tests; the CLI loads them on demand)."""
    import importlib
    import pathlib

    for path in sorted(pathlib.Path(__file__).parent.glob("*_cmd*.py")):
        if path.stem.endswith(("_cmd", "_cmds")):
            importlib.import_module(f"{__name__}.{path.stem}")


def main() -> None:
    cli(prog_name="ihb")


if __name__ == "__main__":
    main()
