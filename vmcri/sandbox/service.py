"""SandboxService: the pod-VM lifecycle behind the CRI sandbox RPCs.

The RPC bodies live in one module per concern (sandbox_run, sandbox_stop,
sandbox_status, reconcile); this class holds what they share.
"""
from __future__ import annotations

import logging
import threading
from collections import defaultdict

from vmcri.config import Config
from vmcri.errors import InvalidArgument, NotFound
from vmcri.hostpod import pods as hostpods
from vmcri.sandbox.accel import AccelChoice
from vmcri.sandbox.designer import SandboxPaths
from vmcri.sandbox.model import SandboxRecord, SandboxTable
from vmcri.sandbox.virt import Hypervisor
from vmcri.store import Store

log = logging.getLogger(__name__)


class SandboxService:
    def __init__(self, cfg: Config, store: Store, hv: Hypervisor, accel: AccelChoice,
                 network=None, metrics=None):
        self.cfg = cfg
        self.table = SandboxTable(store)
        self.hv = hv
        self.accel = accel
        self.network = network
        self.metrics = metrics
        self._agents: dict[str, object] = {}
        self._agents_lock = threading.Lock()
        self._locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        self._locks_guard = threading.Lock()
        # Hooks other services register: called with a SandboxRecord.
        self.on_stop: list = []    # before the VM goes (stop containers)
        self.on_remove: list = []  # before the rows go (remove containers)
        self.on_vm_gone: list = []  # the VM died under us (mark containers exited)
        hv.on_domain_stopped.append(self._domain_stopped)

    def _domain_stopped(self, domain: str) -> None:
        """libvirt says a domain stopped: if we did not stop it, the pod is NOTREADY now,
        not at the kubelet's next status poll."""
        for rec in self.table.all():
            if rec.domain == domain and rec.state == "READY":
                self.refresh(rec)

    # -- lookup ---------------------------------------------------------------
    def lock(self, sandbox_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks[sandbox_id]

    def get(self, sandbox_id: str) -> SandboxRecord:
        if not sandbox_id:
            raise InvalidArgument("pod_sandbox_id: must not be empty")
        rec = self.table.lookup(sandbox_id)
        if rec is None:
            raise NotFound(f"pod sandbox {sandbox_id!r} not found")
        return rec

    def find(self, sandbox_id: str) -> SandboxRecord | None:
        try:
            return self.get(sandbox_id)
        except NotFound:
            return None

    def paths(self, sandbox_id: str) -> SandboxPaths:
        return SandboxPaths.for_sandbox(self.cfg, sandbox_id)

    # -- agent connections ----------------------------------------------------
    def agent(self, rec: SandboxRecord):
        """The persistent agent connection of a running sandbox (made on first use,
        e.g. after a daemon restart). A host sandbox's is its HostAgent: the same
        container operations, answered by crun and conmon on the host."""
        with self._agents_lock:
            client = self._agents.get(rec.id)
            if client is None and hostpods.is_host(rec):
                from vmcri.hostpod.agent import for_sandbox
                client = for_sandbox(self, rec)
                if rec.resources.get("hostpod"):  # not a half-made pod's
                    self._agents[rec.id] = client
            elif client is None:
                # a VM whose key changed behind our back is not the VM we booted
                client = self.new_client(rec.id, rec.host_key)
                self._agents[rec.id] = client
            return client

    def new_client(self, vm_id: str, host_key: str = ""):
        """An agent client for a VM of ours (pod or pool), timed into the metrics."""
        from vmcri.channel import AgentClient
        client = AgentClient(self.paths(vm_id).agent_socket, call_timeout=self.cfg.agent_timeout_s,
                             on_call=self.metrics.observe_agent_call if self.metrics else None)
        client.host_key_fingerprint = host_key or None
        return client

    def set_agent(self, sandbox_id: str, client) -> None:
        with self._agents_lock:
            self._agents[sandbox_id] = client

    def drop_agent(self, sandbox_id: str) -> None:
        with self._agents_lock:
            client = self._agents.pop(sandbox_id, None)
        if client is not None:
            try:
                client.close()
            except Exception:
                log.debug("closing agent of %s", sandbox_id, exc_info=True)

    # -- RPC entry points -----------------------------------------------------
    def run(self, config, runtime_handler: str = "") -> str:
        from vmcri.sandbox.sandbox_run import run_pod_sandbox
        return run_pod_sandbox(self, config, runtime_handler)

    def stop(self, sandbox_id: str) -> None:
        from vmcri.sandbox.sandbox_stop import stop_pod_sandbox
        stop_pod_sandbox(self, sandbox_id)

    def remove(self, sandbox_id: str) -> None:
        from vmcri.sandbox.sandbox_stop import remove_pod_sandbox
        remove_pod_sandbox(self, sandbox_id)

    def update_resources(self, sandbox_id: str, overhead, resources) -> dict:
        from vmcri.sandbox.sandbox_resize import update_pod_sandbox_resources
        return update_pod_sandbox_resources(self, sandbox_id, overhead, resources)

    def refresh(self, rec: SandboxRecord) -> SandboxRecord:
        """Notice a VM that died under us: READY -> NOTREADY with a reason (a host
        sandbox: its PID namespace holder)."""
        from vmcri.sandbox.sandbox_stop import mark_vm_gone
        if hostpods.is_host(rec):
            return hostpods.refresh(self, rec)
        if rec.state == "READY" and not self.hv.is_running(rec.domain):
            return mark_vm_gone(self, rec)
        return rec

    def reconcile(self) -> dict:
        from vmcri.sandbox.reconcile import reconcile
        return reconcile(self)
