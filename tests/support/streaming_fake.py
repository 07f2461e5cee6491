"""A streaming backend over real local processes and sockets, for the streaming tests.

FakeChannel gives a local subprocess the parts of a paramiko Channel that
vmcri.channel.ProcessStream and the streaming pumps use (recv/recv_stderr/ready
checks, a fileno() that is readable while data waits or after EOF, exit status,
shutdown_write, resize_pty), so the tests run the real ProcessStream class.
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

from vmcri import errors
from vmcri.channel import ProcessStream


class FakeChannel:
    def __init__(self, argv: list[str], tty: bool, stdin: bool):
        self._lock = threading.Lock()
        self._out = bytearray()
        self._err = bytearray()
        self._evr, self._evw = os.pipe()
        self._ev_set = False
        self.closed = False
        self.eof_received = False
        self.exit_status = -1
        self.status_event = threading.Event()
        self.resizes: list[tuple[int, int]] = []
        self._master = None
        if tty:
            master, slave = pty.openpty()
            self._master = master
            self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave,
                                         start_new_session=True, close_fds=True)
            os.close(slave)
            self._stdin_fd = master if stdin else None
            readers = [(master, self._out)]
        else:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            self._stdin_fd = self.proc.stdin.fileno() if stdin else None
            readers = [(self.proc.stdout.fileno(), self._out), (self.proc.stderr.fileno(), self._err)]
        self._threads = [threading.Thread(target=self._read, args=r, daemon=True) for r in readers]
        for t in self._threads:
            t.start()
        threading.Thread(target=self._wait, daemon=True).start()

    # level-triggered readiness pipe, like paramiko's
    def _update_event_locked(self):
        want = bool(self._out or self._err or self.eof_received or self.closed)
        if want and not self._ev_set:
            os.write(self._evw, b"x")
            self._ev_set = True
        elif not want and self._ev_set:
            os.read(self._evr, 1)
            self._ev_set = False

    def _read(self, fd, buf):
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:   # EIO on a pty whose child exited
                data = b""
            if not data:
                return
            with self._lock:
                buf += data
                self._update_event_locked()

    def _wait(self):
        code = self.proc.wait()
        for t in self._threads:
            t.join()
        with self._lock:
            self.exit_status = code if code >= 0 else 128 - code
            self.status_event.set()
            self.eof_received = True
            self._update_event_locked()

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
            self._update_event_locked()
            return data

    def recv(self, n):
        return self._take(self._out, n)

    def recv_stderr(self, n):
        return self._take(self._err, n)

    def settimeout(self, t):
        pass

    def sendall(self, data):
        if self._stdin_fd is None:
            raise OSError("stdin was not requested")
        view = memoryview(data)
        while view:
            view = view[os.write(self._stdin_fd, view):]

    def shutdown_write(self):
        if self._master is not None and self._stdin_fd is not None:
            os.write(self._master, b"\x04")   # ^D: EOF for the tty's reader
        elif self.proc.stdin is not None:
            self.proc.stdin.close()

    def resize_pty(self, width, height):
        self.resizes.append((width, height))
        if self._master is not None:
            fcntl.ioctl(self._master, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

    def close(self):
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._update_event_locked()
        if self.proc.poll() is None:
            self.proc.kill()


class FakeBackend:
    """containers: id -> argv run by attach (the 'main process'); sandboxes: ids that
    port_forward accepts (it dials 127.0.0.1:port on the host)."""

    def __init__(self, containers: dict[str, list[str]] | None = None, sandboxes=("pod1",)):
        self.containers = containers if containers is not None else {"c1": ["sh", "-c", "cat"]}
        self.sandboxes = set(sandboxes)
        self.channels: list[FakeChannel] = []
        self.dialed: list[int] = []
        self.exec_calls: list[tuple] = []
        self.stuck = threading.Event()   # exec of ["stuck"] waits on it: a stuck backend

    def check_container(self, container_id):
        if container_id not in self.containers:
            raise errors.NotFound(f"container {container_id} not found")

    def check_sandbox(self, sandbox_id):
        if sandbox_id not in self.sandboxes:
            raise errors.NotFound(f"pod sandbox {sandbox_id} not found")

    def _start(self, argv, tty, stdin):
        chan = FakeChannel(argv, tty, stdin)
        self.channels.append(chan)
        return ProcessStream(chan, {"id": "p", "pid": chan.proc.pid}, b"")

    def exec(self, container_id, cmd, tty, stdin):
        self.exec_calls.append((container_id, list(cmd), tty, stdin))
        if cmd and cmd[0] == "stuck":
            self.stuck.wait()
        self.check_container(container_id)
        if cmd[0] == "fail-to-start":
            raise errors.FailedPrecondition("container c1 is not running")
        return self._start(list(cmd), tty, stdin)

    def attach(self, container_id, stdin, tty):
        self.check_container(container_id)
        return self._start(self.containers[container_id], tty, stdin)

    def port_forward(self, sandbox_id, port):
        self.check_sandbox(sandbox_id)
        self.dialed.append(port)
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.settimeout(None)
        return sock


class EchoServer:
    """TCP echo on 127.0.0.1: echoes until the client half-closes, then closes."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn):
        conn.settimeout(None)
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                conn.sendall(data)

    def close(self):
        self.sock.close()
