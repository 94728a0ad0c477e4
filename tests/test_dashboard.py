"""The operator dashboard over real HTTPS, and rendered by headless Chromium.

One ``hsmca serve`` on a fresh home; certificates of three profiles are issued through
the REST API (one with a 2 s lifetime, so it expires) and one is revoked. Every number
the dashboard shows is checked against what the API reports for the same data. The
browser test drives Debian's ``chromium`` through the DevTools protocol on a pipe
(``--remote-debugging-pipe``: no websocket client needed): it signs in with the login
form, reads the numbers from the DOM and takes a screenshot.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import fcntl
import json
import math
import os
import select
import shutil
import struct
import subprocess
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import requests

from pki.actors import operator
from pki.bootstrap import initialise
from pki.clock import FrozenClock
from pki.dashboard import DashboardSummary, StatusCounts, dashboard_summary
from pki.service import Pki
from tests.api_helpers import TIMEOUT, events_since, issued, last_event_id, new_token, poll
from tests.conftest import RunningService, build_csr
from tests.issuance_helpers import issue

API = "/api/v1"
STATUSES = ("good", "expired", "revoked", "pending")
#: (profile, ttl) of the certificates the fixture issues; the first expires at once
PLAN = (
    ("mtls-server", "2s"),
    ("mtls-server", "24h"),
    ("mtls-server", "10d"),
    ("mtls-client", "3d"),
    ("mtls-client", "20d"),
    ("mtls", "24h"),
    ("mtls", "30d"),
)
REVOKE_INDEX = 3  # the 3-day mtls-client certificate
SECURITY_HEADERS = ("Content-Security-Policy", "X-Frame-Options", "Cache-Control")
CHROMIUM_HINT = (
    "Debian's chromium is needed for the dashboard browser test: run "
    "`make dashboard-browser` (or `apt-get install chromium`)"
)
BROWSER_TIMEOUT = 20.0
WIDTH, HEIGHT = 1280, 1600


@dataclass
class Dash:
    service: RunningService
    admin: requests.Session
    serials: list[str]
    revoked: str
    expired: str

    @property
    def base(self) -> str:
        return self.service.base


@pytest.fixture(scope="module")
def dash(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dash]:
    home = tmp_path_factory.mktemp("dash-home")
    initialise(home, "Dashboard Org", ("svc.test",))
    service = RunningService(home)
    try:
        admin: requests.Session = service.session(service.admin_token)  # type: ignore[assignment]
        serials = []
        for profile, ttl in PLAN:
            body, _ = issued(admin, service.base, profile, ttl=ttl)
            serials.append(body["serial"])
        # a device certificate beyond the chart's 30 days
        csr, _ = build_csr(cn=None, sans=())
        resp = admin.post(
            f"{service.base}{API}/certificates",
            json={"csr": csr.decode(), "profile": "device", "ttl": "60d", "device_id": "dev-1"},
            timeout=TIMEOUT,
        )
        assert resp.status_code == 201, resp.text
        serials.append(resp.json()["serial"])
        revoked = serials[REVOKE_INDEX]
        resp = admin.post(
            f"{service.base}{API}/certificates/{revoked}/revoke",
            json={"reason": "keyCompromise"},
            timeout=TIMEOUT,
        )
        assert resp.status_code == 200, resp.text
        expired = serials[0]
        poll(
            lambda: _api_status(admin, service.base, expired) == "expired",
            10,
            "the 2 s certificate to expire",
        )
        yield Dash(service, admin, serials, revoked, expired)
    finally:
        assert service.stop() == 0, service.log.read_text()[-2000:]


# -- the use-case, on SQLite and PostgreSQL --------------------------------------------


def _minus(after: StatusCounts, before: StatusCounts) -> tuple[int, int, int, int]:
    return (
        after.good - before.good,
        after.expired - before.expired,
        after.revoked - before.revoked,
        after.pending - before.pending,
    )


def _profile(summary: DashboardSummary, name: str) -> StatusCounts:
    return dict(summary.by_profile).get(name, StatusCounts())


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_summary_counts_buckets_cas_and_runs(backend: str, request: pytest.FixtureRequest) -> None:
    """dashboard_summary against a frozen clock: which day each expiry falls on (a
    certificate expiring exactly 2 days from now is in bar 2), expired = good past
    notAfter, newest revocation first, CA remaining life, recorded job runs."""
    home: Path = request.getfixturevalue("fresh_home" if backend == "sqlite" else "pg_home")
    t0 = dt.datetime.now(dt.UTC).replace(microsecond=0)
    later = t0 + dt.timedelta(hours=2)
    core = Pki.open(home, clock=FrozenClock(t0))
    try:
        assert core.store.engine.dialect.name == ("sqlite" if backend == "sqlite" else "postgresql")
        before = {now: dashboard_summary(core, now) for now in (t0, later)}
        hour, day = dt.timedelta(hours=1), dt.timedelta(days=1)
        issue(core, "mtls-server", ttl=hour)
        gone = issue(core, "mtls-client", "c.svc.test", ("c.svc.test",), ttl=25 * hour)
        issue(core, "mtls", ttl=2 * day)
        issue(core, "mtls-server", ttl=29 * day)
        core.revoke(gone.record.serial, "keyCompromise", operator())
        run = core.store.jobs.start_run("expiry-scan", "test:1", t0)
        core.store.jobs.finish_run(run, t0 + dt.timedelta(seconds=3), "ok", {"seen": 4})

        now_ = dashboard_summary(core, t0)
        assert _minus(now_.counts, before[t0].counts) == (3, 0, 1, 0)
        assert _minus(_profile(now_, "mtls-server"), _profile(before[t0], "mtls-server")) == (
            2, 0, 0, 0,
        )  # fmt: skip
        assert _minus(_profile(now_, "mtls-client"), _profile(before[t0], "mtls-client")) == (
            0, 0, 1, 0,
        )  # fmt: skip
        added = [a.count - b.count for a, b in zip(now_.expiries, before[t0].expiries, strict=True)]
        assert len(added) == 30
        assert {i: n for i, n in enumerate(added) if n} == {0: 1, 1: 1, 28: 1}
        assert now_.expiries[1].end == t0 + 2 * day
        assert now_.revocations[0].serial == gone.record.serial
        assert now_.revocations[0].reason == "keyCompromise"
        assert now_.revocations[0].profile == "mtls-client"
        assert [(r.job, r.outcome, r.duration_seconds) for r in now_.job_runs[:1]] == [
            ("expiry-scan", "ok", 3.0)
        ]
        assert {ca.kind for ca in now_.cas} == {"root", "intermediate"}
        assert now_.cas[0].kind == "root"
        for ca in now_.cas:
            assert ca.remaining_seconds == int((ca.not_after - t0).total_seconds()) > 0

        two_hours_on = dashboard_summary(core, later)
        assert _minus(two_hours_on.counts, before[later].counts) == (2, 1, 1, 0)
        moved = [
            a.count - b.count
            for a, b in zip(two_hours_on.expiries, before[later].expiries, strict=True)
        ]
        assert {i: n for i, n in enumerate(moved) if n} == {1: 1, 28: 1}
    finally:
        core.close()


# -- what the API says -------------------------------------------------------------------


def _api_status(session: requests.Session, base: str, serial: str) -> str:
    resp = session.get(f"{base}{API}/certificates/{serial}", timeout=TIMEOUT)
    assert resp.status_code == 200, resp.text
    return str(resp.json()["status"])


def _list_all(session: requests.Session, base: str, **params: str) -> list[dict[str, Any]]:
    """Every item of a listing, following ``next_cursor`` (bounded)."""
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(100):
        query = dict(params, limit="1000", **({"cursor": cursor} if cursor else {}))
        resp = session.get(f"{base}{API}/certificates", params=query, timeout=TIMEOUT)
        assert resp.status_code == 200, resp.text
        page = resp.json()
        items.extend(page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            return items
    raise AssertionError("listing did not end")


def _parse_time(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def _expected(dash: Dash, generated_at: dt.datetime) -> dict[str, Any]:
    """The dashboard's figures as the API reports them (the same normalised shape as
    :func:`_numbers_from_html` and the browser's DOM read-out)."""
    s, base = dash.admin, dash.base
    counts = {st: len(_list_all(s, base, status=st)) for st in STATUSES}
    counts["total"] = len(_list_all(s, base))
    profiles: dict[str, dict[str, int]] = {}
    for item in _list_all(s, base):
        profiles.setdefault(item["profile"], {})
    for name in profiles:
        row = {st: len(_list_all(s, base, status=st, profile=name)) for st in STATUSES}
        row["total"] = len(_list_all(s, base, profile=name))
        profiles[name] = row
    expiring = _list_all(s, base, expiring_within="30d")
    bars = [0] * 30
    for item in expiring:
        left = (_parse_time(item["not_after"]) - generated_at).total_seconds()
        bars[max(math.ceil(left / 86400) - 1, 0)] += 1
    revoked = sorted(
        _list_all(s, base, status="revoked"), key=lambda i: i["revoked_at"], reverse=True
    )
    ca = s.get(f"{base}{API}/ca", timeout=TIMEOUT)
    assert ca.status_code == 200, ca.text
    return {
        "counts": counts,
        "profiles": profiles,
        "expiring": len(expiring),
        "bars": bars,
        "revoked": [i["serial"] for i in revoked[:10]],
        "cas": sorted(i["id"] for i in ca.json()["issuers"]),
    }


# -- what the page says ------------------------------------------------------------------


class _Numbers(HTMLParser):
    """Collects the dashboard's numbers by their ids and data attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.by_id: dict[str, str] = {}
        self.profiles: dict[str, dict[str, str]] = {}
        self.bars: list[int] = []
        self.revoked: list[str] = []
        self.cas: list[str] = []
        self.generated_at = ""
        self._text_of: tuple[str, str] | None = None
        self._profile: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if "id" in a:
            self._text_of = ("id", a["id"])
        if "data-generated-at" in a:
            self.generated_at = a["data-generated-at"]
        if tag == "tr" and "data-profile" in a:
            self._profile = a["data-profile"]
            self.profiles[self._profile] = {}
        if tag == "td" and self._profile is not None and "data-status" in a:
            self._text_of = ("profile", a["data-status"])
        if tag == "g" and "data-day" in a:
            self.bars.append(int(a["data-count"]))
        if tag == "tr" and "data-serial" in a:
            self.revoked.append(a["data-serial"])
        if tag == "tr" and "data-issuer-id" in a:
            self.cas.append(a["data-issuer-id"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr":
            self._profile = None

    def handle_data(self, data: str) -> None:
        if self._text_of is None or not data.strip():
            return
        kind, key = self._text_of
        if kind == "id":
            self.by_id.setdefault(key, data.strip())
        elif self._profile is not None:
            self.profiles[self._profile][key] = data.strip()
        self._text_of = None


def _numbers_from_html(html: str) -> dict[str, Any]:
    p = _Numbers()
    p.feed(html)
    return {
        "counts": {st: p.by_id[f"count-{st}"] for st in (*STATUSES, "total")},
        "profiles": p.profiles,
        "expiring": p.by_id["expiring-total"],
        "bars": p.bars,
        "revoked": p.revoked,
        "cas": p.cas,
        "generated_at": p.generated_at,
    }


def _as_ints(found: dict[str, Any]) -> dict[str, Any]:
    """The page's figures as numbers (the page shows text)."""
    return {
        "counts": {k: int(v) for k, v in found["counts"].items()},
        "profiles": {
            name: {k: int(v) for k, v in row.items()} for name, row in found["profiles"].items()
        },
        "expiring": int(found["expiring"]),
        "bars": [int(b) for b in found["bars"]],
        "revoked": list(found["revoked"]),
        "cas": sorted(found["cas"]),
    }


def _assert_matches_api(dash: Dash, found: dict[str, Any]) -> None:
    """Every figure on the page equals the API's, and the fixture's data is in it."""
    generated_at = dt.datetime.fromisoformat(found["generated_at"])
    shown = _as_ints(found)
    expected = _expected(dash, generated_at)
    assert shown == expected
    # and the figures are the fixture's, not two empty lists agreeing
    assert shown["counts"]["expired"] >= 1 and shown["counts"]["revoked"] >= 1
    assert {"mtls-server", "mtls-client", "mtls", "device"} <= set(shown["profiles"])
    assert shown["profiles"]["mtls-client"]["revoked"] == 1
    assert shown["profiles"]["mtls-server"]["expired"] == 1
    assert shown["revoked"][0] == dash.revoked
    assert sum(shown["bars"]) == shown["expiring"] >= 5
    assert shown["bars"][29] >= 1  # the 30-day certificate, in the last bar
    assert shown["counts"]["good"] > shown["expiring"]  # the 60-day device certificate
    assert len(shown["cas"]) >= 2


def _assert_no_token_in_log(dash: Dash, *tokens: str) -> None:
    log = dash.service.log.read_text(errors="replace")
    for token in (dash.service.admin_token, *tokens):
        assert token not in log, "a bearer token appeared in the service log"


# -- HTTP tests --------------------------------------------------------------------------


def _plain(dash: Dash) -> requests.Session:
    return dash.service.session()  # type: ignore[return-value]


def test_without_auth_the_login_page_shows_no_data(dash: Dash) -> None:
    resp = _plain(dash).get(f"{dash.base}/", timeout=TIMEOUT)
    assert resp.status_code == 200, resp.text[:500]
    assert resp.headers["Content-Type"].startswith("text/html")
    assert 'id="login-form"' in resp.text and 'action="/login"' in resp.text
    assert "count-good" not in resp.text and dash.revoked not in resp.text
    assert "Set-Cookie" not in resp.headers
    for header in SECURITY_HEADERS:
        assert header in resp.headers, header
    assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
    assert resp.headers["Cache-Control"] == "no-store"

    bad = _plain(dash).get(
        f"{dash.base}/", headers={"Authorization": "Bearer hsmca_not-a-token"}, timeout=TIMEOUT
    )
    assert bad.status_code == 401 and 'id="login-error"' in bad.text
    assert "count-good" not in bad.text


def test_issuer_token_is_forbidden(dash: Dash) -> None:
    token, name = new_token(dash.service.home, "issuer")
    mark = last_event_id(dash.service.home)
    resp = _plain(dash).get(
        f"{dash.base}/", headers={"Authorization": f"Bearer {token}"}, timeout=TIMEOUT
    )
    assert resp.status_code == 403, resp.text[:500]
    assert 'id="forbidden"' in resp.text and "count-good" not in resp.text
    login = _plain(dash).post(
        f"{dash.base}/login", data={"token": token}, allow_redirects=False, timeout=TIMEOUT
    )
    assert login.status_code == 403 and "Set-Cookie" not in login.headers
    assert token not in login.text
    mine = [e for e in events_since(dash.service.home, mark) if e.actor == f"token:{name}"]
    assert [(e.action, e.outcome) for e in mine] == [("dashboard.view", "refused")] * 2
    _assert_no_token_in_log(dash, token)


def test_admin_and_auditor_see_the_numbers_the_api_reports(dash: Dash) -> None:
    resp = dash.admin.get(f"{dash.base}/", timeout=TIMEOUT)
    assert resp.status_code == 200, resp.text[:500]
    assert 'id="expiry-chart"' in resp.text and "<script" not in resp.text
    _assert_matches_api(dash, _numbers_from_html(resp.text))

    auditor, _ = new_token(dash.service.home, "auditor")
    seen = _plain(dash).get(
        f"{dash.base}/", headers={"Authorization": f"Bearer {auditor}"}, timeout=TIMEOUT
    )
    assert seen.status_code == 200 and 'id="count-total"' in seen.text
    # no sign-out button for a bearer caller (there is no cookie to drop)
    assert 'action="/logout"' not in seen.text


def test_login_form_sets_a_strict_cookie_and_logout_drops_it(dash: Dash) -> None:
    token, _ = new_token(dash.service.home, "auditor")
    browser = _plain(dash)
    refused = browser.post(
        f"{dash.base}/login", data={"token": "hsmca_wrong"}, allow_redirects=False, timeout=TIMEOUT
    )
    assert refused.status_code == 401 and "Set-Cookie" not in refused.headers
    assert "hsmca_wrong" not in refused.text

    cross = browser.post(
        f"{dash.base}/login",
        data={"token": token},
        headers={"Origin": "https://evil.example"},
        allow_redirects=False,
        timeout=TIMEOUT,
    )
    assert cross.status_code == 403 and "Set-Cookie" not in cross.headers
    other_site = browser.post(
        f"{dash.base}/login",
        data={"token": token},
        headers={"Sec-Fetch-Site": "cross-site"},
        allow_redirects=False,
        timeout=TIMEOUT,
    )
    assert other_site.status_code == 403 and "Set-Cookie" not in other_site.headers

    resp = browser.post(
        f"{dash.base}/login", data={"token": token}, allow_redirects=False, timeout=TIMEOUT
    )
    assert resp.status_code == 303, resp.text[:500]
    assert resp.headers["Location"] == "/"
    cookie = resp.headers["Set-Cookie"]
    name, _, rest = cookie.partition("=")
    assert name == "hsmca_dashboard"
    attributes = {part.strip().split("=")[0].lower(): part.strip() for part in rest.split(";")}
    assert {"httponly", "secure", "samesite", "path"} <= set(attributes), cookie
    assert attributes["samesite"] == "SameSite=Strict" and attributes["path"] == "Path=/"

    page = browser.get(f"{dash.base}/", timeout=TIMEOUT)
    assert page.status_code == 200 and 'id="count-good"' in page.text
    assert 'action="/logout"' in page.text and token not in page.text

    out = browser.post(f"{dash.base}/logout", allow_redirects=False, timeout=TIMEOUT)
    assert out.status_code == 303 and "hsmca_dashboard=;" in out.headers["Set-Cookie"]
    after = browser.get(f"{dash.base}/", timeout=TIMEOUT)
    assert after.status_code == 200 and 'id="login-form"' in after.text
    _assert_no_token_in_log(dash, token)


# -- the browser -------------------------------------------------------------------------


class BrowserError(AssertionError):
    pass


class Chromium:
    """Headless Debian chromium driven by the DevTools protocol over
    ``--remote-debugging-pipe`` (fd 3: commands in, fd 4: replies and events out)."""

    def __init__(self, profile_dir: Path) -> None:
        exe = shutil.which("chromium")
        if exe is None:
            pytest.fail(CHROMIUM_HINT)
        to_browser_r, self._to_browser = (_high(fd) for fd in os.pipe())
        self._from_browser, from_browser_w = (_high(fd) for fd in os.pipe())
        args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--no-proxy-server",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--ignore-certificate-errors",
            "--remote-debugging-pipe",
            f"--user-data-dir={profile_dir / 'profile'}",
            f"--window-size={WIDTH},{HEIGHT}",
            "about:blank",
        ]
        # bash puts the pipe ends on fds 3 and 4 (they are >= 10 here, so no clash)
        script = (
            f'exec "$0" "$@" 3<&{to_browser_r} 4>&{from_browser_w} '
            f"{to_browser_r}<&- {from_browser_w}>&-"
        )
        self.stderr_path = profile_dir / "chromium.log"
        with self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(
                ["bash", "-c", script, exe, *args],
                pass_fds=(to_browser_r, from_browser_w),
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                env=dict(os.environ, HOME=str(profile_dir)),
            )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self._events: list[dict[str, Any]] = []
        self.session = ""

    def attach(self) -> None:
        """Attach to the first page and make its viewport WIDTH x HEIGHT."""
        targets = self.call("Target.getTargets", session=False)["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        attached = self.call(
            "Target.attachToTarget", {"targetId": page["targetId"], "flatten": True}, False
        )
        self.session = attached["sessionId"]
        self.call("Page.enable")
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False},
        )

    def call(
        self, method: str, params: dict[str, Any] | None = None, session: bool = True
    ) -> dict[str, Any]:
        """Send one command and return its result (BrowserError on a protocol error)."""
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
        reply = self._receive(lambda m: m.get("id") == msg["id"], method)
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error'].get('message')}")
        return dict(reply.get("result", {}))

    def wait_event(self, method: str) -> dict[str, Any]:
        for i, event in enumerate(self._events):
            if event.get("method") == method:
                return self._events.pop(i)
        return self._receive(lambda m: m.get("method") == method, method, keep_events=False)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise BrowserError(f"script failed: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def navigate(self, url: str) -> None:
        self._events.clear()
        self.call("Page.navigate", {"url": url})
        self.wait_event("Page.loadEventFired")

    def wait_for(self, expression: str, what: str) -> None:
        deadline = time.monotonic() + BROWSER_TIMEOUT
        while not self.evaluate(expression):
            if time.monotonic() > deadline:
                where = self.evaluate("location.pathname + ' ' + document.title")
                raise BrowserError(f"timed out waiting for {what} (at {where})")
            time.sleep(0.05)  # polling interval, bounded by the deadline

    def _receive(self, wanted: Any, what: str, keep_events: bool = True) -> dict[str, Any]:
        deadline = time.monotonic() + BROWSER_TIMEOUT
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                message = json.loads(raw)
                if wanted(message):
                    return dict(message)
                if keep_events and "method" in message:
                    self._events.append(message)
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._from_browser], [], [], max(left, 0))
            if not ready:
                raise BrowserError(f"no answer from chromium to {what} in {BROWSER_TIMEOUT}s")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise BrowserError(f"chromium closed the pipe: {self._log_tail()}")
            self._buffer += chunk

    def _log_tail(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-1500:]

    def close(self) -> None:
        try:
            if self.process.poll() is None:
                with contextlib.suppress(BrowserError, OSError):
                    self.call("Browser.close", session=False)
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        finally:
            os.close(self._to_browser)
            os.close(self._from_browser)


def _high(fd: int) -> int:
    """``fd`` moved to a number >= 10 (close-on-exec; pass_fds clears that in the child)."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved


#: the dashboard's figures read from the DOM (same shape as :func:`_numbers_from_html`)
READ_NUMBERS = """JSON.stringify((() => {
  const text = id => document.getElementById(id).textContent.trim();
  const r = {counts: {}, profiles: {}, bars: [], revoked: [], cas: []};
  for (const st of ["good", "expired", "revoked", "pending", "total"])
    r.counts[st] = text("count-" + st);
  r.expiring = text("expiring-total");
  r.generated_at = document.getElementById("generated-at").dataset.generatedAt;
  for (const tr of document.querySelectorAll("tr[data-profile]")) {
    const row = {};
    for (const td of tr.querySelectorAll("td[data-status]"))
      row[td.dataset.status] = td.textContent.trim();
    r.profiles[tr.dataset.profile] = row;
  }
  for (const g of document.querySelectorAll("#expiry-chart g[data-day]"))
    r.bars.push(g.dataset.count);
  for (const tr of document.querySelectorAll("tr[data-serial]")) r.revoked.push(tr.dataset.serial);
  for (const tr of document.querySelectorAll("tr[data-issuer-id]"))
    r.cas.push(tr.dataset.issuerId);
  return r;
})())"""


def _png_facts(png: bytes) -> tuple[int, int, int]:
    """(width, height, distinct byte values of the decompressed image data) of a PNG."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", png[16:24])
    assert png[12:16] == b"IHDR"
    data, pos = b"", 8
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        kind = png[pos + 4 : pos + 8]
        if kind == b"IDAT":
            data += png[pos + 8 : pos + 8 + length]
        pos += 12 + length
    return width, height, len(set(zlib.decompress(data)))


def test_dashboard_renders_in_headless_chromium(dash: Dash, tmp_path: Path) -> None:
    if shutil.which("chromium") is None:
        pytest.fail(CHROMIUM_HINT)
    token, _ = new_token(dash.service.home, "auditor")
    browser = Chromium(tmp_path)
    try:
        browser.attach()
        browser.navigate(f"{dash.base}/")
        assert browser.evaluate("!!document.getElementById('login-form')"), "no login form"
        # sign in as an operator would: type the token into the form and press the button
        browser.evaluate("document.getElementById('token').focus()")
        browser.call("Input.insertText", {"text": token})
        browser.evaluate("document.querySelector('#login-form button').click()")
        browser.wait_for(
            "document.readyState === 'complete' && !!document.getElementById('count-good')",
            "the dashboard after signing in",
        )
        assert browser.evaluate("location.pathname") == "/"
        cookies = browser.call("Network.getCookies", {"urls": [f"{dash.base}/"]})["cookies"]
        ours = [c for c in cookies if c["name"] == "hsmca_dashboard"]
        assert len(ours) == 1, [c["name"] for c in cookies]
        assert ours[0]["httpOnly"] and ours[0]["secure"] and ours[0]["sameSite"] == "Strict"
        assert browser.evaluate("document.cookie") == "", "the cookie is readable by scripts"

        found = json.loads(browser.evaluate(READ_NUMBERS))
        shot = base64.b64decode(browser.call("Page.captureScreenshot", {"format": "png"})["data"])
    finally:
        browser.close()
    (tmp_path / "dash.png").write_bytes(shot)

    width, height, distinct = _png_facts(shot)
    assert (width, height) == (WIDTH, HEIGHT)
    assert len(shot) > 20_000, f"screenshot suspiciously small ({len(shot)} bytes)"
    assert distinct > 32, "the screenshot looks blank"
    _assert_matches_api(dash, found)
    _assert_no_token_in_log(dash, token)
