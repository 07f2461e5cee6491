"""CNI fixtures: a private "host" netns, a CNI conf dir and a NetworkService on real plugins.

Every test runs its CNI work inside a network namespace it creates (`cni_host`): the test
bridge, ip_forward, iptables rules and test traffic never reach the real host namespace.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import uuid

import pytest

from vmcri.config import Config
from vmcri.network import netns

TEST_BRIDGE = "vmcri-tbr0"
TEST_SUBNET = "10.89.0.0/24"
TEST_GATEWAY = "10.89.0.1"
SYSTEM_CNI_BIN = "/usr/lib/cni"


def bridge_conflist(data_dir: str, name: str = "vmcri-test", version: str = "1.0.0",
                    portmap: bool = True) -> dict:
    plugins = [{
        "type": "bridge", "bridge": TEST_BRIDGE, "isGateway": True, "ipMasq": False,
        "hairpinMode": True,
        "ipam": {"type": "host-local", "dataDir": data_dir,
                 "ranges": [[{"subnet": TEST_SUBNET, "gateway": TEST_GATEWAY}]],
                 "routes": [{"dst": "0.0.0.0/0"}]},
    }]
    if portmap:
        plugins.append({"type": "portmap", "capabilities": {"portMappings": True}})
    return {"cniVersion": version, "name": name, "plugins": plugins}


class HostNetns:
    """A netns standing in for the host; the main thread runs inside it while active."""

    def __init__(self, base: str):
        self.dir = os.path.join(base, "hostns")
        self.path = netns.create(self.dir, "host-" + uuid.uuid4().hex[:8])
        subprocess.run(["nsenter", f"--net={self.path}", "ip", "link", "set", "lo", "up"],
                       check=True)
        self._ctx = netns.InNetns(self.path)
        # the real host netns, still reachable by path for nsenter while we are inside
        self._outer_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        self.outer_path = f"/proc/{os.getpid()}/fd/{self._outer_fd}"

    def __enter__(self):
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)

    def remove(self):
        os.close(self._outer_fd)
        netns.delete_path(self.path)
        netns.release_dir(self.dir)


def run_in(path: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["nsenter", f"--net={path}", *args], capture_output=True, text=True,
                          check=check, timeout=60)


@pytest.fixture
def cni_base():
    base = tempfile.mkdtemp(prefix="vmcri-cni-")
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def cni_host(cni_base):
    """Enter a fresh "host" netns for the test; the bridge dies with it."""
    host = HostNetns(cni_base)
    with host:
        try:
            yield host
        finally:
            subprocess.run(["ip", "link", "del", TEST_BRIDGE], capture_output=True)
    host.remove()


@pytest.fixture
def cni_conf(cni_base):
    """Write a bridge + host-local + portmap conflist; returns (conf_dir, ipam_data_dir)."""
    conf_dir = os.path.join(cni_base, "net.d")
    data_dir = os.path.join(cni_base, "ipam")
    os.makedirs(conf_dir)
    with open(os.path.join(conf_dir, "10-vmcri-test.conflist"), "w") as f:
        json.dump(bridge_conflist(data_dir), f)
    return conf_dir, data_dir


@pytest.fixture
def net_cfg(cni_base, cni_conf):
    return Config(root_dir=os.path.join(cni_base, "root"), run_dir=os.path.join(cni_base, "run"),
                  cni_conf_dir=cni_conf[0], cni_bin_dirs=[SYSTEM_CNI_BIN])


@pytest.fixture
def network_service(net_cfg, cni_host):
    from vmcri.network.service import NetworkService
    svc = NetworkService(net_cfg)
    yield svc
    svc.cleanup_orphans([])
    netns.release_dir(net_cfg.netns_dir)


class NodeNetwork:
    """A private "node" netns for a whole test daemon: it runs there (libvirt_netns points it
    back at libvirtd's netns for the VM taps) with a bridge + host-local + portmap config, so
    pod networking is real but the bridge, DNAT rules and traffic never reach the host's
    netns. A "client" netns on a veth (CLIENT_IP -> NODE_IP) plays the rest of the cluster."""

    NODE_IP, CLIENT_IP = "10.77.0.1", "10.77.0.2"

    def __init__(self, base: str, subnet: str, bridge: str, packaged: bool = False):
        """`packaged`: the default config scripts/run.sh installs (ipMasq on) instead of
        the plain test one."""
        self.base, self.subnet, self.bridge = base, subnet, bridge
        self.ns_dir = os.path.join(base, "ns")
        self.net_name = "vmcri-" + bridge
        tag = uuid.uuid4().hex[:6]
        self.node = netns.create(self.ns_dir, f"node-{tag}")
        self.client = netns.create(self.ns_dir, f"client-{tag}")
        for ns in (self.node, self.client):
            run_in(ns, "ip", "link", "set", "lo", "up")
        run_in(self.node, "ip", "link", "add", "n0", "type", "veth", "peer", "name", "c0",
               "netns", self.client)
        run_in(self.node, "ip", "addr", "add", f"{self.NODE_IP}/24", "dev", "n0")
        run_in(self.node, "ip", "link", "set", "n0", "up")
        run_in(self.node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        run_in(self.client, "ip", "addr", "add", f"{self.CLIENT_IP}/24", "dev", "c0")
        run_in(self.client, "ip", "link", "set", "c0", "up")
        run_in(self.client, "ip", "route", "add", subnet, "via", self.NODE_IP)
        self.conf_dir, self.ipam_dir = os.path.join(base, "net.d"), os.path.join(base, "ipam")
        os.makedirs(self.conf_dir)
        if packaged:
            conf = packaged_conflist(self.ipam_dir, bridge, subnet)
            self.net_name = conf["name"]
        else:
            conf = {"cniVersion": "1.0.0", "name": self.net_name, "plugins": [
                {"type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": False,
                 "hairpinMode": True,
                 "ipam": {"type": "host-local", "dataDir": self.ipam_dir,
                          "ranges": [[{"subnet": subnet}]], "routes": [{"dst": "0.0.0.0/0"}]}},
                {"type": "portmap", "capabilities": {"portMappings": True}}]}
        write_conflist(self.conf_dir, conf, "10-node.conflist")

    def daemon_config(self) -> str:
        return (f'cni_conf_dir = "{self.conf_dir}"\ncni_bin_dirs = ["{SYSTEM_CNI_BIN}"]\n'
                f'libvirt_netns = "/proc/{os.getpid()}/ns/net"\n')

    def move_daemon_in(self, d) -> None:
        """Restart `d` inside the node (pull images before: the registry is on the host's lo)."""
        d.stop()
        d.netns = self.node
        d.start()

    def bridge_ports(self) -> list[str]:
        got = run_in(self.node, "ip", "-j", "link", "show", "master", self.bridge, check=False)
        if got.returncode != 0:  # no bridge yet: the first CNI ADD makes it
            assert self.bridge not in self.links(), got.stderr
            return []
        return [link["ifname"] for link in json.loads(got.stdout or "[]")]

    def leases(self) -> list[str]:
        d = os.path.join(self.ipam_dir, self.net_name)
        return sorted(f for f in os.listdir(d) if f[0].isdigit()) if os.path.isdir(d) else []

    def veths(self) -> list[str]:
        """The pods' veth ends in the node netns (not the node's own n0 to the client)."""
        out = run_in(self.node, "ip", "-j", "-d", "link", "show", "type", "veth").stdout
        return sorted(link["ifname"] for link in json.loads(out or "[]") if link["ifname"] != "n0")

    def iptables(self) -> dict[str, list[str]]:
        """Chains and rules of the node's nat and filter tables."""
        return iptables_footprint(self.node)

    def links(self) -> list[str]:
        """Every link name in the node netns (taps that strayed there would show)."""
        out = run_in(self.node, "ip", "-j", "link").stdout
        return sorted(link["ifname"] for link in json.loads(out or "[]"))

    def remove(self) -> None:
        for ns in (self.client, self.node):  # the bridge, veths and DNAT rules go with them
            netns.delete_path(ns)
        netns.release_dir(self.ns_dir)


PACKAGED_CONFLIST = os.path.join(os.path.dirname(__file__), "..", "..", "packaging", "cni",
                                 "10-vmcri-bridge.conflist")


def packaged_conflist(data_dir: str, bridge: str, subnet: str) -> dict:
    """The default config scripts/run.sh installs (bridge with ipMasq, host-local, portmap),
    changed only where a test must: its own bridge, subnet and lease dir."""
    with open(PACKAGED_CONFLIST) as f:
        conf = json.load(f)
    plugin = conf["plugins"][0]
    plugin["bridge"] = bridge
    plugin["ipam"]["dataDir"] = data_dir
    plugin["ipam"]["ranges"] = [[{"subnet": subnet}]]
    return conf


def write_conflist(conf_dir: str, conf: dict, name: str = "10-vmcri-bridge.conflist") -> None:
    os.makedirs(conf_dir, exist_ok=True)
    with open(os.path.join(conf_dir, name), "w") as f:
        json.dump(conf, f)


def iptables_footprint(ns_path: str | None = None) -> dict[str, list[str]]:
    """`iptables -S` of the nat and filter tables (chains and rules), in `ns_path` or in the
    netns this thread is in (a test's private one)."""
    out = {}
    for table in ("nat", "filter"):
        argv = ["iptables", "-w", "-t", table, "-S"]
        got = (run_in(ns_path, *argv) if ns_path else
               subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60))
        out[table] = sorted(got.stdout.splitlines())
    return out
