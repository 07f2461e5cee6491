"""Kernel samepage merging for pod VMs (config `ksm = true`).

qemu marks guest RAM mergeable (libvirt's default: no <nosharepages/>), so with KSM running
the host merges identical pages between pod VMs, which template clones have many of (same
kernel, same agent, same page cache). KSM is host-wide and off on Debian unless started:
vmcri starts it only when the operator asks, and never stops it (other users may rely on it).
bench/README.md "VM templates" has what it gives; docs/security.md what it costs."""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)
SYSFS = "/sys/kernel/mm/ksm"
# ~50k pages (200 MiB) scanned per second: a full pass over 100 idle 256 MiB pods in about
# 2 min, at a few % of one core for ksmd (the bench's 2000 / 10 ms merged faster, at more CPU)
SETTINGS = {"pages_to_scan": 1000, "sleep_millisecs": 20}


def _read(name: str, root: str) -> str:
    with open(os.path.join(root, name)) as f:
        return f.read().strip()


def _write(name: str, value, root: str) -> None:
    with open(os.path.join(root, name), "w") as f:
        f.write(str(value))


def start(root: str = SYSFS) -> dict:
    """Switch KSM on with SETTINGS; returns what it found (for Status). A host without KSM
    or a read-only sysfs is logged, not fatal: pods still run, unmerged."""
    try:
        before = {k: _read(k, root) for k in ("run", *SETTINGS)}
        for key, value in SETTINGS.items():
            _write(key, value, root)
        _write("run", 1, root)
    except OSError as e:
        log.warning("ksm = true, but KSM could not be started (%s): pod VMs are not merged", e)
        return {"enabled": False, "error": str(e)}
    log.info("KSM started (was run=%s): %s", before["run"], SETTINGS)
    return {"enabled": True, "before": before}


def status(root: str = SYSFS) -> dict:
    """The host's KSM counters, for Status --verbose: how much it merges now."""
    out = {}
    for key in ("run", "pages_shared", "pages_sharing", "full_scans"):
        try:
            out[key] = int(_read(key, root))
        except (OSError, ValueError):
            return {}
    return out
