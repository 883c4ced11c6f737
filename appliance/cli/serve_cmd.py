"""`ihb serve`: the appliance daemon (HTTPS API for network agents)."""

from __future__ import annotations

import click

from appliance.server.settings import load_settings, parse_listen
from repo.repository import Repository

from . import cli
from .backup_cmd import ensure_default_repo
from .common import Ctx, common_options


@cli.command()
@common_options
@click.option("--listen", default=None, metavar="ADDR:PORT",
              help="Address to listen on (default: [server] listen, or 127.0.0.1:8443).")
@click.option("--state-dir", default=None, type=click.Path(file_okay=False),
              help="Tokens, sessions and the generated certificate (default: [server] state_dir).")
def serve(ctx: Ctx, listen: str | None, state_dir: str | None) -> None:
    """Run the appliance: agents back up to it and restore from it over HTTPS.

    At start it prints its URL and the SHA-256 fingerprint of its certificate (generated on first
    start unless [server] tls_cert/tls_key are set); give that fingerprint to agents (--fingerprint).
    """
    settings = load_settings(ctx.cfg.server, ctx.cfg.path or "config")
    if listen:
        settings.listen_host, settings.listen_port = parse_listen(listen)
    if state_dir:
        settings.state_dir = state_dir
    settings.config = ctx.cfg
    ensure_default_repo(ctx)
    passphrase = ctx.passphrase()  # asked once, before the daemon starts

    def open_repo() -> Repository:
        return Repository.open(ctx.repo_path, lambda: passphrase, cache_dir=ctx.cfg.cache_dir)

    import trio  # imported here: every `ihb` invocation imports this module

    from appliance.server.daemon import serve as run_daemon

    trio.run(run_daemon, settings, open_repo)
