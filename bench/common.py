"""Shared helpers for the benchmarks: daemons, pods, memory, console phases, statistics."""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from contextlib import contextmanager

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cri_api.v1 import api_pb2 as pb  # noqa: E402

from tests.support.fx_daemon import Daemon, dispose, make_daemon  # noqa: E402
from vmcri.agent import protocol  # noqa: E402

GUEST_CURRENT = "/var/lib/vmcri/guest/current"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@contextmanager
def daemon(extra_config: str = "", image_dir: str = GUEST_CURRENT):
    """A real `vmcri serve` (tests' fixture code) on one guest image; removed afterwards."""
    old = os.environ.get("VMCRI_TEST_GUEST_DIR")
    os.environ["VMCRI_TEST_GUEST_DIR"] = image_dir
    try:
        d = make_daemon(extra_config, prefix="vmcri-bench-")
    finally:
        if old is None:
            os.environ.pop("VMCRI_TEST_GUEST_DIR", None)
        else:
            os.environ["VMCRI_TEST_GUEST_DIR"] = old
    d.start()
    try:
        yield d
    finally:
        dispose(d)  # with a warm pool, its VMs too


def pod_config(name: str) -> pb.PodSandboxConfig:
    return pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, namespace="vmcri-bench", uid=f"uid-{name}",
                                       attempt=0),
        hostname=name, labels={"app": "bench"},
        dns_config=pb.DNSConfig(servers=["10.96.0.10"], searches=["svc.cluster.local"]))


def run_pod(d: Daemon, name: str, log_dir: str = "") -> tuple[str, float]:
    cfg = pod_config(name)
    if log_dir:
        cfg.log_directory = log_dir
    t = time.monotonic()
    sid = d.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg)).pod_sandbox_id
    return sid, time.monotonic() - t


def remove_pod(d: Daemon, sid: str) -> None:
    d.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid))
    d.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid))


def verbose_info(d: Daemon, sid: str) -> dict:
    st = d.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid, verbose=True))
    return json.loads(st.info["info"])


def console_phases(path: str) -> dict[str, float]:
    """VMCRI-PHASE name uptime lines of a guest console log (guest seconds since boot)."""
    out: dict[str, float] = {}
    try:
        with open(path, errors="replace") as f:
            for line in f:
                p = line.split()
                if len(p) == 3 and p[0] == protocol.PHASE_PREFIX:
                    try:
                        out[p[1]] = float(p[2])
                    except ValueError:
                        pass
    except OSError:
        pass
    return out


def proc_mem_kib(pid: int | None) -> dict[str, int]:
    """RSS (status) and PSS (smaps_rollup) of one process, KiB."""
    out: dict[str, int] = {}
    if not pid:
        return out
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "RssAnon:", "RssFile:")):
                    out[line.split(":")[0]] = int(line.split()[1])
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(("Pss:", "Pss_Anon:", "Pss_File:")):
                    out[line.split(":")[0]] = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return out


def cpu_s(pid: int | None) -> float | None:
    """utime + stime of one process, seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, TypeError):
        return None


def host_mem_available_kib() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))


def pctl(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


def summary(xs: list[float]) -> dict:
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"n": 0}
    return {"n": len(xs), "median": statistics.median(xs), "min": min(xs), "max": max(xs),
            "p95": pctl(xs, 95), "all": [round(x, 4) for x in xs]}
