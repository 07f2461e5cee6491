"""Renders a demo `Report` for the terminal and as one self-contained HTML page."""
from __future__ import annotations

import html as htmlmod
import textwrap

COLS = ("", "container in pod demo-a (VM)", "host", "container in pod demo-b (VM)")
HOST_COL = "container in host sandbox demo-host"


def _cols(r) -> tuple[str, ...]:
    return COLS + ((HOST_COL,) if len(r.pods) > 2 else ())


def _pod_cells(p) -> list[str]:
    v, vm = p.view, p.kind == "vm"
    return [v.kernel, v.boot_id, f"{v.uptime_s:.0f} s", v.pid1, str(v.nprocs), f"{v.mem_mib} MiB",
            f"{v.cpus} × {v.cpu_model}", v.hostname, p.ip or "loopback only",
            p.domain if vm else "none (no VM)",
            f"pid {p.qemu_pid} ({p.accel})" if vm else "none: crun + conmon",
            f"{p.vm_vcpus} vCPU, {p.vm_memory_mib} MiB" if vm else "the host's",
            f"{p.run_pod_s:.1f} s", f"{p.container_start_s:.1f} s"]


def _rows(r) -> list[tuple[str, ...]]:
    a, b, *rest = r.pods
    h = r.host
    labels = ["kernel release (uname -r)", "kernel instance (boot_id)", "kernel up for", "PID 1",
              "processes visible", "memory (MemTotal)", "CPUs", "hostname", "pod IP (CNI)",
              "libvirt domain", "qemu process on the host", "VM size", "RunPodSandbox took",
              "Create+StartContainer took"]
    host = [h.kernel, h.boot_id, f"{h.uptime_s:.0f} s", _short(h.pid1), str(h.nprocs),
            f"{h.mem_mib} MiB", f"{h.cpus} × {h.cpu_model}", h.hostname, "", "", "", "", "", ""]
    cols = [_pod_cells(a), host, _pod_cells(b), *[_pod_cells(p) for p in rest]]
    return [(label, *(c[i] for c in cols)) for i, label in enumerate(labels)]


def _short(s: str, n: int = 60) -> str:
    return s if len(s) <= n else s[:n - 1] + "…"


def phases(timings: dict) -> str:
    return ", ".join(f"{k} {v:.2f}s" if isinstance(v, (int, float)) else f"{k} {v}"
                     for k, v in timings.items())


def _cell(s: str, width: int) -> list[str]:
    return textwrap.wrap(s, width) or [""]


def text(r) -> str:
    widths = (27, 30, 30, 30, 30)
    out = [f"vmcri isolation demo — {r.runtime}, image {r.image}", ""]
    for row in [_cols(r), *_rows(r)]:
        cells = [_cell(v, w) for v, w in zip(row, widths)]
        for i in range(max(len(c) for c in cells)):
            out.append("  ".join((c[i] if i < len(c) else "").ljust(w)
                                 for c, w in zip(cells, widths)).rstrip())
    a, b, *rest = r.pods
    out += ["", "processes seen inside demo-a (ps):", *[f"    {p}" for p in a.view.processes],
            "processes seen inside demo-b (ps):", *[f"    {p}" for p in b.view.processes],
            *[line for p in rest for line in (f"processes seen inside {p.name} (ps):",
                                              *[f"    {x}" for x in p.view.processes])],
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
    a, b, *rest = r.pods
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>vmcri isolation demo</title>",
             f"<style>{CSS}</style></head><body>", "<h1>vmcri: every pod is a virtual machine</h1>",
             f"<p>{e(r.runtime)} &middot; image <code>{e(r.image)}</code> &middot; "
             f"{'all checks passed' if r.ok else 'SOME CHECKS FAILED'}</p>",
             "<h2>What each side sees</h2>",
             "<p>Two pods are virtual machines, each with its own kernel. The third is a host "
             "sandbox running the same container: namespaces on the host's kernel.</p>" if rest else "",
             "<table><tr>", *[f"<th>{e(c)}</th>" for c in _cols(r)], "</tr>"]
    for row in _rows(r):
        parts.append("<tr>" + "".join(f"<td>{e(v)}</td>" for v in row) + "</tr>")
    parts.append("</table><h2>Checks</h2><ul>")
    for c in r.checks:
        cls, word = ("ok", "ok") if c.passed else ("bad", "FAILED")
        parts.append(f"<li><b class='{cls}'>{word}</b> {e(c.claim)}<br><small>{e(c.evidence)}</small></li>")
    parts.append("</ul><h2>Processes</h2><div class='cols'>")
    for title, lines in ((f"inside demo-a ({a.view.nprocs})", a.view.processes),
                         (f"inside demo-b ({b.view.nprocs})", b.view.processes),
                         *[(f"inside {p.name} ({p.view.nprocs})", p.view.processes) for p in rest],
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
