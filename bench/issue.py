"""In-process issuance rate through the real use-case vs the bare pipeline.

Both run in this process, against one SoftHSM2 token in a temporary home:

* bare pipeline: CSR parse + signature check, certificate build, HSM signature (P-256),
  DER encoding; no database, no policy, no audit;
* hsmca: ``Pki.issue`` — policy, lint before sign (pkilint on a throwaway-key copy,
  ``ca.lint_before_sign``, on by default), record-before-sign in SQLite (WAL), HSM
  signature, signed DER stored, audit event appended, record returned;
* hsmca without lint: the same with ``ca.lint_before_sign = false``, to show its cost.

Prints certificates/s for each, their ratios (goal: >= 0.5) and what linting costs per
certificate. Bounded by --count and --seconds; the phases alternate in rounds of 100 so
all see the same load.
Reference: django-ca issued 341 certs/s in-process with a SoftHSM2 key here.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import tempfile
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pki.actors import operator
from pki.bootstrap import initialise
from pki.policy import parse_csr
from pki.serials import new_serial
from pki.service import IssueRequest, Pki
from pki.signer import EndEntityRequest, build_end_entity, end_entity_subject

ROUND = 100


def make_csrs(count: int) -> list[bytes]:
    csrs = []
    for i in range(count):
        key = ec.generate_private_key(ec.SECP256R1())
        name = f"host{i}.bench.test"
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256())
        )
        csrs.append(csr.public_bytes(serialization.Encoding.PEM))
    return csrs


def bare_pipeline(pki: Pki, csrs: list[bytes], seconds: float) -> tuple[int, float]:
    issuer = pki.signer(pki.issuing_issuer().id)
    profile = pki.profiles.get("mtls-server")
    done, start = 0, time.perf_counter()
    for csr in csrs:
        parsed = parse_csr(csr, pki.settings.policy)
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        cert = build_end_entity(
            issuer,
            EndEntityRequest(
                serial=new_serial(),
                subject=end_entity_subject(parsed.names, parsed.common_name),
                names=parsed.names,
                public_key=parsed.public_key,
                not_before=now - dt.timedelta(seconds=60),
                not_after=now + profile.default_ttl,
                profile=profile,
            ),
            pki.urls,
        )
        cert.public_bytes(serialization.Encoding.DER)
        done += 1
        if time.perf_counter() - start > seconds:
            break
    return done, time.perf_counter() - start


def full_use_case(pki: Pki, csrs: list[bytes], seconds: float) -> tuple[int, float]:
    actor = operator("bench")
    done, start = 0, time.perf_counter()
    for csr in csrs:
        pki.issue(IssueRequest(csr, "mtls-server"), actor)
        done += 1
        if time.perf_counter() - start > seconds:
            break
    return done, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=3000, help="certificates per phase")
    parser.add_argument("--seconds", type=float, default=10.0, help="time cap per phase")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="hsmca-bench-") as tmp:
        home = Path(tmp)
        initialise(home, "Bench")
        pki = Pki.open(home)
        unlinted = Pki.open(home)
        unlinted.settings = dataclasses.replace(
            unlinted.settings,
            ca=dataclasses.replace(unlinted.settings.ca, lint_before_sign=False),
        )
        assert pki.settings.ca.lint_before_sign, "lint before sign is on by default"
        csrs = make_csrs(args.count)
        # warm-up: log in, cache key handles, prime the SQLite connection pool, import pkilint
        bare_pipeline(pki, csrs[:50], 5)
        full_use_case(pki, make_csrs(50), 5)
        full_use_case(unlinted, make_csrs(50), 5)
        # alternate rounds so all phases see the same machine load
        counts = {"bare": 0, "full": 0, "nolint": 0}
        times = dict.fromkeys(counts, 0.0)
        deadline = time.monotonic() + 3 * args.seconds
        for i in range(0, len(csrs), ROUND):
            chunk = csrs[i : i + ROUND]
            for phase, (n, t) in (
                ("bare", bare_pipeline(pki, chunk, args.seconds)),
                ("full", full_use_case(pki, chunk, args.seconds)),
                ("nolint", full_use_case(unlinted, make_csrs(len(chunk)), args.seconds)),
            ):
                counts[phase] += n
                times[phase] += t
            if time.monotonic() > deadline:
                break
        unlinted.close()
        pki.close()
    bare, full, nolint = (counts[p] / times[p] for p in ("bare", "full", "nolint"))
    lint_ms = (1 / full - 1 / nolint) * 1000
    result = {
        "bare_pipeline_certs_per_s": round(bare, 1),
        "hsmca_issue_certs_per_s": round(full, 1),
        "hsmca_issue_without_lint_certs_per_s": round(nolint, 1),
        "ratio": round(full / bare, 3),
        "ratio_without_lint": round(nolint / bare, 3),
        "lint_ms_per_certificate": round(lint_ms, 2),
        "goal_ratio": 0.5,
        "counts": counts,
        "reference_django_ca_certs_per_s": 341,
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"bare pipeline (parse+verify, build, HSM sign, DER): {bare:8.1f} certs/s")
    print(f"hsmca Pki.issue (policy, lint, pending row, sign, store, audit): {full:8.1f} certs/s")
    print(f"hsmca Pki.issue with ca.lint_before_sign = false:   {nolint:8.1f} certs/s")
    print(f"lint before sign costs {lint_ms:.2f} ms per certificate")
    print(
        f"ratio: {full / bare:.3f} with lint, {nolint / bare:.3f} without "
        "(goal >= 0.5); django-ca reference: 341 certs/s"
    )
    print("PASS" if full / bare >= 0.5 else "BELOW GOAL")


if __name__ == "__main__":
    main()
