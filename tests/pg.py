"""Throwaway PostgreSQL servers for tests.

Usage::

    from tests.pg import PostgresUnavailable, create_database, running_postgres

    with running_postgres(tmp_path) as url:
        engine = sqlalchemy.create_engine(url)
        other_url = create_database(url, "per_test_db")

Each call starts its own server (own data directory, own port, own socket
directory), so it is safe to use from several pytest-xdist workers at once.
When the PostgreSQL binaries are missing, we try ``apt-get install postgresql``
if running as root; otherwise :class:`PostgresUnavailable` is raised.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import glob
import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = [
    "DB_NAME",
    "DB_USER",
    "PostgresUnavailable",
    "create_database",
    "find_bindir",
    "running_postgres",
]

DB_USER = "hsmca"
DB_NAME = "hsmca_test"
HOST = "127.0.0.1"
START_TIMEOUT = 30.0  # seconds, for pg_ctl -w and for our own readiness polling
_OS_USER = "postgres"  # unprivileged OS user that owns the cluster when we are root
_LOCK_FILE = Path(tempfile.gettempdir()) / "hsmca-pg-setup.lock"
_PG_ENV_VARS = (
    "PGDATA", "PGHOST", "PGHOSTADDR", "PGPORT", "PGUSER", "PGPASSWORD",
    "PGDATABASE", "PGSERVICE", "PGSERVICEFILE", "PGPASSFILE", "PGOPTIONS",
)  # fmt: skip

_apt_updated = False


class PostgresUnavailable(RuntimeError):
    """PostgreSQL cannot be started here; the message says why."""


def _is_root() -> bool:
    return os.geteuid() == 0


def _clean_env() -> dict[str, str]:
    """Environment for PostgreSQL commands, free of PG* settings from the caller."""
    env = {k: v for k, v in os.environ.items() if k not in _PG_ENV_VARS}
    env.setdefault("LC_ALL", "C")
    return env


def _run(
    cmd: Sequence[str], *, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(cmd),
        cwd=cwd,
        env=_clean_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _describe(proc: subprocess.CompletedProcess[str]) -> str:
    out = (proc.stdout + proc.stderr).strip()
    return f"`{' '.join(proc.args)}` exited with {proc.returncode}: {out[-2000:]}"


@contextlib.contextmanager
def _setup_lock() -> Iterator[None]:
    """Serialise one-off machine setup (apt-get, useradd) across xdist workers."""
    with open(_LOCK_FILE, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _version_key(bindir: str) -> tuple[int, ...]:
    version = Path(bindir).parent.name  # /usr/lib/postgresql/<version>/bin
    return tuple(int(part) for part in re.findall(r"\d+", version)) or (0,)


def find_bindir() -> Path | None:
    """Directory holding initdb/pg_ctl: the highest /usr/lib/postgresql/*/bin, else PATH."""
    candidates = [
        d for d in glob.glob("/usr/lib/postgresql/*/bin") if os.access(f"{d}/initdb", os.X_OK)
    ]
    if candidates:
        return Path(max(candidates, key=_version_key))
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            proc = _run([pg_config, "--bindir"], timeout=30)
            bindir = Path(proc.stdout.strip())
            if proc.returncode == 0 and os.access(bindir / "initdb", os.X_OK):
                return bindir
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _apt_install_postgres() -> None:
    global _apt_updated
    if not shutil.which("apt-get"):
        raise PostgresUnavailable(
            "PostgreSQL binaries not found and apt-get is not available to install them"
        )
    with _setup_lock():
        if find_bindir() is not None:  # another worker installed it meanwhile
            return
        env_cmd = ["env", "DEBIAN_FRONTEND=noninteractive"]
        if not _apt_updated:
            proc = _run([*env_cmd, "apt-get", "update"], timeout=600)
            if proc.returncode != 0:
                raise PostgresUnavailable(f"apt-get update failed: {_describe(proc)}")
            _apt_updated = True
        proc = _run([*env_cmd, "apt-get", "install", "-y", "postgresql"], timeout=1200)
        if proc.returncode != 0:
            raise PostgresUnavailable(f"apt-get install postgresql failed: {_describe(proc)}")


def _require_bindir() -> Path:
    bindir = find_bindir()
    if bindir is None:
        if not _is_root():
            raise PostgresUnavailable(
                "PostgreSQL server binaries (initdb, pg_ctl) not found in "
                "/usr/lib/postgresql/*/bin or via pg_config/PATH, and not root so cannot "
                "install them: run `sudo apt-get install postgresql`"
            )
        _apt_install_postgres()
        bindir = find_bindir()
        if bindir is None:
            raise PostgresUnavailable("apt-get installed postgresql but initdb is still missing")
    return bindir


def _ensure_os_user() -> pwd.struct_passwd:
    """Return the `postgres` OS user, creating it as a system user if missing."""
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(_OS_USER)
    with _setup_lock():
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(_OS_USER)
        if not shutil.which("useradd"):
            raise PostgresUnavailable(f"no `{_OS_USER}` user and useradd is missing")
        proc = _run(
            ["useradd", "--system", "--user-group", "--no-create-home",
             "--shell", "/bin/sh", _OS_USER],
        )  # fmt: skip
        if proc.returncode != 0:
            raise PostgresUnavailable(f"cannot create `{_OS_USER}` user: {_describe(proc)}")
        return pwd.getpwnam(_OS_USER)


def _as_server_user(cmd: list[str]) -> list[str]:
    """Prefix `cmd` so that it runs as the postgres user when we are root."""
    if not _is_root():
        return cmd
    if shutil.which("runuser"):
        return ["runuser", "-u", _OS_USER, "--", *cmd]
    if shutil.which("su"):
        return ["su", _OS_USER, "-s", "/bin/sh", "-c", shlex.join(cmd)]
    raise PostgresUnavailable("running as root but neither runuser nor su is available")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _make_workdir(tmp_dir: Path) -> Path:
    """A fresh directory for data, socket and log, accessible to the server user."""
    if _is_root():
        # pytest's tmp dirs are 0700 root-owned: the postgres user could not reach
        # anything inside them, so use a fresh directory in the system temp dir.
        user = _ensure_os_user()
        workdir = Path(tempfile.mkdtemp(prefix="hsmca-pg-"))
        os.chown(workdir, user.pw_uid, user.pw_gid)
    else:
        tmp_dir.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix="pg-", dir=tmp_dir))
        # Unix socket paths are limited to ~107 bytes.
        if len(str(workdir / "sock" / ".s.PGSQL.65535")) > 100:
            shutil.rmtree(workdir)
            workdir = Path(tempfile.mkdtemp(prefix="hsmca-pg-"))
    os.chmod(workdir, 0o700)
    return workdir


def _wait_ready(port: int, deadline: float) -> None:
    """Poll until the server accepts SQL connections, or raise at the deadline."""
    import psycopg

    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with psycopg.connect(
                host=HOST, port=port, user=DB_USER, dbname="postgres", connect_timeout=2
            ) as conn:
                conn.execute("SELECT 1")
                return
        except psycopg.OperationalError as exc:
            last_error = exc
            time.sleep(0.05)
    raise PostgresUnavailable(f"PostgreSQL on port {port} not ready in time: {last_error}")


def _log_tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-3000:]
    except OSError:
        return "(no server log)"


def _stop(bindir: Path, workdir: Path, data: Path) -> None:
    """Stop the server (immediate mode); kill the postmaster by pid if pg_ctl fails."""
    if not (data / "postmaster.pid").exists():
        return
    with contextlib.suppress(OSError, subprocess.SubprocessError, PostgresUnavailable):
        proc = _run(
            _as_server_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate",
                             "-w", "-t", "30", "stop"]),
            cwd=workdir, timeout=60,
        )  # fmt: skip
        if proc.returncode == 0:
            return
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int((data / "postmaster.pid").read_text().splitlines()[0])
        os.kill(pid, 9)


@dataclasses.dataclass(frozen=True)
class _Server:
    bindir: Path
    workdir: Path
    data: Path
    log: Path
    options: str


#: the servers :func:`running_postgres` started in this process, by port
_servers: dict[int, _Server] = {}


def _server_of(url: str) -> tuple[int, _Server]:
    from sqlalchemy.engine import make_url

    port = make_url(url).port or 0
    if port not in _servers:
        raise KeyError(f"no server of this process listens on port {port}")
    return port, _servers[port]


def stop_postgres(url: str) -> None:
    """Stop the private server behind ``url`` in "fast" mode: every connection is cut,
    open transactions roll back, and what was committed stays (the immediate mode of
    :func:`_stop` would lose the last commits: these servers run synchronous_commit=off)."""
    _port, server = _server_of(url)
    proc = _run(
        _as_server_user([str(server.bindir / "pg_ctl"), "-D", str(server.data), "-m", "fast",
                         "-w", "-t", "60", "stop"]),
        cwd=server.workdir, timeout=90,
    )  # fmt: skip
    if proc.returncode != 0:
        raise PostgresUnavailable(f"pg_ctl stop failed: {_describe(proc)}")


def start_postgres(url: str) -> None:
    """Start the stopped private server behind ``url`` again, on the same port."""
    port, server = _server_of(url)
    proc = _run(
        _as_server_user([str(server.bindir / "pg_ctl"), "-D", str(server.data), "-l",
                         str(server.log), "-w", "-t", str(int(START_TIMEOUT)), "-o",
                         server.options, "start"]),
        cwd=server.workdir, timeout=START_TIMEOUT + 30,
    )  # fmt: skip
    if proc.returncode != 0:
        raise PostgresUnavailable(f"pg_ctl start failed: {_describe(proc)}")
    _wait_ready(port, time.monotonic() + START_TIMEOUT)


@contextlib.contextmanager
def running_postgres(tmp_dir: Path) -> Iterator[str]:
    """Start a private PostgreSQL server and yield a SQLAlchemy URL to database `hsmca_test`.

    The URL looks like ``postgresql+psycopg://hsmca@127.0.0.1:PORT/hsmca_test``
    (trust authentication, no password). The server is stopped and its files
    removed on exit; its log is copied to ``tmp_dir/postgresql.log``.
    Raises :class:`PostgresUnavailable` if PostgreSQL cannot be found, installed
    or started.
    """
    bindir = _require_bindir()
    workdir = _make_workdir(tmp_dir)
    data, sockdir, log = workdir / "data", workdir / "sock", workdir / "postgresql.log"
    started, port = False, 0
    try:
        proc = _run(
            _as_server_user([str(bindir / "initdb"), "-D", str(data), "-A", "trust",
                             "-U", DB_USER, "--no-sync", "-E", "UTF8", "--no-locale"]),
            cwd=workdir,
        )  # fmt: skip
        if proc.returncode != 0:
            raise PostgresUnavailable(f"initdb failed: {_describe(proc)}")
        # The server user creates the socket dir itself, so it owns it.
        proc = _run(_as_server_user(["mkdir", "-m", "0700", str(sockdir)]), cwd=workdir)
        if proc.returncode != 0:
            raise PostgresUnavailable(f"cannot create socket dir: {_describe(proc)}")

        # A port picked via bind(0) can be taken by someone else before the server
        # binds it (e.g. another xdist worker): retry with a new port in that case.
        port, error = 0, ""
        for _attempt in range(3):
            port = _free_port()
            options = (
                f"-c listen_addresses={HOST} -p {port} -k {sockdir} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            )
            proc = _run(
                _as_server_user([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log),
                                 "-w", "-t", str(int(START_TIMEOUT)), "-o", options, "start"]),
                cwd=workdir, timeout=START_TIMEOUT + 30,
            )  # fmt: skip
            started = started or (data / "postmaster.pid").exists()
            if proc.returncode == 0:
                break
            error = f"{_describe(proc)}\nserver log:\n{_log_tail(log)}"
            _stop(bindir, workdir, data)
        else:
            raise PostgresUnavailable(f"pg_ctl start failed: {error}")
        started = True

        _wait_ready(port, time.monotonic() + START_TIMEOUT)
        proc = _run(
            [str(bindir / "createdb"), "-h", HOST, "-p", str(port), "-U", DB_USER, DB_NAME],
            cwd=workdir, timeout=60,
        )  # fmt: skip
        if proc.returncode != 0:
            raise PostgresUnavailable(f"createdb failed: {_describe(proc)}")

        url = f"postgresql+psycopg://{DB_USER}@{HOST}:{port}/{DB_NAME}"
        _servers[port] = _Server(bindir, workdir, data, log, options)
        yield url
    finally:
        _servers.pop(port, None)
        if started:
            _stop(bindir, workdir, data)
        with contextlib.suppress(OSError):
            if log.exists() and tmp_dir.is_dir():
                shutil.copyfile(log, tmp_dir / "postgresql.log")
        shutil.rmtree(workdir, ignore_errors=True)


def create_database(url_of_server: str, name: str) -> str:
    """Create database `name` on the server behind `url_of_server`; return its SQLAlchemy URL."""
    import psycopg
    from psycopg import sql
    from sqlalchemy.engine import make_url

    url = make_url(url_of_server)
    params: dict[str, str | int] = {"dbname": "postgres"}
    if url.host:
        params["host"] = url.host
    if url.port:
        params["port"] = url.port
    if url.username:
        params["user"] = url.username
    if url.password is not None:
        params["password"] = str(url.password)
    with psycopg.connect(**params, autocommit=True) as conn:  # type: ignore[arg-type]
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return url.set(database=name).render_as_string(hide_password=False)
