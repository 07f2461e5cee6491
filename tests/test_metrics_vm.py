"""The cAdvisor metric set through a real pod VM with real pod networking: every metric that
ListMetricDescriptors offers comes back from ListPodSandboxMetrics with the descriptor's
labels and values that agree with what the container was given and did (what critest's
"listing pod sandbox metrics" spec checks, and more)."""
from __future__ import annotations

import time

import pytest
from cri_api.v1 import api_pb2 as pb

from tests.support.fx_cni import NodeNetwork
from tests.support.pods import wait_for
from tests.test_sandbox_vm import pod_config
from vmcri import cadvisor

pytestmark = [pytest.mark.vm, pytest.mark.registry]

POD_NET = "10.89.6.0/24"
GATEWAY = "10.89.6.1"
MIB = 1 << 20
# Sources the guest may lack, and why a metric of theirs may be absent:
# - block I/O: the container's root is 9p, which io.stat does not count (critest lets these
#   go without values too);
# - PSI: Debian's guest kernel keeps it off unless booted with psi=1;
# - hugetlb: only for page sizes the guest kernel has.
BLOCK_IO = {"container_blkio_device_usage_total", "container_fs_reads_bytes_total",
            "container_fs_reads_total", "container_fs_writes_bytes_total", "container_fs_writes_total"}


@pytest.fixture(scope="module")
def pod(daemon_factory, test_images, tmp_path_factory):
    node = NodeNetwork(str(tmp_path_factory.mktemp("metnet")), POD_NET, "vmcri-tbr6")
    d = daemon_factory(node.daemon_config() + f'insecure_registries = ["{test_images.registry}"]')
    image = test_images.single.ref
    d.image.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image)))
    node.move_daemon_in(d)
    cfg = pod_config("metrics")
    cfg.log_directory = str(tmp_path_factory.mktemp("met-logs"))
    sid = d.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg)).pod_sandbox_id
    # critest's container: CPU and memory limits, a long sleep
    cid = d.runtime.CreateContainer(pb.CreateContainerRequest(
        pod_sandbox_id=sid, sandbox_config=cfg, config=pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name="measured"), image=pb.ImageSpec(image=image),
            command=["/bin/sh", "-c", "exec sleep 100000"], log_path="measured.log",
            linux=pb.LinuxContainerConfig(resources=pb.LinuxContainerResources(
                cpu_period=100000, cpu_quota=20000, cpu_shares=1024,
                memory_limit_in_bytes=64 * MIB, memory_swap_limit_in_bytes=64 * MIB))))).container_id
    d.runtime.StartContainer(pb.StartContainerRequest(container_id=cid))
    d.runtime.ExecSync(pb.ExecSyncRequest(container_id=cid, timeout=120, cmd=["/bin/sh", "-c",
        "mkdir -p /var/lib/mydisktest && for i in $(seq 1 10); do echo hi >> /var/lib/mydisktest/f$i; done; sync; "
        # a little CPU under the 20% quota, so the cfs counters move; traffic through eth0
        "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; "
        f"for i in 1 2 3; do nc -w 1 {GATEWAY} 9 </dev/null; done; true"]))
    yield {"d": d, "sid": sid, "cid": cid, "image": image, "cfg": cfg}
    d.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid))
    d.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid))
    node.remove()


def _in_container(pod, script: str) -> str:
    r = pod["d"].runtime.ExecSync(pb.ExecSyncRequest(container_id=pod["cid"], timeout=60,
                                                     cmd=["/bin/sh", "-c", script]))
    return r.stdout.decode()


def _collect(pod):
    d = pod["d"]
    descs = {x.name: x for x in d.runtime.ListMetricDescriptors(pb.ListMetricDescriptorsRequest()).descriptors}
    pods = d.runtime.ListPodSandboxMetrics(pb.ListPodSandboxMetricsRequest()).pod_metrics
    mine = [p for p in pods if p.pod_sandbox_id == pod["sid"]]
    assert len(mine) == 1
    return descs, mine[0]


def test_every_descriptor_has_metrics_with_its_labels(pod):
    descs, pm = _collect(pod)
    assert set(descs) == set(cadvisor.DESCRIPTORS)
    for x in descs.values():
        assert x.help and x.label_keys[:5] == ["id", "image", "namespace", "pod", "container"]
    every = list(pm.metrics) + [m for c in pm.container_metrics for m in c.metrics]
    for m in every:
        assert m.name in descs, m.name
        assert len(m.label_values) == len(descs[m.name].label_keys), (m.name, list(m.label_values))
        assert m.metric_type == cadvisor.DESCRIPTORS[m.name][1], m.name
    have_psi = _in_container(pod, "test -e /sys/fs/cgroup/cpu.pressure && echo yes").strip() == "yes"
    exempt = set(BLOCK_IO) | {"container_hugetlb_usage_bytes"}
    if not have_psi:
        exempt |= set(cadvisor.NEEDS_GUEST_PSI)
    missing = set(descs) - {m.name for m in every} - exempt
    assert not missing, sorted(missing)


def _by_name(metrics) -> dict[str, list[pb.Metric]]:
    out: dict[str, list[pb.Metric]] = {}
    for m in metrics:
        out.setdefault(m.name, []).append(m)
    return out


def _one(ms, name: str, **labels) -> int:
    keys = cadvisor.BASE_LABELS + cadvisor.DESCRIPTORS[name][2]
    hits = [m for m in ms[name] if all(m.label_values[keys.index(k)] == v for k, v in labels.items())]
    assert len(hits) == 1, (name, labels, [list(m.label_values) for m in ms[name]])
    return hits[0].value.value


def test_container_values_match_its_spec_and_its_work(pod):
    _, pm = _collect(pod)
    (cm,) = [c for c in pm.container_metrics if c.container_id == pod["cid"]]
    ms = _by_name(cm.metrics)
    first = ms["container_last_seen"][0]
    assert list(first.label_values) == [pod["cid"], pod["image"], pod["cfg"].metadata.namespace,
                                        pod["cfg"].metadata.name, "measured"]
    now = time.time()
    assert now - 120 <= _one(ms, "container_last_seen") <= now + 5
    assert now - 3600 <= _one(ms, "container_start_time_seconds") <= now + 5
    # the spec, as created
    assert _one(ms, "container_spec_cpu_period") == 100000
    assert _one(ms, "container_spec_cpu_quota") == 20000
    assert _one(ms, "container_spec_cpu_shares") == 1024
    assert _one(ms, "container_spec_memory_limit_bytes") == 64 * MIB
    assert _one(ms, "container_spec_memory_swap_limit_bytes") == 64 * MIB
    # CPU: a 20% quota in 100 ms periods; the exec's loop ran under it
    assert _one(ms, "container_cpu_cfs_periods_total") > 0
    throttled = _one(ms, "container_cpu_cfs_throttled_periods_total")
    assert throttled <= _one(ms, "container_cpu_cfs_periods_total")
    usage = _one(ms, "container_cpu_usage_seconds_total", cpu="total")
    user, system = _one(ms, "container_cpu_user_seconds_total"), _one(ms, "container_cpu_system_seconds_total")
    assert user + system <= usage + 1  # each is floored on its own
    # memory under the 64 MiB limit, and consistent with itself
    mem = _one(ms, "container_memory_usage_bytes")
    assert 0 < mem <= 64 * MIB
    assert _one(ms, "container_memory_working_set_bytes") <= mem
    assert _one(ms, "container_memory_rss") + _one(ms, "container_memory_cache") <= mem
    assert _one(ms, "container_memory_max_usage_bytes") >= mem
    assert _one(ms, "container_memory_failures_total", failure_type="pgfault", scope="container") > 0
    assert _one(ms, "container_memory_mapped_file") <= mem
    assert _one(ms, "container_oom_events_total") == 0
    # processes: the sleep, at least its stdio fds, no sockets
    assert _one(ms, "container_processes") >= 1
    assert _one(ms, "container_threads") >= _one(ms, "container_processes")
    assert _one(ms, "container_file_descriptors") >= 3
    assert _one(ms, "container_sockets") == 0
    soft = _in_container(pod, "ulimit -n").strip()
    assert _one(ms, "container_ulimits_soft", ulimit="max_open_files") == int(soft)
    # the writable layer on the host's root_dir filesystem
    assert _one(ms, "container_fs_usage_bytes") <= _one(ms, "container_fs_limit_bytes")
    assert _one(ms, "container_fs_inodes_free") <= _one(ms, "container_fs_inodes_total")


def test_cpu_and_fds_move_with_the_container(pod):
    d, cid = pod["d"], pod["cid"]
    _, pm = _collect(pod)
    ms = _by_name([m for c in pm.container_metrics if c.container_id == cid for m in c.metrics])
    before_cpu, before_fds = _one(ms, "container_cpu_usage_seconds_total", cpu="total"), \
        _one(ms, "container_file_descriptors")
    # 2+ CPU-seconds at the 20% quota: 10+ s of a busy loop that holds 20 extra fds open
    d.runtime.ExecSync(pb.ExecSyncRequest(container_id=cid, timeout=300, cmd=["/bin/sh", "-c",
        "(exec 3</dev/null 4</dev/null 5</dev/null 6</dev/null 7</dev/null 8</dev/null 9</dev/null; "
        "touch /tmp/fds-open; while [ ! -e /tmp/fds-done ]; do sleep 0.1; done) & "
        "end=$(( $(date +%s) + 12 )); while [ $(date +%s) -lt $end ]; do :; done"]))
    wait_for(lambda: _in_container(pod, "test -e /tmp/fds-open && echo y").strip() == "y", "the fd holder")

    def moved():
        _, p = _collect(pod)
        m = _by_name([x for c in p.container_metrics if c.container_id == cid for x in c.metrics])
        return m if _one(m, "container_file_descriptors") >= before_fds + 7 else None
    ms = wait_for(moved, "7 more open fds", timeout=60, every=1)
    _in_container(pod, "touch /tmp/fds-done")
    assert _one(ms, "container_cpu_usage_seconds_total", cpu="total") >= before_cpu + 1
    assert _one(ms, "container_cpu_cfs_throttled_periods_total") > 0  # the quota held it back


def test_pod_network_metrics_count_the_traffic(pod):
    _, pm = _collect(pod)
    ms = _by_name(pm.metrics)
    first = ms["container_last_seen"][0]
    assert list(first.label_values)[2:] == [pod["cfg"].metadata.namespace, pod["cfg"].metadata.name, "POD"]
    assert _one(ms, "container_network_transmit_packets_total", interface="eth0") > 0
    assert _one(ms, "container_network_receive_packets_total", interface="eth0") > 0
    assert _one(ms, "container_network_transmit_bytes_total", interface="eth0") >= \
        _one(ms, "container_network_transmit_packets_total", interface="eth0") * 42
    assert _one(ms, "container_network_receive_errors_total", interface="eth0") == 0
    assert _one(ms, "container_network_transmit_packets_dropped_total", interface="eth0") == 0
