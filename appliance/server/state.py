"""The server's own state: tokens, tenants, per-tenant chunk-id maps, ownership, upload sessions.

One LMDB environment under the state directory, shared by ``ihb serve`` and ``ihb token`` (LMDB
allows several processes). Sub-databases and keys (the canonical reference; docs/protocol.md §6):

``tokens``   SHA-256(token) (32 B)            -> JSON {id, tenant, host, role, created, revoked}
``tenants``  tenant name (utf-8)              -> JSON {own_key, created}
``tmap``     tenant NUL tenant-id (32 B)      -> repository blob id (32 B): what this tenant has sent
``hown``     tenant NUL host NUL blob id      -> b"": blobs a host may read back
``town``     tenant NUL blob id               -> b"": blobs a tenant may read back
``sessions`` session id (ascii)               -> JSON {tenant, host, state, created, snapshot, stats}

Invariants: a ``tmap`` row is written only after the pack holding its blob is durable and indexed, so
"the server has it" never outlives a crash; the repository blob may outlive the row (then it is sent
once more and deduplicated). Map and ownership commits are not fsync'ed (see ``State.__init__``). Tokens are stored only hashed: a 256-bit random token needs no slow KDF.
Every transaction begins and ends inside one function call (one thread); writes are serialised.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import lmdb

from repo.errors import InvalidArgument

ROLES = ("admin", "tenant", "agent")
TOKEN_PREFIX = "ihb_"
SESSION_RE = re.compile(r"^[0-9a-f]{32}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_DBS = (b"tokens", b"tenants", b"tmap", b"hown", b"town", b"sessions", b"meta")


def check_name(what: str, value: str) -> str:
    if not NAME_RE.match(value):
        raise InvalidArgument(f"{what} {value!r} is not valid: use letters, digits, '.', '_' or '-' (at most 128)")
    return value


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


@dataclass(frozen=True)
class TokenRecord:
    id: str  # first 16 hex digits of the digest: shown in listings, used to revoke
    tenant: str  # "*" for admin tokens
    host: str  # "*" for admin and tenant tokens
    role: str
    created: float
    revoked: bool = False
    note: str = ""

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, b: bytes) -> TokenRecord:
        d = json.loads(b)
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


class State:
    def __init__(self, state_dir: str) -> None:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        self.path = os.path.join(state_dir, "state.lmdb")
        # No fsync per commit: a killed process loses nothing (the rows are in the page cache); a power
        # loss may forget the last acknowledgements, which only makes agents send those blobs again.
        # Commits that must survive a power loss (tokens, a session's commit) call ``durable()``.
        self.env = lmdb.open(self.path, map_size=1 << 38, max_dbs=len(_DBS) + 1, max_readers=1024,
                             subdir=True, readahead=False, sync=False, metasync=False)
        self.db = {n.decode(): self.env.open_db(n) for n in _DBS}
        self._wlock = threading.Lock()

    def close(self) -> None:
        self.env.sync(True)
        self.env.close()

    def durable(self) -> None:
        self.env.sync(True)

    # --- tokens and tenants ----------------------------------------------------------------------------
    def create_token(self, role: str, tenant: str, host: str, own_key: bool = False, note: str = "") -> tuple[str, TokenRecord]:
        if role not in ROLES:
            raise InvalidArgument(f"role {role!r} is not one of {', '.join(ROLES)}")
        if role == "admin":
            tenant, host = "*", "*"
        else:
            check_name("tenant", tenant)
            if role == "tenant":
                host = "*"
            else:
                check_name("host", host)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        digest = token_digest(token)
        rec = TokenRecord(id=digest.hex()[:16], tenant=tenant, host=host, role=role, created=time.time(), note=note)
        with self._wlock, self.env.begin(write=True) as txn:
            if role != "admin":
                t = txn.get(tenant.encode(), db=self.db["tenants"])
                if t is None:
                    txn.put(tenant.encode(), json.dumps({"own_key": own_key, "created": time.time()}).encode(),
                            db=self.db["tenants"])
                elif own_key and not json.loads(t).get("own_key"):
                    raise InvalidArgument(
                        f"tenant {tenant!r} already exists with the shared key; the key choice is made once, "
                        "when the tenant's first token is created")
            txn.put(digest, rec.to_json(), db=self.db["tokens"])
        self.durable()
        return token, rec

    def lookup_token(self, token: str) -> TokenRecord | None:
        return self.lookup_digest(token_digest(token))

    def lookup_digest(self, digest: bytes) -> TokenRecord | None:
        """The live token with this SHA-256 (a dashboard session keeps the digest, never the token)."""
        with self.env.begin(db=self.db["tokens"]) as txn:
            v = txn.get(digest)
        if v is None:
            return None
        rec = TokenRecord.from_json(bytes(v))
        return None if rec.revoked else rec

    def tokens(self) -> list[TokenRecord]:
        with self.env.begin(db=self.db["tokens"]) as txn:
            recs = [TokenRecord.from_json(bytes(v)) for _, v in txn.cursor()]
        return sorted(recs, key=lambda r: r.created)

    def revoke_token(self, token_id: str) -> TokenRecord:
        token_id = token_id.lower()
        if len(token_id) < 4:
            raise InvalidArgument("give at least 4 hex digits of the token id (see `ihb token list`)")
        with self._wlock, self.env.begin(write=True, db=self.db["tokens"]) as txn:
            hits = [(bytes(k), TokenRecord.from_json(bytes(v))) for k, v in txn.cursor()
                    if bytes(k).hex().startswith(token_id)]
            if not hits:
                raise InvalidArgument(f"no token with id {token_id}; list them with `ihb token list`")
            if len(hits) > 1:
                raise InvalidArgument(f"token id {token_id} is ambiguous; give more digits")
            k, rec = hits[0]
            new = TokenRecord(**{**asdict(rec), "revoked": True})
            txn.put(k, new.to_json())
        self.durable()
        return new

    def tenant(self, name: str) -> dict[str, Any] | None:
        with self.env.begin(db=self.db["tenants"]) as txn:
            v = txn.get(name.encode())
        return json.loads(bytes(v)) if v is not None else None

    def tenants(self) -> dict[str, dict[str, Any]]:
        with self.env.begin(db=self.db["tenants"]) as txn:
            return {bytes(k).decode(): json.loads(bytes(v)) for k, v in txn.cursor()}

    # --- id maps and ownership -------------------------------------------------------------------------
    @staticmethod
    def _tkey(tenant: str, tid: bytes) -> bytes:
        return tenant.encode() + b"\0" + tid

    def lookup_ids(self, tenant: str, tids: Iterable[bytes]) -> list[bytes | None]:
        with self.env.begin(db=self.db["tmap"]) as txn:
            out = []
            for t in tids:
                v = txn.get(self._tkey(tenant, t))
                out.append(bytes(v) if v is not None else None)
            return out

    def host_owns(self, tenant: str, host: str, rid: bytes) -> bool:
        with self.env.begin(db=self.db["hown"]) as txn:
            return txn.get(tenant.encode() + b"\0" + host.encode() + b"\0" + rid) is not None

    def tenant_owns(self, tenant: str, rid: bytes) -> bool:
        with self.env.begin(db=self.db["town"]) as txn:
            return txn.get(tenant.encode() + b"\0" + rid) is not None

    def record_blobs(self, tenant: str, host: str, mapped: Iterable[tuple[bytes, bytes]], owned: Iterable[bytes],
                     session: str | None = None, stats: dict[str, int] | None = None) -> None:
        """One commit: tenant-id rows, ownership rows and the session's counters."""
        t, h = tenant.encode(), host.encode()
        with self._wlock, self.env.begin(write=True) as txn:
            for tid, rid in mapped:
                txn.put(t + b"\0" + tid, rid, db=self.db["tmap"])
            hown, town = self.db["hown"], self.db["town"]
            for rid in owned:
                txn.put(t + b"\0" + h + b"\0" + rid, b"", db=hown)
                txn.put(t + b"\0" + rid, b"", db=town)
            if session is not None and stats:
                raw = txn.get(session.encode(), db=self.db["sessions"])
                if raw is not None:
                    rec = json.loads(bytes(raw))
                    for k, v in stats.items():
                        rec["stats"][k] = rec["stats"].get(k, 0) + v
                    txn.put(session.encode(), json.dumps(rec).encode(), db=self.db["sessions"])

    # --- sessions --------------------------------------------------------------------------------------
    def create_session(self, tenant: str, host: str, info: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        sid = secrets.token_hex(16)
        rec = {"tenant": tenant, "host": host, "state": "open", "created": time.time(), "snapshot": None,
               "stats": {"received": 0, "stored": 0, "resent": 0, "received_bytes": 0}, **info}
        with self._wlock, self.env.begin(write=True) as txn:
            txn.put(sid.encode(), json.dumps(rec).encode(), db=self.db["sessions"])
        return sid, rec

    def session(self, sid: str) -> dict[str, Any] | None:
        if not SESSION_RE.match(sid):
            return None
        with self.env.begin(db=self.db["sessions"]) as txn:
            v = txn.get(sid.encode())
        return json.loads(bytes(v)) if v is not None else None

    def update_session(self, sid: str, **changes: Any) -> dict[str, Any]:
        with self._wlock, self.env.begin(write=True) as txn:
            raw = txn.get(sid.encode(), db=self.db["sessions"])
            if raw is None:
                raise KeyError(sid)
            rec = json.loads(bytes(raw))
            rec.update(changes)
            txn.put(sid.encode(), json.dumps(rec).encode(), db=self.db["sessions"])
        self.durable()  # state changes (committed, aborted) are rare and must not be forgotten
        return rec

    def sessions(self) -> dict[str, dict[str, Any]]:
        with self.env.begin(db=self.db["sessions"]) as txn:
            return {bytes(k).decode(): json.loads(bytes(v)) for k, v in txn.cursor()}
