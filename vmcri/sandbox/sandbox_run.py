"""RunPodSandbox: reserve the row, then build the VM step by step; every step
registers its undo on an ExitStack, so a failure anywhere leaves nothing."""
from __future__ import annotations

import contextlib
import logging
import secrets
import sqlite3
import time

import libvirt
from cri_api.v1 import api_pb2 as pb

from vmcri.container.ocispec import sandbox_sysctls
from vmcri.errors import AlreadyExists, DeadlineExceeded, FailedPrecondition, InvalidArgument, Unavailable
from vmcri.sandbox import designer, hostfs
from vmcri.sandbox.domain import render_domain
from vmcri.sandbox.model import CREATING, READY, SandboxRecord, now_ns

log = logging.getLogger(__name__)
RUNTIME_HANDLERS = ("", "vmcri")  # "" is the kubelet's default handler


def validate(config: pb.PodSandboxConfig) -> None:
    md = config.metadata
    if not config.HasField("metadata"):
        raise InvalidArgument("config.metadata: required")
    for field in ("name", "namespace", "uid"):
        if not getattr(md, field):
            raise InvalidArgument(f"config.metadata.{field}: must not be empty")
        if len(getattr(md, field)) > 253:
            raise InvalidArgument(f"config.metadata.{field}: longer than 253 characters")
    if config.hostname and (len(config.hostname) > 64 or any(c in config.hostname for c in " /\n\t\0")):
        raise InvalidArgument(f"config.hostname: {config.hostname[:80]!r} is not a valid hostname")
    ns = config.linux.security_context.namespace_options
    for field in ("network", "pid", "ipc"):
        if getattr(ns, field) == pb.NamespaceMode.NODE:
            raise InvalidArgument(
                f"config.linux.security_context.namespace_options.{field}: NODE is not supported: "
                f"a vmcri pod is a virtual machine and cannot share the host's {field} namespace "
                f"(run host{field.capitalize()} pods with a host-namespace runtime)")
    if ns.userns_options.mode == pb.NamespaceMode.NODE and ns.HasField("userns_options"):
        pass  # the host user namespace is the default; nothing to share
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
    from vmcri.agent import protocol
    try:
        protocol.validate("set_sysctls", {"sysctls": dict(config.linux.sysctls)})
    except protocol.ProtocolError as e:
        raise InvalidArgument(f"config.linux.{e}") from None


def _guest_image(svc):
    from vmcri import guestimage
    image = guestimage.locate(svc.cfg)
    if image is None:
        raise FailedPrecondition(f"no guest image at {svc.cfg.guest_dir}: run `vmcri image build`")
    return image


def run_pod_sandbox(svc, config: pb.PodSandboxConfig, runtime_handler: str = "") -> str:
    validate(config)
    if runtime_handler not in RUNTIME_HANDLERS:
        # an unknown handler is a RuntimeClass mistake worth surfacing, not guessing at
        raise InvalidArgument(f"runtime_handler: {runtime_handler!r} is not configured "
                              f"(vmcri serves \"\" and \"vmcri\")")
    guest = _guest_image(svc)
    md = config.metadata
    sizing = designer.size(svc.cfg, config.linux)
    pool = getattr(svc, "pool", None)
    warm = pool.claim(sizing) if pool is not None else None  # None: boot cold
    sandbox_id = warm.id if warm is not None else secrets.token_hex(32)
    paths = svc.paths(sandbox_id)
    rec = SandboxRecord(
        id=sandbox_id, name=md.name, namespace=md.namespace, uid=md.uid, attempt=md.attempt,
        state=CREATING, created_ns=now_ns(), domain=designer.domain_name(sandbox_id),
        config=config.SerializeToString(), runtime_handler=runtime_handler,
        labels=dict(config.labels), annotations=dict(config.annotations),
        resources={"vcpus": sizing.vcpus, "memory_mib": sizing.memory_mib,
                   "sizing": sizing.source, "accel": svc.accel.name})
    if warm is not None:
        rec.resources["source"] = "pool"
        # a grown pool VM may hold a little more memory than asked (whole DIMMs)
        rec.resources.update(vcpus=warm.vcpus, memory_mib=warm.memory_mib)
    try:
        svc.table.insert(rec)  # the intent, before any side effect
    except sqlite3.IntegrityError:
        if warm is not None:
            pool.give_back(warm)  # untouched: nothing of this pod reached it
        raise AlreadyExists(f"pod sandbox name {md.name}_{md.namespace}_{md.uid}_{md.attempt} "
                            f"is already reserved")
    timings: dict[str, float] = {}
    t_start = time.monotonic()

    def phase(name: str, since: float) -> float:
        now = time.monotonic()
        timings[name] = round(now - since, 4)
        if svc.metrics is not None:
            svc.metrics.observe_sandbox_phase(name, now - since)
        return now

    if warm is not None:
        from vmcri.sandbox.pool import run_claimed
        return run_claimed(svc, warm, config, rec, phase, timings, t_start)
    with svc.lock(sandbox_id), contextlib.ExitStack() as undo:
        undo.callback(svc.table.delete, sandbox_id)
        try:
            # 1. dirs and the shared 9p mount
            hostfs.prepare_vm_dirs(paths, undo)
            t = phase("prepare", t_start)

            # 2. network namespace and CNI
            net = None
            if svc.network is not None and svc.cfg.cni_conf_dir:
                net = svc.network.setup(sandbox_id, md.name, md.namespace, md.uid,
                                        list(config.port_mappings), config.dns_config)
                undo.callback(svc.network.teardown, sandbox_id, net.netns_path)
                svc.table.update(sandbox_id, netns=net.netns_path, network=_network_row(net))
                t = phase("network", t)

            # 3. the VM
            mac = net.interfaces[0]["mac"] if net and net.interfaces else None
            spec = designer.design(svc.cfg, sandbox_id=sandbox_id, config=config, sizing=sizing,
                                   accel=svc.accel, guest=guest, paths=paths, nic_mac=mac,
                                   nic_mtu=getattr(net, "mtu", 0) or 0 if net else 0)
            xml = render_domain(spec)
            try:
                svc.hv.create(xml)
            except libvirt.libvirtError as e:
                raise Unavailable(f"libvirt could not start the pod VM: {e}") from e
            undo.callback(svc.hv.destroy, spec.name)
            t = phase("define", t)
            if net is not None:
                svc.network.attach_tap(net.netns_path, spec.nic.tap)
                t = phase("tap", t)

            # 4. the agent
            client = svc.new_client(sandbox_id)
            undo.callback(client.close)
            try:
                client.wait_ready(timeout=svc.cfg.agent_timeout_s)
            except Exception as e:
                alive = svc.hv.is_running(spec.name)
                raise DeadlineExceeded(
                    f"the pod VM's agent did not answer within {svc.cfg.agent_timeout_s:.0f}s "
                    f"({'VM running' if alive else 'VM is gone'}): {e}\n"
                    f"--- guest console (tail) ---\n{hostfs.console_tail(paths.console_log)}") from e
            t = phase("agent", t)

            # 5. identity and network inside the guest
            configure_guest(client, config, net)
            t = phase("configure", t)
        except BaseException:
            log.warning("RunPodSandbox %s (%s/%s) failed; rolling back", sandbox_id[:12],
                        md.namespace, md.name)
            raise
        timings["total"] = round(time.monotonic() - t_start, 4)
        svc.table.update(sandbox_id, state=READY, timings=timings,
                         host_key=client.host_key_fingerprint or "")
        svc.set_agent(sandbox_id, client)
        undo.pop_all()
    log.info("pod %s/%s is VM %s, ready in %.2fs %s", md.namespace, md.name, rec.domain,
             timings["total"], timings)
    return sandbox_id


def _network_row(net) -> dict:
    return {"ips": net.ips, "interfaces": net.interfaces, "routes": net.routes,
            "mtu": getattr(net, "mtu", 0) or 0}


def configure_guest(client, config: pb.PodSandboxConfig, net) -> None:
    """The pod's identity, DNS, NIC and sysctls inside its VM (cold boot or warm pool)."""
    from vmcri.channel import AgentError
    hostname = config.hostname or config.metadata.name
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
    sysctls = sandbox_sysctls(config)  # guest-wide: the VM is the pod
    if sysctls:
        try:
            client.call("set_sysctls", sysctls=sysctls)
        except AgentError as e:
            err = InvalidArgument if e.kind == "InvalidArgument" else Unavailable
            raise err(f"config.linux.sysctls: setting them in the guest failed: {e}") from e
