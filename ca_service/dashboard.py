"""The read-only operator dashboard at ``/`` of the HTTPS listener.

Server-rendered HTML (Flask's Jinja, autoescaped) with inline CSS and an inline SVG bar
chart; no JavaScript. Operators authenticate with an ``admin`` or ``auditor`` token, either
as ``Authorization: Bearer`` or by posting it to the login form, which keeps it in an
HttpOnly, Secure, SameSite=Strict cookie. Tokens never travel in a URL and are never
echoed back. Figures come from one use-case, :func:`pki.dashboard.dashboard_summary`;
every number sits in an element with a stable id or data attribute (``#count-good``,
``tr[data-profile] td[data-status]``, ``#expiring-total``, ``g[data-day]``).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from flask import Blueprint, Response, g, redirect, render_template_string, request

from ca_service.context import core
from pki.actors import Actor
from pki.dashboard import DashboardSummary, dashboard_summary
from pki.errors import Unauthorised

dashboard = Blueprint("dashboard", __name__)

COOKIE = "hsmca_dashboard"
ROLES = ("admin", "auditor")
#: longer form input is refused before hashing (hsmca tokens are 49 characters)
MAX_TOKEN_CHARS = 512
#: expiry chart geometry (SVG user units)
CHART_W, CHART_H, CHART_PAD_L, CHART_PAD_B, CHART_PAD_T = 900, 220, 40, 28, 12

_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    # not no-referrer: browsers then send "Origin: null" with the page's own form posts
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


@dashboard.after_request
def _headers(response: Response) -> Response:
    for name, value in _SECURITY_HEADERS.items():
        response.headers[name] = value
    return response


@dashboard.get("/")
def index() -> Response:
    """The dashboard for an admin or auditor; the login page for anyone else."""
    token, from_cookie = _presented_token()
    if token is None:
        return _login_page()
    actor = _authenticate(token)
    if actor is None:
        resp = _login_page("The token is invalid, expired or revoked.", 401)
        if from_cookie:
            _forget(resp)
        return resp
    if actor.role not in ROLES:
        return _forbidden(actor)
    summary = dashboard_summary(core())
    return _html(render_template_string(PAGE, **_page_context(summary, actor, from_cookie)))


@dashboard.get("/login")
def login_form() -> Response:
    return _login_page()


@dashboard.post("/login")
def login() -> Response:
    """Check the posted token; on success keep it in the session cookie and go to ``/``."""
    refused = _cross_origin()
    if refused is not None:
        return refused
    token = (request.form.get("token") or "").strip()
    if not token:
        return _login_page("Enter a token.", 400)
    actor = _authenticate(token) if len(token) <= MAX_TOKEN_CHARS else None
    if actor is None:
        if len(token) > MAX_TOKEN_CHARS:
            core().audit_refusal("auth.token", None, "token too long")
        return _login_page("The token is invalid, expired or revoked.", 401)
    if actor.role not in ROLES:
        return _forbidden(actor)
    resp = redirect("/", 303)
    resp.set_cookie(COOKIE, token, httponly=True, secure=True, samesite="Strict", path="/")
    return resp


@dashboard.post("/logout")
def logout() -> Response:
    """Drop the session cookie and go back to the login page."""
    refused = _cross_origin()
    if refused is not None:
        return refused
    resp = redirect("/", 303)
    _forget(resp)
    return resp


# -- authentication ----------------------------------------------------------------------


def _presented_token() -> tuple[str | None, bool]:
    """The token of ``Authorization: Bearer`` or else of the cookie; True if the cookie's."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip(), False
    cookie = request.cookies.get(COOKIE, "").strip()
    return (cookie, True) if cookie else (None, False)


def _authenticate(token: str) -> Actor | None:
    """The actor of ``token`` (kept in ``g`` for the access log), or None (audited)."""
    try:
        actor = core().authenticate_token(token)
    except Unauthorised as exc:
        core().audit_refusal("auth.token", None, str(exc))
        return None
    g.actor = actor
    return actor


def _forbidden(actor: Actor) -> Response:
    core().audit_refusal(
        "dashboard.view", None, f"role {actor.role!r} may not view the dashboard", actor.name
    )
    body = render_template_string(FORBIDDEN, actor=actor.name, role=actor.role, roles=ROLES)
    return _html(body, 403)


def _cross_origin() -> Response | None:
    """A 403 page for a form posted from another site or origin (login CSRF); None for a
    same-origin form or a client that is no browser (it sends neither header)."""
    site = request.headers.get("Sec-Fetch-Site")
    origin = request.headers.get("Origin")
    if site in (None, "same-origin") and origin in (None, f"{request.scheme}://{request.host}"):
        return None
    core().audit_refusal("dashboard.login", None, "form posted from another origin")
    return _html(render_template_string(MESSAGE, title="Forbidden", text=_CROSS_ORIGIN), 403)


_CROSS_ORIGIN = "This form may only be submitted from the dashboard itself."


def _forget(resp: Response) -> None:
    resp.delete_cookie(COOKIE, path="/", secure=True, httponly=True, samesite="Strict")


def _login_page(error: str | None = None, status: int = 200) -> Response:
    return _html(render_template_string(LOGIN, error=error), status)


def _html(body: str, status: int = 200) -> Response:
    return Response(body, status=status, mimetype="text/html")


# -- formatting --------------------------------------------------------------------------


def _when(value: dt.datetime | None) -> str:
    return "" if value is None else value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _remaining(seconds: int) -> str:
    """``3y 41d``, ``12d 5h``, ``5h 3m``; ``expired`` at or below zero."""
    if seconds <= 0:
        return "expired"
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    if days >= 365:
        return f"{days // 365}y {days % 365}d"
    if days:
        return f"{days}d {hours}h"
    return f"{hours}h {rest // 60}m"


def _chart(summary: DashboardSummary) -> dict[str, Any]:
    """Bar geometry of the expiry chart (one bar per day)."""
    days = summary.expiries
    top = max([d.count for d in days] + [1])
    plot_w = CHART_W - CHART_PAD_L - 8
    plot_h = CHART_H - CHART_PAD_B - CHART_PAD_T
    step = plot_w / max(len(days), 1)
    bars = []
    for i, day in enumerate(days):
        height = plot_h * day.count / top
        bars.append(
            {
                "day": i + 1,
                "count": day.count,
                "x": round(CHART_PAD_L + i * step + 2, 1),
                "y": round(CHART_PAD_T + plot_h - height, 1),
                "w": round(step - 4, 1),
                "h": round(height, 1),
                "title": f"{_when(day.start)} to {_when(day.end)}: {day.count}",
                "label": i + 1 in (1, 7, 14, 21, 30),
                "label_x": round(CHART_PAD_L + (i + 0.5) * step, 1),
            }
        )
    return {
        "w": CHART_W,
        "h": CHART_H,
        "top": top,
        "bars": bars,
        "axis_x": CHART_PAD_L,
        "axis_y": CHART_PAD_T + plot_h,
        "axis_top": CHART_PAD_T,
        "axis_end": CHART_W - 8,
        "label_y": CHART_H - 8,
    }


def _page_context(summary: DashboardSummary, actor: Actor, via_cookie: bool) -> dict[str, Any]:
    counts = summary.counts
    return {
        "s": summary,
        "actor": actor.name,
        "role": actor.role,
        "via_cookie": via_cookie,
        "generated": _when(summary.generated_at),
        "statuses": [
            ("good", counts.good),
            ("expired", counts.expired),
            ("revoked", counts.revoked),
            ("pending", counts.pending),
        ],
        "total": counts.total,
        "chart": _chart(summary),
        "when": _when,
        "remaining": _remaining,
        "soon": 30 * 86400,
    }


_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f4f6f8;color:#1d2733}
header{background:#1d2733;color:#fff;padding:12px 24px;display:flex;align-items:center;gap:16px}
header h1{font-size:18px;margin:0;flex:1}
header form{margin:0}
header button{background:#394b5e;color:#fff;border:0;padding:6px 12px;border-radius:4px}
main{padding:16px 24px;max-width:1240px}
section{background:#fff;border-radius:6px;padding:12px 16px;margin:0 0 16px;
box-shadow:0 1px 2px rgba(0,0,0,.08)}
h2{font-size:15px;margin:0 0 8px}
.cards{display:flex;gap:12px;flex-wrap:wrap}
.card{flex:1;min-width:120px;border-radius:6px;padding:10px 14px;background:#eef2f6}
.card .n{display:block;font-size:28px;font-weight:600}
.card.good{background:#e3f4e8}.card.expired{background:#f1eadf}
.card.revoked{background:#f9e1e1}.card.pending{background:#fff5d6}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #e4e8ec;vertical-align:top}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.mono{font-family:ui-monospace,monospace;font-size:12px;word-break:break-all}
.warn{color:#a0522d;font-weight:600}.bad{color:#b22222;font-weight:600}.ok{color:#2e7d32}
.muted{color:#6b7785}
.login{max-width:420px;margin:80px auto}
.login input{width:100%;box-sizing:border-box;padding:8px;margin:8px 0;font:inherit}
.login button{padding:8px 16px;font:inherit}
.error{color:#b22222}
"""

LOGIN = (
    """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>hsmca dashboard — sign in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>"""
    + _STYLE
    + """</style></head>
<body><header><h1>hsmca — operator dashboard</h1></header>
<main><section class="login" id="login">
<h2>Sign in</h2>
<p class="muted">Paste an <b>admin</b> or <b>auditor</b> API token.</p>
{% if error %}<p class="error" id="login-error">{{ error }}</p>{% endif %}
<form method="post" action="/login" id="login-form">
<label for="token">Token</label>
<input type="password" id="token" name="token" autocomplete="off" required>
<button type="submit">Sign in</button>
</form></section></main></body></html>
"""
)

MESSAGE = (
    """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>hsmca dashboard — {{ title }}</title>
<style>"""
    + _STYLE
    + """</style></head>
<body><header><h1>hsmca — operator dashboard</h1></header>
<main><section class="login"><h2>{{ title }}</h2><p>{{ text }}</p>
<p><a href="/">Back</a></p></section></main></body></html>
"""
)

FORBIDDEN = (
    """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>hsmca dashboard — forbidden</title>
<style>"""
    + _STYLE
    + """</style></head>
<body><header><h1>hsmca — operator dashboard</h1></header>
<main><section class="login" id="forbidden"><h2>Forbidden</h2>
<p>{{ actor }} has role <b>{{ role }}</b>; the dashboard needs
{{ roles | join(" or ") }}.</p>
<form method="post" action="/logout"><button type="submit">Sign out</button></form>
</section></main></body></html>
"""
)

PAGE = (
    """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>hsmca dashboard</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>"""
    + _STYLE
    + """</style></head>
<body>
<header><h1>hsmca — operator dashboard</h1>
<span class="muted" id="generated-at" data-generated-at="{{ s.generated_at.isoformat() }}">
as of {{ generated }}</span>
<span>{{ actor }} ({{ role }})</span>
{% if via_cookie %}<form method="post" action="/logout">
<button type="submit">Sign out</button></form>{% endif %}
</header>
<main>
<section id="counts"><h2>Certificates by status</h2>
<div class="cards">
{% for name, n in statuses %}<div class="card {{ name }}" data-status="{{ name }}">
<span class="n" id="count-{{ name }}" data-count="{{ name }}">{{ n }}</span>{{ name }}</div>
{% endfor %}<div class="card"><span class="n" id="count-total">{{ total }}</span>total</div>
</div></section>

<section id="profiles"><h2>By profile</h2>
<table><thead><tr><th>profile</th><th class="n">good</th><th class="n">expired</th>
<th class="n">revoked</th><th class="n">pending</th><th class="n">total</th></tr></thead>
<tbody>
{% for name, c in s.by_profile %}<tr data-profile="{{ name }}"><td>{{ name }}</td>
<td class="n" data-status="good">{{ c.good }}</td>
<td class="n" data-status="expired">{{ c.expired }}</td>
<td class="n" data-status="revoked">{{ c.revoked }}</td>
<td class="n" data-status="pending">{{ c.pending }}</td>
<td class="n" data-status="total">{{ c.total }}</td></tr>
{% else %}<tr><td colspan="6" class="muted">no certificates yet</td></tr>{% endfor %}
</tbody></table></section>

<section id="expiries"><h2>Expiries in the next 30 days:
<span id="expiring-total">{{ s.expiring_total }}</span></h2>
<svg id="expiry-chart" role="img" viewBox="0 0 {{ chart.w }} {{ chart.h }}"
 width="100%" preserveAspectRatio="xMinYMin meet"
 xmlns="http://www.w3.org/2000/svg" font-size="11" font-family="sans-serif">
<title>Good certificates expiring per day for the next 30 days</title>
<line x1="{{ chart.axis_x }}" y1="{{ chart.axis_y }}" x2="{{ chart.axis_end }}"
 y2="{{ chart.axis_y }}" stroke="#8896a5"/>
<line x1="{{ chart.axis_x }}" y1="{{ chart.axis_top }}" x2="{{ chart.axis_x }}"
 y2="{{ chart.axis_y }}" stroke="#8896a5"/>
<text x="{{ chart.axis_x - 6 }}" y="{{ chart.axis_top + 4 }}" text-anchor="end"
 fill="#4a5663">{{ chart.top }}</text>
<text x="{{ chart.axis_x - 6 }}" y="{{ chart.axis_y }}" text-anchor="end"
 fill="#4a5663">0</text>
{% for b in chart.bars %}<g class="bar" data-day="{{ b.day }}" data-count="{{ b.count }}">
<title>{{ b.title }}</title>
<rect x="{{ b.x }}" y="{{ b.y }}" width="{{ b.w }}" height="{{ b.h }}" fill="#3b7dd8"/>
{% if b.count %}<text x="{{ b.label_x }}" y="{{ b.y - 3 }}" text-anchor="middle"
 fill="#1d2733">{{ b.count }}</text>{% endif %}
{% if b.label %}<text x="{{ b.label_x }}" y="{{ chart.label_y }}" text-anchor="middle"
 fill="#4a5663">+{{ b.day }}d</text>{% endif %}</g>
{% endfor %}</svg>
<p class="muted">Bar <i>n</i> counts good certificates whose notAfter falls between
<i>n</i>-1 and <i>n</i> days from now.</p></section>

<section id="cas"><h2>CA certificates</h2>
<table><thead><tr><th>name</th><th>kind</th><th>issuer id</th><th>not after</th>
<th class="n">remaining</th><th>state</th></tr></thead><tbody>
{% for ca in s.cas %}<tr data-issuer-id="{{ ca.issuer_id }}"
 data-remaining-seconds="{{ ca.remaining_seconds }}">
<td>{{ ca.name }}</td><td>{{ ca.kind }}</td><td class="mono">{{ ca.issuer_id }}</td>
<td>{{ when(ca.not_after) }}</td>
<td class="n {{ 'bad' if ca.expired else ('warn' if ca.remaining_seconds < soon else '') }}">
{{ remaining(ca.remaining_seconds) }}</td>
<td class="{{ 'ok' if ca.active else 'muted' }}">{{ 'active' if ca.active else 'retired' }}</td>
</tr>{% endfor %}
</tbody></table></section>

<section id="revocations"><h2>Recent revocations</h2>
<table><thead><tr><th>revoked at</th><th>serial</th><th>subject</th><th>profile</th>
<th>reason</th></tr></thead><tbody>
{% for r in s.revocations %}<tr data-serial="{{ r.serial }}">
<td>{{ when(r.revoked_at) }}</td><td class="mono">{{ r.serial }}</td>
<td>{{ r.subject }}</td><td>{{ r.profile }}</td><td>{{ r.reason or "unspecified" }}</td></tr>
{% else %}<tr><td colspan="5" class="muted">no revocations</td></tr>{% endfor %}
</tbody></table></section>

<section id="job-runs"><h2>Recent job runs</h2>
<table><thead><tr><th>started</th><th>job</th><th>outcome</th><th class="n">duration</th>
<th>instance</th><th>error</th></tr></thead><tbody>
{% for run in s.job_runs %}<tr data-run-id="{{ run.id }}" data-job="{{ run.job }}">
<td>{{ when(run.started_at) }}</td><td>{{ run.job }}</td>
<td class="{{ 'ok' if run.outcome == 'ok' else ('bad' if run.outcome == 'error' else '') }}">
{{ run.outcome }}</td>
<td class="n">{% if run.duration_seconds is not none %}{{ '%.2f' % run.duration_seconds }} s
{% endif %}</td><td class="mono">{{ run.instance }}</td>
<td>{{ (run.error or '')[:200] }}</td></tr>
{% else %}<tr><td colspan="6" class="muted">no job runs recorded</td></tr>{% endfor %}
</tbody></table></section>
</main></body></html>
"""
)
