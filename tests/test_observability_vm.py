"""Observability on a real pod VM with real pod networking: stats that move with the load,
cAdvisor-named pod metrics, the container event stream, and the Prometheus endpoint."""
from __future__ import annotations

import queue
import socket
import threading
import time

import pytest
from cri_api.v1 import api_pb2 as pb
from prometheus_client.parser import text_string_to_metric_families

from tests.support.fx_cni import NodeNetwork
from tests.support.pods import start_container, wait_for
from tests.test_sandbox_vm import pod_config

pytestmark = [pytest.mark.vm, pytest.mark.registry]

POD_NET = "10.89.5.0/24"
GATEWAY = "10.89.5.1"
FILL_MIB = 40
WAIT_S = 180  # hang detector for slow TCG hosts, not a performance bound


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def obs(daemon_factory, test_images, tmp_path_factory):
    node = NodeNetwork(str(tmp_path_factory.mktemp("obsnet")), POD_NET, "vmcri-tbr5")
    port = free_port()
    d = daemon_factory(node.daemon_config() + f"metrics_port = {port}\n"
                       f'insecure_registries = ["{test_images.registry}"]')
    image = test_images.single.ref
    d.image.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image)))
    node.move_daemon_in(d)
    # the metrics endpoint now listens on the node's loopback: scrape it from in there
    cfg = pod_config("obs")
    cfg.log_directory = str(tmp_path_factory.mktemp("obs-logs"))
    sid = d.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg)).pod_sandbox_id
    yield {"d": d, "sid": sid, "cfg": cfg, "image": image, "node": node, "port": port}
    d.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid))
    d.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid))
    node.remove()


def make_container(o, name: str, command) -> str:
    return start_container(o["d"], o["sid"], o["cfg"], o["image"], name, command)


def container_stats(o, cid) -> pb.ContainerStats:
    return o["d"].runtime.ContainerStats(pb.ContainerStatsRequest(container_id=cid)).stats


def wait_until(fn, what: str):
    return wait_for(fn, what, timeout=WAIT_S, every=1)


def test_cpu_and_memory_rise_while_a_container_burns_and_allocates(obs):
    d = obs["d"]
    # tmpfs pages are charged to the writer's cgroup and are not reclaimable file cache
    cid = make_container(obs, "burner", ["/bin/sh", "-c",
                                         f"dd if=/dev/zero of=/dev/shm/fill bs=1M count={FILL_MIB} 2>/dev/null; "
                                         "while :; do :; done"])
    first = wait_until(lambda: (s := container_stats(obs, cid)).HasField("cpu") and s, "first stats")
    time.sleep(5)
    grown = wait_until(lambda: (s := container_stats(obs, cid)).memory.working_set_bytes.value
                       >= FILL_MIB << 20 and s, f"{FILL_MIB} MiB working set")
    burnt = grown.cpu.usage_core_nano_seconds.value - first.cpu.usage_core_nano_seconds.value
    assert burnt >= 1_000_000_000, burnt  # at least one CPU-second of the busy loop
    assert grown.cpu.usage_nano_cores.value > 0
    assert grown.memory.usage_bytes.value >= grown.memory.working_set_bytes.value
    assert grown.writable_layer.used_bytes.value >= 0 and grown.attributes.id == cid

    listed = d.runtime.ListContainerStats(pb.ListContainerStatsRequest(
        filter=pb.ContainerStatsFilter(pod_sandbox_id=obs["sid"]))).stats
    assert cid in [s.attributes.id for s in listed]
    other = d.runtime.ListContainerStats(pb.ListContainerStatsRequest(
        filter=pb.ContainerStatsFilter(pod_sandbox_id="no-such-pod"))).stats
    assert list(other) == []

    pod = d.runtime.PodSandboxStats(pb.PodSandboxStatsRequest(pod_sandbox_id=obs["sid"])).stats
    assert pod.linux.memory.working_set_bytes.value >= FILL_MIB << 20
    assert pod.linux.cpu.usage_core_nano_seconds.value >= grown.cpu.usage_core_nano_seconds.value
    assert pod.linux.process.process_count.value >= 2  # the agent and the burner at least
    assert cid in [c.attributes.id for c in pod.linux.containers]
    obs["burner"] = cid


def test_network_counters_move_with_traffic(obs):
    d = obs["d"]
    cid = make_container(obs, "talker", ["sleep", "100000"])

    def tx():
        st = d.runtime.PodSandboxStats(pb.PodSandboxStatsRequest(pod_sandbox_id=obs["sid"])).stats
        return st.linux.network.default_interface
    before = tx()
    assert before.name == "eth0"
    # nothing listens on the gateway: each connect is a SYN out and a RST back
    d.runtime.ExecSync(pb.ExecSyncRequest(container_id=cid, timeout=60, cmd=[
        "/bin/sh", "-c", f"for i in 1 2 3 4 5; do nc -w 1 {GATEWAY} 9 </dev/null; done; true"]))
    after = tx()
    assert after.tx_bytes.value > before.tx_bytes.value
    assert after.rx_bytes.value > before.rx_bytes.value


def test_pod_metrics_use_cadvisor_names(obs):
    d = obs["d"]
    names = {m.name for m in d.runtime.ListMetricDescriptors(pb.ListMetricDescriptorsRequest()).descriptors}
    assert {"container_cpu_usage_seconds_total", "container_memory_working_set_bytes",
            "container_network_receive_bytes_total"} <= names
    pods = d.runtime.ListPodSandboxMetrics(pb.ListPodSandboxMetricsRequest()).pod_metrics
    pod = next(p for p in pods if p.pod_sandbox_id == obs["sid"])
    got = {m.name for m in pod.metrics} | {m.name for c in pod.container_metrics for m in c.metrics}
    assert got <= names and "container_cpu_usage_seconds_total" in got
    assert "container_network_receive_bytes_total" in got


def test_event_stream_delivers_a_lifecycle_in_order(obs):
    d = obs["d"]
    events: queue.Queue = queue.Queue()
    stream = d.runtime.GetContainerEvents(pb.GetEventsRequest())

    def read():
        try:
            for ev in stream:
                events.put(ev)
        except Exception:
            pass
    threading.Thread(target=read, daemon=True).start()
    time.sleep(1)  # the subscription is in place before the first event
    cid = make_container(obs, "evented", ["sleep", "100000"])  # create + start
    d.runtime.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=2))
    d.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))
    seen = []
    deadline = time.monotonic() + WAIT_S
    while len(seen) < 4 and time.monotonic() < deadline:
        try:
            ev = events.get(timeout=5)
        except queue.Empty:
            continue
        if ev.container_id == cid:
            seen.append(ev)
    stream.cancel()
    assert [e.container_event_type for e in seen] == [
        pb.ContainerEventType.CONTAINER_CREATED_EVENT, pb.ContainerEventType.CONTAINER_STARTED_EVENT,
        pb.ContainerEventType.CONTAINER_STOPPED_EVENT, pb.ContainerEventType.CONTAINER_DELETED_EVENT]
    assert [e.created_at for e in seen] == sorted(e.created_at for e in seen)
    assert all(e.pod_sandbox_status.id == obs["sid"] for e in seen)
    started = seen[1]
    assert cid in [c.id for c in started.containers_statuses]
    assert next(c for c in started.containers_statuses if c.id == cid).state == pb.ContainerState.CONTAINER_RUNNING


def test_prometheus_endpoint_scrapes_and_parses(obs):
    import subprocess
    import sys
    url = f"http://127.0.0.1:{obs['port']}/metrics"
    # the daemon (and its loopback listener) lives in the node netns
    text = subprocess.run(["nsenter", f"--net={obs['node'].node}", sys.executable, "-c",
                           f"import urllib.request,sys; sys.stdout.write(urllib.request.urlopen('{url}', timeout=30).read().decode())"],
                          capture_output=True, text=True, timeout=60, check=True).stdout
    families = {f.name: f for f in text_string_to_metric_families(text)}
    phases = {s.labels.get("phase") for s in families["vmcri_sandbox_start_phase_seconds"].samples}
    assert {"define", "agent"} <= phases, phases
    starts = [s for s in families["vmcri_container_start_seconds"].samples if s.name.endswith("_count")]
    assert starts and starts[0].value >= 1
    ready = [s for s in families["vmcri_sandboxes"].samples if s.labels.get("state") == "READY"]
    assert ready and ready[0].value >= 1
    rtt = [s for s in families["vmcri_agent_call_seconds"].samples if s.name.endswith("_count")]
    assert sum(s.value for s in rtt) >= 1
    assert any(s.labels.get("method") == "RunPodSandbox" for s in families["vmcri_rpc_seconds"].samples)
    assert "vmcri_pool_vms" in families and "vmcri_pool_events" in families
