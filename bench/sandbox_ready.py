"""P1: RunPodSandbox until it returns with the agent answering, next to the floor.

The floor is a raw qemu-system-x86_64 boot (no libvirt, no daemon) of the same kernel,
initramfs and erofs root with the same TCG translation cache, until the agent answers its
first ping (bench/boot_floor.py). Variants (e.g. the old and the new image/config) and the
floor are interleaved run by run, so host noise hits them alike.
"""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

from bench import boot_floor
from bench.common import console_phases, cpu_s, daemon, log, remove_pod, run_pod, summary, verbose_info
from vmcri import guestimage
from vmcri.config import Config


@dataclass
class Variant:
    label: str
    image_dir: str
    tb_mib: int = 32
    extra_config: str = ""  # daemon TOML lines (tcg_tb_cache_mib is added from tb_mib)

    def config(self) -> str:
        return f"cni_conf_dir = \"\"\ntcg_tb_cache_mib = {self.tb_mib}\nagent_timeout_s = 300\n{self.extra_config}"


def floor_once(v: Variant, memory: int) -> dict:
    img = guestimage.locate(Config(guest_image_dir=v.image_dir))
    if img is None:
        raise SystemExit(f"no guest image in {v.image_dir}")
    r = boot_floor.one_run("raw", img, memory, 0, tb_mib=v.tb_mib)
    return {"ready_s": r["ping_s"], "qemu_cpu_s": r.get("qemu_cpu_s"), "marker_s": r["marker_s"], "guest_phases": r["phases"],
            "qemu_rss_kib": r["qemu_rss_kib"]}


def sandbox_once(d, name: str) -> dict:
    cpu0 = cpu_s(d.proc.pid)
    sid, took = run_pod(d, name)
    cpu1 = cpu_s(d.proc.pid)
    try:
        info = verbose_info(d, sid)
        return {"ready_s": took, "daemon_cpu_s": cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None,
                "qemu_cpu_s": cpu_s(info["vm"]["qemuPid"]), "host_phases": info.get("timings") or {},
                "guest_phases": console_phases(info["consoleLog"]),
                "qemu_rss_kib": info.get("vmCost", {}).get("qemuVmRSSKiB"),
                "memory_mib": info["vm"].get("memoryMiB")}
    finally:
        remove_pod(d, sid)


def _phase_medians(rows: list[dict], key: str) -> dict:
    names: list[str] = []
    for r in rows:
        names += [n for n in r.get(key, {}) if n not in names]
    return {n: summary([r[key][n] for r in rows if n in r.get(key, {})])["median"] for n in names}


def measure(variants: list[Variant], runs: int = 3, memory: int = 256) -> dict:
    out = {v.label: {"image_dir": v.image_dir, "tb_mib": v.tb_mib, "floor": [], "sandbox": []}
           for v in variants}
    with ExitStack() as stack:
        daemons = {v.label: stack.enter_context(daemon(v.config(), v.image_dir)) for v in variants}
        for i in range(runs):
            for v in variants:
                f = floor_once(v, memory)
                out[v.label]["floor"].append(f)
                s = sandbox_once(daemons[v.label], f"p1-{i}")
                out[v.label]["sandbox"].append(s)
                log(f"P1 run {i} {v.label}: floor {f['ready_s']:.2f}s sandbox {s['ready_s']:.2f}s "
                    f"host {s['host_phases']}")
    for label, r in out.items():
        fl = summary([x["ready_s"] for x in r["floor"]])
        sb = summary([x["ready_s"] for x in r["sandbox"]])
        r["floor_s"], r["sandbox_s"] = fl, sb
        r["ratio_median"] = sb["median"] / fl["median"]
        r["ratio_per_run"] = [s["ready_s"] / f["ready_s"] for s, f in zip(r["sandbox"], r["floor"])]
        r["host_phases_median"] = _phase_medians(r["sandbox"], "host_phases")
        r["guest_phases_median"] = _phase_medians(r["sandbox"], "guest_phases")
        r["floor_guest_phases_median"] = _phase_medians(r["floor"], "guest_phases")
        r["daemon_cpu_s_median"] = summary([x["daemon_cpu_s"] for x in r["sandbox"]]).get("median")
        r["qemu_cpu_s_median"] = summary([x["qemu_cpu_s"] for x in r["sandbox"]]).get("median")
        r["floor_qemu_cpu_s_median"] = summary([x["qemu_cpu_s"] for x in r["floor"]]).get("median")
        r["qemu_rss_kib_median"] = summary([x["qemu_rss_kib"] for x in r["sandbox"]]).get("median")
        r["floor_qemu_rss_kib_median"] = summary([x["qemu_rss_kib"] for x in r["floor"]]).get("median")
    return out
