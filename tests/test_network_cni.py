"""CNI through the real Debian plugins (bridge, host-local, portmap), in a private host netns."""
import ipaddress
import json
import os
import shutil
import subprocess

import pytest

from tests.support.fx_cni import (SYSTEM_CNI_BIN, TEST_BRIDGE, TEST_GATEWAY, TEST_SUBNET,
                                  bridge_conflist, run_in)
from vmcri import errors
from vmcri.config import Config
from vmcri.network import cni, netns
from vmcri.network.service import NetworkService, dns_arg, port_mappings_arg

SID = "5a" * 32
SID2 = "6b" * 32


def _leases(data_dir, net="vmcri-test"):
    d = os.path.join(data_dir, net)
    if not os.path.isdir(d):
        return []
    return [n for n in os.listdir(d) if n[0].isdigit()]


def _write(conf_dir, name, obj):
    with open(os.path.join(conf_dir, name), "w") as f:
        f.write(obj if isinstance(obj, str) else json.dumps(obj))


# -- config loading and ready() -------------------------------------------------------------

def test_ready_false_without_config(tmp_path):
    cfg = Config(root_dir=str(tmp_path / "root"), run_dir=str(tmp_path / "run"),
                 cni_conf_dir=str(tmp_path / "net.d"))
    ok, reason, msg = NetworkService(cfg).ready()
    assert (ok, reason) == (False, "NoCNIConfig")
    assert "no network config" in msg
    os.makedirs(cfg.cni_conf_dir)
    _write(cfg.cni_conf_dir, "README.txt", "not a config")
    assert NetworkService(cfg).ready()[0] is False


def test_ready_false_on_unparsable_config(tmp_path):
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    _write(str(conf_dir), "10-broken.conflist", "{not json")
    cfg = Config(root_dir=str(tmp_path / "root"), cni_conf_dir=str(conf_dir))
    ok, reason, msg = NetworkService(cfg).ready()
    assert (ok, reason) == (False, "NoCNIConfig")
    assert "10-broken.conflist" in msg and "invalid JSON" in msg


def test_first_file_by_name_wins_and_conf_is_wrapped(tmp_path):
    d = str(tmp_path)
    _write(d, "20-b.conflist", bridge_conflist("/x", name="second"))
    _write(d, "10-a.conf", {"cniVersion": "0.4.0", "name": "first", "type": "bridge"})
    net = cni.find_config(d)
    assert (net.name, net.cni_version) == ("first", "0.4.0")
    assert [p["type"] for p in net.plugins] == ["bridge"]
    ok, _, msg = NetworkService(Config(root_dir=d, cni_conf_dir=d)).ready()
    assert ok and "first" in msg


@pytest.mark.parametrize("raw, needle", [
    ({"cniVersion": "1.0.0", "name": "n", "plugins": []}, "plugins"),
    ({"cniVersion": "1.0.0", "plugins": [{"type": "bridge"}]}, "name"),
    ({"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "../bin/sh"}]}, "plugins[0].type"),
    ({"cniVersion": "one", "name": "n", "plugins": [{"type": "bridge"}]}, "cniVersion"),
])
def test_bad_conflist_names_the_field(tmp_path, raw, needle):
    _write(str(tmp_path), "10.conflist", raw)
    with pytest.raises(cni.CNIConfigError) as ei:
        cni.find_config(str(tmp_path))
    assert needle in str(ei.value)


def test_runtime_config_only_for_declared_capabilities():
    net = cni.NetworkConfigList(name="n", cni_version="1.0.0", plugins=[])
    rt = cni.RuntimeConf(container_id="c", netns="", capability_args={
        "portMappings": [{"hostPort": 1, "containerPort": 2, "protocol": "tcp"}],
        "dns": {"servers": ["10.0.0.10"]}})
    r = cni.CNIRuntime([])
    with_caps = r._plugin_conf(net, {"type": "portmap", "capabilities": {"portMappings": True}},
                               rt, {"cniVersion": "1.0.0"})
    assert with_caps["runtimeConfig"] == {"portMappings": rt.capability_args["portMappings"]}
    assert with_caps["prevResult"] == {"cniVersion": "1.0.0"}
    assert with_caps["name"] == "n" and with_caps["cniVersion"] == "1.0.0"
    plain = r._plugin_conf(net, {"type": "bridge"}, rt, None)
    assert "runtimeConfig" not in plain and "prevResult" not in plain


def test_port_mappings_from_cri_fields():
    from cri_api.v1 import api_pb2 as pb
    pms = [pb.PortMapping(protocol=pb.UDP, container_port=53, host_port=5353, host_ip="127.0.0.1"),
           pb.PortMapping(protocol=pb.TCP, container_port=80)]  # no host port: skipped
    assert port_mappings_arg(pms) == [
        {"hostPort": 5353, "containerPort": 53, "protocol": "udp", "hostIP": "127.0.0.1"}]
    with pytest.raises(errors.InvalidArgument, match=r"port_mappings\[0\].host_port"):
        port_mappings_arg([{"container_port": 80, "host_port": 70000}])
    with pytest.raises(errors.InvalidArgument, match=r"port_mappings\[0\].protocol"):
        port_mappings_arg([{"container_port": 80, "host_port": 80, "protocol": 9}])


def test_dns_capability_from_cri_dns_config():
    from cri_api.v1 import api_pb2 as pb
    d = pb.DNSConfig(servers=["10.96.0.10"], searches=["default.svc.cluster.local"],
                     options=["ndots:5"])
    assert dns_arg(d) == {"servers": ["10.96.0.10"], "searches": ["default.svc.cluster.local"],
                          "options": ["ndots:5"]}
    assert dns_arg(pb.DNSConfig()) == {} and dns_arg(None) == {}


# -- ADD / CHECK / DEL with the real plugins ----------------------------------------------------

def test_add_gives_an_ip_and_del_is_idempotent(network_service, cni_conf):
    _, data_dir = cni_conf
    res = network_service.setup(SID, "web", "default", "uid-1")
    addr = ipaddress.ip_interface(res.ips[0]["address"])
    assert addr.network == ipaddress.ip_network(TEST_SUBNET)
    assert res.ips[0]["gateway"] == TEST_GATEWAY and res.ips[0]["version"] == "4"
    assert res.pod_ips == [str(addr.ip)]
    assert res.routes == [{"dst": "0.0.0.0/0", "gw": TEST_GATEWAY}]
    assert res.mtu > 0
    assert res.netns_path == network_service.netns_path(SID)
    # the MAC reported is the one the pod's eth0 really has (the VM NIC copies it)
    link = json.loads(run_in(res.netns_path, "ip", "-j", "link", "show", "eth0").stdout)[0]
    assert res.mac_of("eth0") == link["address"]
    assert _leases(data_dir) == [str(addr.ip)]
    assert network_service.list_netns() == [SID]

    network_service.teardown(SID)
    assert network_service.list_netns() == []
    assert _leases(data_dir) == []  # the IP went back to the pool
    network_service.teardown(SID)  # again: nothing left, no error


def test_check_passes_after_add_and_fails_when_broken(cni_base, cni_host):
    conf_dir = os.path.join(cni_base, "check.d")
    os.makedirs(conf_dir)
    # no portmap: Debian's portmap 1.1.1 CHECK looks for ip6tables rules an IPv4-only pod
    # never gets (containernetworking/plugins#819)
    _write(conf_dir, "10.conflist", bridge_conflist(os.path.join(cni_base, "ipam"), portmap=False))
    svc = NetworkService(Config(root_dir=os.path.join(cni_base, "root"),
                                run_dir=os.path.join(cni_base, "run"),
                                cni_conf_dir=conf_dir, cni_bin_dirs=[SYSTEM_CNI_BIN]))
    try:
        res = svc.setup(SID, "web", "default")
        svc.check(SID)
        ip = res.ips[0]["address"]
        run_in(res.netns_path, "ip", "addr", "del", ip, "dev", "eth0")
        with pytest.raises(errors.VmcriError) as ei:
            svc.check(SID)
        assert "bridge" in str(ei.value) or "host-local" in str(ei.value)
    finally:
        svc.teardown(SID)
        netns.release_dir(svc.cfg.netns_dir)


def test_del_after_netns_removed_by_hand(network_service, cni_conf):
    _, data_dir = cni_conf
    res = network_service.setup(SID, "web", "default")
    netns.delete_path(res.netns_path)  # someone removed it underneath us
    assert _leases(data_dir)
    network_service.teardown(SID)  # CNI DEL with an empty CNI_NETNS
    assert _leases(data_dir) == []
    assert not os.path.exists(res.netns_path)
    network_service.teardown(SID)


def test_two_pods_get_distinct_ips(network_service):
    a = network_service.setup(SID, "a", "default")
    b = network_service.setup(SID2, "b", "default")
    assert a.pod_ips != b.pod_ips
    assert a.mac_of() != b.mac_of()
    assert network_service.cleanup_orphans([SID]) == [SID2]
    assert network_service.list_netns() == [SID]


def test_portmap_adds_and_removes_host_port_rules(network_service):
    if not shutil.which("iptables-save"):
        pytest.fail("iptables is missing: portmap needs it (Debian package iptables)")
    res = network_service.setup(SID, "web", "default", "uid-1",
                                port_mappings=[{"container_port": 80, "host_port": 18080,
                                                "protocol": 0}])
    pod_ip = res.pod_ips[0]
    nat = subprocess.run(["iptables-save", "-t", "nat"], capture_output=True, text=True,
                         check=True).stdout
    assert f"--to-destination {pod_ip}:80" in nat and "--dport 18080" in nat
    network_service.teardown(SID)
    nat = subprocess.run(["iptables-save", "-t", "nat"], capture_output=True, text=True,
                         check=True).stdout
    assert f"{pod_ip}:80" not in nat


# -- failures leave nothing behind -----------------------------------------------------------

def _broken_service(cni_base, plugins, bin_dirs=(SYSTEM_CNI_BIN,), timeout=60.0):
    conf_dir = os.path.join(cni_base, "broken.d")
    os.makedirs(conf_dir, exist_ok=True)
    _write(conf_dir, "10.conflist", {"cniVersion": "1.0.0", "name": "broken", "plugins": plugins})
    return NetworkService(Config(root_dir=os.path.join(cni_base, "root"),
                                 run_dir=os.path.join(cni_base, "run"), cni_conf_dir=conf_dir,
                                 cni_bin_dirs=list(bin_dirs)), plugin_timeout_s=timeout)


def _assert_nothing_left(svc):
    assert svc.list_netns() == []
    assert svc.cache.entries() == []
    netns.release_dir(svc.cfg.netns_dir)


def test_missing_plugin_is_named_and_nothing_left(cni_base, cni_host):
    svc = _broken_service(cni_base, [{"type": "vmcri-no-such-plugin"}])
    assert svc.ready()[0] is True  # the config itself is fine
    with pytest.raises(errors.VmcriError, match="vmcri-no-such-plugin"):
        svc.setup(SID, "web", "default")
    _assert_nothing_left(svc)


def test_plugin_error_json_is_in_the_error_and_nothing_left(cni_base, cni_host):
    plugins = bridge_conflist(os.path.join(cni_base, "ipam"), portmap=False)["plugins"]
    plugins[0]["ipam"]["ranges"] = [[{"subnet": "10.89.0.0/99"}]]
    svc = _broken_service(cni_base, plugins)
    with pytest.raises(cni.CNIPluginError) as ei:
        svc.setup(SID, "web", "default")
    msg = str(ei.value)
    assert "'bridge'" in msg and "10.89.0.0/99" in msg
    _assert_nothing_left(svc)
    # the bridge plugin may have made the bridge before IPAM failed; that is host state the
    # next ADD reuses, and the test netns removal clears it


def test_plugin_timeout_and_stderr(cni_base, cni_host):
    bin_dir = os.path.join(cni_base, "bin")
    os.makedirs(bin_dir)
    hang = os.path.join(bin_dir, "vmcri-test-hang")
    with open(hang, "w") as f:  # stands in for a wedged plugin: no real plugin hangs on cue
        f.write("#!/bin/sh\n[ \"$CNI_COMMAND\" = DEL ] && exit 0\necho wedged >&2\nsleep 30 & sleep 30; wait\n")
    os.chmod(hang, 0o755)
    svc = _broken_service(cni_base, [{"type": "vmcri-test-hang"}], bin_dirs=[bin_dir], timeout=1)
    with pytest.raises(errors.DeadlineExceeded, match="vmcri-test-hang.*timed out"):
        svc.setup(SID, "web", "default")
    _assert_nothing_left(svc)


def test_bad_ids_refused_before_anything_is_made(network_service):
    with pytest.raises(errors.InvalidArgument, match="sandbox_id"):
        network_service.setup("../etc", "web", "default")
    with pytest.raises(errors.InvalidArgument, match="K8S_POD_NAME"):
        network_service.setup(SID, "we;b", "default")
    assert network_service.list_netns() == []


def test_teardown_refuses_a_foreign_path(network_service):
    res = network_service.setup(SID, "web", "default")
    with pytest.raises(errors.InvalidArgument, match="netns_path"):
        network_service.teardown(SID, "/proc/1/ns/net")
    assert netns.exists(res.netns_path)  # untouched
    network_service.teardown(SID, res.netns_path)
    assert not os.path.exists(res.netns_path)


def test_no_config_setup_fails_cleanly(cni_base, cni_host):
    svc = NetworkService(Config(root_dir=os.path.join(cni_base, "root"),
                                run_dir=os.path.join(cni_base, "run"),
                                cni_conf_dir=os.path.join(cni_base, "empty.d")))
    with pytest.raises(errors.FailedPrecondition, match="no network config"):
        svc.setup(SID, "web", "default")
    assert svc.list_netns() == []


def test_test_bridge_stays_in_the_private_host_netns(network_service, cni_host):
    network_service.setup(SID, "web", "default")
    names = lambda path: {l["ifname"] for l in json.loads(run_in(path, "ip", "-j", "link").stdout)}
    assert TEST_BRIDGE in names(cni_host.path)
    real_host = names(cni_host.outer_path)
    assert "lo" in real_host and TEST_BRIDGE not in real_host


@pytest.mark.parametrize("version, as_conf", [("0.3.1", True), ("0.4.0", False)])
def test_add_del_with_older_spec_versions(cni_base, cni_host, version, as_conf):
    conf_dir = os.path.join(cni_base, f"v{version}.d")
    os.makedirs(conf_dir)
    data_dir = os.path.join(cni_base, "ipam-old")
    conflist = bridge_conflist(data_dir, version=version, portmap=False)
    if as_conf:  # a single-plugin .conf, wrapped into a list
        _write(conf_dir, "10.conf", dict(conflist["plugins"][0], name=conflist["name"],
                                         cniVersion=version))
    else:
        _write(conf_dir, "10.conflist", conflist)
    svc = NetworkService(Config(root_dir=os.path.join(cni_base, "root"),
                                run_dir=os.path.join(cni_base, "run"),
                                cni_conf_dir=conf_dir, cni_bin_dirs=[SYSTEM_CNI_BIN]))
    try:
        res = svc.setup(SID, "web", "default")
        assert res.raw_result["cniVersion"] == version
        assert ipaddress.ip_interface(res.ips[0]["address"]).network == \
            ipaddress.ip_network(TEST_SUBNET)
        assert res.ips[0]["version"] == "4" and res.interfaces[0]["name"] == "eth0"
        if version == "0.4.0":
            svc.check(SID)
        else:
            with pytest.raises(errors.FailedPrecondition, match="does not support CHECK"):
                svc.check(SID)
        svc.teardown(SID)
        assert _leases(data_dir) == []
    finally:
        svc.teardown(SID)
        netns.release_dir(svc.cfg.netns_dir)


def test_parse_legacy_and_current_results():
    from vmcri.network.result import parse_result
    legacy = parse_result({"cniVersion": "0.2.0",
                           "ip4": {"ip": "10.1.0.5/16", "gateway": "10.1.0.1",
                                   "routes": [{"dst": "0.0.0.0/0"}]},
                           "dns": {"nameservers": ["10.1.0.10"], "domain": "cluster.local"}},
                          "/ns", "0.2.0")
    assert legacy.ips == [{"address": "10.1.0.5/16", "gateway": "10.1.0.1", "version": "4"}]
    assert legacy.routes == [{"dst": "0.0.0.0/0", "gw": "10.1.0.1"}]
    assert legacy.dns["nameservers"] == ["10.1.0.10"] and legacy.dns["search"] == ["cluster.local"]
    dual = parse_result({"cniVersion": "1.0.0",
                         "interfaces": [{"name": "br", "mac": "aa"},
                                        {"name": "eth0", "mac": "bb", "sandbox": "/ns"}],
                         "ips": [{"address": "fd00::5/64", "gateway": "fd00::1", "interface": 1},
                                 {"address": "10.2.0.5/24", "interface": 1}]}, "/ns", "1.0.0")
    assert dual.interfaces == [{"name": "eth0", "mac": "bb"}]
    assert [ip["version"] for ip in dual.ips] == ["6", "4"]
    assert dual.pod_ips == ["10.2.0.5", "fd00::5"]  # IPv4 first for PodSandboxStatus
    with pytest.raises(ValueError):
        parse_result({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.300/24"}]}, "/ns", "1.0.0")
