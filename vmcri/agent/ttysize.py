"""Pass a window size on to the terminal a child made for itself.

`crun exec -t` runs the exec'd process on a pty of its own, inside the container, and copies
only the size it starts with: it does not forward SIGWINCH. So resizing the pty the agent
holds reaches crun, never the process the user is typing into. Here the agent sets the new
size on that inner pty too:
- through its master, which crun keeps open to relay the I/O: the agent takes a copy of
  that fd with pidfd_getfd(2) (a reopen of /proc/PID/fd/N of a ptmx would make a new pty);
- else through the slave that a descendant has as its stdin.
TIOCSWINSZ on either end applies to the pair and signals its foreground group.

Container processes are not trusted: a descendant's fd 0 is opened only if it is a pty
slave character device (UNIX98 majors 136-143), non-blocking and without taking it as a
controlling terminal, so nothing a container points its stdin at can make the agent block
or touch another device; a copied fd is used only if the kernel says it is a pty master."""
from __future__ import annotations

import ctypes
import fcntl
import os
import stat
import struct
import termios

PTS_MAJORS = range(136, 144)
MAX_PROCS_SCANNED = 256
MAX_DEPTH = 4
MAX_FDS_SCANNED = 256
SYS_PIDFD_GETFD = 438  # x86_64 (and every arch since 5.6 shares the number)
TIOCGPTN = 0x80045430
_libc = ctypes.CDLL(None, use_errno=True)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read(65536).split()]
    except (OSError, ValueError):
        return []


def _pty_slave(pid: int) -> int | None:
    """st_rdev of pid's stdin when it is a pty slave, else None."""
    try:
        st = os.stat(f"/proc/{pid}/fd/0")
    except OSError:
        return None
    if stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) in PTS_MAJORS:
        return st.st_rdev
    return None


def _set_size(pid: int, rdev: int, winsize: bytes) -> None:
    try:
        fd = os.open(f"/proc/{pid}/fd/0", os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return
    try:
        if os.fstat(fd).st_rdev == rdev and os.isatty(fd):  # still the device we checked
            fcntl.ioctl(fd, termios.TIOCSWINSZ, winsize)
    except OSError:
        pass
    finally:
        os.close(fd)


def _copy_fd(pidfd: int, fd: int) -> int | None:
    got = _libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
    return got if got >= 0 else None


def _resize_masters(pid: int, winsize: bytes) -> int:
    """TIOCSWINSZ on the pty masters pid holds; returns how many."""
    try:
        names = os.listdir(f"/proc/{pid}/fd")[:MAX_FDS_SCANNED]
        pidfd = os.pidfd_open(pid)
    except OSError:
        return 0
    done = 0
    try:
        for n in names:
            try:
                if "ptmx" not in os.readlink(f"/proc/{pid}/fd/{n}"):
                    continue
            except OSError:
                continue
            fd = _copy_fd(pidfd, int(n))
            if fd is None:
                continue
            try:
                fcntl.ioctl(fd, TIOCGPTN, b"\0" * 4)  # only a master answers this
                fcntl.ioctl(fd, termios.TIOCSWINSZ, winsize)
                done += 1
            except OSError:
                pass
            finally:
                os.close(fd)
    finally:
        os.close(pidfd)
    return done


def propagate(pid: int, cols: int, rows: int) -> int:
    """Set cols x rows on the ptys that pid (crun) and its descendants made; returns how
    many were set."""
    winsize = struct.pack("HHHH", rows, cols, 0, 0)
    masters = _resize_masters(pid, winsize)
    if masters:
        return masters
    outer = _pty_slave(pid)  # the agent's own pty, already resized
    done: set[int] = set()
    frontier, scanned = [(c, 1) for c in _children(pid)], 0
    while frontier and scanned < MAX_PROCS_SCANNED:
        child, depth = frontier.pop(0)
        scanned += 1
        rdev = _pty_slave(child)
        if rdev is not None and rdev != outer:
            if rdev not in done:
                _set_size(child, rdev, winsize)
                done.add(rdev)
            continue  # its own descendants belong to that terminal
        if depth < MAX_DEPTH:
            frontier += [(c, depth + 1) for c in _children(child)]
    return len(done)
