"""The one bench entry point: P1 sandbox ready vs floor, P2 warm pool, P3 container start,
P4 ExecSync, P5 idle memory, P6 density, P7 pull, P8 streaming, P9 rootfs/volume I/O.
Writes bench/results/<stem>.{json,md,png}.

    /opt/vmcri/venv/bin/python -m bench.run [--quick] [--before-image DIR [--before-tb 32]]
        [--only p1,p2,p3,p6,p7,p8,p9] [--runs N] [--pool-size 2] [--stem latest]
        [--no-containerd]

P3/P4, P8 and P9 also run a containerd+runc pod side by side when Debian's containerd and
runc are installed (bench/containerd.py), interleaved with vmcri's, and report ratios.

`after` is the current guest image (`/var/lib/vmcri/guest/current`) with vmcri's current
config defaults; `--before-image` adds an older image directory (and its tb-cache) as
`before`, measured interleaved in the same run.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import containerd, containers, density, pool, pull, report, streaming, volumes  # noqa: E402
from bench.common import GUEST_CURRENT, log  # noqa: E402
from bench.sandbox_ready import Variant, measure as measure_p1  # noqa: E402
from vmcri.config import Config  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer runs; density N=5 only")
    ap.add_argument("--before-image", default="", help="an older guest image dir, measured as 'before'")
    ap.add_argument("--before-tb", type=int, default=32, help="tb-cache MiB of the 'before' config")
    ap.add_argument("--before-config", default="", help="extra daemon TOML for 'before'")
    ap.add_argument("--after-image", default=GUEST_CURRENT)
    ap.add_argument("--only", default="p1,p2,p3,p6,p7,p8,p9",
                    help="comma list of p1,p2,p3,p6,p7,p8,p9 (p3 includes p4, p5; p4 = p3)")
    ap.add_argument("--no-containerd", action="store_true",
                    help="no containerd+runc side in P3/P4, P8, P9 even when installed")
    ap.add_argument("--pool-size", type=int, default=2, help="P2 warm pool size")
    ap.add_argument("--runs", type=int, default=0, help="P1 runs per variant (default 3, quick 2)")
    ap.add_argument("--sizes", default="", help="P6 pod counts, e.g. 5,10,20")
    ap.add_argument("--seq-sizes", default="", help="P6 pod counts also run sequentially (default: --sizes; 'none')")
    ap.add_argument("--stem", default="latest")
    a = ap.parse_args()
    only = set(a.only.split(","))
    if "p4" in only or "p5" in only:
        only.add("p3")
    missing = "disabled" if a.no_containerd else containerd.available()
    with_ctrd = not missing
    if missing and only & {"p3", "p8", "p9"}:
        log(f"no containerd+runc side ({missing}): apt-get install -y containerd runc")
    runs = a.runs or (2 if a.quick else 3)
    sizes = tuple(int(x) for x in a.sizes.split(",")) if a.sizes else ((5,) if a.quick else (5, 10, 20))

    after = Variant("after", a.after_image, Config().tcg_tb_cache_mib)
    variants = [after]
    if a.before_image:
        variants.insert(0, Variant("before", a.before_image, a.before_tb, a.before_config))
    res: dict = {"meta": {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                          "mode": "quick" if a.quick else "full", "argv": sys.argv[1:],
                          "host": f"{platform.node()}, {os.cpu_count()} CPUs, {platform.release()}",
                          "variants": [v.__dict__ for v in variants],
                          "containerd": _containerd_version() if with_ctrd else missing,
                          "git": _git_state()}}
    out = lambda: report.write(res, RESULTS, a.stem)  # noqa: E731 - partial results survive a crash
    if "p1" in only:
        log(f"P1: {runs} interleaved runs of {[v.label for v in variants]} and their floors")
        res["p1"] = measure_p1(variants, runs)
        out()
    if "p2" in only:
        log(f"P2 warm pool of {a.pool_size}: {runs} runs interleaved with cold and floor")
        res["p2"] = pool.measure(after, runs, a.pool_size)
        out()
    if "p3" in only:
        res["p3"] = {}
        for v in variants:  # containerd side by side with the current image only
            side = with_ctrd and v is after
            log(f"P3/P4/P5 ({v.label}{' vs containerd' if side else ''})")
            res["p3"].update(containers.measure([_side(v)], side, containers=2 if a.quick else 3,
                                                execs=20 if a.quick else 50))
            out()
    if "p6" in only:
        log(f"P6 density ({after.label}) N={sizes}")
        res["p6"] = {"label": after.label, "rows": []}
        density.measure(after.config().replace("agent_timeout_s = 300", "agent_timeout_s = 900"),
                        after.image_dir, sizes,
                        (() if a.seq_sizes == "none" else tuple(int(x) for x in a.seq_sizes.split(",")))
                        if a.seq_sizes else None,
                        rows=res["p6"]["rows"], on_row=out)
    if "p8" in only:
        log("P8 streaming into a pod VM")
        res["p8"] = streaming.measure([_side(after)], with_ctrd, execs=10 if a.quick else 20,
                                      runs=2 if a.quick else 3)
        out()
    if "p9" in only:
        log(f"P9 rootfs/volume I/O{' vs containerd' if with_ctrd else ''}")
        res["p9"] = volumes.measure([_side(v) for v in variants], with_ctrd,
                                    rounds=2 if a.quick else 3)  # interleaved, before and after
        out()
    if "p7" in only:
        log("P7 pull")
        res["p7"] = pull.measure(runs=3 if a.quick else 5)
    res["meta"]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for p in out():
        log(f"wrote {p}")
    print(report.markdown(res))


def _side(v: Variant) -> tuple[str, str, str]:
    return v.label, v.config(), v.image_dir


def _git_state() -> str:
    """The commit and the files others had changed, uncommitted, when the run started."""
    import subprocess
    here = os.path.dirname(RESULTS)
    head = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True)
    files = [ln[3:] for ln in dirty.stdout.splitlines()]
    return head.stdout.strip() + (f" + uncommitted: {', '.join(files)}" if files else "")


def _containerd_version() -> str:
    import subprocess
    r = subprocess.run([containerd.CONTAINERD, "--version"], capture_output=True, text=True)
    q = subprocess.run([containerd.RUNC, "--version"], capture_output=True, text=True)
    return f"{r.stdout.strip()}; {q.stdout.splitlines()[0] if q.stdout else 'runc ?'}"


if __name__ == "__main__":
    main()
