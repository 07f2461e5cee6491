"""The cAdvisor metric builder: descriptors as critest expects them, label counts that match,
whole seconds (the CRI's UInt64), and a hostile agent's sample kept in bounds."""
from types import SimpleNamespace

from cri_api.v1 import api_pb2 as pb

from vmcri import cadvisor

# cri-tools pkg/validate/pod.go: expectedMetricDescriptorNames minus what it lists as not yet
# implemented by every runtime; vmcri offers all of these
CRITEST_REQUIRED = {
    "container_blkio_device_usage_total", "container_cpu_cfs_periods_total",
    "container_cpu_cfs_throttled_periods_total", "container_cpu_cfs_throttled_seconds_total",
    "container_cpu_system_seconds_total", "container_cpu_usage_seconds_total",
    "container_cpu_user_seconds_total", "container_file_descriptors", "container_fs_inodes_free",
    "container_fs_inodes_total", "container_fs_limit_bytes", "container_fs_reads_bytes_total",
    "container_fs_reads_total", "container_fs_usage_bytes", "container_fs_writes_bytes_total",
    "container_fs_writes_total", "container_last_seen", "container_memory_cache",
    "container_memory_failcnt", "container_memory_failures_total", "container_memory_kernel_usage",
    "container_memory_mapped_file", "container_memory_max_usage_bytes", "container_memory_rss",
    "container_memory_swap", "container_memory_usage_bytes", "container_memory_working_set_bytes",
    "container_network_receive_bytes_total", "container_network_receive_errors_total",
    "container_network_receive_packets_dropped_total", "container_network_receive_packets_total",
    "container_network_transmit_bytes_total", "container_network_transmit_errors_total",
    "container_network_transmit_packets_dropped_total", "container_network_transmit_packets_total",
    "container_oom_events_total", "container_processes", "container_sockets",
    "container_spec_cpu_period", "container_spec_cpu_shares", "container_spec_memory_limit_bytes",
    "container_spec_memory_swap_limit_bytes", "container_start_time_seconds", "container_threads",
    "container_threads_max",
}


def _rec(**res):
    cfg = pb.ContainerConfig(metadata=pb.ContainerMetadata(name="c"),
                             linux=pb.LinuxContainerConfig(resources=pb.LinuxContainerResources(**res)))
    return SimpleNamespace(id="c" * 64, image="img:1", config=cfg.SerializeToString(),
                           started_ns=1_700_000_000 * 10**9, created_ns=0)


def _stats(usage_ns=0):
    return pb.ContainerStats(cpu=pb.CpuUsage(usage_core_nano_seconds=pb.UInt64Value(value=usage_ns)),
                             memory=pb.MemoryUsage(working_set_bytes=pb.UInt64Value(value=5)))


def test_descriptors_cover_critest_with_help_and_base_labels():
    descs = {d.name: d for d in cadvisor.descriptors()}
    assert CRITEST_REQUIRED <= set(descs)
    for d in descs.values():
        assert d.help and list(d.label_keys[:5]) == ["id", "image", "namespace", "pod", "container"]


def test_every_metric_has_its_descriptors_label_count():
    sample = {"cpu": {"user_usec": 2_500_000, "system_usec": 999_999, "nr_periods": 3},
              "memory": {"current": 10, "anon": 4, "file": 3}, "pids": 2, "pids_max": "max",
              "io": [{"major": 254, "minor": 0, "rbytes": 512, "wbytes": 4096, "rios": 1, "wios": 2}],
              "hugetlb": {"2MB": 0}, "pressure": {"cpu": {"some": 3_000_000, "full": 0}},
              "processes": {"file_descriptors": 7, "sockets": 1, "threads": 3, "nofile_soft": -1}}
    cm = cadvisor.container_metrics(_rec(cpu_quota=20000), _stats(3_999_999_999), sample,
                                    pb.PodSandboxMetadata(name="p", namespace="ns"))
    keys = {d.name: len(d.label_keys) for d in cadvisor.descriptors()}
    for m in cm.metrics:
        assert len(m.label_values) == keys[m.name], m.name
    by = {(m.name, tuple(m.label_values[5:])): m.value.value for m in cm.metrics}
    assert by[("container_cpu_usage_seconds_total", ("total",))] == 3   # whole seconds, floored
    assert by[("container_cpu_user_seconds_total", ())] == 2
    assert by[("container_cpu_system_seconds_total", ())] == 0
    assert by[("container_blkio_device_usage_total", ("254:0", "254", "0", "write"))] == 4096
    assert by[("container_ulimits_soft", ("max_open_files",))] == cadvisor.U64  # unlimited
    assert by[("container_threads_max", ())] == 0  # no pids limit
    assert by[("container_spec_cpu_quota", ())] == 20000
    assert by[("container_start_time_seconds", ())] == 1_700_000_000


def test_a_hostile_sample_stays_in_bounds():
    sample = {"cpu": {"user_usec": -5, "nr_periods": 1 << 80}, "memory": "nonsense",
              "io": [{"major": "x", "minor": -1}, "junk"] * 100,
              "hugetlb": {"../../etc": 5, "2MB": 1, "1GB": "big"},
              "processes": {"nofile_soft": True}, "pressure": ["no"]}
    cm = cadvisor.container_metrics(_rec(), _stats(), sample, pb.PodSandboxMetadata())
    names = [m.name for m in cm.metrics]
    assert names.count("container_blkio_device_usage_total") <= 2 * 64
    assert all(0 <= m.value.value <= cadvisor.U64 for m in cm.metrics)
    pages = [m.label_values[5] for m in cm.metrics if m.name == "container_hugetlb_usage_bytes"]
    assert sorted(pages) == ["1GB", "2MB"]
    assert "container_ulimits_soft" not in names


def test_pod_network_labels_are_checked():
    stats = pb.PodSandboxStats(attributes=pb.PodSandboxAttributes(
        id="p" * 64, metadata=pb.PodSandboxMetadata(name="pod", namespace="ns")))
    pm = cadvisor.pod_metrics(stats, {"interfaces": [{"name": "eth0", "rx_bytes": 9},
                                                     {"name": "bad name\n", "rx_bytes": 1}]}, [])
    ifaces = {m.label_values[5] for m in pm.metrics if m.name.startswith("container_network_")}
    assert ifaces == {"eth0"}
    assert all(m.label_values[:5] == ["p" * 64, "", "ns", "pod", "POD"] for m in pm.metrics)
