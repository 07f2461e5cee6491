"""The VM tap <-> pod eth0 tc redirect, with a veth pair standing in for the VM's tap.

The "tap" end starts in the (private) host netns like libvirt's tap; its peer sits in a
"guest" netns we create, with the pod's MAC and IP, as the VM's virtio NIC would. Traffic
from the bridge side to the pod IP can then only reach the guest through the redirect.
"""
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.support.fx_cni import TEST_GATEWAY, run_in
from vmcri import errors
from vmcri.network import netns, tap

SID = "7c" * 32
GUEST_SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 80)); s.listen(8); s.settimeout(60)
print("ready", flush=True)
for _ in range(8):
    c, peer = s.accept()
    c.sendall(b"guest saw " + peer[0].encode()); c.close()
"""


def _qdisc_kinds(netns_path, dev):
    out = run_in(netns_path, "tc", "-j", "qdisc", "show", "dev", dev).stdout
    return {q.get("kind") for q in json.loads(out or "[]")}


def _ask(host, port):
    with socket.create_connection((host, port), timeout=10) as c:
        c.settimeout(10)
        return c.recv(100).decode()


@pytest.fixture
def fake_vm(network_service, cni_base):
    """A pod with a 'VM': returns (result, tap_name, guest_netns_path)."""
    res = network_service.setup(SID, "web", "default", "uid-7",
                                port_mappings=[{"container_port": 80, "host_port": 18081}])
    tap_name = tap.tap_name_for(SID)
    guest_dir = os.path.join(cni_base, "guestns")
    guest = netns.create(guest_dir, "guest")
    server = None
    try:
        ip = res.ips[0]
        subprocess.run(["ip", "link", "add", tap_name, "type", "veth", "peer", "name", "gnic0",
                        "netns", guest], check=True)
        for cmd in (["ip", "link", "set", "gnic0", "address", res.mac_of("eth0")],
                    ["ip", "addr", "add", ip["address"], "dev", "gnic0"],
                    ["ip", "link", "set", "gnic0", "up"], ["ip", "link", "set", "lo", "up"],
                    ["ip", "route", "add", "default", "via", ip["gateway"]]):
            run_in(guest, *cmd)
        server = subprocess.Popen(["nsenter", f"--net={guest}", sys.executable, "-c",
                                   GUEST_SERVER], stdout=subprocess.PIPE, text=True)
        assert server.stdout.readline().strip() == "ready"
        yield res, tap_name, guest
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "link", "del", tap_name], capture_output=True)
        netns.delete_path(guest)
        netns.release_dir(guest_dir)


def test_attach_tap_redirects_both_ways(network_service, fake_vm):
    res, tap_name, guest = fake_vm
    pod_ip = res.pod_ips[0]
    # control: before the wiring the pod netns' own stack owns the IP and refuses port 80
    with pytest.raises(ConnectionRefusedError):
        _ask(pod_ip, 80)
    started = time.monotonic()
    network_service.attach_tap(res.netns_path, tap_name)
    print(f"attach_tap took {time.monotonic() - started:.3f}s")

    assert tap.link(tap_name) is None, "tap must have left the host netns"
    assert tap.link(tap_name, res.netns_path)["operstate"] in ("UP", "UNKNOWN", "LOWERLAYERDOWN")
    assert [a for a in tap.addresses("eth0", res.netns_path) if a.get("family") == "inet"] == []
    assert "ingress" in _qdisc_kinds(res.netns_path, "eth0")
    assert "ingress" in _qdisc_kinds(res.netns_path, tap_name)

    # bridge side -> pod IP: only the redirect can carry this to the guest netns
    assert _ask(pod_ip, 80) == f"guest saw {TEST_GATEWAY}"
    # host port (portmap DNAT) -> pod IP -> guest
    assert _ask(TEST_GATEWAY, 18081).startswith("guest saw ")

    # guest -> host side: a listener on the bridge address
    lsock = socket.create_server((TEST_GATEWAY, 0))
    port = lsock.getsockname()[1]
    got = []

    def accept_one():
        lsock.settimeout(20)
        c, peer = lsock.accept()
        got.append(peer[0])
        c.close()
    t = threading.Thread(target=accept_one)
    t.start()
    run_in(guest, sys.executable, "-c",
           f"import socket; socket.create_connection(('{TEST_GATEWAY}', {port}), timeout=10)")
    t.join(30)
    lsock.close()
    assert got == [pod_ip]


def test_attach_tap_rerun_replaces_filters(network_service, fake_vm):
    res, tap_name, _ = fake_vm
    network_service.attach_tap(res.netns_path, tap_name)
    network_service.attach_tap(res.netns_path, tap_name)  # tap already inside: re-wire only
    filters = json.loads(run_in(res.netns_path, "tc", "-j", "filter", "show", "dev", "eth0",
                                "ingress").stdout)
    assert len([f for f in filters if f.get("options", {}).get("actions")]) == 1
    assert _ask(res.pod_ips[0], 80).startswith("guest saw ")

    network_service.detach_tap(res.netns_path, tap_name)
    assert "ingress" not in _qdisc_kinds(res.netns_path, "eth0")
    assert "ingress" not in _qdisc_kinds(res.netns_path, tap_name)
    network_service.detach_tap(res.netns_path, tap_name)  # idempotent


def test_attach_missing_tap_is_not_found(network_service):
    res = network_service.setup(SID, "web", "default")
    with pytest.raises(errors.NotFound, match="vmcrinotap"):
        network_service.attach_tap(res.netns_path, "vmcrinotap")
    with pytest.raises(errors.InvalidArgument, match="tap_name"):
        network_service.attach_tap(res.netns_path, "x" * 16)


def test_teardown_removes_the_moved_tap(network_service, fake_vm):
    res, tap_name, _ = fake_vm
    network_service.attach_tap(res.netns_path, tap_name)
    network_service.teardown(SID)
    assert tap.link(tap_name) is None and not os.path.exists(res.netns_path)


@pytest.mark.vm
def test_attach_tap_with_a_real_libvirt_tap(network_service, cni_host):
    """libvirt/qemu create and hold the tap; we move it and redirect into it.

    The domain boots nothing (it sits in the firmware), so no guest answers; the mirred
    counters show the frames for the pod IP went into qemu's tap."""
    libvirt = pytest.importorskip("libvirt")
    sid = "9d" * 32
    res = network_service.setup(sid, "web", "default")
    tap_name = tap.tap_name_for(sid)
    name = f"vmcri-test-net-{os.getpid()}"
    xml = f"""<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>
      <vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os>
      <devices><interface type='ethernet'><mac address='{res.mac_of()}'/>
        <target dev='{tap_name}' managed='yes'/><model type='virtio'/></interface></devices>
    </domain>"""
    conn = libvirt.open("qemu:///system")
    dom = conn.createXML(xml, 0)
    try:
        # libvirtd made the tap in the real host netns; bring it to our stand-in host netns
        run_in(cni_host.outer_path, "ip", "link", "set", tap_name, "netns", cni_host.path)
        started = time.monotonic()
        network_service.attach_tap(res.netns_path, tap_name)
        print(f"attach_tap (real tap) took {time.monotonic() - started:.3f}s")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _ in range(3):
                s.sendto(b"x", (res.pod_ips[0], 9))
                time.sleep(0.2)
        filters = json.loads(run_in(res.netns_path, "tc", "-s", "-j", "filter", "show",
                                    "dev", "eth0", "ingress").stdout)
        acts = [a for f in filters for a in f.get("options", {}).get("actions", [])]
        assert acts and acts[0]["to_dev"] == tap_name
        assert acts[0]["stats"]["packets"] > 0
    finally:
        dom.destroy()
        conn.close()
    deadline = time.monotonic() + 10
    while tap.link(tap_name, res.netns_path) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert tap.link(tap_name, res.netns_path) is None  # qemu's exit removed the tap
