"""One container under conmon (CRI-O's monitor, Debian's conmon 2.1).

conmon runs `crun create`, then holds the container's stdio: it writes the kubelet's
log file itself (the `k8s-file` driver: the CRI line format), serves an attach socket,
and writes the exit code to an exit file when the container ends. It is its own session
leader, so a daemon killed with -9 leaves it running; a restarted daemon finds the
container again through crun's state, conmon's pid file and the exit file.

The log is written by conmon rather than by the daemon's CriLogWriter on purpose: output
of a container whose daemon is down would otherwise have nowhere to go (conmon buffers
nothing for absent attach clients), and "exactly once across a kill -9" then needs no
offsets at all. ReopenContainerLog asks conmon to reopen through its ctl fifo.
"""
from __future__ import annotations

import errno
import json
import os
import select
import subprocess
import time
from dataclasses import dataclass

from vmcri.errors import Unavailable

SYNC_TIMEOUT_S = 60.0
ATTACH = "attach"
EXIT_DIR = "exit"
PERSIST_DIR = "persist"
MAX_SYNC_BYTES = 64 * 1024
# conmon's ctl/winsz messages: "<type> <height> <width>\n"
WIN_RESIZE_EVENT, REOPEN_LOGS_EVENT = 1, 2


@dataclass(frozen=True)
class MonitorFiles:
    """What conmon keeps for one container, all inside the container's bundle dir."""
    bundle: str
    container_id: str

    @property
    def exit_dir(self) -> str:
        return os.path.join(self.bundle, EXIT_DIR)

    @property
    def exit_file(self) -> str:
        return os.path.join(self.exit_dir, self.container_id)

    @property
    def persist_dir(self) -> str:
        return os.path.join(self.bundle, PERSIST_DIR)

    @property
    def oom_file(self) -> str:
        return os.path.join(self.persist_dir, "oom")

    @property
    def pid_file(self) -> str:
        return os.path.join(self.bundle, "pidfile")

    @property
    def conmon_pid_file(self) -> str:
        return os.path.join(self.bundle, "conmon.pid")

    @property
    def conmon_log(self) -> str:
        return os.path.join(self.bundle, "conmon.log")

    @property
    def cuuid(self) -> str:
        return self.container_id[:24]  # conmon's attach socket link name, kept short


def _argv(rt, files: MonitorFiles, log_path: str, tty: bool, stdin: bool,
          stdin_once: bool) -> list[str]:
    argv = [rt.conmon, "--api-version", "1", "-c", files.container_id, "-u", files.cuuid,
            "-n", files.container_id, "-r", rt.crun, "--runtime-arg", f"--root={rt.crun_root}",
            "-b", files.bundle, "-p", files.pid_file, "-P", files.conmon_pid_file,
            "-l", f"k8s-file:{log_path}", "--exit-dir", files.exit_dir,
            "--persist-dir", files.persist_dir, "--socket-dir-path", rt.socket_dir,
            "--log-level", "info"]
    if tty:
        argv.append("-t")
    if stdin:
        argv.append("-i")
        if not stdin_once:
            argv.append("--leave-stdin-open")  # CRI-O: stdin stays open across attaches
    return rt.wrap(argv)


def create(rt, files: MonitorFiles, log_path: str, tty: bool = False, stdin: bool = False,
           stdin_once: bool = False) -> int:
    """Start conmon, which runs `crun create`; returns the container's init pid.
    Raises Unavailable with crun's message if the create failed."""
    for d in (files.exit_dir, files.persist_dir):
        os.makedirs(d, mode=0o700, exist_ok=True)
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "TZ": "UTC",
           "_OCI_SYNCPIPE": str(write_fd)}
    try:
        with open(files.conmon_log, "ab") as err:
            # cwd: conmon also drops an "oom" file in its working directory
            proc = subprocess.Popen(_argv(rt, files, log_path, tty, stdin, stdin_once), env=env,
                                    pass_fds=(write_fd,), stdin=subprocess.DEVNULL, cwd=files.bundle,
                                    stdout=err, stderr=err, start_new_session=True)
        os.close(write_fd)
        write_fd = -1
        reply = _read_sync(read_fd, proc)
    finally:
        if write_fd >= 0:
            os.close(write_fd)
        os.close(read_fd)
    pid = reply.get("data")
    if not isinstance(pid, int) or pid <= 0:
        message = str(reply.get("message") or "no reason given")[:2000].strip()
        raise Unavailable(f"crun create on the host failed: {message}")
    return pid


def _read_sync(fd: int, proc: subprocess.Popen) -> dict:
    """conmon writes {"data": pid} (or {"data": -1, "message": ...}) once create is done."""
    deadline = time.monotonic() + SYNC_TIMEOUT_S
    buf = b""
    while time.monotonic() < deadline and len(buf) < MAX_SYNC_BYTES:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
        if b"\n" in buf:
            break
    proc.wait(timeout=5)  # the first conmon process exits once it has daemonized
    try:
        reply = json.loads(buf.split(b"\n", 1)[0] or b"{}")
    except ValueError:
        reply = {}
    if not isinstance(reply, dict) or not reply:
        return {"data": -1, "message": f"conmon said nothing (exit {proc.returncode}); see "
                                       f"its log {buf[:200]!r}"}
    return reply


def _read_int(path: str) -> int | None:
    try:
        with open(path, "rb") as f:
            text = f.read(64).strip()
    except OSError:
        return None
    try:
        return int(text)
    except ValueError:
        return None


def exit_code(files: MonitorFiles) -> int | None:
    """The container's exit code once conmon has written it (128+N for signal N)."""
    return _read_int(files.exit_file)


def oom_killed(files: MonitorFiles) -> bool:
    return os.path.exists(files.oom_file)


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read(65536)
    except OSError:
        return b""


def monitor_pid(files: MonitorFiles) -> int | None:
    """conmon's pid, if a conmon for this very container still runs."""
    pid = _read_int(files.conmon_pid_file)
    if pid is None or pid <= 0:
        return None
    argv = _cmdline(pid).split(b"\0")
    if b"conmon" not in os.path.basename(argv[0]) or files.container_id.encode() not in argv:
        return None  # the pid was reused by something else
    return pid


def wait_monitor(files: MonitorFiles, timeout: float | None) -> bool:
    """Block until conmon has gone (True) or the timeout passes (False)."""
    pid = monitor_pid(files)
    if pid is None:
        return True
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return True
    try:
        if monitor_pid(files) != pid:  # gone (or reused) between the read and the open
            return True
        ready, _, _ = select.select([pidfd], [], [], timeout)
        return bool(ready)
    finally:
        os.close(pidfd)


def _write_fifo(bundle: str, name: str, message: str) -> bool:
    try:
        fd = os.open(os.path.join(bundle, name), os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ENXIO, errno.ENOENT):
            return False  # conmon has gone
        raise
    try:
        os.write(fd, message.encode())
    finally:
        os.close(fd)
    return True


def reopen_log(files: MonitorFiles) -> bool:
    return _write_fifo(files.bundle, "ctl", f"{REOPEN_LOGS_EVENT} 0 0\n")


def resize(files: MonitorFiles, cols: int, rows: int) -> bool:
    return _write_fifo(files.bundle, "winsz", f"{WIN_RESIZE_EVENT} {rows} {cols}\n")


def attach_socket_path(files: MonitorFiles, dir_fd: int) -> str:
    """The attach socket through an open fd of the bundle: its real path is too long for
    a sockaddr_un."""
    return f"/proc/self/fd/{dir_fd}/{ATTACH}"
