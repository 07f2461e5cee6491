"""The packaged default CNI config (bridge with ipMasq, host-local, portmap) leaves nothing in
iptables after a pod's teardown, also once the VM tap wiring has moved the pod IP off eth0.

Real Debian plugins in a private "host" netns (tests/support/fx_cni.py): the nat and filter
tables counted here are that netns's, never the real host's."""
from __future__ import annotations

import os

import pytest

from tests.support.fx_cni import (SYSTEM_CNI_BIN, TEST_BRIDGE, TEST_SUBNET, iptables_footprint,
                                  packaged_conflist, run_in, write_conflist)
from vmcri.config import Config
from vmcri.network import netns
from vmcri.network.service import NetworkService

SID = "7c" * 32
SID2 = "8d" * 32


@pytest.fixture
def masq_service(cni_base, cni_host):
    conf_dir = os.path.join(cni_base, "masq.d")
    data_dir = os.path.join(cni_base, "ipam")
    write_conflist(conf_dir, packaged_conflist(data_dir, TEST_BRIDGE, TEST_SUBNET))
    svc = NetworkService(Config(root_dir=os.path.join(cni_base, "root"),
                                run_dir=os.path.join(cni_base, "run"),
                                cni_conf_dir=conf_dir, cni_bin_dirs=[SYSTEM_CNI_BIN]))
    yield svc, data_dir
    svc.cleanup_orphans([])
    netns.release_dir(svc.cfg.netns_dir)


def _masq_chains(fp) -> list[str]:
    return [c for c in fp["nat"] if c.startswith("-N CNI-") and "HOSTPORT" not in c]


def test_packaged_config_is_the_one_run_sh_installs():
    conf = packaged_conflist("/data", "br-x", "10.1.0.0/24")
    bridge = conf["plugins"][0]
    assert bridge["type"] == "bridge" and bridge["ipMasq"] is True
    assert [p["type"] for p in conf["plugins"]] == ["bridge", "portmap"]


@pytest.mark.parametrize("wired", [False, True], ids=["plain", "ip-moved-to-guest"])
def test_teardown_removes_the_masquerade_chain_and_rule(masq_service, wired):
    svc, data_dir = masq_service
    before = iptables_footprint()
    res = svc.setup(SID, "web", "default", "uid-1")
    during = iptables_footprint()
    assert len(_masq_chains(during)) == len(_masq_chains(before)) + 1, during["nat"]
    assert any("POSTROUTING" in r and res.pod_ips[0] in r for r in during["nat"])
    if wired:  # what tap.attach does: the guest owns the IP, eth0 keeps none
        run_in(res.netns_path, "ip", "addr", "flush", "dev", "eth0")
    svc.teardown(SID)
    after = iptables_footprint()
    assert after == before, {k: sorted(set(after[k]) ^ set(before[k])) for k in after}
    leases = os.path.join(data_dir, "vmcri")
    assert not [n for n in os.listdir(leases) if n[0].isdigit()]


def test_many_pods_leave_no_chain(masq_service):
    svc, _ = masq_service
    before = iptables_footprint()
    for sid in (SID, SID2):
        res = svc.setup(sid, "web", "default")
        run_in(res.netns_path, "ip", "addr", "flush", "dev", "eth0")
    assert len(_masq_chains(iptables_footprint())) == len(_masq_chains(before)) + 2
    for sid in (SID, SID2):
        svc.teardown(sid)
    assert iptables_footprint() == before
