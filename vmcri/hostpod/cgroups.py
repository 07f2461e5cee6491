"""A host container's cgroup, read the way the guest agent reads its own (same sample
shape: vmcri.stats turns it into CRI stats). cgroup v2, or v1 controllers (this host is
v1 "hybrid"); crun's cgroupfs manager puts the container at <root>/<controller><path>."""
from __future__ import annotations

import os

ROOT = "/sys/fs/cgroup"
V1_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids",
                  "hugetlb", "net_cls", "net_prio", "perf_event", "rdma", "misc", "systemd")
MAX_FILE = 64 * 1024


def _read(path: str) -> str:
    with open(path) as f:
        return f.read(MAX_FILE)


def _keyed(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


def _int(path: str, default=0):
    try:
        v = _read(path).strip()
    except OSError:
        return default
    return int(v) if v.isdigit() else v


def _safe(cgroup_path: str) -> str:
    clean = os.path.normpath("/" + cgroup_path).lstrip("/")
    if not clean or clean.startswith(".."):
        raise ValueError(f"cgroup path {cgroup_path!r}")
    return clean


def is_v2() -> bool:
    return os.path.exists(os.path.join(ROOT, "cgroup.controllers"))


def sample(cgroup_path: str) -> dict | None:
    """None if the cgroup is gone."""
    rel = _safe(cgroup_path)
    try:
        if is_v2():
            cg = os.path.join(ROOT, rel)
            cpu = _keyed(_read(os.path.join(cg, "cpu.stat")))
            mem = _keyed(_read(os.path.join(cg, "memory.stat")))
            return {"cpu_usage_usec": cpu.get("usage_usec", 0),
                    "memory": {"current": _int(os.path.join(cg, "memory.current")),
                               "anon": mem.get("anon", 0), "file": mem.get("file", 0),
                               "inactive_file": mem.get("inactive_file", 0),
                               "pgfault": mem.get("pgfault", 0),
                               "pgmajfault": mem.get("pgmajfault", 0),
                               "max": _int(os.path.join(cg, "memory.max"), "max")},
                    "pids": _int(os.path.join(cg, "pids.current"))}
        memcg = os.path.join(ROOT, "memory", rel)
        mem = _keyed(_read(os.path.join(memcg, "memory.stat")))
        usage_ns = int(_read(os.path.join(ROOT, "cpuacct", rel, "cpuacct.usage")).strip() or 0)
    except (OSError, ValueError):
        return None
    limit = _int(os.path.join(memcg, "memory.limit_in_bytes"), "max")
    if isinstance(limit, int) and limit >= 1 << 62:
        limit = "max"  # v1 spells "no limit" as a huge page-rounded number
    return {"cpu_usage_usec": usage_ns // 1000,
            "memory": {"current": _int(os.path.join(memcg, "memory.usage_in_bytes")),
                       "anon": mem.get("total_rss", mem.get("rss", 0)),
                       "file": mem.get("total_cache", mem.get("cache", 0)),
                       "inactive_file": mem.get("total_inactive_file", 0),
                       "pgfault": mem.get("total_pgfault", 0),
                       "pgmajfault": mem.get("total_pgmajfault", 0), "max": limit},
            "pids": _int(os.path.join(ROOT, "pids", rel, "pids.current"))}


def dirs_of(cgroup_path: str) -> list[str]:
    """Every directory the cgroup has (one per v1 hierarchy, or the one v2 dir)."""
    rel = _safe(cgroup_path)
    if is_v2():
        candidates = [os.path.join(ROOT, rel)]
    else:
        candidates = [os.path.join(ROOT, c, rel) for c in V1_CONTROLLERS]
        candidates.append(os.path.join(ROOT, "unified", rel))
    return [d for d in candidates if os.path.isdir(d)]


def remove(cgroup_path: str) -> list[str]:
    """rmdir the cgroup (deepest first) in every hierarchy; returns what could not go."""
    left = []
    for top in dirs_of(cgroup_path):
        for root, subdirs, _ in sorted(os.walk(top, topdown=False), key=lambda w: -len(w[0])):
            try:
                os.rmdir(root)
            except FileNotFoundError:
                pass
            except OSError:
                left.append(root)
    return left
