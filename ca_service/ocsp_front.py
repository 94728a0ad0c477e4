"""The plain-HTTP listener's front end: pre-signed OCSP answered in-loop, the rest proxied.

One single-threaded process owns the plain-HTTP port. An OCSP request (``POST /ocsp`` or
``GET /ocsp/<base64>``) that has a pre-signed answer is answered here
(:class:`pki.ocsp_presigned.PresignedResponses`: one indexed read, no HSM). Everything
else — nonce requests, misses, malformed or unauthorized requests, CRLs, CA certificates,
404s — is forwarded to the plain-HTTP Flask app, a gunicorn arbiter on a Unix socket,
which has the HSM and the full behaviour.

Connections are plain non-blocking sockets on the asyncio loop's selector (``add_reader``),
not asyncio transports: a transport, its task and futures cost ~140 us per connection,
more than the whole answer, and most OCSP clients open a connection per request. A
freshly accepted connection is read at once, so a request that arrived with the
handshake is answered without ever being registered with the selector. An idle, slow or
half-sent client holds at most ~80 KiB of request here, never a worker, and is dropped
at a deadline. A forwarded response is read whole before it is sent on (a CRL of a
million entries is 49 MB): streaming it is left to do.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import errno
import logging
import resource
import signal
import socket
import time
from pathlib import Path

from ca_service.http1 import (
    BadRequest,
    HttpDate,
    RequestHead,
    forward,
    parse_head,
    problem_response,
)
from ca_service.logs import configure_logging
from ca_service.metrics import REQUESTS
from pki.clock import SystemClock
from pki.config import load_settings
from pki.ocsp import (
    MAX_REQUEST_BYTES,
    MalformedRequest,
    OcspResult,
    decode_get_path,
    error_response,
)
from pki.ocsp_presigned import PresignedResponses
from pki.store import Store

log = logging.getLogger("hsmca.ocsp_front")

#: a request must arrive whole within this many seconds of its first byte
REQUEST_SECONDS = 10.0
#: an idle keep-alive connection is closed after this many seconds
KEEPALIVE_SECONDS = 15.0
BACKEND_SECONDS = 60.0
MAX_CONNECTIONS = 4096
ACCEPTS_PER_WAKEUP = 64
#: after a failed accept (out of descriptors) the listener rests this long
ACCEPT_PAUSE_SECONDS = 0.1
OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
RECV_BYTES = 64 * 1024
OCSP_RESPONSE = b"application/ocsp-response"
#: other bodies beyond this are refused (413) unread: the plain-HTTP app takes no more
MAX_BODY_BYTES = 64 * 1024
RENDERED_MEMO_ENTRIES = 20_000


class Front:
    """The listener: its connections, the fast path, the backend socket, the counters."""

    def __init__(self, presigned: PresignedResponses, backend: str) -> None:
        self.presigned = presigned
        self.backend = backend
        self.loop = asyncio.get_running_loop()
        self.connections: set[Connection] = set()
        self.http_date = HttpDate()
        self.answered = {b"GET": 0, b"POST": 0}
        self.forwarded = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self._counted = dict(self.answered)
        self._rendered: dict[bytes, bytes] = {}
        # the labels the Flask app uses for the same requests
        self._counters = {
            b"GET": REQUESTS.labels("/ocsp/<path:encoded>", "GET", "200"),
            b"POST": REQUESTS.labels("/ocsp", "POST", "200"),
        }

    @staticmethod
    def is_ocsp_post(head: RequestHead) -> bool:
        return head.method == b"POST" and head.target.split(b"?", 1)[0] in (b"/ocsp", b"/ocsp/")

    def fast_answer(self, head: RequestHead, body: bytes) -> OcspResult | None:
        """The pre-signed answer to an OCSP request, or None: forward it."""
        path = head.target.split(b"?", 1)[0]
        if self.is_ocsp_post(head):
            der = body
        elif head.method == b"GET" and path.startswith(b"/ocsp/"):
            try:
                der = decode_get_path(path[len(b"/ocsp/") :].decode("latin-1"))
            except MalformedRequest:
                return None
        else:
            return None
        try:
            result = self.presigned.answer(der)
        except Exception:  # the database, say: the full path answers (or says why not)
            log.exception("pre-signed look-up failed; forwarding")
            return None
        if result is not None:
            self.answered[head.method] += 1
        return result

    def fixed_headers(self, result: OcspResult) -> bytes:
        """The header lines that depend on the response alone, rendered once for each."""
        rendered = self._rendered.get(result.der)
        if rendered is None:
            lines = [b"Content-Type: " + OCSP_RESPONSE, b"Content-Length: %d" % len(result.der)]
            lines += [f"{k}: {v}".encode() for k, v in result.validator_headers()]
            rendered = b"\r\n".join(lines) + b"\r\n"
            if len(self._rendered) >= RENDERED_MEMO_ENTRIES:
                self._rendered.clear()
            self._rendered[result.der] = rendered
        return rendered

    def accept(self, listener: socket.socket) -> None:
        """Accept what is waiting and answer what already arrived with it."""
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno not in OUT_OF_RESOURCES:
                    continue  # that client is gone (ECONNABORTED ...): take the next
                # out of descriptors or memory: rest, or the readable listener would spin
                log.warning("accept failed", extra={"error": exc.strerror})
                fd = listener.fileno()
                self.loop.remove_reader(fd)
                self.loop.call_later(
                    ACCEPT_PAUSE_SECONDS, self.loop.add_reader, fd, self.accept, listener
                )
                return
            if len(self.connections) >= MAX_CONNECTIONS:
                sock.close()
                continue
            sock.setblocking(False)
            conn = Connection(self, sock, peer[0])
            self.connections.add(conn)
            conn.on_readable()

    def sweep(self) -> None:
        """Once a second: drop connections past a deadline, publish the counters."""
        now = time.monotonic()
        for conn in list(self.connections):
            conn.expire(now)
        for method, count in self.answered.items():
            if count != self._counted[method]:
                self._counters[method].inc(count - self._counted[method])
                self._counted[method] = count

    def close_all(self) -> None:
        for conn in list(self.connections):
            conn.close()


class Connection:
    """One client socket: requests are read, answered and forwarded strictly in order.

    The socket is registered for reading only while a request may come (not while one
    is forwarded or a response waits to be sent), and for writing only while a response
    waits: a client that does not read its answers stops being read."""

    def __init__(self, front: Front, sock: socket.socket, peer: str) -> None:
        self.front = front
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.buffer = bytearray()
        self.out = memoryview(b"")  # what the socket has not taken yet
        self.reading = self.writing = False
        self.busy = False  # a request is being forwarded
        self.closed = self.close_after_send = False
        self.continue_sent = self.nodelay = False
        self.discarding = 0  # bytes of a refused body still to be read and dropped
        self.last_active = time.monotonic()
        self.request_started: float | None = None

    # -- selector callbacks ---------------------------------------------------------------

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            self._update_interest()
            return
        except OSError:
            self.close()
            return
        if not data:
            self.close()
            return
        now = time.monotonic()
        self.last_active = now
        if self.discarding:  # the rest of an oversized body
            dropped = min(len(data), self.discarding)
            self.discarding -= dropped
            data = data[dropped:]
            if self.discarding:
                return
        if self.request_started is None and (data or self.buffer):
            self.request_started = now
        self.buffer += data
        self._process()

    def on_writable(self) -> None:
        self._flush()
        if not self.out and not self.closed:
            if self.close_after_send:
                self.close()
                return
            self._process()

    def expire(self, now: float) -> None:
        if self.busy or self.closed:
            return
        if self.out:  # sending: only a client that stopped reading is dropped
            if now - self.last_active > KEEPALIVE_SECONDS:
                self.close()
            return
        started = self.request_started
        if (started is not None and now - started > REQUEST_SECONDS) or (
            started is None and now - self.last_active > KEEPALIVE_SECONDS
        ):
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        loop = self.front.loop
        if self.reading:
            loop.remove_reader(self.fd)
        if self.writing:
            loop.remove_writer(self.fd)
        self.reading = self.writing = False
        self.sock.close()
        self.front.connections.discard(self)

    # -- requests -------------------------------------------------------------------------

    def _process(self) -> None:
        while self.buffer and not (self.busy or self.out or self.closed or self.close_after_send):
            try:
                head = parse_head(self.buffer)
            except BadRequest as exc:
                self._send(problem_response(exc.status, exc.detail, self.front.http_date()))
                self.close_after_send = True
                break
            if head is None:
                break
            if head.content_length > MAX_REQUEST_BYTES and self.front.is_ocsp_post(head):
                self._refuse_oversized_ocsp(head)
                continue
            if head.content_length > MAX_BODY_BYTES:
                detail = f"request body over {MAX_BODY_BYTES} bytes"
                self._send(problem_response(413, detail, self.front.http_date()))
                self.close_after_send = True
                break
            total = head.size + head.content_length
            if len(self.buffer) < total:
                if head.expects_continue and head.version == b"HTTP/1.1" and not self.continue_sent:
                    self.continue_sent = True
                    self._send(b"HTTP/1.1 100 Continue\r\n\r\n")
                break
            body = bytes(self.buffer[head.size : total])
            del self.buffer[:total]
            self.continue_sent = False
            self.request_started = time.monotonic() if self.buffer else None
            result = self.front.fast_answer(head, body)
            if result is not None:
                self._send_ocsp(result, head)
            else:
                self.busy = True
                task = self.front.loop.create_task(self._forward(head, body))
                self.front.tasks.add(task)  # the loop keeps only weak references
        if self.close_after_send and not self.out:
            self.close()
            return
        self._update_interest()

    def _refuse_oversized_ocsp(self, head: RequestHead) -> None:
        """malformedRequest (RFC 6960 appendix A: no request is that large) at once; the
        body is discarded as it arrives instead of being buffered, and the connection
        goes on with whatever follows it."""
        del self.buffer[: head.size]
        dropped = min(len(self.buffer), head.content_length)
        del self.buffer[:dropped]
        self.discarding = head.content_length - dropped
        self._send_ocsp(OcspResult(error_response("malformed_request")), head)

    async def _forward(self, head: RequestHead, body: bytes) -> None:
        keep_alive = False
        try:
            response = await asyncio.wait_for(
                forward(self.front.backend, head, body, self.peer), BACKEND_SECONDS
            )
        except Exception as exc:  # OSError, TimeoutError, a broken response: all a 502
            log.warning("plain-HTTP backend unavailable", extra={"error": type(exc).__name__})
            detail = "the plain-HTTP backend did not answer; retry shortly"
            data = problem_response(502, detail, self.front.http_date())
        else:
            self.front.forwarded += 1
            keep_alive = head.keep_alive and response.delimited
            data = response.head + _connection_header(head, keep_alive) + b"\r\n" + response.body
        finally:
            self.busy = False
            self.front.tasks.discard(asyncio.current_task())  # type: ignore[arg-type]
        if self.closed:
            return
        self.close_after_send = not keep_alive
        self._send(data)
        self._process()

    # -- responses ------------------------------------------------------------------------

    def _send_ocsp(self, result: OcspResult, request: RequestHead) -> None:
        head = b"HTTP/1.1 200 OK\r\nDate: %s\r\nCache-Control: %s\r\n%s%s" % (
            self.front.http_date(),
            result.cache_control(_now()).encode(),
            self.front.fixed_headers(result),
            _connection_header(request, request.keep_alive),
        )
        if not request.keep_alive:
            self.close_after_send = True
        elif not self.nodelay:  # a response may follow a response: do not wait for ACKs
            self.nodelay = True
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._send(head + b"\r\n" + result.der)

    def _send(self, data: bytes) -> None:
        self.out = memoryview(bytes(self.out) + data if self.out else data)
        self._flush()

    def _flush(self) -> None:
        if self.closed or not self.out:
            return
        try:
            sent = self.sock.send(self.out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.close()
            return
        if sent:
            self.last_active = time.monotonic()
            if self.request_started is not None:  # a pipelined request waited on this
                self.request_started = self.last_active
        self.out = self.out[sent:]
        self._update_interest()

    def _update_interest(self) -> None:
        if self.closed:
            return
        loop = self.front.loop
        want_write = bool(self.out)
        want_read = not (want_write or self.busy or self.close_after_send)
        if want_read and not self.reading:
            loop.add_reader(self.fd, self.on_readable)
        elif self.reading and not want_read:
            loop.remove_reader(self.fd)
        if want_write and not self.writing:
            loop.add_writer(self.fd, self.on_writable)
        elif self.writing and not want_write:
            loop.remove_writer(self.fd)
        self.reading, self.writing = want_read, want_write


def _connection_header(request: RequestHead, keep_alive: bool) -> bytes:
    """The Connection header line a response needs: ``close`` when the connection ends,
    ``keep-alive`` when an HTTP/1.0 client's connection is kept (RFC 9112 C.2.2)."""
    if not keep_alive:
        return b"Connection: close\r\n"
    return b"Connection: keep-alive\r\n" if request.version == b"HTTP/1.0" else b""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=1024)
    sock.setblocking(False)
    return sock


def _raise_descriptor_limit() -> None:
    """Allow MAX_CONNECTIONS open sockets where the hard limit permits (the usual soft
    limit of 1024 would refuse connections long before)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = MAX_CONNECTIONS + 64
    if soft != resource.RLIM_INFINITY and soft < wanted:
        limit = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))


async def run_front(home: Path, host: str, port: int, backend: str) -> None:
    """Serve until SIGTERM or SIGINT."""
    _raise_descriptor_limit()
    settings = load_settings(home)
    store = Store(settings.database.url, SystemClock(), settings.database.busy_timeout_seconds)
    front = Front(PresignedResponses(store, SystemClock()), backend)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        front.loop.add_signal_handler(signum, stop.set)
    listener = listening_socket(host, port)
    front.loop.add_reader(listener.fileno(), front.accept, listener)
    log.info("ocsp front end listening", extra={"host": host, "port": port})
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            front.sweep()
    finally:
        front.loop.remove_reader(listener.fileno())
        listener.close()
        front.close_all()
        front.sweep()
        store.dispose()
        log.info(
            "ocsp front end stopped",
            extra={"answered": sum(front.answered.values()), "forwarded": front.forwarded},
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="hsmca plain-HTTP front end (hsmca serve)")
    parser.add_argument("--home", required=True, type=Path)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--backend", required=True, help="Unix socket of the plain-HTTP app")
    args = parser.parse_args(argv)
    configure_logging(load_settings(args.home).server.log_level)
    asyncio.run(run_front(args.home, args.host, args.port, args.backend))


if __name__ == "__main__":
    main()
