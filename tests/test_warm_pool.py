"""Warm pool through the real daemon: pre-booted pod VMs claimed by RunPodSandbox."""
import json
import os
import time

import libvirt
import pytest
from cri_api.v1 import api_pb2 as pb

from tests.support.fx_daemon import write_config
from tests.test_sandbox_vm import pod_config
from vmcri.sandbox.domain import parse_metadata

pytestmark = [pytest.mark.vm, pytest.mark.registry]
BOOT_WAIT_S = 300  # TCG on a busy 2-core host


def pool_info(d) -> dict:
    return json.loads(d.runtime.Status(pb.StatusRequest(verbose=True)).info["pool"])


def wait_pool(d, ready: int = 1, booting: int = 0, timeout: float = BOOT_WAIT_S) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = pool_info(d)
        if info["ready"] >= ready and info["booting"] <= booting:
            return info
        time.sleep(0.5)
    raise AssertionError(f"pool never reached {ready} ready: {info}\n{d.log()[-3000:]}")


def owned_domains(root_dir: str) -> dict:
    """name -> metadata of every running domain this daemon's root_dir owns."""
    conn = libvirt.open("qemu:///system")
    try:
        out = {}
        for dom in conn.listAllDomains(0):
            try:
                meta = parse_metadata(dom.XMLDesc(0))
            except libvirt.libvirtError:
                continue
            if meta is not None and meta.owner == root_dir:
                out[dom.name()] = meta
        return out
    finally:
        conn.close()


def pool_domains(d) -> set:
    return {n for n, m in owned_domains(d.root_dir).items() if m.role == "pool"}


def sandbox_info(d, sid) -> dict:
    st = d.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid, verbose=True))
    return json.loads(st.info["info"])


def remove_pod(d, sid) -> None:
    d.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid))
    d.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid))


def run_pod(d, cfg) -> tuple[str, float]:
    t = time.monotonic()
    sid = d.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg)).pod_sandbox_id
    return sid, time.monotonic() - t


POOL_CONFIG = 'cni_conf_dir = ""\nagent_timeout_s = 300\npool_size = 1\ninsecure_registries = ["%s"]'


@pytest.fixture(scope="module")
def env(daemon_factory, test_images):
    d = daemon_factory(POOL_CONFIG % test_images.registry)
    d.image.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=test_images.single.ref)))
    yield d, test_images


def test_claim_configures_the_pod_refills_and_remove_leaves_nothing(env):
    d, images = env
    wait_pool(d)
    [warm] = pool_domains(d)
    cfg = pod_config("warm-web", hostname="warm-web")
    sid, took = run_pod(d, cfg)
    print(f"claim-path RunPodSandbox {took:.2f}s")
    info = sandbox_info(d, sid)
    assert info["source"] == "pool"
    assert info["vm"]["domain"] == warm and info["vm"]["running"] is True
    for phase in ("claim", "configure", "total"):
        assert info["timings"][phase] >= 0
    # the domain is the pod's now, in libvirt's metadata too
    meta = owned_domains(d.root_dir)[warm]
    assert (meta.role, meta.pod_name, meta.sandbox_id) == ("pod", "warm-web", sid)

    ctr = pb.ContainerConfig(metadata=pb.ContainerMetadata(name="c"),
                             image=pb.ImageSpec(image=images.single.ref),
                             command=["/bin/sh", "-c", "exec sleep 100000"], log_path="c.log")
    cid = d.runtime.CreateContainer(pb.CreateContainerRequest(
        pod_sandbox_id=sid, config=ctr, sandbox_config=cfg)).container_id
    d.runtime.StartContainer(pb.StartContainerRequest(container_id=cid))
    out = d.runtime.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["hostname"], timeout=60))
    assert (out.exit_code, out.stdout.strip()) == (0, b"warm-web")
    out = d.runtime.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["cat", "/etc/resolv.conf"],
                                                timeout=60))
    assert b"10.96.0.10" in out.stdout

    wait_pool(d)  # refilled with a fresh VM, never the claimed one
    fresh = pool_domains(d)
    assert len(fresh) == 1 and warm not in fresh

    share = info["shareDir"]
    remove_pod(d, sid)
    left = owned_domains(d.root_dir)
    assert warm not in left and set(left) == fresh
    assert not os.path.exists(share)


def test_other_shape_boots_cold(env):
    d, _ = env
    wait_pool(d)
    before = pool_info(d)["claimed"]
    cfg = pod_config("cold-big")
    cfg.linux.resources.memory_limit_in_bytes = 300 * 1024 * 1024  # not the pool's shape
    sid, took = run_pod(d, cfg)
    print(f"cold RunPodSandbox {took:.2f}s")
    try:
        info = sandbox_info(d, sid)
        assert info["source"] == "cold"
        assert info["vm"]["memoryMiB"] != pool_info(d)["shape"]["memoryMiB"]
        assert pool_info(d)["claimed"] == before
    finally:
        remove_pod(d, sid)


def test_restart_adopts_ready_pool_vm_and_pool_size_zero_destroys_it(env):
    d, images = env
    wait_pool(d)
    before = pool_domains(d)
    d.restart()
    info = pool_info(d)
    assert info["adopted"] == 1 and info["ready"] == 1
    assert pool_domains(d) == before  # the same VM, kept: nothing leaked, nothing rebooted
    # the adopted VM serves a pod (its agent is reached again with the pinned host key)
    sid, _ = run_pod(d, pod_config("adopted"))
    assert sandbox_info(d, sid)["vm"]["domain"] in before
    remove_pod(d, sid)
    wait_pool(d)
    # turning the pool off destroys the pool VM at the next start
    write_config(d.config_path, d.root_dir, d.run_dir, d.socket,
                 'cni_conf_dir = ""\nagent_timeout_s = 300\ninsecure_registries = ["%s"]' % images.registry)
    d.restart()
    try:
        assert owned_domains(d.root_dir) == {}
        assert pool_info(d)["ready"] == 0
        assert os.listdir(os.path.join(d.root_dir, "sandboxes")) == []
    finally:
        write_config(d.config_path, d.root_dir, d.run_dir, d.socket,
                     POOL_CONFIG % images.registry)
        d.restart()
