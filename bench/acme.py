"""ACME with lego, http-01: seconds per certificate from hsmca against Pebble, in one run.

Everything runs on 127.0.0.1, on free ports, in a temporary directory:

1. ``pebble-challtestsrv`` is the DNS server of both CAs: every name resolves to 127.0.0.1;
2. hsmca: a fresh home (``hsmca init``), ``hsmca serve`` with its [acme] settings from
   ``HSMCA_ACME__*`` variables (http-01 port, resolver, no EAB, every domain allowed);
3. Pebble, the reference: a self-signed TLS certificate (Debian's package ships none),
   ``PEBBLE_VA_NOSLEEP=1``, no nonce rejection, no authorization reuse;
4. per CA, one ``lego run`` after another (http-01, ec256), each for a new name, timed from
   process start to exit. The first registers lego's account and is reported apart; the
   others reuse it. Each certificate is checked (its name, ``openssl verify`` against
   hsmca's ``ca/root.pem`` or Pebble's root); a run without one is an error.

Pebble validates after answering the challenge POST, so lego 4.x, finding the authorization
still pending when it polls right after, sleeps 5 s (no Retry-After) before the next poll:
Pebble's ~6 s per certificate is mostly that wait; when its validation wins the race (about
one run in 7 here) a run takes 0.1-0.6 s instead, which pulls Pebble's mean down. To take
0.25 s, a CA must have validated by lego's first poll (best: answer "valid" to the challenge
POST) and finalize the order at once (lego polls a processing order every 0.5 s).

Goal: hsmca takes at most 0.25 s per certificate (mean) and under a tenth of Pebble's.
Exit code: 0 PASS, 1 FAIL, 2 no measurement (set-up, no ACME directory, a run failed).

Run: ``.venv/bin/python bench/acme.py [--count 10] [--pebble-count 5] [--json]``
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import ipaddress
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from cryptography.x509.oid import NameOID

HOST = "127.0.0.1"
GOAL_SECONDS = 0.25
GOAL_RATIO = 0.1
READY_SECONDS = 60.0
LEGO_SECONDS = 120.0
HSMCA = Path(sys.executable).parent / "hsmca"
PR_SET_PDEATHSIG = 1
Proc = subprocess.Popen[bytes]
# what would change whom the children trust, their proxy, or their settings
DROPPED_ENV = {"REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR"}
DROPPED_PREFIXES = ("HSMCA_", "LEGO_", "PEBBLE_", "GODEBUG")


class BenchError(Exception):
    """The bench could not measure (printed as ERROR, exit code 2)."""


@dataclass(frozen=True)
class Ca:
    name: str
    directory: str  # the ACME directory URL
    tls_ca: Path  # what lego must trust for the server's TLS certificate
    roots: Path  # what the certificates issued must chain to


@dataclass
class Timings:
    first: float = 0.0  # the run that registered the account
    runs: list[float] = field(default_factory=list)
    stopped_early: bool = False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without CA bundles, proxies and hsmca, lego or Pebble settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not (k in DROPPED_ENV or k.upper().endswith("_PROXY") or k.startswith(DROPPED_PREFIXES))
    }
    return env | extra


def _die_with_parent() -> None:
    """In a child: SIGKILL when the bench dies, however it dies."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@contextlib.contextmanager
def running(cmd: list[str], log: Path, env: dict[str, str]) -> Iterator[Proc]:
    """A server in a session of its own; SIGTERM, then SIGKILL, to its whole group at exit."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    try:
        yield proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        finally:  # even on a Ctrl-C during the wait
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def tail(log: Path) -> str:
    return log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"


def wait_until(what: str, probe: Callable[[], bool], proc: Proc, log: Path) -> None:
    """Poll ``probe`` every 50 ms until true; BenchError if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.returncode}:\n{tail(log)}")
        with contextlib.suppress(OSError, requests.RequestException, dns.exception.DNSException):
            if probe():
                return
        time.sleep(0.05)
    raise BenchError(f"{what} not ready after {READY_SECONDS:g} s:\n{tail(log)}")


def https_session(ca_file: Path) -> requests.Session:
    """A session trusting ``ca_file`` only, deaf to REQUESTS_CA_BUNDLE and proxies."""
    session = requests.Session()
    session.trust_env = False
    session.verify = str(ca_file)
    return session


def check_directory(ca: str, session: requests.Session, url: str) -> None:
    """BenchError unless ``url`` answers an ACME directory."""
    try:
        reply = session.get(url, timeout=10)
        if reply.status_code == 200 and "newOrder" in reply.json():
            return
    except requests.RequestException as exc:
        raise BenchError(f"{ca}: no ACME directory at {url}: {exc}") from None
    raise BenchError(
        f"{ca} serves no ACME directory at {url} (HTTP {reply.status_code}: "
        f"{reply.text[:200]!r}): is its ACME server there yet?"
    )


def start_dns(stack: contextlib.ExitStack, tmp: Path) -> int:
    """``pebble-challtestsrv`` answering 127.0.0.1 to every A query; its DNS port."""
    port, log = free_port(), tmp / "challtestsrv.log"
    cmd = ["pebble-challtestsrv", "-defaultIPv4", HOST, "-defaultIPv6", "", "-dns01"]
    cmd += [f"{HOST}:{port}", "-http01", "", "-https01", "", "-tlsalpn01", ""]
    cmd += ["-management", f"{HOST}:{free_port()}"]
    proc = stack.enter_context(running(cmd, log, clean_env()))

    def resolves() -> bool:
        query = dns.message.make_query("probe.bench.test", "A")
        answer = dns.query.udp(query, HOST, port=port, timeout=1)
        return any(HOST in rrset.to_text() for rrset in answer.answer)

    wait_until("pebble-challtestsrv", resolves, proc, log)
    return port


def start_hsmca(stack: contextlib.ExitStack, tmp: Path, dns_port: int, http_port: int) -> Ca:
    """A fresh home and ``hsmca serve`` on free ports, its ACME settings from the environment;
    BenchError if it serves no ACME directory."""
    home, log = tmp / "hsmca-home", tmp / "hsmca-serve.log"
    init = [str(HSMCA), "--home", str(home), "init", "--org", "ACME bench"]
    done = subprocess.run(init, env=clean_env(), capture_output=True, text=True, timeout=120)
    if done.returncode:
        raise BenchError(f"hsmca init failed ({done.returncode}):\n{done.stderr[-2000:]}")
    port, plain = free_port(), free_port()
    env = clean_env(
        HSMCA_SERVER__PUBLIC_HTTPS_URL=f"https://{HOST}:{port}",
        HSMCA_SERVER__PUBLIC_HTTP_URL=f"http://{HOST}:{plain}",
        HSMCA_ACME__HTTP01_PORT=str(http_port),
        HSMCA_ACME__TLSALPN01_PORT=str(free_port()),
        HSMCA_ACME__DNS_RESOLVER=f'"{HOST}:{dns_port}"',
        HSMCA_ACME__REQUIRE_EAB="false",
        HSMCA_ACME__ALLOWED_DOMAINS='["*"]',
    )
    cmd = [str(HSMCA), "--home", str(home), "serve", "--https-port", str(port)]
    proc = stack.enter_context(running([*cmd, "--http-port", str(plain)], log, env))
    root, base = home / "ca" / "root.pem", f"https://{HOST}:{port}"
    session = https_session(root)
    wait_until("hsmca serve", lambda: session.get(f"{base}/healthz", timeout=2).ok, proc, log)
    check_directory("hsmca", session, f"{base}/acme/directory")
    return Ca("hsmca", f"{base}/acme/directory", root, root)


def make_tls(tmp: Path) -> tuple[Path, Path]:
    """Pebble's TLS certificate (self-signed, its own trust anchor, for 127.0.0.1 and
    localhost) and key files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp / "pebble-tls.pem", tmp / "pebble-tls.key"
    cert_file.write_bytes(cert.public_bytes(Encoding.PEM))
    key_file.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    return cert_file, key_file


def start_pebble(stack: contextlib.ExitStack, tmp: Path, dns_port: int, http_port: int) -> Ca:
    """Pebble on free ports, resolving with ``dns_port``, validating on ``http_port``."""
    cert, key = make_tls(tmp)
    port, mgmt, log, config = free_port(), free_port(), tmp / "pebble.log", tmp / "pebble.json"
    settings = {
        "listenAddress": f"{HOST}:{port}",
        "managementListenAddress": f"{HOST}:{mgmt}",
        "certificate": str(cert),
        "privateKey": str(key),
        "httpPort": http_port,
        "tlsPort": free_port(),
        "ocspResponderURL": "",
        "externalAccountBindingRequired": False,
    }
    config.write_text(json.dumps({"pebble": settings}))
    env = clean_env(PEBBLE_VA_NOSLEEP="1", PEBBLE_WFE_NONCEREJECT="0", PEBBLE_AUTHZREUSE="0")
    cmd = ["pebble", "-config", str(config), "-dnsserver", f"{HOST}:{dns_port}"]
    proc = stack.enter_context(running(cmd, log, env))
    session, directory = https_session(cert), f"https://{HOST}:{port}/dir"
    wait_until("pebble", lambda: session.get(directory, timeout=2).ok, proc, log)
    check_directory("pebble", session, directory)
    roots = tmp / "pebble-roots.pem"
    roots.write_bytes(session.get(f"https://{HOST}:{mgmt}/roots/0", timeout=10).content)
    return Ca("pebble", directory, cert, roots)


def check_certificate(path: Path, domain: str, roots: Path) -> None:
    """BenchError unless lego stored a certificate for ``domain`` that verifies against
    ``roots`` with the chain lego received."""
    crt = path / "certificates" / f"{domain}.crt"
    if not crt.exists():
        raise BenchError(f"lego exited 0 but stored no certificate {crt}")
    leaf = x509.load_pem_x509_certificates(crt.read_bytes())[0]
    try:
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise BenchError(f"{crt}: no subjectAltName") from None
    if domain not in names.get_values_for_type(x509.DNSName):
        raise BenchError(f"{crt} is not for {domain}: {names}")
    cmd = ["openssl", "verify", "-CAfile", str(roots), "-untrusted", str(crt), str(crt)]
    verify = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if verify.returncode:
        raise BenchError(f"{crt} does not verify against {roots}: {verify.stdout}{verify.stderr}")


def lego_run(ca: Ca, domain: str, http_port: int, workdir: Path) -> float:
    """One ``lego run`` for ``domain``: wall-clock seconds from its start to its exit."""
    cmd = ["lego", "--accept-tos", "--email", "bench@example.com", "--server", ca.directory]
    cmd += ["--path", str(workdir / "lego"), "--domains", domain, "--key-type", "ec256"]
    cmd += ["--http", "--http.port", f"{HOST}:{http_port}", "run"]
    env = clean_env(LEGO_CA_CERTIFICATES=str(ca.tls_ca), HOME=str(workdir))
    log = workdir / f"lego-{domain}.log"
    with log.open("wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env)
        # A blocking wait() returns the moment lego exits; wait(timeout=...) polls with
        # sleeps of up to 50 ms, which showed up as 50 ms steps in the timings.
        watchdog = threading.Timer(LEGO_SECONDS, proc.kill)
        watchdog.start()
        try:
            code = proc.wait()
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        elapsed = time.perf_counter() - start
        if elapsed >= LEGO_SECONDS:
            raise BenchError(f"lego took over {LEGO_SECONDS:g} s for {domain}")
    if code:
        raise BenchError(f"lego failed ({code}) for {domain} from {ca.name}:\n{tail(log)}")
    return elapsed


def time_lego(ca: Ca, http_port: int, count: int, workdir: Path, seconds: float) -> Timings:
    """One certificate that registers lego's account, then up to ``count`` more, one at a
    time, each for a new name (no authorization to reuse); after ``seconds``, no new run
    but the first timed one."""
    workdir.mkdir()
    timings, deadline = Timings(), time.monotonic() + seconds
    for i in range(count + 1):
        if i > 1 and time.monotonic() > deadline:
            timings.stopped_early = True
            break
        domain = f"c{i}.{ca.name}.bench.test"
        elapsed = lego_run(ca, domain, http_port, workdir)
        check_certificate(workdir / "lego", domain, ca.roots)
        if i:
            timings.runs.append(elapsed)
        else:
            timings.first = elapsed
    return timings


def summary(t: Timings) -> dict[str, float | int | bool | list[float]]:
    """Seconds per certificate over the timed runs; the account-creating run apart."""
    return {
        "certificates": len(t.runs),
        "mean_s": statistics.mean(t.runs),
        "median_s": statistics.median(t.runs),
        "min_s": min(t.runs),
        "max_s": max(t.runs),
        "first_with_account_s": t.first,
        "stopped_early": t.stopped_early,
        "runs_s": [round(x, 3) for x in t.runs],
    }


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwind: the finally blocks stop the servers


def main() -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10, help="timed certificates from hsmca")
    parser.add_argument("--pebble-count", type=int, default=5, help="timed ones from Pebble")
    parser.add_argument("--seconds", type=float, default=300, help="time limit per CA")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.count < 1 or args.pebble_count < 1 or args.seconds <= 0:
        parser.error("--count and --pebble-count must be >= 1, --seconds > 0")
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    try:
        with (
            tempfile.TemporaryDirectory(prefix="hsmca-acmebench-") as name,
            contextlib.ExitStack() as stack,
        ):
            tmp, http_port = Path(name), free_port()
            dns_port = start_dns(stack, tmp)
            hsmca = start_hsmca(stack, tmp, dns_port, http_port)  # first: it may not be ready
            pebble = start_pebble(stack, tmp, dns_port, http_port)
            say(f"servers ready; lego's http-01 on {HOST}:{http_port}, DNS on {HOST}:{dns_port}")
            results = {}
            for ca, count in ((hsmca, args.count), (pebble, args.pebble_count)):
                results[ca.name] = summary(
                    time_lego(ca, http_port, count, tmp / ca.name, args.seconds)
                )
                say(f"measured {ca.name}: {results[ca.name]['mean_s']:.3f} s per certificate")
    except BenchError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    ratio = results["hsmca"]["mean_s"] / results["pebble"]["mean_s"]
    ok = results["hsmca"]["mean_s"] <= GOAL_SECONDS and ratio < GOAL_RATIO
    if args.json:
        print(json.dumps({**results, "ratio_hsmca_to_pebble": ratio, "pass": ok}))
        return 0 if ok else 1
    for name, r in results.items():
        print(
            f"{name:6} {r['certificates']:3} certificates: {r['mean_s']:.3f} s per certificate"
            f" (median {r['median_s']:.3f}, min {r['min_s']:.3f}, max {r['max_s']:.3f});"
            f" the first, registering the account: {r['first_with_account_s']:.3f} s"
        )
        each = " ".join(f"{x:.3f}" for x in r["runs_s"])  # type: ignore[union-attr]
        print(f"{name:6} each run (s): {each}")
        if r["stopped_early"]:
            print(f"{name:6} stopped early: --seconds {args.seconds:g} ran out")
    print(f"ratio hsmca / pebble (mean seconds per certificate): {ratio:.4f}")
    goal = f"hsmca <= {GOAL_SECONDS} s per certificate and < {GOAL_RATIO:g} x Pebble's"
    print(f"goal ({goal}): {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
