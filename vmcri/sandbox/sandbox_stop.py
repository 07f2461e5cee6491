"""StopPodSandbox and RemovePodSandbox. Both are idempotent: whatever is already
gone is skipped, and a second call finds nothing left to do."""
from __future__ import annotations

import contextlib
import logging

from cri_api.v1 import api_pb2 as pb

from vmcri.errors import NotFound
from vmcri.hostpod import pods as hostpods
from vmcri.sandbox import hostfs, podcgroup
from vmcri.sandbox.model import NOTREADY, SandboxRecord

log = logging.getLogger(__name__)


def _run_hooks(hooks, rec: SandboxRecord, what: str) -> None:
    for hook in hooks:
        try:
            hook(rec)
        except Exception:
            log.exception("%s hook failed for sandbox %s", what, rec.id[:12])


def _shutdown_vm(svc, rec: SandboxRecord) -> None:
    svc.drop_agent(rec.id)
    svc.hv.destroy(rec.domain)
    config = pb.PodSandboxConfig.FromString(rec.config) if rec.config else pb.PodSandboxConfig()
    podcgroup.release(rec.id, config.linux.cgroup_parent)  # qemu is gone: the dirs are empty


def _teardown_network(svc, rec: SandboxRecord) -> None:
    if rec.netns and svc.network is not None:
        svc.network.teardown(rec.id, rec.netns)


@contextlib.contextmanager
def _locked(svc, sandbox_id: str):
    """The current row under the sandbox lock, or None if it is (already) gone."""
    try:
        rec = svc.get(sandbox_id)
    except NotFound:
        yield None  # nothing left: success, so the kubelet's retries converge
        return
    with svc.lock(rec.id):
        yield svc.table.get(rec.id)


def _stop_vm_and_network(svc, rec: SandboxRecord) -> None:
    _run_hooks(svc.on_stop, rec, "stop")  # the containers, through the pod's agent
    if hostpods.is_host(rec):
        # no VM to destroy: every container leaves crun (conmon and cgroup with it), then
        # the pod's pinned namespaces, infra process and network go
        hostpods.delete_containers(svc, rec)
        svc.drop_agent(rec.id)
        hostpods.release_namespaces(svc, rec)
        return
    _shutdown_vm(svc, rec)
    _teardown_network(svc, rec)


def stop_pod_sandbox(svc, sandbox_id: str) -> None:
    with _locked(svc, sandbox_id) as rec:
        if rec is None:
            return
        _stop_vm_and_network(svc, rec)
        svc.table.update(rec.id, state=NOTREADY, netns="", reason=rec.reason or "stopped")


def remove_pod_sandbox(svc, sandbox_id: str) -> None:
    with _locked(svc, sandbox_id) as rec:
        if rec is None:
            return
        _stop_vm_and_network(svc, rec)
        _run_hooks(svc.on_remove, rec, "remove")
        release_host_files(svc, rec.id)
        svc.table.delete(rec.id)


def release_host_files(svc, sandbox_id: str) -> None:
    paths = svc.paths(sandbox_id)
    hostfs.unmount_tree(paths.state_dir)
    # never through a mount left behind (a hostPath bind would be emptied): refuse instead
    hostfs.remove_tree(paths.state_dir, ignore_errors=True)
    hostfs.remove_tree(paths.run_dir, ignore_errors=True)


def mark_vm_gone(svc, rec: SandboxRecord) -> SandboxRecord:
    """The domain vanished (qemu killed or crashed): the pod is NOTREADY."""
    with svc.lock(rec.id):
        fresh = svc.table.get(rec.id)
        if fresh is None or fresh.state != "READY" or svc.hv.is_running(fresh.domain):
            return fresh or rec
        log.warning("pod VM %s of %s/%s is gone", fresh.domain, fresh.namespace, fresh.name)
        svc.drop_agent(fresh.id)
        svc.table.update(fresh.id, state=NOTREADY, reason="VMGone: the pod VM exited unexpectedly")
        _run_hooks(svc.on_vm_gone, fresh, "vm-gone")
        return svc.table.get(fresh.id) or fresh
