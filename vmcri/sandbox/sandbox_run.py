"""RunPodSandbox: reserve the row, then get the VM and wire it step by step; every step
registers its undo on an ExitStack, so a failure anywhere leaves nothing."""
from __future__ import annotations

import contextlib
import logging
import sqlite3
import time

from cri_api.v1 import api_pb2 as pb

from vmcri.container.ocispec import sandbox_sysctls
from vmcri.errors import AlreadyExists, InvalidArgument, Unavailable
from vmcri.hostpod import pods as hostpods
from vmcri.sandbox import designer, hostfs, podcgroup, podvm
from vmcri.sandbox.model import CREATING, READY, SandboxRecord, now_ns

log = logging.getLogger(__name__)
# "" is the kubelet's default handler; "host" asks for a host sandbox (docs/host-sandboxes.md)
VM_HANDLERS = ("", "vmcri")
RUNTIME_HANDLERS = (*VM_HANDLERS, hostpods.HANDLER)


def handlers(cfg) -> tuple[str, ...]:
    """The handlers this node serves: "host" only while host sandboxes are delegated."""
    delegate = getattr(cfg, "host_namespace_pods", "delegate") == "delegate"
    return RUNTIME_HANDLERS if delegate else VM_HANDLERS


def validate(config: pb.PodSandboxConfig) -> None:
    md = config.metadata
    if not config.HasField("metadata"):
        raise InvalidArgument("config.metadata: required")
    for field in ("name", "namespace", "uid"):
        if not getattr(md, field):
            raise InvalidArgument(f"config.metadata.{field}: must not be empty")
        if len(getattr(md, field)) > 253:
            raise InvalidArgument(f"config.metadata.{field}: longer than 253 characters")
    from vmcri.agent import protocol
    if config.hostname:
        try:  # the guest's own rule, so that the guest never refuses what passed here
            protocol.validate("set_hostname", {"hostname": config.hostname})
        except protocol.ProtocolError as e:
            raise InvalidArgument(f"config.{e}") from None
    for i, pm in enumerate(config.port_mappings):
        if not 0 < pm.container_port < 65536:
            raise InvalidArgument(f"config.port_mappings[{i}].container_port: {pm.container_port} is not a port")
        if not 0 <= pm.host_port < 65536:
            raise InvalidArgument(f"config.port_mappings[{i}].host_port: {pm.host_port} is not a port")
    for i, server in enumerate(config.dns_config.servers):
        if not server or any(c.isspace() for c in server):
            raise InvalidArgument(f"config.dns_config.servers[{i}]: {server!r} is not an address")
    for field in ("searches", "options"):
        for i, value in enumerate(getattr(config.dns_config, field)):
            if not value or any(c.isspace() for c in value):
                raise InvalidArgument(f"config.dns_config.{field}[{i}]: {value!r} is not valid")
    if config.linux.cgroup_parent:
        podcgroup.parent_path(config.linux.cgroup_parent)
    try:
        protocol.validate("set_sysctls", {"sysctls": dict(config.linux.sysctls)})
    except protocol.ProtocolError as e:
        raise InvalidArgument(f"config.linux.{e}") from None


def run_pod_sandbox(svc, config: pb.PodSandboxConfig, runtime_handler: str = "") -> str:
    """Reserve the row, get a VM from a source (podvm.reserve), wire the network, configure
    the guest, commit. Every step registers its undo, so a failure leaves nothing.
    A pod asking for the node's namespaces (or the "host" handler) is a host sandbox:
    vmcri.hostpod.pods, no VM."""
    validate(config)
    hostpods.check_policy(svc.cfg, config, runtime_handler)  # "refuse": the field is named
    if runtime_handler not in RUNTIME_HANDLERS:
        # an unknown handler is a RuntimeClass mistake worth surfacing, not guessing at
        served = ", ".join(f'"{h}"' for h in handlers(svc.cfg))
        raise InvalidArgument(f"runtime_handler: {runtime_handler!r} is not configured "
                              f"(vmcri serves {served})")
    if hostpods.wants_host_sandbox(config, runtime_handler):
        return hostpods.run_host_sandbox(svc, config, runtime_handler)
    podvm.guest_image(svc)  # FAILED_PRECONDITION before anything is reserved
    md = config.metadata
    sizing = designer.size(svc.cfg, config.linux)
    timings = _Timings(svc.metrics)  # a pool VM grown for this pod is part of its start
    ticket = podvm.reserve(svc, sizing)
    rec = SandboxRecord(
        id=ticket.id, name=md.name, namespace=md.namespace, uid=md.uid, attempt=md.attempt,
        state=CREATING, created_ns=now_ns(), domain=designer.domain_name(ticket.id),
        config=config.SerializeToString(), runtime_handler=runtime_handler,
        labels=dict(config.labels), annotations=dict(config.annotations),
        resources={"vcpus": sizing.vcpus, "memory_mib": sizing.memory_mib,
                   "sizing": sizing.source, "accel": svc.accel.name, "source": ticket.source})
    try:
        svc.table.insert(rec)  # the intent, before any side effect
    except sqlite3.IntegrityError:
        ticket.cancel(svc)
        raise AlreadyExists(f"pod sandbox name {md.name}_{md.namespace}_{md.uid}_{md.attempt} "
                            f"is already reserved")
    with svc.lock(ticket.id), contextlib.ExitStack() as undo:
        undo.callback(svc.table.delete, ticket.id)
        try:
            net = _network(svc, ticket.id, config, undo)
            if net is not None:
                timings.mark("network")
            # registered before the VM's own undo, so it runs after qemu is gone
            undo.callback(podcgroup.release, ticket.id, config.linux.cgroup_parent)
            vm = ticket.start(svc, config, sizing, net, undo, timings.mark)
            # a cold boot is placed before it runs; a pool or clone VM joins here
            podcgroup.charge(svc, ticket.id, vm.domain, config.linux.cgroup_parent)
            configure_guest(vm.client, config, net, ticket.id)
            timings.mark("configure")
        except BaseException:
            log.warning("RunPodSandbox %s (%s/%s) failed; rolling back", ticket.id[:12],
                        md.namespace, md.name)
            raise
        resources = dict(rec.resources, vcpus=vm.vcpus, memory_mib=vm.memory_mib, source=vm.source)
        svc.table.update(ticket.id, state=READY, timings=timings.done(), resources=resources,
                         host_key=vm.client.host_key_fingerprint or "")
        svc.set_agent(ticket.id, vm.client)
        undo.pop_all()
    log.info("pod %s/%s is VM %s (%s), ready in %.2fs %s", md.namespace, md.name, vm.domain,
             vm.source, timings.values["total"], timings.values)
    return ticket.id


class _Timings:
    """Phase durations of one RunPodSandbox, each observed into the metrics as it ends."""

    def __init__(self, metrics):
        self.metrics = metrics
        self.values: dict[str, float] = {}
        self.t0 = self.last = time.monotonic()

    def mark(self, name: str) -> None:
        now = time.monotonic()
        self.values[name] = round(now - self.last, 4)
        if self.metrics is not None:
            self.metrics.observe_sandbox_phase(name, now - self.last)
        self.last = now

    def done(self) -> dict:
        self.values["total"] = round(time.monotonic() - self.t0, 4)
        return self.values


def _network(svc, sandbox_id: str, config: pb.PodSandboxConfig, undo):
    """CNI ADD in a new netns (None when CNI is off); its undo is CNI DEL."""
    if svc.network is None or not svc.cfg.cni_conf_dir:
        return None
    md = config.metadata
    net = svc.network.setup(sandbox_id, md.name, md.namespace, md.uid,
                            list(config.port_mappings), config.dns_config)
    undo.callback(svc.network.teardown, sandbox_id, net.netns_path)
    svc.table.update(sandbox_id, netns=net.netns_path, network=_network_row(net))
    return net


def _network_row(net) -> dict:
    return {"ips": net.ips, "interfaces": net.interfaces, "routes": net.routes,
            "mtu": getattr(net, "mtu", 0) or 0}


def configure_guest(client, config: pb.PodSandboxConfig, net, sandbox_id: str = "") -> None:
    """The pod's identity, DNS, NIC and sysctls inside its VM (cold boot or warm pool)."""
    from vmcri.agent.protocol import ProtocolError
    from vmcri.channel import AgentError
    from vmcri.sandbox.hostname import pod_hostname
    hostname = pod_hostname(config, sandbox_id)
    ips = [ip["address"].split("/")[0] for ip in (net.ips if net else [])]
    dns = config.dns_config
    try:
        client.call("set_hostname", hostname=hostname)
        client.call("write_etc", files={
            "hostname": hostname + "\n",
            "hosts": hostfs.etc_hosts(hostname, ips),
            "resolv.conf": hostfs.resolv_conf(list(dns.servers), list(dns.searches),
                                              list(dns.options)),
        })
        if net is not None and net.interfaces:
            client.call("configure_nic", mac=net.interfaces[0]["mac"],
                        addresses=[ip["address"] for ip in net.ips],
                        routes=net.routes, mtu=getattr(net, "mtu", 0) or 0)
    except AgentError as e:
        raise Unavailable(f"configuring the guest failed: {e}") from e
    except ProtocolError as e:  # refused before it left the host: the pod's own input
        raise InvalidArgument(f"config: {e}") from e
    if config.linux.security_context.namespace_options.pid == pb.POD:
        try:  # the pod init's Python start then overlaps the kubelet's next calls
            client.call("pod_init_start")
        except AgentError as e:  # an older agent: the first create starts it, as before
            log.info("pod %s: no early pod init (%s)", sandbox_id[:12], e)
    sysctls = sandbox_sysctls(config)  # guest-wide: the VM is the pod
    if sysctls:
        try:
            client.call("set_sysctls", sysctls=sysctls)
        except AgentError as e:
            err = InvalidArgument if e.kind == "InvalidArgument" else Unavailable
            raise err(f"config.linux.sysctls: setting them in the guest failed: {e}") from e
