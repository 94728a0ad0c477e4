"""Expiry notifications: tell someone about certificates close to expiry that were not
renewed, by signed webhook and/or e-mail, once per certificate, threshold and channel.

*Close* is per profile: ``profiles.<name>.notify_before`` (e.g. ``["2h", "30m"]``), else
``notify.default_thresholds``, else a quarter and a tenth of the profile's ``default_ttl``
(24h: 8h and 2.4h before expiry; 90d: 30d and 9d). Certificates whose profile is no longer
configured use ``notify.default_thresholds`` and are not scanned without it.

*Renewed*: another good certificate with the same profile and names expires later
(:meth:`pki.store.jobs_store.JobsStore.expiring_unrenewed`). Names are compared as stored,
in order: a renewal that lists them in another order still gets notified (the safe side).

Each notification is claimed in the database before it is sent (at most once across
instances): a crash between claim and send loses it rather than sending it twice; a
failed delivery is recorded (attempts, last error) and not retried. When a channel fails,
the rest of that channel's notifications wait, unclaimed, for the next scan.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pki.config import NotifySettings, ProfileSettings, Settings
from pki.durations import format_duration, parse_duration
from pki.errors import ConfigError
from pki.notify import Delivery, Sleep, SmtpSettings, send_email, send_webhook
from pki.store.jobs_store import ExpiringCertificate

if TYPE_CHECKING:
    from pki.service import Pki

log = logging.getLogger("hsmca.expiry")

#: certificates read per query
PAGE_SIZE = 500
EVENT = "certificate.expiring"


@dataclass(frozen=True)
class Channels:
    """The configured channels: a webhook (URL and key), e-mail (relay and recipients)."""

    webhook_url: str = ""
    webhook_secret: bytes = b""
    smtp: SmtpSettings | None = None
    email_to: tuple[str, ...] = ()

    def names(self) -> tuple[str, ...]:
        return (*(("webhook",) if self.webhook_url else ()), *(("email",) if self.smtp else ()))


def channels_of(settings: Settings) -> Channels:
    """The channels ``settings`` configure; ConfigError if the webhook key is unreadable."""
    notify = settings.notify
    secret = b""
    if notify.webhook_url:
        path = Path(notify.webhook_secret_file)
        path = path if path.is_absolute() else settings.home / path
        try:
            secret = path.read_bytes().strip()
        except OSError as exc:
            raise ConfigError(
                f"notify.webhook_secret_file {path}: {exc.strerror or type(exc).__name__}"
            ) from None
        if not secret:
            raise ConfigError(f"notify.webhook_secret_file {path} is empty")
    smtp = None
    if notify.smtp_host:
        smtp = SmtpSettings(
            notify.smtp_host, notify.smtp_port, notify.smtp_starttls, notify.smtp_from
        )
    return Channels(notify.webhook_url, secret, smtp, notify.email_to)


def thresholds_for(
    profile: ProfileSettings | None, notify: NotifySettings
) -> tuple[dt.timedelta, ...]:
    """The notification thresholds of a profile (None: a profile no longer configured),
    largest first, in whole seconds, without duplicates."""
    if profile is not None and profile.notify_before:
        deltas = profile.notify_deltas
    elif notify.default_thresholds:
        deltas = tuple(parse_duration(t) for t in notify.default_thresholds)
    elif profile is not None:
        # a quarter: well after the renewal point (two thirds of the life, +-5 % for the
        # agent), so a healthy renewal never looks overdue
        deltas = (profile.default / 4, profile.default / 10)
    else:
        deltas = ()
    whole = {dt.timedelta(seconds=int(d.total_seconds())) for d in deltas}
    return tuple(sorted((d for d in whole if d > dt.timedelta(0)), reverse=True))


def expiry_scan(pki: Pki, *, sleep: Sleep = time.sleep) -> dict[str, int]:
    """Notify of every good certificate within a threshold of its expiry that was not
    renewed, for the tightest threshold it has crossed, on every configured channel —
    each (certificate, threshold, channel) once, ever. Works with no channel configured
    (counts only). ``sleep`` is the back-off between webhook attempts (tests pass their
    own). Returns counts:

    * ``expiring``: certificates within a threshold, not renewed;
    * ``renewed_skipped``: certificates within a threshold that were renewed;
    * ``due``: notifications claimed by this scan (``sent`` + ``failed``);
    * ``sent`` / ``failed``: delivered / given up (recorded with attempts and error);
    * ``deferred``: left for the next scan because their channel failed in this one.
    """
    now = pki.clock.now()
    settings = pki.settings
    channels = channels_of(settings)
    scan = _Scan(pki, channels, now, sleep)
    known = list(settings.profiles)
    for name, profile in settings.profiles.items():
        scan.bucket(thresholds_for(profile, settings.notify), [name], other_profiles=False)
    scan.bucket(thresholds_for(None, settings.notify), known, other_profiles=True)
    return scan.counts


class _Scan:
    def __init__(self, pki: Pki, channels: Channels, now: dt.datetime, sleep: Sleep) -> None:
        self.pki = pki
        self.jobs = pki.store.jobs
        self.channels = channels
        self.names = channels.names()
        self.now = now
        self.sleep = sleep
        self.down: set[str] = set()
        self.counts = dict.fromkeys(
            ("expiring", "renewed_skipped", "due", "sent", "failed", "deferred"), 0
        )

    def bucket(
        self, thresholds: tuple[dt.timedelta, ...], profiles: list[str], other_profiles: bool
    ) -> None:
        """Scan the certificates of ``profiles`` (or of all others) against ``thresholds``."""
        if not thresholds:
            return
        until = self.now + thresholds[0]
        found = self.jobs.expiry_candidates(self.now, until, profiles, other_profiles)
        self.counts["renewed_skipped"] += found.renewed
        self.counts["expiring"] += len(found.unrenewed)
        if not self.names:
            return
        for start in range(0, len(found.unrenewed), PAGE_SIZE):
            page = self.jobs.expiring_certificates(found.unrenewed[start : start + PAGE_SIZE])
            claimed = self.jobs.claimed_notifications([c.serial for c in page])
            for cert in page:
                self.certificate(cert, thresholds, claimed)

    def certificate(
        self,
        cert: ExpiringCertificate,
        thresholds: tuple[dt.timedelta, ...],
        claimed: set[tuple[str, str, str]],
    ) -> None:
        left = cert.not_after - self.now
        threshold = min(t for t in thresholds if left <= t)  # the window is thresholds[0]
        label = format_duration(threshold)
        for channel in self.names:
            if (cert.serial, label, channel) in claimed:
                continue
            if channel in self.down:
                self.counts["deferred"] += 1
                continue
            if not self.jobs.claim_notification(cert.serial, label, channel, self.now):
                continue  # another instance claimed it since the page was read
            self.counts["due"] += 1
            result = self.deliver(channel, cert, label, threshold)
            self.jobs.notification_result(
                cert.serial, label, channel, self.pki.clock.now(), result.attempts, result.error
            )
            fields = {"serial": cert.serial, "threshold": label, "channel": channel}
            if result.ok:
                self.counts["sent"] += 1
                log.info("expiry notification sent", extra={**fields, "attempts": result.attempts})
            else:
                self.counts["failed"] += 1
                self.down.add(channel)
                log.warning(
                    "expiry notification failed",
                    extra={**fields, "attempts": result.attempts, "error": result.error},
                )

    def deliver(
        self,
        channel: str,
        cert: ExpiringCertificate,
        label: str,
        threshold: dt.timedelta,
    ) -> Delivery:
        payload = notification_payload(cert, label, threshold, self.pki.clock.now())
        if channel == "webhook":
            return send_webhook(
                self.channels.webhook_url,
                self.channels.webhook_secret,
                payload,
                delivery_id=f"{cert.serial}/{label}",
                sleep=self.sleep,
                now=lambda: self.pki.clock.now().timestamp(),
            )
        assert self.channels.smtp is not None
        subject, body = email_text(payload)
        return send_email(
            self.channels.smtp, self.channels.email_to, subject, body, sleep=self.sleep
        )


def notification_payload(
    cert: ExpiringCertificate,
    label: str,
    threshold: dt.timedelta,
    now: dt.datetime,
) -> dict[str, object]:
    """The JSON document a webhook receives (and an e-mail spells out) at ``now``."""
    return {
        "event": EVENT,
        "serial": cert.serial,
        "issuer_id": cert.issuer_id,
        "subject": cert.subject,
        "sans": list(cert.sans),
        "profile": cert.profile,
        "not_before": _iso(cert.not_before),
        "not_after": _iso(cert.not_after),
        "threshold": label,
        "threshold_seconds": int(threshold.total_seconds()),
        "seconds_left": max(0, int((cert.not_after - now).total_seconds())),
        "sent_at": _iso(now),
    }


def email_text(payload: dict[str, object]) -> tuple[str, str]:
    """Subject and plain-text body of the e-mail for ``payload``."""
    sans = payload["sans"]
    assert isinstance(sans, list)
    names = [str(s).split(":", 1)[-1] for s in sans] or [str(payload["subject"])]
    left = dt.timedelta(seconds=int(str(payload["seconds_left"])))
    subject = f"[hsmca] certificate for {names[0]} expires in {_human(left)}"
    body = "\n".join(
        [
            f"The certificate {payload['serial']} expires at {payload['not_after']}, "
            f"in {_human(left)}, and has not been renewed.",
            "",
            f"subject:   {payload['subject']}",
            f"names:     {', '.join(map(str, sans))}",
            f"profile:   {payload['profile']}",
            f"issuer:    {payload['issuer_id']}",
            f"threshold: {payload['threshold']} before expiry",
            "",
            "Renew it (same names, same profile) to stop further notifications.",
        ]
    )
    return subject, body + "\n"


def _iso(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _human(left: dt.timedelta) -> str:
    """``2d 3h``, ``7h 59m``, ``12m``: the two largest units, rounded down."""
    seconds = max(0, int(left.total_seconds()))
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size or (unit == "m" and not parts):
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return " ".join(parts[:2])
