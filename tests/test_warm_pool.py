"""Warm pool through the real daemon: pre-booted pod VMs claimed by RunPodSandbox."""
import json
import os
import time

import libvirt
import pytest
from cri_api.v1 import api_pb2 as pb

from tests.support.fx_daemon import write_config
from tests.support.pods import start_container
from tests.test_sandbox_vm import pod_config
from vmcri.sandbox.domain import parse_metadata

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


# templates off: these tests are about the pool's own boots (test_vm_template covers both)
POOL_CONFIG = ('cni_conf_dir = ""\nagent_timeout_s = 300\npool_size = 1\nvm_template = false\n'
               'insecure_registries = ["%s"]')


def turn_pool_off(d) -> None:
    """Pool VMs outlive a daemon stop on purpose (the next start adopts them); a test that
    throws its root_dir away restarts with pool_size = 0 first, so reconcile destroys them."""
    write_config(d.config_path, d.root_dir, d.run_dir, d.socket,
                 d.extra_config.replace("pool_size = 1", "pool_size = 0"))
    d.restart()
    leaked = owned_domains(d.root_dir)
    assert not {n for n, m in leaked.items() if m.role == "pool"}, leaked


@pytest.fixture(scope="module")
def env(daemon_factory, test_images):
    d = daemon_factory(POOL_CONFIG % test_images.registry)
    d.image.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=test_images.single.ref)))
    yield d, test_images
    turn_pool_off(d)


@pytest.mark.vm
@pytest.mark.registry
def test_claim_configures_the_pod_refills_and_remove_leaves_nothing(env):
    d, images = env
    wait_pool(d)
    [warm] = pool_domains(d)
    cfg = pod_config("warm-web", hostname="warm-web")
    sid, took = run_pod(d, cfg)
    print(f"claim-path RunPodSandbox {took:.2f}s")
    try:
        share = check_claimed_pod(d, images, cfg, sid, warm)
    finally:
        remove_pod(d, sid)
    left = owned_domains(d.root_dir)
    assert warm not in left and set(left) == pool_domains(d)
    assert not os.path.exists(share)


def check_claimed_pod(d, images, cfg, sid, warm) -> str:
    info = sandbox_info(d, sid)
    assert info["source"] == "pool"
    assert info["vm"]["domain"] == warm and info["vm"]["running"] is True
    for phase in ("claim", "configure", "total"):
        assert info["timings"][phase] >= 0
    # the domain is the pod's now, in libvirt's metadata too
    meta = owned_domains(d.root_dir)[warm]
    assert (meta.role, meta.pod_name, meta.sandbox_id) == ("pod", "warm-web", sid)

    cid = start_container(d, sid, cfg, images.single.ref, "c")
    out = d.runtime.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["hostname"], timeout=60))
    assert (out.exit_code, out.stdout.strip()) == (0, b"warm-web")
    out = d.runtime.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["cat", "/etc/resolv.conf"],
                                                timeout=60))
    assert b"10.96.0.10" in out.stdout

    wait_pool(d)  # refilled with a fresh VM, never the claimed one
    fresh = pool_domains(d)
    assert len(fresh) == 1 and warm not in fresh
    return info["shareDir"]


@pytest.mark.vm
@pytest.mark.registry
def test_two_claimed_pods_cannot_see_each_others_files_or_processes(env):
    d, images = env
    pods = []
    try:
        for name in ("iso-a", "iso-b"):
            wait_pool(d)
            cfg = pod_config(name, hostname=name)
            sid, _ = run_pod(d, cfg)
            assert sandbox_info(d, sid)["source"] == "pool"
            cid = start_container(d, sid, cfg, images.single.ref, "c", [
                "/bin/sh", "-c", f"echo secret-of-{name} > /dev/shm/{name}; exec sleep 4{len(pods)}4242"])
            pods.append((name, sid, cid))

        def sh(cid, script):
            r = d.runtime.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["/bin/sh", "-c", script],
                                                      timeout=60))
            assert r.exit_code == 0, r
            return r.stdout.decode()
        (a, sid_a, cid_a), (b, sid_b, cid_b) = pods
        # each sees its own files and process, never the other pod's
        for me, cid, other, n in ((a, cid_a, b, 0), (b, cid_b, a, 1)):
            seen = sh(cid, f"for i in $(seq 100); do [ -f /dev/shm/{me} ] && break; sleep 0.2; done; "
                           f"ls /dev/shm; ps -o args; cat /dev/shm/{me}")
            assert f"secret-of-{me}" in seen and me in seen
            assert other not in seen and f"4{1 - n}4242" not in seen, seen
        # two guests, two kernels: not two containers side by side on one
        boot_ids = {sh(c, "cat /proc/sys/kernel/random/boot_id").strip() for _, _, c in pods}
        assert len(boot_ids) == 2
        infos = [sandbox_info(d, s) for _, s, _ in pods]
        assert infos[0]["vm"]["domain"] != infos[1]["vm"]["domain"]
        assert infos[0]["shareDir"] != infos[1]["shareDir"]
        assert not [f for f in os.listdir(infos[1]["shareDir"]) if cid_a in f]
    finally:
        for _, sid, _ in pods:
            remove_pod(d, sid)


@pytest.mark.vm
@pytest.mark.registry
def test_smaller_shape_boots_cold(env):
    d, _ = env
    wait_pool(d)
    before = pool_info(d)["claimed"]
    cfg = pod_config("cold-small")
    cfg.linux.resources.memory_limit_in_bytes = 16 * 1024 * 1024  # below the pool's shape
    sid, took = run_pod(d, cfg)
    print(f"cold RunPodSandbox {took:.2f}s")
    try:
        info = sandbox_info(d, sid)
        assert info["source"] == "cold"
        assert info["vm"]["memoryMiB"] < pool_info(d)["shape"]["memoryMiB"]
        assert pool_info(d)["claimed"] == before
    finally:
        remove_pod(d, sid)


@pytest.mark.vm
@pytest.mark.registry
def test_bigger_pod_grows_a_pool_vm(env):
    """More vCPUs and memory than the pool's shape: the claim hot-plugs them (resize path)."""
    d, images = env
    wait_pool(d)
    [warm] = pool_domains(d)
    grown = pool_info(d)["grown"]
    cfg = pod_config("warm-big", hostname="warm-big")
    cfg.linux.resources.cpu_period, cfg.linux.resources.cpu_quota = 100000, 200000
    cfg.linux.resources.memory_limit_in_bytes = 300 * 1024 * 1024  # 396 MiB -> a 256 MiB DIMM
    sid, took = run_pod(d, cfg)
    print(f"grown-claim RunPodSandbox {took:.2f}s")
    try:
        info = sandbox_info(d, sid)
        assert info["source"] == "pool" and info["vm"]["domain"] == warm
        assert (info["vm"]["vcpus"], info["vm"]["memoryMiB"]) == (2, 512)
        assert info["timings"]["grow"] >= 0
        assert pool_info(d)["grown"] == grown + 1
        cid = start_container(d, sid, cfg, images.single.ref, "c")

        def guest(*cmd):
            out = d.runtime.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=list(cmd), timeout=60))
            assert out.exit_code == 0, out.stderr
            return out.stdout.decode()
        assert guest("cat", "/sys/devices/system/cpu/online").strip() == "0-1"
        mem_kib = int(guest("grep", "MemTotal", "/proc/meminfo").split()[1])
        assert mem_kib > 400 * 1024, mem_kib  # the boot shape's 256 MiB shows ~205 MiB
    finally:
        remove_pod(d, sid)


@pytest.mark.vm
@pytest.mark.registry
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


@pytest.mark.vm
@pytest.mark.registry
def test_measure_claim_vs_cold_vs_raw_floor(env):
    """Measured, not asserted: claim-path RunPodSandbox, a cold one, and the raw-qemu floor
    (bench/boot_floor.py) in one run, printed and written to $VMCRI_POOL_BENCH_OUT if set."""
    from bench import boot_floor
    from vmcri import guestimage
    from vmcri.config import Config
    d, _ = env
    wait_pool(d)
    sid, claim_s = run_pod(d, pod_config("bench-warm"))
    claim_timings = sandbox_info(d, sid)["timings"]
    assert sandbox_info(d, sid)["source"] == "pool"
    remove_pod(d, sid)
    wait_pool(d)  # idle again: nothing else boots during the next two
    img = guestimage.locate(Config(guest_image_dir=os.environ.get(
        "VMCRI_TEST_GUEST_DIR", "/var/lib/vmcri/guest/current")))
    floor_s = boot_floor.one_run("raw", img, 256, 1)["ping_s"]
    cfg = pod_config("bench-cold")
    # a smaller shape boots cold (a bigger one would be grown from the pool)
    cfg.linux.resources.memory_limit_in_bytes = 16 * 1024 * 1024
    sid, cold_s = run_pod(d, cfg)
    cold_timings = sandbox_info(d, sid)["timings"]
    assert sandbox_info(d, sid)["source"] == "cold"
    remove_pod(d, sid)
    result = {"claim_rpc_s": round(claim_s, 3), "cold_rpc_s": round(cold_s, 3),
              "raw_floor_s": round(floor_s, 3), "claim_over_floor": round(claim_s / floor_s, 3),
              "cold_over_floor": round(cold_s / floor_s, 3),
              "claim_timings": claim_timings, "cold_timings": cold_timings}
    print("warm-pool bench:", json.dumps(result))
    if os.environ.get("VMCRI_POOL_BENCH_OUT"):
        with open(os.environ["VMCRI_POOL_BENCH_OUT"], "w") as f:
            json.dump(result, f, indent=1)
    assert claim_s > 0 and floor_s > 0


# -- pod network on a claimed VM: CNI ADD, NIC hot-plug, tap wiring, configure_nic --------
PEER_IP, POD_IP = "10.89.7.1", "10.89.7.2"


@pytest.fixture(scope="module")
def net_env(daemon_factory, test_images, tmp_path_factory):
    """host-device CNI hands the pod a veth whose peer sits in a netns we made, so test
    traffic runs between two private namespaces and never through the host's."""
    import subprocess
    import uuid

    from tests.support.fx_cni import SYSTEM_CNI_BIN, run_in
    from vmcri.network import netns
    base = str(tmp_path_factory.mktemp("poolnet"))
    peer = netns.create(os.path.join(base, "ns"), "peer-" + uuid.uuid4().hex[:8])
    dev = "vmcripd" + uuid.uuid4().hex[:6]
    subprocess.run(["ip", "link", "add", dev, "type", "veth", "peer", "name", "peer0",
                    "netns", peer], check=True)
    run_in(peer, "ip", "addr", "add", f"{PEER_IP}/24", "dev", "peer0")
    run_in(peer, "ip", "link", "set", "peer0", "up")
    conf = os.path.join(base, "net.d")
    os.makedirs(conf)
    with open(os.path.join(conf, "10-pool.conflist"), "w") as f:
        json.dump({"cniVersion": "1.0.0", "name": "vmcri-pool-test", "plugins": [
            {"type": "host-device", "device": dev,
             "ipam": {"type": "static", "addresses": [{"address": f"{POD_IP}/24"}]}}]}, f)
    d = daemon_factory(f'cni_conf_dir = "{conf}"\ncni_bin_dirs = ["{SYSTEM_CNI_BIN}"]\n'
                       f'agent_timeout_s = 300\npool_size = 1\nvm_template = false\n'
                       f'insecure_registries = ["{test_images.registry}"]')
    d.image.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=test_images.single.ref)))
    yield d, test_images, peer
    turn_pool_off(d)
    d.stop()
    subprocess.run(["ip", "link", "del", dev], capture_output=True)
    netns.delete_path(peer)
    netns.release_dir(os.path.join(base, "ns"))


@pytest.mark.vm
@pytest.mark.registry
def test_claimed_vm_gets_the_pod_nic_hot_plugged(net_env):
    import subprocess
    import sys
    d, images, peer = net_env
    wait_pool(d)
    cfg = pod_config("warm-net")
    sid, took = run_pod(d, cfg)
    print(f"claim-path RunPodSandbox with CNI {took:.2f}s")
    try:
        info = sandbox_info(d, sid)
        assert info["source"] == "pool"
        for phase in ("claim", "network", "nic-hotplug", "configure", "total"):
            assert info["timings"][phase] >= 0, phase
        mac = info["network"]["interfaces"][0]["mac"]
        cid = start_container(d, sid, cfg, images.single.ref, "srv",
                              ["/bin/sh", "-c", "while true; do echo pool-hello | nc -l -p 8080; done"])
        out = d.runtime.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["ip", "-o", "addr"],
                                                    timeout=60))
        assert f"{POD_IP}/24".encode() in out.stdout, out.stdout
        out = d.runtime.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["ip", "-o", "link"],
                                                    timeout=60))
        assert mac.encode() in out.stdout.lower()  # the hot-plugged NIC carries the veth's MAC
        # real traffic: the peer netns reaches the pod IP, which only the guest holds
        probe = ("import socket,time\n"
                 "for _ in range(60):\n"
                 "    try:\n"
                 f"        s=socket.create_connection(('{POD_IP}',8080),3); print(s.recv(64).decode()); break\n"
                 "    except OSError: time.sleep(0.5)\n")
        got = subprocess.run(["nsenter", f"--net={peer}", sys.executable, "-c", probe],
                             capture_output=True, text=True, timeout=120)
        assert "pool-hello" in got.stdout, got
    finally:
        remove_pod(d, sid)
    assert sid not in {m.sandbox_id for m in owned_domains(d.root_dir).values()}



# -- no VM: config keys and the rendered fragments ------------------------------------------
@pytest.mark.parametrize("data, key", [
    ({"pool_size": -1}, "pool_size"), ({"pool_size": 65}, "pool_size"),
    ({"pool_size": "2"}, "pool_size"), ({"pool_max_concurrent_boots": 0}, "pool_max_concurrent_boots"),
])
def test_bad_pool_config_names_the_key(data, key):
    from vmcri.config import ConfigError, from_dict
    with pytest.raises(ConfigError, match=f"^{key}:"):
        from_dict(data)


def test_pool_is_off_by_default():
    from vmcri.config import Config, from_dict
    assert Config().pool_size == 0 and from_dict({"pool_size": 3}).pool_size == 3


def test_fragments_escape_and_round_trip_the_metadata():
    from vmcri.sandbox import domain
    from vmcri.sandbox.domain import METADATA_NS, NicSpec, SandboxMeta
    meta = SandboxMeta(sandbox_id="a" * 64, pod_name="x<y", pod_namespace="ns", pod_uid="u",
                       attempt=2, role="pod", owner="/var/lib/vmcri")
    xml = f"<domain><metadata>{domain.render_metadata(meta)}</metadata></domain>"
    assert parse_metadata(xml) == meta and METADATA_NS in xml
    nic = domain.render_nic(NicSpec(mac="02:42:0a:00:00:02", tap="vmcriaaaaaaaa", mtu=1450))
    assert "02:42:0a:00:00:02" in nic and "vmcriaaaaaaaa" in nic and "1450" in nic
