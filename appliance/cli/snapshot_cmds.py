"""Looking at restore points: `snapshots`, `ls`, `cat`, `diff`."""

from __future__ import annotations

import stat
import sys
from typing import Any

import click

from repo.diff import diff_trees
from repo.errors import InvalidArgument
from repo.reader import iter_content
from repo.tree import TYPE_DIR, TreeReader, root_node

from . import cli
from .common import Ctx, common_options, human_bytes
from .ticket import gate, ticket_option


@cli.command()
@common_options
@click.option("--host", default=None, help="Only this host (or VM).")
@click.option("--tag", default=None, help="Only restore points with this tag.")
def snapshots(ctx: Ctx, host: str | None, tag: str | None) -> None:
    """List restore points, file-level and image-level."""
    with ctx.open_repo() as repo:
        snaps = [s for s in repo.snapshots()
                 if (host is None or host in (s.host, s.vm)) and (tag is None or tag in s.tags)]

    def human() -> None:
        click.echo(f"{'ID':8}  {'TIME (UTC)':19}  {'KIND':5}  {'HOST/VM':20}  {'SIZE':>10}  PATHS/DISKS")
        for s in snaps:
            what = ", ".join(s.paths) if s.kind == "files" else ", ".join(f"{d.name} ({human_bytes(d.size)})" for d in s.disks)
            who = s.host if s.kind == "files" else f"{s.vm}"
            size = s.stats.get("bytes", 0)
            click.echo(f"{s.short_id:8}  {s.time.strftime('%Y-%m-%d %H:%M:%S')}  {s.kind:5}  {who:20}  "
                       f"{human_bytes(size):>10}  {what}{'  [' + ','.join(s.tags) + ']' if s.tags else ''}")
        click.echo(f"{len(snaps)} restore points")

    ctx.emit([s.summary() for s in snaps], human)


def _mode_str(node: dict[str, Any]) -> str:
    return stat.filemode(node["m"])


@cli.command()
@common_options
@click.argument("snapshot")
@click.argument("path", required=False, default="/")
@click.option("--recursive", "-R", is_flag=True, help="List the whole subtree.")
def ls(ctx: Ctx, snapshot: str, path: str, recursive: bool) -> None:
    """List PATH (a directory or file) inside restore point SNAPSHOT."""
    with ctx.open_repo() as repo:
        snap = repo.get_snapshot(snapshot)
        tree = TreeReader(repo)
        node = tree.resolve(root_node(snap.tree), path)
        base = path.rstrip("/") if path != "/" else ""
        rows = []
        if node.get("t") != TYPE_DIR:
            rows.append((path, node))
        elif recursive:
            for p, n in tree.walk(node):
                rows.append((base + "/" + p.decode("utf-8", "surrogateescape"), n))
        else:
            for n in tree.children(node):
                rows.append((base + "/" + n["n"].decode("utf-8", "surrogateescape"), n))

    def human() -> None:
        for p, n in rows:
            owner = f"{n.get('U', n['u'])}/{n.get('G', n['g'])}"
            extra = f" -> {n['l'].decode(errors='replace')}" if n.get("t") == "l" else ""
            import datetime as dt

            mt = dt.datetime.fromtimestamp(n["mt"] / 1e9, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
            click.echo(f"{_mode_str(n)} {owner:>15} {n.get('s', 0):>12} {mt} {p}{extra}")

    ctx.emit(
        [{"path": p, "type": n["t"], "mode": n["m"], "uid": n["u"], "gid": n["g"], "size": n.get("s", 0),
          "mtime_ns": n["mt"], "link": n.get("l")} for p, n in rows],
        human,
    )


@cli.command()
@common_options
@click.argument("snapshot")
@click.argument("path")
@ticket_option
def cat(ctx: Ctx, snapshot: str, path: str, ticket: str | None) -> None:
    """Write the content of file PATH in SNAPSHOT to standard output.

    A restore like any other: where the tenant requires authorized restores it needs a ticket for
    kind `files`, this path and target `-` (exit 71 without one)."""
    with ctx.open_repo() as repo:
        snap = repo.get_snapshot(snapshot)
        with gate(ctx, snap, kind="files", paths=[path], target="-", ticket=ticket) as auth:
            node = TreeReader(repo).resolve(root_node(snap.tree), path)
            if node.get("t") != "f":
                raise InvalidArgument(f"{path} is not a regular file in restore point {snap.short_id}")
            out = sys.stdout.buffer
            for data, ln in iter_content(repo, node.get("c", [])):
                out.write(data if data is not None else bytes(ln))
            out.flush()
            auth.done("ok", {"files": 1})


@cli.command()
@common_options
@click.argument("snap1")
@click.argument("snap2")
def diff(ctx: Ctx, snap1: str, snap2: str) -> None:
    """Show what changed between two restore points (+ added, - removed, M content, U metadata)."""
    with ctx.open_repo() as repo:
        a, b = repo.get_snapshot(snap1), repo.get_snapshot(snap2)
        changes = list(diff_trees(repo, a, b))

    def human() -> None:
        for ch, path in changes:
            click.echo(f"{ch} {path}")
        counts = {k: sum(1 for c, _ in changes if c == k) for k in "+-MU"}
        click.echo(f"{counts['+']} added, {counts['-']} removed, {counts['M']} modified, {counts['U']} metadata only")

    ctx.emit([{"change": c, "path": p} for c, p in changes], human)
