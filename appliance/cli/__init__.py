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


class IhbGroup(click.Group):
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


def _register() -> None:
    """Import every ``*_cmd.py``/``*_cmds.py`` module beside this one; each adds its commands to ``cli``."""
    import importlib
    import pkgutil

    for mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        if mod.endswith(("_cmd", "_cmds")):
            importlib.import_module(f"{__name__}.{mod}")


_register()


def main() -> None:
    cli(prog_name="ihb")


if __name__ == "__main__":
    main()
