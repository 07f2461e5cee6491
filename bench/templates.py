"""VM templates, side by side in one run (issue: template clones).

- P1: RunPodSandbox through a template clone, a cold boot (vm_template = false) and the raw
  qemu floor of the same guest, interleaved run by run; ratios to the floor.
- P5: N idle clones and N idle cold-booted pods: qemu PSS each (median), then the same
  after KSM has scanned them (when --ksm; KSM is switched back to what it was afterwards).
- P6: M idle clones started one after another: all Ready?, wall time, PSS per pod,
  MemAvailable before/after, and whether the host still answers (a Version call's latency).

    /opt/vmcri/venv/bin/python -m bench.templates --runs 3 --idle 10 --density 100 --ksm
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from cri_api.v1 import api_pb2 as pb

from bench.common import (GUEST_CURRENT, daemon, host_mem_available_kib, log, proc_mem_kib,
                          remove_pod, run_pod, verbose_info)
from bench.sandbox_ready import Variant, floor_once

KSM = "/sys/kernel/mm/ksm"
BASE = 'cni_conf_dir = ""\nagent_timeout_s = 600\n'


def _template_ready(d) -> bool:
    info = d.runtime.Status(pb.StatusRequest(verbose=True)).info
    return json.loads(info["vmTemplate"])["ready"]


def _wait_template(d, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not _template_ready(d):
        if time.monotonic() > deadline:
            raise SystemExit("the VM template was not built in time")
        time.sleep(1)


def p1(clone_d, cold_d, runs: int, tb_mib: int) -> dict:
    rows = {"floor": [], "cold": [], "clone": []}
    v = Variant("floor", GUEST_CURRENT, tb_mib)
    for r in range(runs):
        rows["floor"].append(floor_once(v, 256)["ready_s"])
        for label, d in (("cold", cold_d), ("clone", clone_d)):
            sid, took = run_pod(d, f"p1-{label}-{r}")
            info = verbose_info(d, sid)
            assert info["source"] == label, info["source"]
            rows[label].append(took)
            remove_pod(d, sid)
        log(f"P1 run {r}: floor {rows['floor'][-1]:.2f}s cold {rows['cold'][-1]:.2f}s "
            f"clone {rows['clone'][-1]:.2f}s")
    med = {k: statistics.median(v) for k, v in rows.items()}
    return {"runs": rows, "median_s": med,
            "cold_over_floor": med["cold"] / med["floor"], "clone_over_floor": med["clone"] / med["floor"]}


def _pss_mib(d, sids) -> list[float]:
    out = []
    for sid in sids:
        m = proc_mem_kib(verbose_info(d, sid)["vm"]["qemuPid"])
        out.append(m.get("Pss", 0) / 1024)
    return out


def _ksm(settings: dict | None = None) -> dict:
    keys = ("run", "pages_to_scan", "sleep_millisecs")
    old = {}
    for k in keys:
        with open(os.path.join(KSM, k)) as f:
            old[k] = f.read().strip()
    for k, v in (settings or {}).items():
        with open(os.path.join(KSM, k), "w") as f:
            f.write(str(v))
    return old


def p5(clone_d, cold_d, n: int, ksm: bool, settle_s: float = 20) -> dict:
    pods = {"clone": [], "cold": []}
    for i in range(n):
        for label, d in (("clone", clone_d), ("cold", cold_d)):
            pods[label].append(run_pod(d, f"p5-{label}-{i}")[0])
    time.sleep(settle_s)  # idle
    out = {"n": n, "pss_mib": {k: _pss_mib(d, pods[k]) for k, d in (("clone", clone_d), ("cold", cold_d))}}
    if ksm:
        old = _ksm({"pages_to_scan": 2000, "sleep_millisecs": 10, "run": 1})
        try:
            time.sleep(60)
            out["pss_mib_ksm"] = {k: _pss_mib(d, pods[k]) for k, d in (("clone", clone_d), ("cold", cold_d))}
        finally:
            _ksm({"run": 2})  # unmerge, then restore the operator's settings
            time.sleep(2)
            _ksm(old)
    for label, d in (("clone", clone_d), ("cold", cold_d)):
        for sid in pods[label]:
            remove_pod(d, sid)
    out["median_pss_mib"] = {k: statistics.median(v) for k, v in out["pss_mib"].items()}
    if "pss_mib_ksm" in out:
        out["median_pss_mib_ksm"] = {k: statistics.median(v) for k, v in out["pss_mib_ksm"].items()}
    log(f"P5: {out.get('median_pss_mib')} ksm {out.get('median_pss_mib_ksm')}")
    return out


def p6(clone_d, m: int, settle_s: float = 0) -> dict:
    avail0 = host_mem_available_kib()
    sids, took, t0 = [], [], time.monotonic()
    for i in range(m):
        try:
            sid, s = run_pod(clone_d, f"p6-{i}")
        except Exception as e:
            log(f"P6: pod {i} failed: {e}")
            break
        sids.append(sid)
        took.append(s)
        if s > 5:
            log(f"P6: pod {i} took {s:.1f}s")
        if i % 10 == 9:
            log(f"P6: {i + 1} pods up, MemAvailable {host_mem_available_kib() / 1048576:.1f} GiB")
    wall = time.monotonic() - t0
    time.sleep(10)
    ready = sum(1 for s in sids if verbose_info(clone_d, s)["vm"]["running"])
    t = time.monotonic()
    clone_d.runtime.Version(pb.VersionRequest())
    version_s = time.monotonic() - t
    pss = _pss_mib(clone_d, sids)
    out = {"asked": m, "started": len(sids), "running": ready, "wall_s": wall,
           "per_pod_median_s": statistics.median(took) if took else None,
           "pss_median_mib": statistics.median(pss) if pss else None, "pss_sum_mib": sum(pss),
           "mem_available_before_gib": avail0 / 1048576,
           "mem_available_after_gib": host_mem_available_kib() / 1048576,
           "version_rpc_s": version_s, "loadavg_1m": os.getloadavg()[0]}
    log(f"P6: {out}")
    if settle_s:  # the pods idle on (KSM merging, when on): the same figures again
        time.sleep(settle_s)
        pss = _pss_mib(clone_d, sids)
        t = time.monotonic()
        clone_d.runtime.Version(pb.VersionRequest())
        out["after_settle"] = {"settle_s": settle_s, "pss_median_mib": statistics.median(pss) if pss else None,
                               "pss_sum_mib": sum(pss), "version_rpc_s": time.monotonic() - t,
                               "mem_available_gib": host_mem_available_kib() / 1048576,
                               "loadavg_1m": os.getloadavg()[0]}
        log(f"P6 after {settle_s:.0f}s idle: {out['after_settle']}")
    for sid in sids:
        remove_pod(clone_d, sid)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--idle", type=int, default=10, help="P5 pods per kind (0: skip)")
    ap.add_argument("--density", type=int, default=0, help="P6 clones (0: skip)")
    ap.add_argument("--ksm", action="store_true", help="P5 also with KSM merging; P6 with KSM on")
    ap.add_argument("--settle", type=float, default=0,
                    help="P6: seconds the pods idle on before PSS is measured again")
    ap.add_argument("--skip-p1", action="store_true")
    ap.add_argument("--tb", type=int, default=64)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "templates.json"))
    a = ap.parse_args()
    result: dict = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with daemon(BASE + 'vm_template = true\nvm_template_build = "start"\n') as clone_d, \
            daemon(BASE + "vm_template = false\n") as cold_d:
        _wait_template(clone_d)
        if not a.skip_p1:
            result["p1"] = p1(clone_d, cold_d, a.runs, a.tb)
        if a.idle:
            result["p5"] = p5(clone_d, cold_d, a.idle, a.ksm)
        if a.density:
            old = _ksm({"pages_to_scan": 1000, "sleep_millisecs": 20, "run": 1}) if a.ksm else None
            try:
                result["p6"] = p6(clone_d, a.density, a.settle)
                result["p6"]["ksm"] = bool(a.ksm)
            finally:
                if old is not None:
                    _ksm({"run": 2})
                    time.sleep(2)
                    _ksm(old)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    log(f"wrote {a.out}")


if __name__ == "__main__":
    main()
