"""`vmcri demo`: start a pod through CRI and show that it is a virtual machine."""
from __future__ import annotations

import html
import json
import os
import platform
import time

import grpc
from cri_api.v1 import api_pb2 as pb
from cri_api.v1 import api_pb2_grpc as pb_grpc


def _pod_config(name: str) -> pb.PodSandboxConfig:
    return pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, namespace="vmcri-demo", uid=f"demo-{name}-{os.getpid()}"),
        hostname=name, labels={"app": "vmcri-demo"},
        dns_config=pb.DNSConfig(servers=["10.96.0.10"], searches=["vmcri-demo.svc.cluster.local"]))


def main(cfg, socket: str, html_path: str, keep: bool = False) -> int:
    channel = grpc.insecure_channel(f"unix://{socket}")
    rt = pb_grpc.RuntimeServiceStub(channel)
    rows: list[tuple[str, str, str]] = []
    v = rt.Version(pb.VersionRequest())
    print(f"runtime: {v.runtime_name} {v.runtime_version} (CRI {v.runtime_api_version})")
    for c in rt.Status(pb.StatusRequest()).status.conditions:
        print(f"  {c.type}: {c.status} {c.reason} {c.message}")
    t0 = time.monotonic()
    sid = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=_pod_config("demo"))).pod_sandbox_id
    took = time.monotonic() - t0
    try:
        st = rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid, verbose=True))
        info = json.loads(st.info["info"])
        vm = info["vm"]
        rows += [
            ("pod sandbox id", sid[:13], ""),
            ("RunPodSandbox took", f"{took:.2f} s", "phases: " + ", ".join(
                f"{k} {v:.2f}s" for k, v in info["timings"].items())),
            ("libvirt domain", vm["domain"], f"virsh dominfo {vm['domain']}"),
            ("qemu process on the host", f"pid {vm['qemuPid']}", f"accel {vm['accel']}"),
            ("guest size", f"{vm['vcpus']} vCPU, {vm['memoryMiB']} MiB", "host: "
             f"{os.cpu_count()} CPUs, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') >> 20} MiB"),
            ("host kernel", platform.release(), ""),
            ("pod IP", st.status.network.ip or "(no pod network)", ""),
        ]
        width = max(len(r[0]) for r in rows)
        print()
        for k, val, note in rows:
            print(f"  {k:<{width}}  {val}  {note}".rstrip())
        with open(html_path, "w") as f:
            f.write("<!doctype html><title>vmcri demo</title><h1>A pod that is a VM</h1><table>")
            for r in rows:
                f.write("<tr>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in r) + "</tr>")
            f.write("</table>")
        print(f"\nHTML report: {os.path.abspath(html_path)}")
    finally:
        if not keep:
            rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid))
            rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid))
            print("demo pod removed")
    return 0
