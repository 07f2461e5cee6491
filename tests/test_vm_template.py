"""VM templates through the real daemon: pod VMs restored from a saved, booted guest."""
import json
import os
import signal
import threading
import time

import pytest
from cri_api.v1 import api_pb2 as pb

from tests.support.pods import start_container, wait_for
from tests.test_sandbox_vm import pod_config
from tests.test_warm_pool import owned_domains, remove_pod, run_pod, sandbox_info

BUILD_WAIT_S = 400  # a boot plus a save, under TCG on a busy 2-core host
TEMPLATE_CONFIG = ('cni_conf_dir = ""\nagent_timeout_s = 300\nvm_template = true\n'
                   'vm_template_build = "start"\ninsecure_registries = ["%s"]')


def template_info(d) -> dict:
    return json.loads(d.runtime.Status(pb.StatusRequest(verbose=True)).info["vmTemplate"])


def wait_template(d) -> dict:
    return wait_for(lambda: (lambda i: i if i["ready"] else None)(template_info(d)),
                    f"the VM template to be built\n{d.log()[-3000:]}", timeout=BUILD_WAIT_S, every=1)


def sh(d, cid, script: str) -> str:
    r = d.runtime.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["/bin/sh", "-c", script],
                                              timeout=60))
    assert r.exit_code == 0, r
    return r.stdout.decode()


def template_save(d) -> str:
    key = template_info(d)["key"]
    return os.path.join(d.root_dir, "templates", key, "state.save")


@pytest.fixture(scope="module")
def env(daemon_factory, test_images):
    d = daemon_factory(TEMPLATE_CONFIG % test_images.registry)
    d.image.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=test_images.single.ref)))
    wait_template(d)
    return d, test_images


PROBE = ("hostname; cat /proc/sys/kernel/random/boot_id; head -c 16 /dev/urandom | od -An -tx1;"
         " cat /proc/cpuinfo | grep -c ^processor; date +%s")


@pytest.mark.vm
@pytest.mark.registry
def test_clones_are_new_machines(env):
    d, images = env
    pods, seen = [], []
    try:
        for name in ("clone-a", "clone-b"):
            cfg = pod_config(name, hostname=name)
            sid, took = run_pod(d, cfg)
            print(f"clone RunPodSandbox {took:.2f}s")
            info = sandbox_info(d, sid)
            assert info["source"] == "clone", info
            for phase in ("restore", "identity", "configure", "total"):
                assert info["timings"][phase] >= 0, phase
            cid = start_container(d, sid, cfg, images.single.ref, "c")
            pods.append(sid)
            host_now = time.time()
            out = sh(d, cid, PROBE).split("\n")
            seen.append(out)
            assert out[0] == name
            assert abs(int(out[4]) - host_now) < 30  # the clock was set, not left at the save
        a, b = seen
        assert a[1] != b[1], "two clones share a boot_id"
        assert a[2] != b[2], "two clones drew the same random bytes"
        domains = {sandbox_info(d, s)["vm"]["domain"] for s in pods}
        assert len(domains) == 2
    finally:
        for sid in pods:
            remove_pod(d, sid)
    left = {m.sandbox_id for m in owned_domains(d.root_dir).values()}
    assert not left & set(pods)
    for sid in pods:
        assert not os.path.exists(os.path.join(d.root_dir, "sandboxes", sid))


@pytest.mark.vm
@pytest.mark.registry
def test_clone_is_grown_to_the_pods_shape(env):
    d, images = env
    cfg = pod_config("clone-big", hostname="clone-big")
    cfg.linux.resources.cpu_period, cfg.linux.resources.cpu_quota = 100000, 200000
    cfg.linux.resources.memory_limit_in_bytes = 300 * 1024 * 1024  # + overhead: 396 MiB
    sid, _ = run_pod(d, cfg)
    try:
        info = sandbox_info(d, sid)
        assert info["source"] == "clone"
        assert info["vm"]["vcpus"] == 2 and info["vm"]["memoryMiB"] >= 396
        cid = start_container(d, sid, cfg, images.single.ref, "c")
        assert sh(d, cid, "grep -c ^processor /proc/cpuinfo").strip() == "2"
        total_kib = int(sh(d, cid, "awk '/MemTotal/ {print $2}' /proc/meminfo"))
        assert total_kib > 300 * 1024  # the template boots with 128 MiB
    finally:
        remove_pod(d, sid)


@pytest.mark.vm
@pytest.mark.registry
def test_corrupt_template_falls_back_to_a_cold_boot_and_is_rebuilt(env):
    d, images = env
    save = template_save(d)
    before = template_info(d)
    with open(os.path.join(os.path.dirname(save), "template.json")) as f:
        old_id = json.load(f)["template_id"]
    with open(save, "r+b") as f:
        f.write(b"NotASaveImage!!!")  # the header's magic
    cfg = pod_config("after-corrupt", hostname="after-corrupt")
    sid, _ = run_pod(d, cfg)
    try:
        info = sandbox_info(d, sid)
        assert info["source"] == "cold", info
        assert template_info(d)["fallbacks"] == before["fallbacks"] + 1
        cid = start_container(d, sid, cfg, images.single.ref, "c")
        assert sh(d, cid, "hostname").strip() == "after-corrupt"
    finally:
        remove_pod(d, sid)
    after = wait_template(d)  # dropped, and built anew: a new template VM, never the corrupt one
    assert after["built"] == before["built"] + 1
    with open(os.path.join(os.path.dirname(template_save(d)), "template.json")) as f:
        assert json.load(f)["template_id"] != old_id


@pytest.mark.vm
@pytest.mark.registry
def test_kill_during_a_clone_leaves_nothing(env):
    d, _ = env
    wait_template(d)
    cfg = pod_config("clone-killed")
    errors = []

    def run():
        try:
            d.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg))
        except Exception as e:  # the daemon dies under the call
            errors.append(e)
    t = threading.Thread(target=run)
    t.start()
    # kill as soon as the clone's domain exists: between restore and READY
    wait_for(lambda: [m for m in owned_domains(d.root_dir).values()
                      if m.sandbox_id and m.role in ("template", "pod")], "the clone's domain",
             timeout=120, every=0.02)
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    t.join(60)
    d.start()
    listed = d.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items
    assert not [s for s in listed if s.metadata.name == "clone-killed"]
    assert not owned_domains(d.root_dir), owned_domains(d.root_dir)
    sandboxes = os.path.join(d.root_dir, "sandboxes")
    assert not os.listdir(sandboxes) if os.path.isdir(sandboxes) else True
    assert template_info(d)["ready"] or wait_template(d)  # reused or rebuilt after the restart


@pytest.mark.vm
def test_template_off_boots_cold(daemon_factory):
    d = daemon_factory('cni_conf_dir = ""\nagent_timeout_s = 300\nvm_template = false')
    assert template_info(d)["enabled"] is False
    sid, _ = run_pod(d, pod_config("no-template"))
    try:
        assert sandbox_info(d, sid)["source"] == "cold"
        assert not os.path.exists(os.path.join(d.root_dir, "templates"))
    finally:
        remove_pod(d, sid)


@pytest.mark.vm
def test_pool_refills_from_the_template(daemon_factory):
    from tests.test_warm_pool import pool_info, turn_pool_off, wait_pool
    d = daemon_factory('cni_conf_dir = ""\nagent_timeout_s = 300\npool_size = 1\n'
                       'vm_template = true\nvm_template_build = "start"')
    try:
        wait_template(d)
        wait_pool(d)
        sid, _ = run_pod(d, pod_config("from-pool"))  # claims; the refill comes from the template
        try:
            assert sandbox_info(d, sid)["source"] == "pool"
            wait_pool(d)
            assert pool_info(d)["cloned"] >= 1, pool_info(d)
        finally:
            remove_pod(d, sid)
    finally:
        turn_pool_off(d)
