"""Kubernetes channel protocols over WebSocket (through wsproto).

Each message starts with a channel byte (0 stdin, 1 stdout, 2 stderr, 3 error,
4 resize for exec/attach). Binary protocols carry it raw; the base64 ones send
text frames whose first character is the channel digit and the rest base64.
v5.channel.k8s.io adds the CLOSE signal: a message [255, channel] half-closes
that channel (stdin EOF).
"""
from __future__ import annotations

import base64
import binascii
import logging
import socket
import threading
import time

from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (AcceptConnection, BytesMessage, CloseConnection, Ping,
                            RejectConnection, RejectData, Request, TextMessage)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from vmcri.streaming import remotecommand as rc
from vmcri.streaming.portforward import PROTOCOL_V1 as PF_PROTOCOL
from vmcri.streaming.portforward import close_all, forward, port_prefix
from vmcri.streaming.spdy import ByteBuffer

log = logging.getLogger(__name__)

V5 = "v5.channel.k8s.io"
V4_BASE64 = "v4.base64.channel.k8s.io"
BASE64 = "base64.channel.k8s.io"
CLOSE_SIGNAL = 255
MAX_MESSAGE_BYTES = 16 << 20

# protocol -> (binary framing, errors as metav1.Status, CLOSE signal)
EXEC_PROTOCOLS = {
    V5: (True, True, True),
    rc.V4: (True, True, False),
    V4_BASE64: (False, True, False),
    rc.V3: (True, False, False),
    rc.V2: (True, False, False),
    rc.V1: (True, False, False),
    BASE64: (False, False, False),
    "": (True, False, False),
}
# SPDY tunnelled through WebSocket binary messages (client-go's SPDYOverWebsocketDialer,
# used by `crictl port-forward --transport websocket` and kubectl 1.31+)
SPDY_TUNNEL_PORTFORWARD = "SPDY/3.1+" + PF_PROTOCOL
PORTFORWARD_PROTOCOLS = {
    rc.V4: (True, False, False),
    V4_BASE64: (False, False, False),
    PF_PROTOCOL: (True, False, False),
    SPDY_TUNNEL_PORTFORWARD: (True, False, False),
    "": (True, False, False),
}
STDIN, STDOUT, STDERR, ERROR, RESIZE = range(5)


def choose_protocol(offered: list[str], supported: dict) -> str | None:
    """The client's first offered protocol we support; "" when it offered none."""
    if not offered:
        return ""
    for p in offered:
        if p in supported and p:
            return p
    return None


class WSChannels:
    """One accepted WebSocket: a reader thread demultiplexes channels into buffers."""

    def __init__(self, sock: socket.socket, ws: WSConnection, protocol: str, binary: bool,
                 close_signal: bool, readable: set[int], idle_timeout: float | None = None):
        self.sock, self.ws = sock, ws
        try:   # message tails must not wait for the peer's delayed ACK (Nagle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self.protocol = protocol
        self.binary = binary
        self.close_signal = close_signal
        self.inputs = {ch: ByteBuffer() for ch in readable}
        self.idle_timeout = idle_timeout
        self._wlock = threading.Lock()
        self.closed = threading.Event()
        self.last_activity = time.monotonic()

    def start(self) -> "WSChannels":
        threading.Thread(target=self._read_loop, daemon=True, name="ws-reader").start()
        return self

    # -- sending ----------------------------------------------------------------------
    def _send_event(self, event) -> None:
        with self._wlock:
            if self.closed.is_set() or self.ws.state != ConnectionState.OPEN:
                raise ConnectionError("websocket closed")
            self.sock.sendall(self.ws.send(event))
            self.last_activity = time.monotonic()

    def send(self, channel: int, data: bytes) -> None:
        if self.binary:
            self._send_event(BytesMessage(data=bytes([channel]) + data))
        else:
            self._send_event(TextMessage(data=chr(ord("0") + channel) + base64.b64encode(data).decode()))

    def writer(self, channel: int) -> "ChannelWriter":
        return ChannelWriter(self, channel)

    def close(self, code: int = 1000, reason: str = "") -> None:
        with self._wlock:
            if self.ws.state == ConnectionState.OPEN:
                try:
                    self.sock.sendall(self.ws.send(CloseConnection(code=code, reason=reason)))
                except (OSError, LocalProtocolError):
                    pass
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.closed.wait(5.0)   # let the peer read everything and answer the close
        self._teardown()

    def _teardown(self) -> None:
        self.closed.set()
        for buf in self.inputs.values():
            buf.close()
        try:
            self.sock.close()
        except OSError:
            pass

    # -- receiving --------------------------------------------------------------------
    def _read_loop(self) -> None:
        self.sock.settimeout(self.idle_timeout)
        parts: list = []
        size = 0
        try:
            while not self.closed.is_set():
                try:
                    data = self.sock.recv(65536)
                except socket.timeout:
                    if time.monotonic() - self.last_activity >= (self.idle_timeout or 0):
                        log.info("websocket idle for %.0fs, closing", self.idle_timeout)
                        break
                    continue
                self.last_activity = time.monotonic()
                self.ws.receive_data(data or None)
                for ev in self.ws.events():
                    if isinstance(ev, (BytesMessage, TextMessage)):
                        parts.append(ev.data)
                        size += len(ev.data)
                        if size > MAX_MESSAGE_BYTES:
                            self._send_close_quietly(1009, "message too big")
                            return
                        if ev.message_finished:
                            whole = (b"" if isinstance(ev, BytesMessage) else "").join(parts)
                            parts, size = [], 0
                            self._dispatch(whole)
                    elif isinstance(ev, Ping):
                        with self._wlock:
                            self.sock.sendall(self.ws.send(ev.response()))
                    elif isinstance(ev, CloseConnection):
                        self._send_close_quietly(ev.code, "")
                        return
                if not data:
                    return
        except (OSError, RemoteProtocolError, LocalProtocolError) as e:
            log.debug("websocket reader ended: %s", e)
        finally:
            self._teardown()

    def _send_close_quietly(self, code: int, reason: str) -> None:
        with self._wlock:
            if self.ws.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
                try:
                    self.sock.sendall(self.ws.send(CloseConnection(code=code, reason=reason)))
                except (OSError, LocalProtocolError):
                    pass

    def _dispatch(self, msg) -> None:
        if isinstance(msg, str):
            if not msg:
                return
            channel = ord(msg[0]) - ord("0")
            try:
                payload = base64.b64decode(msg[1:], validate=True)
            except (binascii.Error, ValueError):
                log.info("websocket: dropping a message that is not base64")
                return
        else:
            if not msg:
                return
            channel, payload = msg[0], msg[1:]
        if channel == CLOSE_SIGNAL and self.close_signal:
            if payload and payload[0] in self.inputs:
                self.inputs[payload[0]].close()
            return
        buf = self.inputs.get(channel)
        if buf is not None and payload:
            buf.feed(payload)


class ChannelWriter:
    def __init__(self, conn: WSChannels, channel: int):
        self.conn, self.channel = conn, channel

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:   # bounded messages keep clients' buffers small
            self.conn.send(self.channel, bytes(view[:rc.READ_CHUNK]))
            view = view[rc.READ_CHUNK:]

    def close(self) -> None:
        pass   # channels have no half-close towards the client


def accept(sock: socket.socket, request_head: bytes, supported: dict):
    """Finish the WebSocket handshake; (WSConnection, protocol) or None after a rejection."""
    ws = WSConnection(ConnectionType.SERVER)
    ws.receive_data(request_head)
    req = next((e for e in ws.events() if isinstance(e, Request)), None)
    if req is None:
        return None
    protocol = choose_protocol(list(req.subprotocols), supported)
    if protocol is None:
        body = (f"requested protocol(s) are not supported: {list(req.subprotocols)}; "
                f"supports {[p for p in supported if p]}").encode()
        sock.sendall(ws.send(RejectConnection(status_code=400, has_body=True,
                                              headers=[(b"content-type", b"text/plain"),
                                                       (b"content-length", str(len(body)).encode())]))
                     + ws.send(RejectData(data=body)))
        return None
    sock.sendall(ws.send(AcceptConnection(subprotocol=protocol or None)))
    return ws, protocol


def serve_exec(sock, ws, protocol: str, start, stdin: bool, stdout: bool, stderr: bool, tty: bool,
               idle_timeout: float | None, report_exit_code: bool = True) -> None:
    binary, _status, close_signal = EXEC_PROTOCOLS[protocol]
    readable = {STDIN, RESIZE} if stdin else {RESIZE}
    ch = WSChannels(sock, ws, protocol, binary, close_signal, readable, idle_timeout).start()
    # the plain-text protocols report errors as text, the v4/v5 ones as a Status
    status_protocol = protocol if protocol.startswith(("v4.", "v5.")) else rc.V1
    io = rc.SessionIO(status_protocol,
                      stdin=ch.inputs[STDIN] if stdin else None,
                      stdout=ch.writer(STDOUT) if stdout else None,
                      stderr=ch.writer(STDERR) if stderr and not tty else None,
                      error=ch.writer(ERROR),
                      resize=ch.inputs[RESIZE] if tty else None)
    watcher = threading.Thread(target=lambda: (ch.closed.wait(), io.gone.set()), daemon=True)
    watcher.start()
    rc.run_session(start, io, report_exit_code)
    ch.close()


def serve_port_forward(sock, ws, protocol: str, backend, sandbox_id: str, ports: list[int],
                       idle_timeout: float | None) -> None:
    binary, _, _ = PORTFORWARD_PROTOCOLS[protocol]
    ch = WSChannels(sock, ws, protocol, binary, False, {2 * i for i in range(len(ports))},
                    idle_timeout).start()
    workers = []
    backends: set = set()
    for i, port in enumerate(ports):
        data_w, err_w = ch.writer(2 * i), ch.writer(2 * i + 1)
        try:
            data_w.write(port_prefix(port))
            err_w.write(port_prefix(port))
        except (OSError, ConnectionError):
            break
        t = threading.Thread(target=forward, daemon=True, name=f"wspf-{port}",
                             args=(backend, sandbox_id, port, (), ch.inputs[2 * i], data_w, err_w, str(port), backends))
        t.start()
        workers.append(t)
    for t in workers:
        while t.is_alive() and not ch.closed.is_set():
            t.join(1.0)
    ch.close()
    close_all(backends)


class WSByteStream:
    """A socket-like byte stream over binary WebSocket messages, for a SPDY connection
    tunnelled through WebSocket: message boundaries mean nothing, text is refused."""

    def __init__(self, sock: socket.socket, ws: WSConnection):
        self.sock, self.ws = sock, ws
        self._buf = bytearray()
        self._eof = False
        self._wlock = threading.Lock()

    def settimeout(self, t) -> None:
        self.sock.settimeout(t)

    def setsockopt(self, *args) -> None:
        self.sock.setsockopt(*args)

    def recv(self, n: int) -> bytes:
        while not self._buf and not self._eof:
            data = self.sock.recv(65536)
            try:
                self.ws.receive_data(data or None)
                events = list(self.ws.events())
            except RemoteProtocolError as e:
                raise ConnectionError(f"websocket: {e}") from e
            for ev in events:
                if isinstance(ev, BytesMessage):
                    self._buf += ev.data
                elif isinstance(ev, TextMessage):
                    raise ConnectionError("websocket: text message in a SPDY tunnel")
                elif isinstance(ev, Ping):
                    with self._wlock:
                        self.sock.sendall(self.ws.send(ev.response()))
                elif isinstance(ev, CloseConnection):
                    with self._wlock:
                        if self.ws.state == ConnectionState.REMOTE_CLOSING:
                            self.sock.sendall(self.ws.send(ev.response()))
                    self._eof = True
            if not data:
                self._eof = True
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def sendall(self, data: bytes) -> None:
        with self._wlock:
            if self.ws.state != ConnectionState.OPEN:
                raise ConnectionError("websocket closed")
            self.sock.sendall(self.ws.send(BytesMessage(data=bytes(data))))

    def shutdown(self, how: int) -> None:
        if how in (socket.SHUT_WR, socket.SHUT_RDWR):
            with self._wlock:
                if self.ws.state == ConnectionState.OPEN:
                    try:
                        self.sock.sendall(self.ws.send(CloseConnection(code=1000)))
                    except (OSError, LocalProtocolError):
                        pass
        self.sock.shutdown(how)

    def close(self) -> None:
        self.sock.close()
