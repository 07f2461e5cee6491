"""The pod init: PID 1 of the pod's PID namespace, the guest's pause process.

Run by the agent as `python3 -I -S -` with this file's text on stdin (stdlib only, no
imports from the package), so `ps` in a pod shows that short command and no agent path. It unshares a PID and a mount namespace and forks; the parent prints the
child's pid (as the agent's namespace numbers it) and exits. The child is PID 1 of the
new namespace and holds it for the pod's containers in POD mode:
- its root is an empty read-only tmpfs, so /proc/1/root from a container leads nowhere;
- it keeps no capabilities and runs as nobody, not dumpable, so a container that ptraces
  it gains nothing;
- SIGTERM and friends stay at their default: the kernel drops them when they come from
  inside the namespace, so a container cannot end the pod's namespace; the agent ends it
  with SIGKILL;
- it reaps the orphans the namespace's processes leave behind.
"""
import ctypes
import os
import signal

CLONE_NEWNS, CLONE_NEWPID = 0x00020000, 0x20000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 0x4000, 1 << 18
MNT_DETACH = 2
PR_SET_NAME, PR_CAPBSET_DROP, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 15, 24, 4, 38
NOBODY = 65534
NAME = b"vmcri-pod-init"

libc = ctypes.CDLL(None, use_errno=True)


def check(rc, what):
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def empty_root():
    check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
    check(libc.mount(b"pod-init", b"/tmp", b"tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                     b"size=16k,mode=0555"), "tmpfs")
    os.chdir("/tmp")
    check(libc.syscall(155, b".", b"."), "pivot_root")  # SYS_pivot_root on x86_64
    check(libc.umount2(b".", MNT_DETACH), "detach the old root")
    os.chdir("/")
    check(libc.mount(None, b"/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
                     | MS_NOEXEC, None), "read-only root")


def drop_privileges():
    for cap in range(64):
        libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # EINVAL past the last: ignored
    os.setgroups([])
    os.setresgid(NOBODY, NOBODY, NOBODY)
    os.setresuid(NOBODY, NOBODY, NOBODY)  # clears the permitted and effective sets
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    check(libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "not dumpable")


def reap_forever():
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    while True:
        signal.sigtimedwait({signal.SIGCHLD}, 60)
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break


def main():
    check(libc.unshare(CLONE_NEWNS | CLONE_NEWPID), "unshare")
    child = os.fork()
    if child:
        os.write(1, f"{child}\n".encode())
        os._exit(0)
    os.close(0)
    os.close(1)  # the agent reads the pid up to EOF; errors still reach stderr (the console)
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Python's own handler would let one in
    libc.prctl(PR_SET_NAME, NAME, 0, 0, 0)
    empty_root()
    drop_privileges()
    os.closerange(2, 256)
    reap_forever()


main()
