"""Policy: decide a pod VM's DomainSpec from the CRI config, vmcri config and guest image."""
from __future__ import annotations

import math
import os
import uuid as uuidlib
from dataclasses import dataclass

from cri_api.v1 import api_pb2 as pb

from vmcri.agent.protocol import ROOTFS_TAG
from vmcri.config import Config
from vmcri.sandbox.accel import AccelChoice
from vmcri.sandbox.domain import DOMAIN_PREFIX, DomainSpec, NicSpec, SandboxMeta

MIB = 1024 * 1024
# What the guest kernel, agent and crun need on top of the containers' limits.
GUEST_OVERHEAD_MIB = 96
# Memory hotplug: the guest onlines memory in 128 MiB blocks (x86 memory block size),
# so every DIMM is a multiple of that; the slot count bounds how many grows a VM gets.
DIMM_ALIGN_MIB = 128
DIMM_SLOTS = 16
# Hot-added memory is onlined by the kernel itself (there is no udev in the guest), as
# ZONE_MOVABLE so that the DIMM can be unplugged again. maxMemory puts the hotplug range
# above 4 GiB, which makes the kernel reserve a 64 MiB swiotlb bounce buffer that no
# device of ours needs (virtio without an IOMMU does 64-bit DMA): measured, that buffer
# took 66 MiB of a 256 MiB guest's MemTotal and ~60 MB of qemu RSS.
MEMORY_HOTPLUG_CMDLINE = "memhp_default_state=online_movable swiotlb=noforce"


@dataclass(frozen=True)
class Sizing:
    vcpus: int
    memory_mib: int
    source: str  # "defaults" or "pod resources"


@dataclass(frozen=True)
class SandboxPaths:
    """Where one sandbox's files live on the host."""
    state_dir: str  # <root>/sandboxes/<id>: console log, share dir, files
    share_dir: str  # the host-only tree the guest sees read-only through guest_export
    console_log: str
    run_dir: str  # <run>/sandboxes/<short id>: the agent socket
    agent_socket: str

    @classmethod
    def for_sandbox(cls, cfg: Config, sandbox_id: str) -> "SandboxPaths":
        state = os.path.join(cfg.sandboxes_dir, sandbox_id)
        # unix socket paths are limited to 108 bytes: use a short id under the run dir
        run = os.path.join(cfg.sandboxes_run_dir, sandbox_id[:16])
        return cls(state_dir=state, share_dir=os.path.join(state, "share"),
                   console_log=os.path.join(state, "console.log"),
                   run_dir=run, agent_socket=os.path.join(run, "agent.sock"))

    @property
    def guest_export(self) -> str:
        """What the VM's 9p device exports: a read-only bind of share_dir (hostfs)."""
        return os.path.join(self.state_dir, "share-ro")


def domain_name(sandbox_id: str) -> str:
    return f"{DOMAIN_PREFIX}{sandbox_id[:32]}"


def tap_name(sandbox_id: str) -> str:
    return f"vmcri{sandbox_id[:8]}"  # IFNAMSIZ: at most 15 characters


def demand(*resources: pb.LinuxContainerResources) -> tuple[float, int]:
    """(CPUs, memory bytes) the given resources ask for: sum of quota/period and of
    memory limits; 0 for what none of them limits."""
    cpus = 0.0
    mem = 0
    for res in resources:
        if res.cpu_quota > 0 and res.cpu_period > 0:
            cpus += res.cpu_quota / res.cpu_period
        if res.memory_limit_in_bytes > 0:
            mem += res.memory_limit_in_bytes
    return cpus, mem


def vcpus_for(cpus: float) -> int:
    """Whole vCPUs for a CPU demand (not capped)."""
    return max(1, math.ceil(round(cpus, 6)))  # 1.0000000001 from float division is still 1


def memory_mib_for(cfg: Config, mem_bytes: int) -> int:
    """Guest memory for a containers' memory demand: limit + what the guest needs, floored."""
    return max(math.ceil(mem_bytes / MIB) + GUEST_OVERHEAD_MIB, cfg.min_memory_mib)


def size(cfg: Config, linux: pb.LinuxPodSandboxConfig) -> Sizing:
    """vCPUs and memory from the pod's resources plus overhead, else the defaults.

    CPU: ceil(quota/period) of resources + overhead. Memory: the limit plus
    overhead plus what the guest itself needs. Both floored at what boots and
    capped by config."""
    cpus, mem = demand(linux.resources, linux.overhead)
    if cpus == 0 and mem == 0:
        return Sizing(cfg.default_vcpus, cfg.default_memory_mib, "defaults")
    vcpus = min(vcpus_for(cpus), cfg.max_vcpus) if cpus else cfg.default_vcpus
    memory = memory_mib_for(cfg, mem) if mem else cfg.default_memory_mib
    return Sizing(vcpus, memory, "pod resources")


def max_memory_mib(cfg: Config, memory_mib: int) -> int:
    """The hotplug ceiling of a VM booted with `memory_mib`; 0 when it cannot grow."""
    if cfg.max_memory_mib < memory_mib + DIMM_ALIGN_MIB:
        return 0
    return memory_mib + (cfg.max_memory_mib - memory_mib) // DIMM_ALIGN_MIB * DIMM_ALIGN_MIB


def can_grow(cfg: Config, have: tuple[int, int], want: Sizing) -> bool:
    """Whether a running VM of `have` (vcpus, memory_mib) can be hot-plugged up to `want`;
    never shrunk: a smaller pod would hold memory it did not ask for."""
    vcpus, memory = have
    if want.vcpus < vcpus or want.memory_mib < memory or want.vcpus > cfg.max_vcpus:
        return False
    if want.memory_mib == memory:
        return True
    room = max_memory_mib(cfg, memory)
    return room >= memory + dimm_mib(want.memory_mib - memory)


def dimm_mib(want_mib: int) -> int:
    """The DIMM size that adds at least `want_mib`."""
    return max(1, math.ceil(want_mib / DIMM_ALIGN_MIB)) * DIMM_ALIGN_MIB


def design(cfg: Config, *, sandbox_id: str, config: pb.PodSandboxConfig, sizing: Sizing,
           accel: AccelChoice, guest, paths: SandboxPaths, nic_mac: str | None = None,
           nic_mtu: int = 0, role: str = "pod", extra_cmdline: str = "") -> DomainSpec:
    """`guest` is a vmcri.guestimage.GuestImage (kernel, initrd, rootfs, cmdline)."""
    md = config.metadata
    nic = NicSpec(mac=nic_mac, tap=tap_name(sandbox_id), mtu=nic_mtu) if nic_mac else None
    max_mem = max_memory_mib(cfg, sizing.memory_mib)
    return DomainSpec(
        name=domain_name(sandbox_id),
        uuid=str(uuidlib.uuid4()),
        genid=str(uuidlib.uuid4()),
        metadata=SandboxMeta(sandbox_id=sandbox_id, pod_name=md.name, pod_namespace=md.namespace,
                             pod_uid=md.uid, attempt=md.attempt, role=role,
                             owner=cfg.root_dir),
        domain_type=accel.domain_type,
        memory_mib=sizing.memory_mib,
        max_memory_mib=max_mem,
        memory_slots=DIMM_SLOTS if max_mem else 0,
        vcpus=sizing.vcpus,
        max_vcpus=max(sizing.vcpus, cfg.max_vcpus),  # hot-pluggable up to the max
        tb_cache_mib=cfg.tcg_tb_cache_mib,
        rootfs_tag=ROOTFS_TAG if cfg.rootfs_cache == "loose" else "",
        kernel=guest.kernel,
        initrd=guest.initrd,
        root_disk=guest.rootfs,
        cmdline=" ".join(filter(None, (guest.cmdline, MEMORY_HOTPLUG_CMDLINE if max_mem else "",
                                       extra_cmdline))),
        agent_socket=paths.agent_socket,
        console_log=paths.console_log,
        share_dir=paths.guest_export,
        nic=nic,
    )
