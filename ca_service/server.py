"""``hsmca serve``: one supervisor, two gunicorn arbiters and the OCSP front end.

gunicorn applies TLS to every socket of an arbiter, so the HTTPS listener (REST API,
ACME, EST; client certificates requested but optional) and the plain-HTTP app (OCSP,
CRLs, CA certificates) run as two arbiters, each a child process of the supervisor. The
plain-HTTP port belongs to :mod:`ca_service.ocsp_front`, a third child that answers
pre-signed OCSP itself and forwards everything else to the plain-HTTP arbiter on a Unix
socket. Workers are forked by gunicorn and build the app themselves
(``preload_app`` off), so each opens its own database pool and PKCS#11 session.
SIGTERM or SIGINT to the supervisor stops all three gracefully. The Unix socket lives in a
private (0700) temporary directory, so nothing but the front end reaches that app.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gunicorn.app.base import BaseApplication

from pki.config import Settings, load_settings
from pki.scheduler import SchedulerService
from pki.service import Pki

GRACEFUL_SECONDS = 10
PR_SET_PDEATHSIG = 1
THREADS_PER_WORKER = 4
#: OCSP and CRL requests are tiny and quick; more threads absorb slow clients
HTTP_THREADS_PER_WORKER = 16
#: a request thread waiting for the GIL gets it within 1 ms instead of Python's 5 ms:
#: with several threads per worker the waits added up to tens of ms per request
GIL_SWITCH_SECONDS = 0.001
#: nice value of the publisher thread (Linux schedules threads individually)
PUBLISHER_NICENESS = 10


class _Gunicorn(BaseApplication):  # type: ignore[misc]
    """gunicorn with options from code and the hsmca app factory."""

    def __init__(self, home: Path, listener: str, options: dict[str, Any]) -> None:
        self.home = home
        self.listener = listener
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        from ca_service import create_app

        return create_app(self.home, self.listener)


_contexts: dict[tuple[int, float, float], ssl.SSLContext] = {}


def cached_ssl_context(conf: Any, factory: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
    """One SSLContext per worker process, rebuilt when the certificate or the trusted CA
    file changes (gunicorn would otherwise build one per connection)."""
    key = (os.getpid(), os.stat(conf.certfile).st_mtime, os.stat(conf.ca_certs).st_mtime)
    context = _contexts.get(key)
    if context is None:
        _contexts.clear()
        context = factory()
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        _contexts[key] = context
    return context


def warm_worker(worker: Any) -> None:
    """Open this worker's core (database pool, ACME nonce key, compiled queries, the
    linter) before its first request, so that request is not the slow one. A failure here
    is left to the first request, which reports it properly."""
    app = worker.wsgi
    try:
        with app.app_context():
            from ca_service.context import core

            core().store.ping()
            if app.config.get("HSMCA_LISTENER") == "https":
                from acme_server.views import acme_core
                from pki import lint

                acme_core().warm()
                if core().settings.ca.lint_before_sign:
                    lint.warm()  # imports pkilint (~0.5 s) before the first issuance
    except Exception:
        worker.log.warning("worker warm-up failed; the first request will retry")
    # what start-up allocated lives as long as the worker: keep it out of the cyclic
    # collector's full passes (they walked it all, in pauses of tens of ms under load)
    gc.freeze()


def gunicorn_options(settings: Settings, listener: str, bind: str, workers: int) -> dict[str, Any]:
    """gunicorn settings for one listener; ``bind`` is ``host:port`` or ``unix:path``."""
    options: dict[str, Any] = {
        "bind": [bind],
        "workers": workers,
        # the read timeout guards the small OCSP/CRL requests against stalled clients;
        # on the HTTPS listener it turned slow TLS body reads under load into 400s
        "worker_class": "ca_service.workers.ProblemThreadWorker"
        if listener == "https"
        else "ca_service.workers.TimeoutThreadWorker",
        "threads": THREADS_PER_WORKER if listener == "https" else HTTP_THREADS_PER_WORKER,
        "graceful_timeout": GRACEFUL_SECONDS,
        "timeout": 60,
        "keepalive": 15,
        "accesslog": None,
        "errorlog": "-",
        "loglevel": "warning",
        "proc_name": f"hsmca-{listener}",
        "limit_request_line": 8190,
        "limit_request_fields": 100,
        "control_socket_disable": True,
        "post_worker_init": warm_worker,
    }
    if listener == "https":
        home = settings.home
        options.update(
            certfile=str(settings.tls_dir / "server.pem"),
            keyfile=str(settings.tls_dir / "server.key"),
            ca_certs=str(home / "ca" / "trust.pem"),
            cert_reqs=ssl.CERT_OPTIONAL,
            ssl_context=cached_ssl_context,
        )
    return options


def run_listener(home: Path, listener: str, bind: str, workers: int) -> None:
    """Run one gunicorn arbiter in this process (the supervisor's child)."""
    settings = load_settings(home)
    sys.setswitchinterval(GIL_SWITCH_SECONDS)
    options = gunicorn_options(settings, listener, bind, workers)
    _Gunicorn(home, listener, options).run()


@dataclass(frozen=True)
class ServeOptions:
    home: Path
    host: str
    https_port: int
    http_port: int
    workers: int


def _check_port_free(host: str, port: int, what: str) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise SystemExit(
                f"error: cannot listen on {host}:{port} for {what}: {exc.strerror} "
                f"(choose another with --{what}-port)"
            ) from None


def prepare(home: Path) -> Settings:
    """Refuse secrets other users can read, migrate the database, reconcile interrupted
    issuance and write the CA files (``ca/trust.pem`` included) before serving."""
    from pki.bootstrap import export_ca_files
    from pki.secret_files import check_secret_files

    check_secret_files(load_settings(home))
    pki = Pki.open(home)
    try:
        pki.reconcile_pending()
        pki.hsm.open()
        export_ca_files(pki)
    finally:
        pki.close()
    return pki.settings


class Publisher(threading.Thread):
    """Keeps CRLs and pre-signed OCSP responses fresh (every ``interval`` seconds) with
    the scheduler's core, in the leader's supervisor process only. Its thread runs niced:
    under a burst of issuance it pre-signs later instead of slowing issuance (a certificate
    without a pre-signed response is answered live by the plain-HTTP app meanwhile)."""

    def __init__(self, pki: Pki, interval: float = 1.0) -> None:
        super().__init__(name="hsmca-publisher", daemon=True)
        self.pki = pki
        self.interval = interval
        self.stop_event = threading.Event()

    def run(self) -> None:
        log = logging.getLogger("hsmca.publisher")
        with contextlib.suppress(OSError):  # background work yields the CPU to requests
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), PUBLISHER_NICENESS)
        while not self.stop_event.is_set():
            try:
                counts = self.pki.publish_due()
                if any(counts.values()):
                    log.info("published", extra=counts)
            except Exception:
                log.exception("publishing failed; retrying")
            self.stop_event.wait(self.interval)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=GRACEFUL_SECONDS)


def _start_publisher(pki: Pki) -> Callable[[], None]:
    publisher = Publisher(pki)
    publisher.start()
    return publisher.stop


def _die_with_parent() -> None:
    """In a child: get SIGTERM when the supervisor dies, however it dies (Linux)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # pragma: no cover - not Linux
        pass


def serve(opts: ServeOptions, announce: Callable[[str], None] = print) -> int:
    """Run both listeners until SIGTERM/SIGINT; return the exit code."""
    stopping = False

    def _stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    from ca_service.logs import configure_logging, register_settings_secrets

    configure_logging()  # the scheduler, publisher and jobs log from this process
    settings = prepare(opts.home)
    configure_logging(settings.server.log_level)
    register_settings_secrets(settings)
    _check_port_free(opts.host, opts.https_port, "https")
    _check_port_free(opts.host, opts.http_port, "http")
    # per instance: several instances may serve one home (and share its database)
    metrics_dir = opts.home / "run" / f"metrics-{os.getpid()}"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    run_dir = Path(tempfile.mkdtemp(prefix="hsmca-"))  # short: a socket path has <108 bytes
    backend = run_dir / "http.sock"
    listener = [sys.executable, "-m", "ca_service.server", "--home", str(opts.home)]
    commands = {
        "https": [
            *listener,
            *("--listener", "https", "--bind", _tcp_bind(opts.host, opts.https_port)),
            *("--workers", str(opts.workers)),
        ],
        "http": [
            *listener,
            *("--listener", "http", "--bind", f"unix:{backend}"),
            *("--workers", str(max(1, opts.workers // 2))),
        ],
        "ocsp-front": [
            *(sys.executable, "-m", "ca_service.ocsp_front", "--home", str(opts.home)),
            *("--host", opts.host, "--port", str(opts.http_port), "--backend", str(backend)),
        ],
    }
    children = {
        name: subprocess.Popen(command, env=env, preexec_fn=_die_with_parent)
        for name, command in commands.items()
    }
    scheduler = SchedulerService(
        lambda: Pki.open(opts.home, upgrade=False), on_leader=_start_publisher
    )
    scheduler.start()
    _announce(settings, opts, announce)
    code = 0
    while not stopping:
        exited = {n: c.poll() for n, c in children.items() if c.poll() is not None}
        if exited:
            announce(f"listener(s) stopped unexpectedly: {exited}; shutting down")
            code = 1
            break
        with contextlib.suppress(InterruptedError):
            signal.sigtimedwait([signal.SIGCHLD], 0.5)
    scheduler.stop()
    for child in children.values():
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + GRACEFUL_SECONDS + 5
    for child in children.values():
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    scheduler.join(timeout=GRACEFUL_SECONDS)
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(metrics_dir, ignore_errors=True)
    announce("hsmca stopped")
    return code


def _announce(settings: Settings, opts: ServeOptions, announce: Callable[[str], None]) -> None:
    https = f"https://{_url_host(opts.host)}:{opts.https_port}"
    http = f"http://{_url_host(opts.host)}:{opts.http_port}"
    announce(
        "\n".join(
            [
                f"hsmca is serving from {opts.home}",
                f"  REST API        {https}/api/v1/",
                f"  ACME directory  {https}/acme/directory",
                f"  OCSP / CRL / CA {http}/ocsp  {http}/crl/<issuer-id>.crl",
                f"  health, metrics {https}/healthz  {https}/metrics",
                f"  root certificate: {opts.home / 'ca' / 'root.pem'}",
                f"  admin token:      hsmca --home {opts.home} token create --role admin",
                f"  try:  curl --cacert {opts.home / 'ca' / 'root.pem'} {https}/healthz",
                "Stop with Ctrl-C (SIGINT) or SIGTERM.",
            ]
        ),
    )


def _tcp_bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one hsmca listener (started by hsmca serve)")
    parser.add_argument("--home", required=True, type=Path)
    parser.add_argument("--listener", choices=("https", "http"), required=True)
    parser.add_argument("--bind", required=True, help="host:port or unix:path")
    parser.add_argument("--workers", required=True, type=int)
    args = parser.parse_args(argv)
    run_listener(args.home, args.listener, args.bind, args.workers)


if __name__ == "__main__":
    main()
