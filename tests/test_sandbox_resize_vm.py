"""UpdatePodSandboxResources on a real pod VM: vCPU and memory hotplug seen from a container.

One pod VM (module scope) with a sleeping container serves every test; each test asks for
an absolute shape, so the order only matters where a test says so. The daemon caps
max_vcpus at 3 and max_memory_mib at 1024 to keep the TCG guest light."""
import json

import grpc
import pytest
from cri_api.v1 import api_pb2 as pb

from tests.support.pods import pod_env, start_container

pytestmark = [pytest.mark.vm, pytest.mark.registry]
MIB = 1 << 20
BOOT_MIB = 256  # the pod config below has no limits: the default shape


@pytest.fixture(scope="module")
def env(daemon_factory, test_images, tmp_path_factory):
    gen = pod_env(_capped(daemon_factory), test_images, tmp_path_factory, "resize")
    d, sid, cfg, imgs = next(gen)
    cid = start_container(d, sid, cfg, imgs.multi.ref, "probe")
    yield d, sid, cid
    next(gen, None)


def _capped(daemon_factory):
    def factory(extra: str = ""):
        return daemon_factory(extra + "\nmax_vcpus = 3\nmax_memory_mib = 1024")
    return factory


def resize(d, sid, quota=0, mem_mib=0, overhead_mib=0):
    res = pb.LinuxContainerResources(cpu_period=100000 if quota else 0, cpu_quota=quota,
                                     memory_limit_in_bytes=mem_mib * MIB)
    req = pb.UpdatePodSandboxResourcesRequest(pod_sandbox_id=sid, resources=res)
    if overhead_mib:
        req.overhead.memory_limit_in_bytes = overhead_mib * MIB
    return d.runtime.UpdatePodSandboxResources(req)


def info(d, sid) -> dict:
    st = d.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid, verbose=True))
    return json.loads(st.info["info"])


def guest(d, cid, *cmd) -> str:
    out = d.runtime.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=list(cmd), timeout=60))
    assert out.exit_code == 0, out.stderr
    return out.stdout.decode().strip()


def online_cpus(d, cid) -> str:
    return guest(d, cid, "cat", "/sys/devices/system/cpu/online")


def mem_total_mib(d, cid) -> int:
    for line in guest(d, cid, "cat", "/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no MemTotal")


def test_grow_vcpus_is_seen_in_the_guest(env):
    d, sid, cid = env
    resize(d, sid, quota=200000)  # 2 CPUs
    assert online_cpus(d, cid) == "0-1"
    assert guest(d, cid, "nproc") == "2"
    i = info(d, sid)
    assert i["vm"]["vcpus"] == 2
    assert i["resize"]["requested"]["vcpus"] == 2
    assert i["resize"]["applied"]["vcpus"] == 2 and i["resize"]["notApplied"] == []


def test_vcpus_above_max_are_capped_and_reported(env):
    d, sid, cid = env
    resize(d, sid, quota=500000)  # 5 CPUs; this daemon's max_vcpus is 3: still OK
    assert online_cpus(d, cid) == "0-2"
    r = info(d, sid)["resize"]
    assert r["requested"]["vcpus"] == 3 and r["requested"]["cpus"] == 5.0
    assert r["applied"]["vcpus"] == 3
    assert any("capped at max_vcpus 3" in n for n in r["notApplied"]), r


def test_lowering_vcpus_offlines_them_in_the_guest(env):
    d, sid, cid = env
    resize(d, sid, quota=300000)
    resize(d, sid, quota=100000)
    assert online_cpus(d, cid) == "0"
    r = info(d, sid)["resize"]
    assert r["applied"]["vcpus"] == 1
    assert any("offlining" in n for n in r["notApplied"]), r  # plugged still: reported


def test_grow_memory_is_seen_in_the_guest_then_given_back(env):
    d, sid, cid = env
    before = mem_total_mib(d, cid)
    resize(d, sid, mem_mib=300, overhead_mib=60)  # 300 + 60 + 96 guest = 456 -> one 256 MiB DIMM
    grown = mem_total_mib(d, cid)
    assert grown - before >= 250, (before, grown)
    i = info(d, sid)
    assert i["vm"]["memoryMiB"] == BOOT_MIB + 256
    assert i["resize"]["requested"]["memoryMiB"] == 456 and i["resize"]["notApplied"] == []
    # back to what boot memory covers: the hot-added DIMM is unplugged (ZONE_MOVABLE)
    resize(d, sid, mem_mib=100)
    i = info(d, sid)
    assert i["vm"]["memoryMiB"] == BOOT_MIB, i["resize"]
    assert mem_total_mib(d, cid) < grown - 200


def test_not_applicable_memory_answers_ok_and_is_reported(env):
    d, sid, cid = env
    before = mem_total_mib(d, cid)
    resize(d, sid, mem_mib=8)  # below boot memory: there is no balloon
    r = info(d, sid)["resize"]
    assert any("boot memory" in n for n in r["notApplied"]), r
    assert r["applied"]["memoryMiB"] == BOOT_MIB
    resize(d, sid, mem_mib=4096)  # above this daemon's max_memory_mib of 1024
    r = info(d, sid)["resize"]
    assert any("capped at the VM's max 1024" in n for n in r["notApplied"]), r
    assert r["applied"]["memoryMiB"] == 1024
    assert mem_total_mib(d, cid) - before >= 700


def test_the_new_shape_survives_a_daemon_restart(env):
    d, sid, cid = env
    resize(d, sid, quota=200000)  # up from 1 online while 3 stay plugged: nothing to report
    i = info(d, sid)
    assert i["resize"]["notApplied"] == [] and i["resize"]["applied"]["vcpusPlugged"] == 3, i["resize"]
    want = i["vm"]
    d.restart()
    got = info(d, sid)["vm"]
    assert (got["vcpus"], got["memoryMiB"]) == (want["vcpus"], want["memoryMiB"]) == (2, 1024)
    assert online_cpus(d, cid) == "0-1"
    hp = info(d, sid)["hotplug"]  # libvirt's view: what is plugged and how far it can go
    assert (hp["vcpusPlugged"], hp["maxVcpus"]) == (3, 3)
    assert (hp["memoryMiB"], hp["maxMemoryMiB"], hp["dimms"]) == (1024, 1024, 1)


def test_no_limits_is_a_quiet_no_op(env):
    d, sid, _ = env
    before = info(d, sid)["vm"]
    d.runtime.UpdatePodSandboxResources(pb.UpdatePodSandboxResourcesRequest(
        pod_sandbox_id=sid, resources=pb.LinuxContainerResources(cpu_period=100000, cpu_quota=-1)))
    i = info(d, sid)
    assert i["resize"]["state"] == "nothing to do" and i["resize"]["notApplied"] == []
    assert (i["vm"]["vcpus"], i["vm"]["memoryMiB"]) == (before["vcpus"], before["memoryMiB"])


def test_unknown_id_is_not_found(env):
    d, _, _ = env
    with pytest.raises(grpc.RpcError) as e:
        resize(d, "f" * 64, quota=100000)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("mutate,field", [
    (lambda r: setattr(r.resources, "cpu_period", 5), "resources.cpu_period"),
    (lambda r: setattr(r.resources, "cpu_quota", -7), "resources.cpu_quota"),
    (lambda r: setattr(r.overhead, "memory_limit_in_bytes", -1), "overhead.memory_limit_in_bytes"),
    (lambda r: setattr(r, "pod_sandbox_id", ""), "pod_sandbox_id"),
])
def test_bad_values_are_invalid_argument_naming_the_field(env, mutate, field):
    d, sid, _ = env
    req = pb.UpdatePodSandboxResourcesRequest(
        pod_sandbox_id=sid, resources=pb.LinuxContainerResources(cpu_period=100000, cpu_quota=100000))
    mutate(req)
    with pytest.raises(grpc.RpcError) as e:
        d.runtime.UpdatePodSandboxResources(req)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in e.value.details()
