"""A gunicorn ``gthread`` worker whose connections time out while reading a request.

gunicorn 27 defers connections that have sent nothing, but a client that sends half a
request holds a worker thread until it disconnects; a handful of such clients stalled
OCSP and CRLs for everyone. Here every connection gets a socket timeout once it is
set up, so a stalled read ends after ``READ_TIMEOUT`` seconds and frees the thread.
"""

from __future__ import annotations

import errno
from typing import Any

from gunicorn.workers.gthread import TConn, ThreadWorker

READ_TIMEOUT = 5.0


class _TimedConn(TConn):  # type: ignore[misc]
    def init(self) -> None:
        super().init()
        self.sock.settimeout(READ_TIMEOUT)


class TimeoutThreadWorker(ThreadWorker):  # type: ignore[misc]
    """``gthread`` with a per-read timeout on client connections."""

    def accept(self, listener: Any) -> None:
        try:
            client_sock, client_addr = listener.accept()
            self.nr_conns += 1
            client_sock.setblocking(True)
            conn = _TimedConn(self.cfg, client_sock, client_addr, listener.getsockname())
            self.enqueue_req(conn)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
