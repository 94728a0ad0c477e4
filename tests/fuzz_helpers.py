"""Helpers for the hostile-input tests: mutations of valid inputs, hostile JSON, a
property runner that counts its cases, raw HTTP exchanges and the server's memory.

One set of mutation operators serves both hypothesis (which draws the operator, its
position and argument) and the HTTP fuzzer (a seeded :class:`random.Random` draws them),
so the bytes sent over the wire are as hostile as the ones fed to the parsers in process.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import random
import select
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pki.der import tlv

MUTATIONS = ("flip", "truncate", "insert", "delete", "splice", "inflate", "nest", "repeat")
#: DER lengths that claim far more than follows (or are indefinite, which DER forbids)
INFLATED_LENGTHS = (b"\x84\xff\xff\xff\xff", b"\x80", b"\x89" + b"\xff" * 9, b"\x82\xff\xff")
MAX_MUTANT_BYTES = 256 * 1024


def _tlv_heads(data: bytes, start: int = 0, end: int | None = None, depth: int = 0) -> list[int]:
    """Offsets of the DER TLV headers in ``data`` (constructed ones recursively), as far
    as the bytes parse; [] for what is not DER."""
    end = len(data) if end is None else end
    heads: list[int] = []
    i = start
    while i + 2 <= end and depth < 32 and len(heads) < 512:
        tag, first = data[i], data[i + 1]
        size, offset = first, i + 2
        if first & 0x80:
            count = first & 0x7F
            if not 1 <= count <= 4 or offset + count > end:
                break
            size, offset = int.from_bytes(data[offset : offset + count], "big"), offset + count
        if offset + size > end:
            break
        heads.append(i)
        if tag & 0x20:
            heads += _tlv_heads(data, offset, offset + size, depth + 1)
        i = offset + size
    return heads


def mutate(data: bytes, op: str, pos: int, arg: bytes) -> bytes:
    """``data`` changed by one operator: flip a byte, truncate, insert ``arg``, delete,
    splice a copy of a range elsewhere, inflate a DER length, nest in SEQUENCEs, repeat a
    range. ``pos`` picks the place (a DER header for ``inflate``); the result is capped
    at MAX_MUTANT_BYTES."""
    n = len(data)
    i = pos % (n + 1)
    k = 1 + (arg[0] if arg else pos % 7)
    if op == "flip" and n:
        j = pos % n
        out = data[:j] + bytes([data[j] ^ (k % 255 + 1)]) + data[j + 1 :]
    elif op == "truncate":
        out = data[:i]
    elif op == "insert":
        out = data[:i] + arg + data[i:]
    elif op == "delete":
        out = data[:i] + data[i + k :]
    elif op == "splice":
        j = (pos * 7919) % (n + 1)
        out = data[:j] + data[i : i + k] + data[j:]
    elif op == "inflate":
        heads = _tlv_heads(data) or [i]
        h = heads[pos % len(heads)]
        count = data[h + 1] & 0x7F if h + 1 < n and data[h + 1] & 0x80 else 0
        out = data[: h + 1] + INFLATED_LENGTHS[k % len(INFLATED_LENGTHS)] + data[h + 2 + count :]
    elif op == "nest":
        out = data
        for _ in range(k):
            out = tlv(0x30, out)
    elif op == "repeat":
        chunk = data[i : i + 1 + k % 64] or b"\x30"
        out = data[:i] + chunk * (1 + (k * 37) % 2048) + data[i:]
    else:
        out = data + arg
    return out[:MAX_MUTANT_BYTES]


Step = tuple[str, int, bytes]
STEPS = st.tuples(st.sampled_from(MUTATIONS), st.integers(0, 1 << 20), st.binary(max_size=24))


def apply_steps(data: bytes, steps: Sequence[Step]) -> bytes:
    for op, pos, arg in steps:
        data = mutate(data, op, pos, arg)
    return data


def mutants(*valid: bytes, max_steps: int = 4) -> st.SearchStrategy[bytes]:
    """Structure-aware mutants of the ``valid`` inputs (one to ``max_steps`` mutations)."""
    return st.builds(
        apply_steps, st.sampled_from(valid), st.lists(STEPS, min_size=1, max_size=max_steps)
    )


def random_mutant(rng: random.Random, valid: bytes) -> bytes:
    """One to four random mutations of ``valid`` drawn from ``rng`` (the HTTP fuzzer)."""
    steps = [
        (rng.choice(MUTATIONS), rng.randrange(1 << 20), rng.randbytes(rng.randrange(25)))
        for _ in range(rng.randint(1, 4))
    ]
    return apply_steps(valid, steps)


#: any JSON value, hostile ones included: NaN, infinities, huge integers, lone surrogates
JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([10**400, -(10**30), 2**63, 1e308, float("nan"), float("inf")])
    | st.floats()
    | st.text(st.characters(codec=None, exclude_categories=()), max_size=40)
    | st.text(max_size=300)
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=8,
)


def json_bytes(value: Any) -> bytes:
    """``value`` as JSON (NaN and Infinity spelled as Python writes them; surrogates
    escaped)."""
    return json.dumps(value, allow_nan=True).encode()


def hostile_json(limit: int) -> list[bytes]:
    """Bodies every JSON endpoint must refuse cleanly: deep nesting, duplicate keys,
    NaN, a 5000-digit number, invalid UTF-8, UTF-16, a BOM, lone surrogates, NUL, a
    giant string just under ``limit`` bytes, and not-JSON at all."""
    giant = '{"csr": "' + "A" * (limit - 64) + '"}'
    return [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' * 20_000 + b"1" + b"}" * 20_000,
        b'{"csr": "x", "csr": {"csr": []}}',
        b'{"csr": NaN, "profile": Infinity, "ttl": -Infinity}',
        b'{"csr": ' + b"9" * 5000 + b"}",
        b'{"csr": 1e999999}',
        b'{"csr": "\xff\xfe\xc0\xaf"}',
        '{"csr": "x"}'.encode("utf-16"),
        b'\xef\xbb\xbf{"csr": "x"}',
        b'{"csr": "\\ud800", "profile": "\\udfff"}',
        b'{"csr": "\\u0000", "ttl": "\\u0000"}',
        b'{"csr": "x", "ttl": "99999999999999999999999999d"}',
        b'{"csr": "x", "ttl": "' + b"9" * 5000 + b's"}',
        giant.encode(),
        b"",
        b"null",
        b"[]",
        b'"csr"',
        b"\x00" * 64,
    ]


def run_property(
    check: Callable[[Any], None],
    strategy: st.SearchStrategy[Any],
    max_examples: int,
    examples: Sequence[Any] = (),
) -> int:
    """Run ``check`` on ``max_examples`` reproducible hypothesis examples of ``strategy``
    (plus the explicit regression ``examples``); return how many cases actually ran."""
    ran = 0

    def prop(value: Any) -> None:
        nonlocal ran
        ran += 1
        check(value)

    test = given(strategy)(prop)
    for value in examples:
        test = example(value)(test)
    settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )(test)()
    return ran


@dataclass
class Tally:
    """Outcomes of one parser's cases and its slowest call."""

    outcomes: dict[str, int] = field(default_factory=dict)
    max_seconds: float = 0.0

    def run(self, fn: Callable[[], object], refused: tuple[type[BaseException], ...]) -> None:
        """Call ``fn``; count ``ok`` or the refusal's class. Anything not in ``refused``
        propagates (and fails the property)."""
        started = time.perf_counter()
        try:
            fn()
            kind = "ok"
        except refused as exc:
            kind = type(exc).__name__
        finally:
            self.max_seconds = max(self.max_seconds, time.perf_counter() - started)
        self.outcomes[kind] = self.outcomes.get(kind, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.outcomes.values())


# -- valid inputs to mutate -----------------------------------------------------------------


def _certificate(
    subject: str, issuer: x509.Certificate | None, key: Any, signer: Any
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(signer, hashes.SHA256())
    )


def ocsp_request(issuer: x509.Certificate, serial: int, nonce: bool = True) -> bytes:
    """A DER OCSP request for ``serial`` of ``issuer`` (SHA-1 CertID, maybe a nonce)."""
    builder = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
        *_cert_id_hashes(issuer), serial, hashes.SHA1()
    )
    if nonce:
        builder = builder.add_extension(x509.OCSPNonce(b"\x01" * 16), critical=False)
    return builder.build().public_bytes(serialization.Encoding.DER)


def _cert_id_hashes(issuer: x509.Certificate) -> tuple[bytes, bytes]:
    from pki.ocsp import issuer_name_hash, public_key_hash

    return issuer_name_hash(issuer, "sha1"), public_key_hash(issuer, "sha1")


def self_signed_issuer() -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    return _certificate("fuzz issuer", None, key, key)


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


# -- the server: raw exchanges and memory --------------------------------------------------


def raw_exchange(
    port: int,
    head: bytes,
    body: bytes = b"",
    *,
    tls: ssl.SSLContext | None = None,
    timeout: float = 10.0,
) -> bytes:
    """Send ``head`` and ``body`` on a new loopback connection and read until the server
    closes it or ``timeout`` passes (then TimeoutError: the server hung)."""
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as plain:
        sock = tls.wrap_socket(plain, server_hostname="localhost") if tls else plain
        sock.sendall(head + body)
        received = b""
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, ssl.SSLError):
                return received
            if not chunk:
                return received
            received += chunk
            if _complete(received):
                return received
        raise TimeoutError(f"no complete answer within {timeout}s: {received[:200]!r}")


def _complete(data: bytes) -> bool:
    """Whether ``data`` holds a whole response with a Content-Length body."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value.strip())
    return False


def status_of(response: bytes) -> int:
    """The status code of a raw response (0 for no response at all)."""
    parts = response.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def tree_rss_kib(pid: int) -> int:
    """Resident memory (KiB) of ``pid`` and all its descendants, from /proc."""
    total, stack, seen = 0, [pid], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        proc = Path(f"/proc/{current}")
        try:
            for line in (proc / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            for task in (proc / "task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def stream_until_answer(
    port: int, head: bytes, total: int, tls: ssl.SSLContext | None, deadline_s: float = 10.0
) -> tuple[bytes, int, float]:
    """Send ``head`` and then up to ``total`` zero bytes of body, and stop as soon as an
    answer arrives: (answer, body bytes sent, seconds until the answer or the end)."""
    started = time.monotonic()
    chunk = b"\0" * 65536
    sent, answer = 0, b""
    with socket.create_connection(("127.0.0.1", port), timeout=deadline_s) as plain:
        sock = tls.wrap_socket(plain, server_hostname="localhost") if tls else plain
        sock.sendall(head)
        sock.settimeout(0.2)
        while time.monotonic() - started < deadline_s:
            readable = select.select([sock], [], [], 0)[0]
            if readable or (tls and sock.pending()):  # type: ignore[attr-defined]
                try:
                    data = sock.recv(65536)
                except (ConnectionResetError, ssl.SSLError, TimeoutError):
                    break
                answer += data
                if not data or _complete(answer):
                    break
                continue
            if sent >= total:
                select.select([sock], [], [], 0.05)
                continue
            try:
                sent += sock.send(chunk[: total - sent])
            except TimeoutError:
                continue  # the server is not reading: look for its answer
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                with contextlib.suppress(OSError, ssl.SSLError):
                    answer += sock.recv(65536)  # an answer sent before the close
                break
    return answer, sent, time.monotonic() - started
