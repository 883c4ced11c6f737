"""Packs and restore point objects in an S3-compatible bucket (Ceph RGW, SeaweedFS, AWS, ...).

Why this exists: an appliance's disks run out long before its CPU does, and hosting providers already
run a distributed object store. The repository format needs nothing an object store lacks: objects
are created once and never rewritten (``storage.py``), the LMDB index is a local cache that
``Repository.sync_index`` / ``ihb check --repair`` rebuild from the bucket alone, and the snapshot
object is the commit point (docs/format.md §8), so only *object* durability matters.

Location: ``s3://[ACCESS:SECRET@]HOST[:PORT]/BUCKET[/PREFIX][?tls=0&region=R&verify=0]``. Credentials,
in order: the URL, ``$IHB_S3_ACCESS_KEY``/``$IHB_S3_SECRET_KEY``, the ``[s3]`` table of the config
file (handed in with ``configure``), then boto3's own chain (``~/.aws``, instance roles). Other
``[s3]`` keys: ``region``, ``tls``, ``verify`` (bool or CA bundle path), ``part_size``,
``concurrency``, ``block_size``, ``readahead``, ``cache_bytes``, ``retry_seconds``, ``lock_lease``,
``checksums``, ``spool_dir`` (default: RAM, /dev/shm, see ``S3Storage``).
Env: ``IHB_S3_RETRY_SECONDS``, ``IHB_S3_LOCK_LEASE``.

Create-only writes, and what each server enforces (measured, tests/s3):

* ``put_bytes`` (config, key, restore points, lock objects) sends ``If-None-Match: *``; Ceph RGW 16
  and SeaweedFS answer 412 on an existing key, which becomes ``ObjectExists``. A server that answers
  501/NotImplemented is remembered and then gets a HEAD check before the PUT (racy, documented as such:
  the names written this way are content hashes or random ids, so a race writes identical bytes, except
  ``config`` at ``init``, which refuses a non-empty prefix first).
* ``put_file`` (packs, multipart) HEAD-checks first and sends ``If-None-Match: *`` on
  CompleteMultipartUpload. SeaweedFS enforces it there; Ceph RGW 16 silently ignores it. Pack names
  are 128 random bits, so a collision needs a broken RNG, not a race.
* A retried request whose first attempt did land gets 412 (or NoSuchUpload); the object is then
  compared with what we sent (ETag = MD5 for single PUTs, size for multipart) and accepted if equal.

Requests are retried with exponential backoff and jitter on connection errors, timeouts, 5xx, 429 and
SlowDown, for up to ``retry_seconds`` (default 120 s) per operation, so a store restart during a backup
is ridden out; past that the operation fails and, by the write ordering, leaves no restore point.

Reads are ranged GETs. A per-object detector switches sequential streams (restore, FUSE reads, check)
to aligned ``block_size`` blocks fetched ``readahead`` blocks ahead on a small pool, held in a bounded
LRU; random reads (instant recovery, image blocks) fetch exactly their range and are not cached (the
repository's plaintext LRU sits above this).

Locking: ``lock()`` returns a bucket lock (``S3Lock``), see its docstring.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import random
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import botocore.exceptions as bexc

from .errors import IhbError, InvalidArgument, NoSpace, RepositoryExists, RepositoryLocked, RepositoryNotFound
from .storage import ObjectExists, remove_dead_spool_files

log = logging.getLogger(__name__)

T = TypeVar("T")

MiB = 1024 * 1024
LOCK_PREFIX = "locks/"


class ObjectStoreError(IhbError):
    """The object store refused or could not complete a request; check the endpoint, bucket and credentials."""

    exit_code = 74  # docs/exit-codes.md: an I/O error not covered elsewhere


# --- settings ----------------------------------------------------------------------------------------
_config_defaults: dict[str, Any] = {}
_config_loader: Callable[[], Mapping[str, Any] | None] | None = None


def configure(section: Mapping[str, Any] | None = None,
              loader: Callable[[], Mapping[str, Any] | None] | None = None) -> None:
    """Hand in the config file's ``[s3]`` table (or a function that reads it when first needed).

    ``repo/`` must not know where configuration lives (the layer rule), so the appliance passes it in.
    """
    global _config_loader
    _config_defaults.clear()
    if section:
        _config_defaults.update(section)
    _config_loader = loader


def _config() -> dict[str, Any]:
    global _config_loader
    if _config_loader is not None:
        loader, _config_loader = _config_loader, None
        sec = loader()
        if sec:
            for k, v in sec.items():
                _config_defaults.setdefault(k, v)
    return _config_defaults


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    return str(v).strip().lower() not in ("0", "false", "no", "off", "")


@dataclass(frozen=True)
class S3Settings:
    """Everything needed to reach one repository's objects; ``location`` never contains secrets."""

    host: str
    bucket: str
    prefix: str = ""  # "" or "some/path/" (always ends with "/")
    access_key: str | None = None
    secret_key: str | None = field(default=None, repr=False)
    tls: bool = True
    verify: bool | str = True
    region: str = "us-east-1"
    part_size: int = 8 * MiB
    concurrency: int = 4
    block_size: int = 8 * MiB  # 8 MiB x 4 ahead = one default pack: fewer requests, less server CPU
    readahead: int = 4  # blocks
    cache_bytes: int = 128 * MiB
    retry_seconds: float = 120.0
    lock_lease: float = 120.0
    checksums: str = "when_required"  # botocore request_checksum_calculation; see recipe pitfall 6
    spool_dir: str = ""  # "" = RAM (/dev/shm) when available, else the cache dir; see S3Storage

    @property
    def endpoint(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    @property
    def location(self) -> str:
        q = "" if self.tls else "?tls=0"
        return f"s3://{self.host}/{self.bucket}/{self.prefix}".rstrip("/") + q

    @classmethod
    def from_location(cls, url: str, env: Mapping[str, str] | None = None,
                      config: Mapping[str, Any] | None = None) -> S3Settings:
        env = os.environ if env is None else env
        cfg = _config() if config is None else config
        u = urllib.parse.urlsplit(url)
        if u.scheme != "s3" or not u.hostname:
            raise InvalidArgument(f"{_redact(url)}: expected s3://[ACCESS:SECRET@]HOST[:PORT]/BUCKET[/PREFIX]")
        path = u.path.lstrip("/")
        bucket, _, prefix = path.partition("/")
        if not bucket:
            raise InvalidArgument(f"{_redact(url)}: no bucket; expected s3://HOST[:PORT]/BUCKET[/PREFIX]")
        prefix = prefix.strip("/")
        if ".." in prefix.split("/"):
            raise InvalidArgument(f"{_redact(url)}: '..' is not allowed in the prefix")
        q = {k: v[-1] for k, v in urllib.parse.parse_qs(u.query).items()}
        unknown = set(q) - {"tls", "verify", "region", "checksums"}
        if unknown:
            raise InvalidArgument(f"{_redact(url)}: unknown option(s) {', '.join(sorted(unknown))}")
        host = u.hostname if u.port is None else f"{u.hostname}:{u.port}"
        if ":" in (u.hostname or "") and u.port is not None:  # IPv6 literal
            host = f"[{u.hostname}]:{u.port}"

        def pick(key: str, default: Any) -> Any:
            if key in q:
                return q[key]
            return cfg.get(key, default)

        verify_raw = pick("verify", True)
        verify: bool | str = verify_raw if isinstance(verify_raw, str) and "/" in verify_raw else _bool(verify_raw)
        s = cls(
            host=host,
            bucket=bucket,
            prefix=prefix + "/" if prefix else "",
            access_key=urllib.parse.unquote(u.username) if u.username else
            env.get("IHB_S3_ACCESS_KEY") or cfg.get("access_key"),
            secret_key=urllib.parse.unquote(u.password) if u.password else
            env.get("IHB_S3_SECRET_KEY") or cfg.get("secret_key"),
            tls=_bool(pick("tls", True)),
            verify=verify,
            region=str(pick("region", "us-east-1")),
            checksums=str(pick("checksums", "when_required")),
        )
        if cfg.get("spool_dir"):
            s = replace(s, spool_dir=str(cfg["spool_dir"]))
        ints = {k: int(cfg[k]) for k in ("part_size", "concurrency", "block_size", "readahead", "cache_bytes")
                if k in cfg}
        floats = {k: float(cfg[k]) for k in ("retry_seconds", "lock_lease") if k in cfg}
        for k, e in (("retry_seconds", "IHB_S3_RETRY_SECONDS"), ("lock_lease", "IHB_S3_LOCK_LEASE")):
            if env.get(e):
                floats[k] = float(env[e])
        s = replace(s, **ints, **floats)
        if s.part_size < 5 * MiB:
            raise InvalidArgument("s3 part_size must be at least 5 MiB (the S3 minimum for multipart parts)")
        if s.checksums not in ("when_required", "when_supported"):
            raise InvalidArgument("s3 checksums must be when_required or when_supported")
        return s


def _redact(url: str) -> str:
    u = urllib.parse.urlsplit(url)
    if u.password or u.username:
        netloc = u.netloc.rsplit("@", 1)[-1]
        return urllib.parse.urlunsplit((u.scheme, netloc, u.path, u.query, u.fragment))
    return url


def redact_location(location: str) -> str:
    """A location string safe to print or log (credentials removed)."""
    return _redact(location) if location.startswith("s3://") else location


# --- error classification ------------------------------------------------------------------------------
_RETRY_CODES = {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling",
                "ThrottlingException", "RequestTimeTooSkewed", "OperationAborted", "503", "500", "502", "504"}
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "Forbidden"}


def _code(e: bexc.ClientError) -> tuple[str, int]:
    err = e.response.get("Error", {})
    status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return str(err.get("Code", status)), status


def _retryable(e: BaseException) -> bool:
    if isinstance(e, bexc.SSLError):
        return False  # certificate problems do not heal by retrying
    if isinstance(e, bexc.ConnectionError | bexc.HTTPClientError | bexc.IncompleteReadError):
        return True
    if isinstance(e, bexc.ClientError):
        code, status = _code(e)
        return status >= 500 or status == 429 or code in _RETRY_CODES
    return False


def _is_404(e: BaseException) -> bool:
    if not isinstance(e, bexc.ClientError):
        return False
    code, status = _code(e)
    return status == 404 and code != "NoSuchBucket" or code in ("NoSuchKey", "NotFound", "404")


def _is_412(e: BaseException) -> bool:
    if not isinstance(e, bexc.ClientError):
        return False
    code, status = _code(e)
    return status == 412 or code == "PreconditionFailed"


# --- sequential read detection and readahead -----------------------------------------------------------
class _Blocks:
    """Aligned blocks of objects, fetched ahead for sequential readers and kept in a bounded LRU."""

    def __init__(self, storage: S3Storage) -> None:
        self.st = storage
        self.bs = storage.settings.block_size
        self.max_blocks = max(2, storage.settings.cache_bytes // self.bs)
        self._lock = threading.Lock()
        self._lru: OrderedDict[tuple[str, int], Future[bytes]] = OrderedDict()
        self._last_end: OrderedDict[str, int] = OrderedDict()  # name -> end offset of the latest request
        self._pool = ThreadPoolExecutor(max(2, storage.settings.concurrency), thread_name_prefix="ihb-s3-ra")

    def sequential(self, name: str, offset: int, length: int) -> bool:
        """True if this request continues (or overlaps the block of) the previous one on this object. A
        request after one that reached the object's end (a pack trailer after its footer) is not."""
        size = self.st._sizes.get(name)
        with self._lock:
            prev = self._last_end.get(name)
            self._last_end[name] = offset + length
            self._last_end.move_to_end(name)
            while len(self._last_end) > 256:
                self._last_end.popitem(last=False)
            if prev is None or (size is not None and prev >= size):
                return False
            return prev - self.bs <= offset <= prev + self.bs

    def _block(self, name: str, idx: int, size: int | None) -> Future[bytes]:
        key = (name, idx)
        with self._lock:
            fut = self._lru.get(key)
            if fut is not None:
                self._lru.move_to_end(key)
                return fut
            if size is not None and idx * self.bs >= size:
                done: Future[bytes] = Future()
                done.set_result(b"")
                return done
            fut = self._pool.submit(self.st._get_range, name, idx * self.bs, self.bs)
            self._lru[key] = fut
            while len(self._lru) > self.max_blocks:
                self._lru.popitem(last=False)
        return fut

    def read(self, name: str, offset: int, length: int) -> bytes:
        first, last = offset // self.bs, (offset + length - 1) // self.bs
        size = self.st._sizes.get(name)
        futs = [self._block(name, i, size) for i in range(first, last + 1)]
        for i in range(last + 1, last + 1 + self.st.settings.readahead):
            if size is not None and i * self.bs >= size:
                break
            self._block(name, i, size)
        out = []
        for i, f in zip(range(first, last + 1), futs, strict=True):
            try:
                data = f.result()
            except BaseException:
                with self._lock:
                    if self._lru.get((name, i)) is f:
                        del self._lru[(name, i)]  # do not cache a failure
                raise
            lo = max(offset - i * self.bs, 0)
            hi = min(offset + length - i * self.bs, len(data))
            out.append(data[lo:hi])
        res = b"".join(out)
        if len(res) != length:
            raise EOFError(f"short read of {name} at {offset}: {len(res)} of {length} bytes")
        return res

    def forget(self, name: str) -> None:
        with self._lock:
            for k in [k for k in self._lru if k[0] == name]:
                del self._lru[k]
            self._last_end.pop(name, None)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# --- the storage ---------------------------------------------------------------------------------------
def _ram_spool() -> str | None:
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK):
        return os.path.join(shm, f"ihb-s3-spool-{os.getuid()}")
    return None


class S3Storage:
    """The ``Storage`` protocol over one bucket and prefix. Thread-safe (a boto3 client is)."""

    # BlobWriter uploads this many packs side by side while packing goes on (a synchronous 32 MiB upload
    # stalled every worker). 1 GiB to Ceph RGW on this machine: 9.6 s with one upload at a time, 8.2 s
    # with 2, 7.3 s with 4. Costs up to (4 + 1) x 32 MiB of spool (RAM) per writer.
    background_uploads = 4

    def __init__(self, settings: S3Settings, spool_root: str) -> None:
        self.settings = settings
        self.location = settings.location
        self.root = None  # not a directory: callers that need a local path must check for LocalStorage
        # Packs are spooled, fsync'ed by PackWriter (durability a local directory needs) and uploaded;
        # for a bucket the durable copy is the object, so the spool lives in RAM when it can: that
        # fsync then costs nothing instead of writing every byte to the appliance's disk as well.
        # At most (background_uploads + 1) packs per writer are spooled at once.
        root = settings.spool_dir or _ram_spool() or os.path.join(spool_root, "s3-spool")
        self._spool = os.path.join(root, hashlib.sha256(settings.location.encode()).hexdigest()[:16])
        import boto3  # ~0.3 s: only when a bucket is actually used, not on every CLI start
        from botocore.config import Config

        self.client = boto3.client(
            "s3",
            endpoint_url=settings.endpoint,
            aws_access_key_id=settings.access_key,
            aws_secret_access_key=settings.secret_key,
            region_name=settings.region,
            verify=settings.verify,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"total_max_attempts": 1},  # one retry policy, ours (below)
                connect_timeout=5,
                read_timeout=60,
                max_pool_connections=4 * settings.concurrency + 8,
                request_checksum_calculation=settings.checksums,
                response_checksum_validation="when_required",
                tcp_keepalive=True,
            ),
        )
        self._sizes: dict[str, int] = {}  # learnt from listings, HEADs and Content-Range; objects never change
        self._inm_put = True  # does the server accept If-None-Match on PUT (set False on 501)
        self._uploads = ThreadPoolExecutor(settings.concurrency, thread_name_prefix="ihb-s3-up")
        self._blocks = _Blocks(self)
        self._lock_lost: str | None = None
        self._locks: list[S3Lock] = []

    @classmethod
    def from_location(cls, url: str, cache_dir: str) -> S3Storage:
        return cls(S3Settings.from_location(url), cache_dir)

    # --- plumbing ------------------------------------------------------------------------------------
    def _key(self, name: str) -> str:
        if name.startswith("/") or ".." in name.split("/"):
            raise ValueError(f"bad object name {name!r}")
        return self.settings.prefix + name

    def _call(self, what: str, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """Run one request, retrying transient failures with jittered exponential backoff."""
        deadline = time.monotonic() + self.settings.retry_seconds
        delay = 0.2
        attempt = 0
        while True:
            try:
                return fn(*args, **kw)
            except Exception as e:
                attempt += 1
                if not _retryable(e):
                    raise
                if time.monotonic() + delay > deadline:
                    raise ObjectStoreError(
                        f"object store {self.settings.endpoint} failed {what} for {self.settings.retry_seconds:.0f} s "
                        f"({attempt} attempts): {e}; check that it is running and reachable"
                    ) from e
                log.info("%s on %s failed (%s); retry %d in %.1f s", what, self.settings.endpoint, e, attempt, delay)
                time.sleep(delay * random.uniform(0.7, 1.3))
                delay = min(delay * 2, 5.0)

    def _translate(self, e: Exception, name: str) -> BaseException:
        """Map a non-retryable client error to the project's errors (404 -> FileNotFoundError)."""
        if isinstance(e, bexc.ClientError):
            code, status = _code(e)
            if code == "NoSuchBucket":
                return RepositoryNotFound(f"bucket {self.settings.bucket} does not exist at {self.settings.endpoint}; "
                                          f"create a repository with `ihb init --repo {self.location}`")
            if _is_404(e):
                return FileNotFoundError(2, "no such object", name)
            if code in _DENIED or status == 403:
                return ObjectStoreError(f"{self.settings.endpoint} denied access to {self.settings.bucket}/{name} "
                                        f"({code}); check the access key and secret (IHB_S3_ACCESS_KEY/IHB_S3_SECRET_KEY)")
            if code in ("QuotaExceeded", "EntityTooLarge", "InsufficientStorage") or status == 507:
                return NoSpace(f"the object store refused {name}: {code}; free space or raise the quota, then retry")
            return ObjectStoreError(f"{self.settings.endpoint}: {name}: {code} ({status}): {e}")
        return e

    def _check_lock(self) -> None:
        if self._lock_lost:
            raise RepositoryLocked(self._lock_lost)

    # --- Storage protocol ----------------------------------------------------------------------------
    def exists(self, name: str) -> bool:
        try:
            self._head(name)
            return True
        except FileNotFoundError:
            return False

    def _head(self, name: str) -> dict[str, Any]:
        try:
            r = self._call("HEAD", self.client.head_object, Bucket=self.settings.bucket, Key=self._key(name))
        except bexc.ClientError as e:
            raise self._translate(e, name) from None  # HEAD has no body: a missing bucket is a 404 too
        self._sizes[name] = int(r["ContentLength"])
        return r

    def _check_bucket(self) -> None:
        try:
            self._call("HEAD bucket", self.client.head_bucket, Bucket=self.settings.bucket)
        except bexc.ClientError as e:
            if _code(e)[1] == 404:
                raise RepositoryNotFound(f"bucket {self.settings.bucket} does not exist at {self.settings.endpoint}; "
                                         f"create a repository with `ihb init --repo {self.location}`") from None
            raise self._translate(e, "") from None

    def size(self, name: str) -> int:
        n = self._sizes.get(name)
        if n is None:
            n = int(self._head(name)["ContentLength"])
        return n

    def _get_range(self, name: str, offset: int, length: int | None) -> bytes:
        kw: dict[str, Any] = {"Bucket": self.settings.bucket, "Key": self._key(name)}
        if length is not None:
            if length <= 0:
                return b""
            kw["Range"] = f"bytes={offset}-{offset + length - 1}"
        elif offset:
            kw["Range"] = f"bytes={offset}-"

        def once() -> bytes:
            r = self.client.get_object(**kw)
            data: bytes = r["Body"].read()  # StreamingBody checks Content-Length (IncompleteReadError)
            cr = r.get("ContentRange")
            if cr and "/" in cr and not cr.endswith("/*"):
                self._sizes[name] = int(cr.rsplit("/", 1)[1])
            elif "Range" not in kw:
                self._sizes[name] = len(data)
            return data

        try:
            return self._call("GET", once)
        except bexc.ClientError as e:
            code, status = _code(e)
            if status == 416 or code == "InvalidRange":
                return b""
            raise self._translate(e, name) from None

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        if length is None:
            return self._get_range(name, offset, None)
        if length <= 0:
            return b""
        if self._blocks.sequential(name, offset, length):
            size = self._sizes.get(name)
            if size is not None:
                length = min(length, max(size - offset, 0))
            return self._blocks.read(name, offset, length)
        return self._get_range(name, offset, length)

    def put_bytes(self, name: str, data: bytes) -> None:
        self._check_lock()
        key = self._key(name)
        digest = hashlib.md5(data, usedforsecurity=False).digest()
        md5 = digest.hex()
        attempts = 0

        def once() -> None:
            nonlocal attempts
            attempts += 1
            # Content-MD5: the store itself refuses a body that is not the one we sealed (a request cut
            # short without 100-continue left a 0-byte object in SeaweedFS without it).
            kw: dict[str, Any] = {"Bucket": self.settings.bucket, "Key": key, "Body": data,
                                  "ContentMD5": base64.b64encode(digest).decode()}
            if self._inm_put:
                kw["IfNoneMatch"] = "*"
            elif attempts == 1 and self.exists(name):
                raise ObjectExists(f"object {name} already exists")
            self.client.put_object(**kw)

        try:
            self._call("PUT", once)
        except bexc.ClientError as e:
            code, status = _code(e)
            if _is_412(e):
                if attempts > 1 and self._same_object(name, md5, len(data)):
                    pass  # an earlier attempt landed and only its answer was lost
                else:
                    raise ObjectExists(f"object {name} already exists") from None
            elif self._inm_put and (status == 501 or code == "NotImplemented"):
                log.warning("%s does not support If-None-Match on PUT; falling back to a HEAD check (racy)",
                            self.settings.endpoint)
                self._inm_put = False
                self.put_bytes(name, data)
                return
            else:
                raise self._translate(e, name) from None
        self._sizes[name] = len(data)

    def replace_bytes(self, name: str, data: bytes) -> None:
        """Overwrite a small object (the key file on ``ihb key import``): a plain PUT, which S3 applies
        atomically; the only write that does not send ``If-None-Match``."""
        self._check_lock()
        key = self._key(name)
        self._call("PUT", lambda: self.client.put_object(Bucket=self.settings.bucket, Key=key, Body=data))
        self._sizes[name] = len(data)

    def _same_object(self, name: str, md5: str | None, size: int) -> bool:
        try:
            h = self._head(name)
        except FileNotFoundError:
            return False
        if int(h["ContentLength"]) != size:
            return False
        etag = str(h.get("ETag", "")).strip('"')
        return md5 is None or "-" in etag or etag == md5

    def put_file(self, name: str, path: str) -> None:
        """Upload a finished spool file (multipart and parallel when large), then remove the spool file,
        as LocalStorage's link-into-place consumes it."""
        try:
            size = os.path.getsize(path)
            if size <= self.settings.part_size:
                with open(path, "rb") as f:
                    data = f.read()
                self.put_bytes(name, data)
            else:
                self._multipart(name, path, size)
        finally:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def _multipart(self, name: str, path: str, size: int) -> None:
        self._check_lock()
        if self.exists(name):
            raise ObjectExists(f"object {name} already exists")
        key, bucket = self._key(name), self.settings.bucket
        try:
            up = self._call("CreateMultipartUpload", self.client.create_multipart_upload, Bucket=bucket, Key=key)
        except bexc.ClientError as e:
            raise self._translate(e, name) from None
        upload_id = up["UploadId"]
        ps = self.settings.part_size
        nparts = (size + ps - 1) // ps
        if size - (nparts - 1) * ps < ps // 4 and nparts > 1:  # avoid a tiny last part: fold it in
            nparts -= 1

        def part(i: int) -> dict[str, Any]:
            off = i * ps
            ln = ps if i < nparts - 1 else size - off
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                body = os.pread(fd, ln, off)
            finally:
                os.close(fd)
            if len(body) != ln:
                raise OSError(f"spool file {path} shrank while uploading")
            r = self._call(f"UploadPart {i + 1}/{nparts}", self.client.upload_part, Bucket=bucket, Key=key,
                           UploadId=upload_id, PartNumber=i + 1, Body=body)
            return {"ETag": r["ETag"], "PartNumber": i + 1}

        try:
            parts = list(self._uploads.map(part, range(nparts)))
            self._check_lock()
            attempts = 0

            def complete() -> None:
                nonlocal attempts
                attempts += 1
                self.client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id,
                                                      MultipartUpload={"Parts": parts}, IfNoneMatch="*")

            try:
                self._call("CompleteMultipartUpload", complete)
            except bexc.ClientError as e:
                code, _ = _code(e)
                if attempts > 1 and code in ("NoSuchUpload", "PreconditionFailed") and self._same_object(name, None, size):
                    pass  # the first completion landed, its answer was lost
                elif _is_412(e):
                    raise ObjectExists(f"object {name} already exists") from None
                else:
                    raise self._translate(e, name) from None
        except BaseException:
            try:
                self.client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            except Exception as e:  # noqa: BLE001 - best effort; cleanup_spool aborts stale uploads later
                log.info("could not abort multipart upload of %s: %s", name, e)
            raise
        self._sizes[name] = size

    def _listing(self, prefix: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """(name, S3 object record) of every object under ``prefix``, page by page."""
        plen = len(self.settings.prefix)
        token: str | None = None
        while True:
            kw: dict[str, Any] = {"Bucket": self.settings.bucket, "Prefix": self._key(prefix) if prefix else self.settings.prefix,
                                  "MaxKeys": 1000}
            if token:
                kw["ContinuationToken"] = token
            try:
                page = self._call("LIST", self.client.list_objects_v2, **kw)
            except bexc.ClientError as e:
                raise self._translate(e, prefix) from None
            for obj in page.get("Contents", ()):
                yield obj["Key"][plen:], obj
            token = page.get("NextContinuationToken") if page.get("IsTruncated") else None
            if not token:
                return

    def list(self, prefix: str) -> Iterator[str]:
        for name, obj in self._listing(prefix):
            self._sizes[name] = int(obj["Size"])
            yield name

    def list_with_times(self, prefix: str) -> list[tuple[str, float, int]]:
        """(name, server LastModified as epoch seconds, size), for lock staleness by the server's clock."""
        return [(name, obj["LastModified"].timestamp(), int(obj["Size"])) for name, obj in self._listing(prefix)]

    def delete(self, name: str) -> None:
        self._blocks.forget(name)
        self._sizes.pop(name, None)
        try:
            self._call("DELETE", self.client.delete_object, Bucket=self.settings.bucket, Key=self._key(name))
        except bexc.ClientError as e:
            if not _is_404(e):
                raise self._translate(e, name) from None

    def spool_dir(self) -> str:
        os.makedirs(self._spool, mode=0o700, exist_ok=True)
        return self._spool

    # --- what Repository needs beyond the protocol ----------------------------------------------------
    def check_exists(self) -> None:
        if not self.exists("config"):
            self._check_bucket()
            raise RepositoryNotFound(f"no repository at {self.location}; create one with `ihb init --repo {self.location}`")

    def prepare_init(self) -> None:
        """Create the bucket if needed and refuse a prefix that already holds objects."""
        try:
            self._call("HEAD bucket", self.client.head_bucket, Bucket=self.settings.bucket)
        except bexc.ClientError as e:
            if _code(e)[1] != 404:
                raise self._translate(e, "") from None
            try:
                self._call("CreateBucket", self.client.create_bucket, Bucket=self.settings.bucket)
            except bexc.ClientError as e2:
                if _code(e2)[0] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise self._translate(e2, "") from None
        for _ in self.list(""):
            raise RepositoryExists(f"{self.location} is not empty; choose an empty bucket or another prefix")

    def cleanup_spool(self) -> int:
        """Remove spool files of dead local writers, and abort multipart uploads older than a day
        (a crashed writer's parts are invisible but billed)."""
        removed = remove_dead_spool_files(self._spool)
        try:
            r = self._call("ListMultipartUploads", self.client.list_multipart_uploads, Bucket=self.settings.bucket,
                           Prefix=self.settings.prefix + "data/")
            cutoff = time.time() - 86400
            for u in r.get("Uploads", ()):
                if u["Initiated"].timestamp() < cutoff:
                    self.client.abort_multipart_upload(Bucket=self.settings.bucket, Key=u["Key"], UploadId=u["UploadId"])
                    removed += 1
        except (bexc.ClientError, ObjectStoreError) as e:
            log.info("could not list stale multipart uploads: %s", e)
        return removed

    def lock(self, exclusive: bool, wait: float) -> S3Lock:
        lk = S3Lock(self, exclusive, wait)
        self._locks.append(lk)
        return lk

    def close(self) -> None:
        for lk in list(self._locks):
            lk.release()
        self._blocks.close()
        self._uploads.shutdown(wait=True)


# --- the bucket lock -----------------------------------------------------------------------------------
def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


class S3Lock:
    """A lease lock made of objects in the bucket, for repositories that several appliances (or a sync
    target and its source) reach; flock cannot span machines.

    Each holder writes ``locks/<s|x>-<random>`` (create-only) holding host, boot id and pid, then lists
    ``locks/``. It holds the lock if no *live* conflicting object exists (shared conflicts only with
    exclusive; exclusive with everything); otherwise it deletes its object, waits a jittered moment and
    tries again until ``wait`` runs out. Two contenders that see each other both back off, so at most
    one side wins, never both; listing is strongly consistent on RGW, SeaweedFS and AWS.

    Liveness is a lease measured on the **server's** clock: a heartbeat thread re-creates the holder's
    object every ``lease/4`` (new name, then delete the old one), so its LastModified stays fresh. An
    object whose LastModified is older than ``lease`` relative to our own freshly written object is
    stale and removed; so is one from this same host and boot whose pid is dead (no waiting after a
    kill -9). A holder whose heartbeat has failed for ``0.9 * lease`` marks the storage: every later
    write raises ``RepositoryLocked`` instead of racing a process that may have taken the lock over.
    """

    def __init__(self, storage: S3Storage, exclusive: bool, wait: float) -> None:
        self.st = storage
        self.exclusive = exclusive
        self.lease = storage.settings.lock_lease
        self.doc = json.dumps({"v": 1, "exclusive": exclusive, "host": os.uname().nodename, "boot": _boot_id(),
                               "pid": os.getpid(), "time": time.time()}).encode()
        self.name: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._name_lock = threading.Lock()
        self._acquire(wait)
        self._thread = threading.Thread(target=self._heartbeat, name="ihb-s3-lock", daemon=True)
        self._thread.start()

    def _new_name(self) -> str:
        return f"{LOCK_PREFIX}{'x' if self.exclusive else 's'}-{os.urandom(12).hex()}"

    def _acquire(self, wait: float) -> None:
        deadline = time.monotonic() + wait
        while True:
            name = self._new_name()
            self.st.put_bytes(name, self.doc)
            blockers = self._blockers(name)
            if not blockers:
                self.name = name
                return
            self.st.delete(name)
            if time.monotonic() >= deadline:
                who = self._describe(blockers[0])
                what = "an exclusive" if self.exclusive else "a shared"
                raise RepositoryLocked(
                    f"cannot take {what} lock on {self.st.location}: held by {who}; retry when it has finished "
                    f"(a lock whose holder died expires after {self.lease:.0f} s)"
                )
            time.sleep(random.uniform(0.1, 0.6))

    def _blockers(self, mine: str) -> list[str]:
        objs = self.st.list_with_times(LOCK_PREFIX)
        now = next((t for n, t, _ in objs if n == mine), None)
        if now is None:
            raise ObjectStoreError(f"lock object {mine} vanished right after it was written on {self.st.location}")
        out = []
        for n, t, _ in objs:
            if n == mine:
                continue
            other_x = n[len(LOCK_PREFIX):].startswith("x-")
            if not (self.exclusive or other_x):
                continue  # shared + shared: compatible, no need to look closer
            if now - t > self.lease:
                log.warning("removing stale repository lock %s (last refreshed %.0f s ago)", n, now - t)
                self.st.delete(n)
                continue
            if self._dead_here(n):
                log.info("removing lock %s of a dead process on this host", n)
                self.st.delete(n)
                continue
            out.append(n)
        return out

    def _info(self, name: str) -> dict[str, Any]:
        try:
            doc = json.loads(self.st.get(name))
            return doc if isinstance(doc, dict) else {}
        except (FileNotFoundError, ValueError):
            return {}

    def _dead_here(self, name: str) -> bool:
        d = self._info(name)
        return (d.get("host") == os.uname().nodename and d.get("boot") == _boot_id() and isinstance(d.get("pid"), int)
                and d["pid"] != os.getpid() and not _pid_alive(d["pid"]))

    def _describe(self, name: str) -> str:
        d = self._info(name)
        if not d:
            return f"lock object {name}"
        kind = "exclusive" if d.get("exclusive") else "shared"
        return f"{kind} lock of pid {d.get('pid')} on {d.get('host')} ({name})"

    def _heartbeat(self) -> None:
        interval = max(self.lease / 4, 0.5)
        last_ok = time.monotonic()
        while not self._stop.wait(interval):
            try:
                new = self._new_name()
                self.st.put_bytes(new, self.doc)
                with self._name_lock:
                    old, self.name = self.name, new
                if old:
                    self.st.delete(old)
                last_ok = time.monotonic()
            except Exception as e:  # noqa: BLE001 - a heartbeat must not die
                if isinstance(e, RepositoryLocked):
                    return
                if time.monotonic() - last_ok > 0.9 * self.lease:
                    self.st._lock_lost = (
                        f"lost the repository lock on {self.st.location}: it could not be refreshed for "
                        f"{self.lease:.0f} s ({e}); another process may own the repository now; retry"
                    )
                    log.error("%s", self.st._lock_lost)
                    return
                log.info("lock heartbeat failed: %s", e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        with self._name_lock:
            name, self.name = self.name, None
        if name:
            try:
                self.st.delete(name)
            except (ObjectStoreError, OSError) as e:
                log.warning("could not remove lock %s (%s); it expires after %.0f s", name, e, self.lease)
        if self in self.st._locks:
            self.st._locks.remove(self)
