"""Notifications: tell the service manager when a job fails, when a job misses its RPO, and when it is
fine again, by e-mail (a configured SMTP server) and by webhooks (JSON POST, HMAC-signed).

Why a module of its own: the alerts are decided in ``jobs.py`` (once per breach, so nobody is paged
every scheduler tick); this module only delivers them. Delivery must never fail or hang the backup
that raised the alert: every attempt has a timeout, failures are retried with exponential backoff,
and what finally could not be delivered is logged and recorded in ``notifications.jsonl`` beside the
job records (``ihb notify log``), never raised.

Config::

    [notify]
    timeout = 10        # seconds per attempt
    retries = 3         # attempts per channel
    backoff = 1.0       # seconds before the 2nd attempt, doubled for each further one

    [notify.smtp]
    host = "mail.example.com"
    port = 587
    starttls = true
    username = "ihb"
    password_file = "/etc/ihb/smtp.password"
    from = "ihb@example.com"
    to = ["ops@example.com"]

    [[notify.webhooks]]
    url = "https://hooks.example.com/ihb"
    secret = "..."      # or secret_file; the body is signed: X-Ihb-Signature: sha256=<hex HMAC-SHA256>
    cafile = "..."      # optional, for https with a private CA (smtp takes cafile too)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import smtplib
import socket
import ssl
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any

from repo.errors import InvalidArgument

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Ihb-Signature"
EVENTS = ("job-failed", "rpo-missed", "recovered", "test")


def sign(secret: bytes, body: bytes) -> str:
    """The value of ``X-Ihb-Signature`` for ``body``: ``sha256=`` + hex HMAC-SHA256 with the secret."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify_signature(secret: bytes, body: bytes, header: str) -> bool:
    """For receivers (and tests): constant-time comparison of a received signature."""
    return hmac.compare_digest(sign(secret, body), header or "")


def _read_secret(path: str, what: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as e:
        raise InvalidArgument(f"[notify] {what} {path} cannot be read: {e.strerror}") from None


@dataclass(frozen=True)
class SmtpTarget:
    host: str
    sender: str
    to: tuple[str, ...]
    port: int = 25
    starttls: bool = False
    ssl: bool = False  # SMTPS (implicit TLS, usually port 465)
    username: str = ""
    password_file: str = ""
    cafile: str = ""  # trust this CA for STARTTLS/SMTPS instead of the system store

    @classmethod
    def from_obj(cls, o: Mapping[str, Any]) -> SmtpTarget:
        if not o.get("host") or not o.get("to"):
            raise InvalidArgument("[notify.smtp] needs host and to = [addresses]")
        to = o["to"]
        to = (to,) if isinstance(to, str) else tuple(str(x) for x in to)
        sender = str(o.get("from") or f"ihb@{socket.getfqdn()}")
        return cls(host=str(o["host"]), sender=sender, to=to, port=int(o.get("port", 465 if o.get("ssl") else 25)),
                   starttls=bool(o.get("starttls", False)), ssl=bool(o.get("ssl", False)),
                   username=str(o.get("username", "")), password_file=str(o.get("password_file", "")),
                   cafile=str(o.get("cafile", "")))

    def describe(self) -> str:
        return f"smtp://{self.host}:{self.port} to {', '.join(self.to)}"


@dataclass(frozen=True)
class Webhook:
    url: str
    secret: str = ""
    cafile: str = ""  # https: trust this CA instead of the system store

    @classmethod
    def from_obj(cls, o: Mapping[str, Any]) -> Webhook:
        url = str(o.get("url", ""))
        if not url.startswith(("http://", "https://")):
            raise InvalidArgument(f"[[notify.webhooks]] url must be http:// or https://, not {url!r}")
        secret = str(o.get("secret", ""))
        if not secret and o.get("secret_file"):
            secret = _read_secret(str(o["secret_file"]), "webhook secret_file")
        return cls(url, secret, str(o.get("cafile", "")))


@dataclass(frozen=True)
class NotifyConfig:
    smtp: SmtpTarget | None = None
    webhooks: tuple[Webhook, ...] = ()
    timeout: float = 10.0
    retries: int = 3
    backoff: float = 1.0

    @property
    def enabled(self) -> bool:
        return self.smtp is not None or bool(self.webhooks)

    @classmethod
    def from_raw(cls, raw: Mapping[str, Any]) -> NotifyConfig:
        sec = raw.get("notify") or {}
        if not isinstance(sec, dict):
            raise InvalidArgument("[notify] must be a table")
        hooks = sec.get("webhooks", [])
        if isinstance(hooks, dict):
            hooks = [hooks]
        return cls(smtp=SmtpTarget.from_obj(sec["smtp"]) if sec.get("smtp") else None,
                   webhooks=tuple(Webhook.from_obj(h) for h in hooks),
                   timeout=float(sec.get("timeout", 10.0)), retries=max(1, int(sec.get("retries", 3))),
                   backoff=float(sec.get("backoff", 1.0)))


@dataclass
class Event:
    """One notification: what happened to which job, said once to every channel."""

    kind: str  # job-failed | rpo-missed | recovered | test
    job: str
    message: str
    time_ns: int
    tenant: str = ""
    host: str = ""
    alert: str = ""  # the alert id (a recovery names the alert it resolves)
    details: dict[str, Any] = field(default_factory=dict)
    appliance: str = field(default_factory=socket.gethostname)

    @property
    def subject(self) -> str:
        label = {"job-failed": "FAILED", "rpo-missed": "RPO MISSED", "recovered": "RECOVERED", "test": "TEST"}
        who = f" [{self.tenant}]" if self.tenant else ""
        return f"[ihb {self.appliance}] {label.get(self.kind, self.kind)}: {self.job}{who}"

    def to_obj(self) -> dict[str, Any]:
        o = asdict(self)
        o["event"] = o.pop("kind")
        o["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.time_ns / 1e9))
        return o

    def body_text(self) -> str:
        lines = [self.message, "", f"event:     {self.kind}", f"job:       {self.job}"]
        if self.tenant:
            lines.append(f"tenant:    {self.tenant}")
        if self.host:
            lines.append(f"host:      {self.host}")
        lines.append(f"time:      {self.to_obj()['time']}")
        lines.append(f"appliance: {self.appliance}")
        for k, v in self.details.items():
            if v not in (None, "", [], {}):
                lines.append(f"{k + ':':10} {v}")
        return "\n".join(lines) + "\n"


@dataclass
class Delivery:
    """What happened to one event on one channel (a line of ``notifications.jsonl``)."""

    id: str
    event: str
    job: str
    alert: str
    channel: str  # email | webhook
    target: str
    status: str  # sent | failed
    attempts: int
    time_ns: int
    error: str = ""


class _Permanent(Exception):
    """A failure that retrying cannot fix (a 4xx answer, a refused login)."""


def _untrusted(what: str, e: ssl.SSLCertVerificationError) -> _Permanent:
    return _Permanent(f"the {what}'s TLS certificate is not trusted ({e.verify_message}); set cafile "
                      "to the CA that signed it")


class Notifier:
    """Delivers events to every configured channel. ``send`` never raises."""

    def __init__(self, conf: NotifyConfig, record_dir: str | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.conf = conf
        self.record_path = os.path.join(record_dir, "notifications.jsonl") if record_dir else None
        self._sleep = sleep

    @classmethod
    def from_config(cls, raw: Mapping[str, Any], record_dir: str | None) -> Notifier | None:
        conf = NotifyConfig.from_raw(raw)
        return cls(conf, record_dir) if conf.enabled else None

    def send(self, ev: Event) -> list[Delivery]:
        out = []
        if self.conf.smtp is not None:
            out.append(self._deliver(ev, "email", self.conf.smtp.describe(), lambda: self._email(ev)))
        for hook in self.conf.webhooks:
            out.append(self._deliver(ev, "webhook", hook.url, lambda h=hook: self._webhook(ev, h)))  # type: ignore[misc]
        return out

    def _deliver(self, ev: Event, channel: str, target: str, attempt: Callable[[], None]) -> Delivery:
        d = Delivery(uuid.uuid4().hex[:16], ev.kind, ev.job, ev.alert, channel, target, "failed", 0, 0)
        delay = self.conf.backoff
        while d.attempts < self.conf.retries:
            d.attempts += 1
            try:
                attempt()
                d.status, d.error = "sent", ""
                break
            except _Permanent as e:
                d.error = str(e)
                break
            except Exception as e:  # noqa: BLE001 - any delivery failure is retried, then recorded
                d.error = f"{type(e).__name__}: {e}"
                if d.attempts < self.conf.retries:
                    self._sleep(delay)
                    delay *= 2
        d.time_ns = time.time_ns()
        if d.status != "sent":
            log.warning("notification %s for job %s not delivered by %s to %s after %d attempts: %s",
                        ev.kind, ev.job, channel, target, d.attempts, d.error)
        self._record(d)
        return d

    def _record(self, d: Delivery) -> None:
        if self.record_path is None:
            return
        from appliance.jobs import _JsonLines

        try:
            _JsonLines(self.record_path).append(asdict(d))
        except OSError as e:
            log.warning("notification record not written: %s", e)

    # --- channels ---------------------------------------------------------------------------------------
    def _email(self, ev: Event) -> None:
        s = self.conf.smtp
        assert s is not None
        msg = EmailMessage()
        msg["Subject"] = ev.subject
        msg["From"] = s.sender
        msg["To"] = ", ".join(s.to)
        msg["Date"] = formatdate(ev.time_ns / 1e9)
        msg["Message-ID"] = make_msgid(domain="ihb")
        msg["X-Ihb-Event"] = ev.kind
        msg.set_content(ev.body_text())
        tls = ssl.create_default_context(cafile=s.cafile or None)
        password = _read_secret(s.password_file, "smtp password_file") if s.password_file else ""
        cls = smtplib.SMTP_SSL if s.ssl else smtplib.SMTP
        kw: dict[str, Any] = {"context": tls} if s.ssl else {}
        try:
            conn = cls(s.host, s.port, timeout=self.conf.timeout, **kw)
        except ssl.SSLCertVerificationError as e:
            raise _untrusted("SMTP server", e) from None
        with conn:
            conn.ehlo()
            if s.starttls and not s.ssl:
                try:
                    conn.starttls(context=tls)
                except ssl.SSLCertVerificationError as e:
                    raise _untrusted("SMTP server", e) from None
                conn.ehlo()
            if s.username:
                try:
                    conn.login(s.username, password)
                except smtplib.SMTPAuthenticationError as e:
                    raise _Permanent(f"SMTP login as {s.username} refused: {e.smtp_code} "
                                     f"{e.smtp_error.decode(errors='replace')}") from None
            conn.send_message(msg)

    def _webhook(self, ev: Event, hook: Webhook) -> None:
        body = json.dumps(ev.to_obj(), sort_keys=True, default=str).encode()
        headers = {"Content-Type": "application/json", "User-Agent": "ihb-notify/1", "X-Ihb-Event": ev.kind}
        if hook.secret:
            headers[SIGNATURE_HEADER] = sign(hook.secret.encode(), body)
        req = urllib.request.Request(hook.url, data=body, headers=headers, method="POST")
        try:
            tls = ssl.create_default_context(cafile=hook.cafile or None) if hook.url.startswith("https:") else None
            with urllib.request.urlopen(req, timeout=self.conf.timeout, context=tls) as resp:
                resp.read()
        except urllib.error.HTTPError as e:
            if 400 <= e.code < 500 and e.code not in (408, 425, 429):
                raise _Permanent(f"HTTP {e.code} {e.reason}") from None
            raise
        except urllib.error.URLError as e:
            if isinstance(e.reason, ssl.SSLCertVerificationError):
                raise _untrusted("webhook", e.reason) from None
            raise


def read_log(record_dir: str) -> list[dict[str, Any]]:
    from appliance.jobs import _JsonLines

    return list(_JsonLines(os.path.join(record_dir, "notifications.jsonl")).lines())
