"""``hsmca agent``: enrolment with a single-use token, renewal over mTLS with a new key,
atomic files, the reload command, back-off while the CA is down, ``--once``.

Everything runs against a real ``hsmca serve`` on a fresh home with a 2-minute profile
(a certificate lives 3 minutes: 60 s of notBefore backdating plus the 2-minute TTL, so the
agent renews about every 60 s). The long-running test takes about 2.5 minutes.
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cli.agent import Agent, AgentConfig, Identity, lapse_margin, retry_delay
from cli.agent_material import AgentError, atomic_write
from cli.main import main as cli_main
from pki.bootstrap import initialise
from pki.serials import serial_hex
from tests.api_helpers import TIMEOUT, new_token, poll
from tests.conftest import RunningService, build_csr, free_port

HSMCA = str(Path(sys.executable).parent / "hsmca")
REPO = Path(__file__).resolve().parent.parent
PROFILE = "agent-2m"
NAME = "agent.svc.test"
AGENT_ENV = {k: v for k, v in os.environ.items() if not k.startswith("HSMCA_")}


def _agent_home(tmp: Path) -> Path:
    """A fresh home with a 2-minute profile (serverAuth + clientAuth by default)."""
    home = tmp / "home"
    initialise(home, "Agent Org")
    with (home / "hsmca.toml").open("a") as f:
        f.write(f'\n[profiles.{PROFILE}]\ndefault_ttl = "2m"\nmax_ttl = "2m"\n')
    return home


def _bootstrap_token(home: Path) -> str:
    secret, _ = new_token(
        home, "issuer", allowed_names=("*.svc.test",), profiles=(PROFILE,), single_use=True
    )
    return secret


def _agent_args(service: RunningService, files: Path, *extra: str) -> list[str]:
    return [
        HSMCA,
        "agent",
        *("--ca-url", service.base, "--root", str(service.root)),
        *("--name", NAME, "--profile", PROFILE),
        *("--cert", str(files / "svc.pem"), "--key", str(files / "svc.key")),
        *extra,
    ]


def _run_once(args: list[str], token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(AGENT_ENV, **({"HSMCA_AGENT_TOKEN": token} if token else {}))
    return subprocess.run(
        [*args, "--once"], env=env, capture_output=True, text=True, timeout=60, cwd=REPO
    )


@dataclass(frozen=True)
class Seen:
    """A certificate the test saw installed at --cert, and when."""

    serial: str
    not_before: dt.datetime
    not_after: dt.datetime
    spki: bytes
    seen_at: dt.datetime


def _installed(cert_path: Path, key_path: Path) -> Seen | None:
    """The installed certificate if the key file belongs to it (both files complete)."""
    try:
        certs = x509.load_pem_x509_certificates(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    except (OSError, ValueError):
        return None
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    spki = certs[0].public_key().public_bytes(serialization.Encoding.DER, pub)
    if key.public_key().public_bytes(serialization.Encoding.DER, pub) != spki:
        return None
    return Seen(
        serial_hex(certs[0].serial_number),
        certs[0].not_valid_before_utc,
        certs[0].not_valid_after_utc,
        spki,
        dt.datetime.now(dt.UTC),
    )


def _wait_for_new(files: Path, previous: Seen | None, deadline_s: float, what: str) -> Seen:
    def changed() -> Seen | None:
        seen = _installed(files / "svc.pem", files / "svc.key")
        if seen is None or (previous is not None and seen.spki == previous.spki):
            return None
        return seen

    return poll(changed, deadline_s, what, every=0.2)


def _stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def _no_leftovers(files: Path) -> None:
    left = sorted(p.name for p in files.iterdir() if p.name.endswith((".tmp", ".new")))
    assert not left, left


# -- the long-running agent: enrol, renew, CA outage, renew again -------------------------


def test_agent_enrols_renews_and_rides_out_a_ca_outage(tmp_path: Path) -> None:
    home = _agent_home(tmp_path)
    files = tmp_path / "svc"
    files.mkdir()
    service = RunningService(home)
    agent: subprocess.Popen[bytes] | None = None
    agent_log = tmp_path / "agent.log"
    reloads = tmp_path / "reloads.log"
    try:
        token = _bootstrap_token(home)
        reload_cmd = (
            'echo "$HSMCA_AGENT_EVENT $HSMCA_AGENT_SERIAL ${HSMCA_AGENT_TOKEN:-no-token}" '
            f">> {reloads}"
        )
        with agent_log.open("wb") as out:
            agent = subprocess.Popen(
                _agent_args(service, files, "--exec", reload_cmd),
                env=dict(AGENT_ENV, HSMCA_AGENT_TOKEN=token),  # not on the command line
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        seen = [_wait_for_new(files, None, 30, "enrolment")]

        # the single-use token is spent: the agent renews without it from now on
        resp = service.session(token).post(
            f"{service.base}/api/v1/certificates",
            json={"csr": build_csr(cn=NAME, sans=(NAME,))[0].decode(), "profile": PROFILE},
            timeout=TIMEOUT,
        )
        assert resp.status_code == 401 and "already used" in resp.text, resp.text

        # first renewal at about 2/3 of the lifetime, well before the certificate lapses
        left = (seen[0].not_after - dt.datetime.now(dt.UTC)).total_seconds()
        seen.append(_wait_for_new(files, seen[-1], left, "first renewal"))

        # the CA goes down just before the next renewal point and stays down 20-30 s (15 s,
        # then the restart); the agent must not sleep past the lapse margin meanwhile
        due = _next_renewal(agent_log, seen[-1].serial)
        assert due < seen[-1].not_after - lapse_margin(seen[-1].not_after - seen[-1].not_before)
        just_before = due - dt.timedelta(seconds=5)
        poll(lambda: dt.datetime.now(dt.UTC) >= just_before, 90, "5 s before the renewal point")
        service.stop()
        stopped_at = time.monotonic()
        current = _installed(files / "svc.pem", files / "svc.key")
        assert current is not None and current.serial == seen[-1].serial, "renewed too early"
        poll(lambda: len(_retries(agent_log)) >= 2, 60, "two failed renewal attempts")
        poll(lambda: time.monotonic() - stopped_at >= 15, 30, "the outage to last 15 s")
        assert agent.poll() is None, agent_log.read_text()
        still = _installed(files / "svc.pem", files / "svc.key")
        assert still is not None and (still.serial, still.spki) == (current.serial, current.spki)
        service = RunningService(home, https_port=service.https_port, http_port=service.http_port)

        # the agent renews once the CA is back, before the old certificate lapses
        left = (seen[-1].not_after - dt.datetime.now(dt.UTC)).total_seconds()
        seen.append(_wait_for_new(files, seen[-1], left, "renewal after the outage"))

        assert _stop_process(agent) == 0, agent_log.read_text()
        log = agent_log.read_text()
        assert "stopped (SIGTERM)" in log, log
    finally:
        if agent is not None and agent.poll() is None:
            agent.kill()
            agent.wait()
        service.stop()

    # one new serial and one new key per change, and no gap between validity periods
    assert len({s.serial for s in seen}) == len(seen) == 3, seen
    assert len({s.spki for s in seen}) == 3
    for old, new in itertools.pairwise(seen):
        assert new.not_before <= old.not_after, (old, new)
        assert new.seen_at < old.not_after, (old, new)  # never lapsed

    # log: one line per action, retries with reasons, never the token or key material
    assert len(re.findall(r" enrolled agent\.svc\.test: serial ", log)) == 1, log
    assert len(re.findall(r" renewed agent\.svc\.test: serial ", log)) == 2, log
    retries = _retries(agent_log)
    assert len(retries) >= 2 and all("Connection refused" in line for line in retries), retries
    delays = [int(re.search(r"retry in (\d+) s", line).group(1)) for line in retries]
    assert delays[:3] == [1, 2, 4], delays  # exponential back-off
    assert token not in log and "PRIVATE KEY" not in log

    # the reload command ran once per change, in order, without the token
    lines = reloads.read_text().splitlines()
    assert lines == [
        f"enrolled {seen[0].serial} no-token",
        f"renewed {seen[1].serial} no-token",
        f"renewed {seen[2].serial} no-token",
    ], lines

    # files: key 0600, certificate = leaf + issuing CA, no temporary files left behind
    assert stat.S_IMODE((files / "svc.key").stat().st_mode) == 0o600
    chain = x509.load_pem_x509_certificates((files / "svc.pem").read_bytes())
    intermediate = x509.load_pem_x509_certificate((home / "ca" / "intermediate.pem").read_bytes())
    assert chain[1:] == [intermediate]
    chain[0].verify_directly_issued_by(intermediate)
    _no_leftovers(files)


def _retries(agent_log: Path) -> list[str]:
    return [line for line in agent_log.read_text().splitlines() if "renewal failed:" in line]


def _next_renewal(agent_log: Path, serial: str) -> dt.datetime:
    """The renewal time the agent announced for ``serial``."""
    pattern = re.compile(rf"certificate {serial} valid until \S+; next renewal at (\S+)")

    def announced() -> dt.datetime | None:
        found = pattern.search(agent_log.read_text())
        return dt.datetime.fromisoformat(found.group(1)) if found else None

    return poll(announced, 10, f"the renewal schedule of {serial}")


# -- --once, SIGINT, usage ----------------------------------------------------------------


@pytest.fixture(scope="module")
def once_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    service = RunningService(_agent_home(tmp_path_factory.mktemp("agent-once")))
    yield service
    assert service.stop() == 0, service.log.read_text()[-2000:]


def test_once_enrols_then_has_nothing_to_do(once_service: RunningService, tmp_path: Path) -> None:
    token = _bootstrap_token(once_service.home)
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    reloads = tmp_path / "reloads.log"
    args = _agent_args(once_service, tmp_path, "--exec", f"echo $HSMCA_AGENT_EVENT >> {reloads}")

    first = _run_once([*args, "--token-file", str(token_file)])
    assert first.returncode == 0, first.stderr
    installed = _installed(tmp_path / "svc.pem", tmp_path / "svc.key")
    assert installed is not None
    assert f"enrolled {NAME}: serial {installed.serial}, not_after " in first.stderr
    assert token not in first.stderr + first.stdout
    assert stat.S_IMODE((tmp_path / "svc.key").stat().st_mode) == 0o600

    second = _run_once(args)  # no token needed: nothing is due
    assert second.returncode == 0, second.stderr
    assert "nothing to do" in second.stderr
    again = _installed(tmp_path / "svc.pem", tmp_path / "svc.key")
    assert again is not None and (again.serial, again.spki) == (installed.serial, installed.spki)
    assert reloads.read_text().splitlines() == ["enrolled"]
    _no_leftovers(tmp_path)


def test_once_with_a_wrong_token_fails_clearly(
    once_service: RunningService, tmp_path: Path
) -> None:
    result = _run_once(_agent_args(once_service, tmp_path), "hsmca_not-a-real-token")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("Error: enrolment refused by the CA (401): "), result.stderr
    assert "HSMCA_AGENT_TOKEN" in lines[-1]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "svc.pem").exists() and not (tmp_path / "svc.key").exists()


def test_once_without_a_token_or_a_reachable_ca(
    once_service: RunningService, tmp_path: Path
) -> None:
    no_token = _run_once(_agent_args(once_service, tmp_path))
    assert no_token.returncode == 1
    assert "enrolment needs a token" in no_token.stderr.strip().splitlines()[-1]

    args = _agent_args(once_service, tmp_path)
    args[args.index(once_service.base)] = f"https://127.0.0.1:{free_port()}"
    down = _run_once(args, "hsmca_whatever")
    assert down.returncode == 1
    assert "CA unreachable: Connection refused" in down.stderr.strip().splitlines()[-1]


def test_once_renews_past_the_renewal_point_with_a_new_key(
    once_service: RunningService, tmp_path: Path
) -> None:
    """In process, with the agent's clock moved past the renewal point (the CA's is not)."""
    config = AgentConfig(
        ca_url=once_service.base,
        root=once_service.root,
        names=(NAME,),
        cert_path=tmp_path / "svc.pem",
        key_path=tmp_path / "svc.key",
        token=_bootstrap_token(once_service.home),
        profile=PROFILE,
    )
    assert Agent(config).run_once() == "enrolled"
    before = _installed(config.cert_path, config.key_path)
    assert before is not None
    late = Agent(config, now=lambda: dt.datetime.now(dt.UTC) + dt.timedelta(seconds=100))
    assert late.run_once() == "renewed"
    after = _installed(config.cert_path, config.key_path)
    assert after is not None and after.serial != before.serial and after.spki != before.spki
    assert after.not_before <= before.not_after


def test_a_certificate_without_client_auth_is_reported(
    once_service: RunningService, tmp_path: Path
) -> None:
    secret, _ = new_token(
        once_service.home, "issuer", allowed_names=("*.svc.test",), single_use=True
    )
    config = AgentConfig(
        ca_url=once_service.base,
        root=once_service.root,
        names=(NAME,),
        cert_path=tmp_path / "svc.pem",
        key_path=tmp_path / "svc.key",
        token=secret,
        profile="mtls-server",
    )
    with pytest.raises(AgentError, match="no clientAuth EKU"):
        Agent(config).run_once()


def test_interrupted_key_replacement_is_completed(
    once_service: RunningService, tmp_path: Path
) -> None:
    """A crash between installing the certificate and the key leaves the new key staged
    next to the old one; the next start moves it into place (an unrelated one is dropped)."""
    config = AgentConfig(
        ca_url=once_service.base,
        root=once_service.root,
        names=(NAME,),
        cert_path=tmp_path / "svc.pem",
        key_path=tmp_path / "svc.key",
        token=_bootstrap_token(once_service.home),
        profile=PROFILE,
    )
    agent = Agent(config)
    agent.run_once()
    good_key = config.key_path.read_bytes()
    _, other = build_csr()
    other_pem = other.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    agent.staged_key_path.write_bytes(good_key)
    config.key_path.write_bytes(other_pem)
    identity, why = agent.current()
    assert identity is not None, why
    assert config.key_path.read_bytes() == good_key and not agent.staged_key_path.exists()

    agent.staged_key_path.write_bytes(other_pem)
    assert agent.current()[0] is not None
    assert not agent.staged_key_path.exists() and config.key_path.read_bytes() == good_key


def test_sigint_stops_the_agent_cleanly(once_service: RunningService, tmp_path: Path) -> None:
    token = _bootstrap_token(once_service.home)
    args = _agent_args(once_service, tmp_path)
    assert _run_once(args, token).returncode == 0
    log = tmp_path / "agent.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(args, env=AGENT_ENV, stdout=out, stderr=subprocess.STDOUT)
    try:
        poll(lambda: "next renewal at" in log.read_text(), 20, "the agent to settle")
        assert _stop_process(proc, signal.SIGINT) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "stopped (SIGINT)" in log.read_text()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--ca-url", "http://127.0.0.1:1"), "--ca-url must be an https:// URL"),
        (("--profile", "mtls-server"), "no clientAuth"),
        (("--ttl", "soon"), "not a duration"),
        (("--name", "bad name!"), "--name"),
    ],
)
def test_usage_errors(tmp_path: Path, extra: tuple[str, ...], message: str) -> None:
    root = tmp_path / "root.pem"
    root.write_text("not used")
    base = {
        "--ca-url": "https://127.0.0.1:1",
        "--root": str(root),
        "--name": NAME,
        "--cert": str(tmp_path / "c.pem"),
        "--key": str(tmp_path / "c.key"),
    }
    base.update(dict(zip(extra[::2], extra[1::2], strict=True)))
    args = ["agent", *(x for pair in base.items() for x in pair), "--once"]
    result = CliRunner().invoke(cli_main, args, env={"HSMCA_AGENT_TOKEN": ""})
    assert result.exit_code == 2, result.output
    assert message in result.output, result.output


# -- the schedule, without a CA -----------------------------------------------------------


def test_retries_never_sleep_past_the_lapse_margin() -> None:
    start = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    # the schedule reads only the dates: no certificate needed
    identity = Identity(None, "01", start, start + dt.timedelta(minutes=3))  # type: ignore[arg-type]
    margin = lapse_margin(identity.lifetime)
    assert margin == dt.timedelta(seconds=9)
    deadline = identity.not_after - margin
    early = start + dt.timedelta(seconds=120)
    assert retry_delay(60, early, identity) == 51  # capped: 171 s is the last retry
    assert retry_delay(4, early, identity) == 4
    assert retry_delay(60, deadline - dt.timedelta(seconds=0.5), identity) == 1.0
    assert retry_delay(60, identity.not_after, identity) == 1.0  # at least 1 s apart
    assert retry_delay(60, early, None) == 60  # nothing to lose while enrolling


def test_atomic_write_replaces_with_the_mode(tmp_path: Path) -> None:
    target = tmp_path / "k.pem"
    target.write_text("old")
    atomic_write(target, b"new", 0o600)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["k.pem"]


def test_agent_refuses_uri_names() -> None:
    with pytest.raises(AgentError, match="not"):
        Agent(
            AgentConfig(
                ca_url="https://x",
                root=Path("/nonexistent"),
                names=("spiffe://x/y",),
                cert_path=Path("c"),
                key_path=Path("k"),
            )
        )


def test_agent_does_not_leak_requests_errors() -> None:
    """Transport failures become one short reason (no pool repr, no URL noise)."""
    from cli.agent import _transport_reason

    try:
        requests.get(f"http://127.0.0.1:{free_port()}/", timeout=2)
    except requests.RequestException as exc:
        assert _transport_reason(exc) == "Connection refused"
