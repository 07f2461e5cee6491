"""Pod networking end to end: real VMs, real bridge + host-local + portmap plugins.

The daemon runs inside a "node" netns this module makes (libvirt_netns points it back at
libvirtd's netns to pick up each VM's tap), so the test bridge, the portmap rules and all
test traffic stay in namespaces made here. A "client" netns hangs off the node on a veth
and plays the rest of the cluster.
"""
from __future__ import annotations

import ipaddress
import os
import subprocess
import sys

import pytest
from cri_api.v1 import api_pb2 as pb

from tests.support.fx_cni import NodeNetwork, run_in
from tests.test_sandbox_vm import pod_config
from vmcri.network import netns, tap

pytestmark = [pytest.mark.vm, pytest.mark.registry]

POD_NET = "10.89.3.0/24"
HOST_PORT = 18080


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    n = NodeNetwork(str(tmp_path_factory.mktemp("vmnet")), POD_NET, "vmcri-tbr3")
    yield n
    n.remove()


def server_config(name: str, image: str, text: str) -> pb.ContainerConfig:
    return pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name=name), image=pb.ImageSpec(image=image),
        command=["/bin/sh", "-c", f"while true; do echo {text} | nc -l -p 8080; done"],
        log_path=f"{name}.log")


@pytest.fixture(scope="module")
def env(daemon_factory, test_images, node):
    d = daemon_factory(node.daemon_config() + f'insecure_registries = ["{test_images.registry}"]')
    image = test_images.single.ref
    d.image.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image)))
    node.move_daemon_in(d)
    pods = {}
    for name, ports in (("net-a", []), ("net-b", [pb.PortMapping(protocol=pb.TCP, container_port=8080,
                                                                 host_port=HOST_PORT)])):
        cfg = pod_config(name, port_mappings=ports)
        cfg.log_directory = os.path.join(d.base, f"logs-{name}")
        sid = d.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg)).pod_sandbox_id
        cid = d.runtime.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=sid, sandbox_config=cfg,
            config=server_config("srv", image, f"hello-from-{name}"))).container_id
        d.runtime.StartContainer(pb.StartContainerRequest(container_id=cid))
        pods[name] = {"sid": sid, "cid": cid}
    yield d, pods, node
    for p in pods.values():
        d.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=p["sid"]))
        d.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=p["sid"]))


def pod_ip(d, sid) -> str:
    st = d.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid)).status
    assert st.state == pb.PodSandboxState.SANDBOX_READY
    return st.network.ip


def fetch_from(ns_path: str, host: str, port: int) -> str:
    """Connect from inside `ns_path` and read the server's line (retrying while it starts)."""
    probe = ("import socket,sys,time\n"
             "for _ in range(120):\n"
             "    try:\n"
             f"        s=socket.create_connection(('{host}',{port}),3); d=s.recv(64)\n"
             "        if d: print(d.decode().strip()); break\n"
             "    except OSError: pass\n"
             "    time.sleep(0.5)\n")
    got = subprocess.run(["nsenter", f"--net={ns_path}", sys.executable, "-c", probe],
                         capture_output=True, text=True, timeout=180)
    return got.stdout.strip()


def test_each_pod_gets_its_own_ip_from_the_pod_network(env):
    d, pods, _ = env
    ips = [pod_ip(d, p["sid"]) for p in pods.values()]
    assert all(ipaddress.ip_address(ip) in ipaddress.ip_network(POD_NET) for ip in ips)
    assert len(set(ips)) == 2
    # the guest holds the address, not the pod netns behind it
    out = d.runtime.ExecSync(pb.ExecSyncRequest(container_id=pods["net-a"]["cid"],
                                                cmd=["ip", "-o", "addr"], timeout=60)).stdout
    assert f"{ips[0]}/24".encode() in out


def test_a_client_in_another_netns_reaches_the_pod_by_ip(env):
    d, pods, node = env
    assert fetch_from(node.client, pod_ip(d, pods["net-a"]["sid"]), 8080) == "hello-from-net-a"


def test_two_pods_reach_each_other(env):
    d, pods, _ = env
    b_ip = pod_ip(d, pods["net-b"]["sid"])
    r = d.runtime.ExecSync(pb.ExecSyncRequest(
        container_id=pods["net-a"]["cid"], timeout=120,
        cmd=["/bin/sh", "-c", f"for i in $(seq 60); do nc -w 3 {b_ip} 8080 </dev/null && exit 0; "
                              "sleep 0.5; done; exit 1"]))
    assert (r.exit_code, r.stdout.strip()) == (0, b"hello-from-net-b"), r


def test_host_port_mapping_reaches_the_pod(env):
    _, _, node = env
    assert fetch_from(node.client, node.NODE_IP, HOST_PORT) == "hello-from-net-b"


def test_pods_keep_their_network_across_a_daemon_kill(env):
    import signal
    d, pods, node = env
    before = {n: pod_ip(d, p["sid"]) for n, p in pods.items()}
    d.stop(signal.SIGKILL)
    d.start()
    assert {n: pod_ip(d, p["sid"]) for n, p in pods.items()} == before
    assert fetch_from(node.client, before["net-a"], 8080) == "hello-from-net-a"
    assert fetch_from(node.client, node.NODE_IP, HOST_PORT) == "hello-from-net-b"


def test_stop_and_remove_leave_no_network_behind(env):
    """Last in the module: it removes the pods."""
    d, pods, node = env
    for p in pods.values():
        d.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=p["sid"]))
        d.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=p["sid"]))
    assert netns.list_names(os.path.join(d.run_dir, "netns")) == []
    assert node.bridge_ports() == []  # no pod veth left on the bridge
    for p in pods.values():
        name = tap.tap_name_for(p["sid"])
        assert tap.link(name) is None and tap.link(name, node.node) is None
    assert node.leases() == []
    nat = run_in(node.node, "iptables-save", "-t", "nat").stdout
    assert str(HOST_PORT) not in nat  # the portmap DNAT went with the pod
