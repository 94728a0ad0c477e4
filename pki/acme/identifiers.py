"""Order identifiers (RFC 8555 7.1.4, RFC 8738): parsing, the allowed-domain policy, and
the rule that a CSR names exactly what its order was authorised for."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pki.acme.problems import AcmeProblem
from pki.errors import BadCsr
from pki.policy import NamePolicy, RequestedNames, normalise_dns

TYPES = ("dns", "ip")


@dataclass(frozen=True)
class Identifier:
    """One identifier of an order: ``dns`` (maybe ``*.``-wildcard) or ``ip``."""

    type: str
    value: str

    @property
    def wildcard(self) -> bool:
        return self.type == "dns" and self.value.startswith("*.")

    @property
    def base(self) -> str:
        """What is validated: the name without its wildcard label."""
        return self.value[2:] if self.wildcard else self.value

    def to_json(self) -> dict[str, str]:
        return {"type": self.type, "value": self.value}


def _subproblem(kind: str, detail: str, value: Any, type_: Any = "dns") -> dict[str, Any]:
    return {
        "type": f"urn:ietf:params:acme:error:{kind}",
        "detail": detail,
        "identifier": {"type": str(type_), "value": str(value)},
    }


def parse_identifiers(raw: Any, max_names: int) -> list[Identifier]:
    """Normalised, de-duplicated identifiers; malformed or rejectedIdentifier (with one
    subproblem per bad identifier) otherwise."""
    if not isinstance(raw, list) or not raw:
        raise AcmeProblem("malformed", "identifiers must be a non-empty list")
    if len(raw) > max_names:
        raise AcmeProblem(
            "rejectedIdentifier", f"too many identifiers: {len(raw)} (at most {max_names})"
        )
    found: dict[tuple[str, str], Identifier] = {}
    bad: list[dict[str, Any]] = []
    for item in raw:
        if not isinstance(item, dict) or set(item) != {"type", "value"}:
            raise AcmeProblem("malformed", "each identifier must be {type, value}")
        type_, value = item["type"], item["value"]
        if type_ not in TYPES:
            bad.append(
                _subproblem("unsupportedIdentifier", f"type {type_!r}: use dns or ip", value, type_)
            )
            continue
        if not isinstance(value, str):
            raise AcmeProblem("malformed", "identifier values must be strings")
        try:
            ident = _normalise(type_, value)
        except BadCsr as exc:
            bad.append(_subproblem("rejectedIdentifier", str(exc), value, type_))
            continue
        found.setdefault((ident.type, ident.value), ident)
    if bad:
        first = bad[0]["detail"]
        kind = bad[0]["type"].rsplit(":", 1)[-1]
        raise AcmeProblem(kind, f"{first}", subproblems=bad)
    return list(found.values())


def _normalise(type_: str, value: str) -> Identifier:
    if type_ == "ip":
        try:
            ip = ipaddress.ip_address(value)
        except ValueError:
            raise BadCsr(f"{value!r} is not an IP address") from None
        return Identifier("ip", str(ip))
    if value != value.strip() or value.endswith("."):
        raise BadCsr(f"invalid DNS name {value!r}")
    name = normalise_dns(value)
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return Identifier("dns", name)
    raise BadCsr(f"{value!r} is an IP address: use an identifier of type ip")


def check_allowed(
    identifiers: Iterable[Identifier], patterns: Iterable[str], whose: str = "this CA's policy"
) -> None:
    """rejectedIdentifier (with subproblems) unless every identifier is allowed by
    ``patterns`` (``whose`` names them in the detail)."""
    policy = NamePolicy(patterns)
    bad = [
        _subproblem(
            "rejectedIdentifier",
            f"{i.value} is not allowed by {whose} (allowed: {policy._hint()})",
            i.value,
            i.type,
        )
        for i in identifiers
        if not (policy.allows_ip(i.value) if i.type == "ip" else policy.allows_dns(i.value))
    ]
    if bad:
        raise AcmeProblem("rejectedIdentifier", bad[0]["detail"], subproblems=bad)


def check_csr_names(
    identifiers: Iterable[Identifier], names: RequestedNames, common_name: str | None
) -> None:
    """badCSR unless the CSR's names are exactly the order's identifiers."""
    wanted = {(i.type, i.value) for i in identifiers}
    asked = {("dns", n) for n in names.dns} | {("ip", n) for n in names.ips}
    if names.uris:
        raise AcmeProblem("badCSR", "the CSR asks for URI names, which ACME cannot authorise")
    if asked != wanted:
        missing = sorted(v for _, v in wanted - asked)
        extra = sorted(v for _, v in asked - wanted)
        parts = []
        if extra:
            parts.append(f"not in the order: {', '.join(extra)}")
        if missing:
            parts.append(f"missing from the CSR: {', '.join(missing)}")
        raise AcmeProblem("badCSR", f"the CSR's names do not match the order ({'; '.join(parts)})")
    if common_name:
        cn = common_name.lower().rstrip(".")
        if cn not in {v for _, v in wanted}:
            raise AcmeProblem(
                "badCSR", f"the CSR's common name {common_name!r} is not in the order"
            )
