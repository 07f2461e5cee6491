"""SPDY/3.1 framing and a threaded connection, written from the SPDY/3.1 draft.

Only what the Kubernetes streaming protocols use is implemented: SYN_STREAM,
SYN_REPLY, RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS, WINDOW_UPDATE and DATA.
Header blocks are zlib-compressed with the SPDY/3 dictionary; each direction of
a connection keeps one compression context for its whole life.

Flow control: the Go peers the kubelet and crictl use (moby/spdystream) neither
send WINDOW_UPDATE nor honour it. Our send side therefore only enforces the
peer's windows once the peer shows it does flow control (it sent SETTINGS or a
WINDOW_UPDATE); otherwise a stalled window is waited on for a short grace, then
the peer is treated as one without flow control (likewise for the session window
of peers that never send a session-level WINDOW_UPDATE). The receive side always sends
WINDOW_UPDATEs as data is consumed and bounds what it buffers per stream.
"""
from __future__ import annotations

import collections
import socket
import struct
import threading
import zlib


VERSION = 3

SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS = 1, 2, 3, 4
PING, GOAWAY, HEADERS, WINDOW_UPDATE = 6, 7, 8, 9
FRAME_NAMES = {SYN_STREAM: "SYN_STREAM", SYN_REPLY: "SYN_REPLY", RST_STREAM: "RST_STREAM",
               SETTINGS: "SETTINGS", PING: "PING", GOAWAY: "GOAWAY", HEADERS: "HEADERS",
               WINDOW_UPDATE: "WINDOW_UPDATE"}

FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02

# RST_STREAM status codes
PROTOCOL_ERROR, INVALID_STREAM, REFUSED_STREAM, UNSUPPORTED_VERSION = 1, 2, 3, 4
CANCEL, INTERNAL_ERROR, FLOW_CONTROL_ERROR, STREAM_IN_USE = 5, 6, 7, 8
STREAM_ALREADY_CLOSED, FRAME_TOO_LARGE = 9, 11

# GOAWAY status codes
GOAWAY_OK, GOAWAY_PROTOCOL_ERROR, GOAWAY_INTERNAL_ERROR = 0, 1, 2

SETTINGS_INITIAL_WINDOW_SIZE = 7
DEFAULT_WINDOW = 64 * 1024
MAX_WINDOW = 0x7FFFFFFF
MAX_FRAME_BYTES = 16 << 20          # the 24-bit length field's own limit
MAX_HEADER_BYTES = 1 << 20          # decompressed header block
MAX_STREAM_BUFFER = 256 * 1024     # received, not yet consumed, per stream (4 windows)
WRITE_CHUNK = 16 * 1024             # DATA payload per frame we send
FLOW_CONTROL_GRACE_S = 0.25


def _build_dictionary() -> bytes:
    """The SPDY/3 header compression dictionary (draft 3, section 2.6.10.1): a run of
    length-prefixed words followed by a run of raw text. 1423 bytes, no trailing NUL."""
    words = (
        "options head post put delete trace accept accept-charset accept-encoding "
        "accept-language accept-ranges age allow authorization cache-control connection "
        "content-base content-encoding content-language content-length content-location "
        "content-md5 content-range content-type date etag expect expires from host if-match "
        "if-modified-since if-none-match if-range if-unmodified-since last-modified location "
        "max-forwards pragma proxy-authenticate proxy-authorization range referer retry-after "
        "server te trailer transfer-encoding upgrade user-agent vary via warning "
        "www-authenticate method get status"
    ).split() + ["200 OK", "version", "HTTP/1.1", "url", "public", "set-cookie", "keep-alive", "origin"]
    prefixed = b"".join(struct.pack("!I", len(w)) + w.encode() for w in words)
    codes = "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505"
    tail = (
        codes
        + "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request"
        "401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented"
        "503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 "
        "Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,image/gif,"
        "application/xml,application/xhtml+xml,text/plain,text/javascript,publicprivate"
        "max-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
    )
    return prefixed + tail.encode()


DICTIONARY = _build_dictionary()


class SpdyError(Exception):
    """The peer broke the protocol; the connection goes away with `status`."""

    def __init__(self, message: str, status: int = GOAWAY_PROTOCOL_ERROR):
        super().__init__(message)
        self.status = status


# -- header blocks ------------------------------------------------------------------
def encode_header_block(headers) -> bytes:
    """Uncompressed name/value block. `headers` maps name -> str or list of str
    (several values are joined with NUL, as the draft says)."""
    items = headers.items() if hasattr(headers, "items") else headers
    out = [b""]
    n = 0
    for name, value in items:
        vals = value if isinstance(value, (list, tuple)) else [value]
        nb = name.lower().encode()
        vb = b"\0".join(str(v).encode() for v in vals)
        out.append(struct.pack("!I", len(nb)) + nb + struct.pack("!I", len(vb)) + vb)
        n += 1
    out[0] = struct.pack("!I", n)
    return b"".join(out)


def parse_header_block(raw: bytes) -> dict[str, list[str]]:
    def take(pos, n):
        if pos + n > len(raw):
            raise SpdyError("header block truncated")
        return raw[pos:pos + n], pos + n

    b, pos = take(0, 4)
    (count,) = struct.unpack("!I", b)
    if count > len(raw) // 8:
        raise SpdyError(f"header block claims {count} pairs in {len(raw)} bytes")
    headers: dict[str, list[str]] = {}
    for _ in range(count):
        b, pos = take(pos, 4)
        name, pos = take(pos, struct.unpack("!I", b)[0])
        b, pos = take(pos, 4)
        value, pos = take(pos, struct.unpack("!I", b)[0])
        if not name:
            raise SpdyError("empty header name")
        key = name.decode("latin-1").lower()
        if key in headers:
            raise SpdyError(f"duplicate header {key!r}")
        headers[key] = value.decode("latin-1").split("\0")
    if pos != len(raw):
        raise SpdyError("trailing bytes after the header block")
    return headers


class HeaderCompressor:
    """One per connection direction: every block continues the same zlib stream."""

    def __init__(self):
        self._z = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, 15, 8,
                                   zlib.Z_DEFAULT_STRATEGY, zdict=DICTIONARY)

    def compress(self, headers) -> bytes:
        return self._z.compress(encode_header_block(headers)) + self._z.flush(zlib.Z_SYNC_FLUSH)


class HeaderDecompressor:
    def __init__(self, limit: int = MAX_HEADER_BYTES):
        self._z = zlib.decompressobj(zdict=DICTIONARY)
        self.limit = limit

    def decompress(self, block: bytes) -> dict[str, list[str]]:
        try:
            raw = self._z.decompress(block, self.limit + 1)
        except zlib.error as e:
            raise SpdyError(f"header block does not decompress: {e}") from e
        if len(raw) > self.limit or self._z.unconsumed_tail:
            raise SpdyError(f"header block decompresses beyond {self.limit} bytes")
        return parse_header_block(raw)


# -- frames ---------------------------------------------------------------------------
def control_frame(ftype: int, flags: int, payload: bytes) -> bytes:
    if len(payload) >= 1 << 24:
        raise ValueError("control frame payload too large")
    return struct.pack("!HHI", 0x8000 | VERSION, ftype, (flags << 24) | len(payload)) + payload


def data_frame(stream_id: int, data: bytes, fin: bool = False) -> bytes:
    if len(data) >= 1 << 24:
        raise ValueError("data frame payload too large")
    return struct.pack("!II", stream_id & 0x7FFFFFFF, ((FLAG_FIN if fin else 0) << 24) | len(data)) + data


def syn_stream_frame(comp: HeaderCompressor, stream_id: int, headers, fin=False,
                     unidirectional=False, assoc_id=0, priority=0) -> bytes:
    flags = (FLAG_FIN if fin else 0) | (FLAG_UNIDIRECTIONAL if unidirectional else 0)
    payload = struct.pack("!IIBB", stream_id, assoc_id, (priority & 7) << 5, 0) + comp.compress(headers)
    return control_frame(SYN_STREAM, flags, payload)


def syn_reply_frame(comp: HeaderCompressor, stream_id: int, headers, fin=False) -> bytes:
    return control_frame(SYN_REPLY, FLAG_FIN if fin else 0, struct.pack("!I", stream_id) + comp.compress(headers))


def headers_frame(comp: HeaderCompressor, stream_id: int, headers, fin=False) -> bytes:
    return control_frame(HEADERS, FLAG_FIN if fin else 0, struct.pack("!I", stream_id) + comp.compress(headers))


def rst_stream_frame(stream_id: int, status: int) -> bytes:
    return control_frame(RST_STREAM, 0, struct.pack("!II", stream_id, status))


def settings_frame(settings: dict[int, int], flags: int = 0) -> bytes:
    body = b"".join(struct.pack("!II", sid & 0xFFFFFF, v) for sid, v in settings.items())
    return control_frame(SETTINGS, flags, struct.pack("!I", len(settings)) + body)


def ping_frame(ping_id: int) -> bytes:
    return control_frame(PING, 0, struct.pack("!I", ping_id))


def goaway_frame(last_good_id: int, status: int = GOAWAY_OK) -> bytes:
    return control_frame(GOAWAY, 0, struct.pack("!II", last_good_id, status))


def window_update_frame(stream_id: int, delta: int) -> bytes:
    return control_frame(WINDOW_UPDATE, 0, struct.pack("!II", stream_id, delta))


class Frame:
    """A decoded frame. Control frames have `type`; DATA frames have type None."""
    __slots__ = ("type", "flags", "stream_id", "data", "headers", "status", "delta",
                 "ping_id", "settings", "assoc_id", "priority", "last_good_id")

    def __init__(self, type, flags, **kw):
        self.type, self.flags = type, flags
        for k in self.__slots__[2:]:
            setattr(self, k, kw.get(k))

    @property
    def fin(self) -> bool:
        return bool(self.flags & FLAG_FIN)

    def __repr__(self):
        name = FRAME_NAMES.get(self.type, "DATA" if self.type is None else str(self.type))
        return f"<{name} flags={self.flags} stream={self.stream_id}>"


def _recv_exact(sock, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = sock.recv(min(n - len(buf), 1 << 20))
        except socket.timeout:
            if buf:
                raise SpdyError("peer stalled in the middle of a frame") from None
            raise
        if not chunk:
            if buf:
                raise SpdyError("connection closed in the middle of a frame")
            raise EOFError
        buf += chunk
    return bytes(buf)


class FrameReader:
    def __init__(self, sock, decompressor: HeaderDecompressor | None = None, max_frame: int = MAX_FRAME_BYTES):
        self.sock = sock
        self.dec = decompressor or HeaderDecompressor()
        self.max_frame = max_frame

    def read(self) -> Frame:
        """Next frame; EOFError at a clean end of the connection."""
        head = _recv_exact(self.sock, 8)
        first, second = struct.unpack("!II", head)
        flags, length = second >> 24, second & 0xFFFFFF
        if length > self.max_frame:
            raise SpdyError(f"frame of {length} bytes exceeds the {self.max_frame}-byte limit")
        payload = _recv_exact(self.sock, length) if length else b""
        if not first & 0x80000000:
            return Frame(None, flags, stream_id=first & 0x7FFFFFFF, data=payload)
        version, ftype = (first >> 16) & 0x7FFF, first & 0xFFFF
        if version != VERSION:
            raise SpdyError(f"unsupported SPDY version {version}")
        return self._control(ftype, flags, payload)

    def _control(self, ftype, flags, p: bytes) -> Frame:
        def need(n):
            if len(p) < n:
                raise SpdyError(f"{FRAME_NAMES.get(ftype, ftype)} frame too short ({len(p)} bytes)")

        if ftype == SYN_STREAM:
            need(10)
            sid, assoc, pri, _slot = struct.unpack("!IIBB", p[:10])
            return Frame(ftype, flags, stream_id=sid & 0x7FFFFFFF, assoc_id=assoc & 0x7FFFFFFF,
                         priority=pri >> 5, headers=self.dec.decompress(p[10:]))
        if ftype in (SYN_REPLY, HEADERS):
            need(4)
            sid = struct.unpack("!I", p[:4])[0] & 0x7FFFFFFF
            return Frame(ftype, flags, stream_id=sid, headers=self.dec.decompress(p[4:]))
        if ftype == RST_STREAM:
            need(8)
            sid, status = struct.unpack("!II", p[:8])
            return Frame(ftype, flags, stream_id=sid & 0x7FFFFFFF, status=status)
        if ftype == SETTINGS:
            need(4)
            (n,) = struct.unpack("!I", p[:4])
            if len(p) != 4 + 8 * n:
                raise SpdyError("SETTINGS length does not match its entry count")
            settings = {}
            for i in range(n):
                idf, val = struct.unpack("!II", p[4 + 8 * i:12 + 8 * i])
                settings[idf & 0xFFFFFF] = val
            return Frame(ftype, flags, settings=settings)
        if ftype == PING:
            need(4)
            return Frame(ftype, flags, ping_id=struct.unpack("!I", p[:4])[0])
        if ftype == GOAWAY:
            need(4)
            last = struct.unpack("!I", p[:4])[0] & 0x7FFFFFFF
            status = struct.unpack("!I", p[4:8])[0] if len(p) >= 8 else GOAWAY_OK
            return Frame(ftype, flags, last_good_id=last, status=status)
        if ftype == WINDOW_UPDATE:
            need(8)
            sid, delta = struct.unpack("!II", p[:8])
            return Frame(ftype, flags, stream_id=sid & 0x7FFFFFFF, delta=delta & 0x7FFFFFFF)
        # unknown control frames are ignored, as the draft asks
        return Frame(ftype, flags)


# -- byte buffer shared by SPDY streams and WebSocket channels ---------------------------
class ByteBuffer:
    """Bytes received but not yet consumed. read() blocks; b"" means end of data."""

    def __init__(self, limit: int = MAX_STREAM_BUFFER, on_consumed=None):
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._eof = False
        self._error: str | None = None
        self._cv = threading.Condition()
        self.limit = limit
        self.discard = False
        self._on_consumed = on_consumed

    def feed(self, data: bytes, block_timeout: float | None = None) -> None:
        """Add data; blocks (backpressure) while more than `limit` bytes wait."""
        with self._cv:
            if self.discard or self._eof:
                discarded = True
            else:
                discarded = False
                self._cv.wait_for(lambda: self._size < self.limit or self._eof or self.discard,
                                  block_timeout)
                self._chunks.append(data)
                self._size += len(data)
                self._cv.notify_all()
        if discarded and self._on_consumed:
            self._on_consumed(len(data))

    def close(self, error: str | None = None) -> None:
        with self._cv:
            self._eof = True
            if error and not self._error:
                self._error = error
            self._cv.notify_all()

    @property
    def closed(self) -> bool:
        return self._eof

    def read(self, n: int = 65536, timeout: float | None = None) -> bytes:
        """Up to n bytes; b"" at the end; raises TimeoutError if nothing arrived in time."""
        with self._cv:
            if not self._cv.wait_for(lambda: self._chunks or self._eof, timeout):
                raise TimeoutError("no data in time")
            if not self._chunks:
                return b""
            first = self._chunks.popleft()
            if len(first) > n:
                first, rest = first[:n], first[n:]
                self._chunks.appendleft(rest)
            self._size -= len(first)
            self._cv.notify_all()
        if self._on_consumed:
            self._on_consumed(len(first))
        return first

    def set_discard(self) -> None:
        with self._cv:
            self.discard = True
            dropped = self._size
            self._chunks.clear()
            self._size = 0
            self._cv.notify_all()
        if dropped and self._on_consumed:
            self._on_consumed(dropped)
