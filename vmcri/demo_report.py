"""Renders a demo `Report` for the terminal and as one self-contained HTML page."""
from __future__ import annotations

import html as htmlmod
import textwrap

COLS = ("", "container in pod demo-a", "host", "container in pod demo-b")


def _rows(r) -> list[tuple[str, str, str, str]]:
    a, b = r.pods
    va, vb, h = a.view, b.view, r.host
    return [
        ("kernel release (uname -r)", va.kernel, h.kernel, vb.kernel),
        ("kernel instance (boot_id)", va.boot_id, h.boot_id, vb.boot_id),
        ("kernel up for", f"{va.uptime_s:.0f} s", f"{h.uptime_s:.0f} s", f"{vb.uptime_s:.0f} s"),
        ("PID 1", va.pid1, _short(h.pid1), vb.pid1),
        ("processes visible", str(va.nprocs), str(h.nprocs), str(vb.nprocs)),
        ("memory (MemTotal)", f"{va.mem_mib} MiB", f"{h.mem_mib} MiB", f"{vb.mem_mib} MiB"),
        ("CPUs", f"{va.cpus} × {va.cpu_model}", f"{h.cpus} × {h.cpu_model}", f"{vb.cpus} × {vb.cpu_model}"),
        ("hostname", va.hostname, h.hostname, vb.hostname),
        ("pod IP (CNI)", a.ip or "loopback only", "", b.ip or "loopback only"),
        ("libvirt domain", a.domain, "", b.domain),
        ("qemu process on the host", f"pid {a.qemu_pid} ({a.accel})", "", f"pid {b.qemu_pid} ({b.accel})"),
        ("VM size", f"{a.vm_vcpus} vCPU, {a.vm_memory_mib} MiB", "", f"{b.vm_vcpus} vCPU, {b.vm_memory_mib} MiB"),
        ("RunPodSandbox took", f"{a.run_pod_s:.1f} s", "", f"{b.run_pod_s:.1f} s"),
        ("Create+StartContainer took", f"{a.container_start_s:.1f} s", "", f"{b.container_start_s:.1f} s"),
    ]


def _short(s: str, n: int = 60) -> str:
    return s if len(s) <= n else s[:n - 1] + "…"


def phases(timings: dict) -> str:
    return ", ".join(f"{k} {v:.2f}s" if isinstance(v, (int, float)) else f"{k} {v}"
                     for k, v in timings.items())


def _cell(s: str, width: int) -> list[str]:
    return textwrap.wrap(s, width) or [""]


def text(r) -> str:
    widths = (27, 38, 38, 38)
    out = [f"vmcri isolation demo — {r.runtime}, image {r.image}", ""]
    for row in [COLS, *_rows(r)]:
        cells = [_cell(v, w) for v, w in zip(row, widths)]
        for i in range(max(len(c) for c in cells)):
            out.append("  ".join((c[i] if i < len(c) else "").ljust(w)
                                 for c, w in zip(cells, widths)).rstrip())
    a, b = r.pods
    out += ["", "processes seen inside demo-a (ps):", *[f"    {p}" for p in a.view.processes],
            "processes seen inside demo-b (ps):", *[f"    {p}" for p in b.view.processes],
            f"the host sees {r.host.nprocs} processes; the pods are just these:",
            *[f"    {q}" for q in r.host_sees_qemu],
            "", f"first CRI log line of demo-a's container: {a.log_line or '(none yet)'}",
            "", f"virsh dominfo {a.domain}:", *[f"    {line}" for line in a.dominfo.splitlines()],
            "", "checks:"]
    for c in r.checks:
        out.append(f"  [{'ok' if c.passed else 'FAILED'}] {c.claim}")
        out += [f"         {line}" for line in textwrap.wrap(c.evidence, 100)]
    out.append("")
    out.append("all checks passed" if r.ok else "SOME CHECKS FAILED")
    return "\n".join(out)


CSS = """body{font-family:sans-serif;max-width:72em;margin:2em auto;color:#222}
table{border-collapse:collapse;width:100%}td,th{border:1px solid #ccc;padding:.3em .5em;
vertical-align:top;text-align:left;font-size:.9em}th{background:#eee}td:first-child{font-weight:bold}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto}.ok{color:#176f2c}.bad{color:#b00020}
.cols{display:flex;gap:1em}.cols>div{flex:1;min-width:0}"""


def html_page(r) -> str:
    e = htmlmod.escape
    a, b = r.pods
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>vmcri isolation demo</title>",
             f"<style>{CSS}</style></head><body>", "<h1>vmcri: every pod is a virtual machine</h1>",
             f"<p>{e(r.runtime)} &middot; image <code>{e(r.image)}</code> &middot; "
             f"{'all checks passed' if r.ok else 'SOME CHECKS FAILED'}</p>",
             "<h2>What each side sees</h2><table><tr>", *[f"<th>{e(c)}</th>" for c in COLS], "</tr>"]
    for row in _rows(r):
        parts.append("<tr>" + "".join(f"<td>{e(v)}</td>" for v in row) + "</tr>")
    parts.append("</table><h2>Checks</h2><ul>")
    for c in r.checks:
        cls, word = ("ok", "ok") if c.passed else ("bad", "FAILED")
        parts.append(f"<li><b class='{cls}'>{word}</b> {e(c.claim)}<br><small>{e(c.evidence)}</small></li>")
    parts.append("</ul><h2>Processes</h2><div class='cols'>")
    for title, lines in ((f"inside demo-a ({a.view.nprocs})", a.view.processes),
                         (f"inside demo-b ({b.view.nprocs})", b.view.processes),
                         (f"on the host: {r.host.nprocs} processes, the pods are", r.host_sees_qemu)):
        parts.append(f"<div><h3>{e(title)}</h3><pre>{e(chr(10).join(lines))}</pre></div>")
    parts.append("</div><h2>The libvirt domains behind the pods</h2>")
    for pod in (a, b):
        parts.append(f"<h3><code>virsh dominfo {e(pod.domain)}</code></h3><pre>{e(pod.dominfo)}</pre>")
    parts.append(f"<h2>Logs</h2><p>First CRI log line of demo-a's container:</p><pre>{e(a.log_line)}</pre>")
    parts.append("<p>Generated by <code>vmcri demo</code>. Start-up phases of demo-a: "
                 f"<code>{e(phases(a.phases))}</code></p>")
    parts.append("</body></html>\n")
    return "".join(parts)
