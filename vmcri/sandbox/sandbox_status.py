"""PodSandboxStatus and ListPodSandbox: rows (refreshed against libvirt, or for a host
sandbox against its PID namespace holder) -> CRI messages."""
from __future__ import annotations

import json

from cri_api.v1 import api_pb2 as pb

from vmcri.errors import NotFound
from vmcri.hostpod import pods as hostpods
from vmcri.sandbox.model import CREATING, READY, SandboxRecord

_STATE = {READY: pb.PodSandboxState.SANDBOX_READY}


def _metadata(rec: SandboxRecord) -> pb.PodSandboxMetadata:
    return pb.PodSandboxMetadata(name=rec.name, namespace=rec.namespace, uid=rec.uid,
                                 attempt=rec.attempt)


def _state(rec: SandboxRecord) -> int:
    return _STATE.get(rec.state, pb.PodSandboxState.SANDBOX_NOTREADY)


def to_status(svc, rec: SandboxRecord) -> pb.PodSandboxStatus:
    config = pb.PodSandboxConfig.FromString(rec.config)
    ips = [ip["address"].split("/")[0] for ip in rec.network.get("ips", [])]
    ns = config.linux.security_context.namespace_options
    return pb.PodSandboxStatus(
        id=rec.id, metadata=_metadata(rec), state=_state(rec), created_at=rec.created_ns,
        network=pb.PodSandboxNetworkStatus(
            ip=ips[0] if ips else "",
            additional_ips=[pb.PodIP(ip=ip) for ip in ips[1:]]),
        linux=pb.LinuxPodSandboxStatus(namespaces=pb.Namespace(options=pb.NamespaceOption(
            network=ns.network, pid=ns.pid, ipc=ns.ipc, target_id=ns.target_id))),
        labels=rec.labels, annotations=rec.annotations, runtime_handler=rec.runtime_handler)


def verbose_info(svc, rec: SandboxRecord) -> dict[str, str]:
    """{"info": JSON}; its "kind" says which sandbox the pod is: "vm" or "host"."""
    if hostpods.is_host(rec):
        info = dict(hostpods.verbose_info(svc, rec), config=json.loads(_config_json(rec)))
        return {"info": json.dumps(info, sort_keys=True)}
    paths = svc.paths(rec.id)
    info = {
        "kind": "vm",
        "vm": {"domain": rec.domain, "accel": rec.resources.get("accel"),
               "vcpus": rec.resources.get("vcpus"), "memoryMiB": rec.resources.get("memory_mib"),
               "sizing": rec.resources.get("sizing"), "qemuPid": svc.hv.pid(rec.domain),
               "running": svc.hv.is_running(rec.domain)},
        "vmCost": svc.hv.cost(rec.domain),
        "hotplug": _hotplug(svc, rec),
        "consoleLog": paths.console_log,
        "shareDir": paths.share_dir,
        "agentSocket": paths.agent_socket,
        "netns": rec.netns,
        "network": rec.network,
        "timings": rec.timings,
        "source": rec.resources.get("source", "cold"),  # "pool": a warm-pool VM was claimed
        # the last UpdatePodSandboxResources: requested vs applied, and why not (if so)
        "resize": rec.resources.get("resize"),
        "reason": rec.reason,
        "config": json.loads(_config_json(rec)),
    }
    return {"info": json.dumps(info, sort_keys=True)}


def _hotplug(svc, rec: SandboxRecord) -> dict:
    """How far the running VM can be resized (UpdatePodSandboxResources), from libvirt."""
    import libvirt
    try:
        shape = svc.hv.live_shape(rec.domain)
    except (libvirt.libvirtError, ValueError, AttributeError):
        return {}
    return {"vcpusPlugged": shape.vcpus, "maxVcpus": shape.max_vcpus,
            "memoryMiB": shape.memory_mib, "bootMemoryMiB": shape.boot_memory_mib,
            "maxMemoryMiB": shape.max_memory_mib, "dimms": len(shape.dimms),
            "dimmSlots": shape.slots}


def _config_json(rec: SandboxRecord) -> str:
    from google.protobuf import json_format
    return json_format.MessageToJson(pb.PodSandboxConfig.FromString(rec.config))


def status(svc, sandbox_id: str, verbose: bool):
    rec = svc.get(sandbox_id)
    if rec.state == CREATING:  # as containerd: not a sandbox until RunPodSandbox returns it
        raise NotFound(f"pod sandbox {sandbox_id!r} not found (it is still being created)")
    rec = svc.refresh(rec)
    return to_status(svc, rec), (verbose_info(svc, rec) if verbose else {})


def list_sandboxes(svc, flt: pb.PodSandboxFilter | None) -> list[pb.PodSandbox]:
    out = []
    for rec in svc.table.all():
        if rec.state == CREATING:
            # containerd adds a sandbox to its store only once it has started: a booting
            # VM listed as NOTREADY would make the kubelet report a spurious ContainerDied
            continue
        if flt is not None:
            if flt.id and not rec.id.startswith(flt.id):
                continue
            if any(rec.labels.get(k) != v for k, v in flt.label_selector.items()):
                continue
        rec = svc.refresh(rec)
        if flt is not None and flt.HasField("state") and _state(rec) != flt.state.state:
            continue
        out.append(pb.PodSandbox(id=rec.id, metadata=_metadata(rec), state=_state(rec),
                                 created_at=rec.created_ns, labels=rec.labels,
                                 annotations=rec.annotations,
                                 runtime_handler=rec.runtime_handler))
    return out
