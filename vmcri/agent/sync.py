"""Session sync on the virtio-serial port, below SSH.

A virtio port is one byte pipe that outlives host connections, and it is not clean at a
reconnect: qemu flushes guest bytes it could not deliver to the old connection into the
new one, and a quick reconnect can reach the agent before it has seen the hang-up. So
each host connection starts with HELLO = MAGIC + a random nonce. The agent, wherever the
HELLO shows up in its input, ends the session it had, stops that session's writer, and
echoes the HELLO before its SSH banner. The host drops everything before the echo.

This module is stdlib only: it runs inside the guest.
"""
from __future__ import annotations

import os

MAGIC = b"\x00\xffvmcri-session-sync\xff\x00"
NONCE_BYTES = 16
HELLO_BYTES = len(MAGIC) + NONCE_BYTES
STALE_BYTE_LIMIT = 16 << 20   # qemu's and the guest's queues hold a few MiB at most


class SyncError(Exception):
    pass


class LegacyAgent(SyncError):
    """The agent answered with an SSH banner and no sync at all: it predates the sync."""


def new_hello() -> bytes:
    return MAGIC + os.urandom(NONCE_BYTES)


class HelloScanner:
    """Splits the agent's port input into ("data", bytes) for the current session and
    ("hello", hello) where a host connection starts.

    Data is never held back (a session must not stall on a byte that might start a
    MAGIC), so a MAGIC split over two reads has its first part delivered to the old
    session; that session is ended by the HELLO anyway.
    """

    def __init__(self):
        self._tail = b""      # last bytes already delivered, kept to find a split MAGIC
        self._partial = None  # start of a HELLO whose nonce has not fully arrived

    def feed(self, data: bytes) -> list[tuple[str, bytes]]:
        out: list[tuple[str, bytes]] = []
        while data:
            if self._partial is not None:
                need = HELLO_BYTES - len(self._partial)
                self._partial += data[:need]
                data = data[need:]
                if len(self._partial) == HELLO_BYTES:
                    out.append(("hello", self._partial))
                    self._partial = None
                    self._tail = b""
                continue
            window = self._tail + data
            i = window.find(MAGIC)
            if i < 0:
                out.append(("data", data))
                self._tail = window[-(len(MAGIC) - 1):]
                break
            before = i - len(self._tail)
            if before > 0:
                out.append(("data", data[:before]))
            self._partial = b""
            data = window[i:]
            self._tail = b""
        return out


def await_echo(recv, hello: bytes, limit: int = STALE_BYTE_LIMIT) -> bytes:
    """Host side: read with recv(n) until the agent echoes `hello`; return what follows
    it (the start of the SSH banner). Stale bytes before it are dropped, up to `limit`."""
    buf = b""
    dropped = 0
    saw_magic = False
    while True:
        chunk = recv(65536)
        if not chunk:
            raise SyncError("agent closed the connection before the session sync")
        buf += chunk
        i = buf.find(hello)
        if i >= 0:
            return buf[i + len(hello):]
        # an agent that knows the sync puts MAGIC before every banner it sends
        saw_magic = saw_magic or MAGIC in buf
        if not saw_magic and (buf.startswith(b"SSH-") or b"\nSSH-" in buf):
            raise LegacyAgent("agent sent an SSH banner without the session sync")
        keep = len(hello) - 1
        if len(buf) > keep:
            dropped += len(buf) - keep
            buf = buf[-keep:]
        if dropped > limit:
            raise SyncError(f"agent sent more than {limit} bytes before the session sync")


def read_hello(recv, limit: int = STALE_BYTE_LIMIT) -> bytes:
    """Agent side of a plain stream (development mode): read up to the host's HELLO."""
    scanner = HelloScanner()
    seen = 0
    while seen <= limit:
        chunk = recv(65536)
        if not chunk:
            raise SyncError("host closed the connection before the session sync")
        seen += len(chunk)
        for kind, part in scanner.feed(chunk):
            if kind == "hello":
                return part
    raise SyncError(f"host sent more than {limit} bytes before the session sync")
