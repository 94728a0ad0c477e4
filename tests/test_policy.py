"""The RA's rules: name patterns, DNS syntax, durations, serials, TTLs (property tests with
hypothesis), and issuer tokens' limits enforced through the real core."""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pki.actors import Actor
from pki.audit import StoredEvent
from pki.config import load_settings
from pki.durations import MAX_SECONDS, format_duration, parse_duration
from pki.errors import BadCsr, BadDuration, Forbidden, InvalidInput, NameNotAllowed, PolicyError
from pki.policy import NamePolicy, RequestedNames, classify_names, normalise_dns, resolve_ttl
from pki.profiles import ProfileRegistry
from pki.serials import SERIAL_BITS, new_serial, parse_serial, serial_hex
from pki.service import IssueRequest, Pki
from tests.conftest import build_csr

#: applied per test (not as a global profile, which would change other modules' tests)
quick = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

LDH_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")

#: LDH labels of 1..22 characters, no hyphen at either end
label = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=22).map(
    lambda s: s.strip("-") or "x"
)
labels = st.lists(label, min_size=1, max_size=4)
#: valid DNS names of 1..5 labels that do not end in a numeric label
dns_name = (
    st.lists(label, min_size=1, max_size=5)
    .map(".".join)
    .filter(lambda n: not n.rsplit(".", 1)[-1].isdigit())
)


# -- NamePolicy ---------------------------------------------------------------------------------


@quick
@given(labels)
@example(["a"])
@example(["a", "b", "c"])
def test_star_zone_matches_any_depth_below(below: list[str]) -> None:
    """``*.example`` allows every name below ``example``, wildcard names included."""
    policy = NamePolicy(["*.example"])
    name = ".".join(below) + ".example"
    assert policy.allows_dns(name)
    assert policy.allows_dns(name.upper())
    assert policy.allows_dns("*." + name)


@quick
@given(label)
@example("bad")
def test_star_zone_does_not_match_the_zone_or_lookalikes(prefix: str) -> None:
    """Not ``example`` itself, not ``badexample``, not ``example.other``."""
    policy = NamePolicy(["*.example"])
    assert not policy.allows_dns("example")
    assert not policy.allows_dns(prefix + "example")
    assert not policy.allows_dns(f"{prefix}.example.other")
    assert not policy.allows_dns(f"{prefix}.examples")
    assert not policy.allows_dns(f"{prefix}-example")


@quick
@given(dns_name, st.ip_addresses())
def test_star_matches_everything(name: str, ip: ipaddress.IPv4Address) -> None:
    """``*`` allows any DNS name, IP address and URI."""
    policy = NamePolicy(["*"])
    assert policy.allows_dns(name)
    assert policy.allows_ip(str(ip))
    assert policy.allows_uri(f"urn:dev:serial:{name}")


@quick
@given(dns_name)
def test_exact_pattern_matches_only_that_name(name: str) -> None:
    """A plain pattern is an exact (case-insensitive) match, not a suffix match."""
    policy = NamePolicy([name.upper()])
    assert policy.allows_dns(name)
    assert not policy.allows_dns("x." + name)
    assert not policy.allows_dns("x" + name)


@quick
@given(st.ip_addresses(network="10.0.0.0/8"), st.ip_addresses(network="2001:db8::/32"))
def test_cidr_patterns_allow_their_block(v4: ipaddress.IPv4Address, v6: object) -> None:
    """An address inside a CIDR pattern is allowed (IPv4 and IPv6)."""
    policy = NamePolicy(["10.0.0.0/8", "2001:db8::/32"])
    assert policy.allows_ip(str(v4))
    assert policy.allows_ip(str(v6))


@quick
@given(st.ip_addresses(v=4).filter(lambda ip: ip not in ipaddress.ip_network("10.0.0.0/8")))
@example(ipaddress.ip_address("11.0.0.0"))
@example(ipaddress.ip_address("9.255.255.255"))
def test_cidr_patterns_refuse_outside(ip: ipaddress.IPv4Address) -> None:
    """Outside the block, or the other IP version, is refused."""
    policy = NamePolicy(["10.0.0.0/8", "*.svc.test"])
    assert not policy.allows_ip(str(ip))
    assert not NamePolicy(["::/0"]).allows_ip(str(ip)), "an IPv6 block never holds IPv4"


def test_single_address_pattern_matches_any_spelling() -> None:
    """``2001:0db8::1`` and ``2001:db8::1`` are the same address (this failed before the
    patterns were parsed as /128 networks)."""
    assert NamePolicy(["2001:0db8::1"]).allows_ip("2001:db8::1")
    assert NamePolicy(["2001:DB8::1"]).allows_ip("2001:db8::1")
    assert NamePolicy(["10.0.0.1"]).allows_ip("10.0.0.1")
    assert not NamePolicy(["10.0.0.1"]).allows_ip("10.0.0.2")


def test_check_names_the_refused_name() -> None:
    """``check`` passes allowed names and raises NameNotAllowed naming the first refusal."""
    policy = NamePolicy(["*.svc.test", "10.0.0.0/8"])
    policy.check(RequestedNames(("a.svc.test", "*.b.svc.test"), ("10.1.2.3",)))
    with pytest.raises(NameNotAllowed, match=r"'evil\.test' is not allowed.*\*\.svc\.test"):
        policy.check(RequestedNames(("a.svc.test", "evil.test")))
    with pytest.raises(NameNotAllowed, match=r"IP address 192\.168\.0\.1 is not allowed"):
        policy.check(RequestedNames(("a.svc.test",), ("192.168.0.1",)))
    with pytest.raises(NameNotAllowed, match="URI"):
        policy.check(RequestedNames(uris=("urn:dev:serial:x",)))
    with pytest.raises(NameNotAllowed, match=r"allowed: none"):
        NamePolicy([]).check(RequestedNames(("a.svc.test",)))


# -- DNS syntax ---------------------------------------------------------------------------------


@quick
@given(dns_name.filter(lambda n: len(n) <= 253), st.booleans(), st.booleans())
def test_valid_names_are_normalised(name: str, upper: bool, trailing_dot: bool) -> None:
    """Valid LDH names pass, lower-cased, one trailing dot dropped; idempotent."""
    given_name = (name.upper() if upper else name) + ("." if trailing_dot else "")
    assert normalise_dns(given_name) == name
    assert normalise_dns(normalise_dns(given_name)) == name


@quick
@given(labels, st.integers(min_value=0, max_value=4))
@example(["a", "b"], 2)  # "a.b." + "." -> two trailing dots
def test_empty_labels_are_refused(parts: list[str], where: int) -> None:
    """An empty label anywhere (leading dot, ``..``, two trailing dots) is invalid."""
    where = min(where, len(parts))
    broken = [*parts[:where], "", *parts[where:]]
    name = ".".join(broken)
    if where == len(parts):
        name += "."  # "a.b." is the absolute form of a.b; "a.b.." has an empty label
    with pytest.raises(BadCsr, match="invalid DNS name"):
        normalise_dns(name)


@quick
@given(labels, st.integers(min_value=64, max_value=120), st.integers(min_value=0, max_value=4))
def test_long_labels_are_refused(parts: list[str], size: int, where: int) -> None:
    """A label longer than 63 octets anywhere is invalid."""
    where = min(where, len(parts))
    name = ".".join([*parts[:where], "a" * size, *parts[where:]]) + ".test"
    with pytest.raises(BadCsr, match="invalid DNS name"):
        normalise_dns(name)


@quick
@given(st.text(max_size=80))
@example("a\n.example")
@example("example.test\n")
@example("a..b")
@example("a.b..")
@example("*.example")
@example("-x.test")
@example("x_y.test")
def test_normalise_dns_never_returns_a_bad_name(text: str) -> None:
    """Whatever the input, the result (if any) is LDH labels of 1..63, at most 253 long;
    anything else is BadCsr (never another exception)."""
    try:
        name = normalise_dns(text)
    except BadCsr:
        return
    assert 0 < len(name) <= 253
    parts = name.split(".")
    for i, part in enumerate(parts):
        assert (i == 0 and part == "*" and len(parts) > 2) or LDH_LABEL.fullmatch(part), name


def test_classify_names_sorts_and_dedupes() -> None:
    """Free-form names go to DNS, IP (canonical) or URI; duplicates collapse."""
    names = classify_names(["A.svc.test", "a.svc.test", "2001:0DB8::1", "urn:dev:serial:7"])
    assert names == RequestedNames(("a.svc.test",), ("2001:db8::1",), ("urn:dev:serial:7",))
    with pytest.raises(BadCsr, match=re.escape("invalid DNS name 'bad..name'")):
        classify_names(["ok.test", "bad..name"])


# -- durations ----------------------------------------------------------------------------------

units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


@quick
@given(st.integers(min_value=1, max_value=MAX_SECONDS))
@example(MAX_SECONDS)
@example(90)
@example(86400)
@example(86401)
def test_format_then_parse_round_trips(seconds: int) -> None:
    """``parse_duration(format_duration(d)) == d``, formatted as one ``<n><unit>``."""
    delta = dt.timedelta(seconds=seconds)
    text = format_duration(delta)
    assert re.fullmatch(r"[1-9][0-9]*[smhd]", text), text
    assert parse_duration(text) == delta


@quick
@given(
    st.lists(
        st.tuples(st.integers(min_value=0, max_value=10_000), st.sampled_from(sorted(units))),
        min_size=1,
        max_size=4,
    ).filter(lambda parts: 0 < sum(n * units[u] for n, u in parts) <= MAX_SECONDS)
)
def test_parse_then_format_round_trips(parts: list[tuple[int, str]]) -> None:
    """``1d12h`` style strings parse to the sum; format/parse then keeps the value."""
    text = "".join(f"{n}{u}" for n, u in parts)
    delta = parse_duration(text)
    assert delta == dt.timedelta(seconds=sum(n * units[u] for n, u in parts))
    assert parse_duration(format_duration(delta)) == delta
    assert parse_duration(f" {text.upper()} ") == delta


def test_durations_as_operators_write_them() -> None:
    """The contract's examples and the int-as-seconds form."""
    assert parse_duration("90s") == dt.timedelta(seconds=90)
    assert parse_duration("15m") == dt.timedelta(minutes=15)
    assert parse_duration("24h") == dt.timedelta(hours=24)
    assert parse_duration("7d") == dt.timedelta(days=7)
    assert parse_duration("1d12h") == dt.timedelta(hours=36)
    assert parse_duration(90) == parse_duration("90") == dt.timedelta(seconds=90)
    assert format_duration(dt.timedelta(days=30)) == "30d"
    assert format_duration(dt.timedelta(seconds=90)) == "90s"


@quick
@given(st.one_of(st.text(max_size=30), st.integers()))
@example("99999999999999d")  # OverflowError before the fix
@example("\u00b2")  # superscript two: str.isdigit() but not int() -> ValueError before
@example("\u0663h")  # Arabic-Indic three: used to be accepted as 3h
@example("0s")
@example("-1h")
@example("1h 30m")
@example("")
@example(10**20)
def test_parse_duration_is_positive_or_bad_duration(text: str | int) -> None:
    """Any input is a positive timedelta of ASCII ``<n><unit>`` parts, or BadDuration."""
    try:
        delta = parse_duration(text)
    except BadDuration as exc:
        assert "duration" in str(exc)
        return
    assert dt.timedelta(0) < delta <= dt.timedelta(seconds=MAX_SECONDS)
    if isinstance(text, str):
        assert re.fullmatch(r"[0-9]+|([0-9]+[smhdw])+", text.strip().lower()), text


@pytest.mark.parametrize("bad", [True, "h", "7x", "1.5h", "7d!", "d7", f"{MAX_SECONDS + 1}s"])
def test_parse_duration_refuses_with_a_hint(bad: object) -> None:
    """Refusals say what a duration looks like."""
    with pytest.raises(BadDuration, match="duration"):
        parse_duration(bad)  # type: ignore[arg-type]


# -- serials ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("0A:1B", "0a1b"),
        ("0a:1b", "0a1b"),
        ("0A1B", "0a1b"),
        ("A1B", "0a1b"),
        ("0x0A1B", "0a1b"),
        ("0X0a1b", "0a1b"),
        (" 0a1b\n", "0a1b"),
        ("00ff", "ff"),
    ],
)
def test_parse_serial_examples(text: str, canonical: str) -> None:
    """Colons, upper case and a ``0x`` prefix are accepted; output is lower, even length."""
    assert parse_serial(text) == canonical


@quick
@given(st.integers(min_value=1, max_value=2**SERIAL_BITS - 1), st.sampled_from(range(4)))
def test_parse_serial_canonical_form(value: int, style: int) -> None:
    """Every spelling of a serial parses to ``serial_hex(value)``: lower-case, even length."""
    canonical = serial_hex(value)
    spelled = [
        canonical,
        canonical.upper(),
        "0x" + format(value, "X"),
        ":".join(canonical[i : i + 2] for i in range(0, len(canonical), 2)).upper(),
    ][style]
    result = parse_serial(spelled)
    assert result == canonical
    assert re.fullmatch(r"([0-9a-f]{2})+", result)
    assert int(result, 16) == value


@pytest.mark.parametrize(
    "garbage",
    ["", "0x", ":", "zz", "g1", "-1", "+1f", "1_f", "0x0x1f", "1 f", "00", "\u0661", "f" * 41],
)
def test_parse_serial_refuses_garbage(garbage: str) -> None:
    """Not hex, zero, signed, with separators int() tolerates, or over 160 bits."""
    with pytest.raises(InvalidInput, match="not a serial number"):
        parse_serial(garbage)


@quick
@given(st.text(max_size=50))
def test_parse_serial_accepts_only_hex(text: str) -> None:
    """Arbitrary text is InvalidInput unless it is ASCII hex (colons / 0x aside)."""
    cleaned = text.strip().lower().replace(":", "").removeprefix("0x")
    try:
        result = parse_serial(text)
    except InvalidInput:
        return
    assert re.fullmatch(r"[0-9a-f]+", cleaned), text
    assert result == serial_hex(int(cleaned, 16))


def test_new_serials_are_large_positive_and_distinct() -> None:
    """More than 64 bits, at most 159 (20 DER octets, positive), no repeats."""
    values = [new_serial() for _ in range(500)]
    assert all(64 < v.bit_length() <= SERIAL_BITS for v in values)
    assert len(set(values)) == len(values)


# -- profiles and TTLs --------------------------------------------------------------------------


@pytest.fixture
def registry(tmp_path: Path) -> ProfileRegistry:
    """The built-in profiles from default settings."""
    return ProfileRegistry(load_settings(tmp_path, environ={}))


def test_builtin_profiles(registry: ProfileRegistry) -> None:
    """The four profiles of the contract, with their TTLs; unknown names are listed."""
    assert registry.names() == ["device", "mtls", "mtls-client", "mtls-server"]
    assert registry.get("device").device and not registry.get("mtls").device
    assert registry.get("device").default_ttl == dt.timedelta(days=7)
    assert registry.get("device").max_ttl == dt.timedelta(days=90)
    assert registry.get("mtls-server").max_ttl == dt.timedelta(days=30)
    with pytest.raises(PolicyError, match="unknown profile 'nope'; known: device, mtls"):
        registry.get("nope")


def test_resolve_ttl(registry: ProfileRegistry) -> None:
    """Default, requested, capped by the caller, refused above the maximum."""
    server = registry.get("mtls-server")
    assert resolve_ttl(server, None) == dt.timedelta(hours=24)
    assert resolve_ttl(server, None, dt.timedelta(hours=1)) == dt.timedelta(hours=1)
    assert resolve_ttl(server, dt.timedelta(days=30)) == dt.timedelta(days=30)
    with pytest.raises(PolicyError, match="ttl 31d exceeds the maximum of 30d"):
        resolve_ttl(server, dt.timedelta(days=31))
    with pytest.raises(PolicyError, match="maximum of 2h"):
        resolve_ttl(server, dt.timedelta(hours=3), dt.timedelta(hours=2))


# -- 7. issuer tokens' limits through the core -------------------------------------------------

SVC_ISSUER = Actor(name="token:x", role="issuer", allowed_names=("*.svc.test",))


def _refused_events_since(pki: Pki, before: int) -> list[StoredEvent]:
    return [e for e in list(pki.store.audit_events())[before:] if e.outcome == "refused"]


def test_issuer_may_issue_within_its_names(pki: Pki) -> None:
    """``*.svc.test`` covers a.svc.test (and deeper names); the record names the token."""
    csr, _ = build_csr(cn="a.svc.test", sans=("a.svc.test", "b.c.svc.test"))
    record = pki.issue(IssueRequest(csr, "mtls-server"), SVC_ISSUER)
    assert record.status == "good"
    assert record.requester == "token:x"
    assert record.sans == ["dns:a.svc.test", "dns:b.c.svc.test"]


@pytest.mark.parametrize(
    ("cn", "sans", "refused"),
    [
        ("evil.test", ("evil.test",), "evil.test"),
        ("a.svc.test", ("a.svc.test", "evil.test"), "evil.test"),
        ("svc.test", ("svc.test",), "svc.test"),
        ("a.svc.test", ("a.svc.test", "10.0.0.1"), "10.0.0.1"),
    ],
    ids=["outside", "one-of-several", "zone-apex", "ip"],
)
def test_issuer_is_forbidden_outside_its_names(
    pki: Pki, cn: str, sans: tuple[str, ...], refused: str
) -> None:
    """Forbidden naming the name; no row; a 'refused' audit event for that token."""
    csr, _ = build_csr(cn=cn, sans=sans)
    rows, events = pki.store.count_certificates(), len(list(pki.store.audit_events()))
    with pytest.raises(Forbidden, match=re.escape(refused)) as caught:
        pki.issue(IssueRequest(csr, "mtls-server"), SVC_ISSUER)
    assert type(caught.value) is Forbidden
    assert pki.store.count_certificates() == rows
    refusals = _refused_events_since(pki, events)
    assert len(refusals) == 1
    event = refusals[0]
    assert event.actor == "token:x"
    assert event.action == "certificate.issue"
    assert refused in event.details["reason"]
    assert pki.verify_audit().ok, "the refusal is part of the verified audit chain"


def test_issuer_limited_to_profiles(pki: Pki) -> None:
    """An issuer limited to mtls-client gets it, and is Forbidden mtls-server."""
    actor = Actor(
        name="token:clients",
        role="issuer",
        allowed_names=("*.svc.test",),
        profiles=("mtls-client",),
    )
    csr, _ = build_csr()
    rows, events = pki.store.count_certificates(), len(list(pki.store.audit_events()))
    with pytest.raises(Forbidden, match=r"may not issue profile 'mtls-server'"):
        pki.issue(IssueRequest(csr, "mtls-server"), actor)
    assert pki.store.count_certificates() == rows
    assert len(_refused_events_since(pki, events)) == 1
    assert pki.issue(IssueRequest(csr, "mtls-client"), actor).profile == "mtls-client"


def test_auditor_may_not_issue(pki: Pki) -> None:
    """Read-only role: Forbidden naming the roles that may; no row; audited refusal."""
    auditor = Actor(name="token:audit", role="auditor")
    csr, _ = build_csr()
    rows, events = pki.store.count_certificates(), len(list(pki.store.audit_events()))
    with pytest.raises(Forbidden, match=r"role 'auditor' may not do this \(needs admin or issuer"):
        pki.issue(IssueRequest(csr, "mtls-server"), auditor)
    assert pki.store.count_certificates() == rows
    refusals = _refused_events_since(pki, events)
    assert [e.actor for e in refusals] == ["token:audit"]
