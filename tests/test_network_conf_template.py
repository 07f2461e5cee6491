"""UpdateRuntimeConfig's pod CIDR rendered into a CNI config (containerd's conf_template)."""
from __future__ import annotations

import ipaddress
import json
import os

import grpc
import pytest
from cri_api.v1 import api_pb2 as pb

from tests.support.fx_cni import SYSTEM_CNI_BIN, TEST_BRIDGE
from vmcri import errors
from vmcri.config import Config
from vmcri.network import conf_template, netns

SHIPPED = os.path.join(os.path.dirname(__file__), "..", "packaging", "cni", "vmcri-net.conflist.j2")


def test_dual_stack_cidrs_are_parsed_and_bad_ones_name_the_field():
    assert conf_template.parse_pod_cidrs("10.1.2.0/24, fd00:1::/64") == ["10.1.2.0/24", "fd00:1::/64"]
    assert conf_template.parse_pod_cidrs("10.1.2.7/24") == ["10.1.2.0/24"]
    for bad in ("banana", "10.1.2.0/24,", "300.1.1.0/24", "x" * 2000):
        with pytest.raises(errors.InvalidArgument, match="runtime_config.network_config.pod_cidr"):
            conf_template.parse_pod_cidrs(bad)


def test_shipped_template_renders_every_range_and_a_route_per_family():
    conf = json.loads(conf_template.render(SHIPPED, ["10.1.2.0/24", "fd00:1::/64"]))
    ipam = conf["plugins"][0]["ipam"]
    assert ipam["ranges"] == [[{"subnet": "10.1.2.0/24"}], [{"subnet": "fd00:1::/64"}]]
    assert ipam["routes"] == [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]


@pytest.mark.parametrize("body,needle", [
    ('{"subnet": "{{ pod_cidrr }}"}', "pod_cidrr"),        # misspelt variable: strict
    ('{"subnet": {{ pod_cidr }}}', "does not render to JSON"),
    ('{"subnet": "{{ pod_cidr "}', "cni_conf_template"),     # template syntax error
])
def test_broken_templates_are_refused_and_nothing_is_written(tmp_path, body, needle):
    tpl = tmp_path / "t.j2"
    tpl.write_text(body)
    cfg = Config(cni_conf_dir=str(tmp_path / "net.d"), cni_conf_template=str(tpl))
    with pytest.raises(errors.FailedPrecondition, match=needle):
        conf_template.apply(cfg, "10.1.0.0/24")
    assert not os.path.exists(tmp_path / "net.d" / conf_template.OUTPUT_NAME)


def test_without_a_template_the_cidr_is_still_validated(tmp_path):
    cfg = Config(cni_conf_dir=str(tmp_path))
    assert conf_template.apply(cfg, "10.1.0.0/24") is None
    assert conf_template.apply(cfg, "") is None
    with pytest.raises(errors.InvalidArgument):
        conf_template.apply(cfg, "nope")
    assert os.listdir(tmp_path) == []


def test_rendered_config_gives_pods_addresses_from_the_pod_cidr(cni_base, cni_host):
    """Real bridge + host-local plugins, in the test's own host netns."""
    from vmcri.network.service import NetworkService
    tpl = os.path.join(cni_base, "net.j2")
    with open(tpl, "w") as f:
        f.write(open(SHIPPED).read().replace('"vmcri0"', f'"{TEST_BRIDGE}"')
                .replace('"ipMasq": true', '"ipMasq": false')
                .replace('"type": "host-local",', f'"type": "host-local", "dataDir": "{cni_base}/ipam",'))
    cfg = Config(root_dir=os.path.join(cni_base, "root"), run_dir=os.path.join(cni_base, "run"),
                 cni_conf_dir=os.path.join(cni_base, "net.d"), cni_bin_dirs=[SYSTEM_CNI_BIN],
                 cni_conf_template=tpl)
    svc = NetworkService(cfg)
    assert svc.ready()[0] is False
    conf_template.apply(cfg, "10.93.4.0/24")
    assert svc.ready()[0] is True
    sid = "7c" * 32
    try:
        res = svc.setup(sid, "web", "default", "uid-1")
        assert ipaddress.ip_address(res.pod_ips[0]) in ipaddress.ip_network("10.93.4.0/24")
    finally:
        svc.teardown(sid)
        svc.cleanup_orphans([])
        netns.release_dir(cfg.netns_dir)  # the dir's shared self-bind, as the other CNI tests do


def test_update_runtime_config_through_the_daemon(daemon_factory, tmp_path):
    conf_dir = tmp_path / "net.d"
    d = daemon_factory(f'cni_conf_dir = "{conf_dir}"\ncni_conf_template = "{os.path.abspath(SHIPPED)}"')

    def network_ready():
        st = d.runtime.Status(pb.StatusRequest(verbose=True))
        return next(c for c in st.status.conditions if c.type == "NetworkReady").status, st.info
    assert network_ready()[0] is False

    def update(cidr):
        d.runtime.UpdateRuntimeConfig(pb.UpdateRuntimeConfigRequest(
            runtime_config=pb.RuntimeConfig(network_config=pb.NetworkConfig(pod_cidr=cidr))))

    with pytest.raises(grpc.RpcError) as e:
        update("10.5.0.0/33")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "pod_cidr" in e.value.details()
    assert not conf_dir.exists() or os.listdir(conf_dir) == []

    update("10.5.7.0/24")
    ready, info = network_ready()
    assert ready is True
    assert json.loads(info["config"])["podCIDR"] == "10.5.7.0/24"
    written = json.loads((conf_dir / conf_template.OUTPUT_NAME).read_text())
    assert written["plugins"][0]["ipam"]["ranges"] == [[{"subnet": "10.5.7.0/24"}]]

    update("10.6.0.0/24")  # the kubelet's CIDR changed: the file follows
    written = json.loads((conf_dir / conf_template.OUTPUT_NAME).read_text())
    assert written["plugins"][0]["ipam"]["ranges"] == [[{"subnet": "10.6.0.0/24"}]]


def test_relative_template_path_is_refused_at_start_up():
    from vmcri import config
    with pytest.raises(config.ConfigError, match="cni_conf_template"):
        config.from_dict({"cni_conf_template": "net.j2"})
