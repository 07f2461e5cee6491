"""Policy: decide a pod VM's DomainSpec from the CRI config, vmcri config and guest image."""
from __future__ import annotations

import math
import os
import uuid as uuidlib
from dataclasses import dataclass

from cri_api.v1 import api_pb2 as pb

from vmcri.config import Config
from vmcri.sandbox.accel import AccelChoice
from vmcri.sandbox.domain import DOMAIN_PREFIX, DomainSpec, NicSpec, SandboxMeta

MIB = 1024 * 1024
# What the guest kernel, agent and crun need on top of the containers' limits.
GUEST_OVERHEAD_MIB = 96


@dataclass(frozen=True)
class Sizing:
    vcpus: int
    memory_mib: int
    source: str  # "defaults" or "pod resources"


@dataclass(frozen=True)
class SandboxPaths:
    """Where one sandbox's files live on the host."""
    state_dir: str  # <root>/sandboxes/<id>: console log, share dir, files
    share_dir: str  # exported to the guest over virtio-9p (a shared mount)
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


def domain_name(sandbox_id: str) -> str:
    return f"{DOMAIN_PREFIX}{sandbox_id[:32]}"


def tap_name(sandbox_id: str) -> str:
    return f"vmcri{sandbox_id[:8]}"  # IFNAMSIZ: at most 15 characters


def size(cfg: Config, linux: pb.LinuxPodSandboxConfig) -> Sizing:
    """vCPUs and memory from the pod's resources plus overhead, else the defaults.

    CPU: ceil(quota/period) of resources + overhead. Memory: the limit plus
    overhead plus what the guest itself needs. Both floored at what boots and
    capped by config."""
    cpus = 0.0
    mem = 0
    for res in (linux.resources, linux.overhead):
        if res.cpu_quota > 0 and res.cpu_period > 0:
            cpus += res.cpu_quota / res.cpu_period
        if res.memory_limit_in_bytes > 0:
            mem += res.memory_limit_in_bytes
    if cpus == 0 and mem == 0:
        return Sizing(cfg.default_vcpus, cfg.default_memory_mib, "defaults")
    vcpus = max(1, math.ceil(cpus)) if cpus else cfg.default_vcpus
    vcpus = min(vcpus, cfg.max_vcpus)
    memory = (math.ceil(mem / MIB) + GUEST_OVERHEAD_MIB) if mem else cfg.default_memory_mib
    memory = max(memory, cfg.min_memory_mib)
    return Sizing(vcpus, memory, "pod resources")


def design(cfg: Config, *, sandbox_id: str, config: pb.PodSandboxConfig, sizing: Sizing,
           accel: AccelChoice, guest, paths: SandboxPaths, nic_mac: str | None = None,
           nic_mtu: int = 0, role: str = "pod") -> DomainSpec:
    """`guest` is a vmcri.guestimage.GuestImage (kernel, initrd, rootfs, cmdline)."""
    md = config.metadata
    nic = NicSpec(mac=nic_mac, tap=tap_name(sandbox_id), mtu=nic_mtu) if nic_mac else None
    return DomainSpec(
        name=domain_name(sandbox_id),
        uuid=str(uuidlib.uuid4()),
        metadata=SandboxMeta(sandbox_id=sandbox_id, pod_name=md.name, pod_namespace=md.namespace,
                             pod_uid=md.uid, attempt=md.attempt, role=role,
                             owner=cfg.root_dir),
        domain_type=accel.domain_type,
        memory_mib=sizing.memory_mib,
        vcpus=sizing.vcpus,
        max_vcpus=sizing.vcpus,
        tb_cache_mib=cfg.tcg_tb_cache_mib,
        kernel=guest.kernel,
        initrd=guest.initrd,
        root_disk=guest.rootfs,
        cmdline=guest.cmdline,
        agent_socket=paths.agent_socket,
        console_log=paths.console_log,
        share_dir=paths.share_dir,
        nic=nic,
    )
