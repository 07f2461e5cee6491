"""Pod sandboxes through the real daemon, libvirt and a TCG-booted guest."""
import json
import os
import signal
import time

import grpc
import libvirt
import pytest
from cri_api.v1 import api_pb2 as pb

pytestmark = pytest.mark.vm


def pod_config(name: str, **kw) -> pb.PodSandboxConfig:
    cfg = pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, namespace="vmcri-test", uid=f"uid-{name}",
                                       attempt=0),
        hostname=kw.pop("hostname", name),
        labels={"app": name, "suite": "sandbox"},
        annotations={"note": "made by test_sandbox_vm"},
        dns_config=pb.DNSConfig(servers=["10.96.0.10"], searches=["svc.cluster.local"],
                                options=["ndots:5"]),
        **kw)
    return cfg


def domain_of(daemon, sandbox_id):
    st = daemon.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id,
                                                                    verbose=True))
    return json.loads(st.info["info"])


def leftovers(daemon, sandbox_id, info):
    conn = libvirt.open("qemu:///system")
    try:
        names = [d.name() for d in conn.listAllDomains(0)]
    finally:
        conn.close()
    found = []
    if info["vm"]["domain"] in names:
        found.append("domain")
    for key in ("shareDir", "consoleLog", "agentSocket"):
        if os.path.exists(info[key]):
            found.append(key)
    with open("/proc/self/mountinfo") as f:
        if any(sandbox_id in line for line in f):
            found.append("mount")
    return found


@pytest.fixture(scope="module")
def vm_daemon(daemon_factory):
    # cni_conf_dir = "" disables pod networking: these tests are about the VM itself.
    return daemon_factory('cni_conf_dir = ""')


@pytest.fixture(scope="module")
def pod(vm_daemon):
    sid = vm_daemon.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=pod_config("web"))).pod_sandbox_id
    yield sid
    vm_daemon.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid))
    vm_daemon.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid))


def test_run_pod_sandbox_is_a_running_vm(vm_daemon, pod):
    st = vm_daemon.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod, verbose=True))
    assert st.status.state == pb.PodSandboxState.SANDBOX_READY
    assert st.status.metadata.name == "web"
    assert st.status.labels["app"] == "web"
    info = json.loads(st.info["info"])
    assert info["vm"]["running"] is True
    assert info["vm"]["accel"] == "tcg"
    assert info["vm"]["qemuPid"] > 1
    assert info["vmCost"]["qemuVmRSSKiB"] > 0 and info["vmCost"]["cpuTimeNs"] > 0
    # the agent answered and the guest was configured, phase by phase
    for phase in ("prepare", "define", "agent", "configure", "total"):
        assert info["timings"][phase] >= 0
    conn = libvirt.open("qemu:///system")
    try:
        dom = conn.lookupByName(info["vm"]["domain"])
        xml = dom.XMLDesc(0)
    finally:
        conn.close()
    assert pod in xml  # vmcri metadata names the sandbox
    assert "<memory unit='KiB'>262144</memory>" in xml


def test_list_and_filters(vm_daemon, pod):
    items = vm_daemon.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items
    assert pod in [i.id for i in items]
    by_label = vm_daemon.runtime.ListPodSandbox(pb.ListPodSandboxRequest(
        filter=pb.PodSandboxFilter(label_selector={"app": "web"}))).items
    assert [i.id for i in by_label] == [pod]
    none = vm_daemon.runtime.ListPodSandbox(pb.ListPodSandboxRequest(
        filter=pb.PodSandboxFilter(label_selector={"app": "nope"}))).items
    assert list(none) == []
    by_prefix = vm_daemon.runtime.ListPodSandbox(pb.ListPodSandboxRequest(
        filter=pb.PodSandboxFilter(id=pod[:10]))).items
    assert [i.id for i in by_prefix] == [pod]
    notready = vm_daemon.runtime.ListPodSandbox(pb.ListPodSandboxRequest(
        filter=pb.PodSandboxFilter(state=pb.PodSandboxStateValue(
            state=pb.PodSandboxState.SANDBOX_NOTREADY)))).items
    assert pod not in [i.id for i in notready]


def test_same_name_is_reserved(vm_daemon, pod):
    with pytest.raises(grpc.RpcError) as e:
        vm_daemon.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=pod_config("web")))
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS


# host namespaces: by default a host sandbox (tests/test_hostpod_cri.py); refused, naming the
# field, with host_namespace_pods = "refuse" (test_refuse_policy_names_the_field there)


@pytest.mark.parametrize("mutate,field", [
    (lambda c: c.metadata.ClearField("name"), "config.metadata.name"),
    (lambda c: c.metadata.ClearField("uid"), "config.metadata.uid"),
    (lambda c: setattr(c, "hostname", "bad host"), "config.hostname"),
    (lambda c: c.dns_config.servers.append("1.1.1.1 evil"), "config.dns_config.servers[1]"),
])
def test_bad_input_names_the_field(vm_daemon, mutate, field):
    cfg = pod_config("bad")
    mutate(cfg)
    with pytest.raises(grpc.RpcError) as e:
        vm_daemon.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in e.value.details()


def test_unknown_ids(vm_daemon):
    with pytest.raises(grpc.RpcError) as e:
        vm_daemon.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id="f" * 64))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    # Stop and Remove of an unknown sandbox succeed: there is nothing left to reclaim
    vm_daemon.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id="f" * 64))
    vm_daemon.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id="f" * 64))


def test_runtime_handlers(vm_daemon):
    st = vm_daemon.runtime.Status(pb.StatusRequest())
    # "" and "vmcri" give a pod VM; "host" a host sandbox (host_namespace_pods = "delegate")
    assert [h.name for h in st.runtime_handlers] == ["", "vmcri", "host"]
    with pytest.raises(grpc.RpcError) as e:
        vm_daemon.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=pod_config("h"),
                                                                runtime_handler="kata"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "runtime_handler" in e.value.details() and "kata" in e.value.details()


def test_sized_pod_stop_remove_idempotent_and_clean(vm_daemon):
    cfg = pod_config("sized")
    cfg.linux.resources.cpu_quota, cfg.linux.resources.cpu_period = 200000, 100000
    cfg.linux.resources.memory_limit_in_bytes = 100 << 20
    sid = vm_daemon.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg)).pod_sandbox_id
    info = domain_of(vm_daemon, sid)
    assert info["vm"]["vcpus"] == 2
    assert info["vm"]["memoryMiB"] == 100 + 96
    for _ in range(2):
        vm_daemon.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid))
    st = vm_daemon.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid))
    assert st.status.state == pb.PodSandboxState.SANDBOX_NOTREADY
    assert "domain" not in leftovers(vm_daemon, sid, info)
    for _ in range(2):
        vm_daemon.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid))
    assert leftovers(vm_daemon, sid, info) == []
    with pytest.raises(grpc.RpcError) as e:
        vm_daemon.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_agent_timeout_rolls_back_everything(daemon_factory):
    # A guest that never answers in time: the error carries the console tail, and
    # no domain, dir, mount or row survives.
    d = daemon_factory('cni_conf_dir = ""\nagent_timeout_s = 1.5')
    with pytest.raises(grpc.RpcError) as e:
        d.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=pod_config("slow")))
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "guest console" in e.value.details()
    assert list(d.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items) == []
    sandboxes = os.path.join(d.root_dir, "sandboxes")
    assert not os.path.exists(sandboxes) or os.listdir(sandboxes) == []
    conn = libvirt.open("qemu:///system")
    try:
        mine = [dom.name() for dom in conn.listAllDomains(0) if d.root_dir in dom.XMLDesc(0)]
    finally:
        conn.close()
    assert mine == []


def _row_state(daemon, sid):
    import sqlite3
    db = sqlite3.connect(f"file:{os.path.join(daemon.root_dir, 'vmcri.db')}?mode=ro", uri=True)
    try:
        return db.execute("SELECT state FROM sandboxes WHERE id = ?", (sid,)).fetchone()[0]
    finally:
        db.close()


def _owned_domains(root_dir):
    conn = libvirt.open("qemu:///system")
    try:
        return [dom.name() for dom in conn.listAllDomains(0) if root_dir in dom.XMLDesc(0)]
    finally:
        conn.close()


def test_missing_kernel_rolls_back_everything(daemon_factory, tmp_path):
    # A guest image whose kernel is garbage: qemu refuses to start, after the row, dirs
    # and the shared mount were made; the rollback must leave nothing.
    real = os.environ.get("VMCRI_TEST_GUEST_DIR", "/var/lib/vmcri/guest/current")
    broken = tmp_path / "guest"
    broken.mkdir()
    for name in os.listdir(real):
        if name != "vmlinux":
            os.symlink(os.path.join(os.path.realpath(real), name), broken / name)
    (broken / "vmlinux").write_bytes(b"this is not a kernel\n" * 100)
    d = daemon_factory(f'cni_conf_dir = ""\nguest_image_dir = "{broken}"')
    with pytest.raises(grpc.RpcError) as e:
        d.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=pod_config("nokernel")))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "libvirt could not start the pod VM" in e.value.details()
    assert list(d.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items) == []
    sandboxes = os.path.join(d.root_dir, "sandboxes")
    assert not os.path.exists(sandboxes) or os.listdir(sandboxes) == []
    assert _owned_domains(d.root_dir) == []
    with open("/proc/self/mountinfo") as f:
        assert d.root_dir not in f.read()


def test_external_virsh_destroy_makes_pod_notready(vm_daemon):
    import subprocess
    sid = vm_daemon.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=pod_config("destroyed"))).pod_sandbox_id
    info = domain_of(vm_daemon, sid)
    subprocess.run(["virsh", "-c", "qemu:///system", "destroy", info["vm"]["domain"]],
                   check=True, capture_output=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _row_state(vm_daemon, sid) != "NOTREADY":
        time.sleep(0.2)
    assert _row_state(vm_daemon, sid) == "NOTREADY"
    vm_daemon.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid))
    assert leftovers(vm_daemon, sid, info) == []


def test_qemu_killed_makes_pod_notready_then_remove_cleans(vm_daemon):
    sid = vm_daemon.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=pod_config("victim"))).pod_sandbox_id
    info = domain_of(vm_daemon, sid)
    os.kill(info["vm"]["qemuPid"], signal.SIGKILL)
    # The libvirt lifecycle event marks the row NOTREADY on its own, without any RPC
    # polling libvirt: read the row itself.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        row = _row_state(vm_daemon, sid)
        if row == "NOTREADY":
            break
        time.sleep(0.2)
    assert row == "NOTREADY"
    st = vm_daemon.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid, verbose=True))
    assert st.status.state == pb.PodSandboxState.SANDBOX_NOTREADY
    assert "VMGone" in json.loads(st.info["info"])["reason"]
    vm_daemon.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid))
    assert leftovers(vm_daemon, sid, info) == []


def test_daemon_restart_keeps_pods_and_reaps_orphans(daemon_factory):
    d = daemon_factory('cni_conf_dir = ""')
    sid = d.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=pod_config("survivor"))).pod_sandbox_id
    info = domain_of(d, sid)
    d.restart(signal.SIGKILL)
    st = d.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid))
    assert st.status.state == pb.PodSandboxState.SANDBOX_READY
    # a row lost behind the daemon's back: its VM is an orphan and must not leak
    d.stop(signal.SIGKILL)
    import sqlite3
    db = sqlite3.connect(os.path.join(d.root_dir, "vmcri.db"))
    db.execute("DELETE FROM sandboxes WHERE id = ?", (sid,))
    db.commit()
    db.close()
    d.start()
    conn = libvirt.open("qemu:///system")
    try:
        names = [dom.name() for dom in conn.listAllDomains(0)]
    finally:
        conn.close()
    assert info["vm"]["domain"] not in names
    # ... and its dirs and the shared mount are cleaned up too
    assert not os.path.exists(info["shareDir"])
    with open("/proc/self/mountinfo") as f:
        assert sid not in f.read()
