"""Delivery of notifications: a signed JSON webhook and e-mail through SMTP.

Neither function raises for a delivery failure: each returns a :class:`Delivery` saying
whether it arrived, after how many attempts, and the last error. Errors never quote the
webhook URL (it may carry a token) nor the signing key.
"""

from __future__ import annotations

import email.utils
import hashlib
import hmac
import http.client
import json
import smtplib
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any
from urllib.parse import urlsplit

#: header carrying ``sha256=<hex HMAC-SHA256 of the exact body>``
SIGNATURE_HEADER = "X-Hsmca-Signature"
#: header carrying the Unix time the body was signed at (also ``sent_at`` in the body)
TIMESTAMP_HEADER = "X-Hsmca-Timestamp"
#: header naming the notification (the same on every retry: receivers can de-duplicate)
DELIVERY_HEADER = "X-Hsmca-Delivery"
WEBHOOK_ATTEMPTS = 3
WEBHOOK_BACKOFF_SECONDS = 0.5
WEBHOOK_TIMEOUT_SECONDS = 10.0
SMTP_TIMEOUT_SECONDS = 15.0
#: at most this much of a webhook's response is read (and never quoted)
_MAX_RESPONSE_BYTES = 65536

Sleep = Callable[[float], None]


@dataclass(frozen=True)
class Delivery:
    """The outcome of one notification: ``ok`` or the last error, after ``attempts``."""

    ok: bool
    attempts: int
    error: str | None = None


@dataclass(frozen=True)
class SmtpSettings:
    """Where e-mail goes: an SMTP relay, optionally upgraded with STARTTLS; no login."""

    host: str
    port: int = 25
    starttls: bool = False
    sender: str = "hsmca@localhost"
    timeout: float = SMTP_TIMEOUT_SECONDS


def sign(secret: bytes, body: bytes) -> str:
    """The signature header value of ``body``: ``sha256=`` and the hex HMAC-SHA256."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def send_webhook(
    url: str,
    secret: bytes,
    payload: dict[str, Any],
    attempts: int = WEBHOOK_ATTEMPTS,
    backoff: float = WEBHOOK_BACKOFF_SECONDS,
    timeout: float = WEBHOOK_TIMEOUT_SECONDS,
    delivery_id: str = "",
    sleep: Sleep = time.sleep,
    now: Callable[[], float] = time.time,
) -> Delivery:
    """POST ``payload`` as JSON to ``url``, signed with ``secret``; any 2xx is delivered.

    Connection errors, timeouts, 429 and 5xx are retried, at most ``attempts`` in all,
    waiting ``backoff`` seconds before the second and doubling after; other answers
    (4xx, redirects) are final. The body is serialised and signed once, so every attempt
    carries the same bytes and signature. ``sleep`` and ``now`` are injectable for tests.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return Delivery(False, 0, "webhook URL is not an http(s) URL")
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "hsmca",
        SIGNATURE_HEADER: sign(secret, body),
        TIMESTAMP_HEADER: str(int(now())),
    }
    if delivery_id:
        headers[DELIVERY_HEADER] = delivery_id
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    attempts = max(1, attempts)
    error = ""
    for attempt in range(1, attempts + 1):
        if attempt > 1:
            sleep(backoff * 2 ** (attempt - 2))
        status, error = _post_once(
            parts.scheme, parts.hostname, parts.port, target, body, headers, timeout
        )
        if 200 <= status < 300:
            return Delivery(True, attempt)
        if status and not (status == 429 or status >= 500):
            return Delivery(False, attempt, error)  # the receiver refused: retrying won't help
    return Delivery(False, attempts, error)


def _post_once(
    scheme: str,
    host: str,
    port: int | None,
    target: str,
    body: bytes,
    headers: dict[str, str],
    timeout: float,
) -> tuple[int, str]:
    """One POST: (HTTP status, error text); status 0 when no answer came."""
    conn: http.client.HTTPConnection
    if scheme == "https":
        conn = http.client.HTTPSConnection(
            host, port, timeout=timeout, context=ssl.create_default_context()
        )
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", target, body=body, headers=headers)
        response = conn.getresponse()
        response.read(_MAX_RESPONSE_BYTES)
        status = response.status
        return status, f"HTTP {status} {response.reason}".strip()
    except (OSError, http.client.HTTPException) as exc:
        return 0, _describe(exc)
    finally:
        conn.close()


def _describe(exc: BaseException) -> str:
    """A short error text without the URL: the exception's type and its OS message."""
    if isinstance(exc, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or type(exc).__name__}"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    return type(exc).__name__


def send_email(
    smtp: SmtpSettings,
    to: Sequence[str],
    subject: str,
    body: str,
    attempts: int = 2,
    backoff: float = WEBHOOK_BACKOFF_SECONDS,
    sleep: Sleep = time.sleep,
) -> Delivery:
    """Send a plain-text e-mail to every address in ``to`` through ``smtp``.

    A connection failure or a temporary (4xx) SMTP answer is retried, at most
    ``attempts`` in all; a permanent refusal is final. A message accepted for some of
    the recipients counts as delivered."""
    message = EmailMessage()
    message["From"] = smtp.sender
    message["To"] = ", ".join(to)
    message["Subject"] = subject
    message["Date"] = email.utils.formatdate(usegmt=True)
    message["Message-ID"] = email.utils.make_msgid(domain=smtp.sender.rpartition("@")[2] or None)
    message.set_content(body)
    attempts = max(1, attempts)
    error = ""
    for attempt in range(1, attempts + 1):
        if attempt > 1:
            sleep(backoff * 2 ** (attempt - 2))
        try:
            with smtplib.SMTP(smtp.host, smtp.port, timeout=smtp.timeout) as client:
                if smtp.starttls:
                    client.starttls(context=ssl.create_default_context())
                client.send_message(message, from_addr=smtp.sender, to_addrs=list(to))
            return Delivery(True, attempt)
        except smtplib.SMTPRecipientsRefused as exc:
            return Delivery(False, attempt, f"SMTP refused every recipient ({len(exc.recipients)})")
        except smtplib.SMTPResponseException as exc:
            error = f"SMTP {exc.smtp_code}"
            if not 400 <= exc.smtp_code < 500:
                return Delivery(False, attempt, error)
        except (OSError, smtplib.SMTPException) as exc:
            error = _describe(exc)
    return Delivery(False, attempts, error)
