"""Issue certificates from a separate process, for the concurrency and crash tests.

``python -m tests.issue_worker issue HOME --count N --tag T [--profile P]
[--barrier DIR --parties K]`` issues N certificates for ``T<i>.svc.test`` and prints
``{"serials": [...], "first": t0, "last": t1}`` (wall-clock span of the issuance loop).
With ``--barrier`` the worker waits, after opening the core, until K workers are ready,
and again halfway through, so the workers' issuance loops are sure to overlap.

``python -m tests.issue_worker crash HOME --csr-out FILE [--point sign|store]`` starts an
issuance and kills the process with exit code 17 at the HSM signature (``sign``: the
certificate builder that signs through the HSM) or right after it (``store``: when the
signed DER is about to be stored). Either way the pending row is already committed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CRASH_EXIT = 17


def make_csr(name: str) -> bytes:
    """A PEM CSR for ``name`` (CN and DNS SAN) with a fresh software P-256 key."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def _barrier(directory: Path, stage: str, tag: str, parties: int, timeout: float = 60) -> None:
    """Wait until ``parties`` workers have reached ``stage`` (polling, with a deadline)."""
    (directory / f"{tag}.{stage}").touch()
    deadline = time.monotonic() + timeout
    while len(list(directory.glob(f"*.{stage}"))) < parties:
        if time.monotonic() > deadline:
            sys.exit(f"barrier {stage}: only {len(list(directory.glob(f'*.{stage}')))}/{parties}")
        time.sleep(0.002)


def _issue(args: argparse.Namespace) -> None:
    from pki.actors import operator
    from pki.service import IssueRequest, Pki

    core = Pki.open(args.home)
    try:
        core.issuers()  # warm up: issuer rows and the HSM session before the barrier
        core.signer(core.issuing_issuer().id)
        csrs = [make_csr(f"{args.tag}{i}.svc.test") for i in range(args.count)]
        if args.barrier:
            _barrier(Path(args.barrier), "ready", args.tag, args.parties)
        first = time.time()
        serials = []
        for i, csr in enumerate(csrs):
            if args.barrier and i == len(csrs) // 2:
                _barrier(Path(args.barrier), "half", args.tag, args.parties)
            serials.append(core.issue(IssueRequest(csr, args.profile), operator(args.tag)).serial)
        last = time.time()
    finally:
        core.close()
    print(json.dumps({"serials": serials, "first": first, "last": last}))


def _crash(args: argparse.Namespace) -> NoReturn:
    import pki.issuance
    from pki.actors import operator
    from pki.service import IssueRequest, Pki

    core = Pki.open(args.home)

    def die(*_args: Any, **_kwargs: Any) -> NoReturn:
        os._exit(CRASH_EXIT)

    if args.point == "sign":
        pki.issuance.sign_end_entity = die  # type: ignore[assignment]
    else:
        core.store.complete_issuance = die  # type: ignore[method-assign]
    csr = make_csr("crash.svc.test")
    Path(args.csr_out).write_bytes(csr)
    core.issue(IssueRequest(csr, "mtls-server"), operator("crash"))
    sys.exit("the crash point was never reached: issuance completed")


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    issue = sub.add_parser("issue")
    issue.add_argument("home")
    issue.add_argument("--count", type=int, required=True)
    issue.add_argument("--tag", required=True)
    issue.add_argument("--profile", default="mtls-client")
    issue.add_argument("--barrier")
    issue.add_argument("--parties", type=int, default=1)
    crash = sub.add_parser("crash")
    crash.add_argument("home")
    crash.add_argument("--csr-out", required=True)
    crash.add_argument("--point", choices=("sign", "store"), default="sign")
    args = parser.parse_args()
    if args.mode == "issue":
        _issue(args)
    else:
        _crash(args)


if __name__ == "__main__":
    main()
