"""The host-side CRI container log writer.

Each line in the file is `<timestamp> <stream> <tag> <content>\\n` where timestamp is
RFC 3339 UTC with 9 fractional digits, stream is `stdout` or `stderr`, and tag is `F`
for the end of a line or `P` for a partial one. The rules are containerd's:
- one newline-terminated line becomes one `F` entry (the "\\n" or "\\r\\n" is dropped);
- a line longer than the maximum size is cut into `P` entries of that size, its last
  piece ending as `F`;
- at close, bytes without a trailing newline are written as a `P` entry.
Memory is bounded: at most `max_line_size` bytes are kept per stream.
"""
from __future__ import annotations

import logging
import os
import threading
import time

log = logging.getLogger(__name__)

DEFAULT_MAX_LINE_SIZE = 16 * 1024
STREAMS = ("stdout", "stderr")


def format_timestamp(ns: int) -> str:
    """2026-11-30T02:15:31.123456789Z for nanoseconds since the epoch."""
    seconds, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{frac:09d}Z"


def format_entry(ns: int, stream: str, partial: bool, content: bytes) -> bytes:
    head = f"{format_timestamp(ns)} {stream} {'P' if partial else 'F'} ".encode()
    return head + content + b"\n"


class CriLogWriter:
    """Appends CRI log entries for one container to `path`; safe to use from many threads."""

    def __init__(self, path: str, max_line_size: int = DEFAULT_MAX_LINE_SIZE,
                 clock_ns=time.time_ns):
        if max_line_size < 1:
            raise ValueError("max_line_size must be positive")
        self.path = path
        self.max_line_size = max_line_size
        self._clock_ns = clock_ns
        self._lock = threading.Lock()
        self._pending = {s: bytearray() for s in STREAMS}
        self.dropped_entries = 0  # entries lost to write errors since the last success
        self._fd: int | None = self._open()

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def _emit(self, stream: str, partial: bool, content: bytes) -> None:
        if self._fd is None:
            return
        entry = format_entry(self._clock_ns(), stream, partial, content)
        view = memoryview(entry)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError as e:
            # A full disk must not stall the container's output pump: drop, count, warn once.
            if not self.dropped_entries:
                log.warning("cannot write container log %s: %s; dropping entries until "
                            "it works again", self.path, e)
            self.dropped_entries += 1
            return
        if self.dropped_entries:
            log.warning("container log %s writable again after %d dropped entries",
                        self.path, self.dropped_entries)
            self.dropped_entries = 0

    def write(self, stream: str, data: bytes) -> None:
        """Add raw output of `stream`; whole lines are written at once."""
        if stream not in self._pending:
            raise ValueError(f"stream must be stdout or stderr, got {stream!r}")
        with self._lock:
            if self._fd is None:
                raise ValueError("log writer is closed")
            buf = self._pending[stream]
            data = bytes(data)
            i, n = 0, len(data)
            newline = -1
            while i < n:
                if newline < i:
                    newline = data.find(b"\n", i)
                    if newline < 0:
                        newline = n  # no newline yet: the line goes on past this data
                end = newline
                if end > i:
                    if len(buf) >= self.max_line_size:
                        if data[i:i + 2] == b"\r\n":
                            i += 1  # a CRLF right after a full line ends that line
                            continue
                        # More of the line follows a full buffer: cut it here. (A full
                        # buffer is kept until then, so an exactly max-sized line is F.)
                        self._emit(stream, True, bytes(buf))
                        buf.clear()
                    take = min(end - i, self.max_line_size - len(buf))
                    buf += data[i:i + take]
                    i += take
                    continue
                if buf.endswith(b"\r"):
                    del buf[-1:]
                self._emit(stream, False, bytes(buf))
                buf.clear()
                i += 1

    def position(self) -> tuple[int, int] | None:
        """(inode, size) of the file written to; None once closed."""
        with self._lock:
            if self._fd is None:
                return None
            st = os.fstat(self._fd)
            return st.st_ino, st.st_size

    def pending_bytes(self, stream: str) -> int:
        """Bytes of `stream` taken in but not yet in the file (an unfinished line)."""
        with self._lock:
            return len(self._pending[stream])

    def flush_partial(self) -> None:
        """Write pending bytes of both streams as P entries (the stream ended mid-line)."""
        with self._lock:
            for stream, buf in self._pending.items():
                if buf:
                    self._emit(stream, True, bytes(buf))
                    buf.clear()

    def reopen(self) -> None:
        """Open `path` again (after logrotate moved the old file); pending bytes are kept."""
        with self._lock:
            if self._fd is None:
                raise ValueError("log writer is closed")
            new_fd = self._open()
            old_fd, self._fd = self._fd, new_fd
            os.close(old_fd)

    def close(self) -> None:
        """Flush what is pending as P entries and close the file. Idempotent."""
        self.flush_partial()
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> "CriLogWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
