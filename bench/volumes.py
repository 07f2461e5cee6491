"""P9 volume and rootfs I/O in a running busybox container, side by side (bench/sides.py):
a vmcri pod VM and a runc pod in a private containerd, interleaved round by round.

Every operation is one ExecSync, timed from the host (so each includes one ExecSync round
trip: see `exec_true_s`), in three places: the container rootfs, an emptyDir-like volume
(a host dir under pods/<uid>/volumes/kubernetes.io~empty-dir/, as the kubelet gives one) at
/vol-empty, and a hostPath volume at /vol-host. Medians of `rounds` rounds.
The sequential read follows the write at once: caches cannot be dropped from inside a
container, so it reads what the write left in the page cache (the guest's, for vmcri).
"""
from __future__ import annotations

import os
import time

from cri_api.v1 import api_pb2 as pb

from bench.common import log, summary
from bench.sides import Side, ratio, remove_container, sides, start_container

BIG_MIB = 64
SMALL_FILES = 5000
TREE = (10, 10, 20)   # dirs x subdirs x files: 2000 files, 111 dirs with the top
PLACES = {"rootfs": "/root/p9", "emptyDir": "/vol-empty/p9", "hostPath": "/vol-host/p9"}
LOOP = f"i=0; while [ $i -lt {SMALL_FILES} ]; do"


def ops(d: str) -> list[tuple[str, str, str]]:
    """(name, shell script, expected stdout or '') in run order; each is one ExecSync."""
    a, b, c = TREE
    tree = (f"mkdir -p {d}/t && cd {d}/t && for x in $(seq {a}); do for y in $(seq {b}); do "
            f"mkdir -p $x/$y; for z in $(seq {c}); do echo t > $x/$y/$z; done; done; done")
    return [
        ("write", f"mkdir -p {d} && dd if=/dev/zero of={d}/big bs=1M count={BIG_MIB} conv=fsync 2>/dev/null", ""),
        ("read", f"dd if={d}/big of=/dev/null bs=1M 2>/dev/null", ""),
        ("rm_big", f"rm {d}/big", ""),
        ("create", f"mkdir -p {d}/s && cd {d}/s && {LOOP} echo hello > f$i; i=$((i+1)); done", ""),
        ("find_count", f"find {d}/s -type f | wc -l", str(SMALL_FILES)),
        ("ls_l", f"ls -l {d}/s | wc -l", str(SMALL_FILES + 1)),
        ("delete", f"rm -rf {d}/s", ""),
        ("tree_make", tree, ""),
        ("find_tree", f"find {d}/t | wc -l", str(1 + a + a * b + a * b * c)),
        ("rm_tree", f"rm -rf {d}/t", ""),
    ]


def _host_dirs(side: Side) -> tuple[str, str]:
    uid = side.sandbox_config.metadata.uid
    empty = os.path.join(side.work, "kubelet/pods", uid, "volumes/kubernetes.io~empty-dir/scratch")
    host = os.path.join(side.work, "hostpath")
    for d in (empty, host):
        os.makedirs(d, exist_ok=True)
    return empty, host


def _container(side: Side) -> str:
    empty, host = _host_dirs(side)
    return start_container(side, pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name="p9"), image=pb.ImageSpec(image=side.ref),
        command=["/bin/sh", "-c"], args=["exec sleep 100000"], log_path="p9.log",
        mounts=[pb.Mount(container_path="/vol-empty", host_path=empty),
                pb.Mount(container_path="/vol-host", host_path=host)]))


def _exec(side: Side, cid: str, script: str, expect: str = "", timeout: int = 900) -> float:
    t = time.perf_counter()
    r = side.rt.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["/bin/sh", "-c", script],
                                            timeout=timeout))
    took = time.perf_counter() - t
    out = r.stdout.decode(errors="replace").strip()
    if r.exit_code != 0 or (expect and out != expect):
        raise RuntimeError(f"{side.label}: `{script[:60]}` exited {r.exit_code}, stdout {out[:80]!r}, "
                           f"stderr {r.stderr.decode(errors='replace')[:200]!r}")
    return took


def measure(vmcri: list[tuple[str, str, str]], with_containerd: bool, rounds: int = 3) -> dict:
    labels = [v[0] for v in vmcri] + (["containerd"] if with_containerd else [])
    out: dict = {"rounds": rounds, "big_mib": BIG_MIB, "small_files": SMALL_FILES,
                 "tree": list(TREE), "places": PLACES, "sides": {lb: {} for lb in labels}}
    try:
        with sides("p9", vmcri, with_containerd) as ss:
            _measure_in(ss, rounds, out["sides"])
    except Exception as e:  # report what broke (and what was measured) instead of no report
        out["error"] = f"{type(e).__name__}: {e}"
        log(f"P9 not measurable: {out['error']}")
    return out


def _measure_in(ss: list[Side], rounds: int, res: dict) -> None:
    cids = {}
    try:
        for s in ss:
            cids[s.label] = _container(s)
        raw = {s.label: {p: {} for p in PLACES} for s in ss}
        base = {s.label: {"exec_true": [], "sh_loop": []} for s in ss}
        for rnd in range(rounds):
            for place, d in PLACES.items():
                for s in ss:
                    for name, script, expect in ops(d):
                        raw[s.label][place].setdefault(name, []).append(_exec(s, cids[s.label], script, expect))
                    log(f"P9 {s.label} round {rnd} {place}: " + ", ".join(
                        f"{k} {v[-1]:.2f}s" for k, v in raw[s.label][place].items()))
            for s in ss:  # what every op pays besides the file system
                base[s.label]["exec_true"].append(_exec(s, cids[s.label], "true"))
                base[s.label]["sh_loop"].append(_exec(s, cids[s.label], f"{LOOP} : ; i=$((i+1)); done"))
        for s in ss:
            res[s.label] = {"exec_true_s": summary(base[s.label]["exec_true"]),
                            "sh_loop_s": summary(base[s.label]["sh_loop"]),
                            "places": {p: {k: summary(v) for k, v in ops_.items()}
                                       for p, ops_ in raw[s.label].items()}}
    finally:
        for s in ss:
            if s.label in cids:
                remove_container(s, cids[s.label])


ROWS = [("write", f"sequential write {BIG_MIB} MiB, dd conv=fsync", True),
        ("read", f"sequential read {BIG_MIB} MiB (page cache warm)", True),
        ("create", f"create {SMALL_FILES} small files (sh loop)", False),
        ("find_count", f"`find -type f` piped to `wc -l` ({SMALL_FILES})", False),
        ("ls_l", f"ls -l ({SMALL_FILES} stats)", False),
        ("delete", f"rm -rf {SMALL_FILES} files", False),
        ("tree_make", "make a tree: {}×{}×{} files".format(*TREE), False),
        ("find_tree", "find over the tree", False)]


def markdown(p: dict) -> list[str]:
    L = ["## P9 rootfs and volume I/O in a container (ExecSync per op, timed from the host)", ""]
    if "error" in p:
        L += [f"error: {p['error']}", ""]
    sd = {k: v for k, v in p.get("sides", {}).items() if v}
    if not sd:
        return L
    labels = list(sd)
    base = "containerd" if "containerd" in sd and len(labels) > 1 else None
    vm = [lb for lb in labels if lb != "containerd"]
    head = "| place | operation | " + " | ".join(f"{lb} s (MiB/s)" for lb in labels)
    head += "".join(f" | {lb} / runc" for lb in vm) if base else ""
    L += [head + " |", "|---|---|" + "---|" * (len(labels) + (len(vm) if base else 0))]
    for place in PLACES:
        for key, name, mbs in ROWS:
            med = {lb: sd[lb]["places"][place].get(key, {}).get("median") for lb in labels}
            cells = [("–" if med[lb] is None else f"{med[lb]:.2f}" +
                      (f" ({p['big_mib'] / med[lb]:.0f})" if mbs and med[lb] else "")) for lb in labels]
            if base:
                cells += [_fmt(ratio(med[lb], med[base])) for lb in vm]
            L.append(f"| {place} | {name} | " + " | ".join(cells) + " |")
    for key, name in (("exec_true_s", "ExecSync `true` (in every op)"),
                      ("sh_loop_s", f"sh loop of {SMALL_FILES}, no I/O (in create)")):
        med = {lb: sd[lb][key]["median"] for lb in labels}
        cells = [f"{med[lb]:.2f}" for lb in labels] + ([_fmt(ratio(med[lb], med[base])) for lb in vm] if base else [])
        L.append(f"| – | {name} | " + " | ".join(cells) + " |")
    return L + ["", f"Medians of {p['rounds']} rounds; ratios of seconds, >1 is slower than runc. "
                "The read is not cold: caches cannot be dropped from a container.", ""]


def _fmt(x):
    return "–" if x is None else f"{x:.2f}"
