"""What every command shares: repository selection, passphrase, --json output, progress, errors."""

from __future__ import annotations

import functools
import getpass
import json
import os
import re
import socket
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import click

from appliance.config import Config, load_config
from repo.errors import IhbError, InvalidArgument, PassphraseRequired
from repo.repository import Repository

F = TypeVar("F", bound=Callable[..., Any])


def read_passphrase_file(path: str) -> bytes:
    """A passphrase file's content without its line end; a clear error if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read().rstrip(b"\r\n")
    except OSError as e:
        raise InvalidArgument(f"passphrase file {path} cannot be read: {e.strerror}") from None


class Ctx:
    """Per-invocation state built from the common options."""

    def __init__(self, repo: str | None, passphrase_file: str | None, json_out: bool, config: str | None) -> None:
        self.cfg: Config = load_config(config)
        if self.cfg.raw.get("s3"):
            from repo import storage_s3

            storage_s3.configure(self.cfg.raw.get("s3"))
        self.repo_path = repo or os.environ.get("IHB_REPO") or self.cfg.repo
        self.passphrase_file = passphrase_file
        self.json = json_out

    @property
    def is_default_repo(self) -> bool:
        return self.repo_path == self.cfg.repo and not os.environ.get("IHB_REPO")

    def passphrase(self) -> bytes | None:
        pf = self.passphrase_file or os.environ.get("IHB_PASSPHRASE_FILE") or self.cfg.passphrase_file
        if pf:
            return read_passphrase_file(pf)
        env = os.environ.get("IHB_PASSPHRASE")
        if env is not None:
            return env.encode()
        if self.is_default_repo and os.path.exists(self.cfg.default_passphrase_file):
            return read_passphrase_file(self.cfg.default_passphrase_file)
        if sys.stdin.isatty():
            return getpass.getpass(f"Passphrase for {self.repo_path}: ").encode()
        raise PassphraseRequired()

    def open_repo(self, exclusive: bool = False, lock_wait: float = 5.0) -> Repository:
        return Repository.open(
            self.repo_path, self.passphrase, exclusive=exclusive, cache_dir=self.cfg.cache_dir, lock_wait=lock_wait
        )

    def emit(self, obj: Any, human: Callable[[], None]) -> None:
        if self.json:
            click.echo(json.dumps(obj, indent=1, default=_json_default))
        else:
            human()


def _json_default(o: Any) -> Any:
    if isinstance(o, bytes):
        return o.decode("utf-8", "surrogateescape")
    raise TypeError(type(o))


TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # as tokens name tenants (server/state.py)


def _tenant(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not TENANT_NAME.match(value):
        raise InvalidArgument(f"--tenant {value!r}: use letters, digits, '.', '_' and '-' (at most 128)")
    return value


def tenant_option(fn: F) -> F:
    """``--tenant``: the tenant that owns the restore point, recorded in it (``meta.tenant``, as agent
    backups record theirs), so its dashboard, catalog, retention rules and restore policy apply."""
    return click.option("--tenant", default=None, callback=_tenant,
                        help="Tenant that owns this restore point (recorded in it).")(fn)


def common_options(fn: F) -> F:
    """--repo, --passphrase-file, --json and --config on every command that touches a repository."""

    @click.option("--repo", "-r", envvar="IHB_REPO", help="Repository path (default: $IHB_REPO or the config's).")
    @click.option("--passphrase-file", type=click.Path(dir_okay=False), help="Read the passphrase from this file.")
    @click.option("--json", "json_out", is_flag=True, help="Machine-readable JSON output.")
    @click.option("--config", "config", type=click.Path(dir_okay=False), help="Config file (TOML).")
    @functools.wraps(fn)
    def wrapper(repo: str | None, passphrase_file: str | None, json_out: bool, config: str | None, **kw: Any) -> Any:
        return fn(Ctx(repo, passphrase_file, json_out, config), **kw)

    return wrapper  # type: ignore[return-value]


def default_host() -> str:
    return socket.gethostname()


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class Progress:
    """One self-overwriting status line on stderr, only when stderr is a terminal."""

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.t0 = time.monotonic()
        self._shown = False

    def __call__(self, stats: dict[str, Any], path: str) -> None:
        if not self.enabled:
            return
        dt = max(time.monotonic() - self.t0, 1e-6)
        done = stats.get("bytes", 0)
        line = (
            f"{stats.get('files', 0)} files, {human_bytes(done)} ({human_bytes(done / dt)}/s), "
            f"new {human_bytes(stats.get('new_bytes', 0))}  {path[-50:]}"
        )
        sys.stderr.write("\r\x1b[K" + line[:200])
        sys.stderr.flush()
        self._shown = True

    def done(self) -> None:
        if self._shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def fail(msg: str, code: int = 3) -> IhbError:
    e = IhbError(msg)
    e.exit_code = code
    return e
