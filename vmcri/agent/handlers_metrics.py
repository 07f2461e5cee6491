"""container_metrics: everything the cAdvisor metric set needs from one container's cgroup v2
and its processes, in one call (ContainerStats, ListPodSandboxMetrics).

The reply is a superset of container_stats (cpu_usage_usec, memory, pids), so a host that
has it needs no second call. Raw kernel numbers only: the host turns them into metrics.
Every scan is bounded: a container with many processes or fds costs the agent a fixed
amount of work, and the counts say when they were cut short."""
from __future__ import annotations

import os
import re

from .handlers_container import _entry, _int_file, _keyed, _read_small
from .handlers_system import AgentCallError

MAX_PIDS_SCANNED = 1024
MAX_FDS_COUNTED = 1 << 20
MAX_IO_DEVICES = 64
_IO_LINE = re.compile(r"^(\d+):(\d+)\s+(.*)$")
_MEMORY_FIELDS = ("anon", "file", "kernel", "kernel_stack", "slab", "sock", "percpu", "pagetables",
                  "file_mapped", "shmem", "inactive_file", "active_file", "pgfault", "pgmajfault")
_CPU_FIELDS = ("usage_usec", "user_usec", "system_usec", "nr_periods", "nr_throttled", "throttled_usec")


def _read_or_empty(path: str, limit: int = 65536) -> str:
    try:
        return _read_small(path, limit)
    except OSError:
        return ""


def _io_stat(cg: str) -> list[dict]:
    """io.stat: `MAJ:MIN rbytes=N wbytes=N rios=N wios=N dbytes=N dios=N` per device."""
    out = []
    for line in _read_or_empty(os.path.join(cg, "io.stat")).splitlines()[:MAX_IO_DEVICES]:
        m = _IO_LINE.match(line.strip())
        if not m:
            continue
        dev = {"major": int(m.group(1)), "minor": int(m.group(2))}
        for kv in m.group(3).split():
            k, _, v = kv.partition("=")
            if k in ("rbytes", "wbytes", "rios", "wios") and v.isdigit():
                dev[k] = int(v)
        out.append(dev)
    return out


def _pressure(cg: str, kind: str) -> dict | None:
    """`some`/`full` totals (usec) of KIND.pressure; None when the kernel has PSI off."""
    text = _read_or_empty(os.path.join(cg, f"{kind}.pressure"), 4096)
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] in ("some", "full"):
            total = dict(p.partition("=")[::2] for p in parts[1:]).get("total", "")
            if total.isdigit():
                out[parts[0]] = int(total)
    return out or None


def _hugetlb(cg: str) -> dict[str, int]:
    out = {}
    try:
        names = os.listdir(cg)
    except OSError:
        return out
    for n in names:
        if n.startswith("hugetlb.") and n.endswith(".current") and n.count(".") == 2:
            v = _int_file(os.path.join(cg, n))
            if isinstance(v, int):
                out[n.split(".")[1]] = v  # "2MB"
    return out


def _processes(cg: str) -> dict:
    pids = []
    for p in _read_or_empty(os.path.join(cg, "cgroup.procs"), 1 << 20).split()[:MAX_PIDS_SCANNED]:
        if p.isdigit():
            pids.append(int(p))
    fds = sockets = 0
    for pid in pids:
        try:
            names = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue  # exited since cgroup.procs was read
        fds += len(names)
        for n in names[:4096]:
            try:
                if os.readlink(f"/proc/{pid}/fd/{n}").startswith("socket:"):
                    sockets += 1
            except OSError:
                pass
        if fds > MAX_FDS_COUNTED:
            break
    threads = len(_read_or_empty(os.path.join(cg, "cgroup.threads"), 1 << 20).split())
    return {"pids_scanned": len(pids), "file_descriptors": min(fds, MAX_FDS_COUNTED),
            "sockets": sockets, "threads": threads, "nofile_soft": _nofile_soft(pids)}


def _nofile_soft(pids: list[int]) -> int | None:
    """Soft RLIMIT_NOFILE of the container's first process (-1 for unlimited)."""
    for pid in sorted(pids)[:1]:
        for line in _read_or_empty(f"/proc/{pid}/limits", 8192).splitlines():
            if line.startswith("Max open files"):
                soft = line[len("Max open files"):].split()[0]
                return -1 if soft == "unlimited" else int(soft) if soft.isdigit() else None
    return None


def container_metrics(agent, params):
    entry = _entry(agent, params["id"])
    cg = entry.cgroup
    if cg is None or not os.path.isdir(cg):
        raise AgentCallError("NotFound", f"id: container {entry.id!r} has no cgroup")
    try:
        cpu = _keyed(_read_small(os.path.join(cg, "cpu.stat")))
        mem = _keyed(_read_small(os.path.join(cg, "memory.stat")))
    except OSError as e:
        raise AgentCallError("NotFound", f"id: cgroup of {entry.id!r} is gone: {e.strerror}") from None
    events = _keyed(_read_or_empty(os.path.join(cg, "memory.events")))
    memory = {k: mem.get(k, 0) for k in _MEMORY_FIELDS}
    memory.update({
        "current": _int_file(os.path.join(cg, "memory.current")) or 0,
        "peak": _int_file(os.path.join(cg, "memory.peak")),
        "max": _int_file(os.path.join(cg, "memory.max")) or "max",
        "min": _int_file(os.path.join(cg, "memory.min")),
        "swap_current": _int_file(os.path.join(cg, "memory.swap.current")),
        "swap_max": _int_file(os.path.join(cg, "memory.swap.max")),
        "events_max": events.get("max", 0), "oom_kill": events.get("oom_kill", 0),
    })
    return {
        "cpu_usage_usec": cpu.get("usage_usec", 0),
        "cpu": {k: cpu.get(k, 0) for k in _CPU_FIELDS},
        "memory": memory,
        "pids": _int_file(os.path.join(cg, "pids.current")) or 0,
        "pids_max": _int_file(os.path.join(cg, "pids.max")),
        "io": _io_stat(cg),
        "hugetlb": _hugetlb(cg),
        "pressure": {k: _pressure(cg, k) for k in ("cpu", "memory", "io")},
        "processes": _processes(cg),
    }


HANDLERS = {"container_metrics": container_metrics}
