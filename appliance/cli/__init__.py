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


def _command_modules() -> dict[str, str]:
    """Command name -> module, read from the ``@cli.command``/``@cli.group`` decorators of every
    ``*_cmd.py``/``*_cmds.py`` beside this file without importing them: ``ihb backup`` must not pay for
    importing the server, FUSE or S3 code (a second of start-up on a busy appliance)."""
    import ast
    import pathlib

    found: dict[str, str] = {}
    for path in sorted(pathlib.Path(__file__).parent.glob("*_cmd*.py")):
        if not path.stem.endswith(("_cmd", "_cmds")):
            continue
        for node in ast.parse(path.read_text()).body:
            if not isinstance(node, ast.FunctionDef):
                continue
            for dec in node.decorator_list:
                if (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute)
                        and isinstance(dec.func.value, ast.Name) and dec.func.value.id == "cli"
                        and dec.func.attr in ("command", "group")):
                    if dec.args and isinstance(dec.args[0], ast.Constant):
                        name = str(dec.args[0].value)
                    else:
                        name = node.name.lower().replace("_", "-")
                        for suffix in ("-command", "-cmd", "-group", "-grp"):
                            name = name.removesuffix(suffix)
                    found[name] = f"{__name__}.{path.stem}"
    return found


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
    """Import every command module (for docs and tests; the CLI itself loads them on demand)."""
    import importlib

    for mod in sorted(set(_command_modules().values())):
        importlib.import_module(mod)


def main() -> None:
    cli(prog_name="ihb")


if __name__ == "__main__":
    main()
