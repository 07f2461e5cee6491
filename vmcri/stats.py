"""Container and pod stats from the guest's cgroup v2 (through the agent), the
host's upper dirs and libvirt; the cAdvisor metrics are built from the same samples
(vmcri/cadvisor.py).

Agent replies are untrusted numbers: each is coerced to a bounded non-negative
integer before it reaches a CRI message."""
from __future__ import annotations

import threading
import time

from cri_api.v1 import api_pb2 as pb

from vmcri import cadvisor
from vmcri.container import rootfs

U64 = (1 << 64) - 1


def _u(value) -> int:
    try:
        v = int(value)
    except (TypeError, ValueError):
        return 0
    return min(max(v, 0), U64)


def _uv(value) -> pb.UInt64Value:
    return pb.UInt64Value(value=_u(value))


class CpuRate:
    """usage_nano_cores needs two samples: keep the previous one per id."""

    def __init__(self):
        self._last: dict[str, tuple[int, int]] = {}
        self._lock = threading.Lock()

    def nano_cores(self, key: str, ts_ns: int, usage_ns: int) -> int | None:
        with self._lock:
            prev = self._last.get(key)
            self._last[key] = (ts_ns, usage_ns)
        if prev is None or ts_ns <= prev[0] or usage_ns < prev[1]:
            return None
        return (usage_ns - prev[1]) * 1_000_000_000 // (ts_ns - prev[0])

    def forget(self, key: str) -> None:
        with self._lock:
            self._last.pop(key, None)


def cpu_usage(rates: CpuRate, key: str, ts: int, usage_usec) -> pb.CpuUsage:
    usage_ns = _u(usage_usec) * 1000
    cpu = pb.CpuUsage(timestamp=ts, usage_core_nano_seconds=pb.UInt64Value(value=usage_ns))
    rate = rates.nano_cores(key, ts, usage_ns)
    if rate is not None:
        cpu.usage_nano_cores.value = _u(rate)
    return cpu


def memory_usage(ts: int, mem: dict) -> pb.MemoryUsage:
    current = _u(mem.get("current"))
    inactive_file = _u(mem.get("inactive_file"))
    working_set = max(0, current - inactive_file)  # what cAdvisor and the kubelet evict on
    out = pb.MemoryUsage(timestamp=ts, working_set_bytes=_uv(working_set),
                         usage_bytes=_uv(current), rss_bytes=_uv(mem.get("anon")),
                         page_faults=_uv(mem.get("pgfault")),
                         major_page_faults=_uv(mem.get("pgmajfault")))
    if mem.get("max") not in (None, "max"):
        out.available_bytes.value = max(0, _u(mem["max"]) - working_set)
    return out


def container_stats(svc, rec, rates: CpuRate, sample: dict | None) -> pb.ContainerStats:
    """`sample` is the agent's container_stats reply, or None if the container has no
    cgroup (not running)."""
    ts = time.time_ns()
    config = pb.ContainerConfig.FromString(rec.config)
    stats = pb.ContainerStats(attributes=pb.ContainerAttributes(
        id=rec.id, metadata=config.metadata, labels=rec.labels, annotations=rec.annotations))
    if sample:
        stats.cpu.CopyFrom(cpu_usage(rates, rec.id, ts, sample.get("cpu_usage_usec")))
        stats.memory.CopyFrom(memory_usage(ts, sample.get("memory") or {}))
    used, inodes = rootfs.writable_layer_usage(svc.dirs(rec))
    stats.writable_layer.CopyFrom(pb.FilesystemUsage(
        timestamp=ts, fs_id=pb.FilesystemIdentifier(mountpoint=svc.cfg.root_dir),
        used_bytes=_uv(used), inodes_used=_uv(inodes)))
    RECENT.put(rec.id, (rec, sample))
    return stats


def sandbox_stats(sb, rates: CpuRate, sample: dict, containers: list[pb.ContainerStats]) -> pb.PodSandboxStats:
    ts = time.time_ns()
    RECENT.put(sb.id, sample)
    linux = pb.LinuxPodSandboxStats(containers=containers)
    if sample:
        linux.cpu.CopyFrom(cpu_usage(rates, sb.id, ts, sample.get("cpu_usage_usec")))
        linux.memory.CopyFrom(memory_usage(ts, sample.get("memory") or {}))
        linux.process.CopyFrom(pb.ProcessUsage(timestamp=ts, process_count=_uv(sample.get("processes"))))
        ifaces = [pb.NetworkInterfaceUsage(name=str(i.get("name", ""))[:15], rx_bytes=_uv(i.get("rx_bytes")),
                                           rx_errors=_uv(i.get("rx_errors")), tx_bytes=_uv(i.get("tx_bytes")),
                                           tx_errors=_uv(i.get("tx_errors")))
                  for i in (sample.get("interfaces") or [])[:16] if isinstance(i, dict)]
        net = pb.NetworkUsage(timestamp=ts, interfaces=ifaces)
        eth0 = [i for i in ifaces if i.name == "eth0"]
        if eth0:
            net.default_interface.CopyFrom(eth0[0])
        linux.network.CopyFrom(net)
    return pb.PodSandboxStats(
        attributes=pb.PodSandboxAttributes(id=sb.id, metadata=pb.PodSandboxMetadata(
            name=sb.name, namespace=sb.namespace, uid=sb.uid, attempt=sb.attempt),
            labels=sb.labels, annotations=sb.annotations),
        linux=linux)


class RecentSamples:
    """The last agent sample per container or pod id, with its record: ListPodSandboxMetrics
    builds its metrics from the samples its ListPodSandboxStats pass has just taken, without
    asking every guest a second time. Bounded in age and count."""

    MAX_AGE_S = 60.0
    MAX_ENTRIES = 8192

    def __init__(self):
        self._items: dict[str, tuple[float, object]] = {}
        self._lock = threading.Lock()

    def put(self, key: str, value) -> None:
        now = time.monotonic()
        with self._lock:
            self._items[key] = (now, value)
            if len(self._items) > self.MAX_ENTRIES:
                for k in [k for k, (t, _) in self._items.items() if now - t > self.MAX_AGE_S]:
                    del self._items[k]
                while len(self._items) > self.MAX_ENTRIES:
                    del self._items[next(iter(self._items))]

    def get(self, key: str):
        with self._lock:
            item = self._items.get(key)
        if item is None or time.monotonic() - item[0] > self.MAX_AGE_S:
            return None
        return item[1]


RECENT = RecentSamples()


def metric_descriptors() -> list[pb.MetricDescriptor]:
    return cadvisor.descriptors()


def pod_metrics(stats: pb.PodSandboxStats) -> pb.PodSandboxMetrics:
    """The cAdvisor metrics of a pod whose stats were just taken (see RecentSamples)."""
    containers = []
    for c in stats.linux.containers:
        rec, sample = RECENT.get(c.attributes.id) or (None, None)
        if rec is not None:
            containers.append(cadvisor.container_metrics(rec, c, sample, stats.attributes.metadata))
    return cadvisor.pod_metrics(stats, RECENT.get(stats.attributes.id), containers)
