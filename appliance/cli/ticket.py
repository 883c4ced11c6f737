"""The ``--ticket`` option and the authorization gate shared by every restore command (see
appliance/restore_requests.py): no policy, nothing changes; a tenant that requires authorized restores,
no run without a valid ticket."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any, TypeVar

import click

from appliance.audit import actor_name
from appliance.restore_requests import Authorization, authorize

from .common import Ctx

F = TypeVar("F", bound=Callable[..., Any])

TICKET_ENV = "IHB_RESTORE_TICKET"


def ticket_option(fn: F) -> F:
    return click.option("--ticket", default=None, envvar=TICKET_ENV, metavar="SECRET",
                        help="Restore ticket of an approved restore request (`ihb restore-request`); needed "
                             f"when the tenant's policy requires authorized restores (or ${TICKET_ENV}).")(fn)


def gate(ctx: Ctx, snap: Any, *, kind: str | Collection[str], paths: list[str], target: str,
         ticket: str | None) -> Authorization:
    return authorize(ctx.cfg, snap, kind=kind, paths=paths, target=target, ticket=ticket, by=actor_name())
