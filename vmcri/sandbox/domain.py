"""Typed description of a pod VM and its rendering through the Jinja template.

The template (templates/domain.xml.j2) holds the structure; DomainSpec holds
the values; vmcri.sandbox.designer decides them. Nothing else builds XML.
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import jinja2

from vmcri.agent.protocol import PORT_NAME as AGENT_PORT
from vmcri.agent.protocol import ROOTFS_TAG, SHARE_TAG

METADATA_NS = "https://vmcri.dev/xmlns/sandbox/1"
DOMAIN_PREFIX = "vmcri-"

_env = jinja2.Environment(
    loader=jinja2.PackageLoader("vmcri", "templates"),
    autoescape=True,  # every value is XML-escaped: pod names reach the template
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
)


@dataclass(frozen=True)
class SandboxMeta:
    sandbox_id: str
    pod_name: str = ""
    pod_namespace: str = ""
    pod_uid: str = ""
    attempt: int = 0
    role: str = "pod"  # "pod", or "pool" for a pre-booted VM not yet claimed
    owner: str = ""  # root_dir of the vmcri instance that made it; reconcile touches only its own


@dataclass(frozen=True)
class NicSpec:
    mac: str
    tap: str
    mtu: int = 0


@dataclass(frozen=True)
class DomainSpec:
    name: str
    uuid: str
    metadata: SandboxMeta
    kernel: str
    initrd: str
    root_disk: str
    cmdline: str
    agent_socket: str
    console_log: str
    domain_type: str = "qemu"  # "kvm" or "qemu" (TCG)
    memory_mib: int = 256  # boot memory (NUMA cell 0 when memory is hot-pluggable)
    max_memory_mib: int = 0  # 0: no memory hotplug; else <maxMemory> and DIMM slots
    memory_slots: int = 0
    vcpus: int = 1
    max_vcpus: int = 1
    tb_cache_mib: int = 32
    share_dir: str | None = None
    share_tag: str = SHARE_TAG
    # the same export again, which the guest caches for root filesystems (protocol.py);
    # "" leaves it out (config rootfs_cache = "none")
    rootfs_tag: str = ROOTFS_TAG
    agent_port: str = AGENT_PORT
    nic: NicSpec | None = None
    # VM generation id (vmgenid): a clone restored with a new one reseeds the guest's RNG
    genid: str = "00000000-0000-0000-0000-000000000000"
    emulator: str = "/usr/bin/qemu-system-x86_64"

    def __post_init__(self):
        if self.domain_type not in ("kvm", "qemu"):
            raise ValueError(f"domain_type: {self.domain_type!r} is not kvm or qemu")
        if not 1 <= self.vcpus <= self.max_vcpus:
            raise ValueError(f"vcpus: {self.vcpus} not within 1..max_vcpus={self.max_vcpus}")
        if self.memory_mib < 64:
            raise ValueError(f"memory_mib: {self.memory_mib} is too small to boot")
        if self.max_memory_mib and (self.max_memory_mib <= self.memory_mib or self.memory_slots < 1):
            raise ValueError(f"max_memory_mib: {self.max_memory_mib} needs to be above memory_mib "
                             f"{self.memory_mib} with at least one slot")
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,200}", self.name):
            raise ValueError(f"name: {self.name!r} is not a valid domain name")


def render_domain(spec: DomainSpec) -> str:
    return _env.get_template("domain.xml.j2").render(spec=spec, metadata_ns=METADATA_NS)


def render_nic(nic: NicSpec) -> str:
    """An <interface> for attachDeviceFlags: the pod NIC of a pool VM or a template clone."""
    return _env.get_template("nic.xml.j2").render(nic=nic)


def render_metadata(meta: SandboxMeta) -> str:
    """vmcri's metadata element alone, for setMetadata on a running domain."""
    return _env.get_template("metadata.xml.j2").render(meta=meta, metadata_ns=METADATA_NS)


def render_dimm(size_mib: int) -> str:
    """A <memory model='dimm'> device for attachDeviceFlags (memory hotplug into NUMA cell 0)."""
    if size_mib <= 0:
        raise ValueError(f"size_mib: {size_mib} is not positive")
    return _env.get_template("dimm.xml.j2").render(size_mib=size_mib)


def parse_metadata(xml: str) -> SandboxMeta | None:
    """Read vmcri's metadata back from a domain XML; None if the domain is not ours."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    node = root.find(f"metadata/{{{METADATA_NS}}}sandbox")
    if node is None:
        return None

    def text(tag: str) -> str:
        child = node.find(f"{{{METADATA_NS}}}{tag}")
        return (child.text or "") if child is not None else ""

    sandbox_id = text("id")
    if not sandbox_id:
        return None
    try:
        attempt = int(text("attempt") or 0)
    except ValueError:
        attempt = 0
    return SandboxMeta(sandbox_id=sandbox_id, pod_name=text("name"),
                       pod_namespace=text("namespace"), pod_uid=text("uid"),
                       attempt=attempt, role=text("role") or "pod", owner=text("owner"))
