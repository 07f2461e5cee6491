"""Port forwarding (Kubernetes portforward.k8s.io).

SPDY: every forwarded connection is a pair of client-opened streams, an error
stream and a data stream, that share a `requestID` header and name the `port`.
One SPDY connection carries any number of pairs; a failing pair gets a message on
its error stream and closes alone.

WebSocket: the ports come from the request; port i uses channel 2i for data and
2i+1 for errors, and each channel starts with the port as 2 little-endian bytes.
"""
from __future__ import annotations

import logging
import socket
import struct
import threading
import time

from vmcri.streaming import spdy

log = logging.getLogger(__name__)

PROTOCOL_V1 = "portforward.k8s.io"
STREAM_DATA, STREAM_ERROR = "data", "error"
PAIR_TIMEOUT_S = 30.0
CHUNK = 32 * 1024
MAX_PAIRS = 1000


def parse_port(value: str) -> int:
    """A port header/query value; ValueError naming the problem."""
    if not value or not value.isdigit() or len(value) > 5:
        raise ValueError(f"port {value!r} is not a number")
    port = int(value)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} must be in 1-65535")
    return port


def _sendall(sock, data: bytes) -> None:
    if hasattr(sock, "sendall"):
        sock.sendall(data)
        return
    view = memoryview(data)
    while view:
        n = sock.send(view)
        if n <= 0:
            raise ConnectionError("backend connection closed")
        view = view[n:]


def forward(backend, sandbox_id: str, port: int, allowed_ports, data_in, data_out, error_out,
            label: str = "", open_sockets: set | None = None) -> None:
    """Connect to `port` in the sandbox and copy both ways until the backend closes.
    data_in: read(n) -> bytes (b"" at end); data_out/error_out: write(bytes), close().
    The backend connection sits in `open_sockets` while in use, so the owner can close
    it when the client connection goes away."""
    try:
        if allowed_ports and port not in allowed_ports:
            raise ValueError(f"port {port} is not in the PortForwardRequest ports {sorted(allowed_ports)}")
        sock = backend.port_forward(sandbox_id, port)
    except Exception as e:
        msg = f"error forwarding port {port} to pod {sandbox_id}: {e}"
        log.info("%s", msg)
        try:
            error_out.write(msg.encode())
        except (OSError, ConnectionError):
            pass
        for w in (data_out, error_out):
            try:
                w.close()
            except (OSError, ConnectionError):
                pass
        return
    if open_sockets is not None:
        open_sockets.add(sock)

    def client_to_backend():
        try:
            while True:
                data = data_in.read(CHUNK)
                if not data:
                    break
                _sendall(sock, data)
            sock.shutdown(socket.SHUT_WR)
        except Exception as e:
            log.debug("port-forward %s: client→backend ended: %s", label, e)

    up = threading.Thread(target=client_to_backend, daemon=True, name=f"pf-up-{label}")
    up.start()
    try:
        while True:
            data = sock.recv(CHUNK)
            if not data:
                break
            data_out.write(data)
    except Exception as e:
        log.debug("port-forward %s: backend→client ended: %s", label, e)
    finally:
        for w in (data_out, error_out):
            try:
                w.close()
            except (OSError, ConnectionError):
                pass
        up.join(1.0)
        if open_sockets is not None:
            open_sockets.discard(sock)
        try:
            sock.close()
        except Exception:
            pass


class _Pair:
    def __init__(self, request_id: str):
        self.request_id = request_id
        self.created = time.monotonic()
        self.data = None
        self.error = None


class SpdyPortForwarder:
    """Collects stream pairs on one SPDY connection; on_stream runs on the reader thread
    and never blocks, each complete pair runs on its own thread."""

    def __init__(self, backend, sandbox_id: str, allowed_ports=(), pair_timeout: float = PAIR_TIMEOUT_S):
        self.backend = backend
        self.sandbox_id = sandbox_id
        self.allowed_ports = set(allowed_ports)
        self.pair_timeout = pair_timeout
        self._lock = threading.Lock()
        self._pending: dict[str, _Pair] = {}
        self.active = 0
        self.open_sockets: set = set()

    @staticmethod
    def request_id(stream) -> str:
        rid = stream.header("requestid")
        if rid:
            return rid
        # old clients send no requestID: their error and data streams are consecutive
        # odd ids, error first
        if stream.header("streamtype") == STREAM_ERROR:
            return str(stream.id)
        return str(stream.id - 2)

    def on_stream(self, stream) -> bool:
        kind = stream.header("streamtype")
        if kind not in (STREAM_DATA, STREAM_ERROR):
            log.info("port-forward: refusing stream with streamType %r", kind)
            return False
        try:
            parse_port(stream.header("port"))
        except ValueError as e:
            log.info("port-forward: refusing stream: %s", e)
            return False
        rid = self.request_id(stream)
        with self._lock:
            pair = self._pending.get(rid)
            if pair is None:
                if len(self._pending) >= MAX_PAIRS:
                    return False
                pair = self._pending[rid] = _Pair(rid)
            if getattr(pair, kind) is not None:
                return False
            setattr(pair, kind, stream)
            if kind == STREAM_ERROR:
                stream.discard_input()
            complete = pair.data is not None and pair.error is not None
            if complete:
                del self._pending[rid]
        if complete:
            threading.Thread(target=self._run_pair, args=(pair,), daemon=True,
                             name=f"pf-{rid}").start()
        return True

    def _run_pair(self, pair: _Pair) -> None:
        port = parse_port(pair.data.header("port"))
        with self._lock:
            self.active += 1
        try:
            forward(self.backend, self.sandbox_id, port, self.allowed_ports, pair.data, pair.data,
                    pair.error, label=pair.request_id, open_sockets=self.open_sockets)
        finally:
            with self._lock:
                self.active -= 1

    def reap(self) -> None:
        """Pairs whose partner never came: say so on the error stream and close them."""
        now = time.monotonic()
        with self._lock:
            stale = [p for p in self._pending.values() if now - p.created >= self.pair_timeout]
            for p in stale:
                del self._pending[p.request_id]
        for p in stale:
            if p.error is not None:
                try:
                    p.error.write(b"timed out waiting for the port-forward data stream")
                except (OSError, ConnectionError):
                    pass
            for s in (p.data, p.error):
                if s is not None:
                    s.reset(spdy.CANCEL) if s is p.data else s.close()


def serve_spdy(conn_factory, backend, sandbox_id: str, allowed_ports=(), pair_timeout: float = PAIR_TIMEOUT_S):
    """Run port forwarding on a SPDY connection until the client closes it.
    conn_factory(on_stream) -> started spdy_session.Connection."""
    fwd = SpdyPortForwarder(backend, sandbox_id, allowed_ports, pair_timeout)
    conn = conn_factory(fwd.on_stream)
    while not conn.closed.wait(min(1.0, pair_timeout / 2)):
        fwd.reap()
    conn.close()
    close_all(fwd.open_sockets)


def close_all(sockets: set) -> None:
    for s in list(sockets):
        try:
            s.close()
        except Exception:
            pass


def port_prefix(port: int) -> bytes:
    return struct.pack("<H", port)
