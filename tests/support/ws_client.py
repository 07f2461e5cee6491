"""A WebSocket client for the CRI streaming URLs (channel protocols), over wsproto."""
from __future__ import annotations

import base64
import json
import socket
from urllib.parse import urlsplit

from wsproto import ConnectionType, WSConnection
from wsproto.events import (AcceptConnection, BytesMessage, CloseConnection, Ping, RejectConnection,
                            RejectData, Request, TextMessage)


class WSRejected(Exception):
    def __init__(self, status: int, body: bytes):
        super().__init__(f"websocket rejected: HTTP {status}: {body!r}")
        self.status, self.body = status, body


class WSClient:
    def __init__(self, url: str, protocols: list[str], timeout: float = 30.0):
        u = urlsplit(url)
        self.sock = socket.create_connection((u.hostname, u.port), timeout=timeout)
        self.ws = WSConnection(ConnectionType.CLIENT)
        target = u.path + (f"?{u.query}" if u.query else "")
        self.sock.sendall(self.ws.send(Request(host=u.netloc, target=target, subprotocols=protocols)))
        self.protocol = None
        self.closed = False
        self._pending = []
        body = b""
        while True:
            evs = self._pump()
            for i, ev in enumerate(evs):
                if isinstance(ev, AcceptConnection):
                    self.protocol = ev.subprotocol
                    self._pending = evs[i + 1:]   # messages that came with the handshake
                    return
                if isinstance(ev, RejectConnection):
                    status = ev.status_code
                    if not ev.has_body:
                        raise WSRejected(status, b"")
                elif isinstance(ev, RejectData):
                    body += ev.data
                    if ev.body_finished:
                        raise WSRejected(status, body)
                else:
                    self._pending.append(ev)

    def _pump(self):
        data = self.sock.recv(65536)
        self.ws.receive_data(data or None)
        if not data:
            self.closed = True
        return list(self.ws.events())

    @property
    def binary(self) -> bool:
        return "base64" not in (self.protocol or "")

    def send(self, channel: int, data: bytes) -> None:
        if self.binary:
            self.sock.sendall(self.ws.send(BytesMessage(data=bytes([channel]) + data)))
        else:
            self.sock.sendall(self.ws.send(TextMessage(data=str(channel) + base64.b64encode(data).decode())))

    def send_raw(self, payload: bytes) -> None:
        self.sock.sendall(self.ws.send(BytesMessage(data=payload)))

    def close_channel(self, channel: int) -> None:
        """v5 CLOSE signal."""
        self.send_raw(bytes([255, channel]))

    def resize(self, width: int, height: int) -> None:
        self.send(4, json.dumps({"Width": width, "Height": height}).encode())

    def messages(self):
        """Yield (channel, payload) until the server closes."""
        parts = []
        while True:
            evs, self._pending = self._pending, []
            if not evs:
                if self.closed:
                    return
                evs = self._pump()
            for ev in evs:
                if isinstance(ev, (BytesMessage, TextMessage)):
                    parts.append(ev.data)
                    if ev.message_finished:
                        msg = (b"" if isinstance(ev, BytesMessage) else "").join(parts)
                        parts = []
                        if isinstance(msg, str):
                            yield int(msg[0]), base64.b64decode(msg[1:])
                        else:
                            yield msg[0], msg[1:]
                elif isinstance(ev, Ping):
                    self.sock.sendall(self.ws.send(ev.response()))
                elif isinstance(ev, CloseConnection):
                    try:
                        self.sock.sendall(self.ws.send(ev.response()))
                    except Exception:
                        pass
                    self.closed = True
                    return

    def collect(self) -> dict[int, bytes]:
        out: dict[int, bytearray] = {}
        for ch, data in self.messages():
            out.setdefault(ch, bytearray()).extend(data)
        self.sock.close()
        return {ch: bytes(v) for ch, v in out.items()}

    def close(self):
        self.sock.close()
