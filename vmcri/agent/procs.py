"""Processes started by `run`: they outlive the SSH channel that started them.

Their output is kept and streamed like a container's (outstream.py); `attach` after a
reconnect resumes after what the host was sent.
"""
from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import termios
import threading

from . import protocol, ttysize
from .outstream import OutputSource
from .pid1 import Reaper

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


class Process(OutputSource):
    """A `run` process: it outlives the channel that started it, and leaves the table once
    a pump has delivered its exit status."""

    def __init__(self, pid_id: str, reaper: Reaper, argv, env, cwd, tty: bool, want_stdin: bool,
                 size: tuple[int, int] | None = None, on_end=None, spawner=None):
        super().__init__(pid_id, tty)
        self._on_end = on_end  # called with the wait status once the process has exited
        full_env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}
        full_env.update(env)
        if spawner is None:  # spawner((stdin, stdout, stderr), tty) -> pid
            spawner = lambda stdio, tty: spawn(argv, env=full_env, cwd=cwd, tty_fd=stdio[0]) \
                if tty else spawn(argv, env=full_env, cwd=cwd, stdin=stdio[0], stdout=stdio[1],
                                  stderr=stdio[2])
        if tty:
            full_env.setdefault("TERM", "xterm")
            master, slave = os.openpty()
            self._stdin_fd = master
            if size is not None:  # before the child starts: it may ask for its size at once
                self.resize(*size)
            try:
                self.pid = spawner((slave, slave, slave), True)
            finally:
                os.close(slave)
            self.start_reader(os.dup(master), 1)
        else:
            r_in, w_in = os.pipe() if want_stdin else (None, None)
            r_out, w_out = os.pipe()
            r_err, w_err = os.pipe()
            devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC) if not want_stdin else None
            try:
                self.pid = spawner((r_in if want_stdin else devnull, w_out, w_err), False)
            except BaseException:
                for fd in (r_in, w_in, r_out, r_err):
                    if fd is not None:
                        os.close(fd)
                raise
            finally:
                for fd in (r_in, w_out, w_err, devnull):
                    if fd is not None:
                        os.close(fd)
            self._stdin_fd = w_in
            self.start_reader(r_out, 1)
            self.start_reader(r_err, 2)
        reaper.watch(self.pid, self.on_exit)

    def on_exit(self, status: int) -> None:
        if self._on_end is not None:
            self._on_end(status)
        super().on_exit(status)

    @property
    def delivered(self) -> bool:
        return self.exit_sent

    def _exit_delivered(self) -> None:
        self.close_stdin()

    def _stdin_ended(self, chan, first: bool) -> bool:
        # the host's EOF (not a dropped connection, which a re-attach resumes) ends stdin
        return chan.eof_received and (self.tty or not chan.closed)

    def resize(self, cols: int, rows: int) -> None:
        super().resize(cols, rows)
        if self.tty and self.pid > 0 and self.status is None:
            ttysize.propagate(self.pid, cols, rows)  # `crun exec -t` keeps a pty of its own

    def signal(self, name: str) -> None:
        sig = getattr(signal, "SIG" + protocol.check_signal(name))
        try:
            if self.tty:
                os.killpg(self.pid, sig)
            else:
                os.kill(self.pid, sig)
        except ProcessLookupError:
            pass


class ProcessTable:
    def __init__(self, reaper: Reaper):
        self.reaper = reaper
        self._lock = threading.Lock()
        self._procs: dict[str, Process] = {}
        self._seq = 0

    def start(self, params: dict, size: tuple[int, int] | None = None,
              on_end=None, spawner=None) -> Process:
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
                           params["tty"], params["stdin"], size, on_end, spawner)
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
