"""Expiry notifications on a real core (SoftHSM2, SQLite) with a frozen clock, delivered
to a real HTTP server (webhook, HMAC checked) and a real SMTP server (aiosmtpd)."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import hashlib
import hmac
import json
import logging
import secrets
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from pki.actors import operator
from pki.clock import FrozenClock
from pki.config import CONFIG_NAME, NotifySettings, ProfileSettings, dump_toml, load_settings
from pki.errors import ConfigError
from pki.expiry import expiry_scan, thresholds_for
from pki.notify import SmtpSettings, send_email, send_webhook
from pki.records import CertificateRecord
from pki.service import IssueRequest, Pki
from pki.store.jobs_store import ExpiryCandidates
from tests.conftest import build_csr, free_port

HOUR = dt.timedelta(hours=1)
MINUTE = dt.timedelta(minutes=1)


# -- real peers --------------------------------------------------------------------------


@dataclass
class Webhook:
    """A loopback HTTP server recording every POST; answers ``script`` then ``default``."""

    script: list[int] = field(default_factory=list)
    default: int = 200
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    url: str = ""

    def payloads(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.requests]


class _HookHandler(BaseHTTPRequestHandler):
    server: Any

    def do_POST(self) -> None:
        hook: Webhook = self.server.hook
        body = self.rfile.read(int(self.headers["Content-Length"]))
        hook.requests.append((dict(self.headers), body))  # recorded before the answer
        status = hook.script.pop(0) if hook.script else hook.default
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HookHandler)
    hook = Webhook(url=f"http://127.0.0.1:{server.server_address[1]}/hooks/expiry?x=1")
    server.hook = hook  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield hook
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


class Inbox:
    """An aiosmtpd handler keeping every message it accepts."""

    def __init__(self) -> None:
        self.messages: list[tuple[list[str], email.message.EmailMessage]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        self.messages.append((list(envelope.rcpt_tos), message))  # type: ignore[arg-type]
        return "250 OK"


@pytest.fixture
def smtp() -> Iterator[tuple[Inbox, int]]:
    inbox, port = Inbox(), free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    yield inbox, port
    controller.stop()


class LogLines(logging.Handler):
    """Every record of ``hsmca.expiry`` with its ``extra`` fields, as text. (Not caplog:
    the service's JSON logging stops ``hsmca`` records from reaching the root logger.)"""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.getMessage()} {record.__dict__}")

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def expiry_log() -> Iterator[LogLines]:
    logger = logging.getLogger("hsmca.expiry")
    handler, level = LogLines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


# -- the core ------------------------------------------------------------------------------


SECRET = secrets.token_hex(32)


def configure(
    home: Path, notify: dict[str, Any], profiles: dict[str, dict[str, Any]] | None = None
) -> None:
    """Edit the home's hsmca.toml like an operator would."""
    path = home / CONFIG_NAME
    doc = tomllib.loads(path.read_text())
    doc.setdefault("notify", {}).update(notify)
    for name, extra in (profiles or {}).items():
        doc["profiles"][name].update(extra)
    path.write_text(dump_toml(doc))


def webhook_config(home: Path, hook: Webhook) -> dict[str, Any]:
    (home / "secrets").mkdir(exist_ok=True)
    (home / "secrets" / "webhook.key").write_text(SECRET + "\n")
    return {"webhook_url": hook.url, "webhook_secret_file": "secrets/webhook.key"}


def smtp_config(port: int) -> dict[str, Any]:
    return {"smtp_host": "127.0.0.1", "smtp_port": port, "email_to": ["ops@example.test"]}


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(dt.datetime.now(dt.UTC).replace(microsecond=0))


@pytest.fixture
def open_core(fresh_home: Path, clock: FrozenClock) -> Iterator[Any]:
    """``open_core()`` opens the fresh home (after the test configured it) on ``clock``."""
    opened: list[Pki] = []

    def open_() -> Pki:
        opened.append(Pki.open(fresh_home, clock=clock))
        return opened[-1]

    yield open_
    for core in opened:
        core.close()


def issue(core: Pki, name: str, profile: str = "mtls") -> CertificateRecord:
    csr = build_csr(cn=name, sans=(name,))[0]
    return core.issue(IssueRequest(csr, profile), operator("test"))


def der_of(record: CertificateRecord) -> bytes:
    assert record.certificate_pem is not None
    cert = x509.load_pem_x509_certificate(record.certificate_pem.encode())
    return cert.public_bytes(Encoding.DER)


def no_sleep(delays: list[float] | None = None) -> Any:
    def sleep(seconds: float) -> None:
        if delays is not None:
            delays.append(seconds)

    return sleep


def counts(**given: int) -> dict[str, int]:
    base = dict.fromkeys(("expiring", "renewed_skipped", "due", "sent", "failed", "deferred"), 0)
    return {**base, **given}


# -- tests ---------------------------------------------------------------------------------


def test_each_threshold_notifies_once_by_webhook_and_email(
    fresh_home: Path,
    open_core: Any,
    clock: FrozenClock,
    webhook: Webhook,
    smtp: tuple[Inbox, int],
    expiry_log: LogLines,
) -> None:
    """A 24h certificate (thresholds 6h and 2.4h, derived) gets one signed webhook and one
    e-mail at each threshold, and nothing more however often the scan runs."""
    inbox, port = smtp
    configure(fresh_home, {**webhook_config(fresh_home, webhook), **smtp_config(port)})
    core = open_core()
    record = issue(core, "expiring.svc.test")
    assert record.not_after == clock.now() + 24 * HOUR

    assert expiry_scan(core, sleep=no_sleep()) == counts()
    clock.advance(18 * HOUR + MINUTE)  # 5h59m left: past the 6h threshold
    assert expiry_scan(core, sleep=no_sleep()) == counts(expiring=1, due=2, sent=2)
    assert expiry_scan(core, sleep=no_sleep()) == counts(expiring=1)
    assert len(webhook.requests) == 1 and len(inbox.messages) == 1

    headers, body = webhook.requests[0]
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["X-Hsmca-Signature"], expected)
    assert headers["Content-Type"] == "application/json"
    assert int(headers["X-Hsmca-Timestamp"]) == int(clock.now().timestamp())
    assert headers["X-Hsmca-Delivery"] == f"{record.serial}/6h"
    payload = json.loads(body)
    assert payload == {
        "event": "certificate.expiring",
        "serial": record.serial,
        "issuer_id": record.issuer_id,
        "subject": record.subject,
        "sans": ["dns:expiring.svc.test"],
        "profile": "mtls",
        "not_before": record.not_before.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "not_after": record.not_after.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "threshold": "6h",
        "threshold_seconds": 6 * 3600,
        "seconds_left": 5 * 3600 + 59 * 60,
        "sent_at": clock.now().strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    rcpt, message = inbox.messages[0]
    assert rcpt == ["ops@example.test"]
    assert message["From"] == "hsmca@localhost"
    assert message["Subject"] == "[hsmca] certificate for expiring.svc.test expires in 5h 59m"
    assert record.serial in message.get_content()

    clock.advance(4 * HOUR)  # 1h59m left: past 2.4h (144m)
    assert expiry_scan(core, sleep=no_sleep()) == counts(expiring=1, due=2, sent=2)
    assert expiry_scan(core, sleep=no_sleep()) == counts(expiring=1)
    assert [p["threshold"] for p in webhook.payloads()] == ["6h", "144m"]
    assert len(inbox.messages) == 2

    rows = core.store.jobs.notifications(record.serial)
    assert {(r.threshold, r.channel) for r in rows} == {
        ("6h", "webhook"),
        ("6h", "email"),
        ("144m", "webhook"),
        ("144m", "email"),
    }
    assert all(r.sent_at is not None and r.attempts == 1 and r.last_error is None for r in rows)
    assert SECRET not in expiry_log.text and "expiry notification sent" in expiry_log.text

    clock.advance(2 * HOUR)  # expired: no longer scanned
    assert expiry_scan(core, sleep=no_sleep()) == counts()


def test_renewed_certificates_are_not_notified(
    fresh_home: Path, open_core: Any, clock: FrozenClock, webhook: Webhook
) -> None:
    """A newer good certificate for the same names and profile silences the old one; a
    revoked renewal does not, and neither does one of another profile."""
    configure(fresh_home, webhook_config(fresh_home, webhook))
    core = open_core()
    renewed = issue(core, "renewed.svc.test")
    revoked_renewal = issue(core, "revoked.svc.test")
    other_profile = issue(core, "other.svc.test")
    clock.advance(HOUR)
    core.renew(der_of(renewed))  # same names and profile, same key, 24h later
    core.revoke(issue(core, "revoked.svc.test").serial, "superseded", operator("test"))
    issue(core, "other.svc.test", profile="mtls-client")

    clock.advance(17 * HOUR + MINUTE)  # the originals have 5h59m left, renewals 6h59m
    assert expiry_scan(core, sleep=no_sleep()) == counts(
        expiring=2, renewed_skipped=1, due=2, sent=2
    )
    notified = {p["serial"] for p in webhook.payloads()}
    assert notified == {revoked_renewal.serial, other_profile.serial}
    assert core.store.jobs.notifications(renewed.serial) == []


def test_a_late_scan_sends_only_the_tightest_threshold_crossed(
    fresh_home: Path, open_core: Any, clock: FrozenClock, webhook: Webhook
) -> None:
    """Profile thresholds from ``notify_before``; a scan that first sees a certificate
    past both sends one notification (the tighter), not a burst."""
    configure(
        fresh_home,
        webhook_config(fresh_home, webhook),
        {"mtls-client": {"notify_before": ["2h", "30m"]}},
    )
    core = open_core()
    record = issue(core, "late.svc.test", profile="mtls-client")
    clock.advance(23 * HOUR + 45 * MINUTE)
    assert expiry_scan(core, sleep=no_sleep()) == counts(expiring=1, due=1, sent=1)
    assert [p["threshold"] for p in webhook.payloads()] == ["30m"]
    assert webhook.payloads()[0]["seconds_left"] == 15 * 60
    assert [r.threshold for r in core.store.jobs.notifications(record.serial)] == ["30m"]


def test_webhook_retries_with_back_off_then_delivers_once(
    fresh_home: Path, open_core: Any, clock: FrozenClock, webhook: Webhook
) -> None:
    """503, 503, then 200: three identical signed requests, back-off 0.5 s then 1 s."""
    configure(fresh_home, webhook_config(fresh_home, webhook))
    webhook.script = [503, 503]
    core = open_core()
    record = issue(core, "retry.svc.test")
    clock.advance(18 * HOUR + MINUTE)
    delays: list[float] = []
    assert expiry_scan(core, sleep=no_sleep(delays)) == counts(expiring=1, due=1, sent=1)
    assert delays == [0.5, 1.0]
    assert len(webhook.requests) == 3
    assert len({body for _, body in webhook.requests}) == 1
    assert len({h["X-Hsmca-Signature"] for h, _ in webhook.requests}) == 1
    [row] = core.store.jobs.notifications(record.serial)
    assert (row.attempts, row.last_error, row.sent_at) == (3, None, clock.now())
    assert expiry_scan(core, sleep=no_sleep()) == counts(expiring=1)
    assert len(webhook.requests) == 3


def test_a_webhook_that_never_accepts_is_recorded_failed_and_not_retried(
    fresh_home: Path,
    open_core: Any,
    clock: FrozenClock,
    webhook: Webhook,
    expiry_log: LogLines,
) -> None:
    """Three attempts, then failed with its error; the channel's other notifications wait
    for the next scan (unclaimed) and go out once the receiver is back."""
    configure(fresh_home, webhook_config(fresh_home, webhook))
    webhook.default = 503
    core = open_core()
    first = issue(core, "down-1.svc.test")
    clock.advance(MINUTE)
    second = issue(core, "down-2.svc.test")
    clock.advance(18 * HOUR + MINUTE)
    assert expiry_scan(core, sleep=no_sleep()) == counts(expiring=2, due=1, failed=1, deferred=1)
    assert len(webhook.requests) == 3
    [row] = core.store.jobs.notifications(first.serial)
    assert (row.attempts, row.sent_at) == (3, None)
    assert row.last_error == "HTTP 503 Service Unavailable"
    assert core.store.jobs.notifications(second.serial) == []

    webhook.default = 200
    assert expiry_scan(core, sleep=no_sleep()) == counts(expiring=2, due=1, sent=1)
    assert [p["serial"] for p in webhook.payloads()[3:]] == [second.serial]
    assert expiry_scan(core, sleep=no_sleep()) == counts(expiring=2)
    assert len(webhook.requests) == 4  # the failed one is not retried
    assert "expiry notification failed" in expiry_log.text
    assert SECRET not in expiry_log.text and "/hooks/expiry" not in expiry_log.text


def test_no_channel_configured_counts_and_sends_nothing(open_core: Any, clock: FrozenClock) -> None:
    core = open_core()
    record = issue(core, "quiet.svc.test")
    clock.advance(20 * HOUR)
    assert expiry_scan(core) == counts(expiring=1)
    assert core.store.jobs.notifications(record.serial) == []


def test_the_scheduler_job_runs_the_scan(open_core: Any, clock: FrozenClock) -> None:
    from pki.scheduler import run_job

    core = open_core()
    issue(core, "job.svc.test")
    clock.advance(20 * HOUR)
    outcome, summary, error = run_job(core, "expiry-scan", "test")
    assert (outcome, error) == ("ok", None)
    assert summary == counts(expiring=1)


# -- configuration and delivery units -------------------------------------------------------


def test_thresholds_are_derived_from_the_lifetime_unless_configured() -> None:
    notify = NotifySettings()
    assert thresholds_for(ProfileSettings("24h", "30d"), notify) == (
        6 * HOUR,
        dt.timedelta(hours=2.4),
    )
    days = dt.timedelta(days=1)
    assert thresholds_for(ProfileSettings("90d", "90d"), notify) == (22.5 * days, 9 * days)
    chosen = ProfileSettings("24h", "30d", notify_before=("30m", "2h", "2h"))
    assert thresholds_for(chosen, notify) == (2 * HOUR, 30 * MINUTE)
    fallback = NotifySettings(default_thresholds=("1h",))
    assert thresholds_for(ProfileSettings("24h", "30d"), fallback) == (HOUR,)
    assert thresholds_for(None, fallback) == (HOUR,)
    assert thresholds_for(None, notify) == ()


@pytest.mark.parametrize(
    ("notify", "profiles", "message"),
    [
        ({"webhook_url": "https://hooks.example/x?token=abc"}, {}, "webhook_secret_file"),
        ({"webhook_url": "ftp://x", "webhook_secret_file": "k"}, {}, "http:// or https://"),
        ({"smtp_host": "mail.example"}, {}, "smtp_host and notify.email_to"),
        ({"email_to": ["a@example"]}, {}, "smtp_host and notify.email_to"),
        ({"smtp_port": 0}, {}, "smtp_port"),
        ({"smtp_starttls": "yes"}, {}, "true or false"),
        ({"default_thresholds": ["soon"]}, {}, "default_thresholds"),
        ({}, {"mtls": {"notify_before": ["2x"]}}, "profiles.mtls.notify_before"),
    ],
)
def test_bad_notify_settings_are_refused_at_load(
    tmp_path: Path, notify: dict[str, Any], profiles: dict[str, Any], message: str
) -> None:
    from pki.config import default_document

    (tmp_path / CONFIG_NAME).write_text(dump_toml(default_document(tmp_path)))
    configure(tmp_path, notify, profiles)
    with pytest.raises(ConfigError, match=message) as raised:
        load_settings(tmp_path, {})
    assert "token=abc" not in str(raised.value)


def test_a_missing_webhook_key_file_fails_the_scan_without_claiming(
    fresh_home: Path, open_core: Any, clock: FrozenClock, webhook: Webhook
) -> None:
    configure(fresh_home, {"webhook_url": webhook.url, "webhook_secret_file": "nope.key"})
    core = open_core()
    record = issue(core, "nokey.svc.test")
    clock.advance(20 * HOUR)
    with pytest.raises(ConfigError, match=r"nope\.key"):
        expiry_scan(core)
    assert core.store.jobs.notifications(record.serial) == []


def test_send_webhook_gives_up_on_a_refusal_and_bounds_connection_retries(
    webhook: Webhook,
) -> None:
    webhook.script = [400]
    result = send_webhook(webhook.url, b"k", {"a": 1}, sleep=no_sleep())
    assert (result.ok, result.attempts, result.error) == (False, 1, "HTTP 400 Bad Request")

    delays: list[float] = []
    closed = f"http://127.0.0.1:{free_port()}/hook"
    result = send_webhook(closed, b"k", {"a": 1}, attempts=3, sleep=no_sleep(delays))
    assert (result.ok, result.attempts, delays) == (False, 3, [0.5, 1.0])
    assert result.error == "ConnectionRefusedError: Connection refused"


def test_send_email_reports_a_server_without_starttls(smtp: tuple[Inbox, int]) -> None:
    inbox, port = smtp
    plain = SmtpSettings("127.0.0.1", port)
    assert send_email(plain, ["a@example.test"], "s", "b").ok
    tls = SmtpSettings("127.0.0.1", port, starttls=True)
    result = send_email(tls, ["a@example.test"], "s", "b", sleep=no_sleep())
    assert (result.ok, result.error) == (False, "SMTPNotSupportedError")
    assert len(inbox.messages) == 1


def _paged_scan(core: Pki, clock: FrozenClock, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three unrenewed certificates expiring in the same second, one renewed, one renewed
    by a certificate later revoked: read two per page, each unrenewed one is notified
    once, most urgent first."""
    monkeypatch.setattr("pki.expiry.PAGE_SIZE", 2)
    serials = [issue(core, f"page-{i}.svc.test").serial for i in range(3)]
    renewed = issue(core, "page-renewed.svc.test")
    clock.advance(HOUR)
    core.renew(der_of(renewed))
    clock.advance(17 * HOUR + MINUTE)
    assert expiry_scan(core) == counts(expiring=3, renewed_skipped=1)
    jobs = core.store.jobs
    until = clock.now() + 6 * HOUR
    found = jobs.expiry_candidates(clock.now(), until, ["mtls"])
    assert found.renewed == 1
    assert [c.serial for c in jobs.expiring_certificates(found.unrenewed)] == serials
    assert found.unrenewed == sorted(found.unrenewed)  # same not_after: by id
    assert jobs.expiry_candidates(clock.now(), until, ["mtls"], other_profiles=True) == (
        ExpiryCandidates([], 0)
    )


def test_scan_pages_through_sqlite(
    open_core: Any, clock: FrozenClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    _paged_scan(open_core(), clock, monkeypatch)


@pytest.mark.postgres
def test_scan_pages_through_postgres(
    pg_home: Path, clock: FrozenClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    core = Pki.open(pg_home, clock=clock)
    try:
        assert core.store.engine.dialect.name == "postgresql"
        _paged_scan(core, clock, monkeypatch)
    finally:
        core.close()
