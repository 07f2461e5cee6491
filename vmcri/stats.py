"""Container and pod stats from the guest's cgroup v2 (through the agent), the
host's upper dirs and libvirt; plus cAdvisor-named pod metrics.

Agent replies are untrusted numbers: each is coerced to a bounded non-negative
integer before it reaches a CRI message."""
from __future__ import annotations

import threading
import time

from cri_api.v1 import api_pb2 as pb

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
    return stats


def sandbox_stats(sb, rates: CpuRate, sample: dict, containers: list[pb.ContainerStats]) -> pb.PodSandboxStats:
    ts = time.time_ns()
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


# cAdvisor names, so dashboards built for containerd/CRI-O keep working.
DESCRIPTORS = [
    ("container_cpu_usage_seconds_total", "Cumulative cpu time consumed in seconds.", pb.MetricType.COUNTER),
    ("container_memory_working_set_bytes", "Current working set in bytes.", pb.MetricType.GAUGE),
    ("container_memory_usage_bytes", "Current memory usage in bytes, including all memory regardless of when it was accessed.", pb.MetricType.GAUGE),
    ("container_memory_rss", "Size of RSS in bytes.", pb.MetricType.GAUGE),
    ("container_network_receive_bytes_total", "Cumulative count of bytes received.", pb.MetricType.COUNTER),
    ("container_network_transmit_bytes_total", "Cumulative count of bytes transmitted.", pb.MetricType.COUNTER),
    ("container_network_receive_errors_total", "Cumulative count of errors encountered while receiving.", pb.MetricType.COUNTER),
    ("container_network_transmit_errors_total", "Cumulative count of errors encountered while transmitting.", pb.MetricType.COUNTER),
]
LABELS = {"container_network_receive_bytes_total": ["interface"],
          "container_network_transmit_bytes_total": ["interface"],
          "container_network_receive_errors_total": ["interface"],
          "container_network_transmit_errors_total": ["interface"]}


def metric_descriptors() -> list[pb.MetricDescriptor]:
    return [pb.MetricDescriptor(name=n, help=h, label_keys=["id", "name", "image"] + LABELS.get(n, []))
            for n, h, _ in DESCRIPTORS]


def pod_metrics(stats: pb.PodSandboxStats) -> pb.PodSandboxMetrics:
    ts = time.time_ns()
    kind = {n: t for n, _, t in DESCRIPTORS}

    def metric(name, value, labels):
        return pb.Metric(name=name, timestamp=ts, metric_type=kind[name], label_values=labels,
                         value=pb.UInt64Value(value=_u(value)))

    def common(s, labels):
        out = [metric("container_cpu_usage_seconds_total",
                      s.cpu.usage_core_nano_seconds.value // 1_000_000_000, labels),
               metric("container_memory_working_set_bytes", s.memory.working_set_bytes.value, labels),
               metric("container_memory_usage_bytes", s.memory.usage_bytes.value, labels),
               metric("container_memory_rss", s.memory.rss_bytes.value, labels)]
        return out

    linux = stats.linux
    pod_labels = [stats.attributes.id, "POD", ""]
    metrics = common(linux, pod_labels)
    for iface in linux.network.interfaces:
        lv = pod_labels + [iface.name]
        metrics += [metric("container_network_receive_bytes_total", iface.rx_bytes.value, lv),
                    metric("container_network_transmit_bytes_total", iface.tx_bytes.value, lv),
                    metric("container_network_receive_errors_total", iface.rx_errors.value, lv),
                    metric("container_network_transmit_errors_total", iface.tx_errors.value, lv)]
    cms = [pb.ContainerMetrics(container_id=c.attributes.id,
                               metrics=common(c, [c.attributes.id, c.attributes.metadata.name, ""]))
           for c in linux.containers]
    return pb.PodSandboxMetrics(pod_sandbox_id=stats.attributes.id, metrics=metrics,
                                container_metrics=cms)
