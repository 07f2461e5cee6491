"""P3 container start, P4 ExecSync round trip, P5 idle memory, in one ready sandbox.

Images come from a throwaway loopback docker-registry holding a busybox image built from
Debian's busybox package (the tests' fixture code).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import contextmanager

from cri_api.v1 import api_pb2 as pb

from bench.common import (daemon, log, pod_config, proc_mem_kib, remove_pod, run_pod, summary,
                          verbose_info)
from tests.support.fx_registry import (BASE_CONFIG, build_layer, busybox_rootfs, push_layout,
                                       set_layout_index, start_registry, stop_registry,
                                       write_oci_image)


def push_busybox(work: str):
    reg = start_registry(os.path.join(work, "registry"))
    layout = os.path.join(work, "layout")
    layer = build_layer([("tree", busybox_rootfs(os.path.join(work, "rootfs")))])
    set_layout_index(layout, "bb", [write_oci_image(layout, [layer], {**BASE_CONFIG, "User": "root"})])
    ref = f"{reg}/vmcri-bench/busybox:1.0"
    push_layout(layout, "bb", ref)
    return reg, ref


@contextmanager
def busybox_pod(config: str, image_dir: str, name: str):
    """A daemon with busybox pulled from a loopback registry and one ready pod (logs in a
    temp dir); yields (daemon, sandbox id, image ref, seconds to ready, log dir). Everything
    is removed afterwards."""
    work = tempfile.mkdtemp(prefix="vmcri-bench-pod-")
    reg, ref = push_busybox(work)
    try:
        with daemon(config + f'\ninsecure_registries = ["{reg}"]', image_dir) as d:
            d.image.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref)))
            logdir = os.path.join(work, "logs")
            os.makedirs(logdir)
            sid, ready = run_pod(d, name, logdir)
            try:
                yield d, sid, ref, ready, logdir
            finally:
                remove_pod(d, sid)
    finally:
        stop_registry(reg)
        shutil.rmtree(work, ignore_errors=True)


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


def _wait_running(rt, cid: str, timeout: float = 120) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = rt.ContainerStatus(pb.ContainerStatusRequest(container_id=cid)).status
        if st.state == pb.ContainerState.CONTAINER_RUNNING:
            return time.monotonic()
        if st.state == pb.ContainerState.CONTAINER_EXITED:
            raise RuntimeError(f"container exited: {st.reason} {st.message}")
        time.sleep(0.01)
    raise RuntimeError("container never reached RUNNING")


def measure(config: str, image_dir: str, containers: int = 3, execs: int = 30,
            idle_settle_s: float = 5.0) -> dict:
    out: dict = {"containers": containers, "execs": execs}
    try:
        with busybox_pod(config, image_dir, "p3") as (d, sid, ref, ready, logdir):
            out["sandbox_ready_s"] = ready
            # P5 first: the sandbox idle, no container yet
            time.sleep(idle_settle_s)
            info = verbose_info(d, sid)
            out["idle"] = {"qemu": proc_mem_kib(info["vm"]["qemuPid"]),
                           "daemon": proc_mem_kib(d.proc.pid),
                           "vm_memory_mib": info["vm"]["memoryMiB"]}
            out.update(_containers(d, sid, ref, containers, execs, logdir))
            out["idle"]["qemu_after_containers"] = proc_mem_kib(info["vm"]["qemuPid"])
    except Exception as e:  # containers are young: report what broke instead of no report
        out["error"] = f"{type(e).__name__}: {e}"
        log(f"P3/P4 not measurable: {out['error']}")
    return out


def _containers(d, sid: str, ref: str, n: int, execs: int, logdir: str) -> dict:
    rt = d.runtime
    sandbox_config = pod_config("p3")
    sandbox_config.log_directory = logdir
    create_s, start_s, running_s, cids = [], [], [], []
    try:
        for i in range(n):
            t0 = time.monotonic()
            cid = rt.CreateContainer(pb.CreateContainerRequest(
                pod_sandbox_id=sid, config=_ctr(f"c{i}", ref), sandbox_config=sandbox_config)).container_id
            cids.append(cid)
            t1 = time.monotonic()
            rt.StartContainer(pb.StartContainerRequest(container_id=cid))
            t2 = time.monotonic()
            t3 = _wait_running(rt, cid)
            create_s.append(t1 - t0)
            start_s.append(t2 - t1)
            running_s.append(t3 - t0)
            log(f"P3 container {i}: create {t1 - t0:.3f}s start {t2 - t1:.3f}s running {t3 - t0:.3f}s")
        rtts = []
        for _ in range(execs):
            t = time.perf_counter()
            r = rt.ExecSync(pb.ExecSyncRequest(container_id=cids[0], cmd=["true"], timeout=30))
            rtts.append((time.perf_counter() - t) * 1000)
            if r.exit_code != 0:
                raise RuntimeError(f"ExecSync true exited {r.exit_code}: {r.stderr!r}")
        mem = rt.ExecSync(pb.ExecSyncRequest(container_id=cids[0], cmd=["cat", "/proc/meminfo"],
                                             timeout=30))
        return {"create_s": summary(create_s), "start_s": summary(start_s),
                "create_start_running_s": summary(running_s),
                "first_container_s": running_s[0],
                "exec_true_ms": summary(rtts),
                "guest_meminfo_kib": _meminfo_kib(mem.stdout.decode(errors="replace"))}
    finally:
        for cid in cids:
            try:
                rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=1))
                rt.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))
            except Exception as e:  # best effort: the pod goes away next anyway
                log(f"container cleanup: {e}")
