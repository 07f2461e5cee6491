"""P2: the warm pool, next to the cold path and the floor, in one interleaved run.

- P1 cold and P2 warm RunPodSandbox as ratios to the raw-QEMU floor (run by run);
- the pool hit rate when a burst of concurrent RunPodSandbox calls outnumbers the pool;
- host memory of an idle pool VM (qemu RSS and PSS);
- how long the pool takes to fill from empty and to refill one claimed VM.
"""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

from cri_api.v1 import api_pb2 as pb

from bench.common import daemon, log, proc_mem_kib, remove_pod, run_pod, summary, verbose_info
from bench.sandbox_ready import Variant, floor_once
from vmcri.sandbox.domain import parse_metadata

FILL_TIMEOUT_S = 1800


def pool_state(d) -> dict:
    return json.loads(d.runtime.Status(pb.StatusRequest(verbose=True)).info["pool"])


def wait_full(d, size: int, timeout: float = FILL_TIMEOUT_S) -> float:
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        if pool_state(d)["ready"] >= size:
            return time.monotonic() - t
        time.sleep(0.25)
    raise RuntimeError(f"pool did not fill to {size} in {timeout}s: {pool_state(d)}")


def pool_vm_memory(d) -> list[dict]:
    """qemu RSS/PSS of each idle pool VM of this daemon."""
    import libvirt
    conn = libvirt.open("qemu:///system")
    out = []
    try:
        for dom in conn.listAllDomains(0):
            try:
                meta = parse_metadata(dom.XMLDesc(0))
            except libvirt.libvirtError:
                continue
            if meta is None or meta.owner != d.root_dir or meta.role != "pool":
                continue
            try:
                with open(f"/run/libvirt/qemu/{dom.name()}.pid") as f:
                    out.append(proc_mem_kib(int(f.read().strip())))
            except (OSError, ValueError):
                pass
    finally:
        conn.close()
    return out


def _claim(d, name: str) -> dict:
    sid, took = run_pod(d, name)
    try:
        return {"s": took, "source": verbose_info(d, sid).get("source", "cold")}
    finally:
        remove_pod(d, sid)


def measure(after: Variant, runs: int = 3, size: int = 2, burst: int = 0) -> dict:
    burst = burst or size + 2
    cold_cfg = after.config()
    warm_cfg = cold_cfg + f"\npool_size = {size}\npool_max_concurrent_boots = 1\n"
    rows = []
    with daemon(cold_cfg, after.image_dir) as cold, daemon(warm_cfg, after.image_dir) as warm:
        fill_s = wait_full(warm, size)
        log(f"P2 pool of {size} filled from empty in {fill_s:.1f}s")
        idle = pool_vm_memory(warm)
        refill = []
        for i in range(runs):
            f = floor_once(after, 256)
            c = _claim(cold, f"p2-cold-{i}")
            wait_full(warm, size)
            w = _claim(warm, f"p2-warm-{i}")
            refill.append(wait_full(warm, size))
            rows.append({"floor_s": f["ready_s"], "cold_s": c["s"], "warm_s": w["s"], "warm_source": w["source"],
                         "refill_s": refill[-1]})
            log(f"P2 run {i}: floor {f['ready_s']:.2f}s cold {c['s']:.2f}s warm {w['s']:.2f}s "
                f"({w['source']}) refill {refill[-1]:.1f}s")
        with ThreadPoolExecutor(burst) as ex:
            got = list(ex.map(lambda n: _claim(warm, f"p2-burst-{n}"), range(burst)))
        hits = [g for g in got if g["source"] == "pool"]
        misses = [g for g in got if g["source"] != "pool"]
        log(f"P2 burst of {burst} on a pool of {size}: {len(hits)} hits")
        stats = pool_state(warm)
    floor = summary([r["floor_s"] for r in rows])["median"]
    return {
        "pool_size": size, "runs": rows, "fill_from_empty_s": fill_s,
        "refill_one_s": summary(refill),
        "floor_s": summary([r["floor_s"] for r in rows]),
        "cold_s": summary([r["cold_s"] for r in rows]),
        "warm_s": summary([r["warm_s"] for r in rows]),
        "cold_ratio_median": summary([r["cold_s"] for r in rows])["median"] / floor,
        "warm_ratio_median": summary([r["warm_s"] for r in rows])["median"] / floor,
        "warm_ratio_per_run": [r["warm_s"] / r["floor_s"] for r in rows],
        "burst": {"n": burst, "hits": len(hits), "hit_rate": len(hits) / burst,
                  "hit_s": summary([g["s"] for g in hits]), "miss_s": summary([g["s"] for g in misses])},
        "idle_vm_kib": {"rss": summary([m.get("VmRSS") for m in idle]),
                        "pss": summary([m.get("Pss") for m in idle])},
        "pool_stats": stats,
    }


def markdown(p: dict) -> list[str]:
    f, c, w = p["floor_s"]["median"], p["cold_s"]["median"], p["warm_s"]["median"]
    b = p["burst"]
    return [f"## P2 warm pool (pool of {p['pool_size']}, {len(p['runs'])} interleaved runs)", "",
            "| floor (s) | P1 cold (s) | P2 warm (s) | cold / floor | warm / floor |",
            "|---|---|---|---|---|",
            f"| {f:.2f} | {c:.2f} | {w:.3f} | {p['cold_ratio_median']:.2f} | {p['warm_ratio_median']:.3f} |", "",
            "| burst | pool hits | hit median (s) | miss median (s) | idle pool VM RSS / PSS (MiB) | fill from empty (s) | refill one (s) |",
            "|---|---|---|---|---|---|---|",
            f"| {b['n']} | {b['hits']} ({b['hit_rate']:.0%}) | {_f(b['hit_s'].get('median'))} | "
            f"{_f(b['miss_s'].get('median'))} | {_f(_mib(p['idle_vm_kib']['rss'].get('median')), '{:.0f}')} / "
            f"{_f(_mib(p['idle_vm_kib']['pss'].get('median')), '{:.0f}')} | {p['fill_from_empty_s']:.1f} | "
            f"{_f(p['refill_one_s'].get('median'), '{:.1f}')} |", ""]


def _mib(kib):
    return None if kib is None else kib / 1024


def _f(x, fmt: str = "{:.2f}") -> str:
    return "–" if x is None else fmt.format(x)
