"""P3 container start, P4 ExecSync round trip, P5 idle memory, in ready sandboxes side by
side (bench/sides.py): vmcri pod VMs and, when installed, a runc pod in a private
containerd, each step interleaved over the sides.

Images come from a throwaway loopback docker-registry holding a busybox image built from
Debian's busybox package (the tests' fixture code).
"""
from __future__ import annotations

import re
import time

from cri_api.v1 import api_pb2 as pb

from bench.common import log, proc_mem_kib, summary, verbose_info
from bench.sides import Side, remove_container, sides, wait_running

# kept for older callers: the helpers moved to bench.sides
_wait_running = wait_running


def _ctr(name: str, ref: str) -> pb.ContainerConfig:
    return pb.ContainerConfig(metadata=pb.ContainerMetadata(name=name), image=pb.ImageSpec(image=ref),
                              command=["/bin/sh", "-c"], args=["exec sleep 100000"],
                              log_path=f"{name}.log")


def _meminfo_kib(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        k, _, v = line.partition(":")
        if k in ("MemTotal", "MemFree", "MemAvailable", "Cached", "Shmem") and v.split():
            out[k] = int(v.split()[0])
    return out


def measure(vmcri: list[tuple[str, str, str]], with_containerd: bool, containers: int = 3,
            execs: int = 30, idle_settle_s: float = 5.0) -> dict[str, dict]:
    """`vmcri` is [(label, daemon config, guest image dir)]; returns {label: results}."""
    labels = [v[0] for v in vmcri] + (["containerd"] if with_containerd else [])
    out: dict[str, dict] = {lb: {"containers": containers, "execs": execs} for lb in labels}
    try:
        with sides("p3", vmcri, with_containerd) as ss:
            for s in ss:
                out[s.label]["sandbox_ready_s"] = s.ready_s
            time.sleep(idle_settle_s)  # P5 first: the sandboxes idle, no container yet
            for s in ss:
                out[s.label]["idle"] = _idle_memory(s)
            for label, r in _containers(ss, containers, execs).items():
                out[label].update(r)
            for s in ss:
                if s.kind == "vmcri":
                    out[s.label]["idle"]["qemu_after_containers"] = proc_mem_kib(
                        verbose_info(s.backend, s.sid)["vm"]["qemuPid"])
    except Exception as e:  # report what broke instead of no report
        for lb in labels:
            out[lb].setdefault("error", f"{type(e).__name__}: {e}")
        log(f"P3/P4 not measurable: {type(e).__name__}: {e}")
    return out


def _idle_memory(s: Side) -> dict:
    if s.kind != "vmcri":
        return {"daemon": proc_mem_kib(s.backend.proc.pid)}
    info = verbose_info(s.backend, s.sid)
    return {"qemu": proc_mem_kib(info["vm"]["qemuPid"]), "daemon": proc_mem_kib(s.backend.proc.pid),
            "vm_memory_mib": info["vm"]["memoryMiB"]}


_PHASES_RE = re.compile(r"CreateContainer ([0-9a-f]{12}) phases \(s\): (.*); in the guest: (.*)$")


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def create_phases(daemon_log: str, cids: list[str]) -> list[dict[str, float]]:
    """Per container (in `cids` order), the seconds of each CreateContainer step the daemon
    logged: host steps as they are named, guest steps prefixed `guest.`."""
    found: dict[str, dict[str, float]] = {}
    for line in daemon_log.splitlines():
        m = _PHASES_RE.search(line)
        if m:
            steps = {k: float(v) for k, v in (kv.split("=") for kv in m.group(2).split())}
            steps.update({f"guest.{k}": float(v) for k, v in (kv.split("=") for kv in m.group(3).split())})
            found[m.group(1)] = steps
    return [found.get(cid[:12], {}) for cid in cids]


def _containers(ss: list[Side], n: int, execs: int) -> dict[str, dict]:
    """P3 then P4, each step interleaved over the sides."""
    t: dict[str, dict[str, list]] = {s.label: {"create": [], "start": [], "running": [], "exec": []}
                                     for s in ss}
    cids: dict[str, list[str]] = {s.label: [] for s in ss}
    try:
        for i in range(n):
            for s in ss:
                t0 = time.monotonic()
                cid = s.rt.CreateContainer(pb.CreateContainerRequest(
                    pod_sandbox_id=s.sid, config=_ctr(f"c{i}", s.ref),
                    sandbox_config=s.sandbox_config)).container_id
                cids[s.label].append(cid)
                t1 = time.monotonic()
                s.rt.StartContainer(pb.StartContainerRequest(container_id=cid))
                t2 = time.monotonic()
                t3 = wait_running(s.rt, cid)
                for k, v in (("create", t1 - t0), ("start", t2 - t1), ("running", t3 - t0)):
                    t[s.label][k].append(v)
                log(f"P3 {s.label} container {i}: create {t1 - t0:.3f}s start {t2 - t1:.3f}s "
                    f"running {t3 - t0:.3f}s")
        for _ in range(execs):
            for s in ss:
                t0 = time.perf_counter()
                r = s.rt.ExecSync(pb.ExecSyncRequest(container_id=cids[s.label][0], cmd=["true"], timeout=30))
                t[s.label]["exec"].append((time.perf_counter() - t0) * 1000)
                if r.exit_code != 0:
                    raise RuntimeError(f"{s.label}: ExecSync true exited {r.exit_code}: {r.stderr!r}")
        out = {}
        for s in ss:
            x = t[s.label]
            out[s.label] = {"create_s": summary(x["create"]), "start_s": summary(x["start"]),
                            "create_start_running_s": summary(x["running"]),
                            "first_container_s": x["running"][0],
                            "exec_true_ms": summary(x["exec"])}
            if s.kind == "vmcri":  # runc's would be the host's
                mem = s.rt.ExecSync(pb.ExecSyncRequest(container_id=cids[s.label][0],
                                                       cmd=["cat", "/proc/meminfo"], timeout=30))
                out[s.label]["guest_meminfo_kib"] = _meminfo_kib(mem.stdout.decode(errors="replace"))
            if s.kind == "vmcri":
                out[s.label]["create_phases_s"] = create_phases(_read(s.backend.log_path), cids[s.label])
                log(f"P3 {s.label} CreateContainer phases: {out[s.label]['create_phases_s']}")
            log(f"P4 {s.label}: ExecSync true p50 {out[s.label]['exec_true_ms']['median']:.1f} ms")
        return out
    finally:
        for s in ss:
            for cid in cids[s.label]:
                remove_container(s, cid)
