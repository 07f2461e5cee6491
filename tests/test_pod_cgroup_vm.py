"""linux.cgroup_parent through a real pod VM: qemu runs in the pod's cgroup in every cgroup
hierarchy the kubelet would use (made here by the test, as the kubelet's cgroupfs driver
makes them), its memory is charged there, the pod's stats report it, and nothing is left
after the pod stops."""
from __future__ import annotations

import glob
import os
import secrets

import grpc
import pytest
from cri_api.v1 import api_pb2 as pb

from tests.test_sandbox_vm import pod_config
from vmcri.sandbox import designer, podcgroup

pytestmark = [pytest.mark.vm]

KUBELET_V1 = ("cpu", "cpuacct", "cpuset", "memory", "pids", "blkio", "freezer", "devices")


def _v1_mounts() -> dict[str, str]:
    return {os.path.basename(m): m for m, v2 in podcgroup.hierarchies()
            if not v2 and os.path.basename(m) in KUBELET_V1}


@pytest.fixture(scope="module")
def pod_parent():
    """/vmcri-test-<rand>/pod<uid> in each v1 hierarchy, as the kubelet's cgroupfs driver
    lays out a pod's cgroup; removed at the end."""
    mounts = _v1_mounts()
    if "memory" not in mounts:
        pytest.skip("no cgroup v1 memory hierarchy on this host")
    top = f"vmcri-test-{secrets.token_hex(4)}"
    rel = f"/{top}/pod{secrets.token_hex(8)}"
    for name, mnt in mounts.items():
        path = mnt
        for comp in rel.strip("/").split("/"):
            parent, path = path, os.path.join(path, comp)
            os.mkdir(path)
            if name == "cpuset":  # the kubelet copies these down; a new cpuset has none
                for f in ("cpuset.cpus", "cpuset.mems"):
                    with open(os.path.join(parent, f)) as src, open(os.path.join(path, f), "w") as dst:
                        dst.write(src.read().strip())
    yield rel, mounts
    for mnt in mounts.values():
        for sub in (rel, f"/{top}"):
            d = mnt + sub
            for child in (os.listdir(d) if os.path.isdir(d) else []):
                if os.path.isdir(os.path.join(d, child)):
                    os.rmdir(os.path.join(d, child))  # fails loudly if a task is still in it
            if os.path.isdir(d):
                os.rmdir(d)


@pytest.fixture(scope="module")
def daemon(daemon_factory):
    return daemon_factory('cni_conf_dir = ""')


def _procs(path: str) -> set[int]:
    with open(os.path.join(path, "cgroup.procs")) as f:
        return {int(p) for p in f.read().split()}


def _usage(cgroup_dir: str) -> int:
    with open(os.path.join(cgroup_dir, "memory.usage_in_bytes")) as f:
        return int(f.read())


def _kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def test_qemu_is_charged_to_the_pod_cgroup(daemon, pod_parent):
    rel, mounts = pod_parent
    cfg = pod_config("cgparent")
    cfg.linux.cgroup_parent = rel
    sid = daemon.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg)).pod_sandbox_id
    try:
        with open(f"/run/libvirt/qemu/{designer.domain_name(sid)}.pid") as f:
            pid = int(f.read().strip())
        child = f"{rel}/{podcgroup.child_name(sid)}"
        for name, mnt in mounts.items():
            assert pid in _procs(mnt + child), f"qemu {pid} is not in {name}:{child}"
            with open(f"/proc/{pid}/cgroup") as f:
                assert any(line.rstrip().endswith(":" + child) and name in line.split(":")[1].split(",")
                           for line in f), name
        # qemu joined the pod's cgroups before it allocated anything (the emulator wrapper):
        # its guest RAM, TCG's code cache and its own heap are all charged to the pod.
        usage = _usage(mounts["memory"] + rel)
        (libvirt_cg,) = glob.glob(f"{mounts['memory']}/machine/qemu-*-{designer.domain_name(sid)}.libvirt-qemu")
        before = _usage(libvirt_cg)
        anon = _kib(pid, "RssAnon") * 1024
        print(f"\npod cgroup {usage >> 20} MiB, left in libvirt's {before >> 20} MiB; qemu RssAnon "
              f"{anon >> 20} MiB, VmRSS {_kib(pid, 'VmRSS') >> 10} MiB")
        assert usage >= 0.9 * anon > 0
        st = daemon.runtime.PodSandboxStats(pb.PodSandboxStatsRequest(pod_sandbox_id=sid)).stats
        assert st.linux.cpu.usage_core_nano_seconds.value > 0
        assert st.linux.memory.working_set_bytes.value > 0
        listed = daemon.runtime.ListPodSandboxStats(pb.ListPodSandboxStatsRequest(
            filter=pb.PodSandboxStatsFilter(id=sid))).stats
        assert [s.attributes.id for s in listed] == [sid] and listed[0].linux.memory.usage_bytes.value > 0
    finally:
        daemon.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid))
    for name, mnt in mounts.items():
        assert not os.path.exists(mnt + child), f"{name}:{child} is left after StopPodSandbox"
    daemon.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid))


def test_bad_cgroup_parent_is_refused_before_any_vm(daemon):
    cfg = pod_config("cgbad")
    cfg.linux.cgroup_parent = "/kubepods/../../machine"
    with pytest.raises(grpc.RpcError) as e:
        daemon.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "config.linux.cgroup_parent" in e.value.details()
