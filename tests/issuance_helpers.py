"""Helpers shared by the issuance, policy and lint tests: issue through the real core,
write PEM/key files, and run the real openssl and pkilint command-line tools."""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib
import io
import json
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pki.actors import Actor, operator
from pki.records import CertificateRecord
from pki.service import IssueRequest, Pki
from tests.conftest import build_csr

#: the venv's bin directory, where pkilint's console scripts live
VENV_BIN = Path(sys.executable).parent

PROFILES = ("mtls-server", "mtls-client", "mtls", "device")

#: one request per profile, FQDN names only (pkilint refuses single-label dNSNames)
REQUESTS: dict[str, dict[str, Any]] = {
    "mtls-server": {"cn": "app.svc.test", "sans": ("app.svc.test",)},
    "mtls-client": {"cn": "client.svc.test", "sans": ("client.svc.test",)},
    "mtls": {"cn": "both.svc.test", "sans": ("both.svc.test", "10.0.0.7")},
    "device": {"cn": None, "sans": (), "serial_number": "dev-0001"},
}


@dataclass(frozen=True)
class Issued:
    """A certificate issued through the core, with its key and when it was asked for."""

    record: CertificateRecord
    cert: x509.Certificate
    key: object
    asked_at: dt.datetime
    answered_at: dt.datetime


def issue(
    pki: Pki,
    profile: str,
    cn: str | None = "app.svc.test",
    sans: tuple[str, ...] = ("app.svc.test",),
    *,
    key: object | None = None,
    ttl: dt.timedelta | None = None,
    device_id: str | None = None,
    serial_number: str | None = None,
    actor: Actor | None = None,
) -> Issued:
    """Issue one certificate from a fresh CSR through :meth:`Pki.issue`."""
    csr, private_key = build_csr(cn=cn, sans=sans, key=key, serial_number=serial_number)
    asked = dt.datetime.now(dt.UTC)
    record = pki.issue(IssueRequest(csr, profile, ttl, device_id), actor or operator("test"))
    answered = dt.datetime.now(dt.UTC)
    assert record.certificate_pem is not None
    cert = x509.load_pem_x509_certificate(record.certificate_pem.encode())
    return Issued(record, cert, private_key, asked, answered)


def write_pem(path: Path, *certs: x509.Certificate) -> Path:
    """Write certificates as concatenated PEM; return ``path``."""
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))
    return path


def write_key(path: Path, key: object) -> Path:
    """Write a software private key as unencrypted PKCS#8 PEM; return ``path``."""
    path.write_bytes(
        key.private_bytes(  # type: ignore[attr-defined]
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path


def ca_certificate(home: Path, name: str) -> x509.Certificate:
    """``root`` or ``intermediate`` as exported by ``init`` into ``<home>/ca``."""
    return x509.load_pem_x509_certificate((home / "ca" / f"{name}.pem").read_bytes())


def openssl_verify(home: Path, leaf: Path) -> subprocess.CompletedProcess[str]:
    """``openssl verify`` of ``leaf`` against the home's root, intermediate untrusted."""
    return subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(home / "ca" / "root.pem"),
            "-untrusted",
            str(home / "ca" / "intermediate.pem"),
            str(leaf),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@dataclass(frozen=True)
class Finding:
    """One pkilint finding."""

    severity: str
    code: str
    message: str
    node_path: str


def pkilint(tool: str, *args: str) -> list[Finding]:
    """Run a pkilint command (``lint_pkix_cert``, ``lint_crl``, ...) as ``<tool> lint -f JSON
    <args>`` and return every finding it prints.

    The console script's own ``main`` runs in this process (same argument parsing, same
    validators, same JSON report): a subprocess per lint costs seconds of interpreter and
    import start-up. :func:`pkilint_subprocess` runs the installed script itself.
    """
    module = importlib.import_module(f"pkilint.bin.{tool}")
    out = io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # argparse.FileType leaves it open
        with contextlib.redirect_stdout(out):
            module.main(["lint", "-f", "JSON", *args])
    return _findings(out.getvalue(), tool)


def pkilint_subprocess(tool: str, *args: str) -> tuple[int, list[Finding]]:
    """The installed console script in a subprocess: its exit code and findings."""
    done = subprocess.run(
        [str(VENV_BIN / tool), "lint", "-f", "JSON", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return done.returncode, _findings(done.stdout, f"{tool} ({done.stderr})")


def _findings(report: str, what: str) -> list[Finding]:
    assert report.strip(), f"{what} printed no report"
    findings = []
    for result in json.loads(report)["results"]:
        for f in result["finding_descriptions"]:
            findings.append(
                Finding(f["severity"], f["code"], f.get("message") or "", result["node_path"])
            )
    return findings


def errors_of(findings: list[Finding]) -> list[Finding]:
    """The findings that fail a lint: ERROR and FATAL."""
    return [f for f in findings if f.severity in ("ERROR", "FATAL")]
