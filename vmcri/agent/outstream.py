"""A guest process's output on its way to the host, for `run` processes and containers alike.

Reader threads put the process's stdout/stderr into a bounded ring (outring.py). Senders
stream it to SSH channels:
- the pump (at most one; a new attach replaces it) resumes after what an earlier pump sent
  in full, or from the offsets the host names, so output made or in flight while the host
  is away arrives on its next attach exactly once; it ends with the exit status. While it
  is attached it applies back-pressure: nothing is dropped, the process waits for it;
- live feeds (a container's `attach` with `live`) each get a bounded queue of output from
  the moment they join, and never touch the ring.
"""
from __future__ import annotations

import collections
import fcntl
import os
import struct
import termios
import threading
import time

from . import protocol
from .outring import STREAM_NAMES, OutputRing, RingReader
from .pid1 import exit_code

LIVE_QUEUE_BYTES = 256 << 10
# While a pump is attached, a reader stops taking output once this much is unsent, so the
# pipe fills and the process waits (as under containerd) instead of the ring dropping
# bytes. With no pump (the host away) the ring keeps the newest output and drops the rest.
PUMP_HIGH_WATER = protocol.PROCESS_BUFFER_BYTES // 2
# `run` then `attach` are two calls: until the first pump attaches (or this passes) the
# readers hold back as for a pump, so a fast writer loses nothing of its start
FIRST_ATTACH_WAIT_S = 10.0
STREAM_GRACE_S = 2.0   # after the process exits, how long a leftover pipe writer may hold the output open


class LiveFeed:
    """A bounded queue of (stream, bytes): drop-oldest, counted."""

    def __init__(self, limit: int):
        self.limit = limit
        self.items: collections.deque[tuple[int, bytes]] = collections.deque()
        self.size = 0
        self.dropped = 0

    def put(self, stream: int, data: bytes) -> None:
        self.items.append((stream, data))
        self.size += len(data)
        while self.size > self.limit and self.items:
            _, old = self.items.popleft()
            self.size -= len(old)
            self.dropped += len(old)

    def take(self) -> list:
        items = list(self.items)
        self.items.clear()
        self.size = 0
        return items


class OutputSource:
    """The process-table entry interface the SSH server uses: id, pid, tty, status, dropped,
    delivered, resume_point, attach, signal, resize. Subclasses start the process and say
    what an end of stdin means (`_stdin_ended`)."""

    supports_live = False

    def __init__(self, ident: str, tty: bool):
        self.id = ident
        self.tty = tty
        self.pid = -1   # never 0 until known: killpg(0) is our own group
        self.status: int | None = None
        self.exit_sent = False   # a pump delivered the exit status
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._ring = OutputRing(protocol.PROCESS_BUFFER_BYTES)
        self._sent = {1: 0, 2: 0}  # ring offsets a pump has sent
        self._live: list[LiveFeed] = []
        self._pump_gen = 0
        self._pump_chan = None
        self._pump_live = False  # a pump is attached and sending
        self._first_attach_by = time.monotonic() + FIRST_ATTACH_WAIT_S
        self._held = 0  # readers holding output back for the pump (not done yet)
        self._open_streams = 0
        self._exited_at: float | None = None
        self._stdin_fd: int | None = None
        self._stdin_attached = False

    # -- output -------------------------------------------------------------------
    def start_reader(self, fd: int, stream: int) -> None:
        with self._lock:
            self._open_streams += 1
        threading.Thread(target=self._read_loop, args=(fd, stream), daemon=True,
                         name=f"out-{self.id[:12]}-{stream}").start()

    def _read_loop(self, fd: int, stream: int) -> None:
        try:
            while True:
                try:
                    data = os.read(fd, 65536)
                except InterruptedError:
                    continue
                except OSError:
                    break  # EIO on a pty master once the last slave fd closes
                if not data:
                    break
                with self._lock:
                    while self._holding_back() and self._unsent() > PUMP_HIGH_WATER:
                        self._held += 1
                        try:
                            self._cond.wait(1.0)
                        finally:
                            self._held -= 1
                    self._ring.put(stream, data)
                    for feed in self._live:
                        feed.put(stream, data)
                    self._cond.notify_all()
        finally:
            os.close(fd)
            with self._lock:
                self._open_streams -= 1
                self._cond.notify_all()

    def _holding_back(self) -> bool:
        """Caller holds the lock: a pump is sending, or the first one is still due."""
        return self._pump_live or (self._pump_gen == 0
                                   and time.monotonic() < self._first_attach_by)

    def _unsent(self) -> int:
        """Caller holds the lock: bytes in the ring the pump has not sent yet."""
        return sum(self._ring.end[s] - self._sent[s] for s in self._sent)

    def on_exit(self, status: int) -> None:
        with self._lock:
            self.status = status
            self._exited_at = time.monotonic()
            self._cond.notify_all()
        # wake the senders once the grace for leftover pipe writers is over
        threading.Timer(STREAM_GRACE_S + 0.1, self._notify).start()

    def _notify(self) -> None:
        with self._lock:
            self._cond.notify_all()

    def _output_done(self) -> bool:
        """Caller holds the lock: the process is gone and so is its output (or the grace ran out)."""
        if self.status is None or self._held:
            return False
        return self._open_streams == 0 or time.monotonic() - self._exited_at > STREAM_GRACE_S

    @property
    def finished(self) -> bool:
        """Exited, and a pump has sent everything it produced."""
        with self._lock:
            return self._output_done() and not self._ring.pending(self._sent)

    @property
    def dropped(self) -> int:
        """Bytes a pump resuming now would miss."""
        return self.resume_point(None)[1]

    def resume_point(self, offsets: dict | None) -> tuple[dict[int, int], int]:
        """A pump naming no offsets resumes after what an earlier pump was sent."""
        with self._lock:
            if offsets is None:
                offsets = {STREAM_NAMES[s]: n for s, n in self._sent.items()}
            return self._ring.resume_point(offsets)

    # -- attach -------------------------------------------------------------------
    def attach(self, chan, with_stdin: bool, live: bool = False, offsets: dict | None = None) -> None:
        with self._lock:
            if live:
                feed, gen = LiveFeed(LIVE_QUEUE_BYTES), None
                self._live.append(feed)
            else:
                # one pump at a time: a re-attach replaces a (dead) earlier one
                self._pump_gen += 1
                start = offsets or self._ring.resume_point(
                    {STREAM_NAMES[s]: n for s, n in self._sent.items()})[0]
                feed, gen = RingReader(self._ring, start), self._pump_gen
                old, self._pump_chan = self._pump_chan, chan
                self._sent = dict(start)  # what it skips (offsets it named) counts as sent
                self._pump_live = True
                self._cond.notify_all()
            first_stdin = with_stdin and self._stdin_fd is not None and not self._stdin_attached
            if with_stdin:
                self._stdin_attached = True
        if not live and old is not None:
            try:
                old.close()  # the replaced pump's channel ends now, not at its next send
            except Exception:
                pass
        threading.Thread(target=self._send_loop, args=(chan, feed, gen), daemon=True,
                         name=f"attach-{self.id[:12]}").start()
        if with_stdin and self._stdin_fd is not None:
            threading.Thread(target=self._stdin_loop, args=(chan, first_stdin), daemon=True,
                             name=f"in-{self.id[:12]}").start()

    def _send_loop(self, chan, feed, gen: int | None) -> None:
        def gone():
            t = chan.get_transport()
            return chan.closed or t is None or not t.is_active() or (gen is not None and gen != self._pump_gen)

        try:
            while True:
                with self._lock:
                    while not feed.items and not self._output_done() and not gone():
                        self._cond.wait(1.0)
                    if gone():
                        return
                    pos = dict(feed.cursor) if gen is not None else None
                    items = feed.take()
                    done = self._output_done() and not items
                    status = self.status
                try:
                    for stream, data in items:
                        if stream == 1:
                            chan.sendall(data)
                        else:
                            chan.sendall_stderr(data)
                        if pos is not None:  # sent in full: a later pump starts after it
                            pos[stream] += len(data)
                            with self._lock:
                                self._sent = dict(pos)
                                self._cond.notify_all()  # a reader held back by the high-water mark
                    if done:
                        chan.send_exit_status(exit_code(status))
                        chan.shutdown_write()
                        chan.close()
                        if gen is not None:
                            self.exit_sent = True
                            self._exit_delivered()
                        return
                except Exception:
                    return  # the host went away mid-send: its next attach resumes
        finally:
            with self._lock:
                if gen is None:
                    if feed in self._live:
                        self._live.remove(feed)
                elif gen == self._pump_gen:
                    self._pump_live = False  # the host is away: readers go back to drop-oldest
                    self._cond.notify_all()

    def _exit_delivered(self) -> None:
        """Hook: a pump has sent the exit status."""

    # -- input --------------------------------------------------------------------
    def _stdin_loop(self, chan, first: bool) -> None:
        while True:
            try:
                data = chan.recv(32768)
            except Exception:
                data = b""
            if not data:
                break
            fd = self._stdin_fd
            if fd is None:
                continue  # stdin already closed: discard, but keep reading the channel
            try:
                os.write(fd, data)
            except OSError:
                break
        if self._stdin_ended(chan, first):
            self.end_input()

    def _stdin_ended(self, chan, first: bool) -> bool:
        """Hook: does the end of this channel's input end the process's stdin?"""
        return False

    def end_input(self) -> None:
        """EOF for the process: close the pipe, or ^D through a tty's line discipline."""
        if self.tty:
            fd = self._stdin_fd
            if fd is not None:
                try:
                    os.write(fd, b"\x04")
                except OSError:
                    pass
        else:
            self.close_stdin()

    def close_stdin(self) -> None:
        """Release our end of the process's input (pipe or pty master)."""
        with self._lock:
            fd, self._stdin_fd = self._stdin_fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def resize(self, cols: int, rows: int) -> None:
        fd = self._stdin_fd
        if self.tty and fd is not None:
            fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
