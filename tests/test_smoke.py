"""The core issues a certificate through the real HSM into the real store."""

from __future__ import annotations

from cryptography import x509

from pki.actors import operator
from pki.service import IssueRequest, Pki


def test_issue_and_show(pki: Pki, make_csr) -> None:
    record = pki.issue(IssueRequest(make_csr(), "mtls-server"), operator())
    assert record.status == "good"
    cert = x509.load_pem_x509_certificate(record.certificate_pem.encode())
    assert format(cert.serial_number, "x") == record.serial.lstrip("0")
    assert pki.show(record.serial).certificate_pem == record.certificate_pem
