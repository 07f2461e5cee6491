"""Golden files pin the VM shape rendered from domain.xml.j2 (Virtlet-style).

Regenerate after an intended template change with VMCRI_UPDATE_GOLDEN=1."""
import os
import pathlib
import xml.etree.ElementTree as ET

import pytest
from cri_api.v1 import api_pb2 as pb

from vmcri.config import Config
from vmcri.sandbox import designer
from vmcri.sandbox.accel import AccelChoice, choose
from vmcri.sandbox.domain import DomainSpec, SandboxMeta, parse_metadata, render_domain

GOLDEN = pathlib.Path(__file__).parent / "golden"
SID = "0123456789abcdef" * 4


class FakeGuest:
    kernel = "/var/lib/vmcri/guest/current/vmlinux"
    initrd = "/var/lib/vmcri/guest/current/initrd.img"
    rootfs = "/var/lib/vmcri/guest/current/root.erofs"
    cmdline = "console=ttyS0 quiet panic=-1"


def spec_for(name: str) -> DomainSpec:
    cfg = Config()
    paths = designer.SandboxPaths.for_sandbox(cfg, SID)
    tcg = AccelChoice("qemu", "tcg", "test")
    kvm = AccelChoice("kvm", "kvm", "test")
    config = pb.PodSandboxConfig(metadata=pb.PodSandboxMetadata(
        name="web-0", namespace="default", uid="a-uid", attempt=1))
    if name == "tcg-defaults":
        sizing = designer.size(cfg, config.linux)
        return _fixed(designer.design(cfg, sandbox_id=SID, config=config, sizing=sizing,
                                      accel=tcg, guest=FakeGuest, paths=paths))
    if name == "tcg-nic-sized":
        config.linux.resources.cpu_quota = 150000
        config.linux.resources.cpu_period = 100000
        config.linux.resources.memory_limit_in_bytes = 256 << 20
        sizing = designer.size(cfg, config.linux)
        return _fixed(designer.design(cfg, sandbox_id=SID, config=config, sizing=sizing,
                                      accel=tcg, guest=FakeGuest, paths=paths,
                                      nic_mac="0a:58:0a:59:00:05", nic_mtu=1450))
    if name == "tcg-no-hotplug":  # max_memory_mib = 0, max_vcpus = the pod's: fixed shape
        cfg = Config(max_memory_mib=0, max_vcpus=1)
        sizing = designer.size(cfg, config.linux)
        return _fixed(designer.design(cfg, sandbox_id=SID, config=config, sizing=sizing,
                                      accel=tcg, guest=FakeGuest, paths=paths))
    if name == "kvm-escaped":
        config.metadata.name = "evil'<name>&\""
        sizing = designer.size(cfg, config.linux)
        return _fixed(designer.design(cfg, sandbox_id=SID, config=config, sizing=sizing,
                                      accel=kvm, guest=FakeGuest, paths=paths))
    raise KeyError(name)


def _fixed(spec: DomainSpec) -> DomainSpec:
    # the uuid and generation id are random per VM; pin them for the golden comparison
    import dataclasses
    return dataclasses.replace(spec, uuid="11111111-2222-3333-4444-555555555555",
                               genid="66666666-7777-8888-9999-000000000000")


@pytest.mark.parametrize("name", ["tcg-defaults", "tcg-nic-sized", "tcg-no-hotplug", "kvm-escaped"])
def test_golden_domain_xml(name):
    xml = render_domain(spec_for(name))
    path = GOLDEN / f"domain_{name}.xml"
    if os.environ.get("VMCRI_UPDATE_GOLDEN") == "1":
        path.write_text(xml)
    assert xml == path.read_text()
    ET.fromstring(xml)  # well-formed


def test_metadata_round_trip_survives_escaping():
    meta = parse_metadata(render_domain(spec_for("kvm-escaped")))
    assert meta.sandbox_id == SID
    assert meta.pod_name == "evil'<name>&\""
    assert meta.attempt == 1
    assert meta.owner == Config().root_dir


def test_foreign_domain_is_not_ours():
    assert parse_metadata("<domain><name>x</name></domain>") is None
    assert parse_metadata("not xml") is None


def test_sizing_from_pod_resources():
    cfg = Config()
    linux = pb.LinuxPodSandboxConfig()
    assert designer.size(cfg, linux) == designer.Sizing(cfg.default_vcpus, cfg.default_memory_mib, "defaults")
    linux.resources.cpu_quota, linux.resources.cpu_period = 250000, 100000
    linux.resources.memory_limit_in_bytes = 64 << 20
    linux.overhead.memory_limit_in_bytes = 16 << 20
    s = designer.size(cfg, linux)
    assert s.vcpus == 3
    assert s.memory_mib == 64 + 16 + designer.GUEST_OVERHEAD_MIB
    linux.resources.cpu_quota = 10**9  # absurd quota is capped
    assert designer.size(cfg, linux).vcpus == cfg.max_vcpus
    small = pb.LinuxPodSandboxConfig()
    small.resources.memory_limit_in_bytes = 1 << 20
    assert designer.size(cfg, small).memory_mib >= cfg.min_memory_mib


def test_spec_rejects_nonsense():
    with pytest.raises(ValueError, match="vcpus"):
        DomainSpec(name="vmcri-x", uuid="u", metadata=SandboxMeta("x"), kernel="k", initrd="i",
                   root_disk="r", cmdline="", agent_socket="a", console_log="c", vcpus=0)
    with pytest.raises(ValueError, match="domain_type"):
        DomainSpec(name="vmcri-x", uuid="u", metadata=SandboxMeta("x"), kernel="k", initrd="i",
                   root_disk="r", cmdline="", agent_socket="a", console_log="c", domain_type="xen")


def test_accel_auto_needs_real_hardware_virt(tmp_path):
    (tmp_path / "kvm_pvm").mkdir()
    c = choose("auto", cpuinfo="flags\t: fpu hypervisor", modules_dir=str(tmp_path))
    assert c.name == "tcg" and "vmx" in c.reason
    (tmp_path / "kvm_intel").mkdir()
    dev = tmp_path / "kvm"
    dev.write_text("")
    c = choose("auto", cpuinfo="flags\t: fpu vmx", modules_dir=str(tmp_path), kvm_dev=str(dev))
    assert c.name == "kvm" and c.domain_type == "kvm"
    assert choose("tcg").domain_type == "qemu"


def test_rootfs_cache_none_leaves_out_the_cached_device():
    from vmcri.agent.protocol import ROOTFS_TAG, SHARE_TAG
    from vmcri.sandbox import template
    cfg = Config(rootfs_cache="none")
    config = pb.PodSandboxConfig(metadata=pb.PodSandboxMetadata(name="p", namespace="d", uid="u"))
    spec = designer.design(cfg, sandbox_id=SID, config=config, sizing=designer.size(cfg, config.linux),
                           accel=AccelChoice("qemu", "tcg", "test"), guest=FakeGuest,
                           paths=designer.SandboxPaths.for_sandbox(cfg, SID))
    xml = render_domain(spec)
    assert SHARE_TAG in xml and ROOTFS_TAG not in xml
    assert ROOTFS_TAG in render_domain(spec_for("tcg-defaults"))  # loose is the default
    loose = Config(rootfs_cache="loose")
    spec = designer.design(loose, sandbox_id=SID, config=config, sizing=designer.size(loose, config.linux),
                           accel=AccelChoice("qemu", "tcg", "test"), guest=FakeGuest,
                           paths=designer.SandboxPaths.for_sandbox(loose, SID))
    assert ROOTFS_TAG in render_domain(spec)
    guest = type("G", (), {"manifest": {"hash": "h"}, "dir": "/g"})()
    assert template.template_key(loose, guest) != template.template_key(cfg, guest)
