"""A SPDY/3.1 connection over a socket: one reader thread, streams with blocking
read/write, PING echo, GOAWAY, RST_STREAM and flow control (see spdy.py for the
flow-control policy towards peers that do not implement it)."""
from __future__ import annotations

import logging
import socket
import threading
import time

from vmcri.streaming import spdy
from vmcri.streaming.spdy import ByteBuffer, SpdyError

log = logging.getLogger(__name__)


class StreamReset(Exception):
    pass


class Stream:
    def __init__(self, conn: "Connection", stream_id: int, headers: dict[str, list[str]]):
        self.conn = conn
        self.id = stream_id
        self.headers = headers
        self.inbox = ByteBuffer(on_consumed=self._consumed)
        self.send_window = conn.initial_send_window
        self.unacked = 0
        self.local_closed = False
        self.remote_closed = False
        self.reset_status: int | None = None
        self.replied = threading.Event()

    def header(self, name: str, default: str = "") -> str:
        vals = self.headers.get(name.lower())
        return vals[0] if vals else default

    def read(self, n: int = 65536, timeout: float | None = None) -> bytes:
        """Up to n bytes; b"" once the peer half-closed (FIN) or reset the stream."""
        return self.inbox.read(n, timeout)

    def write(self, data: bytes) -> None:
        self.conn._write_data(self, data)

    def close(self) -> None:
        """Half-close our side (DATA frame with FLAG_FIN)."""
        self.conn._close_stream(self)

    def reset(self, status: int = spdy.CANCEL) -> None:
        self.conn._reset_stream(self, status, send=True)

    def discard_input(self) -> None:
        """Drop (and acknowledge) whatever the peer sends on this stream."""
        self.inbox.set_discard()

    def _consumed(self, n: int) -> None:
        self.conn._ack(self, n)

    def __repr__(self):
        return f"<Stream {self.id} {self.headers}>"


class Connection:
    def __init__(self, sock: socket.socket, server: bool, on_stream=None,
                 idle_timeout: float | None = None, max_frame: int = spdy.MAX_FRAME_BYTES,
                 max_header_bytes: int = spdy.MAX_HEADER_BYTES, max_streams: int = 1000,
                 name: str = ""):
        self.sock = sock
        try:   # small control frames (WINDOW_UPDATE, PING) must not wait for Nagle
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self.server = server
        self.name = name or ("server" if server else "client")
        self.on_stream = on_stream
        self.idle_timeout = idle_timeout
        self.max_streams = max_streams
        self._reader = spdy.FrameReader(sock, spdy.HeaderDecompressor(max_header_bytes), max_frame)
        self._comp = spdy.HeaderCompressor()
        self._wlock = threading.Lock()
        self._cv = threading.Condition()
        self._streams: dict[int, Stream] = {}
        self._next_id = 2 if server else 1
        self._next_ping = 2 if server else 1
        self._pings: dict[int, threading.Event] = {}
        self.last_peer_id = 0
        self.initial_send_window = spdy.DEFAULT_WINDOW
        self.session_send_window = spdy.DEFAULT_WINDOW
        self._session_unacked = 0
        self.peer_flow_control = False          # sent SETTINGS or any WINDOW_UPDATE
        self.peer_session_flow_control = False  # sent a session-level WINDOW_UPDATE
        self.flow_control_off = False
        self.session_flow_off = False
        self.goaway_sent = False
        self.goaway_received: int | None = None   # peer's GOAWAY status
        self.error: str | None = None
        self.closed = threading.Event()
        self.last_activity = time.monotonic()
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> "Connection":
        self._thread = threading.Thread(target=self.serve, name=f"spdy-{self.name}", daemon=True)
        self._thread.start()
        return self

    def serve(self) -> None:
        try:
            self.sock.settimeout(self.idle_timeout)
            while True:
                try:
                    frame = self._reader.read()
                except socket.timeout:
                    if time.monotonic() - self.last_activity >= (self.idle_timeout or 0):
                        self.error = "idle timeout"
                        log.info("spdy %s: idle for %.0fs, closing", self.name, self.idle_timeout)
                        self._send_goaway(spdy.GOAWAY_OK)
                        break
                    continue
                self.last_activity = time.monotonic()
                self._dispatch(frame)
        except EOFError:
            pass
        except SpdyError as e:
            self.error = str(e)
            log.warning("spdy %s: protocol error: %s", self.name, e)
            self._send_goaway(e.status)
        except OSError as e:
            if not self.closed.is_set():
                self.error = f"connection error: {e}"
        finally:
            self._teardown()

    def _teardown(self) -> None:
        with self._cv:
            streams = list(self._streams.values())
            self._streams.clear()
            self.closed.set()
            self._cv.notify_all()
        for s in streams:
            s.remote_closed = True
            s.inbox.close("connection closed")
            s.replied.set()   # wake open_stream waiters
        for ev in list(self._pings.values()):
            ev.set()

    def shutdown(self, linger: float = 5.0) -> None:
        """GOAWAY, half-close the socket, give the peer `linger` seconds to finish
        reading, then close. Half-closing first avoids an RST that could drop data
        the peer has not read yet."""
        self._send_goaway(spdy.GOAWAY_OK)
        with self._cv:
            streams = list(self._streams.values())
        for s in streams:   # nobody reads them any more: keep the reader from blocking on them
            s.discard_input()
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self.closed.wait(linger)
        self.close()

    def close(self) -> None:
        self.closed.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._teardown()

    # -- sending -----------------------------------------------------------------------
    def _send(self, raw: bytes) -> None:
        with self._wlock:
            self._sendall_locked(raw)

    def _sendall_locked(self, raw: bytes) -> None:
        if self.closed.is_set():
            raise ConnectionError("spdy connection closed")
        self.sock.sendall(raw)
        self.last_activity = time.monotonic()

    def _try_send(self, raw: bytes) -> None:
        try:
            self._send(raw)
        except OSError:
            pass

    def _send_goaway(self, status: int) -> None:
        with self._wlock:
            if self.goaway_sent or self.closed.is_set():
                return
            self.goaway_sent = True
            try:
                self._sendall_locked(spdy.goaway_frame(self.last_peer_id, status))
            except OSError:
                pass

    def open_stream(self, headers, fin: bool = False, reply_timeout: float | None = 30.0) -> Stream:
        """Client side: SYN_STREAM, then wait for the SYN_REPLY."""
        with self._wlock:
            if self.closed.is_set() or self.goaway_received is not None:
                raise ConnectionError("spdy connection is going away")
            sid = self._next_id
            self._next_id += 2
            stream = Stream(self, sid, {k.lower(): (v if isinstance(v, list) else [str(v)])
                                        for k, v in dict(headers).items()})
            stream.local_closed = fin
            with self._cv:
                self._streams[sid] = stream
            self._sendall_locked(spdy.syn_stream_frame(self._comp, sid, headers, fin=fin))
        if reply_timeout is not None and not stream.replied.wait(reply_timeout):
            raise TimeoutError(f"no SYN_REPLY for stream {sid}")
        if self.closed.is_set():
            raise ConnectionError(f"spdy connection closed before stream {sid} was answered")
        if stream.reset_status is not None:
            raise StreamReset(f"stream {sid} reset with status {stream.reset_status}")
        return stream

    def ping(self, timeout: float = 10.0) -> float:
        """Round trip time of one PING in seconds."""
        with self._wlock:
            pid = self._next_ping
            self._next_ping += 2
            ev = self._pings[pid] = threading.Event()
            start = time.monotonic()
            self._sendall_locked(spdy.ping_frame(pid))
        try:
            if not ev.wait(timeout) or self.closed.is_set():
                raise TimeoutError("no PING reply")
            return time.monotonic() - start
        finally:
            self._pings.pop(pid, None)

    def send_settings(self, settings: dict[int, int]) -> None:
        self._send(spdy.settings_frame(settings))

    def _write_data(self, stream: Stream, data: bytes) -> None:
        stream.replied.wait()   # no DATA before our SYN_REPLY: spdystream drops it
        view = memoryview(data)
        while view:
            with self._cv:
                self._wait_for_window(stream)
                n = min(len(view), spdy.WRITE_CHUNK)
                if not self.flow_control_off:
                    n = min(n, stream.send_window)
                    if not self.session_flow_off:
                        n = min(n, self.session_send_window)
                stream.send_window -= n
                self.session_send_window -= n
            self._send(spdy.data_frame(stream.id, bytes(view[:n])))
            view = view[n:]

    def _wait_for_window(self, stream: Stream) -> None:
        """Called with _cv held. Windows whose kind of WINDOW_UPDATE the peer never sent
        get a short grace when they run out, then stop being enforced (spdystream peers
        send none; SPDY/3 peers send no session-level ones)."""
        while True:
            if stream.reset_status is not None:
                raise StreamReset(f"stream {stream.id} was reset")
            if self.closed.is_set():
                raise ConnectionError("spdy connection closed")
            if stream.local_closed:
                raise ConnectionError(f"stream {stream.id} already half-closed")
            if self.flow_control_off:
                return
            stream_ok = stream.send_window > 0
            session_ok = self.session_flow_off or self.session_send_window > 0
            if stream_ok and session_ok:
                return
            if (not stream_ok and self.peer_flow_control) or \
                    (stream_ok and self.peer_session_flow_control):
                self._cv.wait()
                continue
            self._cv.wait(spdy.FLOW_CONTROL_GRACE_S)
            if not self.peer_flow_control and stream.send_window <= 0:
                log.debug("spdy %s: peer does no flow control; not enforcing windows", self.name)
                self.flow_control_off = True
            elif stream.send_window > 0 and not self.peer_session_flow_control \
                    and self.session_send_window <= 0:
                log.debug("spdy %s: peer does no session flow control; not enforcing it", self.name)
                self.session_flow_off = True

    def _close_stream(self, stream: Stream) -> None:
        stream.replied.wait()
        with self._cv:
            if stream.local_closed or stream.reset_status is not None:
                return
            stream.local_closed = True
            done = stream.remote_closed
            if done:
                self._streams.pop(stream.id, None)
        self._try_send(spdy.data_frame(stream.id, b"", fin=True))

    def _reset_stream(self, stream: Stream, status: int, send: bool) -> None:
        with self._cv:
            if stream.reset_status is not None:
                return
            stream.reset_status = status
            stream.local_closed = stream.remote_closed = True
            self._streams.pop(stream.id, None)
            self._cv.notify_all()
        stream.inbox.close(f"stream reset ({status})")
        stream.replied.set()
        if send:
            self._try_send(spdy.rst_stream_frame(stream.id, status))

    def _ack(self, stream: Stream, n: int) -> None:
        """Return consumed bytes to the peer's windows, in half-window steps."""
        frames = []
        with self._cv:
            stream.unacked += n
            self._session_unacked += n
            if stream.unacked >= spdy.DEFAULT_WINDOW // 2 and not stream.remote_closed:
                frames.append(spdy.window_update_frame(stream.id, stream.unacked))
                stream.unacked = 0
            if self._session_unacked >= spdy.DEFAULT_WINDOW // 2:
                frames.append(spdy.window_update_frame(0, self._session_unacked))
                self._session_unacked = 0
        for f in frames:
            self._try_send(f)

    # -- receiving ---------------------------------------------------------------------
    def _is_peer_id(self, sid: int) -> bool:
        return (sid % 2 == 1) if self.server else (sid % 2 == 0)

    def _dispatch(self, f: spdy.Frame) -> None:
        t = f.type
        if t is None:
            self._on_data(f)
        elif t == spdy.SYN_STREAM:
            self._on_syn_stream(f)
        elif t == spdy.SYN_REPLY:
            s = self._streams.get(f.stream_id)
            if s is not None:
                s.replied.set()
                if f.fin:
                    self._remote_fin(s)
        elif t == spdy.HEADERS:
            s = self._streams.get(f.stream_id)
            if s is not None and f.fin:
                self._remote_fin(s)
        elif t == spdy.RST_STREAM:
            s = self._streams.get(f.stream_id)
            if s is not None:
                self._reset_stream(s, f.status, send=False)
        elif t == spdy.SETTINGS:
            self._on_settings(f)
        elif t == spdy.PING:
            if f.ping_id % 2 != self._next_ping % 2:
                self._send(spdy.ping_frame(f.ping_id))
            else:
                ev = self._pings.get(f.ping_id)
                if ev is not None:
                    ev.set()
        elif t == spdy.GOAWAY:
            self.goaway_received = f.status
            log.debug("spdy %s: peer sent GOAWAY (last good %d, status %d)", self.name, f.last_good_id, f.status)
        elif t == spdy.WINDOW_UPDATE:
            self._on_window_update(f)

    def _on_syn_stream(self, f: spdy.Frame) -> None:
        sid = f.stream_id
        if sid == 0 or not self._is_peer_id(sid) or sid <= self.last_peer_id:
            raise SpdyError(f"SYN_STREAM with invalid stream id {sid}")
        self.last_peer_id = sid
        if self.goaway_sent or len(self._streams) >= self.max_streams:
            self._send(spdy.rst_stream_frame(sid, spdy.REFUSED_STREAM))
            return
        stream = Stream(self, sid, f.headers)
        if f.flags & spdy.FLAG_UNIDIRECTIONAL:
            stream.local_closed = True
        with self._cv:
            self._streams[sid] = stream
        accepted = True
        if self.on_stream is not None:
            try:
                accepted = self.on_stream(stream) is not False
            except Exception:
                log.exception("spdy %s: stream handler failed", self.name)
                accepted = False
        if not accepted:
            self._reset_stream(stream, spdy.REFUSED_STREAM, send=True)
            return
        with self._wlock:
            self._sendall_locked(spdy.syn_reply_frame(self._comp, sid, {}))
        stream.replied.set()
        if f.fin:
            self._remote_fin(stream)

    def _on_data(self, f: spdy.Frame) -> None:
        s = self._streams.get(f.stream_id)
        if s is None:
            if f.data:
                self._ack_session_only(len(f.data))
            if self._is_peer_id(f.stream_id) and f.stream_id > self.last_peer_id:
                self._send(spdy.rst_stream_frame(f.stream_id, spdy.INVALID_STREAM))
            return
        if s.remote_closed:
            self._send(spdy.rst_stream_frame(f.stream_id, spdy.STREAM_ALREADY_CLOSED))
            return
        if f.data:
            s.inbox.feed(f.data)
        if f.fin:
            self._remote_fin(s)

    def _ack_session_only(self, n: int) -> None:
        with self._cv:
            self._session_unacked += n
            if self._session_unacked < spdy.DEFAULT_WINDOW // 2:
                return
            delta, self._session_unacked = self._session_unacked, 0
        self._try_send(spdy.window_update_frame(0, delta))

    def _remote_fin(self, s: Stream) -> None:
        with self._cv:
            s.remote_closed = True
            if s.local_closed:
                self._streams.pop(s.id, None)
        s.inbox.close()

    def _on_settings(self, f: spdy.Frame) -> None:
        with self._cv:
            self.peer_flow_control = True
            new = f.settings.get(spdy.SETTINGS_INITIAL_WINDOW_SIZE)
            if new is not None:
                if new > spdy.MAX_WINDOW:
                    raise SpdyError(f"SETTINGS_INITIAL_WINDOW_SIZE {new} too large")
                delta = new - self.initial_send_window
                self.initial_send_window = new
                for s in self._streams.values():
                    s.send_window += delta
            self._cv.notify_all()

    def _on_window_update(self, f: spdy.Frame) -> None:
        bad = None
        with self._cv:
            self.peer_flow_control = True
            if f.stream_id == 0:
                self.peer_session_flow_control = True
                self.session_send_window += f.delta
                if self.session_send_window > spdy.MAX_WINDOW:
                    raise SpdyError("session window overflow", spdy.GOAWAY_PROTOCOL_ERROR)
            else:
                s = self._streams.get(f.stream_id)
                if s is not None:
                    s.send_window += f.delta
                    if s.send_window > spdy.MAX_WINDOW:
                        bad = s
            self._cv.notify_all()
        if bad is not None:
            self._reset_stream(bad, spdy.FLOW_CONTROL_ERROR, send=True)
