"""P8 streaming: `kubectl exec`-style exec round trip over SPDY/3.1 (Exec RPC + upgrade +
`true` + exit status), exec stdout throughput, and port-forward throughput out of the pod,
with the tests' protocol clients (tests/support/spdy_client.py, written from the protocol
docs, not from our server). Side by side (bench/sides.py): a vmcri pod VM and, when
installed, a runc pod in a private containerd (whose streaming server is containerd's own),
interleaved run by run.
"""
from __future__ import annotations

import time

from cri_api.v1 import api_pb2 as pb

from bench.common import log, summary
from bench.sides import Side, ratio, remove_container, sides, start_container
from tests.support.fx_registry import free_port
from tests.support.spdy_client import PortForwardClient, exec_url, read_all

PAYLOAD_MIB = 16
PF_PORT = 8081  # in the guest; a hostNetwork runc pod listens on a free host port instead


def measure(vmcri: list[tuple[str, str, str]], with_containerd: bool, execs: int = 20,
            runs: int = 3) -> dict:
    """vmcri's numbers at the top level (as before), containerd's under "containerd"."""
    labels = [v[0] for v in vmcri] + (["containerd"] if with_containerd else [])
    res: dict[str, dict] = {lb: {"execs": execs, "payload_mib": PAYLOAD_MIB} for lb in labels}
    try:
        with sides("p8", vmcri, with_containerd) as ss:
            for label, r in _measure_in(ss, execs, runs).items():
                res[label].update(r)
    except Exception as e:  # report what broke instead of no report
        for r in res.values():
            r.setdefault("error", f"{type(e).__name__}: {e}")
        log(f"P8 not measurable: {type(e).__name__}: {e}")
    out = res[labels[0]]
    if with_containerd and labels[0] != "containerd":
        out["containerd"] = res["containerd"]
    return out


def _serve(side: Side) -> tuple[str, int]:
    port = free_port() if side.kind == "containerd" else PF_PORT
    serve = f"while true; do head -c {PAYLOAD_MIB << 20} /dev/zero | nc -l -p {port}; done"
    cid = start_container(side, pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name="srv"), image=pb.ImageSpec(image=side.ref),
        command=["/bin/sh", "-c", serve], log_path="srv.log"))
    return cid, port


def _measure_in(ss: list[Side], execs: int, runs: int) -> dict[str, dict]:
    srv = {s.label: _serve(s) for s in ss}
    try:
        rtts: dict[str, list] = {s.label: [] for s in ss}
        for _ in range(execs):
            for s in ss:
                t = time.perf_counter()
                url = s.rt.Exec(pb.ExecRequest(container_id=srv[s.label][0], cmd=["true"],
                                               stdout=True, stderr=True)).url
                res = exec_url(url)
                rtts[s.label].append((time.perf_counter() - t) * 1000)
                if res.exit_code != 0:
                    raise RuntimeError(f"{s.label}: exec true exited {res.exit_code}")
        for s in ss:
            log(f"P8 {s.label} exec true over SPDY: p50 {summary(rtts[s.label])['median']:.0f} ms")
        exec_mbs: dict[str, list] = {s.label: [] for s in ss}
        short: dict[str, list] = {s.label: [] for s in ss}
        pf_mbs: dict[str, list] = {s.label: [] for s in ss}
        for _ in range(runs):
            for s in ss:
                cid, port = srv[s.label]
                exec_mbs[s.label].append(_exec_throughput(s, cid, short[s.label]))
                pf_mbs[s.label].append(_pf_throughput(s, port))
                log(f"P8 {s.label} {PAYLOAD_MIB} MiB: exec stdout {exec_mbs[s.label][-1]:.1f} MB/s, "
                    f"port-forward {pf_mbs[s.label][-1]:.1f} MB/s")
        return {s.label: {"exec_true_ms": summary(rtts[s.label]),
                          "exec_stdout_mb_s": summary(exec_mbs[s.label]),
                          "port_forward_mb_s": summary(pf_mbs[s.label]),
                          "exec_stdout_short": short[s.label]} for s in ss}
    finally:
        for s in ss:
            remove_container(s, srv[s.label][0])


def _exec_throughput(s: Side, cid: str, short: list, tries: int = 3) -> float:
    """MB/s of one complete 16 MiB exec stdout. A short stream is retried and its length
    recorded in `short`: containerd 1.6's streaming server can close the connection in the
    middle of a frame when the process exits while its output is still queued."""
    size = PAYLOAD_MIB << 20
    for _ in range(tries):
        url = s.rt.Exec(pb.ExecRequest(container_id=cid, cmd=["head", "-c", str(size), "/dev/zero"],
                                       stdout=True, stderr=True)).url
        t = time.perf_counter()
        res = exec_url(url, timeout=300)
        took = time.perf_counter() - t
        if len(res.stdout) == size:
            return size / took / 1e6
        short.append(len(res.stdout))
        log(f"P8 {s.label}: exec stdout short: {len(res.stdout)} of {size} bytes; again")
    raise RuntimeError(f"{s.label}: exec stdout short {tries} times: {short[-tries:]} of {size} bytes")


def _pf_throughput(s: Side, port: int) -> float:
    size = PAYLOAD_MIB << 20
    url = s.rt.PortForward(pb.PortForwardRequest(pod_sandbox_id=s.sid, port=[port])).url
    with PortForwardClient.connect(url) as pf:
        deadline = time.monotonic() + 60
        while True:
            # no half-close first: busybox nc quits on the peer's EOF
            t = time.perf_counter()
            data, _ = pf.open(port)
            reply = read_all(data, timeout=300)
            took = time.perf_counter() - t
            if len(reply) == size or time.monotonic() > deadline:
                break
            time.sleep(0.5)  # the nc loop restarts between connections
    if len(reply) != size:
        raise RuntimeError(f"{s.label}: port-forward: {len(reply)} of {size} bytes")
    return size / took / 1e6


def markdown(p: dict) -> list[str]:
    if "error" in p:
        return ["## P8 streaming", "", f"not measurable: {p['error']}", ""]
    c = p.get("containerd")
    head = ["## P8 streaming (SPDY/3.1, the tests' clients)", ""]
    if not c or "error" in c:
        e, x, f = p["exec_true_ms"], p["exec_stdout_mb_s"], p["port_forward_mb_s"]
        note = [f"containerd: not measurable: {c['error']}", ""] if c else []
        return head + [
            f"| exec `true` round trip p50 / p95 (ms) | exec stdout, {p['payload_mib']} MiB (MB/s) | "
            f"port-forward out of the guest, {p['payload_mib']} MiB (MB/s) |", "|---|---|---|",
            f"| {e['median']:.0f} / {e['p95']:.0f} | {x['median']:.1f} ({x['min']:.1f}–{x['max']:.1f}) | "
            f"{f['median']:.1f} ({f['min']:.1f}–{f['max']:.1f}) |", ""] + note

    def cell(r, key, fmt):
        s = r[key]
        return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}–{fmt.format(s['max'])})"
    rows = [("exec `true` round trip p50 (ms)", lambda r: f"{r['exec_true_ms']['median']:.0f}",
             lambda r: r["exec_true_ms"]["median"]),
            ("exec `true` round trip p95 (ms)", lambda r: f"{r['exec_true_ms']['p95']:.0f}",
             lambda r: r["exec_true_ms"]["p95"]),
            (f"exec stdout, {p['payload_mib']} MiB (MB/s, median (min–max))",
             lambda r: cell(r, "exec_stdout_mb_s", "{:.1f}"), lambda r: r["exec_stdout_mb_s"]["median"]),
            (f"port-forward out of the pod, {p['payload_mib']} MiB (MB/s)",
             lambda r: cell(r, "port_forward_mb_s", "{:.1f}"), lambda r: r["port_forward_mb_s"]["median"])]
    L = head + ["| metric | vmcri | containerd+runc | vmcri / containerd |", "|---|---|---|---|"]
    for name, show, val in rows:
        rr = ratio(val(p), val(c))
        L.append(f"| {name} | {show(p)} | {show(c)} | {'–' if rr is None else f'{rr:.2f}'} |")
    sh = [f"{n}: {len(r.get('exec_stdout_short', []))} short exec stream(s) retried "
          f"({', '.join(str(b) for b in r['exec_stdout_short'])} bytes)"
          for n, r in (("vmcri", p), ("containerd", c)) if r.get("exec_stdout_short")]
    return L + ["", "Ratios of times: >1 is vmcri slower; of MB/s: <1 is vmcri slower."
                + ("" if not sh else " " + "; ".join(sh) + "."), ""]
