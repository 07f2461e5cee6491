"""One way to get a pod VM: reserve() picks a source, the ticket's start() gives a PodVM.

Sources, in order of preference:
- the warm pool (a pre-booted VM, pool.py): relabelled, grown, its NIC hot-plugged;
- a template clone (template.py): restored in under a second, given a new identity, grown;
- a cold boot: the domain XML rendered with the pod's NIC, booted, the agent awaited.
A failed clone falls back to a cold boot of the same id. RunPodSandbox (sandbox_run.py)
does not care which source answered: it gets a running VM whose agent answers, with the
pod's NIC in its network namespace, and it configures the guest the same way for all.
Every side effect registers its undo on the caller's ExitStack.
"""
from __future__ import annotations

import dataclasses
import logging
import secrets
from dataclasses import dataclass

import libvirt
from cri_api.v1 import api_pb2 as pb

from vmcri.errors import DeadlineExceeded, FailedPrecondition, Unavailable
from vmcri.sandbox import designer, hostfs, podcgroup
from vmcri.sandbox.domain import NicSpec, SandboxMeta, render_domain, render_metadata, render_nic
from vmcri.sandbox.domain import METADATA_NS

log = logging.getLogger(__name__)


@dataclass
class PodVM:
    id: str
    domain: str
    client: object  # vmcri.channel.AgentClient, answering
    vcpus: int
    memory_mib: int
    source: str  # "cold" | "pool" | "clone"


def guest_image(svc):
    from vmcri import guestimage
    image = guestimage.locate(svc.cfg)
    if image is None:
        raise FailedPrecondition(f"no guest image at {svc.cfg.guest_dir}: run `vmcri image build`")
    return image


def reserve(svc, sizing: designer.Sizing):
    """A ticket for one pod VM; its id becomes the sandbox id."""
    pool = getattr(svc, "pool", None)
    warm = pool.claim(sizing) if pool is not None else None
    if warm is not None:
        return PoolTicket(warm)
    templates = getattr(svc, "templates", None)
    tpl = templates.ready() if templates is not None else None
    if tpl is not None and designer.can_grow(svc.cfg, (tpl.vcpus, tpl.memory_mib), sizing):
        return CloneTicket(secrets.token_hex(32), tpl)
    return ColdTicket(secrets.token_hex(32))


def relabel(svc, domain: str, meta: SandboxMeta) -> None:
    try:
        svc.hv.set_metadata(domain, render_metadata(meta), "vmcri", METADATA_NS)
    except libvirt.libvirtError as e:
        raise Unavailable(f"VM {domain} could not be labelled for its pod: {e}") from e


def plug_nic(svc, domain: str, vm_id: str, net) -> None:
    """Hot-plug the pod's NIC (the CNI veth's MAC) and move its tap into the pod netns."""
    if net is None or not net.interfaces:
        return
    nic = NicSpec(mac=net.interfaces[0]["mac"], tap=designer.tap_name(vm_id),
                  mtu=getattr(net, "mtu", 0) or 0)
    try:
        svc.hv.attach_device(domain, render_nic(nic))
    except libvirt.libvirtError as e:
        raise Unavailable(f"hot-plugging the pod NIC into {domain} failed: {e}") from e
    svc.network.attach_tap(net.netns_path, nic.tap)


def grow(svc, domain: str, client, have: tuple[int, int], want: designer.Sizing) -> tuple[int, int]:
    """Hot-plug a running VM up to `want`; returns (vcpus, memory_mib) it has afterwards."""
    from vmcri.sandbox import sandbox_resize
    vcpus, memory = have
    if (vcpus, memory) == (want.vcpus, want.memory_mib):
        return have
    out = sandbox_resize.apply(svc.hv, domain, client,
                               want.vcpus if want.vcpus != vcpus else None,
                               want.memory_mib if want.memory_mib != memory else None)
    vcpus = out.vcpus if out.vcpus is not None else vcpus
    memory = out.memory_mib if out.memory_mib is not None else memory
    if vcpus < want.vcpus or memory < want.memory_mib:
        log.warning("growing %s to %s fell short: %s", domain, want, "; ".join(out.not_applied))
    return vcpus, memory


def pod_meta(svc, vm_id: str, config: pb.PodSandboxConfig, role: str = "pod") -> SandboxMeta:
    md = config.metadata
    return SandboxMeta(sandbox_id=vm_id, pod_name=md.name, pod_namespace=md.namespace,
                       pod_uid=md.uid, attempt=md.attempt, role=role, owner=svc.cfg.root_dir)


def wait_agent(svc, vm_id: str, domain: str, client) -> None:
    try:
        client.wait_ready(timeout=svc.cfg.agent_timeout_s)
    except Exception as e:
        alive = svc.hv.is_running(domain)
        raise DeadlineExceeded(
            f"the pod VM's agent did not answer within {svc.cfg.agent_timeout_s:.0f}s "
            f"({'VM running' if alive else 'VM is gone'}): {e}\n--- guest console (tail) ---\n"
            f"{hostfs.console_tail(svc.paths(vm_id).console_log)}") from e


class ColdTicket:
    source = "cold"

    def __init__(self, vm_id: str):
        self.id = vm_id

    def cancel(self, svc) -> None:
        pass  # nothing exists yet

    def start(self, svc, config, sizing, net, undo, phase) -> PodVM:
        hostfs.prepare_vm_dirs(svc.paths(self.id), undo)
        phase("prepare")
        return self.boot(svc, config, sizing, net, undo, phase)

    def boot(self, svc, config, sizing, net, undo, phase) -> PodVM:
        mac = net.interfaces[0]["mac"] if net and net.interfaces else None
        spec = designer.design(svc.cfg, sandbox_id=self.id, config=config, sizing=sizing,
                               accel=svc.accel, guest=guest_image(svc), paths=svc.paths(self.id),
                               nic_mac=mac, nic_mtu=(getattr(net, "mtu", 0) or 0) if net else 0)
        parent = config.linux.cgroup_parent
        if parent:  # qemu joins the pod's cgroups before it allocates anything
            run_dir = svc.cfg.run_dir
            try:
                podcgroup.prepare_start(run_dir, self.id, spec.name, parent)
                wrapper = podcgroup.emulator_wrapper(run_dir, spec.emulator)
                spec = dataclasses.replace(spec, emulator=wrapper)
            except OSError as e:
                raise Unavailable(f"config.linux.cgroup_parent: {parent}: {e.strerror or e}") from e
        try:
            svc.hv.create(render_domain(spec))
        except libvirt.libvirtError as e:
            raise Unavailable(f"libvirt could not start the pod VM: {e}") from e
        finally:
            if parent:
                podcgroup.forget_start(svc.cfg.run_dir, spec.name)
        undo.callback(svc.hv.destroy, spec.name)
        phase("define")
        if net is not None:
            svc.network.attach_tap(net.netns_path, spec.nic.tap)
            phase("tap")
        client = svc.new_client(self.id)
        undo.callback(client.close)
        wait_agent(svc, self.id, spec.name, client)
        phase("agent")
        return PodVM(self.id, spec.name, client, sizing.vcpus, sizing.memory_mib, self.source)


class CloneTicket(ColdTicket):
    source = "clone"

    def __init__(self, vm_id: str, tpl):
        super().__init__(vm_id)
        self.tpl = tpl

    def start(self, svc, config, sizing, net, undo, phase) -> PodVM:
        hostfs.prepare_vm_dirs(svc.paths(self.id), undo)
        phase("prepare")
        try:
            domain = svc.templates.restore(self.tpl, self.id)
        except Exception as e:  # the template is at fault: this pod still starts
            log.warning("cloning the VM template failed (%s); booting %s cold", e, self.id[:12])
            svc.templates.stats["fallbacks"] += 1
            self.source = "cold"
            return self.boot(svc, config, sizing, net, undo, phase)
        undo.callback(svc.hv.destroy, domain)
        phase("restore")
        client = start_clone(svc, self.id, domain, self.tpl, pod_meta(svc, self.id, config), undo)
        phase("identity")
        vcpus, memory = grow(svc, domain, client, (self.tpl.vcpus, self.tpl.memory_mib), sizing)
        phase("grow")
        plug_nic(svc, domain, self.id, net)
        phase("nic-hotplug")
        return PodVM(self.id, domain, client, vcpus, memory, self.source)


def start_clone(svc, vm_id: str, domain: str, tpl, meta: SandboxMeta, undo):
    """A restored clone, relabelled, with a new identity and a fresh agent session."""
    from vmcri.channel import AgentError
    from vmcri.sandbox.template import new_identity
    relabel(svc, domain, meta)
    client = svc.new_client(vm_id, tpl.host_key)
    try:
        wait_agent(svc, vm_id, domain, client)
        new_identity(client)
    except AgentError as e:
        raise Unavailable(f"the cloned VM {domain} did not take its identity: {e}") from e
    finally:
        client.close()  # its key exchange drew on the RNG from before the reseed
    client = svc.new_client(vm_id, tpl.host_key)
    undo.callback(client.close)
    return client


class PoolTicket:
    source = "pool"

    def __init__(self, warm):
        self.warm = warm
        self.id = warm.id

    def cancel(self, svc) -> None:
        svc.pool.give_back(self.warm)  # untouched: nothing of this pod reached it

    def start(self, svc, config, sizing, net, undo, phase) -> PodVM:
        vm = self.warm
        if "grow" in vm.timings:  # grown while reserved: the time since the call began
            phase("grow")
        undo.callback(svc.pool.destroy, vm.id, vm.domain, vm.client)  # never back to the pool
        svc.pool.forget(vm.id)
        relabel(svc, vm.domain, pod_meta(svc, vm.id, config))
        phase("claim")
        plug_nic(svc, vm.domain, vm.id, net)
        if net is not None:
            phase("nic-hotplug")
        return PodVM(vm.id, vm.domain, vm.client, vm.vcpus, vm.memory_mib, self.source)
