"""The ACME validation authority against real servers on loopback.

DNS comes from a real ``pebble-challtestsrv`` (every A query answers 127.0.0.1, AAAA none);
http-01 targets a threaded ``http.server``; tls-alpn-01 targets a Python ``ssl`` server
presenting certificates built here. Nothing is mocked.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing, contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_address
from pathlib import Path

import pytest
from asn1crypto.core import OctetString
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pki.validation import (
    ValidationFailure,
    Validator,
    dns01_txt_value,
    key_authorization,
)
from tests.acme_helpers import ChallTestSrv, free_port, running_challtestsrv

ACME_OID = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")
THUMBPRINT = "9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"  # RFC 8555 8.3 example


def _fresh_name() -> str:
    return f"{secrets.token_hex(6)}.example"


def _challenge() -> tuple[str, str]:
    token = secrets.token_urlsafe(16)
    return token, key_authorization(token, THUMBPRINT)


def _fails(
    validator: Validator, challenge: str, id_type: str, name: str, token: str, keyauth: str
) -> ValidationFailure:
    with pytest.raises(ValidationFailure) as info:
        validator.validate(challenge, id_type, name, token, keyauth)
    return info.value


# -- http-01: a small real HTTP server ----------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server: _HttpServer

    def do_GET(self) -> None:
        self.server.seen.append((self.path, dict(self.headers)))
        status, headers, body = self.server.routes.get(self.path, (404, {}, b"not found"))
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, context: ssl.SSLContext | None = None, address: tuple[str, int] = ("127.0.0.1", 0)
    ) -> None:
        super().__init__(address, _Handler)
        self.port = self.server_address[1]
        self.routes: dict[str, tuple[int, dict[str, str], bytes]] = {}
        self.seen: list[tuple[str, dict[str, str]]] = []
        if context is not None:
            self.socket = context.wrap_socket(self.socket, server_side=True)

    def serve(self, path: str, body: bytes, status: int = 200, **headers: str) -> None:
        self.routes[path] = (status, headers, body)


class _TlsServer(socketserver.ThreadingTCPServer):
    """Completes a TLS handshake with each client, then waits for it to hang up."""

    daemon_threads = True

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__(("127.0.0.1", 0), _TlsHandler)
        self.port = self.server_address[1]
        self.context = context
        self.sni: list[str | None] = []
        context.sni_callback = lambda _sock, name, _ctx: self.sni.append(name)


class _TlsHandler(socketserver.BaseRequestHandler):
    server: _TlsServer

    def handle(self) -> None:
        self.request.settimeout(5)
        with (
            suppress(OSError),
            self.server.context.wrap_socket(self.request, server_side=True) as s,
        ):
            s.recv(1)


@contextmanager
def _running(server: socketserver.BaseServer) -> Iterator[None]:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _server_context(
    tmp_path: Path,
    sans: list[x509.GeneralName],
    acme: bytes | None = None,
    critical: bool = True,
    alpn: tuple[str, ...] = ("acme-tls/1",),
) -> ssl.SSLContext:
    """A TLS server context whose self-signed certificate has *sans* and, if given, the
    acmeIdentifier extension with extnValue *acme*."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "acme-tls-alpn test")])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if acme is not None:
        builder = builder.add_extension(x509.UnrecognizedExtension(ACME_OID, acme), critical)
    cert = builder.sign(key, hashes.SHA256())
    stem = tmp_path / secrets.token_hex(4)
    cert_file, key_file = stem.with_suffix(".crt"), stem.with_suffix(".key")
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    if alpn:
        context.set_alpn_protocols(list(alpn))
    return context


def _acme_value(keyauth: str) -> bytes:
    """RFC 8737 extnValue, DER-encoded here with asn1crypto (independently of the VA)."""
    return OctetString(hashlib.sha256(keyauth.encode()).digest()).dump()


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def httpd() -> Iterator[_HttpServer]:
    server = _HttpServer()
    with _running(server):
        yield server


@pytest.fixture(scope="module")
def https_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_HttpServer]:
    sans: list[x509.GeneralName] = [x509.DNSName("secure.example")]
    context = _server_context(tmp_path_factory.mktemp("https"), sans, alpn=())
    server = _HttpServer(context)
    with _running(server):
        yield server


@pytest.fixture
def validator(challtestsrv: ChallTestSrv, httpd: _HttpServer) -> Validator:
    return Validator(httpd.port, free_port(), dns_resolver=challtestsrv.dns, timeout=5)


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[Callable[..., _TlsServer]]:
    """Starts a TLS server per call with a certificate as :func:`_server_context` builds."""
    with ExitStack() as stack:

        def start(*args: object, **kwargs: object) -> _TlsServer:
            server = _TlsServer(_server_context(tmp_path, *args, **kwargs))
            stack.enter_context(_running(server))
            return server

        yield start


def _tls_validator(challtestsrv: ChallTestSrv, server: _TlsServer) -> Validator:
    return Validator(free_port(), server.port, dns_resolver=challtestsrv.dns, timeout=5)


# -- key authorizations ----------------------------------------------------------------------


def test_key_authorization_rfc8555_example() -> None:
    token = "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0"
    assert key_authorization(token, THUMBPRINT) == (
        "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0.9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"
    )


def test_dns01_txt_value() -> None:
    # computed with: printf %s KEYAUTH | openssl dgst -sha256 -binary | base64 | tr +/ -_ | tr -d =
    keyauth = key_authorization("LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0", THUMBPRINT)
    assert dns01_txt_value(keyauth) == "LPsIwTo7o8BoG0-vjCyGQGBWSVIPxI-i_X336eUOQZo"


# -- http-01 -------------------------------------------------------------------------------------


def _path(token: str) -> str:
    return f"/.well-known/acme-challenge/{token}"


def test_http01_valid(validator: Validator, httpd: _HttpServer) -> None:
    token, keyauth = _challenge()
    httpd.serve(_path(token), keyauth.encode() + b"\r\n")
    validator.validate("http-01", "dns", "a.example", token, keyauth)
    headers = next(h for path, h in httpd.seen if path == _path(token))
    assert headers["Host"] == f"a.example:{httpd.port}"
    assert headers["User-Agent"].startswith("hsmca-va")


def test_http01_ip_identifier(validator: Validator, httpd: _HttpServer) -> None:
    token, keyauth = _challenge()
    httpd.serve(_path(token), keyauth.encode())
    validator.validate("http-01", "ip", "127.0.0.1", token, keyauth)
    headers = next(h for path, h in httpd.seen if path == _path(token))
    assert headers["Host"] == f"127.0.0.1:{httpd.port}"


def test_http01_wrong_body(validator: Validator, httpd: _HttpServer) -> None:
    token, keyauth = _challenge()
    httpd.serve(_path(token), b"wrong\x00body")
    failure = _fails(validator, "http-01", "dns", "a.example", token, keyauth)
    assert failure.acme_type == "unauthorized"
    assert "b'wrong\\x00body'" in failure.detail


def test_http01_body_too_large(validator: Validator, httpd: _HttpServer) -> None:
    token, keyauth = _challenge()
    httpd.serve(_path(token), keyauth.encode() + b" " * 10_000)
    failure = _fails(validator, "http-01", "dns", "a.example", token, keyauth)
    assert failure.acme_type == "unauthorized"
    assert "returned more than 8192 bytes" in failure.detail


def test_http01_not_found(validator: Validator, httpd: _HttpServer) -> None:
    token, keyauth = _challenge()
    failure = _fails(validator, "http-01", "dns", "a.example", token, keyauth)
    assert failure.acme_type == "unauthorized"
    url = f"http://a.example:{httpd.port}{_path(token)}"
    assert failure.detail == f"http-01: GET {url} returned 404"


def test_http01_redirects_followed(validator: Validator, httpd: _HttpServer) -> None:
    token, keyauth = _challenge()
    httpd.serve(_path(token), b"", 302, Location=f"http://b.example:{httpd.port}/step/{token}")
    httpd.serve(f"/step/{token}", b"", 307, Location=f"/final/{token}?x=1")  # relative
    httpd.serve(f"/final/{token}?x=1", keyauth.encode())
    validator.validate("http-01", "dns", "a.example", token, keyauth)
    headers = next(h for path, h in httpd.seen if path == f"/final/{token}?x=1")
    assert headers["Host"] == f"b.example:{httpd.port}"


def test_http01_redirect_to_https(
    challtestsrv: ChallTestSrv, httpd: _HttpServer, https_server: _HttpServer
) -> None:
    validator = Validator(httpd.port, https_server.port, dns_resolver=challtestsrv.dns, timeout=5)
    token, keyauth = _challenge()
    target = f"https://secure.example:{https_server.port}/tls/{token}"
    httpd.serve(_path(token), b"", 301, Location=target)
    https_server.serve(f"/tls/{token}", keyauth.encode())
    validator.validate("http-01", "dns", "a.example", token, keyauth)


@pytest.mark.parametrize(
    ("location", "why"),
    [
        ("http://a.example:{other}/x", "port {other} is not allowed for http"),
        ("https://a.example:{other}/x", "port {other} is not allowed for https"),
        ("ftp://a.example/x", "only http and https"),
        ("http://a.example:99999/x", "port is invalid"),
        ("http://bad_host!/x", "not a valid DNS name"),
        ("http://127.0.0.1:{port}/x", "redirects to IP addresses are not followed"),
        ("http://[::1]:{port}/x", "redirects to IP addresses are not followed"),
    ],
)
def test_http01_redirect_refused(
    validator: Validator, httpd: _HttpServer, location: str, why: str
) -> None:
    token, keyauth = _challenge()
    other = free_port()
    httpd.serve(_path(token), b"", 302, Location=location.format(other=other, port=httpd.port))
    failure = _fails(validator, "http-01", "dns", "a.example", token, keyauth)
    assert failure.acme_type == "connection"
    assert "refused redirect" in failure.detail
    assert why.format(other=other) in failure.detail


def test_http01_redirect_outside_the_name_policy_refused(
    challtestsrv: ChallTestSrv, httpd: _HttpServer
) -> None:
    """A redirect may only lead to names the CA's policy would validate."""
    validator = Validator(
        httpd.port,
        free_port(),
        dns_resolver=challtestsrv.dns,
        timeout=5,
        redirect_allowed=lambda host: host.endswith(".example"),
    )
    token, keyauth = _challenge()
    httpd.serve(_path(token), b"", 302, Location=f"http://internal.corp:{httpd.port}/x")
    failure = _fails(validator, "http-01", "dns", "a.example", token, keyauth)
    assert "internal.corp is outside the names this CA may validate" in failure.detail
    assert not any(path == "/x" for path, _ in httpd.seen)


def test_http01_body_behind_a_redirect_is_not_echoed(
    validator: Validator, httpd: _HttpServer
) -> None:
    """What a redirect target returned stays out of the client-visible error."""
    token, keyauth = _challenge()
    httpd.serve(_path(token), b"", 302, Location=f"http://b.example:{httpd.port}/in/{token}")
    httpd.serve(f"/in/{token}", b"SECRET-INTERNAL-DATA")
    failure = _fails(validator, "http-01", "dns", "a.example", token, keyauth)
    assert failure.acme_type == "unauthorized"
    assert "SECRET" not in failure.detail
    assert "20 bytes" in failure.detail


def test_http01_redirect_loop(validator: Validator, httpd: _HttpServer) -> None:
    token, keyauth = _challenge()
    httpd.serve(_path(token), b"", 302, Location=f"/loop/{token}")
    httpd.serve(f"/loop/{token}", b"", 302, Location=_path(token))
    failure = _fails(validator, "http-01", "dns", "a.example", token, keyauth)
    assert failure.acme_type == "connection"
    assert "redirect loop" in failure.detail


def test_http01_too_many_redirects(validator: Validator, httpd: _HttpServer) -> None:
    token, keyauth = _challenge()
    httpd.serve(_path(token), b"", 302, Location=f"/hop/{token}/0")
    for hop in range(20):
        httpd.serve(f"/hop/{token}/{hop}", b"", 302, Location=f"/hop/{token}/{hop + 1}")
    failure = _fails(validator, "http-01", "dns", "a.example", token, keyauth)
    assert failure.acme_type == "connection"
    assert "more than 10 redirects" in failure.detail
    assert sum(path.startswith(f"/hop/{token}/") for path, _ in httpd.seen) == 10


def test_http01_nothinglistening(challtestsrv: ChallTestSrv) -> None:
    validator = Validator(free_port(), free_port(), dns_resolver=challtestsrv.dns, timeout=5)
    token, keyauth = _challenge()
    failure = _fails(validator, "http-01", "dns", "a.example", token, keyauth)
    assert failure.acme_type == "connection"
    assert "could not connect to a.example" in failure.detail
    assert "refused" in failure.detail.lower()


def test_http01_silent_server_times_out(challtestsrv: ChallTestSrv) -> None:
    with closing(socket.socket()) as silent:  # accepts connections (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        validator = Validator(port, free_port(), dns_resolver=challtestsrv.dns, timeout=0.5)
        token, keyauth = _challenge()
        started = time.monotonic()
        failure = _fails(validator, "http-01", "dns", "a.example", token, keyauth)
    assert time.monotonic() - started < 3
    assert failure.acme_type == "connection"
    assert "timed out" in failure.detail


def test_http01_trickling_server_cut_off_at_deadline(challtestsrv: ChallTestSrv) -> None:
    """A server that sends a byte every 50 ms never trips a per-read timeout; the whole
    validation must still end at its deadline."""
    stop = threading.Event()
    with closing(socket.socket()) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)

        def trickle() -> None:
            conn, _ = listener.accept()
            with conn, suppress(OSError):
                conn.recv(4096)
                for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 5000:
                    if stop.wait(0.05):  # the pace of the trickle, not synchronisation
                        return
                    conn.send(bytes([byte]))

        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        port = listener.getsockname()[1]
        validator = Validator(port, free_port(), dns_resolver=challtestsrv.dns, timeout=0.7)
        token, keyauth = _challenge()
        started = time.monotonic()
        failure = _fails(validator, "http-01", "dns", "a.example", token, keyauth)
        elapsed = time.monotonic() - started
        stop.set()
        thread.join(5)
    assert 0.6 < elapsed < 2
    assert failure.acme_type == "connection"
    assert failure.detail == "http-01: timed out after 0.7s"


def test_http01_tries_next_address(
    validator: Validator, challtestsrv: ChallTestSrv, httpd: _HttpServer
) -> None:
    token, keyauth = _challenge()
    name = _fresh_name()  # 127.0.0.2 is loopback too, but nothing listens there on the port
    challtestsrv.post("/add-a", {"host": f"{name}.", "addresses": ["127.0.0.2", "127.0.0.1"]})
    httpd.serve(_path(token), keyauth.encode())
    validator.validate("http-01", "dns", name, token, keyauth)
    other = _fresh_name()
    challtestsrv.post("/add-a", {"host": f"{other}.", "addresses": ["127.0.0.2", "127.0.0.3"]})
    failure = _fails(validator, "http-01", "dns", other, token, keyauth)
    assert failure.acme_type == "connection"
    assert f"127.0.0.2:{httpd.port}" in failure.detail
    assert f"127.0.0.3:{httpd.port}" in failure.detail


def test_http01_ipv6_identifier(challtestsrv: ChallTestSrv) -> None:
    class Server6(_HttpServer):
        address_family = socket.AF_INET6

    try:
        server = Server6(address=("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    token, keyauth = _challenge()
    server.serve(_path(token), keyauth.encode())
    with _running(server):
        validator = Validator(server.port, 443, dns_resolver=challtestsrv.dns, timeout=5)
        validator.validate("http-01", "ip", "0:0::1", token, keyauth)
    assert server.seen[0][1]["Host"] == f"[::1]:{server.port}"


# -- dns-01 --------------------------------------------------------------------------------------


def test_dns01_valid(validator: Validator, challtestsrv: ChallTestSrv) -> None:
    token, keyauth = _challenge()
    name = _fresh_name()
    host = f"_acme-challenge.{name}."
    challtestsrv.post("/set-txt", {"host": host, "value": "unrelated"})
    challtestsrv.post("/set-txt", {"host": host, "value": dns01_txt_value(keyauth)})
    validator.validate("dns-01", "dns", name, token, keyauth)


def test_dns01_wrong_value(validator: Validator, challtestsrv: ChallTestSrv) -> None:
    token, keyauth = _challenge()
    name = _fresh_name()
    host = f"_acme-challenge.{name}."
    challtestsrv.post("/set-txt", {"host": host, "value": "not-it"})
    failure = _fails(validator, "dns-01", "dns", name, token, keyauth)
    assert failure.acme_type == "unauthorized"
    assert "1 TXT record(s)" in failure.detail
    assert "'not-it'" in failure.detail


def test_dns01_no_record(validator: Validator) -> None:
    token, keyauth = _challenge()
    name = _fresh_name()
    failure = _fails(validator, "dns-01", "dns", name, token, keyauth)
    assert failure.acme_type == "dns"
    assert f"no TXT records found at _acme-challenge.{name}" in failure.detail


def test_dns01_unreachable_resolver() -> None:
    validator = Validator(80, 443, dns_resolver=f"127.0.0.1:{free_port(True)}", timeout=0.5)
    token, keyauth = _challenge()
    started = time.monotonic()
    failure = _fails(validator, "dns-01", "dns", "a.example", token, keyauth)
    assert time.monotonic() - started < 3
    assert failure.acme_type == "dns"


def test_dns01_refuses_ip_identifiers(validator: Validator) -> None:
    token, keyauth = _challenge()
    assert _fails(validator, "dns-01", "ip", "127.0.0.1", token, keyauth).acme_type == "malformed"


# -- tls-alpn-01 ---------------------------------------------------------------------------------


def test_tlsalpn01_valid(challtestsrv: ChallTestSrv, tls_server: Callable[..., _TlsServer]) -> None:
    token, keyauth = _challenge()
    server = tls_server([x509.DNSName("t.example")], _acme_value(keyauth))
    _tls_validator(challtestsrv, server).validate("tls-alpn-01", "dns", "t.example", token, keyauth)
    assert server.sni == ["t.example"]


def test_tlsalpn01_ip_identifier(
    challtestsrv: ChallTestSrv, tls_server: Callable[..., _TlsServer]
) -> None:
    token, keyauth = _challenge()
    server = tls_server([x509.IPAddress(ip_address("127.0.0.1"))], _acme_value(keyauth))
    _tls_validator(challtestsrv, server).validate("tls-alpn-01", "ip", "127.0.0.1", token, keyauth)
    assert server.sni == ["1.0.0.127.in-addr.arpa"]


@pytest.mark.parametrize(
    ("case", "why"),
    [
        ("wrong digest", "is not the DER OCTET STRING"),
        ("not critical", "acmeIdentifier extension is not critical"),
        ("no extension", "without the acmeIdentifier extension"),
        ("wrong SAN", "subjectAltName is [dNSName other.example]"),
        ("two SANs", "not exactly [dNSName t.example]"),
        ("no SAN", "without a subjectAltName"),
        ("no ALPN", "did not negotiate ALPN acme-tls/1"),
        ("other ALPN", "did not negotiate ALPN acme-tls/1"),
    ],
)
def test_tlsalpn01_refused(
    challtestsrv: ChallTestSrv, tls_server: Callable[..., _TlsServer], case: str, why: str
) -> None:
    token, keyauth = _challenge()
    right = [x509.DNSName("t.example")]
    value = _acme_value(keyauth)
    args: dict[str, tuple[list[x509.GeneralName], bytes | None, bool, tuple[str, ...]]] = {
        "wrong digest": (right, _acme_value(keyauth + "x"), True, ("acme-tls/1",)),
        "not critical": (right, value, False, ("acme-tls/1",)),
        "no extension": (right, None, True, ("acme-tls/1",)),
        "wrong SAN": ([x509.DNSName("other.example")], value, True, ("acme-tls/1",)),
        "two SANs": ([*right, x509.DNSName("x.example")], value, True, ("acme-tls/1",)),
        "no SAN": ([], value, True, ("acme-tls/1",)),
        "no ALPN": (right, value, True, ()),
        "other ALPN": (right, value, True, ("h2", "http/1.1")),
    }
    server = tls_server(*args[case])
    failure = _fails(
        _tls_validator(challtestsrv, server), "tls-alpn-01", "dns", "t.example", token, keyauth
    )
    assert failure.acme_type == "unauthorized"
    assert why in failure.detail


def test_tlsalpn01_not_tls(challtestsrv: ChallTestSrv, httpd: _HttpServer) -> None:
    validator = Validator(free_port(), httpd.port, dns_resolver=challtestsrv.dns, timeout=5)
    token, keyauth = _challenge()
    failure = _fails(validator, "tls-alpn-01", "dns", "a.example", token, keyauth)
    assert failure.acme_type == "tls"
    assert "TLS handshake" in failure.detail


def test_against_pebble_responders(challtestsrv: ChallTestSrv) -> None:
    """Interoperability: Let's Encrypt's own test responders (Go) satisfy the VA."""
    http01, tlsalpn01 = free_port(), free_port()
    with running_challtestsrv(dns=False, http01=http01, tlsalpn01=tlsalpn01) as responders:
        validator = Validator(http01, tlsalpn01, dns_resolver=challtestsrv.dns, timeout=5)
        token, keyauth = _challenge()
        responders.post("/add-http01", {"token": token, "content": keyauth})
        validator.validate("http-01", "dns", "a.example", token, keyauth)
        responders.post("/add-tlsalpn01", {"host": "t.example", "content": keyauth})
        validator.validate("tls-alpn-01", "dns", "t.example", token, keyauth)
        failure = _fails(validator, "tls-alpn-01", "dns", "t.example", token, keyauth + "x")
        assert failure.acme_type == "unauthorized"
        assert "acmeIdentifier" in failure.detail


# -- arguments -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("challenge", "id_type", "identifier", "token"),
    [
        ("http-02", "dns", "a.example", "tok"),
        ("http-01", "email", "a.example", "tok"),
        ("http-01", "dns", "*.a.example", "tok"),
        ("http-01", "dns", "a.example/x", "tok"),
        ("http-01", "ip", "127.0.0.256", "tok"),
        ("http-01", "dns", "a.example", "../../etc/passwd"),
        ("tls-alpn-01", "dns", None, "tok"),
    ],
)
def test_malformed_arguments(
    validator: Validator, challenge: str, id_type: str, identifier: str, token: str
) -> None:
    failure = _fails(validator, challenge, id_type, identifier, token, "tok.thumb")
    assert failure.acme_type == "malformed"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("", None),
        ("127.0.0.1:8053", ("127.0.0.1", 8053)),
        ("127.0.0.1", ("127.0.0.1", 53)),
        ("[::1]:5353", ("::1", 5353)),
        ("[::1]", ("::1", 53)),
        ("::1", ("::1", 53)),
    ],
)
def test_resolver_spec(spec: str, expected: tuple[str, int] | None) -> None:
    assert Validator(80, 443, dns_resolver=spec)._nameserver == expected


@pytest.mark.parametrize("spec", ["dns.example:53", "127.0.0.1:x", "127.0.0.1:70000", "[::1]x"])
def test_resolver_spec_rejected(spec: str) -> None:
    with pytest.raises(ValueError):
        Validator(80, 443, dns_resolver=spec)
