"""gunicorn ``gthread`` workers for hsmca's listeners.

* :class:`ProblemThreadWorker` answers the requests gunicorn refuses itself (a request
  line over 8190 bytes, too many headers, a broken chunk) with problem+json, never the
  HTML page gunicorn writes by default.
* :class:`TimeoutThreadWorker` (the plain-HTTP listener) also times out connections
  while reading a request: gunicorn 27 defers connections that have sent nothing, but a
  client that sends half a request holds a worker thread until it disconnects; a handful
  of such clients stalled OCSP and CRLs for everyone. Every connection gets a socket
  timeout once it is set up, so a stalled read ends after ``READ_TIMEOUT`` seconds.
"""

from __future__ import annotations

import errno
import json
import re
from typing import Any

from gunicorn import util
from gunicorn.workers.gthread import TConn, ThreadWorker

READ_TIMEOUT = 5.0


def write_problem(sock: Any, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's ``util.write_error``, answering problem+json (RFC 9457)."""
    kind = re.sub(r"[^a-z0-9]+", "-", reason.lower()).strip("-") or "error"
    body = json.dumps(
        {
            "type": f"urn:hsmca:problem:{kind}",
            "title": reason,
            "status": status_int,
            "detail": mesg or reason,
        }
    ).encode()
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n"
        f"Content-Type: application/problem+json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    util.write_nonblock(sock, head.encode("latin-1") + body)


class ProblemThreadWorker(ThreadWorker):  # type: ignore[misc]
    """``gthread`` whose own refusals are problem documents."""

    def init_process(self) -> None:
        util.write_error = write_problem  # this process is a worker: nothing else uses it
        super().init_process()


class _TimedConn(TConn):  # type: ignore[misc]
    def init(self) -> None:
        super().init()
        self.sock.settimeout(READ_TIMEOUT)


class TimeoutThreadWorker(ProblemThreadWorker):
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
