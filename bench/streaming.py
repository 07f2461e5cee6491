"""P8 streaming into a real pod VM: `kubectl exec`-style exec round trip over SPDY/3.1
(Exec RPC + upgrade + `true` in the guest + exit status), exec stdout throughput, and
port-forward throughput out of the guest, with the tests' protocol clients
(tests/support/spdy_client.py, written from the protocol docs, not from our server).
"""
from __future__ import annotations

import time

from cri_api.v1 import api_pb2 as pb

from bench.common import log, pod_config, summary
from bench.containers import _wait_running, busybox_pod
from tests.support.spdy_client import PortForwardClient, exec_url, read_all

PAYLOAD_MIB = 16
PF_PORT = 8081


def measure(config: str, image_dir: str, execs: int = 20, runs: int = 3) -> dict:
    out: dict = {"execs": execs, "payload_mib": PAYLOAD_MIB}
    try:
        with busybox_pod(config, image_dir, "p8") as (d, sid, ref, _, _):
            out.update(_measure_in(d, sid, ref, execs, runs))
    except Exception as e:  # report what broke instead of no report
        out["error"] = f"{type(e).__name__}: {e}"
        log(f"P8 not measurable: {out['error']}")
    return out


def _measure_in(d, sid: str, ref: str, execs: int, runs: int) -> dict:
    rt = d.runtime
    serve = (f"while true; do head -c {PAYLOAD_MIB << 20} /dev/zero | nc -l -p {PF_PORT}; done")
    cid = rt.CreateContainer(pb.CreateContainerRequest(
        pod_sandbox_id=sid, sandbox_config=pod_config("p8"), config=pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name="srv"), image=pb.ImageSpec(image=ref),
            command=["/bin/sh", "-c", serve]))).container_id
    rt.StartContainer(pb.StartContainerRequest(container_id=cid))
    _wait_running(rt, cid)

    rtts = []
    for _ in range(execs):
        t = time.perf_counter()
        url = rt.Exec(pb.ExecRequest(container_id=cid, cmd=["true"], stdout=True, stderr=True)).url
        res = exec_url(url)
        rtts.append((time.perf_counter() - t) * 1000)
        if res.exit_code != 0:
            raise RuntimeError(f"exec true exited {res.exit_code}")
    log(f"P8 exec true over SPDY: p50 {summary(rtts)['median']:.0f} ms")

    exec_mbs, pf_mbs = [], []
    size = PAYLOAD_MIB << 20
    for _ in range(runs):
        url = rt.Exec(pb.ExecRequest(container_id=cid, cmd=["head", "-c", str(size), "/dev/zero"],
                                     stdout=True, stderr=True)).url
        t = time.perf_counter()
        res = exec_url(url, timeout=300)
        took = time.perf_counter() - t
        if len(res.stdout) != size:
            raise RuntimeError(f"exec stdout: {len(res.stdout)} of {size} bytes")
        exec_mbs.append(size / took / 1e6)

        url = rt.PortForward(pb.PortForwardRequest(pod_sandbox_id=sid, port=[PF_PORT])).url
        with PortForwardClient.connect(url) as pf:
            deadline = time.monotonic() + 60
            while True:
                # no half-close first: busybox nc quits on the peer's EOF
                t = time.perf_counter()
                data, _ = pf.open(PF_PORT)
                reply = read_all(data, timeout=300)
                took = time.perf_counter() - t
                if len(reply) == size or time.monotonic() > deadline:
                    break
                time.sleep(0.5)  # the nc loop restarts between connections
        if len(reply) != size:
            raise RuntimeError(f"port-forward: {len(reply)} of {size} bytes")
        pf_mbs.append(size / took / 1e6)
        log(f"P8 {PAYLOAD_MIB} MiB: exec stdout {exec_mbs[-1]:.1f} MB/s, port-forward {pf_mbs[-1]:.1f} MB/s")
    return {"exec_true_ms": summary(rtts), "exec_stdout_mb_s": summary(exec_mbs),
            "port_forward_mb_s": summary(pf_mbs)}


def markdown(p: dict) -> list[str]:
    if "error" in p:
        return ["## P8 streaming", "", f"not measurable: {p['error']}", ""]
    e, x, f = p["exec_true_ms"], p["exec_stdout_mb_s"], p["port_forward_mb_s"]
    return ["## P8 streaming into a pod VM (SPDY/3.1, the tests' clients)", "",
            f"| exec `true` round trip p50 / p95 (ms) | exec stdout, {p['payload_mib']} MiB (MB/s) | "
            f"port-forward out of the guest, {p['payload_mib']} MiB (MB/s) |",
            "|---|---|---|",
            f"| {e['median']:.0f} / {e['p95']:.0f} | {x['median']:.1f} ({x['min']:.1f}–{x['max']:.1f}) | "
            f"{f['median']:.1f} ({f['min']:.1f}–{f['max']:.1f}) |", ""]
