"""P6 density: N idle pods started one after another, then N at once; successes, time, memory.

Host memory is MemAvailable before minus with all N pods up, plus the sum of the qemu
processes' PSS (shared page cache, e.g. the mmapped kernel, counted once across VMs).
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from bench.common import (daemon, host_mem_available_kib, log, proc_mem_kib, remove_pod,
                          run_pod, summary, verbose_info)


def _memory(d, sids: list[str]) -> dict:
    pss = rss = 0
    for sid in sids:
        try:
            m = proc_mem_kib(verbose_info(d, sid)["vm"]["qemuPid"])
        except Exception:
            continue
        pss += m.get("Pss", 0)
        rss += m.get("VmRSS", 0)
    return {"qemu_pss_sum_kib": pss, "qemu_rss_sum_kib": rss,
            "daemon": proc_mem_kib(d.proc.pid)}


def _one(d, name: str) -> tuple[str | None, float, str]:
    t = time.monotonic()
    try:
        sid, took = run_pod(d, name)
        return sid, took, ""
    except Exception as e:
        details = e.details() if hasattr(e, "details") else str(e)
        return None, time.monotonic() - t, f"{type(e).__name__}: {details}"[:300]


def _teardown(d, sids: list[str]) -> None:
    with ThreadPoolExecutor(4) as ex:
        list(ex.map(lambda s: remove_pod(d, s), sids))


def trial(d, n: int, concurrent: bool, tag: str) -> dict:
    avail0 = host_mem_available_kib()
    t0 = time.monotonic()
    if concurrent:
        with ThreadPoolExecutor(n) as ex:
            results = list(ex.map(lambda i: _one(d, f"{tag}-{i}"), range(n)))
    else:
        results = [_one(d, f"{tag}-{i}") for i in range(n)]
    wall = time.monotonic() - t0
    sids = [r[0] for r in results if r[0]]
    time.sleep(2)  # let the last boots settle to idle before reading memory
    mem = _memory(d, sids)
    mem["host_used_kib"] = avail0 - host_mem_available_kib()
    errors = sorted({r[2] for r in results if r[2]})
    _teardown(d, sids)
    row = {"n": n, "mode": "concurrent" if concurrent else "sequential", "ok": len(sids),
           "failed": n - len(sids), "wall_s": wall,
           "per_pod_s": summary([r[1] for r in results if r[0]]), "errors": errors[:5], **mem}
    log(f"P6 {row['mode']} N={n}: {row['ok']}/{n} ok in {wall:.1f}s, "
        f"qemu PSS sum {mem['qemu_pss_sum_kib'] / 1024:.0f} MiB, host used {mem['host_used_kib'] / 1024:.0f} MiB"
        + (f", errors {errors[:2]}" if errors else ""))
    return row


def measure(config: str, image_dir: str, sizes=(5, 10, 20), seq_sizes=None, rows=None,
            on_row=lambda: None) -> list[dict]:
    """seq_sizes: the N run sequentially (default: all of sizes); every N runs concurrently.
    Rows are appended to `rows` as they finish and on_row() is called, so partial results survive."""
    seq = sizes if seq_sizes is None else seq_sizes
    rows = [] if rows is None else rows
    with daemon(config, image_dir) as d:
        for n in sorted(set(sizes) | set(seq)):
            for concurrent in (False, True):
                if (n in seq) if not concurrent else (n in sizes):
                    rows.append(trial(d, n, concurrent, f"p6-{n}-{'c' if concurrent else 's'}"))
                    on_row()
    return rows
