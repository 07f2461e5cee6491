"""Exec and attach sessions (Kubernetes remotecommand), independent of the transport.

A transport (SPDY in server.py, WebSocket in websocket.py) collects the client's
streams into a `SessionIO`, then `run_session` starts the process and moves bytes:
stdin → process, process stdout/stderr → client, resize events → the pty, and at
the end the exit status on the error stream (a metav1.Status from v4 on, a plain
message before).
"""
from __future__ import annotations

import json
import logging
import select
import threading
import time

from vmcri import errors

log = logging.getLogger(__name__)

V4 = "v4.channel.k8s.io"
V3 = "v3.channel.k8s.io"
V2 = "v2.channel.k8s.io"
V1 = "channel.k8s.io"
SPDY_PROTOCOLS = (V4, V3, V2, V1)   # preference order is the client's; this is what we accept

STREAM_ERROR, STREAM_STDIN, STREAM_STDOUT = "error", "stdin", "stdout"
STREAM_STDERR, STREAM_RESIZE = "stderr", "resize"

NON_ZERO_EXIT_REASON = "NonZeroExitCode"
EXIT_CODE_CAUSE = "ExitCode"
EXIT_STATUS_WAIT_S = 30.0
MAX_RESIZE_BUFFER = 4096
READ_CHUNK = 32 * 1024


def supports_resize(protocol: str) -> bool:
    return protocol not in (V1, V2, "")


def status_json(exit_code: int | None, error: str | None = None) -> bytes:
    """The metav1.Status the v4 clients decode (kubectl, crictl, client-go)."""
    if error is not None:
        st = {"metadata": {}, "status": "Failure", "message": error, "reason": "InternalError",
              "details": {"causes": [{"message": error}]}, "code": 500}
    elif exit_code == 0:
        st = {"metadata": {}, "status": "Success"}
    else:
        st = {"metadata": {}, "status": "Failure",
              "message": f"command terminated with non-zero exit code: exit status {exit_code}",
              "reason": NON_ZERO_EXIT_REASON,
              "details": {"causes": [{"reason": EXIT_CODE_CAUSE, "message": str(exit_code)}]}}
    return json.dumps(st, separators=(",", ":")).encode()


def status_message(protocol: str, exit_code: int | None, error: str | None = None) -> bytes:
    """What goes on the error stream: a Status from v4 on; plain text (nothing on
    success) for v1-v3."""
    if protocol.startswith(("v4.", "v5.")):
        return status_json(exit_code, error)
    if error is not None:
        return error.encode()
    if exit_code == 0:
        return b""
    return f"command terminated with non-zero exit code: exit status {exit_code}".encode()


class SessionIO:
    """The client's side of one exec/attach. Readers have read(n) -> bytes (b"" = end);
    writers have write(bytes) and close(). `gone` is set when the client disconnected."""

    def __init__(self, protocol: str, stdin=None, stdout=None, stderr=None, error=None, resize=None):
        self.protocol = protocol
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.error, self.resize = error, resize
        self.gone = threading.Event()

    def close_writers(self) -> None:
        for w in (self.stdout, self.stderr, self.error):
            if w is not None:
                try:
                    w.close()
                except OSError:
                    pass


def parse_resize_events(buf: bytes) -> tuple[list[tuple[int, int]], bytes]:
    """Complete TerminalSize objects ({"Width":..,"Height":..}) in `buf`, and the rest."""
    dec = json.JSONDecoder()
    text = buf.decode("utf-8", "replace")
    events, pos = [], 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        if pos >= len(text):
            return events, b""
        try:
            obj, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError:
            return events, text[pos:].encode()
        pos = end
        if isinstance(obj, dict):
            w, h = obj.get("Width", obj.get("width")), obj.get("Height", obj.get("height"))
            if isinstance(w, int) and isinstance(h, int) and 0 <= w <= 0xFFFF and 0 <= h <= 0xFFFF:
                events.append((w, h))


def _pump_resize(io: SessionIO, proc) -> None:
    buf = b""
    while True:
        try:
            data = io.resize.read(1024)
        except (OSError, TimeoutError):
            return
        if not data:
            return
        events, buf = parse_resize_events(buf + data)
        if len(buf) > MAX_RESIZE_BUFFER:
            log.warning("resize stream sent %d bytes that are not JSON; ignoring it", len(buf))
            return
        for w, h in events:
            try:
                proc.resize(w, h)
            except Exception as e:   # the process may be gone already
                log.debug("resize failed: %s", e)
                return


def _pump_stdin(io: SessionIO, proc) -> None:
    while True:
        try:
            data = io.stdin.read(READ_CHUNK)
        except (OSError, TimeoutError):
            data = b""
        try:
            if not data:
                proc.close_stdin()
                return
            proc.send(data)
        except Exception as e:
            log.debug("stdin to the process failed: %s", e)
            return


def pump_output(proc, io: SessionIO) -> bool:
    """Move stdout/stderr to the client until the process's channel reaches EOF.
    False if the client went away first."""
    chan = proc.channel
    out = io.stdout.write if io.stdout is not None else (lambda d: None)
    err = io.stderr.write if io.stderr is not None else (lambda d: None)
    if proc._leftover:
        out(proc._leftover)
        proc._leftover = b""
    fd = chan.fileno()
    while True:
        # sampled before draining: data always precedes EOF, so EOF seen here plus an
        # empty drain below means everything was read
        at_eof = chan.eof_received or chan.closed
        moved = False
        if chan.recv_stderr_ready():   # one chunk each per round: neither starves the other
            data = chan.recv_stderr(READ_CHUNK)
            if data:
                err(data)
                moved = True
        if chan.recv_ready():
            data = chan.recv(READ_CHUNK)
            if data:
                out(data)
                moved = True
        if moved:
            continue
        if at_eof:
            return True
        if io.gone.is_set():
            return False
        select.select([fd], [], [], 0.5)


def run_session(start, io: SessionIO, report_exit_code: bool = True) -> None:
    """start() -> ProcessStream (may raise a VmcriError). Runs to completion, writes the
    status on the error stream and closes the writers."""
    proc = None
    exit_code: int | None = None
    error: str | None = None
    try:
        try:
            proc = start()
        except errors.VmcriError as e:
            error = str(e) or type(e).__name__
            return
        except Exception as e:
            log.exception("starting the streaming process failed")
            error = f"starting the process failed: {e}"
            return
        if io.resize is not None:
            threading.Thread(target=_pump_resize, args=(io, proc), daemon=True, name="resize").start()
        if io.stdin is not None:
            threading.Thread(target=_pump_stdin, args=(io, proc), daemon=True, name="stdin").start()
        try:
            finished = pump_output(proc, io)
        except (OSError, ConnectionError) as e:
            log.info("streaming client went away: %s", e)
            finished = False
        if not finished:
            io.gone.set()
            return
        try:
            exit_code = proc.exit_status(EXIT_STATUS_WAIT_S)
        except Exception as e:
            error = f"waiting for the exit status failed: {e}"
            return
        if exit_code is None:
            error = "the process ended without an exit status"
        elif not report_exit_code:
            exit_code = 0
    finally:
        if proc is not None:
            try:
                proc.close()
            except Exception:
                pass
        if not io.gone.is_set():
            _finish(io, exit_code, error)


def _finish(io: SessionIO, exit_code, error) -> None:
    try:
        if io.error is not None:
            msg = status_message(io.protocol, exit_code, error)
            if msg:
                io.error.write(msg)
    except (OSError, ConnectionError) as e:
        log.debug("writing the exit status failed: %s", e)
    io.close_writers()


def expected_streams(protocol: str, stdin: bool, stdout: bool, stderr: bool, tty: bool) -> set[str]:
    want = {STREAM_ERROR}
    if stdin:
        want.add(STREAM_STDIN)
    if stdout:
        want.add(STREAM_STDOUT)
    if stderr and not tty:
        want.add(STREAM_STDERR)
    if tty and supports_resize(protocol):
        want.add(STREAM_RESIZE)
    return want


def serve_spdy(conn_factory, protocol: str, start, stdin: bool, stdout: bool, stderr: bool,
               tty: bool, stream_timeout: float, report_exit_code: bool = True) -> None:
    """Exec/attach on a SPDY connection: wait for the client's streams (any order), run
    the session, then close. conn_factory(on_stream) -> started spdy_session.Connection."""
    want = expected_streams(protocol, stdin, stdout, stderr, tty)
    streams: dict[str, object] = {}
    lock = threading.Lock()
    ready = threading.Event()

    def on_stream(stream) -> bool:
        kind = stream.header("streamtype")
        with lock:
            if kind not in (STREAM_ERROR, STREAM_STDIN, STREAM_STDOUT, STREAM_STDERR, STREAM_RESIZE) \
                    or kind in streams:
                log.info("exec: refusing stream with streamType %r", kind)
                return False
            streams[kind] = stream
            if kind not in want or kind in (STREAM_STDOUT, STREAM_STDERR, STREAM_ERROR):
                stream.discard_input()   # the client never writes these (or we did not ask)
            if want <= streams.keys():
                ready.set()
        return True

    conn = conn_factory(on_stream)
    try:
        if not _wait_ready(ready, conn, stream_timeout):
            err = streams.get(STREAM_ERROR)
            if err is not None and not conn.closed.is_set():
                missing = ", ".join(sorted(want - streams.keys()))
                try:
                    err.write(status_message(protocol, None, f"timed out waiting for client to create streams: {missing}"))
                except (OSError, ConnectionError):
                    pass
            return
        with lock:
            opened = list(streams.items())
        for _, s in opened:
            s.replied.wait()   # the reader thread answers each stream before we may end it
        io = SessionIO(protocol, **{k: streams.get(k) for k in want if k != STREAM_ERROR},
                       error=streams[STREAM_ERROR])
        threading.Thread(target=lambda: (conn.closed.wait(), io.gone.set()), daemon=True).start()
        run_session(start, io, report_exit_code)
        with lock:
            opened = list(streams.items())
        for kind, s in opened:
            if kind not in want:
                s.close()
    finally:
        conn.shutdown()


def _wait_ready(ready: threading.Event, conn, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not ready.is_set():
        left = deadline - time.monotonic()
        if left <= 0 or conn.closed.is_set():
            return False
        ready.wait(min(left, 0.5))
    return True
