"""Hash-chained audit events: each carries the SHA-256 of its predecessor.

``hash_n = SHA-256(prev_hash || canonical JSON of event n)``, where the canonical JSON
includes the event's sequence number, so a changed, removed, inserted or reordered event
breaks the chain at that point. :func:`verify_chain` walks the events and says where.
The store appends events inside the same transaction as the change they describe.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

GENESIS = "0" * 64
_SECRET_KEYS = {"pin", "token", "secret", "private_key", "password", "hmac_key"}


@dataclass(frozen=True)
class AuditRecord:
    """What happened, as the use-case describes it (the store adds id, time and hashes)."""

    action: str
    actor: str
    subject: str | None = None
    outcome: str = "ok"
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        leaked = sorted(_secret_keys_in(self.details))
        if leaked:
            raise ValueError(f"audit details must not carry secrets: {leaked}")


def _secret_keys_in(value: Any) -> set[str]:
    """Secret-named keys anywhere in ``value`` (nested dicts and lists included)."""
    if isinstance(value, dict):
        found = _SECRET_KEYS & set(value)
        for item in value.values():
            found |= _secret_keys_in(item)
        return found
    if isinstance(value, list | tuple):
        return set().union(*(_secret_keys_in(item) for item in value))
    return set()


@dataclass(frozen=True)
class StoredEvent:
    """An event as read back from the store."""

    id: int
    at: dt.datetime
    actor: str
    action: str
    subject: str | None
    outcome: str
    details: dict[str, Any]
    prev_hash: str
    hash: str


def canonical_body(event_id: int, at: dt.datetime, record: AuditRecord | StoredEvent) -> bytes:
    """The bytes that are hashed for one event."""
    body = {
        "id": event_id,
        "at": at.astimezone(dt.UTC).isoformat(timespec="microseconds"),
        "actor": record.actor,
        "action": record.action,
        "subject": record.subject,
        "outcome": record.outcome,
        "details": record.details,
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()


def chain_hash(prev_hash: str, body: bytes) -> str:
    """SHA-256 of the previous hash (hex) followed by the canonical body."""
    return hashlib.sha256(prev_hash.encode() + body).hexdigest()


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    events: int
    first_bad_id: int | None = None
    problem: str | None = None


def verify_chain(events: Iterable[StoredEvent]) -> VerifyResult:
    """Check ids are consecutive from 1, each prev_hash links, and each hash recomputes."""
    prev = GENESIS
    expected_id = 1
    count = 0
    for event in events:
        count += 1
        if event.id != expected_id:
            problem = f"expected event {expected_id}, found {event.id}"
            return VerifyResult(False, count, event.id, problem)
        if event.prev_hash != prev:
            problem = "prev_hash does not match the previous event"
            return VerifyResult(False, count, event.id, problem)
        if chain_hash(prev, canonical_body(event.id, event.at, event)) != event.hash:
            return VerifyResult(False, count, event.id, "event content does not match its hash")
        prev = event.hash
        expected_id += 1
    return VerifyResult(True, count)
