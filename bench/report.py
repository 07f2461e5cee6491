"""Write a bench run as JSON, a markdown table and a PNG plot."""
from __future__ import annotations

import json
import os
import statistics
import sys


def _f(x, fmt="{:.2f}", unit=""):
    return "–" if x is None else fmt.format(x) + unit


def _mib(kib):
    return None if kib is None else kib / 1024


def _order(res: dict, keys) -> list[str]:
    """Variant labels in run order (before, after), whatever order the JSON has."""
    first = [v["label"] for v in res["meta"].get("variants", []) if v["label"] in keys]
    return first + [k for k in keys if k not in first]


def markdown(res: dict) -> str:
    labels = _order(res, res.get("p1", {}))
    L = [f"# vmcri bench — {res['meta']['started']} ({res['meta']['mode']})", "",
         f"Host: {res['meta']['host']}. TCG, wall clock, medians unless noted. "
         "Variants: " + "; ".join(f"**{v['label']}** = image `{os.path.basename(os.path.realpath(v['image_dir']))}`, "
                                  f"tb-cache {v['tb_mib']} MiB" for v in res["meta"].get("variants", [])), ""]
    if res["meta"].get("containerd"):
        L += [f"containerd side (P3/P4, P8, P9): {res['meta']['containerd']}", ""]
    if labels:
        head = "| metric | " + " | ".join(labels) + " |"
        L += ["## P1 sandbox ready (interleaved with the floor, same run)", "", head,
              "|---|" + "---|" * len(labels)]
        p1 = res["p1"]
        rows = [
            ("floor: raw qemu → agent answers (s)", lambda r: _f(r["floor_s"]["median"])),
            ("RunPodSandbox → returns, agent answering (s)", lambda r: _f(r["sandbox_s"]["median"])),
            ("  min–max (s)", lambda r: f"{r['sandbox_s']['min']:.2f}–{r['sandbox_s']['max']:.2f}"),
            ("**ratio sandbox / floor** (medians)", lambda r: _f(r["ratio_median"], "**{:.2f}**")),
            ("ratio sandbox / floor, per interleaved pair (median; min–max)",
             lambda r: f"{statistics.median(r['ratio_per_run']):.2f} ({min(r['ratio_per_run']):.2f}–{max(r['ratio_per_run']):.2f})"),
            ("floor min / sandbox min (s) (least contended run)",
             lambda r: f"{r['floor_s']['min']:.2f} / {r['sandbox_s']['min']:.2f}"),
            ("qemu CPU to ready, libvirt / floor (s)", lambda r: f"{_f(r.get('qemu_cpu_s_median'))} / {_f(r.get('floor_qemu_cpu_s_median'))}"),
            ("daemon CPU during RunPodSandbox (s)", lambda r: _f(r.get("daemon_cpu_s_median"))),
            ("qemu RSS at ready, libvirt (MiB)", lambda r: _f(_mib(r["qemu_rss_kib_median"]), "{:.0f}")),
            ("qemu RSS at ready, floor (MiB)", lambda r: _f(_mib(r["floor_qemu_rss_kib_median"]), "{:.0f}")),
        ]
        hp = []
        for r in p1.values():
            hp += [k for k in r["host_phases_median"] if k not in hp]
        rows += [(f"host phase {k} (s)", lambda r, k=k: _f(r["host_phases_median"].get(k))) for k in hp]
        gp = []
        for r in p1.values():
            gp += [k for k in r["guest_phases_median"] if k not in gp]
        gp.sort(key=lambda k: p1[labels[-1]]["guest_phases_median"].get(k, 1e9))
        rows += [(f"guest uptime at {k} (s)", lambda r, k=k: _f(r["guest_phases_median"].get(k))) for k in gp]
        rows += [(f"floor guest uptime at {k} (s)", lambda r, k=k: _f(r["floor_guest_phases_median"].get(k)))
                 for k in ("python-exec", "paramiko-imported", "agent-ready")]
        L += ["| " + name + " | " + " | ".join(fn(p1[lb]) for lb in labels) + " |" for name, fn in rows]
        if "before" in p1 and "after" in p1:
            b, a = p1["before"], p1["after"]
            cpu = (f"; qemu CPU to ready {a['qemu_cpu_s_median'] / b['qemu_cpu_s_median']:.2f}×"
                   if a.get("qemu_cpu_s_median") and b.get("qemu_cpu_s_median") else "")
            L += ["", f"after / before: RunPodSandbox median {a['sandbox_s']['median'] / b['sandbox_s']['median']:.2f}×, "
                      f"min {a['sandbox_s']['min'] / b['sandbox_s']['min']:.2f}×; floor median "
                      f"{a['floor_s']['median'] / b['floor_s']['median']:.2f}×{cpu}."]
        L.append("")
    L += _p3_markdown(res)
    if res.get("p6"):
        L += [f"## P6 density ({res['p6']['label']})", "",
              "| N | mode | ok | wall (s) | per pod median / max (s) | qemu PSS sum (MiB) | host used (MiB) | daemon RSS (MiB) | errors |",
              "|---|---|---|---|---|---|---|---|---|"]
        for r in res["p6"]["rows"]:
            pp = r["per_pod_s"]
            L.append(f"| {r['n']} | {r['mode']} | {r['ok']}/{r['n']} | {r['wall_s']:.1f} | "
                     f"{_f(pp.get('median'))} / {_f(pp.get('max'))} | {_mib(r['qemu_pss_sum_kib']):.0f} | "
                     f"{_mib(r['host_used_kib']):.0f} | {_f(_mib(r['daemon'].get('VmRSS')), '{:.0f}')} | "
                     f"{'; '.join(r['errors'])[:120]} |")
        L.append("")
    if res.get("p2"):
        from bench import pool
        L += pool.markdown(res["p2"])
    if res.get("p8"):
        from bench import streaming
        L += streaming.markdown(res["p8"])
    if res.get("p9"):
        from bench import volumes
        L += volumes.markdown(res["p9"])
    if res.get("p7"):
        p = res["p7"]
        L += ["## P7 image pull (local registry)", "",
              "| vmcri pull (s) | skopeo copy (s) | skopeo copy + tar (s) | ratio vs copy | ratio vs copy+tar |",
              "|---|---|---|---|---|",
              f"| {p['vmcri_median_s']:.3f} | {p['skopeo_copy_median_s']:.3f} | {p['skopeo_copy_untar_median_s']:.3f} | "
              f"{p['vmcri_median_s'] / p['skopeo_copy_median_s']:.2f} | "
              f"{p['vmcri_median_s'] / p['skopeo_copy_untar_median_s']:.2f} |", ""]
    return "\n".join(L)


def _g(r, *path):
    for p in path:
        if not isinstance(r, dict) or p not in r:
            return None
        r = r[p]
    return r


def _p3_markdown(res: dict) -> list[str]:
    ctr = res.get("p3", {})
    if not ctr:
        return []
    cl = _order(res, ctr)
    vm = [c for c in cl if c != "containerd"]
    base = "containerd" if "containerd" in ctr and "error" not in ctr["containerd"] else None
    g = _g
    L = ["## P3 container start, P4 ExecSync, P5 idle memory", "",
         "| metric | " + " | ".join(cl) + "".join(f" | {c} / containerd" for c in vm if base) + " |",
         "|---|" + "---|" * (len(cl) + (len(vm) if base else 0))]
    num = [  # (name, path, format): these get a ratio column against containerd
        ("P3 first container Create+Start → RUNNING (s)", ("first_container_s",), "{:.3f}"),
        ("P3 Create+Start → RUNNING, median (s)", ("create_start_running_s", "median"), "{:.3f}"),
        ("P3 CreateContainer median (s)", ("create_s", "median"), "{:.3f}"),
        ("P3 StartContainer median (s)", ("start_s", "median"), "{:.3f}"),
        ("P4 ExecSync `true` p50 (ms)", ("exec_true_ms", "median"), "{:.1f}"),
        ("P4 ExecSync `true` p95 (ms)", ("exec_true_ms", "p95"), "{:.1f}"),
    ]
    for name, path, fmt in num:
        cells = [_f(g(ctr[c], *path), fmt) for c in cl]
        if base:
            b = g(ctr[base], *path)
            cells += [_f(g(ctr[c], *path) / b if g(ctr[c], *path) is not None and b else None) for c in vm]
        L.append(f"| {name} | " + " | ".join(cells) + " |")
    rows = [
        ("P5 idle qemu RSS (MiB)", lambda r: _f(_mib(g(r, "idle", "qemu", "VmRSS")), "{:.0f}")),
        ("P5 idle qemu PSS (MiB)", lambda r: _f(_mib(g(r, "idle", "qemu", "Pss")), "{:.0f}")),
        ("P5 idle qemu anon RSS (MiB)", lambda r: _f(_mib(g(r, "idle", "qemu", "RssAnon")), "{:.0f}")),
        ("P5 daemon RSS / PSS, 1 pod (MiB)", lambda r: f"{_f(_mib(g(r, 'idle', 'daemon', 'VmRSS')), '{:.0f}')} / "
                                                    f"{_f(_mib(g(r, 'idle', 'daemon', 'Pss')), '{:.0f}')}"),
        ("P5 guest MemTotal / MemAvailable (MiB)", lambda r: f"{_f(_mib(g(r, 'guest_meminfo_kib', 'MemTotal')), '{:.0f}')} / "
                                                          f"{_f(_mib(g(r, 'guest_meminfo_kib', 'MemAvailable')), '{:.0f}')}"),
        ("error", lambda r: r.get("error", "")),
    ]
    pad = " | " * (len(vm) if base else 0)
    L += ["| " + name + " | " + " | ".join(str(fn(ctr[c])) for c in cl) + pad + " |" for name, fn in rows]
    if base:
        L += ["", "containerd = Debian's containerd + runc, hostNetwork pod, same CRI calls, interleaved; "
                  "its 'daemon' is containerd itself. Ratios >1: vmcri slower."]
    return L + [""]


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    p1 = res.get("p1", {})
    ax = axes[0]
    labels = _order(res, p1)
    for i, lb in enumerate(labels):
        r = p1[lb]
        for j, (key, name) in enumerate((("floor_s", "floor (raw qemu)"), ("sandbox_s", "RunPodSandbox"))):
            s = r[key]
            ax.bar(i * 3 + j, s["median"], color=("tab:gray", "tab:blue")[j],
                   yerr=[[s["median"] - s["min"]], [s["max"] - s["median"]]], capsize=4,
                   label=name if i == 0 else None)
        ax.text(i * 3 + 0.5, r["sandbox_s"]["median"] + 1, f"×{r['ratio_median']:.2f}", ha="center")
    ax.set_xticks([i * 3 + 0.5 for i in range(len(labels))], labels)
    ax.set_ylabel("seconds to agent answering")
    ax.set_title("P1 sandbox ready vs floor (median, min–max)")
    ax.legend()
    ax = axes[1]
    names: list[str] = []
    for lb in labels:
        names += [k for k, _ in sorted(p1[lb]["guest_phases_median"].items(), key=lambda kv: kv[1]) if k not in names]
    colors = {k: plt.get_cmap("tab10")(i % 10) for i, k in enumerate(names)}
    for i, lb in enumerate(labels):
        prev = 0.0
        for k, v in sorted(p1[lb]["guest_phases_median"].items(), key=lambda kv: kv[1]):
            ax.barh(i, max(0.0, v - prev), left=prev, color=colors[k], label=k if i == 0 else None)
            prev = max(prev, v)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("guest uptime (s) at the end of each phase, RunPodSandbox boots")
    ax.set_title("guest phases (median uptime)")
    if names:
        ax.legend(fontsize=7, loc="lower right")
    ax = axes[2]
    rows = (res.get("p6") or {}).get("rows", [])
    for mode, color in (("sequential", "tab:green"), ("concurrent", "tab:red")):
        rr = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["n"])
        if rr:
            ax.plot([r["n"] for r in rr], [r["wall_s"] for r in rr], "o-", color=color, label=f"{mode}: wall s")
    ax2 = ax.twinx()
    rr = sorted(rows, key=lambda r: r["n"])
    if rr:
        ax2.plot([r["n"] for r in rr], [_mib(r["qemu_pss_sum_kib"]) for r in rr], "s--", color="tab:purple",
                 label="qemu PSS sum, MiB (all rows)")
        ax2.set_ylabel("MiB")
    ax.set_xlabel("pods (N)")
    ax.set_ylabel("seconds")
    ax.set_title("P6 density")
    if rows:
        ax.legend(loc="upper left")
    if rr:
        ax2.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(res: dict, out_dir: str, stem: str = "latest") -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"{stem}.{ext}") for ext in ("json", "md", "png")]
    with open(paths[0], "w") as f:
        json.dump(res, f, indent=1, sort_keys=True, default=str)
    with open(paths[1], "w") as f:
        f.write(markdown(res) + "\n")
    try:
        plot(res, paths[2])
    except Exception as e:  # a plot problem must not lose the numbers
        print(f"plot failed: {e}")
        paths.pop()
    return paths


if __name__ == "__main__":  # re-render tables and plot from a results JSON
    src = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "results", "latest.json")
    with open(src) as f:
        data = json.load(f)
    stem = os.path.splitext(os.path.basename(src))[0]
    print("\n".join(write(data, os.path.dirname(os.path.abspath(src)), stem)))
