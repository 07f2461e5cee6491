"""The cAdvisor metric set for ListMetricDescriptors / ListPodSandboxMetrics, as CRI-O
serves it (names, help, types and label keys), from the guest's cgroup v2 samples.

Labels: `id, image, namespace, pod, container` on every metric (the pod's own metrics have
container "POD" and no image), then the metric's own keys. Network counters are per pod:
the pod has one network namespace, the guest's.

The CRI carries each value as a UInt64Value, so the *_seconds_total counters are whole
seconds (floor), as containerd and CRI-O send them; the exact nanoseconds are in
ContainerStats. Every number from the agent is coerced to a bounded non-negative integer,
and every label value from it is checked, before it reaches a message."""
from __future__ import annotations

import os
import re
import time

from cri_api.v1 import api_pb2 as pb

C, G = pb.MetricType.COUNTER, pb.MetricType.GAUGE
U64 = (1 << 64) - 1
NS = 1_000_000_000
BASE_LABELS = ["id", "image", "namespace", "pod", "container"]
NET = ["interface"]
DEVICE = ["device"]

# name -> (help, type, extra label keys)
DESCRIPTORS: dict[str, tuple[str, int, list[str]]] = {
    "container_cpu_user_seconds_total": ("Cumulative user CPU time consumed in seconds.", C, []),
    "container_cpu_system_seconds_total": ("Cumulative system CPU time consumed in seconds.", C, []),
    "container_cpu_usage_seconds_total": ("Cumulative CPU time consumed in seconds.", C, ["cpu"]),
    "container_cpu_cfs_periods_total": ("Number of elapsed enforcement period intervals.", C, []),
    "container_cpu_cfs_throttled_periods_total": ("Number of throttled period intervals.", C, []),
    "container_cpu_cfs_throttled_seconds_total": ("Total time duration the container has been throttled.", C, []),
    "container_fs_inodes_free": ("Number of free inodes.", G, []),
    "container_fs_inodes_total": ("Total number of inodes.", G, []),
    "container_fs_limit_bytes": ("Filesystem limit in bytes.", G, []),
    "container_fs_usage_bytes": ("Current filesystem usage in bytes.", G, []),
    "container_fs_reads_bytes_total": ("Cumulative count of bytes read", C, DEVICE),
    "container_fs_reads_total": ("Cumulative count of reads completed", C, DEVICE),
    "container_fs_writes_bytes_total": ("Cumulative count of bytes written", C, DEVICE),
    "container_fs_writes_total": ("Cumulative count of writes completed", C, DEVICE),
    "container_blkio_device_usage_total": ("Blkio Device bytes usage", C, ["device", "major", "minor", "operation"]),
    "container_hugetlb_usage_bytes": ("Current hugepage usage", G, ["pagesize"]),
    "container_memory_cache": ("Number of bytes of page cache memory.", G, []),
    "container_memory_rss": ("Size of RSS in bytes.", G, []),
    "container_memory_kernel_usage": ("Size of kernel memory allocated in bytes.", G, []),
    "container_memory_mapped_file": ("Size of memory mapped files in bytes.", G, []),
    "container_memory_swap": ("Container swap usage in bytes.", G, []),
    "container_memory_failcnt": ("Number of memory usage hits limits", C, []),
    "container_memory_usage_bytes": ("Current memory usage in bytes, including all memory regardless of when it was accessed", G, []),
    "container_memory_max_usage_bytes": ("Maximum memory usage recorded in bytes", G, []),
    "container_memory_working_set_bytes": ("Current working set in bytes.", G, []),
    "container_memory_failures_total": ("Cumulative count of memory allocation failures.", C, ["failure_type", "scope"]),
    "container_network_receive_bytes_total": ("Cumulative count of bytes received", C, NET),
    "container_network_receive_packets_total": ("Cumulative count of packets received", C, NET),
    "container_network_receive_packets_dropped_total": ("Cumulative count of packets dropped while receiving", C, NET),
    "container_network_receive_errors_total": ("Cumulative count of errors encountered while receiving", C, NET),
    "container_network_transmit_bytes_total": ("Cumulative count of bytes transmitted", C, NET),
    "container_network_transmit_packets_total": ("Cumulative count of packets transmitted", C, NET),
    "container_network_transmit_packets_dropped_total": ("Cumulative count of packets dropped while transmitting", C, NET),
    "container_network_transmit_errors_total": ("Cumulative count of errors encountered while transmitting", C, NET),
    "container_oom_events_total": ("Count of out of memory events observed for the container", C, []),
    "container_file_descriptors": ("Number of open file descriptors for the container.", G, []),
    "container_processes": ("Number of processes running inside the container.", G, []),
    "container_sockets": ("Number of open sockets for the container.", G, []),
    "container_threads": ("Number of threads running inside the container", G, []),
    "container_threads_max": ("Maximum number of threads allowed inside the container, infinity if value is zero", G, []),
    "container_ulimits_soft": ("Soft ulimit values for the container root process. Unlimited if -1, except priority and nice", G, ["ulimit"]),
    "container_last_seen": ("Last time a container was seen by the exporter", G, []),
    "container_spec_cpu_period": ("CPU period of the container.", G, []),
    "container_spec_cpu_quota": ("CPU quota of the container.", G, []),
    "container_spec_cpu_shares": ("CPU share of the container.", G, []),
    "container_spec_memory_limit_bytes": ("Memory limit for the container in bytes.", G, []),
    "container_spec_memory_reservation_limit_bytes": ("Memory reservation limit for the container.", G, []),
    "container_spec_memory_swap_limit_bytes": ("Memory swap limit for the container.", G, []),
    "container_start_time_seconds": ("Start time of the container since unix epoch in seconds.", G, []),
    "container_pressure_cpu_stalled_seconds_total": ("Total time duration no tasks in the container could make progress due to CPU congestion.", C, []),
    "container_pressure_cpu_waiting_seconds_total": ("Total time duration tasks in the container have waited due to CPU congestion.", C, []),
    "container_pressure_memory_stalled_seconds_total": ("Total time duration no tasks in the container could make progress due to memory congestion.", C, []),
    "container_pressure_memory_waiting_seconds_total": ("Total time duration tasks in the container have waited due to memory congestion.", C, []),
    "container_pressure_io_stalled_seconds_total": ("Total time duration no tasks in the container could make progress due to IO congestion.", C, []),
    "container_pressure_io_waiting_seconds_total": ("Total time duration tasks in the container have waited due to IO congestion.", C, []),
}
# Kept by the guest kernel only on request: PSI needs `psi=1` on a kernel built with it
# disabled by default (Debian's), and cgroup v2 keeps no hugetlb peak, so
# container_hugetlb_max_usage_bytes is not offered at all.
NEEDS_GUEST_PSI = tuple(n for n in DESCRIPTORS if n.startswith("container_pressure_"))

_PAGESIZE = re.compile(r"^[0-9]{1,4}[KMG]B$")
_IFNAME = re.compile(r"^[A-Za-z0-9._@-]{1,15}$")


def _u(value) -> int:
    if isinstance(value, bool):
        return int(value)
    try:
        v = int(value)
    except (TypeError, ValueError):
        return 0
    return min(max(v, 0), U64)


def descriptors() -> list[pb.MetricDescriptor]:
    return [pb.MetricDescriptor(name=n, help=h, label_keys=BASE_LABELS + extra)
            for n, (h, _, extra) in DESCRIPTORS.items()]


class _Out:
    """Collects metrics under one set of base label values."""

    def __init__(self, base: list[str]):
        self.base, self.ts, self.items = base, time.time_ns(), []

    def add(self, name: str, value, *labels: str) -> None:
        _, kind, extra = DESCRIPTORS[name]
        assert len(labels) == len(extra), name
        self.items.append(pb.Metric(name=name, timestamp=self.ts, metric_type=kind,
                                    label_values=self.base + list(labels), value=pb.UInt64Value(value=_u(value))))


def _cpu(out: _Out, cpu: dict, usage_ns: int) -> None:
    out.add("container_cpu_usage_seconds_total", usage_ns // NS, "total")
    out.add("container_cpu_user_seconds_total", _u(cpu.get("user_usec")) // 1_000_000)
    out.add("container_cpu_system_seconds_total", _u(cpu.get("system_usec")) // 1_000_000)
    out.add("container_cpu_cfs_periods_total", cpu.get("nr_periods"))
    out.add("container_cpu_cfs_throttled_periods_total", cpu.get("nr_throttled"))
    out.add("container_cpu_cfs_throttled_seconds_total", _u(cpu.get("throttled_usec")) // 1_000_000)


def _memory(out: _Out, mem: dict, stats_mem) -> None:
    kernel = mem.get("kernel")
    if not kernel:  # memory.stat's "kernel" is new (6.x); older kernels give the parts
        kernel = sum(_u(mem.get(k)) for k in ("kernel_stack", "slab", "sock", "percpu", "pagetables"))
    current = _u(mem.get("current"))
    out.add("container_memory_cache", mem.get("file"))
    out.add("container_memory_rss", mem.get("anon"))
    out.add("container_memory_kernel_usage", kernel)
    out.add("container_memory_mapped_file", mem.get("file_mapped"))
    out.add("container_memory_swap", mem.get("swap_current"))
    out.add("container_memory_failcnt", mem.get("events_max"))
    out.add("container_memory_usage_bytes", current)
    out.add("container_memory_max_usage_bytes", max(current, _u(mem.get("peak"))))
    out.add("container_memory_working_set_bytes", stats_mem.working_set_bytes.value)
    for kind in ("pgfault", "pgmajfault"):
        for scope in ("container", "hierarchy"):
            out.add("container_memory_failures_total", mem.get(kind), kind, scope)
    out.add("container_oom_events_total", mem.get("oom_kill"))


def _io(out: _Out, devices) -> None:
    for dev in (devices if isinstance(devices, list) else [])[:64]:
        if not isinstance(dev, dict):
            continue
        major, minor = _u(dev.get("major")) & 0xFFFFFFFF, _u(dev.get("minor")) & 0xFFFFFFFF
        name = f"{major}:{minor}"
        out.add("container_fs_reads_bytes_total", dev.get("rbytes"), name)
        out.add("container_fs_writes_bytes_total", dev.get("wbytes"), name)
        out.add("container_fs_reads_total", dev.get("rios"), name)
        out.add("container_fs_writes_total", dev.get("wios"), name)
        for op, key in (("read", "rbytes"), ("write", "wbytes")):
            out.add("container_blkio_device_usage_total", dev.get(key), name, str(major), str(minor), op)


def _processes(out: _Out, sample: dict) -> None:
    procs = sample.get("processes") if isinstance(sample.get("processes"), dict) else {}
    out.add("container_processes", sample.get("pids"))
    out.add("container_file_descriptors", procs.get("file_descriptors"))
    out.add("container_sockets", procs.get("sockets"))
    out.add("container_threads", procs.get("threads"))
    pids_max = sample.get("pids_max")
    out.add("container_threads_max", pids_max if isinstance(pids_max, int) else 0)  # 0: no limit
    nofile = procs.get("nofile_soft")
    if isinstance(nofile, int) and not isinstance(nofile, bool):
        # a UInt64 cannot say -1: "unlimited" goes out as the largest value
        out.add("container_ulimits_soft", U64 if nofile < 0 else nofile, "max_open_files")


def _pressure(out: _Out, pressure) -> None:
    for kind in ("cpu", "memory", "io"):
        p = pressure.get(kind) if isinstance(pressure, dict) else None
        if isinstance(p, dict):
            out.add(f"container_pressure_{kind}_waiting_seconds_total", _u(p.get("some")) // 1_000_000)
            out.add(f"container_pressure_{kind}_stalled_seconds_total", _u(p.get("full")) // 1_000_000)


def _hugetlb(out: _Out, pages) -> None:
    for size, used in list((pages if isinstance(pages, dict) else {}).items())[:8]:
        if isinstance(size, str) and _PAGESIZE.match(size):
            out.add("container_hugetlb_usage_bytes", used, size)


def _spec(out: _Out, rec, config: pb.ContainerConfig) -> None:
    res = config.linux.resources
    out.add("container_spec_cpu_period", res.cpu_period)
    out.add("container_spec_cpu_shares", res.cpu_shares)
    if res.cpu_quota > 0:
        out.add("container_spec_cpu_quota", res.cpu_quota)
    out.add("container_spec_memory_limit_bytes", res.memory_limit_in_bytes)
    out.add("container_spec_memory_swap_limit_bytes", res.memory_swap_limit_in_bytes)
    reservation = res.unified.get("memory.min", "0")
    out.add("container_spec_memory_reservation_limit_bytes", int(reservation) if reservation.isdigit() else 0)
    out.add("container_start_time_seconds", (rec.started_ns or rec.created_ns) // NS)


def _filesystem(out: _Out, layer) -> None:
    try:
        vfs = os.statvfs(layer.fs_id.mountpoint)
    except OSError:
        return
    out.add("container_fs_usage_bytes", layer.used_bytes.value)
    out.add("container_fs_limit_bytes", vfs.f_blocks * vfs.f_frsize)
    out.add("container_fs_inodes_total", vfs.f_files)
    out.add("container_fs_inodes_free", vfs.f_ffree)


def container_metrics(rec, stats: pb.ContainerStats, sample: dict | None,
                      pod_md: pb.PodSandboxMetadata) -> pb.ContainerMetrics:
    """Metrics of one container from its ContainerStats and the agent's container_metrics
    reply (None for a container that is not running: then only the host's own facts)."""
    config = pb.ContainerConfig.FromString(rec.config)
    out = _Out([rec.id, rec.image, pod_md.namespace, pod_md.name, config.metadata.name])
    out.add("container_last_seen", out.ts // NS)
    _spec(out, rec, config)
    if stats.HasField("writable_layer"):
        _filesystem(out, stats.writable_layer)
    if sample:
        _cpu(out, sample.get("cpu") if isinstance(sample.get("cpu"), dict) else {},
             stats.cpu.usage_core_nano_seconds.value)
        _memory(out, sample.get("memory") if isinstance(sample.get("memory"), dict) else {}, stats.memory)
        _io(out, sample.get("io"))
        _processes(out, sample)
        _pressure(out, sample.get("pressure"))
        _hugetlb(out, sample.get("hugetlb"))
    return pb.ContainerMetrics(container_id=rec.id, metrics=out.items)


def _network(out: _Out, interfaces) -> None:
    pairs = (("receive_bytes", "rx_bytes"), ("receive_packets", "rx_packets"),
             ("receive_packets_dropped", "rx_dropped"), ("receive_errors", "rx_errors"),
             ("transmit_bytes", "tx_bytes"), ("transmit_packets", "tx_packets"),
             ("transmit_packets_dropped", "tx_dropped"), ("transmit_errors", "tx_errors"))
    for iface in (interfaces if isinstance(interfaces, list) else [])[:16]:
        if not isinstance(iface, dict) or not _IFNAME.match(str(iface.get("name", ""))):
            continue
        for metric, key in pairs:
            out.add(f"container_network_{metric}_total", iface.get(key), iface["name"])


def pod_metrics(stats: pb.PodSandboxStats, sandbox_sample: dict | None,
                containers: list[pb.ContainerMetrics]) -> pb.PodSandboxMetrics:
    md = stats.attributes.metadata
    out = _Out([stats.attributes.id, "", md.namespace, md.name, "POD"])
    out.add("container_last_seen", out.ts // NS)
    linux = stats.linux
    if linux.HasField("cpu"):
        out.add("container_cpu_usage_seconds_total", linux.cpu.usage_core_nano_seconds.value // NS, "total")
    if linux.HasField("memory"):
        out.add("container_memory_working_set_bytes", linux.memory.working_set_bytes.value)
        out.add("container_memory_usage_bytes", linux.memory.usage_bytes.value)
        out.add("container_memory_rss", linux.memory.rss_bytes.value)
    if linux.HasField("process"):
        out.add("container_processes", linux.process.process_count.value)
    _network(out, (sandbox_sample or {}).get("interfaces"))
    return pb.PodSandboxMetrics(pod_sandbox_id=stats.attributes.id, metrics=out.items,
                                container_metrics=containers)
