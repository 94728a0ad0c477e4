"""A tiny round-robin TCP proxy on 127.0.0.1 for the scale-out tests.

Each NEW client connection goes to the next backend in turn; bytes are relayed untouched
both ways (TLS passes through, the backend terminates it). A backend that refuses the
connection is skipped for that connection (as a load balancer's health check would), and
the refusal counted. At most ``max_connections`` connections are relayed at once (one
thread each); further clients wait in the listen backlog. :meth:`RoundRobinProxy.close`
stops accepting, closes every open connection and joins every thread.

``proxy.served`` counts connections per backend, ``proxy.history`` lists the backend
index of each connection in order, and :meth:`RoundRobinProxy.mark` /
:meth:`RoundRobinProxy.since` give the per-backend counts of one scenario.
"""

from __future__ import annotations

import contextlib
import itertools
import selectors
import socket
import threading
from collections.abc import Sequence

CONNECT_SECONDS = 5.0
#: a relayed connection that moves no byte for this long is closed
IDLE_SECONDS = 60.0
CHUNK = 64 * 1024


class RoundRobinProxy:
    """Listens on ``127.0.0.1:port`` (a free port) and spreads connections over ``backends``
    (``(host, port)`` pairs on loopback)."""

    def __init__(self, backends: Sequence[tuple[str, int]], max_connections: int = 32) -> None:
        assert backends and all(host == "127.0.0.1" for host, _ in backends), backends
        self.backends = list(backends)
        self.served = [0] * len(self.backends)
        self.refused = [0] * len(self.backends)
        self.history: list[int] = []
        self._next = itertools.cycle(range(len(self.backends)))
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_connections)
        self._stopping = threading.Event()
        self._open: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self._listener.settimeout(0.2)  # lets the accept loop notice close()
        self.port: int = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept_loop, name="rr-proxy", daemon=True)
        self._acceptor.start()

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT`` of the listener."""
        return f"127.0.0.1:{self.port}"

    def mark(self) -> list[int]:
        """The per-backend counts now (pass to :meth:`since`)."""
        with self._lock:
            return list(self.served)

    def since(self, mark: Sequence[int]) -> list[int]:
        """Connections per backend since ``mark``."""
        with self._lock:
            return [now - then for now, then in zip(self.served, mark, strict=True)]

    def close(self) -> None:
        """Stop accepting, close every relayed connection, join every thread (bounded)."""
        self._stopping.set()
        self._acceptor.join(timeout=5)
        self._listener.close()
        with self._lock:
            for sock in list(self._open):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout=5)
        assert not any(t.is_alive() for t in threads), "proxy threads still running"

    def __enter__(self) -> RoundRobinProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            if not self._slots.acquire(timeout=0.2):
                continue
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                self._slots.release()
                continue
            thread = threading.Thread(target=self._serve, args=(client,), daemon=True)
            with self._lock:
                self._threads.add(thread)
            thread.start()

    def _connect_backend(self) -> tuple[int, socket.socket] | None:
        """The next backend in turn that accepts a connection (each tried once)."""
        for _ in range(len(self.backends)):
            with self._lock:
                index = next(self._next)
            try:
                return index, socket.create_connection(self.backends[index], CONNECT_SECONDS)
            except OSError:
                with self._lock:
                    self.refused[index] += 1
        return None

    def _serve(self, client: socket.socket) -> None:
        try:
            with self._lock:
                self._open.add(client)
            found = self._connect_backend()
            if found is None:
                return
            index, backend = found
            with self._lock:
                self._open.add(backend)
                self.served[index] += 1
                self.history.append(index)
            try:
                self._relay(client, backend)
            finally:
                with self._lock:
                    self._open.discard(backend)
                backend.close()
        finally:
            with self._lock:
                self._open.discard(client)
                self._threads.discard(threading.current_thread())
            client.close()
            self._slots.release()

    def _relay(self, client: socket.socket, backend: socket.socket) -> None:
        """Copy bytes both ways until both sides have finished sending (or idle/stop)."""
        peer = {client: backend, backend: client}
        with selectors.DefaultSelector() as sel:
            for sock in peer:
                sock.setblocking(False)
                sel.register(sock, selectors.EVENT_READ)
            while sel.get_map() and not self._stopping.is_set():
                ready = sel.select(timeout=IDLE_SECONDS)
                if not ready:
                    return
                for key, _ in ready:
                    sock: socket.socket = key.fileobj  # type: ignore[assignment]
                    try:
                        data = sock.recv(CHUNK)
                    except BlockingIOError:
                        continue
                    except OSError:
                        return
                    if not data:  # this side is done sending: pass the half-close on
                        sel.unregister(sock)
                        with contextlib.suppress(OSError):
                            peer[sock].shutdown(socket.SHUT_WR)
                        continue
                    try:
                        _send_all(peer[sock], data)
                    except OSError:
                        return


def _send_all(sock: socket.socket, data: bytes) -> None:
    """``sendall`` on a non-blocking socket (waits for room, bounded by IDLE_SECONDS)."""
    view = memoryview(data)
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_WRITE)
        while view:
            try:
                sent = sock.send(view)
            except BlockingIOError:
                if not sel.select(timeout=IDLE_SECONDS):
                    raise TimeoutError("peer stopped reading") from None
                continue
            view = view[sent:]
