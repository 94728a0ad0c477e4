"""EST simpleenroll: enrolments/s with N concurrent devices, and bulk provisioning time.

Everything runs on 127.0.0.1, on free ports, in a temporary directory (issue #7):

1. a fresh home (``hsmca init``), an admin token (``hsmca token create``), ``hsmca serve``
   with --workers HTTPS workers (default: the server's own default, two per core);
2. provisioning: ``hsmca device provision`` for --provision device ids (default 100 000),
   timed as a subprocess (wall clock) and by the ``seconds`` it reports. Reference, in the
   same run: ``hsmca device enroll-token``, one credential per CLI run, as an operator
   would do without the bulk command;
3. CSRs made before any timing: a P-256 key per device, subject serialNumber = device id;
4. per concurrency level (--concurrency, default 1,8,16): that many client processes, each
   one device after another on its own keep-alive TLS connection (the lean raw-socket
   client of ``bench/api_issue.py``; --reconnect for a new connection per enrolment, as
   real devices enrol once), take the next request from a shared counter, so the level
   holds until the end. EST ``POST /.well-known/est/simpleenroll`` (HTTP Basic
   ``DEVICE_ID:SECRET``, a fresh one-time credential per enrolment) against the reference,
   the REST ``POST /api/v1/certificates`` (admin bearer token, profile ``device``, the
   same issuance core behind a JSON front end), for other provisioned devices. The two
   alternate in --rounds rounds per level so both see the same machine load. Each front
   end is bounded per level by --devices enrolments and --seconds;
5. every response is checked after the timing: EST 200 and a certs-only PKCS#7 holding
   one certificate for the device (subject serialNumber), REST 201 and a certificate for
   the device. Exit code: 0 all good, 1 a response failed, 2 no measurement (set-up).

Run: ``.venv/bin/python bench/enroll.py [--provision 100000] [--devices 2000]
[--concurrency 1,8,16] [--seconds 20] [--json] [--keep]``
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import csv
import json
import multiprocessing as mp
import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7
from cryptography.x509.oid import NameOID

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from acme import BenchError, clean_env, https_session, running, wait_until
from api_issue import LeanHttps, free_port, pct

from pki.config import default_workers

HOST = "127.0.0.1"
HSMCA = Path(sys.executable).parent / "hsmca"
EST_PATH = "/.well-known/est/simpleenroll"
REST_PATH = "/api/v1/certificates"
CLI_SECONDS = 600.0  # at most this long for one hsmca CLI run (provisioning 100k: ~20-40 s)
START_DELAY = 0.5  # clients connect, then all start together this long after the fork
FAILURES_SHOWN = 5


@dataclass(frozen=True)
class Device:
    device_id: str
    secret: str


@dataclass
class Phase:
    """One front end at one concurrency level, summed over its rounds."""

    done: int = 0  # 200 (EST) or 201 (REST), response checked
    failed: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stopped_early: bool = False  # --seconds ran out before --devices were enrolled

    def rate(self) -> float:
        return self.done / self.seconds if self.seconds else 0.0

    def summary(self) -> dict[str, Any]:
        ok = sorted(self.latencies)
        return {
            "per_s": round(self.rate(), 1),
            "done": self.done,
            "failed": self.failed,
            "seconds": round(self.seconds, 2),
            "p50_ms": round(pct(ok, 50), 2),
            "p95_ms": round(pct(ok, 95), 2),
            "stopped_early": self.stopped_early,
        }


# -- set-up -------------------------------------------------------------------------------


def cli(home: Path, *args: str) -> tuple[dict[str, Any], float]:
    """Run ``hsmca --home HOME ARGS --json``: its JSON output and the wall-clock seconds."""
    cmd = [str(HSMCA), "--home", str(home), *args, "--json"]
    start = time.perf_counter()
    try:
        done = subprocess.run(
            cmd, env=clean_env(), capture_output=True, text=True, timeout=CLI_SECONDS
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"{' '.join(args[:2])} took over {CLI_SECONDS:g} s") from None
    elapsed = time.perf_counter() - start
    if done.returncode:
        raise BenchError(f"hsmca {' '.join(args[:2])} failed ({done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout), elapsed


def start_server(
    stack: contextlib.ExitStack, home: Path, workers: int
) -> tuple[int, subprocess.Popen[bytes]]:
    """``hsmca serve`` on free loopback ports, stopped (SIGTERM, waited for) at exit."""
    port, plain, log = free_port(), free_port(), home.parent / "serve.log"
    cmd = [str(HSMCA), "--home", str(home), "serve", "--host", HOST]
    cmd += ["--https-port", str(port), "--http-port", str(plain), "--workers", str(workers)]
    proc = stack.enter_context(running(cmd, log, clean_env()))
    session = https_session(home / "ca" / "root.pem")
    url = f"https://{HOST}:{port}/healthz"
    wait_until("hsmca serve", lambda: session.get(url, timeout=2).ok, proc, log)
    return port, proc


def provision(home: Path, tmp: Path, count: int) -> tuple[list[Device], dict[str, Any]]:
    """``hsmca device provision`` for ``count`` new device ids, timed; its credentials."""
    ids, out = tmp / "devices.csv", tmp / "credentials.csv"
    ids.write_text("device_id\n" + "".join(f"bench-{i:07d}\n" for i in range(count)))
    reported, wall = cli(home, "device", "provision", "--csv", str(ids), "--out", str(out))
    with out.open(newline="") as handle:
        devices = [Device(row["device_id"], row["secret"]) for row in csv.DictReader(handle)]
    if len(devices) != count or reported.get("count") != count:
        raise BenchError(
            f"asked for {count} credentials, {out} holds {len(devices)}, "
            f"hsmca reported {reported.get('count')}"
        )
    return devices, {
        "credentials": count,
        "wall_s": round(wall, 2),
        "reported_s": reported["seconds"],
        "per_s_wall": round(count / wall, 1),
        "per_s_reported": round(count / reported["seconds"], 1) if reported["seconds"] else None,
    }


def one_at_a_time(home: Path, runs: int) -> dict[str, Any]:
    """The reference: ``hsmca device enroll-token``, one credential per CLI run."""
    times = [
        cli(home, "device", "enroll-token", "--device-id", f"single-{i}")[1] for i in range(runs)
    ]
    mean = statistics.mean(times)
    return {"runs": runs, "mean_s": round(mean, 3), "per_s": round(1 / mean, 2)}


def make_csr(device_id: str) -> bytes:
    """The DER of a device's CSR: a new P-256 key, subject serialNumber = device id."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, device_id)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return csr.public_bytes(Encoding.DER)


def est_request(port: int, device: Device) -> bytes:
    body = base64.b64encode(make_csr(device.device_id))
    basic = base64.b64encode(f"{device.device_id}:{device.secret}".encode()).decode()
    head = (
        f"POST {EST_PATH} HTTP/1.1\r\nHost: {HOST}:{port}\r\nAuthorization: Basic {basic}\r\n"
        f"Content-Type: application/pkcs10\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def rest_request(port: int, token: str, device: Device) -> bytes:
    pem = x509.load_der_x509_csr(make_csr(device.device_id)).public_bytes(Encoding.PEM)
    body = json.dumps({"csr": pem.decode(), "profile": "device", "device_id": device.device_id})
    head = (
        f"POST {REST_PATH} HTTP/1.1\r\nHost: {HOST}:{port}\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body.encode()


# -- load ---------------------------------------------------------------------------------

# what the forked clients of a phase share; set by run_phase right before the fork
_JOB: dict[str, Any] = {}


def client(out: Any) -> None:
    """Send the next prepared request (a shared counter) until there is none left or the
    phase's time is up; put (index, status, latency s, body or error) per request."""
    job = _JOB
    requests, counter = job["requests"], job["counter"]
    results: list[tuple[int, int, float, bytes | str]] = []
    conn = None if job["reconnect"] else LeanHttps(job["port"], job["root"])
    while time.monotonic() < job["start_at"]:
        time.sleep(0.001)
    while time.monotonic() < job["stop_at"]:
        with counter.get_lock():
            i = counter.value
            counter.value += 1
        if i >= len(requests):
            break
        t = time.perf_counter()
        try:
            if conn is None:
                fresh = LeanHttps(job["port"], job["root"])
                status, body = fresh.exchange(requests[i])
                fresh.close()
            else:
                status, body = conn.exchange(requests[i])
            results.append((i, status, time.perf_counter() - t, body))
        except (OSError, ValueError, StopIteration) as exc:
            results.append((i, 0, time.perf_counter() - t, f"{type(exc).__name__}: {exc}"))
            if conn is not None:
                conn.close()
                conn = LeanHttps(job["port"], job["root"])
    if conn is not None:
        conn.close()
    out.put((results, time.monotonic()))


def run_phase(
    port: int, root: str, requests: list[bytes], clients: int, seconds: float, reconnect: bool
) -> tuple[list[tuple[int, int, float, bytes | str]], float]:
    """``clients`` processes send ``requests`` for at most ``seconds``: the results and the
    seconds from the common start to the last client's end."""
    ctx = mp.get_context("fork")
    start_at = time.monotonic() + START_DELAY
    _JOB.clear()
    _JOB.update(
        requests=requests,
        counter=ctx.Value("l", 0),
        port=port,
        root=root,
        reconnect=reconnect,
        start_at=start_at,
        stop_at=start_at + seconds,
    )
    out = ctx.Queue()
    procs = [ctx.Process(target=client, args=(out,), daemon=True) for _ in range(clients)]
    for p in procs:
        p.start()
    try:
        collected = []
        deadline = start_at + seconds + 120  # the slowest request of the last ones
        while len(collected) < clients:
            try:
                collected.append(out.get(timeout=1))
            except queue.Empty:
                if time.monotonic() > deadline or not any(p.is_alive() for p in procs):
                    missing = clients - len(collected)
                    raise BenchError(f"{missing} client process(es) never reported") from None
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    results = [r for rs, _ in collected for r in rs]
    return results, max(end for _, end in collected) - start_at


def check_est(device_id: str, status: int, body: bytes | str) -> str | None:
    """Why an EST response is not the device's certificate, or None."""
    if isinstance(body, str):
        return body
    if status != 200:
        return f"HTTP {status}: {body[:200]!r}"
    try:
        certs = pkcs7.load_der_pkcs7_certificates(base64.b64decode(body))
    except ValueError as exc:
        return f"not a base64 certs-only PKCS#7: {exc}"
    return _check_certificates(device_id, certs)


def check_rest(device_id: str, status: int, body: bytes | str) -> str | None:
    """Why a REST response is not the device's certificate, or None."""
    if isinstance(body, str):
        return body
    if status != 201:
        return f"HTTP {status}: {body[:200]!r}"
    try:
        certs = [x509.load_pem_x509_certificate(json.loads(body)["certificate"].encode())]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"no certificate in the JSON: {exc}"
    return _check_certificates(device_id, certs)


def _check_certificates(device_id: str, certs: list[x509.Certificate]) -> str | None:
    if len(certs) != 1:
        return f"{len(certs)} certificates instead of 1"
    names = certs[0].subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
    if [n.value for n in names] != [device_id]:
        return f"certificate for {certs[0].subject.rfc4514_string()}, not {device_id}"
    return None


def measure(
    phase: Phase,
    port: int,
    root: str,
    batch: list[tuple[Device, bytes]],
    clients: int,
    seconds: float,
    reconnect: bool,
    check: Any,
) -> None:
    """One round of one front end: add its figures to ``phase``."""
    results, elapsed = run_phase(port, root, [r for _, r in batch], clients, seconds, reconnect)
    phase.seconds += elapsed
    phase.stopped_early |= len(results) < len(batch)
    for i, status, latency, body in results:
        why = check(batch[i][0].device_id, status, body)
        if why is None:
            phase.done += 1
            phase.latencies.append(latency)
        else:
            phase.failed += 1
            if len(phase.errors) < FAILURES_SHOWN:
                phase.errors.append(f"{batch[i][0].device_id}: {why}")


# -- main ---------------------------------------------------------------------------------


def levels(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("concurrency levels are integers >= 1")
    return values


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwind: the finally blocks stop the server


def run(args: argparse.Namespace, say: Any) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="hsmca-enrollbench-"))
    try:
        with contextlib.ExitStack() as stack:
            home = tmp / "home"
            cli(home, "init", "--org", "Enrol bench")
            token = cli(home, "token", "create", "--role", "admin", "--name", "bench")[0]["token"]
            port, _ = start_server(stack, home, args.workers)
            root = str(home / "ca" / "root.pem")
            say(f"hsmca serve ready on {HOST}:{port} ({args.workers} HTTPS workers); provisioning")

            devices, provisioned = provision(home, tmp, args.provision)
            provisioned["one_at_a_time_reference"] = one_at_a_time(home, args.reference_runs)
            say(
                f"provisioned {args.provision} credentials in {provisioned['wall_s']} s "
                f"({provisioned['per_s_wall']} /s); making CSRs"
            )

            # disjoint slices of the provisioned devices: warm-up, then per level the EST
            # devices and the REST devices; CSRs and requests made now, before any timing
            t = time.perf_counter()
            pool = iter(devices)
            warm_est = [(d, est_request(port, d)) for d in _take(pool, args.warmup)]
            warm_rest = [(d, rest_request(port, token, d)) for d in _take(pool, args.warmup)]
            batches = []
            for _ in args.concurrency:
                est = [(d, est_request(port, d)) for d in _take(pool, args.devices)]
                rest = [(d, rest_request(port, token, d)) for d in _take(pool, args.devices)]
                batches.append((est, rest))
            say(f"{len(batches) * 2 * args.devices} CSRs in {time.perf_counter() - t:.1f} s")

            top = max(args.concurrency)
            warm = Phase(), Phase()
            measure(warm[0], port, root, warm_est, top, 30, args.reconnect, check_est)
            measure(warm[1], port, root, warm_rest, top, 30, args.reconnect, check_rest)
            if warm[0].failed or warm[1].failed:
                raise BenchError(f"warm-up failed: {warm[0].errors + warm[1].errors}")

            rows = []
            for clients, (est, rest) in zip(args.concurrency, batches, strict=True):
                phases = Phase(), Phase()
                step = -(-len(est) // args.rounds)
                for r in range(args.rounds):
                    part = slice(r * step, (r + 1) * step)
                    share = args.seconds / args.rounds
                    measure(
                        phases[0], port, root, est[part], clients, share, args.reconnect, check_est
                    )
                    measure(
                        phases[1],
                        port,
                        root,
                        rest[part],
                        clients,
                        share,
                        args.reconnect,
                        check_rest,
                    )
                row = {
                    "concurrency": clients,
                    "est": phases[0].summary(),
                    "rest": phases[1].summary(),
                }
                rest_rate = phases[1].rate()
                row["ratio_est_to_rest"] = (
                    round(phases[0].rate() / rest_rate, 3) if rest_rate else None
                )
                row["errors"] = phases[0].errors + phases[1].errors
                rows.append(row)
                say(
                    f"{clients:3} devices: EST {phases[0].rate():.1f} /s, "
                    f"REST {phases[1].rate():.1f} /s"
                )
    finally:
        if args.keep:
            say(f"kept {tmp} (home, serve.log, devices.csv, credentials.csv)")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return {
        "provisioning": provisioned,
        "levels": rows,
        "workers": args.workers,
        "cpus": os.cpu_count(),
        "reconnect": args.reconnect,
    }


def _take(pool: Any, n: int) -> list[Device]:
    taken = [d for _, d in zip(range(n), pool, strict=False)]
    if len(taken) < n:
        raise BenchError("not enough provisioned credentials (raise --provision)")
    return taken


def report(result: dict[str, Any], load: tuple[float, float]) -> None:
    p = result["provisioning"]
    ref = p["one_at_a_time_reference"]
    print(
        f"provisioning {p['credentials']} credentials (hsmca device provision): "
        f"{p['wall_s']:.2f} s wall, {p['per_s_wall']:.0f} /s "
        f"(reported by hsmca: {p['reported_s']} s, {p['per_s_reported'] or 0:.0f} /s)"
    )
    print(
        f"reference: hsmca device enroll-token, one per run ({ref['runs']} runs): "
        f"{ref['mean_s']:.3f} s each, {ref['per_s']:.2f} /s; "
        f"bulk is {p['per_s_wall'] / ref['per_s']:.0f}x faster"
    )
    print()
    mode = "a new TLS connection per enrolment" if result["reconnect"] else "keep-alive"
    print(f"{result['workers']} HTTPS workers, {result['cpus']} CPUs, clients {mode}")
    head = ("devices", "EST /s", "REST /s", "EST/REST", "EST p50", "EST p95", "REST p50",
            "REST p95", "EST n", "REST n", "failed")  # fmt: skip
    print("{:>7} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6} {:>6} {:>6}".format(*head))
    for row in result["levels"]:
        e, r = row["est"], row["rest"]
        ratio = row["ratio_est_to_rest"]
        print(
            f"{row['concurrency']:>7} {e['per_s']:>8.1f} {r['per_s']:>8.1f} "
            f"{(f'{ratio:.3f}' if ratio is not None else '-'):>8} "
            f"{e['p50_ms']:>6.1f}ms {e['p95_ms']:>6.1f}ms {r['p50_ms']:>6.1f}ms "
            f"{r['p95_ms']:>6.1f}ms {e['done']:>6} {r['done']:>6} {e['failed'] + r['failed']:>6}"
        )
        for which in ("est", "rest"):
            if row[which]["stopped_early"]:
                print(f"{'':>7} {which.upper()}: --seconds ran out before --devices enrolments")
        for error in row["errors"]:
            print(f"{'':>7} failed: {error}")
    print(f"load average at start and end: {load[0]:.2f}, {load[1]:.2f}")


def main() -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--provision", type=int, default=100_000, help="credentials to provision")
    parser.add_argument(
        "--devices", type=int, default=2000, help="enrolments per level and front end (at most)"
    )
    parser.add_argument(
        "--concurrency", type=levels, default=[1, 8, 16], help="concurrent devices, e.g. 1,8,16"
    )
    parser.add_argument(
        "--seconds", type=float, default=20.0, help="time limit per level and front end"
    )
    parser.add_argument("--rounds", type=int, default=2, help="EST/REST alternations per level")
    parser.add_argument("--workers", type=int, default=default_workers(), help="HTTPS workers")
    parser.add_argument(
        "--warmup", type=int, default=100, help="unmeasured enrolments per front end"
    )
    parser.add_argument(
        "--reference-runs", type=int, default=3, help="hsmca device enroll-token runs timed"
    )
    parser.add_argument(
        "--reconnect", action="store_true", help="a new TLS connection for every enrolment"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary home")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if min(args.devices, args.rounds, args.workers, args.reference_runs) < 1 or args.seconds <= 0:
        parser.error("--devices, --rounds, --workers, --reference-runs >= 1; --seconds > 0")
    needed = 2 * (args.warmup + args.devices * len(args.concurrency))
    if args.provision < needed:
        parser.error(f"--provision must be at least {needed} (2 x (warm-up + devices x levels))")
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    load_start = os.getloadavg()[0]
    try:
        result = run(args, say)
    except BenchError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    load = (load_start, os.getloadavg()[0])
    failed = sum(r["est"]["failed"] + r["rest"]["failed"] for r in result["levels"])
    if args.json:
        print(json.dumps({**result, "failed": failed, "load_average": load}))
    else:
        report(result, load)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
