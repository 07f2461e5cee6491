"""clone_init: make a guest restored from a VM template a machine of its own.

A template guest boots with `vmcri.template=1` and leaves the 9p share unmounted (QEMU
refuses to save a guest with a mounted 9p export). Each clone's host calls clone_init once
after the restore:
- the clock jumps to the host's time (the saved guest's clock stopped at the save);
- host entropy is mixed into the kernel pool and the kernel CRNG is reseeded from it
  (on top of the reseed vmgenid already did at restore), so no two clones draw the same
  random numbers from here on;
- a fresh machine-id is written where the guest keeps one (/run/machine-id);
- the pod's share is mounted.
"""
from __future__ import annotations

import fcntl
import os
import struct
import time

from . import pid1

RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
RNDRESEEDCRNG = 0x5207      # _IO('R', 0x07)
MACHINE_ID = "/run/machine-id"


def _reseed(seed: bytes) -> None:
    fd = os.open("/dev/random", os.O_WRONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, struct.pack("ii", len(seed) * 8, len(seed)) + seed)
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    finally:
        os.close(fd)


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def clone_init(agent, params):
    time.clock_settime_ns(time.CLOCK_REALTIME, params["time_ns"])
    _reseed(bytes.fromhex(params["seed"]))
    tmp = MACHINE_ID + ".tmp"
    with open(tmp, "w") as f:
        f.write(params["machine_id"] + "\n")
    os.replace(tmp, MACHINE_ID)
    if not agent.share_mounted:
        agent.late_modules_done.wait(60)
        agent.share_mounted = pid1.mount_share_if_present(template=False)
    return {"share_mounted": agent.share_mounted, "boot_id": _boot_id(),
            "clock_ns": time.time_ns()}


HANDLERS = {"clone_init": clone_init}
