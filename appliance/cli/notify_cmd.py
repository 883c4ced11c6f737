"""`ihb notify test|log`: check the [notify] channels (SMTP, webhooks) and read what was delivered."""

from __future__ import annotations

import time

import click

from appliance import jobs as J
from appliance import notify as N
from repo.errors import InvalidArgument

from . import cli
from .common import Ctx, common_options
from .when import iso


@cli.group("notify")
def notify_group() -> None:
    """Notifications on failed jobs and missed RPO ([notify] in the config: smtp, webhooks)."""


@notify_group.command("test")
@common_options
@click.option("--message", default="This is a test notification from ihb.", show_default=True)
def notify_test(ctx: Ctx, message: str) -> None:
    """Send a test message to every configured channel. Exit 0 if all delivered, 1 if any failed."""
    d = J.state_dir(ctx.cfg)
    notifier = N.Notifier.from_config(ctx.cfg.raw, d)
    if notifier is None:
        raise InvalidArgument("no notification channel is configured ([notify.smtp] or [[notify.webhooks]])")
    res = notifier.send(N.Event("test", "notify-test", message, time.time_ns()))
    ctx.emit([vars(r) for r in res], lambda: [
        click.echo(f"{r.channel:8} {r.target}: {r.status}" + (f" after {r.attempts} attempts: {r.error}"
                                                               if r.status != "sent" else "")) for r in res])
    if any(r.status != "sent" for r in res):
        raise SystemExit(1)


@notify_group.command("log")
@common_options
@click.option("--failed", is_flag=True, help="Only notifications that could not be delivered.")
def notify_log(ctx: Ctx, failed: bool) -> None:
    """Every notification delivered (or not), newest last."""
    rows = [r for r in N.read_log(J.state_dir(ctx.cfg)) if not failed or r.get("status") != "sent"]
    ctx.emit(rows, lambda: [
        click.echo(f"{iso(r['time_ns'])}  {r['event']:10} {r['job'][:20]:20} {r['channel']:8} {r['status']:6} "
                   f"{r['target']}" + (f"  ({r['error']})" if r.get("error") else "")) for r in rows]
        or click.echo("no notifications sent yet"))
