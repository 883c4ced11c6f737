"""The web dashboard in a real headless Chromium, and /metrics parsed strictly.

A real `ihb serve` on loopback, real backups (local ones leave job records, agents push restore
points for two tenants), then a browser signs in through the form, reads the charts, approves a
restore request and signs out; a tenant's session must never show another tenant's names.
"""

from __future__ import annotations

import http.client
import json
import math
import re
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from appliance.config import load_config
from appliance.restore_requests import RestoreRequestStore

from .browser import Browser
from .conftest import Appliance, run_ihb, write_tree

# --- plain HTTP with cookies ------------------------------------------------------------------------------


def mentions(text: str, word: str) -> bool:
    """``word`` as a word of its own: a host name like db7 also occurs inside random hex ids (a token id
    token-d22db74a... failed a run), which must not count as the page showing another tenant's host."""
    return re.search(rf"(?<![0-9A-Za-z]){re.escape(word)}(?![0-9A-Za-z])", text) is not None


def request(app: Appliance, method: str, path: str, headers: dict[str, str] | None = None,
         form: dict[str, str] | None = None) -> tuple[int, dict[str, list[str]], bytes]:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection("127.0.0.1", app.port, context=ctx, timeout=30)
    hdrs = dict(headers or {})
    body = None
    if form is not None:
        body = urlencode(form).encode()
        hdrs["Content-Type"] = "application/x-www-form-urlencoded"
    try:
        conn.request(method, path, body=body, headers=hdrs)
        r = conn.getresponse()
        data = r.read()
        got: dict[str, list[str]] = {}
        for k, v in r.getheaders():
            got.setdefault(k.lower(), []).append(v)
        return r.status, got, data
    finally:
        conn.close()


def cookie_of(headers: dict[str, list[str]], name: str) -> str:
    for c in headers.get("set-cookie", []):
        if c.startswith(name + "="):
            return c.split(";")[0].split("=", 1)[1]
    raise AssertionError(f"no {name} cookie in {headers.get('set-cookie')}")


def login(app: Appliance, token: Path) -> tuple[str, str]:
    """Sign in over plain HTTP; returns (session cookie, CSRF token of the pages)."""
    st, h, body = request(app, "GET", "/ui/login")
    assert st == 200
    nonce = cookie_of(h, "ihb_login")
    assert f"value='{nonce}'" in body.decode()
    st, h, _ = request(app, "POST", "/ui/login", {"Cookie": f"ihb_login={nonce}"},
                    {"csrf": nonce, "token": token.read_text().strip()})
    assert st == 303 and h["location"] == ["/ui/"], (st, h)
    sid = cookie_of(h, "ihb_session")
    st, _, page = request(app, "GET", "/ui/", {"Cookie": f"ihb_session={sid}"})
    assert st == 200
    m = re.search(r"name='csrf' value='([^']+)'", page.decode())
    assert m
    return sid, m.group(1)


# --- a strict parser of the Prometheus text format 0.0.4 ---------------------------------------------------
NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')
VALUE = re.compile(r"(NaN|[+-]Inf|-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)(?: (-?\d+))?")
SUFFIXES = {"counter": ("",), "gauge": ("",), "summary": ("", "_sum", "_count"),
            "histogram": ("_bucket", "_sum", "_count"), "untyped": ("",)}


def _sample(line: str, where: str) -> tuple[str, dict[str, str], float]:
    m = re.match(NAME, line)
    assert m, f"{where}: no metric name"
    name, rest = m.group(0), line[m.end():]
    labels: dict[str, str] = {}
    if rest.startswith("{"):
        rest = rest[1:]
        while not rest.startswith("}"):
            lm = LABEL.match(rest)
            assert lm, f"{where}: malformed label"
            assert lm.group(1) not in labels, f"{where}: repeated label {lm.group(1)}"
            labels[lm.group(1)] = re.sub(r"\\(.)", lambda e: "\n" if e.group(1) == "n" else e.group(1), lm.group(2))
            rest = rest[lm.end():]
            if rest.startswith(","):
                rest = rest[1:]
                assert not rest.startswith("}"), f"{where}: trailing comma"
            else:
                assert rest.startswith("}"), f"{where}: labels not separated by commas"
        rest = rest[1:]
    assert rest.startswith(" "), f"{where}: no space before the value"
    vm = VALUE.fullmatch(rest[1:])
    assert vm, f"{where}: bad value {rest[1:]!r}"
    return name, labels, float(vm.group(1).replace("Inf", "inf"))


def parse_prometheus(text: str) -> dict[str, dict[str, Any]]:
    """{family: {"type", "help", "samples": [(name, labels, value)]}}; raises on anything not strictly valid."""
    assert text.endswith("\n"), "the exposition must end with a newline"
    fams: dict[str, dict[str, Any]] = {}
    current: str | None = None
    seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    for n, line in enumerate(text[:-1].split("\n"), 1):
        where = f"line {n}: {line!r}"
        assert line, f"{where}: empty line"
        if line.startswith("#"):
            m = re.fullmatch(rf"# (HELP|TYPE) ({NAME}) (.*)", line)
            assert m, f"{where}: a comment that is not HELP or TYPE"
            kind, name, rest = m.groups()
            fam = fams.setdefault(name, {"type": None, "help": None, "samples": []})
            assert not fam["samples"], f"{where}: {kind} after the family's samples"
            assert fam[kind.lower()] is None, f"{where}: a second {kind} for {name}"
            if kind == "TYPE":
                assert rest in SUFFIXES, f"{where}: unknown type"
            fam[kind.lower()] = rest
            current = name
            continue
        name, labels, v = _sample(line, where)
        assert current is not None and name.startswith(current), f"{where}: sample outside its family"
        fam = fams[current]
        assert fam["type"] is not None, f"{where}: no TYPE before the samples"
        assert name[len(current):] in SUFFIXES[fam["type"]], f"{where}: {name} is not part of {fam['type']} {current}"
        key = (name, tuple(sorted(labels.items())))
        assert key not in seen, f"{where}: duplicate series"
        seen.add(key)
        fam["samples"].append((name, labels, v))
    return fams


def series(fams: dict[str, dict[str, Any]], name: str, **match: str) -> list[float]:
    fam = fams.get(re.sub(r"_(sum|count)$", "", name)) or fams.get(name) or {"samples": []}
    return [v for n, lab, v in fam["samples"] if n == name and all(lab.get(k) == x for k, x in match.items())]


def test_prometheus_parser_is_strict() -> None:
    ok = '# HELP a_total x\n# TYPE a_total counter\na_total{job="j\\"1",tenant=""} 3\n'
    assert series(parse_prometheus(ok), "a_total", job='j"1') == [3]
    for bad in ("a 1", "# TYPE a gauge\na{b=\"1\"} one\n", "# TYPE a gauge\na{b=1} 1\n", "a 1\n",
                "# TYPE a gauge\n# TYPE a gauge\na 1\n", "# TYPE a gauge\na 1\na 1\n",
                "# TYPE a summary\na_bucket 1\n", "# TYPE a gauge\na 1\n\n"):
        try:
            parse_prometheus(bad)
        except AssertionError:
            continue
        raise AssertionError(f"accepted {bad!r}")


# --- the appliance with two tenants, local jobs and agent backups ------------------------------------------
def setup_appliance(app: Appliance, tmp_path: Path, extra_config: str = "") -> dict[str, Path]:
    jobs = tmp_path / "jobs"
    with app.config.open("a") as f:
        f.write(f'\n[service]\nstate_dir = "{jobs}"\n\n'
                '[[jobs]]\nname = "acme-web1"\nkind = "agent"\ntenant = "acme"\nhost = "web1"\nrpo = "1h"\n'
                '\n[[jobs]]\nname = "globex-db7"\nkind = "agent"\ntenant = "globex"\nhost = "db7"\nrpo = "2h"\n'
                + extra_config)
    admin = app.base / "admin-alice.token"  # the note names the person in approvals and the audit log
    run_ihb("token", "create", "--config", str(app.config), "--role", "admin", "--note", "alice", "-o", str(admin))
    toks = {"admin": admin, "acme": app.token("acme", role="tenant"),
            "globex": app.token("globex", role="tenant"), "web1": app.token("acme", "web1"),
            "db7": app.token("globex", "db7")}
    app.start()
    src = write_tree(tmp_path / "src", {"a/one.bin": b"1" * 300_000, "b/two.txt": b"hello\n" * 5000})
    for i in range(2):  # two runs of a local job (job records, tenant "")
        (src / f"run{i}.txt").write_text(f"run {i}\n" * 1000)
        run_ihb("backup", str(src), "--host", "appliance-local", "--config", str(app.config))
    for host in ("web1", "web1", "db7"):  # agents push restore points for two tenants
        (src / f"{host}.txt").write_text(host * 999)
        app.agent(toks[host], "backup", str(src), cache=tmp_path / f"cache-{host}")
    return toks


def make_requests(app: Appliance) -> dict[str, str]:
    """One pending restore request per tenant, asked for by carol (so alice may approve)."""
    st, doc = app.api("GET", "/api/v1/snapshots", app.base / "admin-alice.token")
    assert st == 200
    snap = {s["host"]: s["id"] for s in doc["snapshots"]}
    store = RestoreRequestStore.for_config(load_config(str(app.config)))
    return {t: store.create(tenant=t, host=h, snapshot=snap[h], kind="files", paths=["/a"], target="/srv/restore",
                            requested_by="carol", reason="lost a file").id
            for t, h in (("acme", "web1"), ("globex", "db7"))}


def test_metrics(appliance: Appliance, tmp_path: Path) -> None:
    app = appliance
    toks = setup_appliance(app, tmp_path)
    rids = make_requests(app)
    st, h, body = request(app, "GET", "/metrics", {"Authorization": f"Bearer {toks['admin'].read_text().strip()}"})
    assert st == 200 and h["content-type"][0].startswith("text/plain; version=0.0.4"), (st, h)
    fams = parse_prometheus(body.decode())
    assert series(fams, "ihb_job_runs_total", job="files:appliance-local", status="ok", tenant="") == [2]
    assert series(fams, "ihb_job_duration_seconds_count", job="files:appliance-local") == [2]
    assert series(fams, "ihb_job_duration_seconds_count", job="agent:web1", tenant="acme") == [2]
    assert series(fams, "ihb_job_read_bytes_total", job="files:appliance-local")[0] > 300_000
    assert series(fams, "ihb_job_last_stored_bytes", job="agent:db7", tenant="globex")[0] > 0
    (last_ok,) = series(fams, "ihb_job_last_success_timestamp_seconds", job="agent:web1", tenant="acme")
    assert abs(last_ok - __import__("time").time()) < 600
    assert series(fams, "ihb_restore_points", tenant="acme", host="web1") == [2]
    assert series(fams, "ihb_restore_points", tenant="globex", host="db7") == [1]
    assert series(fams, "ihb_job_rpo_ok", job="acme-web1", tenant="acme") == [1]
    assert series(fams, "ihb_job_rpo_seconds", job="globex-db7") == [7200]
    assert series(fams, "ihb_repository_snapshots") == [5]
    assert series(fams, "ihb_restore_requests", tenant="globex", state="pending") == [1]
    assert series(fams, "ihb_repository_stored_bytes")[0] > 0 and series(fams, "ihb_repository_packs")[0] >= 1
    assert not any(math.isnan(v) for f in fams.values() for _, _, v in f["samples"])

    # a tenant token: its own series only, no repository-wide numbers
    st, _, body = request(app, "GET", "/metrics", {"Authorization": f"Bearer {toks['acme'].read_text().strip()}"})
    assert st == 200
    text = body.decode()
    fams = parse_prometheus(text)
    assert not any(mentions(text, w) for w in ("globex", "db7", "appliance-local"))
    assert series(fams, "ihb_restore_points", tenant="acme", host="web1") == [2]
    assert "ihb_repository_stored_bytes" not in fams
    assert series(fams, "ihb_restore_requests", tenant="acme", state="pending") == [1]

    # a tenant session may decide its own requests only; another tenant's is "not found"
    sid, csrf = login(app, toks["acme"])
    jar = {"Cookie": f"ihb_session={sid}"}
    assert request(app, "POST", f"/ui/requests/{rids['globex']}/approve", jar, {"csrf": csrf})[0] == 404
    assert request(app, "POST", f"/ui/requests/{rids['globex']}/deny", jar, {"csrf": csrf})[0] == 404
    store = RestoreRequestStore.for_config(load_config(str(app.config)))
    assert store.get(rids["globex"]).state == "pending"
    st, h, _ = request(app, "POST", f"/ui/requests/{rids['acme']}/deny", jar, {"csrf": csrf, "reason": "not now"})
    assert st == 303, st
    r = store.get(rids["acme"])
    assert r.state == "denied" and r.decision_reason == "not now" and r.decided_by.startswith("token-")
    st, _, body = request(app, "POST", f"/ui/requests/{rids['acme']}/approve", jar, {"csrf": csrf})
    assert st == 409 and b"is denied" in body  # the store's refusal, shown on the page
    # refusals: no token, an agent token
    assert request(app, "GET", "/metrics")[0] == 401
    st, _, body = request(app, "GET", "/metrics", {"Authorization": f"Bearer {toks['web1'].read_text().strip()}"})
    assert st == 403 and json.loads(body)["error"]["status"] == 403


def test_metrics_open_on_loopback(tmp_path: Path) -> None:
    app = Appliance(tmp_path / "appliance", metrics_open_on_loopback=True)
    try:
        app.start()
        st, _, body = request(app, "GET", "/metrics")
        assert st == 200
        parse_prometheus(body.decode())
        assert "ihb_repository_packs" in body.decode()
        # a token, when sent, is still checked
        assert request(app, "GET", "/metrics", {"Authorization": "Bearer ihb_wrong"})[0] == 401
    finally:
        app.stop()


def test_sessions_and_csrf(appliance: Appliance, tmp_path: Path) -> None:
    app = appliance
    admin, acme, agent = app.token(role="admin"), app.token("acme", role="tenant"), app.token("acme", "web1")
    app.start()
    # every page needs a session
    for path in ("/ui/", "/ui/requests"):
        st, h, _ = request(app, "GET", path)
        assert st == 303 and h["location"] == ["/ui/login"]
    st, h, body = request(app, "GET", "/ui/login")
    assert "default-src 'none'" in h["content-security-policy"][0] and h["x-frame-options"] == ["DENY"]
    nonce = cookie_of(h, "ihb_login")
    # the login form needs its own nonce back (login CSRF), a live token, and not an agent's
    tok = admin.read_text().strip()
    assert request(app, "POST", "/ui/login", form={"csrf": nonce, "token": tok})[0] == 403
    assert request(app, "POST", "/ui/login", {"Cookie": f"ihb_login={nonce}"},
                {"csrf": "forged", "token": tok})[0] == 403
    assert request(app, "POST", "/ui/login", {"Cookie": f"ihb_login={nonce}"},
                {"csrf": nonce, "token": "ihb_not_a_token"})[0] == 401
    st, _, body = request(app, "POST", "/ui/login", {"Cookie": f"ihb_login={nonce}"},
                       {"csrf": nonce, "token": agent.read_text().strip()})
    assert st == 403 and b"Agent tokens cannot sign in" in body
    assert request(app, "POST", "/ui/login", {"Cookie": f"ihb_login={nonce}", "Origin": "https://evil.example"},
                {"csrf": nonce, "token": tok})[0] == 403
    # a good sign-in: the cookie's attributes
    st, h, _ = request(app, "POST", "/ui/login", {"Cookie": f"ihb_login={nonce}"}, {"csrf": nonce, "token": tok})
    assert st == 303
    cookie = next(c for c in h["set-cookie"] if c.startswith("ihb_session="))
    assert all(a in cookie for a in ("HttpOnly", "Secure", "SameSite=Strict", "Path=/")), cookie
    sid, csrf = login(app, admin)
    jar = {"Cookie": f"ihb_session={sid}"}
    assert request(app, "GET", "/ui/requests", jar)[0] == 200
    assert request(app, "GET", "/ui/", {"Cookie": "ihb_session=" + "x" * 43})[0] == 303
    # POST forms need the session's CSRF token, and the same origin when the browser names one
    assert request(app, "POST", "/ui/logout", jar, {})[0] == 403
    assert request(app, "POST", "/ui/logout", jar, {"csrf": "wrong"})[0] == 403
    _sid2, csrf2 = login(app, acme)
    assert request(app, "POST", "/ui/logout", jar, {"csrf": csrf2})[0] == 403  # another session's token
    assert request(app, "POST", "/ui/logout", {**jar, "Origin": "https://evil.example"}, {"csrf": csrf})[0] == 403
    assert request(app, "POST", "/ui/requests/abc/approve", jar, {"csrf": "wrong"})[0] == 403
    assert request(app, "POST", "/ui/logout", {**jar, "Sec-Fetch-Site": "cross-site"}, {"csrf": csrf})[0] == 403
    assert request(app, "POST", "/ui/logout", {"Cookie": "ihb_session=gone"}, {"csrf": csrf})[0] == 401
    st, h, _ = request(app, "POST", "/ui/logout", {**jar, "Origin": f"https://127.0.0.1:{app.port}"}, {"csrf": csrf})
    assert st == 303 and h["location"] == ["/ui/login"]
    assert request(app, "GET", "/ui/", jar)[0] == 303  # the session is gone on the server
    # revoking the token ends its sessions
    sid3, _ = login(app, acme)
    token_id = json.loads(run_ihb("token", "list", "--config", str(app.config), "--json").stdout)
    acme_id = next(t["id"] for t in token_id if t["role"] == "tenant")
    run_ihb("token", "revoke", "--config", str(app.config), acme_id)
    assert request(app, "GET", "/ui/", {"Cookie": f"ihb_session={sid3}"})[0] == 303
    app.stop()


def test_dashboard_in_chromium(appliance: Appliance, tmp_path: Path) -> None:
    app = appliance
    toks = setup_appliance(app, tmp_path)
    rids = make_requests(app)
    b = Browser(tmp_path / "chromium")
    try:
        base = app.url.rstrip("/")
        b.goto(base + "/ui/")
        assert b.path() == "/ui/login", "an anonymous visit must land on the sign-in page"
        b.type_into("#token", toks["admin"].read_text().strip())
        b.click_and_wait("#signin")
        assert b.path() == "/ui/", b.text()[:500]
        cookies = b.call("Network.getCookies", urls=[base + "/"])["cookies"]
        sess = next(c for c in cookies if c["name"] == "ihb_session")
        assert sess["httpOnly"] and sess["secure"] and sess["sameSite"] == "Strict", sess
        assert b.js("document.cookie") == "", "the session cookie must not be readable by scripts"
        text = b.text()
        for name in ("web1", "db7", "appliance-local", "acme", "globex", "Repository usage", "Job history"):
            assert name in text, f"{name!r} missing from the admin overview"
        # the charts: one point per finished run (2 local + 3 agent runs), in both charts
        assert b.js("document.querySelectorAll('#charts svg').length") == 2
        assert b.js("document.querySelectorAll('#charts svg')[0].querySelectorAll('circle.pt').length") == 5
        assert b.js("document.querySelectorAll('#charts svg')[1].querySelectorAll('circle.pt').length") == 10
        assert b.js("document.querySelectorAll('tr.run').length") == 5
        # one job's chart
        b.goto(base + "/ui/?job=agent%3Aweb1")
        assert b.js("document.querySelectorAll('#charts svg')[0].querySelectorAll('circle.pt').length") == 2
        # RPO column: web1 within its hour
        row = b.js("[...document.querySelectorAll('tr.rp')].find(r => r.innerText.includes('web1')).innerText")
        assert "within 1h" in row and "acme-web1" in row, row
        assert b.js("document.querySelectorAll('tr.sla').length") == 2  # one row per configured job (ihb sla)
        # approve acme's pending restore request with the button
        b.goto(base + "/ui/requests")
        text = b.text()
        assert rids["acme"] in text and rids["globex"] in text and "You act as alice" in text
        assert b.js("document.querySelectorAll('button.approve').length") == 2
        b.click_and_wait(f"button.approve[data-id='{rids['acme']}']")
        assert b.path().startswith("/ui/requests?done="), b.path()
        assert f"Request {rids['acme']} is now approved" in b.text()
        state = b.js(f"document.querySelector('#req-{rids['acme']} .state').innerText")
        assert state == "approved", state
        assert b.js("document.querySelectorAll('button.approve').length") == 1  # globex's is still pending
        req = RestoreRequestStore.for_config(load_config(str(app.config))).get(rids["acme"])
        assert req.state == "approved" and req.approvals == ["alice"] and req.ticket is not None
        b.click_and_wait("#logout")
        assert b.path() == "/ui/login"
        b.goto(base + "/ui/")
        assert b.path() == "/ui/login", "after logout the dashboard must ask to sign in again"

        # a tenant sees only its own hosts and jobs
        b.type_into("#token", toks["acme"].read_text().strip())
        b.click_and_wait("#signin")
        text = b.text()
        assert "web1" in text and "tenant acme" in text
        for other in ("db7", "globex", "appliance-local"):
            assert not mentions(text, other), f"tenant acme sees {other!r}"
        assert b.js("document.querySelectorAll('#charts svg')[0].querySelectorAll('circle.pt').length") == 2
        assert b.js("document.querySelectorAll('tr.sla').length") == 1
        b.goto(base + "/ui/requests")
        text = b.text()
        assert rids["acme"] in text and rids["globex"] not in text and not mentions(text, "globex")
        assert not mentions(text, "db7")
        b.click_and_wait("#logout")
        assert b.path() == "/ui/login"
    finally:
        b.close()
    app.stop()


def test_metrics_escape_label_values() -> None:
    """Job names come from the config: quotes, backslashes and newlines must stay inside the label."""
    import time

    from appliance.jobs import JobRecord
    from appliance.server.metrics import render
    from appliance.server.views import Overview

    now = time.time_ns()
    odd = 'we"ird\\job\nname'
    runs = [JobRecord(id="1", job=odd, kind="files", tenant="t", status="ok", start_ns=now - 2_000_000_000,
                      end_ns=now, bytes_read=10, bytes_new=5, bytes_stored=3)]
    text = render(Overview(now, [], runs, [], {"scope": "tenant"}, {odd: runs[0]}), [("t", "pending", 2)])
    fams = parse_prometheus(text)
    assert series(fams, "ihb_job_duration_seconds_sum", job=odd) == [2.0]
    assert series(fams, "ihb_job_last_success_timestamp_seconds", job=odd) == [now / 1e9]
    assert series(fams, "ihb_restore_requests", tenant="t", state="pending") == [2]


def test_web_sessions_expire() -> None:
    """Idle sessions end after the idle time, every session after MAX_LIFETIME; ids are never stored."""
    from appliance.server.websessions import MAX_LIFETIME, SessionStore

    now = [1000.0]
    store = SessionStore(idle_seconds=60, clock=lambda: now[0])
    sid, ws = store.create(b"d" * 32, "tenant", "acme", "0123")
    assert sid not in repr(store.__dict__) and store.get(sid) is ws
    now[0] += 59
    assert store.get(sid) is ws  # each request restarts the idle timer
    now[0] += 61
    assert store.get(sid) is None
    sid, ws = store.create(b"d" * 32, "tenant", "acme", "0123")
    for _ in range(int(MAX_LIFETIME // 50) + 1):
        now[0] += 50
        if store.get(sid) is None:
            break
    assert now[0] - 1120 >= MAX_LIFETIME - 50 and store.get(sid) is None
    sid2, _ = store.create(b"e" * 32, "admin", "*", "4567")
    store.end(sid2)
    assert store.get(sid2) is None and store.get("") is None and store.get("x" * 500) is None
