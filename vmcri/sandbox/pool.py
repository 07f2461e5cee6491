"""Warm pool: pod VMs booted ahead of time with the default shape, claimed by RunPodSandbox.

A pool VM is a vmcri domain like any other (metadata role "pool", owner = root_dir) with
its own share dir and agent socket, keyed by an id that becomes the sandbox id when a pod
claims it, so every path the rest of vmcri derives from a sandbox id already fits. Its row
in `pool_vms` is written before any side effect; reconcile adopts READY ones and destroys
everything else. A claimed VM is never given back: it dies with its pod.

A pool VM has no NIC: the claim hot-plugs one once CNI has made the pod's veth.

A pod that asks for more than the default shape still gets a pool VM when the VM can grow
to it (vCPU hotplug up to max_vcpus, memory by DIMM up to max_memory_mib): the claim
resizes it through sandbox_resize before handing it over; if it cannot, the pod boots cold.
"""
from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field

from cri_api.v1 import api_pb2 as pb

from vmcri.errors import Unavailable
from vmcri.sandbox import designer, hostfs, podvm
from vmcri.sandbox.domain import SandboxMeta, render_domain
from vmcri.sandbox.model import READY, now_ns
from vmcri.store import dumps, loads

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS pool_vms (
    id         TEXT PRIMARY KEY,       -- becomes the sandbox id of the pod that claims it
    domain     TEXT NOT NULL,
    state      TEXT NOT NULL,          -- BOOTING | READY
    vcpus      INTEGER NOT NULL,
    memory_mib INTEGER NOT NULL,
    created_ns INTEGER NOT NULL,
    host_key   TEXT NOT NULL DEFAULT '',
    timings    TEXT NOT NULL DEFAULT '{}'
);
"""
BOOTING = "BOOTING"
CLAIM_PING_S = 5.0  # a pool VM whose agent does not answer this fast is dropped, not waited on
MAX_BACKOFF_S = 60.0

@dataclass
class PoolVM:
    id: str
    domain: str
    vcpus: int
    memory_mib: int
    host_key: str = ""
    timings: dict = field(default_factory=dict)
    client: object = None  # AgentClient; made on first use for an adopted VM


class WarmPool:
    def __init__(self, svc, size: int, max_concurrent_boots: int = 1):
        # size and max_concurrent_boots come validated from config (pool_size, ...)
        self.svc = svc
        self.size = size
        self.max_boots = max_concurrent_boots
        self.store = svc.table.store
        self.store.ensure_schema(SCHEMA)
        self._ready: list[PoolVM] = []
        self._booting = 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failures = 0
        # misses: "empty" (none ready), "unfit" (a shape the pool cannot serve)
        self.stats = {"claimed": 0, "booted": 0, "boot_failures": 0, "adopted": 0, "dropped": 0,
                      "grown": 0, "grow_failures": 0, "empty": 0, "unfit": 0,
                      "cloned": 0}  # booted: cold boots and template clones; cloned: the latter

    # -- shape ----------------------------------------------------------------
    def shape(self) -> designer.Sizing:
        return designer.size(self.svc.cfg, pb.LinuxPodSandboxConfig())

    def fits(self, sizing: designer.Sizing) -> bool:
        """A pool VM is this shape, or can be grown to it."""
        want = self.shape()
        return designer.can_grow(self.svc.cfg, (want.vcpus, want.memory_mib), sizing)

    def _grow(self, vm: PoolVM, sizing: designer.Sizing) -> bool:
        """Resize a claimed VM to `sizing`; False when it did not get there."""
        t0 = time.monotonic()
        vm.vcpus, vm.memory_mib = podvm.grow(self.svc, vm.domain, vm.client,
                                             (vm.vcpus, vm.memory_mib), sizing)
        vm.timings["grow"] = round(time.monotonic() - t0, 4)
        return vm.vcpus >= sizing.vcpus and vm.memory_mib >= sizing.memory_mib

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> None:
        if self.size == 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._refill_loop, name="pool-refill", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop refilling; READY pool VMs keep running and are adopted at the next start."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def snapshot(self) -> dict:
        shape = self.shape()
        with self._cond:
            return {"size": self.size, "ready": len(self._ready), "booting": self._booting,
                    "maxConcurrentBoots": self.max_boots, **self.stats,
                    "shape": {"vcpus": shape.vcpus, "memoryMiB": shape.memory_mib}}

    def _refill_loop(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                want = self.size - len(self._ready) - self._booting
                if want > 0 and self._booting < self.max_boots:
                    self._booting += 1
                    threading.Thread(target=self._boot_guarded, name="pool-boot", daemon=True).start()
                    continue
                self._cond.wait(timeout=5.0)

    def _boot_guarded(self) -> None:
        try:
            vm = self._boot()
        except Exception as e:
            log.warning("warm pool: boot failed: %s", e)
            with self._cond:
                self._booting -= 1
                self.stats["boot_failures"] += 1
                self._failures += 1
                delay = min(MAX_BACKOFF_S, 2.0 ** self._failures)
            self._stop.wait(delay)  # a broken guest image must not turn into a boot loop
            with self._cond:
                self._cond.notify_all()
            return
        with self._cond:
            self._booting -= 1
            self._failures = 0
            self.stats["booted"] += 1
            self._ready.append(vm)
            self._cond.notify_all()
        log.info("warm pool: VM %s ready in %.2fs", vm.domain, vm.timings.get("total", 0))

    def _boot(self) -> PoolVM:
        """One pool VM of the pool's shape: cloned from the VM template when there is one
        (a refill then costs a restore, not a boot), else booted."""
        svc, cfg = self.svc, self.svc.cfg
        guest = podvm.guest_image(svc)
        vm_id = secrets.token_hex(32)
        sizing = self.shape()
        paths = svc.paths(vm_id)
        vm = PoolVM(id=vm_id, domain=designer.domain_name(vm_id), vcpus=sizing.vcpus,
                    memory_mib=sizing.memory_mib)
        t0 = time.monotonic()
        self.store.execute(  # the intent, before any side effect
            "INSERT INTO pool_vms (id, domain, state, vcpus, memory_mib, created_ns)"
            " VALUES (?,?,?,?,?,?)", (vm.id, vm.domain, BOOTING, vm.vcpus, vm.memory_mib, now_ns()))
        with contextlib.ExitStack() as undo:
            undo.callback(self._delete_row, vm.id)
            hostfs.prepare_vm_dirs(paths, undo)
            config = pb.PodSandboxConfig(metadata=pb.PodSandboxMetadata())
            client = self._clone(vm, config, sizing, undo)
            if client is None:
                spec = designer.design(cfg, sandbox_id=vm.id, config=config, sizing=sizing,
                                       accel=svc.accel, guest=guest, paths=paths, role="pool")
                svc.hv.create(render_domain(spec))
                undo.callback(svc.hv.destroy, vm.domain)
                client = svc.new_client(vm.id)
                undo.callback(client.close)
                client.wait_ready(timeout=cfg.agent_timeout_s)
            vm.client, vm.host_key = client, client.host_key_fingerprint or ""
            vm.timings = {"total": round(time.monotonic() - t0, 4)}
            self.store.execute("UPDATE pool_vms SET state = ?, host_key = ?, timings = ? WHERE id = ?",
                               (READY, vm.host_key, dumps(vm.timings), vm.id))
            if self._stop.is_set():
                raise Unavailable("the daemon is stopping")
            undo.pop_all()
        return vm

    def _clone(self, vm: PoolVM, config, sizing, undo):
        """The agent client of `vm` restored from the VM template; None without one."""
        templates = getattr(self.svc, "templates", None)
        tpl = templates.ready() if templates is not None else None
        if tpl is None or not designer.can_grow(self.svc.cfg, (tpl.vcpus, tpl.memory_mib), sizing):
            return None
        try:
            templates.restore(tpl, vm.id)
        except Exception as e:
            log.warning("warm pool: cloning the VM template failed (%s); booting", e)
            templates.stats["fallbacks"] += 1
            return None
        undo.callback(self.svc.hv.destroy, vm.domain)
        meta = podvm.pod_meta(self.svc, vm.id, config, role="pool")
        client = podvm.start_clone(self.svc, vm.id, vm.domain, tpl, meta, undo)
        vm.vcpus, vm.memory_mib = podvm.grow(self.svc, vm.domain, client,
                                             (tpl.vcpus, tpl.memory_mib), sizing)
        if (vm.vcpus, vm.memory_mib) != (sizing.vcpus, sizing.memory_mib):
            raise Unavailable(f"the clone {vm.domain} did not grow to the pool's shape")
        with self._cond:
            self.stats["cloned"] += 1
        return client

    # -- claim ----------------------------------------------------------------
    def claim(self, sizing: designer.Sizing) -> PoolVM | None:
        """A live pool VM of this shape, taken out of the pool; None when there is none."""
        if self.size == 0:
            return None
        if not self.fits(sizing):
            self.stats["unfit"] += 1
            return None
        while True:
            with self._cond:
                if not self._ready:
                    self.stats["empty"] += 1
                    return None
                vm = self._ready.pop(0)
                self._cond.notify_all()  # refill
            if not self._alive(vm):
                log.warning("warm pool: VM %s is not answering; destroying it", vm.domain)
                self.stats["dropped"] += 1
                self.destroy(vm.id, vm.domain, vm.client)
                continue
            if (vm.vcpus, vm.memory_mib) != (sizing.vcpus, sizing.memory_mib):
                if not self._grow(vm, sizing):
                    self.stats["grow_failures"] += 1
                    self.destroy(vm.id, vm.domain, vm.client)  # half-grown: not the pool's shape
                    return None
                self.stats["grown"] += 1
            self.stats["claimed"] += 1
            return vm

    def give_back(self, vm: PoolVM) -> None:
        """Only for a VM nothing was done with (the pod's name was taken)."""
        self.stats["claimed"] -= 1
        want = self.shape()
        if (vm.vcpus, vm.memory_mib) != (want.vcpus, want.memory_mib):
            self.destroy(vm.id, vm.domain, vm.client)  # grown for that pod: not the pool's shape
            return
        with self._cond:
            self._ready.insert(0, vm)

    def _alive(self, vm: PoolVM) -> bool:
        from vmcri.channel import AgentError
        if not self.svc.hv.is_running(vm.domain):
            return False
        if vm.client is None:
            vm.client = self.svc.new_client(vm.id, vm.host_key)  # same VM we booted, or none
        try:
            vm.client.call("ping", timeout=CLAIM_PING_S)
            return True
        except (AgentError, OSError):
            return False

    def forget(self, vm_id: str) -> None:
        """The pod's sandbox row owns this VM now."""
        self._delete_row(vm_id)

    def _delete_row(self, vm_id: str) -> None:
        self.store.execute("DELETE FROM pool_vms WHERE id = ?", (vm_id,))

    def destroy(self, vm_id: str, domain: str, client=None) -> None:
        from vmcri.sandbox.sandbox_stop import release_host_files
        if client is not None:
            client.close()
        self.svc.hv.destroy(domain)
        release_host_files(self.svc, vm_id)
        self._delete_row(vm_id)

    # -- reconcile ------------------------------------------------------------
    def reconcile(self, domains: dict[str, SandboxMeta], sandbox_ids: set[str]) -> set[str]:
        """Adopt READY pool VMs still running (up to the pool size, same shape); destroy the
        rest, and pool-role domains without a row. Returns the ids it dealt with."""
        handled: set[str] = set()
        want = self.shape()
        running = {meta.sandbox_id: name for name, meta in domains.items()}
        for row in self.store.query("SELECT * FROM pool_vms ORDER BY created_ns"):
            handled.add(row["id"])
            if row["id"] in sandbox_ids:  # claimed just before a crash: the sandbox row owns it
                self._delete_row(row["id"])
                continue
            alive = row["domain"] in domains and self.svc.hv.is_running(row["domain"])
            keep = (alive and row["state"] == READY and len(self._ready) < self.size
                    and (row["vcpus"], row["memory_mib"]) == (want.vcpus, want.memory_mib))
            if keep:
                self._ready.append(PoolVM(id=row["id"], domain=row["domain"], vcpus=row["vcpus"],
                                          memory_mib=row["memory_mib"], host_key=row["host_key"],
                                          timings=loads(row["timings"], {})))
                self.stats["adopted"] += 1
                log.info("warm pool: adopted VM %s", row["domain"])
            else:
                log.warning("warm pool: destroying %s VM %s", row["state"], row["domain"])
                self.destroy(row["id"], row["domain"])
        for sandbox_id, name in running.items():
            meta = domains[name]
            if meta.role == "pool" and sandbox_id not in handled and sandbox_id not in sandbox_ids:
                log.warning("warm pool: destroying pool domain %s (no row)", name)
                self.destroy(sandbox_id, name)
                handled.add(sandbox_id)
        return handled
