"""The agent's small config file (TOML), so cron lines stay short.

Lookup: --agent-config, $IHB_AGENT_CONFIG, /etc/ihb/agent.toml (root) or ~/.config/ihb/agent.toml.
Every key is optional and a command-line option overrides it::

    server = "https://backup.example:8443/"
    token_file = "/etc/ihb/agent.token"
    fingerprint = "sha256:..."          # or ca_file = "/etc/ihb/appliance-ca.pem"
    cache_dir = "/var/cache/ihb"
    bwlimit = "20M"
    retry_for = 300
    pre_hook = "systemctl start app-freeze"
    post_hook = "systemctl start app-thaw"
    paths = ["/etc", "/srv"]
    exclude = ["*.tmp"]
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from typing import Any

from appliance.config import config_dir
from repo.errors import InvalidArgument

_KEYS = {"server", "token_file", "fingerprint", "ca_file", "cache_dir", "bwlimit", "retry_for", "pre_hook",
         "post_hook", "paths", "exclude"}


@dataclass
class AgentConfig:
    server: str | None = None
    token_file: str | None = None
    fingerprint: str | None = None
    ca_file: str | None = None
    cache_dir: str | None = None
    bwlimit: str | None = None
    retry_for: float = 300.0
    pre_hook: str | None = None
    post_hook: str | None = None
    paths: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    path: str | None = None


def load_agent_config(path: str | None) -> AgentConfig:
    explicit = path or os.environ.get("IHB_AGENT_CONFIG")
    candidate = explicit or os.path.join(config_dir(), "agent.toml")
    if not os.path.exists(candidate):
        if explicit:
            raise InvalidArgument(f"agent config {explicit} does not exist")
        return AgentConfig()
    try:
        with open(candidate, "rb") as f:
            doc: dict[str, Any] = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise InvalidArgument(f"agent config {candidate} cannot be read: {e}") from None
    unknown = set(doc) - _KEYS
    if unknown:
        raise InvalidArgument(f"agent config {candidate}: unknown keys {', '.join(sorted(unknown))}")
    cfg = AgentConfig(path=candidate)
    for k, v in doc.items():
        if k in ("paths", "exclude"):
            if not isinstance(v, list):
                raise InvalidArgument(f"agent config {candidate}: {k} must be a list")
            setattr(cfg, k, [str(x) for x in v])
        elif k == "retry_for":
            cfg.retry_for = float(v)
        else:
            setattr(cfg, k, str(v))
    return cfg


def read_token(path: str) -> str:
    try:
        with open(path) as f:
            tok = f.read().strip()
    except OSError as e:
        raise InvalidArgument(f"token file {path} cannot be read: {e.strerror}") from None
    if not tok:
        raise InvalidArgument(f"token file {path} is empty")
    return tok
