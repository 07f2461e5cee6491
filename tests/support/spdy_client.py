"""A SPDY/3.1 client for the CRI streaming URLs, the way kubectl/crictl use them:
exec/attach (remotecommand v1-v4) and port-forward (portforward.k8s.io).

    res = exec_url(url, stdin=b"hi", stdout=True, stderr=True)
    res.stdout, res.stderr, res.exit_code, res.status

    with PortForwardClient.connect(url) as pf:
        data, err = pf.open(8080)
        data.write(b"ping"); data.close(); data.read()
"""
from __future__ import annotations

import json
import socket
import threading
from urllib.parse import urlsplit

from vmcri.streaming import spdy
from vmcri.streaming.spdy_session import Connection

EXEC_PROTOCOLS = ["v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io", "channel.k8s.io"]
PORTFORWARD_PROTOCOL = "portforward.k8s.io"


class UpgradeFailed(Exception):
    def __init__(self, status: int, headers: dict, body: bytes):
        super().__init__(f"upgrade failed: HTTP {status}: {body.decode(errors='replace').strip()}")
        self.status, self.headers, self.body = status, headers, body


def _read_head(sock: socket.socket) -> bytes:
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        b = sock.recv(1)   # one byte at a time: what follows the head is SPDY
        if not b:
            raise ConnectionError(f"connection closed during the HTTP response: {head!r}")
        head += b
        if len(head) > 65536:
            raise ConnectionError("HTTP response head too large")
    return head


def upgrade(url: str, protocols: list[str], method: str = "POST", timeout: float = 10.0,
            send_settings: bool = False) -> tuple[Connection, str]:
    """Open a SPDY connection on `url`; (Connection, negotiated protocol)."""
    u = urlsplit(url)
    sock = socket.create_connection((u.hostname, u.port or 80), timeout=timeout)
    path = u.path + (f"?{u.query}" if u.query else "")
    lines = [f"{method} {path} HTTP/1.1", f"Host: {u.netloc}", "Connection: Upgrade",
             "Upgrade: SPDY/3.1", "Content-Length: 0"]
    lines += [f"X-Stream-Protocol-Version: {p}" for p in protocols]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    head = _read_head(sock)
    status_line, *hdr_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split()[1])
    headers = {}
    for line in hdr_lines:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    if status != 101:
        body = b""
        n = int(headers.get("content-length", "0"))
        while len(body) < n:
            chunk = sock.recv(n - len(body))
            if not chunk:
                break
            body += chunk
        sock.close()
        raise UpgradeFailed(status, headers, body)
    sock.settimeout(None)
    conn = Connection(sock, server=False, name="test-client").start()
    if send_settings:
        conn.send_settings({spdy.SETTINGS_INITIAL_WINDOW_SIZE: spdy.DEFAULT_WINDOW})
    return conn, headers.get("x-stream-protocol-version", "")


def read_all(stream, limit: int = 64 << 20, timeout: float | None = 60.0) -> bytes:
    out = bytearray()
    while True:
        data = stream.read(65536, timeout=timeout)
        if not data:
            return bytes(out)
        out += data
        if len(out) > limit:
            raise AssertionError("stream larger than the test limit")


class ExecResult:
    def __init__(self, protocol, stdout, stderr, error_raw):
        self.protocol = protocol
        self.stdout, self.stderr = stdout, stderr
        self.error_raw = error_raw
        self.status = None
        self.exit_code = None
        if protocol.startswith("v4."):
            self.status = json.loads(error_raw) if error_raw else None
            if self.status and self.status.get("status") == "Success":
                self.exit_code = 0
            elif self.status and self.status.get("reason") == "NonZeroExitCode":
                for c in self.status.get("details", {}).get("causes", []):
                    if c.get("reason") == "ExitCode":
                        self.exit_code = int(c["message"])
        elif not error_raw:
            self.exit_code = 0


class ExecSession:
    """Streams opened like kubectl does: error first, then stdin/stdout/stderr/resize."""

    def __init__(self, url: str, stdin=False, stdout=True, stderr=True, tty=False,
                 protocols=None, send_settings=False, open_order=None):
        self.conn, self.protocol = upgrade(url, EXEC_PROTOCOLS if protocols is None else protocols,
                                             send_settings=send_settings)
        self.streams = {}
        order = open_order or ["error", "stdin", "stdout", "stderr", "resize"]
        wanted = {"error": True, "stdin": stdin, "stdout": stdout, "stderr": stderr and not tty,
                  "resize": tty and self.protocol not in ("v2.channel.k8s.io", "channel.k8s.io", "")}
        for kind in order:
            if wanted.get(kind):
                s = self.conn.open_stream({"streamType": kind})
                if kind in ("error", "stdout", "stderr"):
                    s.close()   # read-only for the client
                self.streams[kind] = s
        self._collected = {}
        self._threads = []
        for kind in ("stdout", "stderr", "error"):
            if kind in self.streams:
                self._collected[kind] = bytearray()
                t = threading.Thread(target=self._collect, args=(kind,), daemon=True)
                t.start()
                self._threads.append(t)

    def _collect(self, kind):
        buf = self._collected[kind] = bytearray()
        while True:
            data = self.streams[kind].read(65536, timeout=None)
            if not data:
                return
            buf += data

    def output(self, kind: str = "stdout") -> bytes:
        """What arrived on stdout/stderr/error so far."""
        return bytes(self._collected.get(kind, b""))

    def send(self, data: bytes) -> None:
        self.streams["stdin"].write(data)

    def close_stdin(self) -> None:
        self.streams["stdin"].close()

    def resize(self, width: int, height: int) -> None:
        self.streams["resize"].write(json.dumps({"Width": width, "Height": height}).encode())

    def read_stdout(self, n: int = 65536, timeout: float | None = 30.0) -> bytes:
        return self.streams["stdout"].read(n, timeout=timeout)

    def wait(self, timeout: float = 60.0) -> ExecResult:
        for t in self._threads:
            t.join(timeout)
        self.conn.close()
        return ExecResult(self.protocol, self.output("stdout"), self.output("stderr"), self.output("error"))


def exec_url(url: str, stdin: bytes | None = None, stdout=True, stderr=True, tty=False,
             protocols=None, send_settings=False, timeout: float = 60.0) -> ExecResult:
    s = ExecSession(url, stdin=stdin is not None, stdout=stdout, stderr=stderr, tty=tty,
                    protocols=protocols, send_settings=send_settings)
    if stdin is not None:
        if stdin:
            s.send(stdin)
        s.close_stdin()
    return s.wait(timeout)


class PortForwardClient:
    def __init__(self, conn: Connection):
        self.conn = conn
        self._next = 0
        self._lock = threading.Lock()

    @classmethod
    def connect(cls, url: str, send_settings: bool = False) -> "PortForwardClient":
        conn, _ = upgrade(url, [PORTFORWARD_PROTOCOL], send_settings=send_settings)
        return cls(conn)

    def open(self, port: int):
        """(data stream, error stream) for one forwarded connection."""
        with self._lock:
            rid = str(self._next)
            self._next += 1
        err = self.conn.open_stream({"streamType": "error", "port": str(port), "requestID": rid})
        err.close()
        data = self.conn.open_stream({"streamType": "data", "port": str(port), "requestID": rid})
        return data, err

    def roundtrip(self, port: int, payload: bytes) -> tuple[bytes, bytes]:
        """Send payload, half-close, and read the reply and the error stream."""
        data, err = self.open(port)
        errs = {}
        t = threading.Thread(target=lambda: errs.setdefault("e", read_all(err)), daemon=True)
        t.start()
        if payload:
            data.write(payload)
        data.close()
        reply = read_all(data)
        t.join(30)
        return reply, errs.get("e", b"")

    def close(self):
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
