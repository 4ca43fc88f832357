"""A TCP proxy on 127.0.0.1 that can be killed and restarted: the object store "dies" and comes back.

moto keeps its buckets in memory, so killing moto itself would lose the data a rerun needs.
Killing this proxy in front of it is, for the client, the object store going down mid-request
(open connections are reset, new ones refused) while the stored data survives. ``freeze()`` is
a server that hangs instead: connections stay open and accepted, no byte is answered.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class KillableProxy:
    """Forwards 127.0.0.1:<port> to a target; ``kill()`` resets everything, ``start()`` serves again,
    ``freeze()`` holds every byte until ``thaw()``."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._listener: socket.socket | None = None
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()
        self._frozen = threading.Event()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def kill(self) -> None:
        """Close the listener and reset every open connection (like a crashed server)."""
        with self._lock:
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            for conn in self._connections:
                try:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    conn.close()
                except OSError:
                    pass
            self._connections.clear()

    def freeze(self) -> None:
        """Stop forwarding (both ways) without closing anything: the client waits for an answer."""
        self._frozen.set()

    def thaw(self) -> None:
        """Forward again, held bytes first."""
        self._frozen.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._connections += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                while self._frozen.is_set():
                    time.sleep(0.05)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.close()
