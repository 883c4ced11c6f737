"""Finding files across restore points: `find`, `versions`, `catalog rebuild|stats`."""

from __future__ import annotations

import click

from repo import catalog as cat
from repo.errors import InvalidArgument

from . import cli
from .common import Ctx, common_options, human_bytes
from .when import iso, ns, parse_when


@cli.command()
@common_options
@click.argument("pattern")
@click.option("--host", default=None, help="Only this host (or VM).")
@click.option("--since", default=None, help="Only restore points taken since DATE (2026-11-01, or 7d for 7 days ago).")
@click.option("--tenant", default=None, help="Only this tenant's restore points.")
@click.option("--limit", type=click.IntRange(1, 10**7), default=1000, show_default=True, help="Stop after this many.")
@click.option("-i", "--ignore-case", is_flag=True, help="Match names regardless of case.")
@click.option("--all", "show_all", is_flag=True, help="List every restore point of every match, not the newest.")
def find(ctx: Ctx, pattern: str, host: str | None, since: str | None, tenant: str | None, limit: int,
         ignore_case: bool, show_all: bool) -> None:
    """Find files by name glob (nginx.conf, '*.conf') or path ('/etc/nginx/', '/etc/*/nginx.conf').

    One line per file state (size, mtime) with the restore points holding it; answered from the
    catalog, without reading the repository.
    """
    since_ns = ns(parse_when(since)) if since else None
    with ctx.open_repo() as repo:
        r = cat.find(repo, pattern, host=host, since_ns=since_ns, tenant=tenant, limit=limit, ignore_case=ignore_case)

    def human() -> None:
        for v in r.hits:
            sid, t = v.last
            where = f"{len(v.snapshots)} restore points, newest {sid[:8]} {iso(t)}"
            if len(v.snapshots) == 1:
                where = f"restore point {sid[:8]} {iso(t)}"
            click.echo(f"{v.host}:{v.path}  {v.type} {human_bytes(v.size):>10}  mtime {iso(v.mtime_ns)}  ({where})")
            if show_all:
                for s, ts in v.snapshots:
                    click.echo(f"    {s[:8]}  {iso(ts)}")
        if r.truncated:
            click.echo(f"... more matches; raise --limit (now {limit}) or narrow the pattern", err=True)
        if r.uncatalogued:
            click.echo(f"note: {r.uncatalogued} restore points are not in the catalog yet; run `ihb catalog rebuild`",
                       err=True)
        if not r.hits:
            click.echo("no matches", err=True)

    ctx.emit({"matches": [v.to_obj() for v in r.hits], "truncated": r.truncated, "uncatalogued": r.uncatalogued},
             human)


@cli.command()
@common_options
@click.argument("target", metavar="HOST:PATH")
@click.option("--tenant", default=None, help="Only this tenant's restore points.")
def versions(ctx: Ctx, target: str, tenant: str | None) -> None:
    """List the versions of one file across restore points, one line per change."""
    host, sep, path = target.partition(":")
    if not sep or not host or not path:
        raise InvalidArgument("give HOST:PATH, e.g. web1:/etc/nginx/nginx.conf")
    with ctx.open_repo() as repo:
        vs = cat.versions(repo, host, path, tenant)

    def human() -> None:
        if not vs:
            click.echo(f"{path} is in no catalogued restore point of {host}", err=True)
        for v in vs:
            (fs, ft), (ls, lt) = v.first, v.last
            span = f"{fs[:8]} {iso(ft)}" + (f" .. {ls[:8]} {iso(lt)} ({len(v.snapshots)} restore points)"
                                            if len(v.snapshots) > 1 else "")
            digest = v.digest.hex()[:12] if v.digest else "-"
            click.echo(f"{human_bytes(v.size):>10}  mtime {iso(v.mtime_ns)}  content {digest}  in {span}")

    ctx.emit([v.to_obj() for v in vs], human)


@cli.group("catalog")
def catalog_group() -> None:
    """Maintain the file catalog behind `ihb find` and `ihb versions`."""


@catalog_group.command("rebuild")
@common_options
@click.option("--clear", is_flag=True, help="Start from an empty catalog (also drops rows of deleted restore points).")
def catalog_rebuild(ctx: Ctx, clear: bool) -> None:
    """Catalogue every restore point that is not in the catalog yet."""
    with ctx.open_repo() as repo:
        res = cat.rebuild(repo, clear=clear)
    ctx.emit(res, lambda: click.echo(f"catalogued {res['indexed']} restore points ({res['entries']} entries); "
                                     f"forgot {res['forgotten']} deleted ones"))


@catalog_group.command("stats")
@common_options
def catalog_stats(ctx: Ctx) -> None:
    """Sizes of the catalog."""
    with ctx.open_repo() as repo:
        st = cat.Catalog(repo.index).stats()
        st["uncatalogued"] = cat.uncatalogued(repo)
    ctx.emit(st, lambda: click.echo(", ".join(f"{k} {v}" for k, v in st.items())))
