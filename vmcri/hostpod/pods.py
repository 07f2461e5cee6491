"""The sandbox RPCs for host sandboxes: what RunPodSandbox, Stop/Remove, status,
refresh and reconcile do for a pod that has no VM. The row is the same sandboxes row as
a VM pod's, with resources = {"kind": "host", "hostpod": <namespaces row>} and no domain.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import secrets
import sqlite3
import subprocess
import time

from cri_api.v1 import api_pb2 as pb

from vmcri.errors import AlreadyExists, InvalidArgument
from vmcri.hostpod import sandbox
from vmcri.hostpod.runtime import HostRuntime
from vmcri.sandbox import hostfs
from vmcri.sandbox.model import CREATING, NOTREADY, READY, SandboxRecord, now_ns

log = logging.getLogger(__name__)
KIND = "host"
HANDLER = sandbox.HOST_HANDLER
POLICIES = ("delegate", "refuse")
# sysctl prefixes and the pod namespace that must be private for them (as runc checks)
_IPC_SYSCTLS = ("kernel.msgmax", "kernel.msgmnb", "kernel.msgmni", "kernel.sem",
                "kernel.shmall", "kernel.shmmax", "kernel.shmmni", "kernel.shm_rmid_forced",
                "fs.mqueue.")


def is_host(rec: SandboxRecord | None) -> bool:
    return rec is not None and rec.resources.get("kind") == KIND


def host_fields(config: pb.PodSandboxConfig) -> list[str]:
    return sandbox.wants_host(config)


def wants_host_sandbox(config: pb.PodSandboxConfig, runtime_handler: str) -> bool:
    return runtime_handler == HANDLER or bool(host_fields(config))


def refuse_message(field: str) -> str:
    return (f"config.linux.security_context.namespace_options.{field}: NODE is not allowed "
            f"on this node (host_namespace_pods = \"refuse\"): every vmcri pod here is a "
            f"virtual machine and cannot share the host's {field} namespace")


def check_policy(cfg, config: pb.PodSandboxConfig, runtime_handler: str) -> None:
    """InvalidArgument naming the field when the node refuses host sandboxes."""
    if getattr(cfg, "host_namespace_pods", "delegate") != "refuse":
        return
    fields = host_fields(config)
    if fields:
        raise InvalidArgument(refuse_message(fields[0]))
    if runtime_handler == HANDLER:
        raise InvalidArgument("runtime_handler: \"host\" is disabled on this node "
                              "(host_namespace_pods = \"refuse\")")


@functools.lru_cache(maxsize=None)
def runtime(run_dir: str) -> HostRuntime:
    return HostRuntime(run_dir)


def _check_sysctls(config: pb.PodSandboxConfig) -> dict[str, str]:
    host = set(host_fields(config))
    for key in config.linux.sysctls:
        kind = "ipc" if key.startswith(_IPC_SYSCTLS) else "network" if key.startswith("net.") else ""
        if not kind:
            raise InvalidArgument(f"config.linux.sysctls[{key!r}]: not a namespaced sysctl; a "
                                  f"host sandbox cannot set it without changing the node")
        if kind in host:
            raise InvalidArgument(f"config.linux.sysctls[{key!r}]: the pod shares the host's "
                                  f"{kind} namespace, so setting it would change the node")
    return dict(sorted(config.linux.sysctls.items()))


def _apply_sysctls(row: dict, sysctls: dict[str, str]) -> None:
    """Written from inside the pod's namespaces (/proc/sys follows the writer's)."""
    if not sysctls:
        return
    argv = ["nsenter", *([f"--net={row['network']}"] if row.get("network") else []),
            *([f"--ipc={row['ipc']}"] if row.get("ipc") else []), "sh", "-c",
            'while [ $# -gt 0 ]; do printf %s "$2" > "/proc/sys/$1" || exit 1; shift 2; done', "sh"]
    for key, value in sysctls.items():
        argv += [key.replace(".", "/"), value]
    done = subprocess.run(argv, capture_output=True, timeout=30)
    if done.returncode != 0:
        raise InvalidArgument(f"config.linux.sysctls: setting them in the pod's namespaces "
                              f"failed: {done.stderr.decode(errors='replace')[:300]}")


def _network(svc, sandbox_id: str, config: pb.PodSandboxConfig, undo) -> tuple[str, object]:
    """(netns path, CNI result or None); none at all for a host-network pod."""
    if "network" in host_fields(config):
        return "", None
    if svc.network is not None and svc.cfg.cni_conf_dir:
        md = config.metadata
        net = svc.network.setup(sandbox_id, md.name, md.namespace, md.uid,
                                list(config.port_mappings), config.dns_config)
        undo.callback(svc.network.teardown, sandbox_id, net.netns_path)
        return net.netns_path, net
    from vmcri.network import netns  # no CNI on this node: loopback only, as for VM pods
    path = netns.create(svc.cfg.netns_dir, sandbox_id)
    undo.callback(netns.delete_path, path)
    return path, None


def run_host_sandbox(svc, config: pb.PodSandboxConfig, runtime_handler: str) -> str:
    rt = runtime(svc.cfg.run_dir)
    rt.check()
    sandbox.validate(config)
    sysctls = _check_sysctls(config)
    sandbox_id, md = secrets.token_hex(32), config.metadata
    rec = SandboxRecord(
        id=sandbox_id, name=md.name, namespace=md.namespace, uid=md.uid, attempt=md.attempt,
        state=CREATING, created_ns=now_ns(), domain="", config=config.SerializeToString(),
        runtime_handler=runtime_handler, labels=dict(config.labels),
        annotations=dict(config.annotations), resources={"kind": KIND})
    try:
        svc.table.insert(rec)
    except sqlite3.IntegrityError:
        raise AlreadyExists(f"pod sandbox name {md.name}_{md.namespace}_{md.uid}_{md.attempt} "
                            f"is already reserved") from None
    started = time.monotonic()
    timings: dict[str, float] = {}
    paths = svc.paths(sandbox_id)
    with svc.lock(sandbox_id), contextlib.ExitStack() as undo:
        undo.callback(svc.table.delete, sandbox_id)
        hostfs.prepare_vm_dirs(paths, undo)
        netns_path, net = _network(svc, sandbox_id, config, undo)
        timings["network"] = round(time.monotonic() - started, 4)
        if netns_path:
            svc.table.update(sandbox_id, netns=netns_path,
                             network=_network_row(net) if net is not None else {})
        ips = [ip["address"].split("/")[0] for ip in (net.ips if net is not None else [])]
        row = sandbox.setup(paths.share_dir, config, netns_path, ips)
        undo.callback(sandbox.teardown, paths.share_dir, row, sandbox_id)
        # recorded at once: a daemon killed before READY leaves reconcile the infra pid to stop
        svc.table.update(sandbox_id, resources={"kind": KIND, "hostpod": row})
        _apply_sysctls(row, sysctls)
        timings["total"] = round(time.monotonic() - started, 4)
        svc.table.update(sandbox_id, state=READY, timings=timings,
                         resources={"kind": KIND, "hostpod": row})
        undo.pop_all()
    log.info("pod %s/%s is host sandbox %s (host %s), ready in %.3fs", md.namespace, md.name,
             sandbox_id[:12], ",".join(host_fields(config)) or "handler", timings["total"])
    return sandbox_id


def _network_row(net) -> dict:
    return {"ips": net.ips, "interfaces": net.interfaces, "routes": net.routes,
            "mtu": getattr(net, "mtu", 0) or 0}


def release_namespaces(svc, rec: SandboxRecord) -> None:
    """Stop: the pod's namespaces and network go (its containers were stopped first)."""
    sandbox.teardown(svc.paths(rec.id).share_dir, rec.resources.get("hostpod"), rec.id)
    if rec.netns:
        if svc.network is not None and svc.cfg.cni_conf_dir:
            svc.network.teardown(rec.id, rec.netns)
        else:
            from vmcri.network import netns
            netns.delete_path(rec.netns)


def refresh(svc, rec: SandboxRecord) -> SandboxRecord:
    """A pod whose shared PID namespace lost its infra process is NOTREADY (CRI-O's rule
    for a dead infra container); nothing else of a host sandbox can die under us."""
    if rec.state != READY or sandbox.infra_alive(rec.resources.get("hostpod") or {}):
        return rec
    with svc.lock(rec.id):
        fresh = svc.table.get(rec.id)
        if fresh is None or fresh.state != READY:
            return fresh or rec
        svc.table.update(rec.id, state=NOTREADY,
                         reason="InfraGone: the pod's PID namespace holder exited")
        return svc.table.get(rec.id) or fresh


def reconcile_row(svc, rec: SandboxRecord) -> str:
    """Daemon start: CREATING rows are rolled back; READY ones kept (conmon kept their
    containers); returns the report key."""
    if rec.state == CREATING:
        log.warning("host sandbox %s was being created when the daemon stopped: rolling back",
                    rec.id[:12])
        try:
            release_namespaces(svc, rec)
        except Exception:
            log.exception("rolling back host sandbox %s", rec.id[:12])
        from vmcri.sandbox.sandbox_stop import release_host_files
        release_host_files(svc, rec.id)
        svc.table.delete(rec.id)
        return "rolled_back"
    before = rec.state
    return "notready" if refresh(svc, rec).state != before else "kept"


def verbose_info(svc, rec: SandboxRecord) -> dict:
    paths = svc.paths(rec.id)
    row = rec.resources.get("hostpod") or {}
    return {"kind": "host", "runtime": "crun under conmon on the host",
            "hostNamespaces": host_fields(pb.PodSandboxConfig.FromString(rec.config)),
            "namespaces": {k: row.get(k, "") for k in ("network", "ipc", "uts", "pid")},
            "infraPid": row.get("infra_pid", 0), "shareDir": paths.share_dir,
            "netns": rec.netns, "network": rec.network, "timings": rec.timings,
            "reason": rec.reason}


def delete_containers(svc, rec: SandboxRecord) -> None:
    """What destroying the VM is for a VM pod: every container of the pod leaves crun
    (its monitor and cgroup with it); rows and rootfs go with RemovePodSandbox."""
    from vmcri.hostpod.agent import for_sandbox
    base = os.path.join(svc.paths(rec.id).share_dir, "containers")
    try:
        ids = os.listdir(base)
    except FileNotFoundError:
        return
    engine = for_sandbox(svc, rec).engine
    for cid in ids:
        try:
            engine.delete(cid)
        except Exception:
            log.exception("deleting host container %s", cid[:12])


def containers_gone(svc, rec: SandboxRecord) -> bool:
    """A host sandbox's answer to "is the pod VM confirmed gone?": the host never goes,
    so a READY pod's containers may run (False: ask the HostAgent about each); a stopped
    pod's are gone when crun and conmon know none of them still running."""
    if rec.state == READY:
        return False
    base = os.path.join(svc.paths(rec.id).share_dir, "containers")
    try:
        ids = os.listdir(base)
    except FileNotFoundError:
        return True
    engine = svc.agent(rec).engine
    return all(engine.state(cid).get("status") in ("stopped", "unknown") for cid in ids)
