"""Daemon start: make libvirt, mounts and netns agree with the rows.

- host sandbox rows (no domain) -> vmcri.hostpod.pods.reconcile_row: CREATING rolled back,
                                  READY kept (NOTREADY if its PID namespace holder is gone)
- READY row, domain running   -> keep (the agent reconnects on first use)
- READY row, domain gone      -> NOTREADY
- CREATING row                -> the daemon died mid-create: roll it back entirely
- domain with vmcri metadata but no row -> destroy it (no VM leaks)
- netns under our run dir with no row   -> tear down
- pool VMs: adopted when READY and running, else destroyed (vmcri.sandbox.pool)
- sandbox dirs (and mounts under them) of no row or pool VM -> unmounted and removed
"""
from __future__ import annotations

import logging
import os
import shutil

from vmcri.hostpod import pods as hostpods
from vmcri.sandbox import hostfs
from vmcri.sandbox.model import CREATING, NOTREADY, READY
from vmcri.sandbox.sandbox_stop import release_host_files

log = logging.getLogger(__name__)


def reconcile(svc) -> dict:
    report = {"kept": 0, "notready": 0, "rolled_back": 0, "orphan_domains": 0}
    domains = {name: meta for name, meta in svc.hv.list_vmcri_domains().items()
               if meta.owner == svc.cfg.root_dir}  # another vmcri instance's VMs are not ours
    by_sandbox = {meta.sandbox_id: name for name, meta in domains.items()}
    known = set()
    for rec in svc.table.all():
        known.add(rec.id)
        if hostpods.is_host(rec):  # no domain: conmon kept its containers running
            report[hostpods.reconcile_row(svc, rec)] += 1
            continue
        running = rec.domain in domains and svc.hv.is_running(rec.domain)
        if rec.state == CREATING:
            log.warning("sandbox %s was being created when the daemon stopped: rolling back",
                        rec.id[:12])
            svc.hv.destroy(rec.domain)
            if rec.netns and svc.network is not None:
                svc.network.teardown(rec.id, rec.netns)
            release_host_files(svc, rec.id)
            svc.table.delete(rec.id)
            report["rolled_back"] += 1
        elif rec.state == READY and not running:
            svc.table.update(rec.id, state=NOTREADY,
                             reason="VMGone: the pod VM was not running at daemon start")
            report["notready"] += 1
        else:
            report["kept"] += 1
    pool = getattr(svc, "pool", None)
    if pool is not None:
        known |= pool.reconcile(domains, {r.id for r in svc.table.all()})
    for sandbox_id, name in by_sandbox.items():
        if sandbox_id not in known:
            log.warning("destroying orphan domain %s (no sandbox row)", name)
            svc.hv.destroy(name)
            report["orphan_domains"] += 1
    live = {r.id for r in svc.table.all()}
    report["stale_dirs"] = _clean_stale_dirs(svc, live | known)  # known includes adopted pool VMs
    if svc.network is not None:
        svc.network.cleanup_orphans(live)
    log.info("reconcile: %s", report)
    return report


def _clean_stale_dirs(svc, live: set[str]) -> int:
    stale = 0
    short_live = {sid[:16] for sid in live}
    for base, keep in ((svc.cfg.sandboxes_dir, live), (svc.cfg.sandboxes_run_dir, short_live)):
        try:
            names = os.listdir(base)
        except FileNotFoundError:
            continue
        for name in names:
            if name in keep:
                continue
            path = os.path.join(base, name)
            log.warning("removing stale sandbox dir %s (no sandbox row)", path)
            hostfs.unmount_tree(path)
            shutil.rmtree(path, ignore_errors=True)
            stale += 1
    return stale
