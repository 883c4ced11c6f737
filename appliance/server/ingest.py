"""Turning agent uploads into repository blobs and restore points, without trusting the agent.

The agent names each chunk by its *tenant id*: keyed BLAKE3 under a key the server derives for that
tenant. The server recomputes the tenant id from the plaintext (so a malicious agent cannot poison the
tenant's deduplication), computes the repository's own id, stores the blob under it (so identical data
from different tenants is stored once), and remembers ``tenant id -> repository id`` per tenant. Tree
pages are rewritten from tenant ids to repository ids as they arrive, which both validates that every
reference is something this tenant has sent and keeps the repository's trees readable by every repo
tool (restore, check, catalog). The mapping, ownership and the session's counters are written only
after the pack is durable: an acknowledged upload survives a crash, an unacknowledged one is resent.
See docs/protocol.md §4-§7.
"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import logging
import os
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import blake3
import msgpack
import zstandard

from repo import catalog
from repo import format as fmt
from repo.crypto import Aead, Envelope, zstd_decompressor
from repo.repository import Repository
from repo.snapshot import Snapshot
from repo.storage import ObjectExists
from repo.tree import TYPE_DIR

from .http import HTTPError
from .state import State

log = logging.getLogger(__name__)

FRAME = struct.Struct("<B32sII")  # kind, tenant id, plaintext length, body length (docs/protocol.md §5.3)
MAX_RAW = 16 * 1024 * 1024  # largest plaintext blob accepted (CDC max is 4 MiB, tree pages ~2 MiB)
MAX_HAVE_IDS = 20000
KINDS = {"data": fmt.BlobKind.DATA, "tree": fmt.BlobKind.TREE}
TENANT_KEY_PREFIX = "keys/tenant-"


class ContentSealer:
    """Own-key tenants: file content sealed with the tenant's key inside the repository envelope.

    Deterministic (SIV-style: the nonce is a keyed hash of the sealed body), so identical content from
    the same tenant still deduplicates, while different bodies never share a nonce.
    """

    def __init__(self, secret: bytes) -> None:
        self._aead = Aead(_derive(secret, "content aead"))
        self._nonce = _derive(secret, "content nonce")

    def seal(self, kind: int, body: bytes) -> bytes:
        nonce = blake3.blake3(bytes((kind,)) + body, key=self._nonce).digest(fmt.NONCE_LEN)
        return nonce + self._aead.seal(nonce, body, b"ihbt1" + bytes((kind,)))

    def open(self, kind: int, sealed: bytes) -> bytes:
        if len(sealed) < fmt.NONCE_LEN + fmt.TAG_LEN:
            raise ValueError("sealed blob truncated")
        return self._aead.open(sealed[: fmt.NONCE_LEN], memoryview(sealed)[fmt.NONCE_LEN :], b"ihbt1" + bytes((kind,)))


def _derive(secret: bytes, context: str, length: int = 32) -> bytes:
    h = blake3.blake3(derive_key_context=f"ihb 2026 v1 tenant {context}")  # type: ignore[call-arg]
    h.update(secret)
    return h.digest(length)


@dataclass(frozen=True)
class TenantKeys:
    name: str
    own_key: bool
    id_key: bytes  # the agent's chunk-id key
    chunker_seed: int
    key_id: str  # public: changes whenever id_key does, so agents know to drop their files cache
    sealer: ContentSealer | None

    def tid(self, plain: bytes | memoryview) -> bytes:
        return blake3.blake3(plain, key=self.id_key).digest()


def b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def unb64(s: Any, what: str) -> bytes:
    if not isinstance(s, str):
        raise HTTPError(400, f"{what} must be a base64 string")
    try:
        return base64.b64decode(s.encode(), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise HTTPError(400, f"{what} is not valid base64") from None


def decompress_checked(body: bytes | memoryview, raw_len: int, tid: bytes) -> bytes | memoryview:
    """Decompress an agent's body, refusing bombs: the declared size is checked before allocating.
    An uncompressed body comes back as a view of ``body`` (it is only hashed and parsed, never kept)."""
    if not body:
        raise HTTPError(400, f"blob {tid.hex()[:16]} has an empty body")
    ctype = body[0]
    payload = memoryview(body)[1:]
    plain: bytes | memoryview
    if ctype == fmt.Compression.NONE:
        plain = payload
    elif ctype == fmt.Compression.ZSTD:
        try:
            size = zstandard.frame_content_size(payload)
            if size not in (-1, raw_len):
                raise HTTPError(422, f"blob {tid.hex()[:16]}: compressed frame declares {size} bytes, not {raw_len}")
            plain = zstd_decompressor().decompress(payload, max_output_size=raw_len)
        except zstandard.ZstdError as e:
            raise HTTPError(422, f"blob {tid.hex()[:16]} does not decompress: {e}") from None
    else:
        raise HTTPError(422, f"blob {tid.hex()[:16]} uses unknown compression {ctype}")
    if len(plain) != raw_len:
        raise HTTPError(422, f"blob {tid.hex()[:16]} decompresses to {len(plain)} bytes, not the declared {raw_len}")
    return plain


def parse_frames(body: bytes | memoryview) -> list[tuple[int, bytes, int, memoryview]]:
    """The request's blob frames; the bodies are views of ``body``, not copies."""
    items = []
    whole = memoryview(body)
    pos, n = 0, len(body)
    while pos < n:
        if n - pos < FRAME.size:
            raise HTTPError(400, f"truncated blob frame at byte {pos}")
        kind, tid, raw_len, blen = FRAME.unpack_from(body, pos)
        pos += FRAME.size
        if kind not in (fmt.BlobKind.DATA, fmt.BlobKind.TREE):
            raise HTTPError(400, f"blob frame at byte {pos - FRAME.size}: unknown kind {kind}")
        if raw_len > MAX_RAW or blen > MAX_RAW + 1024:
            raise HTTPError(413, f"blob {tid.hex()[:16]} is larger than {MAX_RAW} bytes")
        if blen > n - pos:
            raise HTTPError(400, f"blob {tid.hex()[:16]}: body runs past the end of the request")
        items.append((kind, tid, raw_len, whole[pos : pos + blen]))
        pos += blen
    if not items:
        raise HTTPError(400, "the request holds no blob frames")
    return items


def _bad_tree(msg: str) -> HTTPError:
    return HTTPError(422, f"malformed tree page: {msg}")


class Ingest:
    """Holds the repository and the state; every method runs in a worker thread (never awaits)."""

    def __init__(self, repo: Repository, state: State) -> None:
        self.repo = repo
        self.state = state
        self._tenants: dict[str, TenantKeys] = {}
        self._tlock = threading.Lock()
        # Blobs some request is storing right now: concurrent agents sending the same data (20 VMs of
        # one OS) wait for the first copy instead of each storing one.
        self._inflight: dict[bytes, threading.Event] = {}
        self._iflock = threading.Lock()
        self.server_id = hashlib.sha256(repo.key.derive("server id")).hexdigest()[:32]
        # The file catalog (`ihb find`) after each commit, as a local backup does (docs/format.md §8:
        # catalog after the restore point), on one thread of its own so the agent's commit returns at
        # once and catalog writes never run two at a time.
        self._catalog = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ihb-catalog")

    # --- the file catalog ------------------------------------------------------------------------------
    def catalogue(self, snap: Snapshot) -> concurrent.futures.Future[int]:
        """Index a committed restore point in the background; a failure is logged, `ihb catalog rebuild`
        (or the catch-up at the next start) picks it up later."""
        return self._catalog.submit(self._index, snap)

    def catch_up(self) -> concurrent.futures.Future[int]:
        """At start: catalogue what a previous run committed but did not index (killed mid-way)."""
        return self._catalog.submit(self._rebuild)

    def _index(self, snap: Snapshot) -> int:
        try:
            if catalog.Catalog(self.repo.index).has_snapshot(snap.id):  # the start-up catch-up got it first
                return 0
            return catalog.index_snapshot(self.repo, snap)
        except Exception as e:  # noqa: BLE001 - the restore point is committed; the catalog can follow later
            log.warning("restore point %s of %s is not in the file catalog yet (%s); run `ihb catalog rebuild`",
                        snap.short_id, snap.host, e)
            return 0

    def _rebuild(self) -> int:
        try:
            n = catalog.rebuild(self.repo)["indexed"]
        except Exception as e:  # noqa: BLE001 - as above
            log.warning("file catalog catch-up failed (%s); run `ihb catalog rebuild`", e)
            return 0
        if n:
            log.info("catalogued %d restore points committed before this start", n)
        return n

    def close(self) -> None:
        """Wait for the catalog writes queued so far (before the repository closes)."""
        self._catalog.shutdown(wait=True)

    # --- tenant keys -----------------------------------------------------------------------------------
    def tenant_keys(self, tenant: str) -> TenantKeys:
        with self._tlock:
            tk = self._tenants.get(tenant)
            if tk is not None:
                return tk
            rec = self.state.tenant(tenant) or {}
            if rec.get("own_key"):
                secret = self._tenant_secret(tenant)
                id_key = _derive(secret, "chunk id")
                seed = int.from_bytes(_derive(secret, "chunker seed", 8), "little") & 0x7FFF_FFFF_FFFF_FFFF
                tk = TenantKeys(tenant, True, id_key, seed, hashlib.sha256(b"kid" + id_key).hexdigest()[:16],
                                ContentSealer(secret))
            else:
                id_key = self.repo.key.derive(f"tenant chunk id {tenant}")
                tk = TenantKeys(tenant, False, id_key, self.repo.envelope.chunker_seed,
                                hashlib.sha256(b"kid" + id_key).hexdigest()[:16], None)
            self._tenants[tenant] = tk
            return tk

    def _tenant_secret(self, tenant: str) -> bytes:
        """An own-key tenant's secret lives in the repository, wrapped by the repository key, so that
        the repository alone can be restored; deleting that object crypto-shreds the tenant's content."""
        name = TENANT_KEY_PREFIX + hashlib.sha256(tenant.encode()).hexdigest()[:32]
        wrap = self.repo.key.derive("tenant key wrap")
        aad = b"ihb tenant key " + tenant.encode()
        if not self.repo.storage.exists(name):
            secret = os.urandom(32)
            nonce = os.urandom(fmt.NONCE_LEN)
            try:
                self.repo.storage.put_bytes(name, nonce + Aead(wrap).seal(nonce, secret, aad))
            except ObjectExists:
                pass  # created concurrently by another appliance process: read theirs
        raw = self.repo.storage.get(name)
        try:
            return Aead(wrap).open(raw[: fmt.NONCE_LEN], raw[fmt.NONCE_LEN :], aad)
        except ValueError:
            raise HTTPError(503, f"the key of tenant {tenant} is damaged; the appliance log has details") from None

    def agent_params(self, tenant: str) -> dict[str, Any]:
        tk = self.tenant_keys(tenant)
        c = self.repo.config
        return {
            "server_id": self.server_id,
            "key_id": tk.key_id,
            "id_key": tk.id_key.hex(),
            "own_key": tk.own_key,
            "chunker": {"min": c.cdc_min, "avg": c.cdc_avg, "max": c.cdc_max, "seed": tk.chunker_seed},
            "compression_level": c.compression_level,
            "limits": {"max_raw": MAX_RAW, "max_have_ids": MAX_HAVE_IDS},
        }

    # --- have? -----------------------------------------------------------------------------------------
    def have(self, tenant: str, tids: Sequence[bytes]) -> list[bool]:
        rids = self.state.lookup_ids(tenant, tids)
        present = self.repo.index.has_chunks([r for r in rids if r is not None])
        it = iter(present)
        return [False if r is None else next(it) for r in rids]

    # --- uploads ---------------------------------------------------------------------------------------
    def receive(self, sid: str, sess: dict[str, Any], body: bytes | memoryview) -> dict[str, int]:
        tenant, host = sess["tenant"], sess["host"]
        tk = self.tenant_keys(tenant)
        items = parse_frames(body)
        prior = self.state.lookup_ids(tenant, [tid for _, tid, _, _ in items])
        prior_ok = self.repo.index.has_chunks([p or b"\0" * 32 for p in prior])
        stats = {"received": 0, "received_bytes": 0, "stored": 0, "stored_bytes": 0, "resent": 0}
        pending: dict[bytes, bytes] = {}
        owned: list[bytes] = []
        claimed: list[bytes] = []
        waits: list[tuple[threading.Event, bytes, bytes, int]] = []
        done = threading.Event()
        writer = self.repo.writer()
        try:
            for (kind, tid, raw_len, blob), known, ok in zip(items, prior, prior_ok, strict=True):
                stats["received"] += 1
                stats["received_bytes"] += len(blob)
                if known is not None and ok:
                    stats["resent"] += 1  # the agent sent what it had been told the server has
                    owned.append(known)
                    continue
                if tid in pending:
                    continue
                plain = decompress_checked(blob, raw_len, tid)
                if tk.tid(plain) != tid:
                    raise HTTPError(422, f"blob {tid.hex()[:16]}: the content does not hash to its id under this "
                                         "tenant's key (stale agent parameters? fetch /api/v1/agent/params)")
                before = writer.stats["new_chunks"]
                if kind == fmt.BlobKind.DATA:
                    if tk.sealer is not None:
                        inner = tk.sealer.seal(kind, blob)
                        rid = self.repo.chunk_id(inner)
                        stored, stored_len = bytes((fmt.Compression.NONE,)) + inner, len(inner)
                    else:
                        rid = self.repo.chunk_id(plain)
                        stored, stored_len = blob, raw_len
                    with self._iflock:
                        other = self._inflight.get(rid)
                        if other is None:
                            self._inflight[rid] = done
                            claimed.append(rid)
                    if other is None:
                        writer.add_compressed(kind, rid, stored, stored_len)
                    else:
                        waits.append((other, rid, stored, stored_len))
                else:
                    page, refs = self.translate_page(tenant, plain, pending)
                    rid = self.repo.chunk_id(page)
                    writer.add(fmt.BlobKind.TREE, page, rid)
                    owned.extend(refs)
                if writer.stats["new_chunks"] > before:
                    stats["stored"] += 1
                    stats["stored_bytes"] += len(blob)
                pending[tid] = rid
                owned.append(rid)
            writer.flush()
        except BaseException:
            writer.abort()
            raise
        finally:
            self._release(claimed, done)
        if waits:
            # Claims are released before waiting, so two requests never wait on each other.
            late = self.repo.writer()
            try:
                for other, rid, stored, stored_len in waits:
                    other.wait(timeout=600)
                    late.add_compressed(fmt.BlobKind.DATA, rid, stored, stored_len)  # no-op if it arrived
                late.flush()
            except BaseException:
                late.abort()
                raise
        # Only now, with the pack durable and indexed, does the server say it has these blobs.
        self.state.record_blobs(tenant, host, pending.items(), owned, sid, stats)
        return stats

    def _release(self, claimed: list[bytes], done: threading.Event) -> None:
        with self._iflock:
            for rid in claimed:
                if self._inflight.get(rid) is done:
                    del self._inflight[rid]
        done.set()

    # --- tree translation ------------------------------------------------------------------------------
    def _resolve(self, tenant: str, tids: list[bytes], pending: dict[bytes, bytes]) -> dict[bytes, bytes]:
        ask = [t for t in dict.fromkeys(tids) if t not in pending]
        found = dict(zip(ask, self.state.lookup_ids(tenant, ask), strict=True))
        rids = [r for r in found.values() if r is not None]
        present = dict(zip(rids, self.repo.index.has_chunks(rids), strict=True))
        missing = [t.hex() for t, r in found.items() if r is None or not present.get(r)]
        if missing:
            raise HTTPError(409, f"{len(missing)} referenced blobs were never sent by this tenant (or were "
                                 "garbage-collected); drop the files cache and send them",
                            missing=missing[:1000])
        out = dict(pending)
        out.update({t: r for t, r in found.items() if r is not None})
        return out

    def translate_nodes(self, tenant: str, nodes: list[Any], pending: dict[bytes, bytes]) -> list[bytes]:
        """Rewrite tenant ids to repository ids in place; returns the repository ids referenced."""
        refs: list[bytes] = []
        for node in nodes:
            if not isinstance(node, dict) or not isinstance(node.get("n"), bytes) or not isinstance(node.get("t"), str):
                raise _bad_tree("every entry needs a byte-string name 'n' and a type 't'")
            c = node.get("c")
            if c is not None:
                if not isinstance(c, list):
                    raise _bad_tree("'c' must be a list")
                for part in c:
                    if (not isinstance(part, list) or len(part) != 2 or not isinstance(part[1], int) or part[1] < 0
                            or not (part[0] is None or (isinstance(part[0], bytes) and len(part[0]) == 32))):
                        raise _bad_tree("content entries are [32-byte id or nil, length]")
                    if part[0] is not None:
                        refs.append(part[0])
            d = node.get("d")
            if d is not None:
                if node["t"] != TYPE_DIR or not isinstance(d, list):
                    raise _bad_tree("'d' belongs to directories and is a list")
                for part in d:
                    if (not isinstance(part, list) or len(part) != 2 or not isinstance(part[0], bytes)
                            or not isinstance(part[1], bytes) or len(part[1]) != 32):
                        raise _bad_tree("directory pages are [first name, 32-byte id]")
                    refs.append(part[1])
        mapping = self._resolve(tenant, refs, pending) if refs else {}
        for node in nodes:
            for part in node.get("c") or ():
                if part[0] is not None:
                    part[0] = mapping[part[0]]
            for part in node.get("d") or ():
                part[1] = mapping[part[1]]
        return [mapping[r] for r in refs]

    def translate_page(self, tenant: str, plain: bytes | memoryview, pending: dict[bytes, bytes]) -> tuple[bytes, list[bytes]]:
        try:
            nodes = msgpack.unpackb(plain, raw=False, strict_map_key=False)
        except (ValueError, TypeError, msgpack.ExtraData) as e:
            raise _bad_tree(f"not msgpack ({e})") from None
        if not isinstance(nodes, list):
            raise _bad_tree("a page is a list of entries")
        refs = self.translate_nodes(tenant, nodes, pending)
        return msgpack.packb(nodes, use_bin_type=True), refs

    # --- commit ----------------------------------------------------------------------------------------
    def commit(self, sid: str, sess: dict[str, Any], doc: Any) -> Snapshot:
        if sess["state"] == "committed":
            return self.repo.load_snapshot(sess["snapshot"])
        if sess["state"] != "open":
            raise HTTPError(409, f"upload session {sid} is {sess['state']}; start a new one")
        if not isinstance(doc, dict):
            raise HTTPError(400, "the commit body is a JSON object")
        root_raw = unb64(doc.get("root"), "root")
        try:
            root = msgpack.unpackb(root_raw, raw=False, strict_map_key=False)
        except (ValueError, TypeError, msgpack.ExtraData) as e:
            raise _bad_tree(f"root is not msgpack ({e})") from None
        if not isinstance(root, dict) or root.get("t") != TYPE_DIR or "c" in root:
            raise _bad_tree("the root must be a directory entry")
        root.setdefault("n", b"")
        paths = _str_list(doc.get("paths", []), "paths", 4096)
        tags = _str_list(doc.get("tags", []), "tags", 64)
        errors = doc.get("errors", [])
        if not isinstance(errors, list) or len(errors) > 100000 or not all(
                isinstance(e, dict) and isinstance(e.get("path"), str) and isinstance(e.get("error"), str)
                for e in errors):
            raise HTTPError(400, "errors must be a list of {path, error} strings")
        agent_stats = doc.get("stats", {})
        if not isinstance(agent_stats, dict):
            raise HTTPError(400, "stats must be an object")
        stats = {_utf8(k, "stats"): v for k, v in agent_stats.items()
                 if isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)
                 and (not isinstance(v, int) or -(2**63) <= v < 2**64)}
        now = time.time_ns()
        t = doc.get("time_ns")
        time_ns = t if isinstance(t, int) and not isinstance(t, bool) and 946684800 * 10**9 < t < now + 86400 * 10**9 else now
        streams = doc.get("streams", [])
        if not isinstance(streams, list):
            raise HTTPError(400, "streams must be a list")
        tk = self.tenant_keys(sess["tenant"])
        refs = self.translate_nodes(sess["tenant"], [root], {})
        fresh = self.state.session(sid) or sess
        stats["server"] = fresh.get("stats", {})
        meta: dict[str, Any] = {"tenant": sess["tenant"], "session": sid, "source": "agent",
                                "streams": _plain_json(streams[:64], "streams")}
        if tk.own_key:
            meta["content_key"] = tk.key_id
        snap = Snapshot(id="", kind="files", host=sess["host"], time_ns=time_ns, paths=paths, tags=tags,
                        tree=msgpack.packb(root, use_bin_type=True), stats=stats,
                        errors=[{"path": _utf8(e["path"], "errors"), "error": _utf8(e["error"], "errors")}
                                for e in errors], meta=meta)
        try:
            stored = self.repo.store_snapshot(snap)
        except ObjectExists:  # the same commit, retried after a crash between storing and recording it
            stored = self.repo.load_snapshot(self.repo.envelope.chunk_id(snap.to_plain()).hex())
            self.repo.index.put_snapshot(stored.id, stored.to_record())
        self.state.record_blobs(sess["tenant"], sess["host"], (), refs)
        self.state.update_session(sid, state="committed", snapshot=stored.id, committed=time.time())
        self.catalogue(stored)
        return stored

    # --- reads -----------------------------------------------------------------------------------------
    def read_blob(self, tenant: str, kind: int, rid: bytes) -> bytes:
        loc = self.repo.index.get_chunk(rid)
        if loc is None or loc.kind != kind:
            raise HTTPError(404, "no such blob of that kind")
        data = self.repo.get_blob(kind, rid)
        tk = self.tenant_keys(tenant)
        if kind == fmt.BlobKind.DATA and tk.sealer is not None:
            try:
                body = tk.sealer.open(kind, data)
            except ValueError:
                raise HTTPError(404, "no such blob for this tenant") from None
            return Envelope.decompress(body, rid)  # verified when it was received
        return data


def _str_list(v: Any, what: str, limit: int) -> list[str]:
    if not isinstance(v, list) or len(v) > limit or not all(isinstance(x, str) and len(x) <= 4096 for x in v):
        raise HTTPError(400, f"{what} must be a list of at most {limit} strings")
    return [_utf8(x, what) for x in v]


def _utf8(x: str, what: str) -> str:
    """JSON admits lone surrogates ("\\ud800"); the repository's msgpack records do not."""
    try:
        x.encode("utf-8")
    except UnicodeEncodeError:
        raise HTTPError(400, f"{what} holds a string that is not valid Unicode") from None
    return x


def _plain_json(v: Any, what: str, depth: int = 0) -> Any:
    if depth > 8:
        raise HTTPError(400, f"{what} is nested too deeply")
    if isinstance(v, str):
        return _utf8(v, what)
    if isinstance(v, list):
        return [_plain_json(x, what, depth + 1) for x in v]
    if isinstance(v, dict):
        return {_utf8(str(k), what): _plain_json(x, what, depth + 1) for k, x in v.items()}
    if isinstance(v, int) and not isinstance(v, bool) and not -(2**63) <= v < 2**64:
        raise HTTPError(400, f"{what} holds an integer out of range")
    return v
