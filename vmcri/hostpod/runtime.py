"""How crun and conmon run on this host.

crun 1.8.1 refuses a "hybrid" host (cgroup v1 plus a cgroup2 mount at
/sys/fs/cgroup/unified that holds controllers): "cgroups in hybrid mode not supported,
drop all controllers from cgroupv2". On such a host every crun (and conmon, which runs
crun) starts in its own mount namespace without that cgroup2 mount. The namespace is a
*slave* of the host's, so unmounts under vmcri's shared dirs (rootfs overlays, pinned
namespace files) reach it, and a long-lived conmon keeps no copy of another pod's mounts.
The v2-only resources (linux.resources.unified, hugepage limits) are then left out of
the spec (spec.py).
"""
from __future__ import annotations

import os
import shutil
import subprocess

from vmcri.errors import FailedPrecondition

UNIFIED_MOUNT = "/sys/fs/cgroup/unified"
_WITHOUT_UNIFIED = f'umount -l {UNIFIED_MOUNT} 2>/dev/null; exec "$@"'
CGROUP_V2_ROOT = "/sys/fs/cgroup"
CGROUP_V1_ROOT = "/sys/fs/cgroup"


def cgroup_mode() -> str:
    """"v2" (unified), "hybrid" (v1 plus a cgroup2 mount holding controllers) or "v1"."""
    if os.path.exists(os.path.join(CGROUP_V2_ROOT, "cgroup.controllers")):
        return "v2"
    try:
        with open(os.path.join(UNIFIED_MOUNT, "cgroup.controllers")) as f:
            return "hybrid" if f.read().split() else "v1"
    except OSError:
        return "v1"


class HostRuntime:
    """Paths and command lines of the host's crun and conmon, shared by every host pod."""

    def __init__(self, run_dir: str, crun: str = "crun", conmon: str = "conmon"):
        self.root = os.path.join(run_dir, "hostpods")
        self.crun_root = os.path.join(self.root, "crun")
        self.socket_dir = os.path.join(self.root, "s")  # short: unix socket paths <= 108 bytes
        self.crun = shutil.which(crun) or crun
        self.conmon = shutil.which(conmon) or conmon
        self.cgroups = cgroup_mode()

    def check(self) -> None:
        """FailedPrecondition naming the missing tool, before a pod depends on it."""
        for tool in (self.crun, self.conmon):
            if not os.path.isabs(tool) or not os.access(tool, os.X_OK):
                raise FailedPrecondition(f"host sandboxes need {os.path.basename(tool)} on the "
                                         f"host (Debian package {os.path.basename(tool)})")
        os.makedirs(self.crun_root, mode=0o700, exist_ok=True)
        os.makedirs(self.socket_dir, mode=0o700, exist_ok=True)

    def wrap(self, argv: list[str]) -> list[str]:
        if self.cgroups != "hybrid":
            return list(argv)
        return ["unshare", "-m", "--propagation", "slave", "sh", "-c", _WITHOUT_UNIFIED, "sh",
                *argv]

    def crun_argv(self, *args: str) -> list[str]:
        return self.wrap([self.crun, f"--root={self.crun_root}", *args])

    def crun_run(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
        return subprocess.run(self.crun_argv(*args), stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=timeout)
