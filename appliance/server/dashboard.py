"""The web dashboard (``/ui/``) and ``/metrics``: server-rendered pages over ``views``.

Why server-rendered: the appliance serves operators and customers from one small process; pages are
plain HTML with inline CSS and inline SVG charts (charts.py), so there is no script to trust, bundle or
audit, and the strict Content-Security-Policy forbids any. The pages:

* ``/ui/login`` — paste an admin or tenant token; a session cookie follows (websessions.py);
  agent tokens cannot log in. ``POST /ui/logout`` ends the session.
* ``/ui/`` — restore points per host/VM with their age against the RPO, repository usage, the job
  history with charts of duration and size over time (``?job=NAME`` for one job).
* ``/ui/requests`` — restore requests; pending ones have Approve/Deny for authorizers (admins and the
  request's own tenant, subject to the tenant's policy in ``appliance.restore_requests``).

The viewer is a ``Principal`` built from the session's token on every request, so the tenant
boundary is the one ``views`` draws for the API. ``/metrics`` is described in metrics.py.
"""

from __future__ import annotations

import html
import ipaddress
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote

from appliance.cli.common import human_bytes
from appliance.cli.when import iso
from appliance.restore_requests import RestoreRequestStore
from repo.errors import IhbError

from . import charts, metrics, views
from . import websessions as ws_
from .app import Principal
from .http import HTTPError, Request, Response
from .state import token_digest
from .websessions import COOKIE, LOGIN_COOKIE, SessionStore, WebSession, cookies, same

if TYPE_CHECKING:
    from .api import ApiServer

log = logging.getLogger(__name__)

UI = "/ui"
FORM_MAX = 16 * 1024
HISTORY_ROWS = 200  # job table rows shown
CHART_RUNS = 500  # newest runs drawn in the charts (an SVG point each)
SECURITY_HEADERS = [
    ("content-security-policy", "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
                                "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    ("x-frame-options", "DENY"), ("x-content-type-options", "nosniff"), ("referrer-policy", "same-origin"),
]
CSS = ("body{font-family:system-ui,sans-serif;margin:0;color:#222}header{background:#234;color:#fff;padding:8px 16px;"
       "display:flex;gap:16px;align-items:center}header a{color:#fff}header form{margin-left:auto}"
       "main{padding:8px 16px}table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #ccc;"
       "padding:2px 8px;font-size:90%;text-align:left}th{background:#f3f3f3}.num{text-align:right}"
       "tr.failed{background:#fdd}tr.warning{background:#ffd}span.bad{color:#b00;font-weight:bold}span.ok{color:#070}.key{display:inline-block;width:10px;height:10px}"
       ".err{background:#fdd;padding:6px;border:1px solid #b00}.chart .ct{font-weight:bold;font-size:13px}"
       ".chart .ax{font-size:11px;fill:#555}nav.jobs a{margin-right:8px}")

Page = Callable[[Request, WebSession, Principal], Awaitable[Response]]
esc = html.escape


def _redirect(to: str, *headers: tuple[str, str]) -> Response:
    return Response(303, b"", "text/plain", [("location", to), *SECURITY_HEADERS, *headers])


def _html(title: str, body: str, ws: WebSession | None = None, status: int = 200,
          headers: list[tuple[str, str]] | None = None) -> Response:
    nav = ""
    if ws is not None:
        who = "admin" if ws.role == "admin" else f"tenant {ws.tenant}"
        nav = (f"<header><b>ihb</b><a href='{UI}/'>Overview</a><a href='{UI}/requests'>Restore requests</a>"
               f"<span>signed in as {esc(who)}</span><form method='post' action='{UI}/logout'>"
               f"<input type='hidden' name='csrf' value='{esc(ws.csrf)}'><button id='logout'>Log out</button>"
               "</form></header>")
    doc = (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)} - ihb</title>"
           f"<style>{CSS}</style></head><body>{nav}<main><h1>{esc(title)}</h1>{body}</main></body></html>")
    return Response(status, doc.encode(), "text/html; charset=utf-8", [*SECURITY_HEADERS, *(headers or [])])


def _form(req: Request) -> dict[str, str]:
    ctype = req.header("content-type").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        raise HTTPError(415, "send the form as application/x-www-form-urlencoded")
    try:
        parsed = parse_qs(bytes(req.body).decode("utf-8"), keep_blank_values=True, max_num_fields=32)
    except (UnicodeDecodeError, ValueError):
        raise HTTPError(400, "the form cannot be read") from None
    return {k: v[0] for k, v in parsed.items()}


def _same_origin(req: Request) -> bool:
    """A second check beside the CSRF token: a browser that says where a POST comes from (Origin,
    Sec-Fetch-Site) must name this appliance. Clients that say nothing pass on the token alone."""
    site = req.header("sec-fetch-site")
    if site and site not in ("same-origin", "none"):
        return False
    origin = req.header("origin")
    if not origin or origin == "null":
        return True
    return origin.split("://", 1)[-1] == req.header("host")


def _is_loopback(remote: str) -> bool:
    host = remote.rsplit(":", 1)[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _dt(ns: int | None) -> str:
    return iso(ns) if ns else "-"


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _secs(v: float) -> str:
    return f"{v:.3g} s" if v < 10 else f"{v:.0f} s"


def _table(head: list[str], rows: list[str], empty: str) -> str:
    if not rows:
        return f"<p>{esc(empty)}</p>"
    return "<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>" + "".join(rows) + "</table>"


# --- page bodies ---------------------------------------------------------------------------------------
def restore_points_html(ov: views.Overview, admin: bool) -> str:
    rows = []
    for r in ov.restore_points:
        if r.rpo_ok is None:
            rpo = "-"
        else:
            rpo = (f"<span class='{'ok' if r.rpo_ok else 'bad'}'>{'within' if r.rpo_ok else 'MISSED'} "
                   f"{esc(r.rpo)}</span> ({esc(r.job)})")
        tenant = f"<td>{esc(r.tenant or '-')}</td>" if admin else ""
        rows.append(f"<tr class='rp'>{tenant}<td>{esc(r.kind)}</td><td class='host'>{esc(r.name)}</td>"
                    f"<td class='num'>{r.count}</td><td>{_dt(r.latest_ns)}</td>"
                    f"<td class='num'>{_age(r.age_seconds(ov.now_ns))}</td><td>{rpo}</td></tr>")
    head = (["tenant"] if admin else []) + ["kind", "host / VM", "restore points", "latest (UTC)", "age", "RPO"]
    return "<h2>Restore points</h2>" + _table(head, rows, "No restore points yet.")


def sla_html(ov: views.Overview, admin: bool) -> str:
    """The rows of `ihb sla`: how recent a point and how fast each job's host could be recovered."""
    rows = []
    for j in ov.sla:
        status = {"ok": "<span class='ok'>within RPO</span>", "late": "<span class='bad'>LATE</span>"}.get(
            j["rpo_status"], "no RPO")
        age = _age(j["age_seconds"]) if j["age_seconds"] is not None else "-"
        verified = "-"
        if j["last_verified_ns"]:
            verified = f"{_dt(j['last_verified_ns'])} ({esc(str(j['verified_by']))})"
        if j["last_verification_failed"]:
            verified += " <span class='bad'>last verification FAILED</span>"
        speed = (f"{human_bytes(j['restore_bytes_per_second'])}/s" if j["restore_bytes_per_second"] is not None
                 else "not measured")
        tenant = f"<td>{esc(j['tenant'] or '-')}</td>" if admin else ""
        rows.append(f"<tr class='sla'><td>{esc(j['job'])}</td>{tenant}<td>{esc(j['host'])}</td>"
                    f"<td>{esc(j['rpo'] or '-')}</td><td>{_dt(j['last_good_ns'])}</td><td class='num'>{age}</td>"
                    f"<td>{status}</td><td>{verified}</td><td>{speed}</td></tr>")
    head = ["job", *(["tenant"] if admin else []), "host / VM", "RPO", "last good (UTC)", "age", "status",
            "last verified", "restore speed"]
    return "<h2>Jobs and their SLA</h2>" + _table(head, rows, "No jobs configured ([[jobs]] in the config).")


def usage_html(u: dict[str, Any]) -> str:
    def ratio(v: Any) -> str:
        return f"{v:.2f}x" if v else "-"

    original, unique = float(u.get("original_bytes") or 0), float(u.get("unique_bytes") or 0)
    stored = float(u.get("pack_bytes", u.get("stored_chunk_bytes")) or 0)
    if u.get("scope") == "repository":
        facts = [("restore points", str(u["snapshots"])), ("original data", human_bytes(original)),
                 ("unique after deduplication", human_bytes(unique)),
                 ("stored", f"{human_bytes(stored)} in {u['packs']} packs, {u['chunks']} chunks"),
                 ("deduplication ratio", ratio(u.get("dedup_ratio"))),
                 ("compression ratio", ratio(u.get("compression_ratio")))]
    else:
        facts = [("your restore points", str(u["snapshots"])), ("original data", human_bytes(original)),
                 ("new data sent by your jobs", human_bytes(unique)), ("stored for your jobs", human_bytes(stored)),
                 ("deduplication ratio", ratio(u.get("dedup_ratio"))),
                 ("compression ratio", ratio(u.get("compression_ratio")))]
    rows = "".join(f"<tr><th>{esc(k)}</th><td class='num'>{esc(v)}</td></tr>" for k, v in facts)
    saved = max(0.0, original - stored)
    parts = [(f"stored {human_bytes(stored)}", stored, "#1f77b4"),
             (f"saved by deduplication and compression {human_bytes(saved)}", saved, "#a6d8a6")]
    legend = " ".join(f"<span class='key' style='background:{c}'></span> {esc(label)}" for label, _, c in parts)
    return (f"<h2>Repository usage</h2><table id='usage'>{rows}</table>"
            f"<p>{charts.usage_bar(parts, original)}<br>{legend}</p>")


def history_html(ov: views.Overview, job: str | None, admin: bool) -> str:
    names = sorted({r.job for r in ov.runs})
    links = [f"<a href='{UI}/'>{'<b>all jobs</b>' if job is None else 'all jobs'}</a>"]
    for n in names:
        label = f"<b>{esc(n)}</b>" if n == job else esc(n)
        links.append(f"<a href='{UI}/?job={quote(n, safe='')}'>{label}</a>")
    runs = [r for r in ov.runs if job is None or r.job == job]
    done = [r for r in runs if r.duration is not None and r.start_ns][-CHART_RUNS:]
    dur_series: dict[str, charts.Series] = {}
    for r in done:
        s = dur_series.setdefault(r.job, charts.Series(r.job))
        s.points.append(((r.start_ns or 0) / 1e9, r.duration or 0.0,
                         f"{r.job} {_dt(r.start_ns)}: {r.duration:.1f} s, {r.status}"))
    read = charts.Series("read")
    stored = charts.Series("stored")
    for r in done:
        t = (r.start_ns or 0) / 1e9
        read.points.append((t, r.bytes_read, f"{r.job} {_dt(r.start_ns)}: read {human_bytes(r.bytes_read)}"))
        stored.points.append((t, r.bytes_stored, f"{r.job} {_dt(r.start_ns)}: stored {human_bytes(r.bytes_stored)}"))
    dur_chart = charts.time_chart("Duration per run", list(dur_series.values()), _secs)
    size_chart = charts.time_chart("Size per run (read, stored)", [read, stored], human_bytes)
    rows = []
    for r in reversed(runs[-HISTORY_ROWS:]):
        tenant = f"<td>{esc(r.tenant or '-')}</td>" if admin else ""
        dur = f"{r.duration:.1f} s" if r.duration is not None else "-"
        rows.append(f"<tr class='run {esc(r.status)}'><td>{esc(r.job)}</td>{tenant}<td>{esc(r.host)}</td>"
                    f"<td>{esc(r.status)}</td><td>{_dt(r.start_ns or r.queued_ns)}</td><td class='num'>{dur}</td>"
                    f"<td class='num'>{human_bytes(r.bytes_read)}</td><td class='num'>{human_bytes(r.bytes_new)}</td>"
                    f"<td class='num'>{human_bytes(r.bytes_stored)}</td><td>{esc(r.consistency)}</td>"
                    f"<td>{esc(r.error or '; '.join(r.warnings))}</td></tr>")
    head = ["job", *(["tenant"] if admin else []), "host", "status", "start (UTC)", "duration", "read", "new",
            "stored", "consistency", "error / warnings"]
    return (f"<h2>Job history</h2><nav class='jobs'>{' '.join(links)}</nav>"
            f"<div id='charts'>{dur_chart}<br>{size_chart}</div>"
            + _table(head, rows, "No job runs yet."))


def request_counts(p: Principal, cfg: Any) -> list[tuple[str, str, int]]:
    counts: dict[tuple[str, str], int] = {}
    for r in RestoreRequestStore.for_config(cfg).list(tenant=None if p.is_admin else p.tenant):
        counts[(r.tenant, r.state)] = counts.get((r.tenant, r.state), 0) + 1
    return [(t, s, n) for (t, s), n in counts.items()]


def requests_html(reqs: list[Any], ws: WebSession, admin: bool, message: str = "") -> str:
    rows = []
    for r in reqs:
        buttons = ""
        if r.state == "pending":
            hidden = f"<input type='hidden' name='csrf' value='{esc(ws.csrf)}'>"
            buttons = (f"<form method='post' action='{UI}/requests/{esc(r.id)}/approve' style='display:inline'>"
                       f"{hidden}<button class='approve' data-id='{esc(r.id)}'>Approve</button></form> "
                       f"<form method='post' action='{UI}/requests/{esc(r.id)}/deny' style='display:inline'>"
                       f"{hidden}<input name='reason' placeholder='reason' size='12'>"
                       f"<button class='deny' data-id='{esc(r.id)}'>Deny</button></form>")
        approvals = f"{len(r.approvals)}/{getattr(r, 'required_approvals', 1)}"
        if r.approvals:
            approvals += ": " + ", ".join(str(a) for a in r.approvals)
        tenant = f"<td>{esc(r.tenant)}</td>" if admin else ""
        rows.append(f"<tr class='req' id='req-{esc(r.id)}'><td>{esc(r.id)}</td>{tenant}<td>{esc(r.host)}</td>"
                    f"<td>{esc(str(r.snapshot)[:12])}</td><td>{esc(r.kind)}</td>"
                    f"<td>{esc(', '.join(r.paths or []))}</td><td>{esc(str(r.target or ''))}</td>"
                    f"<td>{esc(r.requested_by)}</td><td class='state'>{esc(r.state)}</td><td>{esc(approvals)}</td>"
                    f"<td>{buttons}</td></tr>")
    head = ["id", *(["tenant"] if admin else []), "host", "restore point", "kind", "paths", "target",
            "requested by", "state", "approvals", ""]
    msg = f"<p class='err'>{esc(message)}</p>" if message else ""
    return msg + _table(head, rows, "No restore requests.")


# --- routes --------------------------------------------------------------------------------------------
class Dashboard:
    def __init__(self, api: ApiServer) -> None:
        self.api = api
        self.sessions = SessionStore(api.settings.dashboard_session_minutes * 60)
        self.usage = views.UsageCache(api.repo)

    @property
    def cfg(self) -> Any:
        return self.api.settings.config

    def viewer(self, req: Request) -> tuple[WebSession, Principal] | None:
        ws = self.sessions.get(cookies(req).get(COOKIE))
        if ws is None:
            return None
        rec = self.api.state.lookup_digest(ws.token_digest)  # a revoked token ends its sessions
        if rec is None or rec.role not in ("admin", "tenant"):
            self.sessions.end(cookies(req).get(COOKIE))
            return None
        return ws, Principal(rec.id, rec.role, rec.tenant, "*")

    def actor(self, p: Principal) -> str:
        """Who approves in the audit log and for ``authorizers = [...]``: the token's note (``ihb token
        create --note alice``), else ``token-ID``."""
        rec = next((t for t in self.api.state.tokens() if t.id == p.token_id), None)
        note = " ".join((rec.note if rec else "").split())
        return note[:64] if note else f"token-{p.token_id}"

    def page(self, fn: Page, post: bool = False) -> Callable[[Request, Principal | None], Awaitable[Response]]:
        async def handler(req: Request, _p: Principal | None) -> Response:
            who = self.viewer(req)
            if who is None:
                if post:
                    return _html("Not signed in", f"<p>Your session has ended. <a href='{UI}/login'>Sign in</a>.</p>",
                                 status=401)
                return _redirect(f"{UI}/login")
            ws, principal = who
            try:
                if post:
                    form = _form(req)
                    if not same(form.get("csrf"), ws.csrf) or not _same_origin(req):
                        return _html("Refused", "<p class='err'>The form is stale or did not come from this "
                                     "dashboard (CSRF check). Reload the page and try again.</p>", ws, 403)
                return await fn(req, ws, principal)
            except HTTPError as e:
                return _html("Error", f"<p class='err'>{esc(e.message)}</p>", ws, e.status)

        handler.__name__ = fn.__name__
        return handler

    def register(self) -> None:
        app = self.api.app
        s = self.api.settings

        @app.route("GET", f"{UI}/login", roles=None, summary="Dashboard sign-in form")
        async def login_form(req: Request, p: Principal | None) -> Response:
            return self._login_page()

        @app.route("POST", f"{UI}/login", roles=None, max_body=FORM_MAX, summary="Dashboard sign-in")
        async def login(req: Request, p: Principal | None) -> Response:
            form = _form(req)
            if not same(form.get("csrf"), cookies(req).get(LOGIN_COOKIE)) or not _same_origin(req):
                return self._login_page("The sign-in form expired; please try again.", 403)
            token = form.get("token", "").strip()
            rec = self.api.state.lookup_token(token) if token else None
            if rec is None:
                log.info("dashboard sign-in refused from %s: unknown token", req.remote)
                return self._login_page("That token is unknown or revoked.", 401)
            if rec.role not in ("admin", "tenant"):
                return self._login_page("Agent tokens cannot sign in; use an admin or tenant token "
                                        "(`ihb token create --role tenant --tenant T`).", 403)
            sid, _ws = self.sessions.create(token_digest(token), rec.role, rec.tenant, rec.id)
            log.info("dashboard sign-in: %s token %s", rec.role, rec.id)
            return _redirect(f"{UI}/", ws_.set_cookie(COOKIE, sid), ws_.clear_cookie(LOGIN_COOKIE))

        async def logout(req: Request, ws: WebSession, p: Principal) -> Response:
            self.sessions.end(cookies(req).get(COOKIE))
            return _redirect(f"{UI}/login", ws_.clear_cookie(COOKIE))

        async def overview(req: Request, ws: WebSession, p: Principal) -> Response:
            ov = await self.api.run(views.overview, p, self.api.repo, self.cfg, self.usage)
            job = req.query.get("job") or None
            body = (restore_points_html(ov, p.is_admin) + sla_html(ov, p.is_admin) + usage_html(ov.usage)
                    + history_html(ov, job, p.is_admin))
            return _html("Overview" if p.is_admin else f"Overview: {p.tenant}", body, ws)

        async def requests_page(req: Request, ws: WebSession, p: Principal, message: str = "") -> Response:
            store = RestoreRequestStore.for_config(self.cfg)
            reqs = await self.api.run(lambda: store.list(tenant=None if p.is_admin else p.tenant))
            pending = [r for r in reqs if r.state == "pending"]
            rest = [r for r in reqs if r.state != "pending"]
            done, state = req.query.get("done", ""), req.query.get("state", "")
            notice = ""
            if done and any(r.id == done for r in reqs):
                notice = f"<p id='notice'>Request {esc(done)} is now {esc(state)}."
                if state == "approved":
                    notice += (" Its ticket was issued; the requester retrieves it once with "
                               f"<code>ihb restore-request ticket {esc(done)}</code>.")
                notice += "</p>"
            body = (notice + f"<p>You act as <b>{esc(self.actor(p))}</b>.</p>"
                    + "<h2>Pending</h2>" + requests_html(pending, ws, p.is_admin, message)
                    + "<h2>Decided</h2>" + requests_html(rest, ws, p.is_admin))
            return _html("Restore requests", body, ws, 200 if not message else 409)

        async def decide(req: Request, ws: WebSession, p: Principal) -> Response:
            rid, action = req.path_params["rid"], req.path_params["action"]
            form = _form(req)
            store = RestoreRequestStore.for_config(self.cfg)
            by = self.actor(p)

            def act() -> str:
                try:
                    r = store.get(rid)
                except IhbError:
                    r = None
                if r is None or not p.may_see(r.tenant, r.host):
                    raise HTTPError(404, f"no restore request {rid}")
                if action == "approve":
                    return str(store.approve(r.id, by).state)
                return str(store.deny(r.id, by, reason=form.get("reason", "")[:500]).state)

            try:
                state = await self.api.run(act)
            except IhbError as e:
                return await requests_page(req, ws, p, str(e))
            log.info("restore request %s: %s by %s, now %s", rid, action, by, state)
            return _redirect(f"{UI}/requests?done={quote(rid, safe='')}&state={quote(state, safe='')}")

        app.route("POST", f"{UI}/logout", roles=None, max_body=FORM_MAX, summary="Dashboard sign-out")(
            self.page(logout, post=True))
        app.route("GET", f"{UI}/", roles=None, summary="Dashboard overview")(self.page(overview))
        app.route("GET", f"{UI}/requests", roles=None, summary="Restore requests")(self.page(requests_page))
        app.route("POST", f"{UI}/requests/{{rid}}/{{action}}", roles=None, max_body=FORM_MAX,
                  params={"rid": r"[A-Za-z0-9_-]{1,64}", "action": "approve|deny"},
                  summary="Approve or deny a restore request")(self.page(decide, post=True))

        @app.route("GET", UI, roles=None, summary="Dashboard")
        async def ui_root(req: Request, p: Principal | None) -> Response:
            return _redirect(f"{UI}/")

        @app.route("GET", "/metrics", roles=None, summary="Prometheus metrics")
        async def metrics_endpoint(req: Request, p: Principal | None) -> Response:
            if s.metrics_open_on_loopback and not req.header("authorization") and _is_loopback(req.remote):
                viewer = Principal("loopback", "admin", "*", "*")
            else:
                viewer = self.api.app.authenticate(req)
                if viewer.role not in ("admin", "tenant"):
                    raise HTTPError(403, "an agent token may not read metrics; use an admin or tenant token")

            def collect() -> str:
                ov = views.overview(viewer, self.api.repo, self.cfg, self.usage)
                return metrics.render(ov, request_counts(viewer, self.cfg))

            text = await self.api.run(collect)
            return Response(200, text.encode(), metrics.CONTENT_TYPE)

    def _login_page(self, message: str = "", status: int = 200) -> Response:
        nonce = secrets.token_urlsafe(24)
        msg = f"<p class='err' id='login-error'>{esc(message)}</p>" if message else ""
        body = (f"{msg}<form method='post' action='{UI}/login'><input type='hidden' name='csrf' value='{nonce}'>"
                "<p><label>Admin or tenant token<br><input type='password' name='token' id='token' size='60' "
                "autocomplete='off' autofocus></label></p><p><button id='signin'>Sign in</button></p></form>"
                "<p>Create a token on the appliance with <code>ihb token create --role tenant --tenant NAME</code>."
                "</p>")
        return _html("Sign in", body, status=status, headers=[ws_.set_cookie(LOGIN_COOKIE, nonce, 600)])


def register(api: ApiServer) -> None:
    Dashboard(api).register()
