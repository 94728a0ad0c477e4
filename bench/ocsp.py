"""OCSP responses/s, p50/p99 latency and server CPU: hsmca (pre-signed) vs ``openssl ocsp``.

One run, only on loopback, bounded by --count requests and --seconds per phase:

1. hsmca: a temporary home, --certs certificates issued in-process, their OCSP responses
   pre-signed (``Pki.presign_ocsp``), then a real ``hsmca serve`` on free 127.0.0.1 ports.
   Requests carry one SHA-1 CertID and no nonce, so every answer is a pre-signed one.
2. reference: ``openssl ocsp`` as a responder over an index of as many certificates of a
   throwaway software CA, signing every response live with an EC P-256 delegated responder
   key. Its ``-port`` binds every interface and OpenSSL 3.0 spins at 100% CPU after a client
   connects and leaves without a request, so each reference measurement runs a fresh
   responder, with its load generator, inside its own ``unshare -n`` network namespace
   (only loopback): this script re-executes itself there with ``--reference-inner``.
3. load: --clients client processes POST application/ocsp-request over HTTP/1.1, either on
   one keep-alive connection each or on a new connection per request (``openssl ocsp``
   closes after every response, so the like-for-like comparison is per-request). The client
   is a lean socket one by default (http.client costs several times more CPU per request,
   which the servers would lose on 2 cores; ``--client http.client`` uses it). A sample of
   responses is parsed and checked (successful, good, the serial asked, signature).
4. server CPU: utime+stime from /proc/<pid>/stat of the server process and all of its
   descendants (hsmca: supervisor, both arbiters, every worker), before and after a phase.

Goal (issue 4), on this 2-core machine where the clients share the cores: hsmca answers at
least as many responses/s as ``openssl ocsp`` in the same run, with p99 under 10 ms, and
uses fewer server CPU-seconds per 10 000 responses.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import http.client
import json
import multiprocessing as mp
import os
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
OCSP_HEADERS = {"Content-Type": "application/ocsp-request", "Accept": "application/ocsp-response"}
P99_GOAL_MS = 10.0
PR_SET_PDEATHSIG = 1
VERIFY_EVERY = 97  # check one response in this many (and each client's first)
READY_SECONDS = 60.0

Request = tuple[bytes, int]  # DER OCSPRequest, serial asked about


# -- /proc: CPU time of a process tree ------------------------------------------------------


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, utime + stime in clock ticks) of ``pid``, None when it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes().decode(errors="replace")
    except OSError:
        return None
    fields = data[data.rindex(")") + 2 :].split()  # fields[0] is field 3 (state)
    return int(fields[1]), int(fields[11]) + int(fields[12])


def process_tree(root: int) -> dict[int, int]:
    """``root`` and all its descendants (walking ppid links), each with its CPU ticks."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            stats[int(entry)] = st
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            tree[pid] = stats[pid][1]
            todo.extend(children.get(pid, []))
    return tree


def cpu_seconds(before: dict[int, int], after: dict[int, int]) -> float:
    """CPU used between two samples by the processes alive at the second (a process that
    started in between counts in full; one that exited is lost, so say so)."""
    gone = set(before) - set(after)
    if gone:
        print(f"warning: server processes exited during the phase: {sorted(gone)}", file=sys.stderr)
    return sum(t - before.get(pid, 0) for pid, t in after.items()) / CLK_TCK


def _role(pid: int) -> str:
    """A short name for a server process: its command line, hsmca's shortened to the part
    that tells supervisor, arbiter and worker apart."""
    argv = _argv(pid)
    if "--listener" in argv:
        listener = argv[argv.index("--listener") + 1]
        parent = _stat(pid)
        arbiter = parent is not None and "--listener" not in _argv(parent[0])
        return f"{listener} {'arbiter' if arbiter else 'worker'}"
    if "serve" in argv:
        return "supervisor"
    return " ".join(a for a in argv if a)[:40]


def _argv(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def cpu_by_process(before: dict[int, int], after: dict[int, int]) -> list[tuple[str, int, float]]:
    """(role, pid, CPU-seconds) of each server process over a phase, busiest first."""
    used = [(_role(pid), pid, (t - before.get(pid, 0)) / CLK_TCK) for pid, t in after.items()]
    return sorted(used, key=lambda x: -x[2])


def _die_with_parent() -> None:
    """In a child: SIGKILL when the process that started it dies, however it dies."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def kill_tree(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM ``proc``, wait up to ``grace`` s, then SIGKILL it, its process group (it was
    started in a session of its own) and any descendant left. A Ctrl-C while waiting cuts
    the wait short; the processes are still killed before it propagates."""
    leftovers = set(process_tree(proc.pid))
    interrupted = False
    try:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in leftovers | set(process_tree(proc.pid)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
    if interrupted:
        raise KeyboardInterrupt


# -- load generator -------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientJob:
    port: int
    path: str
    requests: list[Request]
    offset: int
    keepalive: bool
    count: int
    seconds: float
    start_at: float  # time.monotonic() (CLOCK_MONOTONIC: one clock for all processes)
    client: str = "raw"


def check_response(body: bytes, serial: int) -> str | None:
    """None if ``body`` is a successful OCSP response saying good for ``serial`` under a
    valid signature of the certificate it carries; else what is wrong."""
    try:
        resp = ocsp.load_der_ocsp_response(body)
        if resp.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
            return f"response status {resp.response_status.name}"
        if resp.certificate_status != ocsp.OCSPCertStatus.GOOD:
            return f"certificate status {resp.certificate_status.name}"
        if resp.serial_number != serial:
            return "answer for another serial"
        if not resp.certificates:
            return "no responder certificate in the response"
        key = resp.certificates[0].public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        assert resp.signature_hash_algorithm is not None
        key.verify(resp.signature, resp.tbs_response_bytes, ec.ECDSA(resp.signature_hash_algorithm))
    except Exception as exc:  # any failure is a bad response
        return f"{type(exc).__name__}: {exc}"
    return None


class RawHttp:
    """A lean HTTP/1.1 client on a plain socket: request heads built once, responses parsed
    only as far as status, Content-Length and Connection. It needs a fraction of
    http.client's CPU per request, which matters when the load shares 2 cores with the
    server (``--client http.client`` measures with the standard library instead)."""

    def __init__(self, port: int, path: str, keepalive: bool) -> None:
        self.port = port
        self.keepalive = keepalive
        self.head = (
            f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
            "Content-Type: application/ocsp-request\r\nAccept: application/ocsp-response\r\n"
            f"Connection: {'keep-alive' if keepalive else 'close'}\r\nContent-Length: "
        ).encode()
        self.sock: socket.socket | None = None
        self.buf = b""

    def _recv(self) -> bytes:
        assert self.sock is not None
        return self.sock.recv(65536)

    def exchange(self, der: bytes) -> tuple[int, bytes, bool]:
        """POST ``der``: (HTTP status, body, whether the server closes the connection)."""
        if self.sock is None:
            self.sock = socket.create_connection((HOST, self.port), timeout=10)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.buf = b""
        self.sock.sendall(b"%s%d\r\n\r\n%s" % (self.head, len(der), der))
        buf = self.buf
        while (end := buf.find(b"\r\n\r\n")) < 0:
            if not (chunk := self._recv()):
                raise ConnectionError("connection closed before a response")
            buf += chunk
        lines = buf[:end].decode("latin-1").split("\r\n")
        version, status = lines[0].split(" ", 2)[:2]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        if "chunked" in headers.get("transfer-encoding", ""):
            raise http.client.HTTPException("chunked responses are not supported here")
        connection = headers.get("connection", "")
        close = "close" in connection or (version == "HTTP/1.0" and "keep-alive" not in connection)
        start = end + 4
        if "content-length" not in headers:  # the body runs to the end of the connection
            close = True
            while chunk := self._recv():
                buf += chunk
            body, self.buf = buf[start:], b""
        else:
            stop = start + int(headers["content-length"])
            while len(buf) < stop:
                if not (chunk := self._recv()):
                    raise ConnectionError("connection closed in the middle of a response")
                buf += chunk
            body, self.buf = buf[start:stop], buf[stop:]
        if close or not self.keepalive:
            self.close()
        return int(status), body, close

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class StdlibHttp:
    """The same exchange with http.client (the standard library's own client)."""

    def __init__(self, port: int, path: str, keepalive: bool) -> None:
        self.port = port
        self.path = path
        self.keepalive = keepalive
        self.headers = dict(OCSP_HEADERS, Connection="keep-alive" if keepalive else "close")
        self.conn: http.client.HTTPConnection | None = None

    def exchange(self, der: bytes) -> tuple[int, bytes, bool]:
        if self.conn is None:
            self.conn = http.client.HTTPConnection(HOST, self.port, timeout=10)
        self.conn.request("POST", self.path, body=der, headers=self.headers)
        resp = self.conn.getresponse()
        body = resp.read()
        if resp.will_close or not self.keepalive:
            self.close()
        return resp.status, body, resp.will_close

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


CLIENTS = {"raw": RawHttp, "http.client": StdlibHttp}


def client(job: ClientJob) -> dict[str, object]:
    """Send requests until ``count`` or ``seconds``; latencies (s) and what went wrong."""
    http_client = CLIENTS[job.client](job.port, job.path, job.keepalive)
    latencies: list[float] = []
    errors: list[str] = []
    verified = server_closes = 0
    while time.monotonic() < job.start_at:
        time.sleep(0.001)
    cpu0 = time.process_time()
    begin = time.monotonic()
    deadline = begin + job.seconds
    i = job.offset
    while len(latencies) + len(errors) < job.count and time.monotonic() < deadline:
        der, serial = job.requests[i % len(job.requests)]
        i += 1
        t = time.perf_counter()
        try:
            status, body, closed = http_client.exchange(der)
        except (OSError, ValueError, http.client.HTTPException) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            http_client.close()
            continue
        latencies.append(time.perf_counter() - t)
        server_closes += job.keepalive and closed
        if status != 200:
            errors.append(f"HTTP {status}")
        elif len(latencies) % VERIFY_EVERY == 1:
            problem = check_response(body, serial)
            if problem:
                errors.append(problem)
            else:
                verified += 1
    end = time.monotonic()
    http_client.close()
    return {
        "latencies": latencies,
        "errors": errors[:20],
        "error_count": len(errors),
        "verified": verified,
        "server_closes": server_closes,
        "begin": begin,
        "end": end,
        "cpu": time.process_time() - cpu0,
    }


def _client_process(job: ClientJob, sender: Connection) -> None:
    """Body of a forked load client: default signal actions (Ctrl-C or SIGTERM end it
    quietly), one phase, the result sent back."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sender.send(client(job))
    sender.close()


@dataclass
class PhaseResult:
    server: str
    mode: str
    responses: int
    seconds: float
    responses_per_s: float
    p50_ms: float
    p99_ms: float
    server_cpu_s: float
    server_cpu_s_per_10k: float
    client_cpu_s: float
    errors: int
    verified: int
    server_closed_keepalive: int
    idle_cpu_after_s: float
    first_errors: list[str]
    cpu_by_process: list[tuple[str, int, float]]


def pct(values: list[float], p: int) -> float:
    return statistics.quantiles(values, n=100)[p - 1] * 1000 if len(values) > 1 else 0.0


def run_phase(
    server: str,
    server_pid: int,
    port: int,
    path: str,
    requests: list[Request],
    keepalive: bool,
    clients: int,
    count: int,
    seconds: float,
    client_kind: str = "raw",
) -> PhaseResult:
    """One bounded load phase; server CPU sampled over the whole process tree."""
    per_client = [count // clients + (i < count % clients) for i in range(clients)]
    ctx = mp.get_context("fork")
    start_at = time.monotonic() + 0.5
    procs = []
    try:
        for i, n in enumerate(per_client):
            offset = i * len(requests) // clients
            job = ClientJob(
                port, path, requests, offset, keepalive, n, seconds, start_at, client_kind
            )
            receiver, sender = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_client_process, args=(job, sender), daemon=True)
            proc.start()
            sender.close()
            procs.append((proc, receiver))
        time.sleep(max(0.0, start_at - time.monotonic() - 0.1))
        before = process_tree(server_pid)
        results = []
        deadline = start_at + seconds + 60
        for proc, receiver in procs:
            if not receiver.poll(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"a load client (pid {proc.pid}) did not finish in time")
            results.append(receiver.recv())
        after = process_tree(server_pid)
    finally:
        for proc, receiver in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
            receiver.close()
    time.sleep(0.5)  # an idle server should use (almost) nothing: catches a spinning one
    idle = cpu_seconds(after, process_tree(server_pid))
    latencies = [x for r in results for x in r["latencies"]]  # type: ignore[attr-defined]
    elapsed = max(r["end"] for r in results) - min(r["begin"] for r in results)  # type: ignore[type-var,operator]
    used = cpu_seconds(before, after)
    by_process = cpu_by_process(before, after)
    n = len(latencies)
    return PhaseResult(
        server=server,
        mode="keep-alive" if keepalive else "new connection per request",
        responses=n,
        seconds=round(elapsed, 2),
        responses_per_s=round(n / elapsed, 1) if elapsed > 0 else 0.0,
        p50_ms=round(pct(latencies, 50), 3),
        p99_ms=round(pct(latencies, 99), 3),
        server_cpu_s=round(used, 2),
        server_cpu_s_per_10k=round(used * 10_000 / n, 3) if n else float("inf"),
        client_cpu_s=round(sum(r["cpu"] for r in results), 2),  # type: ignore[misc]
        errors=sum(r["error_count"] for r in results),  # type: ignore[misc]
        verified=sum(r["verified"] for r in results),  # type: ignore[misc]
        server_closed_keepalive=sum(r["server_closes"] for r in results),  # type: ignore[misc]
        idle_cpu_after_s=round(idle, 2),
        first_errors=[e for r in results for e in r["errors"]][:5],  # type: ignore[attr-defined]
        cpu_by_process=[(r, pid, round(c, 2)) for r, pid, c in by_process],
    )


def post(port: int, path: str, der: bytes, keepalive: bool) -> tuple[int, bytes, bool]:
    """One request on a fresh connection: (HTTP status, body, server keeps it open)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        headers = dict(OCSP_HEADERS, Connection="keep-alive" if keepalive else "close")
        conn.request("POST", path, body=der, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read(), not resp.will_close
    finally:
        conn.close()


def wait_ready(proc: subprocess.Popen[bytes], port: int, path: str, req: Request) -> bool:
    """Poll with a real request (never connect-and-leave: that makes openssl ocsp spin) until
    a good answer; return whether the server kept the connection open (keep-alive)."""
    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args[0]} exited with {proc.returncode} before it was ready")
        try:
            status, body, kept = post(port, path, req[0], keepalive=True)
        except ConnectionRefusedError:
            time.sleep(0.05)
            continue
        problem = f"HTTP {status}" if status != 200 else check_response(body, req[1])
        if problem:
            raise SystemExit(f"{proc.args[0]} answers badly: {problem}")
        return kept
    raise SystemExit(f"{proc.args[0]} did not become ready in {READY_SECONDS:.0f} s")


# -- fixtures ---------------------------------------------------------------------------------


def ocsp_request(cert: x509.Certificate, issuer: x509.Certificate) -> Request:
    """A DER OCSP request for one SHA-1 CertID, without nonce (pre-signed answers)."""
    builder = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1())
    return builder.build().public_bytes(serialization.Encoding.DER), cert.serial_number


def hsmca_fixture(home: Path, count: int) -> list[Request]:
    """Initialise ``home``, issue ``count`` certificates, pre-sign their responses."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from pki.actors import operator
    from pki.bootstrap import initialise
    from pki.service import IssueRequest, Pki

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from issue import make_csrs

    initialise(home, "Bench")
    pki = Pki.open(home)
    try:
        actor = operator("bench")
        records = [pki.issue(IssueRequest(csr, "mtls-server"), actor) for csr in make_csrs(count)]
        issuer_id = records[0].issuer_id
        presigned = pki.presign_ocsp(issuer_id, [r.serial for r in records])
        if presigned != 2 * count:  # SHA-1 and SHA-256 CertIDs
            raise SystemExit(f"pre-signed {presigned} responses, expected {2 * count}")
        issuer = x509.load_der_x509_certificate(pki.issuer_der(issuer_id))
    finally:
        pki.close()
    return [
        ocsp_request(x509.load_pem_x509_certificate(r.certificate_pem.encode()), issuer)
        for r in records
        if r.certificate_pem
    ]


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Bench"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def openssl_fixture(workdir: Path, count: int) -> list[Request]:
    """A software P-256 CA, a delegated P-256 responder and ``count`` leaf certificates,
    written as ca.pem, resp.pem, resp.key and index.txt for ``openssl ocsp``."""
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=7)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("Bench OCSP reference CA"))
        .issuer_name(_name("Bench OCSP reference CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)

    def leaf(subject: x509.Name, key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(aki, critical=False)
        )

    resp_key = ec.generate_private_key(ec.SECP256R1())
    responder = (
        leaf(_name("Bench OCSP reference responder"), resp_key)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False)
        .add_extension(x509.OCSPNoCheck(), critical=False)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (workdir / "ca.pem").write_bytes(ca.public_bytes(pem))
    (workdir / "resp.pem").write_bytes(responder.public_bytes(pem))
    (workdir / "resp.key").write_bytes(
        resp_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    rows, requests = [], []
    for i in range(count):
        cn = f"host{i}.bench.test"
        cert = (
            leaf(_name(cn), ec.generate_private_key(ec.SECP256R1()))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(cn)]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        serial = format(cert.serial_number, "X")
        serial = "0" * (len(serial) % 2) + serial  # as BN_bn2hex prints it (the lookup key)
        expiry = cert.not_valid_after_utc.strftime("%y%m%d%H%M%SZ")
        rows.append(f"V\t{expiry}\t\t{serial}\tunknown\t/O=Bench/CN={cn}\n")
        requests.append(ocsp_request(cert, ca))
    (workdir / "index.txt").write_text("".join(rows))
    (workdir / "index.txt.attr").write_text("unique_subject = no\n")
    return requests


def save_requests(path: Path, requests: list[Request]) -> None:
    path.write_text(json.dumps([[der.hex(), serial] for der, serial in requests]))


def load_requests(path: Path) -> list[Request]:
    return [(bytes.fromhex(der), serial) for der, serial in json.loads(path.read_text())]


# -- hsmca ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def start_hsmca(home: Path, workers: int, probe: Request) -> tuple[subprocess.Popen[bytes], int]:
    """``hsmca serve`` on free loopback ports, in a session of its own; ready when both the
    HTTPS health check and an OCSP request on the plain-HTTP listener answer."""
    https_port, http_port = free_port(), free_port()
    hsmca = Path(sys.executable).parent / "hsmca"
    with (home / "serve.log").open("wb") as log:
        proc = subprocess.Popen(
            [
                str(hsmca),
                "--home",
                str(home),
                "serve",
                "--host",
                HOST,
                "--https-port",
                str(https_port),
                "--http-port",
                str(http_port),
                "--workers",
                str(workers),
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    try:
        ctx = ssl.create_default_context(cafile=str(home / "ca" / "root.pem"))
        deadline = time.monotonic() + READY_SECONDS
        while True:
            if proc.poll() is not None:
                log_tail = (home / "serve.log").read_text(errors="replace").splitlines()[-20:]
                raise SystemExit(
                    f"hsmca serve exited with {proc.returncode}:\n" + "\n".join(log_tail)
                )
            conn = http.client.HTTPSConnection(HOST, https_port, context=ctx, timeout=2)
            try:
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            finally:
                conn.close()
            if time.monotonic() > deadline:
                raise SystemExit("hsmca serve did not become ready")
            time.sleep(0.1)
        wait_ready(proc, http_port, "/ocsp", probe)
    except BaseException:
        kill_tree(proc, 15)
        raise
    return proc, http_port


# -- openssl ocsp, in a network namespace of its own ------------------------------------------


def openssl_command(workdir: Path, port: int, multi: int, loopback_only: bool) -> list[str]:
    cmd = ["openssl", "ocsp", "-index", str(workdir / "index.txt"), "-CA", str(workdir / "ca.pem")]
    cmd += ["-rsigner", str(workdir / "resp.pem"), "-rkey", str(workdir / "resp.key")]
    cmd += ["-port", f"{HOST}:{port}" if loopback_only else str(port), "-nmin", "5", "-ignore_err"]
    return cmd + (["-multi", str(multi)] if multi > 1 else [])


def openssl_binds_host() -> bool:
    """Whether this ``openssl ocsp -port`` takes a host to bind (``-help`` says so); OpenSSL
    3.0's takes a bare port number and listens on every interface."""
    done = subprocess.run(["openssl", "ocsp", "-help"], capture_output=True, text=True)
    for line in (done.stdout + done.stderr).splitlines():
        words = line.split()
        if words[:1] == ["-port"]:
            return "host" in line.lower() and "nonneg" not in words and "+int" not in words
    return False


def reference_inner(spec_path: Path) -> None:
    """Inside ``unshare -n`` (loopback only): a fresh ``openssl ocsp``, one load phase,
    the result as JSON on stdout."""
    spec = json.loads(spec_path.read_text())
    workdir = Path(spec["workdir"])
    requests = load_requests(workdir / "requests.json")

    def start() -> tuple[subprocess.Popen[bytes], int, bool]:
        port = free_port()
        proc = subprocess.Popen(
            openssl_command(workdir, port, spec["multi"], spec["loopback_only"]),
            cwd=workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,  # it logs every request's first line there
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        try:
            return proc, port, wait_ready(proc, port, "/", requests[0])
        except BaseException:
            kill_tree(proc, 1)
            raise

    proc, port, keepalive = start()
    try:
        if keepalive:  # the probe left a kept-alive connection: that may spin it; start afresh
            kill_tree(proc, 1)
            proc, port, _ = start()
        if spec["keepalive"] and not keepalive:
            result = None
        else:
            phase = run_phase(
                "openssl ocsp",
                proc.pid,
                port,
                "/",
                requests,
                spec["keepalive"],
                spec["clients"],
                spec["count"],
                spec["seconds"],
                spec["client"],
            )
            result = asdict(phase)
    finally:
        kill_tree(proc, 1)
    print(json.dumps({"keepalive_supported": keepalive, "phase": result}))


def unshare_problem() -> str | None:
    """None when ``unshare -n`` works here (with loopback up inside), else why not."""
    try:
        done = subprocess.run(
            ["unshare", "-n", "sh", "-c", "ip link set lo up"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if done.returncode == 0 else (done.stderr.strip() or f"exit {done.returncode}")


def run_reference(
    workdir: Path, args: argparse.Namespace, keepalive: bool, netns: bool
) -> dict[str, object]:
    """Re-execute this script with ``--reference-inner`` in a new network namespace (or,
    when ``netns`` is False, as it is, with openssl bound to 127.0.0.1 only)."""
    spec = workdir / f"spec-{int(keepalive)}.json"
    spec.write_text(
        json.dumps(
            {
                "workdir": str(workdir),
                "keepalive": keepalive,
                "clients": args.clients,
                "count": args.count,
                "seconds": args.seconds,
                "multi": args.openssl_multi,
                "client": args.client,
                "loopback_only": not netns,
            }
        )
    )
    inner = [sys.executable, str(Path(__file__).resolve()), "--reference-inner", str(spec)]
    if netns:
        inner = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *inner]
    proc = subprocess.Popen(
        inner,
        stdout=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    try:
        out, _ = proc.communicate(timeout=args.seconds + 2 * READY_SECONDS)
    finally:
        kill_tree(proc, 5)
    if proc.returncode != 0:
        raise SystemExit(f"the reference measurement failed (exit {proc.returncode})")
    return json.loads(out.decode().strip().splitlines()[-1])


# -- report -----------------------------------------------------------------------------------


def verdict(hsmca: PhaseResult, reference: PhaseResult | None) -> dict[str, object]:
    if reference is None:
        return {
            "pass": False,
            "reference": "SKIPPED",
            "p99_under_10_ms": hsmca.p99_ms < P99_GOAL_MS,
        }
    checks = {
        "responses_per_s_at_least_openssl": hsmca.responses_per_s >= reference.responses_per_s,
        "p99_under_10_ms": hsmca.p99_ms < P99_GOAL_MS,
        "cpu_per_10k_below_openssl": hsmca.server_cpu_s_per_10k < reference.server_cpu_s_per_10k,
        "no_errors": hsmca.errors == 0 and reference.errors == 0,
    }
    return {"pass": all(checks.values()), **checks}


def print_table(phases: list[PhaseResult]) -> None:
    cols = [
        ("server", "server", 12),
        ("mode", "mode", 14),
        ("responses", "responses", 9),
        ("resp/s", "responses_per_s", 8),
        ("p50 ms", "p50_ms", 7),
        ("p99 ms", "p99_ms", 7),
        ("srv CPU s", "server_cpu_s", 9),
        ("CPU s/10k", "server_cpu_s_per_10k", 9),
        ("client CPU s", "client_cpu_s", 12),
        ("errors", "errors", 6),
        ("checked", "verified", 7),
    ]
    print("  ".join(f"{title:>{w}}" for title, _, w in cols))
    for p in phases:
        row = asdict(p)
        row["mode"] = "keep-alive" if p.mode == "keep-alive" else "conn/request"
        print("  ".join(f"{row[key]!s:>{w}}" for _, key, w in cols))


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwind: the finally blocks stop the servers


def main() -> None:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--certs", type=int, default=200, help="certificates per responder")
    parser.add_argument("--clients", type=int, default=8, help="client processes")
    parser.add_argument("--count", type=int, default=60_000, help="max requests per phase")
    parser.add_argument("--seconds", type=float, default=10.0, help="max seconds per phase")
    parser.add_argument("--workers", type=int, default=2, help="hsmca serve --workers")
    parser.add_argument(
        "--openssl-multi", type=int, default=0, help="openssl ocsp -multi N (default: one process)"
    )
    parser.add_argument(
        "--client",
        choices=sorted(CLIENTS),
        default="raw",
        help="load generator's HTTP client (raw: a lean socket client; http.client: stdlib)",
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--reference-inner", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference_inner:
        reference_inner(args.reference_inner)
        return
    if args.certs < 1 or args.clients < 1 or args.count < args.clients or args.seconds <= 0:
        parser.error("--certs, --clients >= 1, --count >= --clients, --seconds > 0")
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    phases: list[PhaseResult] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="hsmca-ocspbench-") as tmp:
        home, refdir = Path(tmp) / "home", Path(tmp) / "openssl"
        refdir.mkdir()
        t = time.monotonic()
        requests = hsmca_fixture(home, args.certs)
        ref_requests = openssl_fixture(refdir, args.certs)
        save_requests(refdir / "requests.json", ref_requests)
        took = time.monotonic() - t
        say(f"set-up: {args.certs} certificates each, responses pre-signed ({took:.1f} s)")

        proc, port = start_hsmca(home, args.workers, requests[0])
        try:
            load = (port, "/ocsp", requests)
            warm = (True, args.clients, 2000, 2.0, args.client)
            run_phase("hsmca", proc.pid, *load, *warm)  # warm-up
            for keepalive in (True, False):
                phases.append(
                    run_phase(
                        "hsmca", proc.pid, *load, keepalive, args.clients, args.count, args.seconds
                    )
                )
                say(f"measured hsmca, {phases[-1].mode}: {phases[-1].responses_per_s} responses/s")
        finally:
            kill_tree(proc, 15)

        reference: PhaseResult | None = None
        problem = unshare_problem()
        netns = problem is None
        if problem:
            say(f"WARNING: `unshare -n` is not permitted here: {problem}")
        if problem and not openssl_binds_host():
            notes.append(
                f"REFERENCE SKIPPED: `unshare -n` is not permitted here ({problem}), and "
                "`openssl ocsp -port` binds every interface (its -help offers no host to bind "
                "127.0.0.1 only), so it is not started outside a private network namespace."
            )
            say(notes[-1])
        else:
            if problem:
                notes.append("openssl ocsp ran bound to 127.0.0.1, not in a network namespace.")
            inner = run_reference(refdir, args, keepalive=False, netns=netns)
            reference = PhaseResult(**inner["phase"])  # type: ignore[arg-type]
            phases.append(reference)
            say(f"measured openssl ocsp, {reference.mode}: {reference.responses_per_s} responses/s")
            if inner["keepalive_supported"]:
                again = run_reference(refdir, args, keepalive=True, netns=netns)
                if again["phase"]:
                    phases.append(PhaseResult(**again["phase"]))  # type: ignore[arg-type]
            else:
                notes.append(
                    "openssl ocsp closes the connection after every response (no keep-alive): "
                    "it is measured with a new connection per request, and compared with hsmca "
                    "measured the same way."
                )

    per_request = next(p for p in phases if p.server == "hsmca" and p.mode != "keep-alive")
    keepalive_phase = next(p for p in phases if p.server == "hsmca" and p.mode == "keep-alive")
    result = {
        "phases": [asdict(p) for p in phases],
        "verdict_like_for_like": verdict(per_request, reference),
        "verdict_hsmca_keepalive_vs_reference": verdict(keepalive_phase, reference),
        "notes": notes,
        "config": {
            "certs": args.certs,
            "clients": args.clients,
            "count": args.count,
            "seconds": args.seconds,
            "hsmca_workers": args.workers,
            "hsmca_http_workers": max(1, args.workers // 2),
            "openssl_multi": args.openssl_multi,
            "client": args.client,
            "cpus": os.cpu_count(),
            "openssl": subprocess.run(
                ["openssl", "version"], capture_output=True, text=True
            ).stdout.strip(),
        },
    }
    if args.json:
        print(json.dumps(result))
        return
    print()
    print_table(phases)
    for p in phases:
        if p.errors:
            print(f"{p.server} ({p.mode}): {p.errors} errors, e.g. {p.first_errors}")
        busy = [f"{role} {cpu:.2f}" for role, _, cpu in p.cpu_by_process if cpu >= 0.05]
        print(f"{p.server} ({p.mode}) server CPU-s by process: {', '.join(busy) or '-'}")
        if p.idle_cpu_after_s > 0.2:
            print(
                f"{p.server} ({p.mode}): {p.idle_cpu_after_s} CPU-s in 0.5 s idle after the phase!"
            )
    for note in notes:
        print(note)
    print(
        f"goal: hsmca responses/s >= openssl ocsp's, p99 < {P99_GOAL_MS:g} ms, "
        "CPU-s per 10k < openssl ocsp's"
    )
    for label, v in (
        ("like for like (new connection per request)", result["verdict_like_for_like"]),
        ("hsmca keep-alive vs openssl", result["verdict_hsmca_keepalive_vs_reference"]),
    ):
        detail = ", ".join(
            f"{k}={val if isinstance(val, str) else 'yes' if val else 'NO'}"
            for k, val in v.items()
            if k != "pass"
        )  # type: ignore[union-attr]
        print(f"{label}: {'PASS' if v['pass'] else 'MISSED'} ({detail})")  # type: ignore[index]


if __name__ == "__main__":
    main()
