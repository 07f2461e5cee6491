"""PID-1 duties of the agent: mounts, cgroup2, zombie reaping, power-off, boot phases.

The agent itself is PID 1 after switch_root (no shim): the reaper below is the only
caller of waitpid(), so every child status (including reparented orphans) ends here.
"""
from __future__ import annotations

import ctypes
import os
import sys
import threading

from . import protocol

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
RB_POWER_OFF = 0x4321FEDC
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8

PHASES: dict[str, float] = {}


def uptime() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


def phase(name: str) -> None:
    """Record a boot phase and print it on the console (host reads the console log)."""
    try:
        t = uptime()
    except OSError:
        t = -1.0
    PHASES[name] = t
    sys.stdout.write(f"{protocol.PHASE_PREFIX} {name} {t:.3f}\n")
    sys.stdout.flush()


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    os.makedirs(target, exist_ok=True)
    if _libc.mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode() or None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype} on {target}: {os.strerror(err)}")


def setup_mounts() -> None:
    if not os.path.exists("/proc/self"):
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    if not os.path.exists("/sys/kernel"):
        mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    if not os.path.exists("/dev/null"):
        mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID)
    mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "mode=620,ptmxmode=666")
    if not os.path.exists("/dev/ptmx"):
        os.symlink("pts/ptmx", "/dev/ptmx")
    mount("shm", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    mount("run", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=755")
    mount("tmp", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    mount("cgroup2", "/sys/fs/cgroup", "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    enable_controllers("/sys/fs/cgroup")
    os.makedirs("/run/vmcri/etc", exist_ok=True)
    defaults = {"hosts": "127.0.0.1\tlocalhost\n::1\tlocalhost\n", "resolv.conf": "", "hostname": "localhost\n"}
    for name, content in defaults.items():
        with open(f"/run/vmcri/etc/{name}", "w") as f:
            f.write(content)
    os.environ.update(PATH="/usr/sbin:/usr/bin:/sbin:/bin", HOME="/root", TERM="linux")


def enable_controllers(cgroot: str) -> None:
    try:
        with open(os.path.join(cgroot, "cgroup.controllers")) as f:
            ctrls = f.read().split()
        with open(os.path.join(cgroot, "cgroup.subtree_control"), "w") as f:
            f.write(" ".join("+" + c for c in ctrls))
    except OSError as e:
        print(f"vmcri-agent: enabling cgroup controllers failed: {e}", flush=True)


def booted_as_template() -> bool:
    """A VM template's guest (kernel cmdline vmcri.template=1) waits for clone_init."""
    try:
        with open("/proc/cmdline") as f:
            return "vmcri.template=1" in f.read().split()
    except OSError:
        return False


def mount_share_if_present(template: bool | None = None) -> bool:
    """Mount the 9p share (tag SHARE_TAG) at SHARE_MOUNT, and its cached view for root
    filesystems (ROOTFS_TAG) at ROOTFS_MOUNT when the VM has it; needs the late 9p modules.
    A template guest leaves it for clone_init: QEMU cannot save a guest whose 9p export
    is mounted."""
    if booted_as_template() if template is None else template:
        return False
    base = "/sys/bus/virtio/drivers/9pnet_virtio"
    try:
        devs = os.listdir(base)
    except OSError:
        return False
    tags = set()
    for d in devs:
        try:
            with open(os.path.join(base, d, "mount_tag"), "rb") as f:
                tags.add(f.read().rstrip(b"\0\n").decode())
        except OSError:
            continue
    if protocol.SHARE_TAG not in tags:
        return False
    mount(protocol.SHARE_TAG, protocol.SHARE_MOUNT, "9p", 0,
          "trans=virtio,version=9p2000.L,msize=262144,cache=none")
    if protocol.ROOTFS_TAG in tags:  # see protocol.ROOTFS_TAG; without it rootfs are uncached
        mount(protocol.ROOTFS_TAG, protocol.ROOTFS_MOUNT, "9p", 0,
              "trans=virtio,version=9p2000.L,msize=262144,cache=loose")
    return True


# -- kernel modules ----------------------------------------------------------------------
# The root has the standard /lib/modules/<release>/ tree with a depmod index and kmod's
# /sbin/modprobe, so the kernel's own on-demand loading (request_module: rtnl-link-bridge,
# nft-chain-2-nat, xt_REDIRECT, ...) works from any container without it seeing the tree.
MODULES_DIR = "/lib/modules"
LATE_ORDER = "/lib/modules/vmcri-late.order"  # absolute .ko paths the agent insmods at boot


def late_modules_script() -> str:
    """sh script: insmod the late modules (busybox insmod: no kmod start-up per module)."""
    return (f"while read -r m; do /bin/busybox insmod \"$m\" || "
            f"echo \"vmcri-agent: insmod $m failed\"; done < {LATE_ORDER}")


def module_static_nodes(devname: str | None = None, dev: str = "/dev") -> list[str]:
    """Create the device nodes modules.devname lists (/dev/net/tun, /dev/fuse): opening one
    makes the kernel load its module. A normal node does this with `kmod static-nodes`;
    here the nodes must exist before a privileged container's /dev is copied from ours."""
    if devname is None:
        devname = os.path.join(MODULES_DIR, os.uname().release, "modules.devname")
    made = []
    try:
        with open(devname) as f:
            lines = f.read().splitlines()
    except OSError:
        return made
    for line in lines:
        parts = line.split()
        if len(parts) != 3 or line.startswith("#") or parts[2][:1] not in ("c", "b"):
            continue
        node = os.path.normpath(os.path.join(dev, parts[1]))
        if not node.startswith(dev.rstrip("/") + "/") or os.path.lexists(node):
            continue
        try:
            major, minor = (int(x) for x in parts[2][1:].split(":"))
            os.makedirs(os.path.dirname(node), exist_ok=True)
            kind = 0o020000 if parts[2][0] == "c" else 0o060000
            os.mknod(node, kind | 0o600, os.makedev(major, minor))
            made.append(node)
        except (OSError, ValueError) as e:
            print(f"vmcri-agent: static node {node}: {e}", flush=True)
    return made


def power_off() -> None:
    os.sync()
    _libc.reboot(RB_POWER_OFF)
    # only reached when not PID 1 (tests): exit instead
    os._exit(0)


class Reaper:
    """The single waitpid(-1) loop; Popen.wait() must never be used in the agent."""

    def __init__(self):
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._callbacks: dict[int, callable] = {}
        self._unclaimed: dict[int, int] = {}
        self._children = 0
        threading.Thread(target=self._loop, name="reaper", daemon=True).start()

    def watch(self, pid: int, on_exit) -> None:
        """Call on_exit(wait_status) once pid exits (also if it already has)."""
        with self._lock:
            status = self._unclaimed.pop(pid, None)
            if status is None:
                self._callbacks[pid] = on_exit
            self._children += 1
            self._cond.notify_all()
        if status is not None:
            on_exit(status)

    def _loop(self):
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                with self._lock:
                    self._cond.wait(5.0)  # a spawn notifies at once; this is only a backstop
                continue
            except InterruptedError:
                continue
            with self._lock:
                cb = self._callbacks.pop(pid, None)
                if cb is None:
                    # exited before watch() was called, or an orphan we never started
                    self._unclaimed[pid] = status
                    if len(self._unclaimed) > 4096:
                        self._unclaimed.pop(next(iter(self._unclaimed)))
            if cb is not None:
                try:
                    cb(status)
                except Exception as e:  # a callback bug must not stop reaping
                    print(f"vmcri-agent: exit callback for {pid} failed: {e}", flush=True)


def exit_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def wait_status(reaper: Reaper, pid: int, timeout: float | None = None) -> int | None:
    ev = threading.Event()
    box = []
    reaper.watch(pid, lambda st: (box.append(st), ev.set()))
    if not ev.wait(timeout):
        return None
    return box[0]
