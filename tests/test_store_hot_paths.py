"""The store's hot paths against a real SQLite home: thread-held connections, the
pre-signed OCSP memo and its WAL-index watch, and what a revocation does to stored
answers."""

from __future__ import annotations

import threading
from pathlib import Path

from cryptography.x509 import ocsp

from pki.actors import operator
from pki.audit import AuditRecord
from pki.service import Pki
from pki.store import Store
from tests.issuance_helpers import issue

ACTOR = operator("test")


def test_threads_holding_hot_connections_leave_the_pool_free(fresh_home: Path) -> None:
    """A plain-HTTP worker has 16 threads; each keeps its own reader. They must not use
    up the 15 connections of the pool the ORM reads take theirs from."""
    core = Pki.open(fresh_home)
    try:
        issuer_id = core.issuing_issuer().id
        serial = issue(core, "mtls-server").record.serial
        core.presign_ocsp(issuer_id, [serial])
        store = core.store
        errors: list[BaseException] = []
        ready = threading.Barrier(21)
        release = threading.Event()

        def reader() -> None:  # like a gthread thread: it stays alive between requests
            try:
                assert store.presigned_ocsp(serial, "sha1") is not None
                assert store.token_by_digest("0" * 64) is None
            except BaseException as exc:  # reported below
                errors.append(exc)
            ready.wait(timeout=30)
            release.wait(timeout=30)

        threads = [threading.Thread(target=reader) for _ in range(20)]
        for thread in threads:
            thread.start()
        try:
            ready.wait(timeout=30)
            assert not errors, errors
            done: list[int] = []
            probe = threading.Thread(
                target=lambda: done.append(len(store.certificates_by_serial([serial])))
            )
            probe.start()
            probe.join(timeout=10)
            assert done == [1], "an ORM read waited for a pool connection held by a thread"
        finally:
            release.set()
            for thread in threads:
                thread.join(timeout=30)
    finally:
        core.close()


def test_the_memo_keeps_its_wal_index_when_every_other_connection_closes(
    fresh_home: Path,
) -> None:
    """SQLite deletes the -shm file when the last connection closes and the next opener
    makes a new one: a memo watching the old file would serve its answer forever. The
    watch pins the file with a connection of its own."""
    first = Pki.open(fresh_home)
    issuer_id = first.issuing_issuer().id
    serial = issue(first, "mtls-server").record.serial
    first.presign_ocsp(issuer_id, [serial])
    store = Store(first.settings.database.url)
    try:
        good = store.presigned_ocsp(serial, "sha1")
        assert good is not None and store.presigned_ocsp(serial, "sha1") is good
        first.close()
        store._drop_hot_connection()  # every connection but the watch's is closed
        store.engine.dispose()
        store.read_engine.dispose()
        assert Path(str(fresh_home / "hsmca.db") + "-shm").exists()

        second = Pki.open(fresh_home)
        try:
            second.revoke(serial, "keyCompromise", ACTOR)
        finally:
            second.close()
        found = store.presigned_ocsp(serial, "sha1")
        assert found is not None and found is not good
        status = ocsp.load_der_ocsp_response(found.der).certificate_status
        assert status == ocsp.OCSPCertStatus.REVOKED
    finally:
        store.dispose()


def test_a_revocation_drops_the_stored_good_answers_in_its_transaction(fresh_home: Path) -> None:
    """Until the revocation's own answers are signed (or if signing them fails), OCSP
    must sign live rather than serve the stored "good"."""
    core = Pki.open(fresh_home)
    try:
        issuer_id = core.issuing_issuer().id
        serial = issue(core, "mtls-server").record.serial
        core.presign_ocsp(issuer_id, [serial])
        assert core.store.presigned_ocsp(serial, "sha1") is not None
        cert = core.store.certificate(serial)
        record = AuditRecord(action="certificate.revoke", actor="test", subject=serial)
        core.store.revoke(serial, "superseded", core.clock.now(), record)
        assert cert.status == "good"  # the row object read before
        assert core.store.presigned_ocsp(serial, "sha1") is None
        assert core.store.presigned_ocsp(serial, "sha256") is None
    finally:
        core.close()
