"""Host processes as vmcri.channel.ProcessStream, so the streaming server serves host
pods exactly as VM pods.

ProcessStream and the streaming pumps use a small part of a paramiko Channel: recv /
recv_stderr and their ready checks, a fileno() readable while data waits or after EOF,
eof_received/closed, exit_status with status_event, sendall, shutdown_write and
resize_pty. LocalChannel gives that over a local process (`crun exec`), ConsoleChannel
over a `crun exec` whose tty crun makes in the container, AttachChannel
over conmon's attach socket (SEQPACKET; each packet from conmon starts with its pipe:
2 stdout, 3 stderr; what the client sends is the container's stdin).
"""
from __future__ import annotations

import fcntl
import os
import pty
import socket
import struct
import subprocess
import termios
import threading
import time

from vmcri.channel import ProcessStream

ATTACH_STDOUT, ATTACH_STDERR = 2, 3
ATTACH_PACKET = 8192 + 1


class _Buffered:
    """The readiness pipe and buffers both channels share (level-triggered like paramiko's)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._out = bytearray()
        self._err = bytearray()
        self._evr, self._evw = os.pipe2(os.O_CLOEXEC)
        self._ev_set = False
        self.closed = False
        self.eof_received = False
        self.exit_status = -1
        self.status_event = threading.Event()

    def _update_locked(self):
        want = bool(self._out or self._err or self.eof_received or self.closed)
        if want and not self._ev_set:
            os.write(self._evw, b"x")
            self._ev_set = True
        elif not want and self._ev_set:
            os.read(self._evr, 1)
            self._ev_set = False

    def _add(self, buf: bytearray, data: bytes) -> None:
        with self._lock:
            buf += data
            self._update_locked()

    def _finish(self, status: int) -> None:
        with self._lock:
            self.exit_status = status
            self.eof_received = True
            self._update_locked()
        self.status_event.set()

    def fileno(self):
        return self._evr

    def recv_ready(self):
        with self._lock:
            return bool(self._out)

    def recv_stderr_ready(self):
        with self._lock:
            return bool(self._err)

    def exit_status_ready(self):
        return self.status_event.is_set()

    def _take(self, buf, n):
        with self._lock:
            data = bytes(buf[:n])
            del buf[:n]
            self._update_locked()
            return data

    def recv(self, n):
        return self._take(self._out, n)

    def recv_stderr(self, n):
        return self._take(self._err, n)

    def settimeout(self, t):
        pass


class LocalChannel(_Buffered):
    """A local process; with tty its stdio is one pty (stderr joins stdout, as in a tty)."""

    def __init__(self, argv: list[str], tty: bool, stdin: bool, env: dict | None = None):
        super().__init__()
        self._master = None
        if tty:
            master, slave = pty.openpty()
            self._master = master
            self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                                         start_new_session=True, close_fds=True)
            os.close(slave)
            self._stdin_fd = master if stdin else None
            readers = [(master, self._out)]
        else:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
            self._stdin_fd = self.proc.stdin.fileno() if stdin else None
            readers = [(self.proc.stdout.fileno(), self._out), (self.proc.stderr.fileno(), self._err)]
        self._threads = [threading.Thread(target=self._read, args=r, daemon=True) for r in readers]
        for t in self._threads:
            t.start()
        threading.Thread(target=self._wait, daemon=True).start()

    def _read(self, fd, buf):
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO on a pty whose last writer is gone
                data = b""
            if not data:
                return
            self._add(buf, data)

    def _wait(self):
        code = self.proc.wait()
        for t in self._threads:
            t.join()
        self._finish(code if code >= 0 else 128 - code)

    def sendall(self, data):
        if self._stdin_fd is None:
            raise OSError("stdin was not requested")
        view = memoryview(data)
        while view:
            view = view[os.write(self._stdin_fd, view):]

    def shutdown_write(self):
        if self._master is not None and self._stdin_fd is not None:
            os.write(self._master, b"\x04")  # ^D: EOF for the tty's reader
        elif self.proc.stdin is not None:
            self.proc.stdin.close()

    def resize_pty(self, width, height):
        if self._master is not None:
            fcntl.ioctl(self._master, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

    def close(self):
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._update_locked()
        if self.proc.poll() is None:
            self.proc.kill()


class AttachChannel(_Buffered):
    """conmon's attach socket. The exit status comes from `exit_code()` (the exit file)
    once conmon closes the socket because the container ended."""

    def __init__(self, sock: socket.socket, exit_code, resize=None, stdin: bool = False):
        super().__init__()
        self.sock = sock
        self._exit_code = exit_code
        self._resize = resize
        self._stdin = stdin
        threading.Thread(target=self._read, daemon=True, name="attach").start()

    def _read(self):
        while True:
            try:
                packet = self.sock.recv(ATTACH_PACKET)
            except OSError:
                packet = b""
            if not packet:
                break
            kind, data = packet[0], packet[1:]
            if data:
                self._add(self._err if kind == ATTACH_STDERR else self._out, data)
        code = None
        if not self.closed:
            code = self._exit_code()
        self._finish(-1 if code is None else code)

    def sendall(self, data):
        if not self._stdin:
            raise OSError("stdin was not requested")
        self.sock.sendall(data)

    def shutdown_write(self):
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def resize_pty(self, width, height):
        if self._resize is not None:
            self._resize(width, height)

    def close(self):
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._update_locked()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def process_stream(chan, pid: int | None = None) -> ProcessStream:
    return ProcessStream(chan, {"pid": pid}, b"")


class ConsoleChannel(_Buffered):
    """`crun exec` of a process with terminal=true: crun makes the pty inside the
    container (the process's controlling terminal, on the container's devpts) and hands
    the master end over a unix socket (--console-socket)."""
    ACCEPT_TIMEOUT_S = 30.0

    def __init__(self, argv_with_socket, socket_path: str, stdin: bool):
        super().__init__()
        self._stdin = stdin
        self._master = None
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind(socket_path)
            listener.listen(1)
            self.proc = subprocess.Popen(argv_with_socket, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            self._master = self._receive_master(listener)
        finally:
            listener.close()
            try:
                os.unlink(socket_path)
            except OSError:
                pass
        if self._master is None:
            err = self.proc.stderr.read(2000).decode(errors="replace").strip() if self.proc.poll() is not None else ""
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            raise OSError(f"crun exec gave no console: {err or 'timed out'}")
        threading.Thread(target=self._read, daemon=True, name="console").start()

    def _receive_master(self, listener) -> int | None:
        listener.settimeout(0.5)
        deadline = time.monotonic() + self.ACCEPT_TIMEOUT_S
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            with conn:
                _, ancdata, _, _ = conn.recvmsg(4096, socket.CMSG_SPACE(4))
            for level, kind, data in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS and len(data) >= 4:
                    return struct.unpack("i", data[:4])[0]
            return None
        return None

    def _read(self):
        while True:
            try:
                data = os.read(self._master, 65536)
            except OSError:  # EIO: the last process holding the pty is gone
                data = b""
            if not data:
                break
            self._add(self._out, data)
        code = self.proc.wait()
        self._finish(code if code >= 0 else 128 - code)

    def sendall(self, data):
        if not self._stdin:
            raise OSError("stdin was not requested")
        view = memoryview(data)
        while view:
            view = view[os.write(self._master, view):]

    def shutdown_write(self):
        if self._stdin:
            os.write(self._master, b"\x04")  # ^D: EOF for the tty's reader

    def resize_pty(self, width, height):
        fcntl.ioctl(self._master, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

    def close(self):
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._update_locked()
        if self.proc.poll() is None:
            self.proc.kill()
