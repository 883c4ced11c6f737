"""Configuration: a TOML file with sane defaults, so that no file is needed at all.

Lookup order: --config, $IHB_CONFIG, /etc/ihb/config.toml (root) or ~/.config/ihb/config.toml.
$IHB_CONFIG_DIR and $IHB_DATA_DIR move the configuration and data directories (tests, containers).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from typing import Any

from repo.errors import InvalidArgument


def _is_root() -> bool:
    return os.geteuid() == 0


def config_dir() -> str:
    if os.environ.get("IHB_CONFIG_DIR"):
        return os.environ["IHB_CONFIG_DIR"]
    if _is_root():
        return "/etc/ihb"
    return os.path.join(os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config"), "ihb")


def data_dir() -> str:
    if os.environ.get("IHB_DATA_DIR"):
        return os.environ["IHB_DATA_DIR"]
    if _is_root():
        return "/var/lib/ihb"
    return os.path.join(os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"), "ihb")


@dataclass
class Config:
    repo: str = field(default_factory=lambda: os.path.join(data_dir(), "repo"))
    passphrase_file: str | None = None
    cache_dir: str | None = None
    compression: int = 3
    server: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    path: str | None = None

    @property
    def default_passphrase_file(self) -> str:
        return os.path.join(config_dir(), "repo.passphrase")


def load_config(path: str | None = None) -> Config:
    explicit = path or os.environ.get("IHB_CONFIG")
    candidate = explicit or os.path.join(config_dir(), "config.toml")
    if not os.path.exists(candidate):
        if explicit:
            raise InvalidArgument(f"config file {explicit} does not exist")
        return Config()
    try:
        with open(candidate, "rb") as f:
            doc = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise InvalidArgument(f"config file {candidate} cannot be read: {e}") from None
    cfg = Config(raw=doc, path=candidate)
    repo_sec = doc.get("repository", {})
    if not isinstance(repo_sec, dict):
        raise InvalidArgument(f"{candidate}: [repository] must be a table")
    if "path" in repo_sec:
        cfg.repo = str(repo_sec["path"])
    if "passphrase_file" in repo_sec:
        cfg.passphrase_file = str(repo_sec["passphrase_file"])
    if "cache_dir" in repo_sec:
        cfg.cache_dir = str(repo_sec["cache_dir"])
    if "compression" in repo_sec:
        cfg.compression = int(repo_sec["compression"])
    server = doc.get("server", {})
    if not isinstance(server, dict):
        raise InvalidArgument(f"{candidate}: [server] must be a table")
    cfg.server = server
    return cfg
