"""ACME validation authority (the "VA"): checks http-01, dns-01 and tls-alpn-01 challenges.

Follows RFC 8555 8.1 (key authorizations), 8.3 (http-01) and 8.4 (dns-01), RFC 8737
(tls-alpn-01) and RFC 8738 (IP identifiers: http-01 and tls-alpn-01 only; the SNI for an IP
is its reverse-DNS name). :meth:`Validator.validate` returns ``None`` when the challenge is
met and otherwise raises :class:`ValidationFailure` -- never anything else. All look-ups and
connections of one validation share one deadline; a watchdog shuts a socket down when it
passes, so a slow peer cannot stretch a validation beyond it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import ipaddress
import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any
from urllib.parse import SplitResult, urljoin, urlsplit

import dns.exception
import dns.name
import dns.rdata
import dns.resolver
from cryptography import x509

log = logging.getLogger(__name__)

ACME_TLS_1 = "acme-tls/1"
ID_PE_ACME_IDENTIFIER = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")
USER_AGENT = "hsmca-va/1.0 (ACME validation authority)"
MAX_BODY = 8192
MAX_REDIRECTS = 10
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]+\Z")
_LABEL_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\Z")
_RESOLVER_RE = re.compile(r"(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]]+))(?::(?P<port>\d{1,5}))?\Z")


class ValidationFailure(Exception):
    """A challenge was not met.

    ``acme_type`` is an RFC 8555 error type without its ``urn:ietf:params:acme:error:``
    prefix ("connection", "dns", "unauthorized", "incorrectResponse", "tls", "malformed");
    ``detail`` is human text, safe to return to the ACME client.
    """

    def __init__(self, acme_type: str, detail: str) -> None:
        super().__init__(acme_type, detail)
        self.acme_type = acme_type
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.acme_type}: {self.detail}"


def key_authorization(token: str, thumbprint_b64url: str) -> str:
    """RFC 8555 8.1: ``token || '.' || base64url(JWK thumbprint of the account key)``."""
    return f"{token}.{thumbprint_b64url}"


def dns01_txt_value(key_authorization: str) -> str:
    """RFC 8555 8.4: unpadded base64url of SHA-256 over the key authorization."""
    digest = hashlib.sha256(key_authorization.encode("utf-8")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class Validator:
    """Validates challenges against the network as seen from this host.

    ``http01_port`` and ``tlsalpn01_port`` replace the RFC's fixed 80 and 443. ``dns_resolver``
    is ``""`` for the system resolver (dnspython reading /etc/resolv.conf) or ``"IP:PORT"`` /
    ``"[IPv6]:PORT"`` naming the one server used for every look-up (port 53 if left out).
    ``timeout`` bounds a whole validation, in seconds. Bad arguments raise ``ValueError``.
    Instances hold no per-validation state and may be shared between threads.
    """

    def __init__(
        self,
        http01_port: int,
        tlsalpn01_port: int,
        dns_resolver: str = "",
        timeout: float = 10.0,
        redirect_allowed: Callable[[str], bool] = lambda host: True,
    ) -> None:
        if not (0 < http01_port < 65536 and 0 < tlsalpn01_port < 65536 and timeout > 0):
            raise ValueError(f"bad port or timeout: {http01_port}, {tlsalpn01_port}, {timeout}")
        self.http01_port = http01_port
        self.tlsalpn01_port = tlsalpn01_port
        self.timeout = timeout
        #: whether an http-01 redirect may lead to this DNS name (the CA's name policy)
        self.redirect_allowed = redirect_allowed
        self._nameserver = _parse_resolver(dns_resolver)
        self._resolver: dns.resolver.Resolver | None = None  # None: the system's, read per use
        if self._nameserver is not None:
            host, port = self._nameserver
            self._resolver = dns.resolver.Resolver(configure=False)
            self._resolver.nameservers, self._resolver.port = [host], port
        self._alpn_context = _unverified_context([ACME_TLS_1])
        self._https_context = _unverified_context(["http/1.1"])

    def warm(self) -> None:
        """Load what the first validation would load (dnspython's record types)."""
        for rdtype, text in (("A", "127.0.0.1"), ("AAAA", "::1"), ("TXT", '"x"')):
            dns.rdata.from_text("IN", rdtype, text)

    def validate(
        self,
        challenge_type: str,
        identifier_type: str,
        identifier: str,
        token: str,
        key_authorization: str,
    ) -> None:
        """Return ``None`` if the challenge is met, else raise :class:`ValidationFailure`.

        ``identifier`` is a DNS name without any ``*.`` prefix (``identifier_type`` "dns") or
        an IP address (``identifier_type`` "ip"); ``token`` is the challenge token and
        ``key_authorization`` the value the client must publish (:func:`key_authorization`).
        """
        try:
            identifier = _check_arguments(challenge_type, identifier_type, identifier, token)
            run = _Run(self, challenge_type)
            if challenge_type == "http-01":
                run.http01(identifier, token, key_authorization)
            elif challenge_type == "dns-01":
                run.dns01(identifier_type, identifier, key_authorization)
            else:
                run.tlsalpn01(identifier_type, identifier, key_authorization)
        except ValidationFailure:
            raise
        except Exception as exc:
            log.exception("unexpected error validating %s for %r", challenge_type, identifier)
            kind = "connection" if isinstance(exc, OSError) else "malformed"
            text = f"{challenge_type}: unexpected {_error_text(exc)}"
            raise ValidationFailure(kind, text) from exc


class _Run:
    """One validation: the validator's settings, the challenge type and the deadline."""

    def __init__(self, va: Validator, what: str) -> None:
        self.va, self.what = va, what
        self.end = time.monotonic() + va.timeout

    def fail(self, kind: str, text: str) -> ValidationFailure:
        return ValidationFailure(kind, f"{self.what}: {text}"[:1000])

    def remaining(self) -> float:
        """Seconds left; raises the timeout failure once none are."""
        left = self.end - time.monotonic()
        if left <= 0:
            raise self.fail("connection", f"timed out after {self.va.timeout:g}s")
        return left

    def io_failure(self, kind: str, text: str, exc: Exception) -> ValidationFailure:
        """A *kind* failure for *exc*, or the timeout failure if the watchdog caused it."""
        self.remaining()
        return self.fail(kind, f"{text}: {_error_text(exc)}")

    def http01(self, identifier: str, token: str, keyauth: str) -> None:
        """RFC 8555 8.3 and RFC 8738 7.1, following redirects as Let's Encrypt does."""
        url = _url("http", identifier, self.va.http01_port, f"/.well-known/acme-challenge/{token}")
        fetched: set[str] = set()
        for _ in range(MAX_REDIRECTS + 1):
            fetched.add(url)
            status, location, body = self.fetch(url)
            if status in _REDIRECT_STATUSES:
                target = self.redirect_target(url, status, location)
                if target in fetched:
                    raise self.fail("connection", f"redirect loop: {url} redirects to {target}")
                url = target
            elif status != 200:
                raise self.fail("unauthorized", f"GET {url} returned {status}")
            elif not hmac.compare_digest(body.strip(), keyauth.encode("utf-8")):
                # what a redirect target returned is not echoed: the VA may reach hosts
                # the client cannot, and the error is the client's to read
                shown = _snippet(body) if len(fetched) == 1 else f"{len(body)} bytes"
                why = f"returned a body that is not the key authorization: {shown}"
                raise self.fail("unauthorized", f"GET {url} {why}")
            else:
                return
        raise self.fail("connection", f"more than {MAX_REDIRECTS} redirects, the last to {url}")

    def fetch(self, url: str) -> tuple[int, str | None, bytes]:
        """GET *url*; return the status, the Location header and (for a 200) the body."""
        parts = urlsplit(url)
        host, scheme = parts.hostname or "", parts.scheme
        port = parts.port or _DEFAULT_PORTS[scheme]
        tls = self.va._https_context if scheme == "https" else None
        headers = {"Host": _authority(scheme, host, port), "User-Agent": USER_AGENT}
        headers |= {"Accept": "*/*", "Connection": "close"}
        with self.session(host, port, tls, None if _is_ip(host) else host) as sock:
            conn = http.client.HTTPConnection(host, port)
            conn.sock = sock  # already connected: no proxy, no environment, our addresses
            response: http.client.HTTPResponse | None = None
            try:
                conn.request("GET", _request_target(parts), headers=headers)
                response = conn.getresponse()
                status, location = response.status, response.getheader("Location")
                body = response.read(MAX_BODY + 1) if status == 200 else b""
            except (OSError, http.client.HTTPException) as exc:
                raise self.io_failure("connection", f"GET {url} failed", exc) from exc
            finally:
                if response is not None:
                    response.close()
        self.remaining()  # the watchdog may have cut the body short
        if len(body) > MAX_BODY:
            raise self.fail("unauthorized", f"GET {url} returned more than {MAX_BODY} bytes")
        return status, location, body

    def redirect_target(self, url: str, status: int, location: str | None) -> str:
        """The absolute URL a redirect points to, if it may be followed: http or https only,
        on the scheme's default port or the port configured for it."""
        if not location:
            raise self.fail("connection", f"GET {url} returned {status} without a Location")
        target = urljoin(url, location.strip())

        def refuse(why: str) -> ValidationFailure:
            return self.fail("connection", f"refused redirect {url} -> {_snippet(target)}: {why}")

        if not target.isascii() or any(c.isspace() or not c.isprintable() for c in target):
            raise refuse("the target contains whitespace, control or non-ASCII characters")
        parts = urlsplit(target)
        if parts.scheme not in _DEFAULT_PORTS:
            raise refuse("only http and https targets are followed")
        try:
            port = parts.port or _DEFAULT_PORTS[parts.scheme]
        except ValueError:
            raise refuse("the port is invalid") from None
        host = parts.hostname or ""
        if _is_ip(host):
            raise refuse("redirects to IP addresses are not followed (as Let's Encrypt does)")
        if not _is_dns_name(host):
            raise refuse("the host is not a valid DNS name")
        if not self.va.redirect_allowed(host):
            raise refuse(f"{host} is outside the names this CA may validate")
        configured = self.va.http01_port if parts.scheme == "http" else self.va.tlsalpn01_port
        allowed = sorted({_DEFAULT_PORTS[parts.scheme], configured})
        if port not in allowed:
            shown = " or ".join(map(str, allowed))
            raise refuse(f"port {port} is not allowed for {parts.scheme} (only {shown})")
        return _url(parts.scheme, host, port, _request_target(parts))

    def dns01(self, id_type: str, identifier: str, keyauth: str) -> None:
        """RFC 8555 8.4: any TXT record at _acme-challenge.<identifier> may match."""
        if id_type != "dns":
            raise self.fail("malformed", "cannot validate IP identifiers (RFC 8738)")
        name = f"_acme-challenge.{identifier}"
        expected = dns01_txt_value(keyauth).encode("ascii")
        values = [b"".join(rr.strings) for rr in self.lookup(name, "TXT")]
        if not values:
            raise self.fail("dns", f"no TXT records found at {name}")
        if not any(hmac.compare_digest(value, expected) for value in values):
            found = ", ".join(_snippet(value, 60) for value in values[:3])
            raise self.fail(
                "unauthorized",
                f"{len(values)} TXT record(s) found at {name}, none matching the key "
                f"authorization (expected {expected.decode()!r}; found {found})",
            )

    def tlsalpn01(self, id_type: str, identifier: str, keyauth: str) -> None:
        """RFC 8737 3 and RFC 8738 6."""
        is_ip = id_type == "ip"
        sni = ipaddress.ip_address(identifier).reverse_pointer if is_ip else identifier
        port = self.va.tlsalpn01_port
        with self.session(identifier, port, self.va._alpn_context, sni) as sock:
            assert isinstance(sock, ssl.SSLSocket)
            where = f"{identifier} ({_authority('', sock.getpeername()[0], port)})"
            protocol = sock.selected_alpn_protocol()
            der = sock.getpeercert(binary_form=True)
        if protocol != ACME_TLS_1:
            why = f"did not negotiate ALPN {ACME_TLS_1} (got {protocol!r})"
            raise self.fail("unauthorized", f"{where} {why}")
        problem = _acme_certificate_problem(der, is_ip, identifier, keyauth)
        if problem:
            raise self.fail("unauthorized", f"{where} presented {problem}")

    @contextmanager
    def session(
        self, host: str, port: int, tls: ssl.SSLContext | None, sni: str | None
    ) -> Iterator[socket.socket]:
        """A socket connected to *host* (TLS handshake done if *tls*), closed on exit."""
        sock = self.connect(host, port)
        what = f"TLS handshake with {_authority('', host, port)}"
        try:
            if tls is not None:
                sock = tls.wrap_socket(sock, server_hostname=sni, do_handshake_on_connect=False)
            with self.guard(sock):
                sock.settimeout(self.remaining())
                try:
                    if isinstance(sock, ssl.SSLSocket):
                        sock.do_handshake()
                except ssl.SSLError as exc:
                    if exc.reason == "TLSV1_ALERT_NO_APPLICATION_PROTOCOL":
                        raise self.fail("unauthorized", f"{what}: no common ALPN protocol") from exc
                    raise self.io_failure("tls", f"{what} failed", exc) from exc
                except OSError as exc:
                    raise self.io_failure("connection", f"{what} failed", exc) from exc
                yield sock
        finally:
            sock.close()

    @contextmanager
    def guard(self, sock: socket.socket) -> Iterator[None]:
        """Shut *sock* down if the deadline passes before the block ends."""
        lock, done = threading.Lock(), []

        def fire() -> None:
            with lock, suppress(OSError):
                if not done:  # the plain-socket method, which also works on an SSLSocket
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)

        timer = threading.Timer(max(self.end - time.monotonic(), 0.0), fire)
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            with lock:
                done.append(True)
            timer.cancel()

    def connect(self, host: str, port: int) -> socket.socket:
        """Connect to the first reachable address of *host* (A records, then AAAA)."""
        errors = []
        for address in self.addresses(host):
            try:
                return socket.create_connection((address, port), timeout=self.remaining())
            except OSError as exc:
                errors.append(f"{_authority('', address, port)}: {_error_text(exc)}")
        raise self.fail("connection", f"could not connect to {host}: {'; '.join(errors)}")

    def addresses(self, host: str) -> list[str]:
        if _is_ip(host):
            return [host]
        addresses: list[str] = []
        errors: list[ValidationFailure] = []
        for rdtype in ("A", "AAAA"):
            try:
                addresses += [rr.address for rr in self.lookup(host, rdtype)]
            except ValidationFailure as exc:
                errors.append(exc)
        if not addresses:
            raise errors[0] if errors else self.fail("dns", f"no A or AAAA records for {host}")
        return addresses

    def lookup(self, name: str, rdtype: str) -> list[Any]:
        """The *rdtype* records at *name*; ``[]`` if the name exists without any."""
        query = f"DNS {rdtype} look-up for {name}"
        try:
            resolver = self.va._resolver or dns.resolver.Resolver()
            qname = dns.name.from_text(name)
            answer = resolver.resolve(
                qname, rdtype, lifetime=self.remaining(), raise_on_no_answer=False
            )
        except dns.resolver.NXDOMAIN:
            raise self.fail("dns", f"{query}: no such domain (NXDOMAIN)") from None
        except dns.exception.Timeout:
            raise self.fail("dns", f"{query} timed out") from None
        except (dns.exception.DNSException, OSError) as exc:
            raise self.fail("dns", f"{query} failed: {exc}") from exc
        return list(answer.rrset) if answer.rrset is not None else []


def _check_arguments(challenge: str, id_type: str, identifier: str, token: str) -> str:
    """Reject unusable arguments as "malformed"; return the identifier in canonical form."""
    if challenge not in ("http-01", "dns-01", "tls-alpn-01"):
        raise ValidationFailure("malformed", f"unsupported challenge type {challenge!r}")
    if not _TOKEN_RE.match(token):
        raise ValidationFailure("malformed", f"{challenge}: token {token!r} is not base64url")
    if id_type == "ip" and _is_ip(identifier):
        return str(ipaddress.ip_address(identifier))
    if id_type == "dns" and _is_dns_name(identifier):
        return identifier.lower().rstrip(".")
    raise ValidationFailure("malformed", f"{challenge}: bad {id_type!r} identifier {identifier!r}")


def _acme_certificate_problem(der: bytes | None, is_ip: bool, identifier: str, keyauth: str) -> str:
    """What is wrong with a tls-alpn-01 certificate ("" if nothing): it must have exactly one
    SAN, the identifier, and a critical acmeIdentifier holding OCTET STRING(SHA-256(keyauth))."""
    if not der:
        return "no certificate"
    try:
        extensions = x509.load_der_x509_certificate(der).extensions
        names = list(extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except (ValueError, x509.DuplicateExtension) as exc:
        return f"a certificate that cannot be parsed: {exc}"
    except x509.ExtensionNotFound:
        return "a certificate without a subjectAltName extension"
    expected = f"{'iPAddress' if is_ip else 'dNSName'} {identifier}"
    if len(names) != 1 or _describe(names[0]) != expected:
        shown = ", ".join(_describe(name) for name in names[:5])
        return f"a certificate whose subjectAltName is [{shown}], not exactly [{expected}]"
    try:
        extension = extensions.get_extension_for_oid(ID_PE_ACME_IDENTIFIER)
    except x509.ExtensionNotFound:
        return "a certificate without the acmeIdentifier extension"
    if not extension.critical:
        return "a certificate whose acmeIdentifier extension is not critical"
    value = getattr(extension.value, "value", b"")
    wanted = b"\x04\x20" + hashlib.sha256(keyauth.encode("utf-8")).digest()
    if not hmac.compare_digest(value, wanted):
        return (
            f"a certificate whose acmeIdentifier {_snippet(value.hex(), 80)} is not the DER "
            f"OCTET STRING of SHA-256(key authorization) {wanted.hex()}"
        )
    return ""


def _describe(name: x509.GeneralName) -> str:
    if isinstance(name, x509.DNSName):
        return f"dNSName {name.value.lower().rstrip('.')}"
    if isinstance(name, x509.IPAddress):
        return f"iPAddress {name.value}"
    return f"{type(name).__name__} {_snippet(str(name.value), 60)}"


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {exc}"[:300]


def _unverified_context(alpn: list[str]) -> ssl.SSLContext:
    """TLS 1.2+ client context that does not verify the peer (validation needs no PKIX)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(alpn)
    return context


def _parse_resolver(spec: str) -> tuple[str, int] | None:
    """``""`` -> None; ``"IP[:PORT]"``, ``"[IPv6][:PORT]"`` or a bare IPv6 -> (IP, PORT)."""
    spec = spec.strip()
    if not spec:
        return None
    if _is_ip(spec):
        return spec, 53
    match = _RESOLVER_RE.match(spec)
    host = match and (match["v6"] or match["host"])
    port = int(match["port"] or 53) if match else 0
    if not (host and _is_ip(host) and 0 < port < 65536):
        raise ValueError(f"dns_resolver must be '' or 'IP:PORT', not {spec!r}")
    return host, port


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_dns_name(text: str) -> bool:
    name = text[:-1] if text.endswith(".") else text
    return len(name) <= 253 and all(_LABEL_RE.match(label) for label in name.split("."))


def _authority(scheme: str, host: str, port: int) -> str:
    """host[:port] as in a URL or Host header; the port is left out when it is the default."""
    shown = f"[{host}]" if ":" in host else host
    return shown if _DEFAULT_PORTS.get(scheme) == port else f"{shown}:{port}"


def _request_target(parts: SplitResult) -> str:
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def _url(scheme: str, host: str, port: int, path: str) -> str:
    return f"{scheme}://{_authority(scheme, host, port)}{path}"


def _snippet(data: bytes | str, limit: int = 100) -> str:
    """A safe (repr'd, truncated) rendering of untrusted data for a detail message."""
    shown = repr(data[:limit])
    return f"{shown}... ({len(data)} in all)" if len(data) > limit else shown
