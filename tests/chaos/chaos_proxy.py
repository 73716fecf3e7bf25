"""A TCP proxy in front of PostgreSQL that a chaos test controls: it can cut
every connection at once, or stop forwarding for a while (a network that
silently drops packets) and then cut them."""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field

_CHUNK = 65536


@dataclass
class _Pair:
    client: socket.socket
    server: socket.socket
    sockets: tuple[socket.socket, socket.socket] = field(init=False)

    def __post_init__(self) -> None:
        self.sockets = (self.client, self.server)

    def other(self, sock: socket.socket) -> socket.socket:
        return self.server if sock is self.client else self.client

    def close(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class PgProxy:
    """Listens on 127.0.0.1 (port chosen when 0) and forwards each connection to
    PostgreSQL at `host` (a name, or the folder of its Unix socket) and `port`."""

    def __init__(self, host: str, port: int, *, listen_port: int = 0) -> None:
        self.host = host
        self.port = port
        self._listener = socket.create_server(("127.0.0.1", listen_port))
        self._listener.setblocking(False)
        self.listen_port = self._listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._pairs: dict[socket.socket, _Pair] = {}
        self._lock = threading.Lock()
        self._paused_until = 0.0
        self._cut = threading.Event()
        self._stop = threading.Event()
        self.connections_cut = 0
        self.blackholes = 0
        self._thread = threading.Thread(target=self._serve, name="pg-proxy", daemon=True)

    def __enter__(self) -> PgProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        with self._lock:
            for pair in {id(p): p for p in self._pairs.values()}.values():
                pair.close()
            self._pairs.clear()
        self._listener.close()
        self._selector.close()

    def url(self, dbname: str, user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.listen_port}/{dbname}"

    def cut_all(self) -> None:
        """Reset every connection now, mid-transaction or not."""
        self._cut.set()

    def blackhole(self, seconds: float) -> None:
        """Forward nothing for `seconds` (both ways, connections kept open), then
        cut every connection, as a partition that ends in resets."""
        with self._lock:
            self._paused_until = time.monotonic() + seconds
            self.blackholes += 1

    def _open_upstream(self) -> socket.socket:
        if self.host.startswith("/"):
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(f"{self.host}/.s.PGSQL.{self.port}")
            return upstream
        return socket.create_connection((self.host, self.port))

    def _serve(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                paused = time.monotonic() < self._paused_until
                ended_pause = not paused and self._paused_until > 0
                if ended_pause:
                    self._paused_until = 0.0
            if self._cut.is_set() or ended_pause:
                self._cut.clear()
                self._cut_pairs()
            for key, _ in self._selector.select(timeout=0.05):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self._listener:
                    self._accept()
                elif not paused:
                    self._forward(sock)
            if paused:
                time.sleep(0.01)

    def _accept(self) -> None:
        with contextlib.suppress(BlockingIOError):
            client, _ = self._listener.accept()
            try:
                upstream = self._open_upstream()
            except OSError:
                client.close()
                return
            pair = _Pair(client, upstream)
            with self._lock:
                for sock in pair.sockets:
                    sock.setblocking(False)
                    self._pairs[sock] = pair
                    self._selector.register(sock, selectors.EVENT_READ)

    def _forward(self, sock: socket.socket) -> None:
        pair = self._pairs.get(sock)
        if pair is None:
            return
        try:
            data = sock.recv(_CHUNK)
            if not data:
                raise ConnectionResetError
            target = pair.other(sock)
            target.setblocking(True)
            target.sendall(data)
            target.setblocking(False)
        except OSError:
            self._drop(pair)

    def _cut_pairs(self) -> None:
        with self._lock:
            pairs = {id(p): p for p in self._pairs.values()}.values()
            count = len(pairs)
        for pair in list(pairs):
            self._drop(pair)
        self.connections_cut += count

    def _drop(self, pair: _Pair) -> None:
        with self._lock:
            for sock in pair.sockets:
                if self._pairs.pop(sock, None) is not None:
                    with contextlib.suppress(KeyError, ValueError):
                        self._selector.unregister(sock)
        pair.close()
