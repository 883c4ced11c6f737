"""The ``[server]`` table of the TOML config, with defaults so that no file is needed at all.

Kept beside the server rather than in appliance/config.py because only the daemon and the token
tools read it; appliance/config.py hands the raw table over (``Config.server``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from appliance.config import Config, data_dir
from repo.errors import InvalidArgument

DEFAULT_PORT = 8443


@dataclass
class ServerSettings:
    listen_host: str = "127.0.0.1"
    listen_port: int = DEFAULT_PORT
    state_dir: str = field(default_factory=lambda: os.path.join(data_dir(), "server"))
    tls_cert: str | None = None  # PEM; generated under state_dir/tls when absent
    tls_key: str | None = None
    hostnames: list[str] = field(default_factory=list)  # extra names for the generated certificate
    max_blob_body: int = 64 * 1024 * 1024  # one upload batch
    max_json_body: int = 4 * 1024 * 1024
    max_commit_body: int = 64 * 1024 * 1024
    header_timeout: float = 15.0  # request line + headers must arrive within this
    body_timeout: float = 60.0  # no progress reading a body for this long closes the connection
    idle_timeout: float = 120.0  # a keep-alive connection idle this long is closed
    send_timeout: float = 120.0
    max_connections: int = 512
    workers: int = max(2, os.cpu_count() or 2)  # threads for hashing/sealing uploads
    metrics_open_on_loopback: bool = False  # GET /metrics without a token from 127.0.0.1/::1 (a local scraper)
    dashboard_session_minutes: float = 30.0  # a dashboard login ends after this long without a request
    # The whole config (jobs, [service] state_dir, ...): set by `ihb serve`, read by the dashboard.
    config: Config = field(default_factory=Config)

    @property
    def listen(self) -> str:
        return f"{self.listen_host}:{self.listen_port}"


def parse_listen(value: str) -> tuple[str, int]:
    """``ADDR:PORT``, ``[v6]:PORT`` or ``:PORT``."""
    v = value.strip()
    if v.startswith("["):
        host, _, rest = v[1:].partition("]")
        port_s = rest.lstrip(":")
    else:
        host, sep, port_s = v.rpartition(":")
        if not sep:
            raise InvalidArgument(f"--listen {value!r}: expected ADDR:PORT")
    try:
        port = int(port_s)
    except ValueError:
        raise InvalidArgument(f"--listen {value!r}: the port is not a number") from None
    if not 0 <= port <= 65535:
        raise InvalidArgument(f"--listen {value!r}: the port must be 0-65535")
    return host or "0.0.0.0", port


_NUMERIC = {
    "max_blob_body": int, "max_json_body": int, "max_commit_body": int, "header_timeout": float,
    "body_timeout": float, "idle_timeout": float, "send_timeout": float, "max_connections": int, "workers": int,
    "dashboard_session_minutes": float,
}


def load_settings(table: dict[str, Any], where: str = "config") -> ServerSettings:
    s = ServerSettings()
    for key, value in table.items():
        if key == "listen":
            s.listen_host, s.listen_port = parse_listen(str(value))
        elif key == "state_dir":
            s.state_dir = str(value)
        elif key in ("tls_cert", "tls_key"):
            setattr(s, key, str(value))
        elif key == "hostnames":
            if not isinstance(value, list):
                raise InvalidArgument(f"{where}: [server] hostnames must be a list of names")
            s.hostnames = [str(v) for v in value]
        elif key == "metrics_open_on_loopback":
            if not isinstance(value, bool):
                raise InvalidArgument(f"{where}: [server] metrics_open_on_loopback must be true or false")
            s.metrics_open_on_loopback = value
        elif key in _NUMERIC:
            try:
                setattr(s, key, _NUMERIC[key](value))
            except (TypeError, ValueError):
                raise InvalidArgument(f"{where}: [server] {key} must be a number") from None
        else:
            raise InvalidArgument(f"{where}: unknown key [server] {key}")
    if (s.tls_cert is None) != (s.tls_key is None):
        raise InvalidArgument(f"{where}: [server] tls_cert and tls_key go together")
    return s
