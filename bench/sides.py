"""Runtimes side by side: one loopback registry with busybox (and a busybox "pause" for
containerd), then a ready pod per side — a vmcri pod VM (a real `vmcri serve`) and/or a
runc pod in a private containerd — all driven through the same CRI stubs, so every bench
step can be interleaved side by side.

containerd pods are hostNetwork (NamespaceOption network=NODE): no CNI needed, and vmcri's
bench pods have no CNI either (no NIC; port-forward reaches the guest's loopback).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from cri_api.v1 import api_pb2 as pb

from bench import containerd
from bench.common import daemon, log, pod_config, remove_pod
from tests.support.fx_registry import (BASE_CONFIG, build_layer, busybox_rootfs, push_layout,
                                       set_layout_index, start_registry, stop_registry,
                                       write_oci_image)


@dataclass
class Side:
    label: str                      # column name: "after", "before", "containerd"
    kind: str                       # "vmcri" or "containerd"
    rt: Any                         # RuntimeServiceStub
    sid: str
    sandbox_config: pb.PodSandboxConfig
    ref: str                        # busybox image
    logdir: str
    ready_s: float
    backend: Any                    # tests' Daemon or containerd.Containerd
    work: str                       # a host scratch dir of this side (volumes)


@dataclass
class Registry:
    addr: str
    ref: str
    pause_ref: str


@contextmanager
def busybox_registry(work: str):
    """A loopback docker-registry with busybox:1.0 (root) and pause:1.0 (sleep forever)."""
    reg = start_registry(os.path.join(work, "registry"))
    try:
        layout = os.path.join(work, "layout")
        layer = build_layer([("tree", busybox_rootfs(os.path.join(work, "rootfs")))])
        set_layout_index(layout, "bb", [write_oci_image(layout, [layer], {**BASE_CONFIG, "User": "root"})])
        pause = {**BASE_CONFIG, "User": "root", "WorkingDir": "/", "Volumes": {},
                 "Entrypoint": ["/bin/sleep"], "Cmd": ["2147483647"]}
        set_layout_index(layout, "pause", [write_oci_image(layout, [layer], pause)])
        out = Registry(reg, f"{reg}/vmcri-bench/busybox:1.0", f"{reg}/vmcri-bench/pause:1.0")
        push_layout(layout, "bb", out.ref)
        push_layout(layout, "pause", out.pause_ref)
        yield out
    finally:
        stop_registry(reg)


def _sandbox_config(name: str, logdir: str, host_network: bool) -> pb.PodSandboxConfig:
    cfg = pod_config(name)
    cfg.log_directory = logdir
    if host_network:  # the host's UTS namespace too: runc refuses to set a hostname there
        cfg.linux.security_context.namespace_options.network = pb.NamespaceMode.NODE
        cfg.hostname = ""
    return cfg


def _run_side(label: str, kind: str, backend, reg: Registry, name: str, work: str):
    """Pull busybox, run one pod; returns the Side (the caller removes the pod)."""
    backend.image.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=reg.ref)))
    logdir = os.path.join(work, "logs")
    os.makedirs(logdir, exist_ok=True)
    cfg = _sandbox_config(f"{name}-{label}", logdir, host_network=kind == "containerd")
    t = time.monotonic()
    sid = backend.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg)).pod_sandbox_id
    ready = time.monotonic() - t
    log(f"{label}: pod {sid[:12]} ready in {ready:.2f}s")
    return Side(label, kind, backend.runtime, sid, cfg, reg.ref, logdir, ready, backend, work)


@contextmanager
def vmcri_side(label: str, config: str, image_dir: str, reg: Registry, name: str, work: str):
    with daemon(config + f'\ninsecure_registries = ["{reg.addr}"]', image_dir) as d:
        side = _run_side(label, "vmcri", d, reg, name, work)
        try:
            yield side
        finally:
            remove_pod(d, side.sid)


@contextmanager
def containerd_side(reg: Registry, name: str, work: str):
    with containerd.running(reg.addr, reg.pause_ref) as c:
        side = _run_side("containerd", "containerd", c, reg, name, work)
        try:
            yield side
        finally:
            _remove_all(c)


def _remove_all(c) -> None:
    """Every pod of our containerd, so its shims exit before containerd is stopped."""
    for s in c.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items:
        try:
            c.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=s.id))
            c.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=s.id))
        except Exception as e:  # best effort: _stop kills leftover shims of our socket
            log(f"containerd pod cleanup: {e}")


@contextmanager
def sides(name: str, vmcri: list[tuple[str, str, str]], with_containerd: bool):
    """Ready pods side by side: `vmcri` is [(label, daemon config, guest image dir)];
    yields [Side] in that order, containerd last. Everything is removed afterwards."""
    work = tempfile.mkdtemp(prefix=f"vmcri-bench-{name}-")
    try:
        with ExitStack() as stack:
            reg = stack.enter_context(busybox_registry(work))
            out = []
            for label, config, image_dir in vmcri:
                w = os.path.join(work, label)
                os.makedirs(w)
                out.append(stack.enter_context(vmcri_side(label, config, image_dir, reg, name, w)))
            if with_containerd:
                w = os.path.join(work, "containerd")
                os.makedirs(w)
                out.append(stack.enter_context(containerd_side(reg, name, w)))
            yield out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def wait_running(rt, cid: str, timeout: float = 120) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = rt.ContainerStatus(pb.ContainerStatusRequest(container_id=cid)).status
        if st.state == pb.ContainerState.CONTAINER_RUNNING:
            return time.monotonic()
        if st.state == pb.ContainerState.CONTAINER_EXITED:
            raise RuntimeError(f"container exited: {st.reason} {st.message}")
        time.sleep(0.01)
    raise RuntimeError("container never reached RUNNING")


def start_container(side: Side, config: pb.ContainerConfig) -> str:
    """Create + start + wait RUNNING; returns the container id."""
    cid = side.rt.CreateContainer(pb.CreateContainerRequest(
        pod_sandbox_id=side.sid, config=config, sandbox_config=side.sandbox_config)).container_id
    side.rt.StartContainer(pb.StartContainerRequest(container_id=cid))
    wait_running(side.rt, cid)
    return cid


def remove_container(side: Side, cid: str) -> None:
    try:
        side.rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=1))
        side.rt.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))
    except Exception as e:  # best effort: the pod goes away next anyway
        log(f"{side.label}: container cleanup: {e}")


def ratio(a, b):
    return a / b if a is not None and b else None
