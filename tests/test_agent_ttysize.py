"""ttysize.propagate on the host with real ptys: a child that runs its process on a pty of its
own (as `crun exec -t` does) gets the new size on that inner pty."""
import os
import subprocess
import sys

from tests.support.pods import wait_for
from vmcri.agent import ttysize

# The middle process makes an inner pty and runs the leaf on it. The leaf blocks SIGWINCH,
# says it is ready, and waits for one; then it writes the size it sees and exits.
MIDDLE = r"""
import os, pty, signal, sys, fcntl, termios, struct
out = sys.argv[1]
pid, fd = pty.fork()
if pid == 0:
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGWINCH])
    open(out + ".ready", "w").close()
    signal.sigwait([signal.SIGWINCH])
    rows, cols = struct.unpack("HHHH", fcntl.ioctl(0, termios.TIOCGWINSZ, b"\0" * 8))[:2]
    with open(out + ".tmp", "w") as f:
        f.write(f"{rows} {cols}")
    os.rename(out + ".tmp", out)
    os._exit(0)
while True:
    try:
        if not os.read(fd, 1024):
            break
    except OSError:
        break
os.waitpid(pid, 0)
"""


def test_size_reaches_the_pty_a_child_made(tmp_path):
    out = str(tmp_path / "size")
    master, slave = os.openpty()
    proc = subprocess.Popen([sys.executable, "-c", MIDDLE, out], stdin=slave, stdout=slave,
                            stderr=slave, start_new_session=True)
    os.close(slave)
    try:
        wait_for(lambda: os.path.exists(out + ".ready"), "the leaf on its inner pty", timeout=30)
        assert ttysize.propagate(proc.pid, 97, 41) == 1
        wait_for(lambda: os.path.exists(out), "the leaf's report", timeout=30)
        assert open(out).read() == "41 97"
    finally:
        proc.kill()
        proc.wait()
        os.close(master)


def test_a_child_on_the_same_pty_is_left_alone(tmp_path):
    master, slave = os.openpty()
    proc = subprocess.Popen(["sh", "-c", "sleep 60 & wait"], stdin=slave, stdout=slave, stderr=slave,
                            start_new_session=True)
    os.close(slave)
    try:
        wait_for(lambda: ttysize._children(proc.pid), "the sleep child", timeout=30)
        assert ttysize.propagate(proc.pid, 80, 24) == 0  # its only pty is the outer one
    finally:
        proc.kill()
        proc.wait()
        os.close(master)
