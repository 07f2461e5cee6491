"""Processes started by `run`: they outlive the SSH channel that started them.

Output goes into a bounded buffer (drop-oldest, counted) that one pump thread drains
into whichever channel is attached; `attach` after a reconnect picks up from there.
"""
from __future__ import annotations

import collections
import errno
import fcntl
import os
import signal
import struct
import subprocess
import termios
import threading

from . import protocol
from .pid1 import Reaper, exit_code

MAX_FINISHED_KEPT = 256


def spawn(argv, *, env=None, cwd="/", stdin=None, stdout=None, stderr=None, tty_fd=None):
    """Start argv; returns the pid. The reaper owns the exit status (never Popen.wait)."""
    kw = {}
    if tty_fd is not None:
        stdin = stdout = stderr = tty_fd
        kw["preexec_fn"] = lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    p = subprocess.Popen(argv, env=env, cwd=cwd, stdin=stdin, stdout=stdout, stderr=stderr,
                         start_new_session=True, close_fds=True, **kw)
    p.returncode = -1  # keep subprocess's own cleanup from ever calling waitpid on it
    return p.pid


class Process:
    def __init__(self, pid_id: str, reaper: Reaper, argv, env, cwd, tty: bool, want_stdin: bool,
                 size: tuple[int, int] | None = None):
        self.id = pid_id
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._buf: collections.deque[tuple[int, bytes]] = collections.deque()
        self._buffered = 0
        self.dropped = 0
        self.status: int | None = None
        self._open_streams = 0
        self._chan = None
        self._attach_gen = 0
        self.delivered = False
        self.tty = tty
        full_env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}
        full_env.update(env)
        if tty:
            full_env.setdefault("TERM", "xterm")
            master, slave = os.openpty()
            self._stdin_fd = master
            if size is not None:  # before the child starts: it may ask for its size at once
                self.resize(*size)
            try:
                self.pid = spawn(argv, env=full_env, cwd=cwd, tty_fd=slave)
            finally:
                os.close(slave)
            self._start_reader(os.dup(master), 1)
        else:
            r_in, w_in = os.pipe() if want_stdin else (None, None)
            r_out, w_out = os.pipe()
            r_err, w_err = os.pipe()
            try:
                self.pid = spawn(argv, env=full_env, cwd=cwd,
                                 stdin=r_in if want_stdin else subprocess.DEVNULL,
                                 stdout=w_out, stderr=w_err)
            except BaseException:
                for fd in (r_in, w_in, r_out, r_err):
                    if fd is not None:
                        os.close(fd)
                raise
            finally:
                for fd in (r_in, w_out, w_err):
                    if fd is not None:
                        os.close(fd)
            self._stdin_fd = w_in
            self._start_reader(r_out, 1)
            self._start_reader(r_err, 2)
        reaper.watch(self.pid, self._on_exit)

    # -- output side --------------------------------------------------------
    def _start_reader(self, fd: int, stream: int) -> None:
        self._open_streams += 1
        threading.Thread(target=self._read_loop, args=(fd, stream), daemon=True,
                         name=f"out-{self.id}-{stream}").start()

    def _read_loop(self, fd: int, stream: int) -> None:
        try:
            while True:
                try:
                    data = os.read(fd, 65536)
                except OSError as e:
                    if e.errno == errno.EINTR:
                        continue
                    break  # EIO on a pty master once the last slave fd closes
                if not data:
                    break
                with self._lock:
                    self._buf.append((stream, data))
                    self._buffered += len(data)
                    while self._buffered > protocol.PROCESS_BUFFER_BYTES and self._buf:
                        _, old = self._buf.popleft()
                        self._buffered -= len(old)
                        self.dropped += len(old)
                    self._cond.notify_all()
        finally:
            os.close(fd)
            with self._lock:
                self._open_streams -= 1
                self._cond.notify_all()

    def _on_exit(self, status: int) -> None:
        with self._lock:
            self.status = status
            self._cond.notify_all()

    @property
    def finished(self) -> bool:
        with self._lock:
            return self.status is not None and self._open_streams == 0 and not self._buf

    # -- attach / detach ---------------------------------------------------
    def attach(self, chan, with_stdin: bool) -> None:
        with self._lock:
            self._attach_gen += 1
            gen = self._attach_gen
            old, self._chan = self._chan, chan
            self._cond.notify_all()
        if old is not None:
            try:
                old.close()
            except Exception:
                pass
        threading.Thread(target=self._pump, args=(chan, gen), daemon=True, name=f"pump-{self.id}").start()
        if with_stdin and self._stdin_fd is not None:
            threading.Thread(target=self._stdin_loop, args=(chan,), daemon=True, name=f"in-{self.id}").start()

    def _pump(self, chan, gen: int) -> None:
        while True:
            with self._lock:
                while (not self._buf and gen == self._attach_gen
                       and not (self.status is not None and self._open_streams == 0)):
                    self._cond.wait(5.0)
                    if chan.closed or not chan.get_transport().is_active():
                        break
                if gen != self._attach_gen or chan.closed or not chan.get_transport().is_active():
                    if self._chan is chan:
                        self._chan = None
                    return
                items = list(self._buf)
                self._buf.clear()
                self._buffered = 0
                done = self.status is not None and self._open_streams == 0
            sent = 0
            try:
                for stream, data in items:
                    if stream == 1:
                        chan.sendall(data)
                    else:
                        chan.sendall_stderr(data)
                    sent += 1
                if not items and done:
                    chan.send_exit_status(exit_code(self.status))
                    chan.shutdown_write()
                    chan.close()
                    with self._lock:
                        self.delivered = True
                        self._chan = None
                    self.close_stdin()
                    return
            except Exception:
                # host went away mid-send: keep what was not sent for the next attach
                with self._lock:
                    for item in reversed(items[sent:]):
                        self._buf.appendleft(item)
                        self._buffered += len(item[1])
                    if self._chan is chan:
                        self._chan = None
                return

    def _stdin_loop(self, chan) -> None:
        while True:
            try:
                data = chan.recv(32768)
            except Exception:
                return
            if not data:
                if chan.eof_received and not chan.closed and self._stdin_fd is not None and not self.tty:
                    fd, self._stdin_fd = self._stdin_fd, None
                    os.close(fd)
                elif chan.eof_received and self.tty and self._stdin_fd is not None:
                    try:
                        os.write(self._stdin_fd, b"\x04")  # ^D: EOF for the line discipline
                    except OSError:
                        pass
                return
            fd = self._stdin_fd
            if fd is None:
                continue
            try:
                os.write(fd, data)
            except OSError:
                return

    def close_stdin(self) -> None:
        """Release our end of the process's input (pipe or pty master) once it is over."""
        fd, self._stdin_fd = self._stdin_fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def signal(self, name: str) -> None:
        sig = getattr(signal, "SIG" + protocol.check_signal(name))
        try:
            if self.tty:
                os.killpg(self.pid, sig)
            else:
                os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def resize(self, cols: int, rows: int) -> None:
        if self.tty and self._stdin_fd is not None:
            fcntl.ioctl(self._stdin_fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class ProcessTable:
    def __init__(self, reaper: Reaper):
        self.reaper = reaper
        self._lock = threading.Lock()
        self._procs: dict[str, Process] = {}
        self._seq = 0

    def start(self, params: dict, size: tuple[int, int] | None = None) -> Process:
        with self._lock:
            self._gc()
            pid_id = params.get("id")
            if pid_id is None:
                self._seq += 1
                pid_id = f"p{self._seq}"
            if pid_id in self._procs:
                raise FileExistsError(f"id: process {pid_id!r} already exists")
            self._procs[pid_id] = None  # reserve
        try:
            proc = Process(pid_id, self.reaper, params["argv"], params["env"], params["cwd"],
                           params["tty"], params["stdin"], size)
        except BaseException:
            with self._lock:
                self._procs.pop(pid_id, None)
            raise
        with self._lock:
            self._procs[pid_id] = proc
        return proc

    def adopt(self, entry) -> None:
        """Register an entry made elsewhere (a container) under its own id."""
        with self._lock:
            if entry.id in self._procs:
                raise FileExistsError(f"id: process {entry.id!r} already exists")
            self._procs[entry.id] = entry

    def forget(self, pid_id: str) -> None:
        with self._lock:
            self._procs.pop(pid_id, None)

    def get(self, pid_id: str) -> Process | None:
        with self._lock:
            return self._procs.get(pid_id)

    def _gc(self) -> None:
        done = [k for k, p in self._procs.items() if p is not None and p.delivered]
        for k in done:
            del self._procs[k]
        finished = [k for k, p in self._procs.items() if p is not None and p.finished]
        for k in finished[: max(0, len(finished) - MAX_FINISHED_KEPT)]:
            self._procs.pop(k).close_stdin()

    def kill_all(self) -> None:
        with self._lock:
            procs = [p for p in self._procs.values() if p is not None]
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass
