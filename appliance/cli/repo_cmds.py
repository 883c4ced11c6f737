"""Repository commands: `init`, `info`, `check`, `key export|import|forget`."""

from __future__ import annotations

import os
import sys

import click

from appliance.sla import record_verification
from repo import format as fmt
from repo.check import check_repository, repository_info
from repo.crypto import ENCRYPTIONS, KeyMaterial
from repo.errors import IntegrityError, InvalidArgument
from repo.repository import Repository

from . import cli
from .common import Ctx, common_options, human_bytes


@cli.command()
@common_options
@click.option("--encryption", type=click.Choice(ENCRYPTIONS), default="aes-256-gcm", show_default=True,
              help="'none' is for tests only.")
@click.option("--compression", type=click.IntRange(0, 22), default=3, show_default=True, help="zstd level, 0 = off.")
@click.option("--pack-size", type=click.IntRange(64 * 1024, 1 << 30), default=fmt.DEFAULT_PACK_SIZE, show_default=True,
              help="Target pack file size in bytes.")
@click.option("--image-chunk-size", type=int, default=fmt.DEFAULT_IMAGE_CHUNK, show_default=True,
              help="Fixed chunk size for disk images (power of two).")
def init(ctx: Ctx, encryption: str, compression: int, pack_size: int, image_chunk_size: int) -> None:
    """Create a new repository."""
    pw = None
    if encryption != "none":
        pw = ctx.passphrase()
        if not pw:
            raise InvalidArgument("an empty passphrase is not allowed; set IHB_PASSPHRASE or --passphrase-file")
    Repository.init(ctx.repo_path, pw, encryption=encryption, compression_level=compression, pack_size=pack_size,
                    image_chunk_size=image_chunk_size)
    ctx.emit({"message_type": "initialized", "repo": ctx.repo_path, "encryption": encryption},
             lambda: click.echo(f"created repository at {ctx.repo_path} ({encryption}); "
                                "keep a copy of the key: `ihb key export`"))


@cli.command()
@common_options
def info(ctx: Ctx) -> None:
    """Sizes, deduplication and compression ratios."""
    with ctx.open_repo() as repo:
        d = repository_info(repo)

    def human() -> None:
        click.echo(f"repository   {d['location']} (format {d['format_version']}, {d['encryption']}, zstd {d['compression_level']})")
        click.echo(f"restore pts  {d['snapshots']} ({len(d['hosts'])} hosts, {len(d['vms'])} VMs)")
        click.echo(f"original     {human_bytes(d['original_bytes'])}")
        click.echo(f"unique       {human_bytes(d['unique_bytes'])}  (dedup ratio {d['dedup_ratio']})")
        click.echo(f"stored       {human_bytes(d['pack_bytes'])} in {d['packs']} packs, {d['chunks']} chunks "
                   f"(compression ratio {d['compression_ratio']})")

    ctx.emit(d, human)


@cli.command()
@common_options
@click.option("--read-data", is_flag=True, help="Read and authenticate every stored blob.")
@click.option("--repair", is_flag=True, help="Rebuild the index from the packs; drop damaged chunks from it.")
def check(ctx: Ctx, read_data: bool, repair: bool) -> None:
    """Verify the repository. Exit 0 when clean, 90 when damage was found."""
    with ctx.open_repo(exclusive=repair) as repo:
        report = check_repository(repo, read_data=read_data, repair=repair)
    record_verification(ctx.cfg, "check --read-data" if read_data else "check", report.ok,
                        detail=f"{report.stats['snapshots']} restore points, {len(report.errors)} errors, "
                               f"{len(report.damaged_chunks)} damaged chunks")

    def human() -> None:
        s = report.stats
        click.echo(f"checked {s['packs']} packs, {s['snapshots']} restore points, {s['chunks']} references"
                   + (f", {s['blobs_read']} blobs read" if read_data else ""))
        for r in report.repaired:
            click.echo(f"repaired: {r}")
        for e in report.errors:
            click.echo(f"error: {e}")
        for c in report.damaged_chunks:
            click.echo(f"damaged chunk {c}")
        for a in report.affected:
            click.echo(f"  affects restore point {a['snapshot']}: {a['path']} (chunk {a['chunk'][:16]})")
        click.echo("no problems found" if report.ok else "PROBLEMS FOUND")

    ctx.emit(report.to_obj(), human)
    if not report.ok:
        sys.exit(IntegrityError.exit_code)


@cli.group()
def key() -> None:
    """Export or import the repository key (keep a copy somewhere safe); forget cached unlocked keys."""


@key.command("export")
@common_options
@click.argument("output", required=False, type=click.Path(dir_okay=False))
def key_export(ctx: Ctx, output: str | None) -> None:
    """Write the passphrase-protected key file to OUTPUT (or stdout)."""
    storage = Repository.storage_for(ctx.repo_path)
    storage.check_exists()
    data = storage.get(fmt.KEY_NAME)
    if output:
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        click.echo(f"key written to {output}", err=True)
    else:
        sys.stdout.buffer.write(data)


@key.command("import")
@common_options
@click.argument("input_file", type=click.Path(exists=True, dir_okay=False))
def key_import(ctx: Ctx, input_file: str) -> None:
    """Replace the repository's key file with INPUT_FILE after checking that it unlocks this repository."""
    storage = Repository.storage_for(ctx.repo_path)
    storage.check_exists()
    with open(input_file, "rb") as f:
        data = f.read()
    from repo.repository import RepoConfig

    config = RepoConfig.from_json(storage.get(fmt.CONFIG_NAME), ctx.repo_path)
    km = KeyMaterial.unwrap(data, None if b'"kdf": "none"' in data else ctx.passphrase())
    Repository._verify_key(km, config)
    storage.replace_bytes(fmt.KEY_NAME, data)
    click.echo("key imported", err=True)


@key.command("forget")
@common_options
def key_forget(ctx: Ctx) -> None:
    """Drop every unlocked repository key this user has cached in the kernel keyring.

    After a successful unlock a key is kept there (IHB_KEY_CACHE_SECONDS after its last use, default
    3600; 0 disables) so that later commands skip the slow passphrase check; the next command after
    this one asks for the passphrase's full work again."""
    from repo import keycache

    n = keycache.forget_all()
    ctx.emit({"message_type": "keys_forgotten", "count": n}, lambda: click.echo(f"forgot {n} cached key(s)"))
