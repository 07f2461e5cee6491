"""Charge a pod's qemu to the kubelet's pod cgroup (`linux.cgroup_parent`), so that node
allocatable, QoS and eviction see pod VMs.

libvirt puts qemu under /machine/qemu-N-NAME.libvirt-qemu in each hierarchy. Its
`<resource><partition>` cannot name the kubelet's cgroup instead: without systemd libvirt
maps each partition component to a "NAME.partition" directory. So vmcri puts qemu in `<parent>/vmcri-<sandbox id>` (a child, as containerd puts the
sandbox under the pod cgroup) in every hierarchy where the parent exists: each cgroup v1
hierarchy the kubelet uses (cgroupfs or systemd slices) and the cgroup2 mount.
- A cold boot runs qemu through a small emulator wrapper (`emulator_wrapper`): libvirt
  starts it in libvirt's cgroup, it joins the pod's cgroups and then execs qemu, so every
  page qemu ever allocates is charged to the pod.
- After start (and for warm-pool or template VMs, which were running before the pod
  claimed them) place() moves the process again: libvirt moves qemu's emulator and vCPU
  threads into its own cpu/cpuset sub-cgroups once qemu runs, and again after a vCPU
  hot-plug. What a pool or template VM touched before its claim stays charged where it
  was: cgroup v2 never moves charges, and new kernels refuse v1's
  memory.move_charge_at_immigrate (set here for the kernels that still honour it).

The cgroup paths come from the CRI request (the kubelet), never from the guest."""
from __future__ import annotations

import errno
import logging
import os
import re

from vmcri.errors import InvalidArgument, Unavailable

log = logging.getLogger(__name__)
CGROUP_ROOT = "/sys/fs/cgroup"
_COMPONENT = re.compile(r"^[A-Za-z0-9_.:@-]{1,255}$")
_SLICE = re.compile(r"^[A-Za-z0-9_:@-]+(-[A-Za-z0-9_:@]+)*\.slice$")


def parent_path(cgroup_parent: str) -> str:
    """The parent as a path below each hierarchy's root: a cgroupfs path is used as is, a
    systemd slice name ("kubepods-burstable-pod1.slice") is expanded as systemd does.
    INVALID_ARGUMENT for anything else."""
    field = "config.linux.cgroup_parent"
    if _SLICE.match(cgroup_parent) and "/" not in cgroup_parent:
        parts = cgroup_parent[:-len(".slice")].split("-")
        return "/" + "/".join("-".join(parts[:i + 1]) + ".slice" for i in range(len(parts)))
    if not cgroup_parent.startswith("/") or len(cgroup_parent) > 4096:
        raise InvalidArgument(f"{field}: {cgroup_parent[:80]!r} is neither an absolute cgroup path "
                              "nor a systemd slice name")
    comps = [c for c in cgroup_parent.split("/") if c]
    for c in comps:
        if c in (".", "..") or not _COMPONENT.match(c):
            raise InvalidArgument(f"{field}: component {c[:80]!r} is not a cgroup name")
    return "/" + "/".join(comps)


def hierarchies() -> list[tuple[str, bool]]:
    """(mount point, is_v2) of every cgroup mount under /sys/fs/cgroup."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, fstype = left.split(), right.split()[:1]
            if len(fields) < 5 or not fstype or fstype[0] not in ("cgroup", "cgroup2"):
                continue
            mnt = fields[4]
            if mnt == CGROUP_ROOT or mnt.startswith(CGROUP_ROOT + "/"):
                out.append((mnt, fstype[0] == "cgroup2"))
    return out


def child_name(sandbox_id: str) -> str:
    return f"vmcri-{sandbox_id}"


def _copy_cpuset(parent: str, child: str) -> None:
    """A new v1 cpuset cgroup has no CPUs or memory nodes; no task may join it until set."""
    for name in ("cpuset.cpus", "cpuset.mems"):
        src, dst = os.path.join(parent, name), os.path.join(child, name)
        if os.path.exists(dst):
            with open(dst) as f:
                if f.read().strip():
                    continue
            with open(src) as f:
                value = f.read().strip()
            with open(dst, "w") as f:
                f.write(value)


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _children(sandbox_id: str, cgroup_parent: str) -> list[str]:
    """Make <parent>/vmcri-<id> wherever the parent exists; returns them."""
    rel = parent_path(cgroup_parent)
    made = []
    for mnt, v2 in hierarchies():
        parent = mnt + rel
        if not os.path.isdir(parent):
            continue  # the kubelet does not use this hierarchy for the pod
        child = os.path.join(parent, child_name(sandbox_id))
        os.makedirs(child, exist_ok=True)
        if os.path.exists(os.path.join(child, "cpuset.cpus")) and not v2:
            _copy_cpuset(parent, child)
        if os.path.exists(os.path.join(child, "memory.move_charge_at_immigrate")):
            try:
                _write(os.path.join(child, "memory.move_charge_at_immigrate"), "3")
            except OSError as e:  # gone from newer kernels: the move still works
                log.debug("%s: move_charge_at_immigrate: %s", child, e.strerror)
        made.append(child)
    if not made:
        log.warning("cgroup_parent %s exists in no cgroup hierarchy: qemu of %s stays where "
                    "libvirt puts it", cgroup_parent, sandbox_id[:12])
    return made


def place(sandbox_id: str, cgroup_parent: str, pid: int) -> list[str]:
    """Move process `pid` (all its threads) into <parent>/vmcri-<id> wherever the parent
    exists; returns the cgroup dirs it is now in. Nothing to do for an empty parent."""
    if not cgroup_parent:
        return []
    placed = _children(sandbox_id, cgroup_parent)
    for child in placed:
        _write(os.path.join(child, "cgroup.procs"), str(pid))
    return placed


# libvirt execs this as the pod VM's emulator (it passes `-name guest=NAME,...`). It joins
# the cgroups listed in TARGETS/NAME, then becomes qemu; a failed join fails the start.
_WRAPPER = """#!/bin/sh
# vmcri: join the pod's cgroups before qemu allocates anything (vmcri/sandbox/podcgroup.py)
name=; prev=
for a in "$@"; do
  [ "$prev" = "-name" ] && { name=${a#guest=}; name=${name%%%%,*}; }
  prev=$a
done
case $name in ""|*[!A-Za-z0-9_-]*) name= ;; esac
if [ -n "$name" ] && [ -r "%(targets)s/$name" ]; then
  while read -r dir; do
    echo $$ > "$dir/cgroup.procs" || exit 1
  done < "%(targets)s/$name"
fi
exec %(qemu)s "$@"
"""


def emulator_wrapper(run_dir: str, qemu: str) -> str:
    """The wrapper's path under run_dir, written only when its content changed (libvirt
    probes a new or changed emulator binary's capabilities once, which takes seconds)."""
    path = os.path.join(run_dir, "qemu-in-pod-cgroup")
    text = _WRAPPER % {"targets": os.path.join(run_dir, "cgroup-targets"), "qemu": qemu}
    try:
        with open(path) as f:
            if f.read() == text:
                return path
    except OSError:
        pass
    os.makedirs(run_dir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)
    return path


def prepare_start(run_dir: str, sandbox_id: str, domain: str, cgroup_parent: str) -> list[str]:
    """Make the pod's cgroups and tell the wrapper of `domain` to join them."""
    dirs = _children(sandbox_id, cgroup_parent)
    targets = os.path.join(run_dir, "cgroup-targets")
    os.makedirs(targets, mode=0o700, exist_ok=True)
    with open(os.path.join(targets, domain), "w") as f:
        f.write("".join(d + "\n" for d in dirs))
    return dirs


def forget_start(run_dir: str, domain: str) -> None:
    try:
        os.unlink(os.path.join(run_dir, "cgroup-targets", domain))
    except FileNotFoundError:
        pass


def charge(svc, sandbox_id: str, domain: str, cgroup_parent: str) -> list[str]:
    """place() the domain's qemu; UNAVAILABLE when that cannot be done (the kubelet counts
    on the pod's cgroup holding the pod)."""
    if not cgroup_parent:
        return []
    pid = svc.hv.pid(domain)
    if not pid:
        raise Unavailable(f"config.linux.cgroup_parent: no qemu pid for {domain} to place")
    try:
        placed = place(sandbox_id, cgroup_parent, pid)
    except OSError as e:
        raise Unavailable(f"config.linux.cgroup_parent: moving qemu into {cgroup_parent}: "
                          f"{e.strerror or e}") from e
    log.info("qemu %d of %s charged to %s", pid, sandbox_id[:12], placed)
    return placed


def release(sandbox_id: str, cgroup_parent: str) -> None:
    """Remove the child cgroups once qemu is gone (idempotent)."""
    if not cgroup_parent:
        return
    try:
        rel = parent_path(cgroup_parent)
    except InvalidArgument:
        return
    for mnt, _ in hierarchies():
        child = os.path.join(mnt + rel, child_name(sandbox_id))
        try:
            os.rmdir(child)
        except FileNotFoundError:
            pass
        except OSError as e:
            level = logging.WARNING if e.errno == errno.EBUSY else logging.INFO
            log.log(level, "cannot remove %s: %s", child, e.strerror)
