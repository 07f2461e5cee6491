"""A/B of boot variants on the raw floor (no libvirt, no daemon), interleaved round by round.

    /opt/vmcri/venv/bin/python -m bench.ab --rounds 4 \
        base:: mitoff:mitigations=off tb64::64 other-image:::/path/to/image
    (each variant is NAME:APPEND_EXTRA[:TB_MIB[:IMAGE_DIR]])

Reports per variant the median wall time to the first answered ping, qemu CPU seconds to
that point (robust against a busy host), qemu RSS and the guest phases.
"""
from __future__ import annotations

import argparse
import json
import random

from bench import boot_floor
from bench.common import GUEST_CURRENT, log, summary
from vmcri import guestimage
from vmcri.config import Config


def parse(spec: str) -> dict:
    name, extra, tb, image = (spec.split(":", 3) + ["", "", ""])[:4]
    return {"name": name, "append_extra": extra, "tb_mib": int(tb or 32), "image_dir": image or GUEST_CURRENT}


def run(variants: list[dict], rounds: int, memory: int = 256, seed: int = 1) -> dict:
    rows: dict[str, list[dict]] = {v["name"]: [] for v in variants}
    rnd = random.Random(seed)
    for i in range(rounds):
        order = variants[:]
        rnd.shuffle(order)
        for v in order:
            img = guestimage.locate(Config(guest_image_dir=v["image_dir"]))
            r = boot_floor.one_run("raw", img, memory, 0, tb_mib=v["tb_mib"], append_extra=v["append_extra"])
            rows[v["name"]].append(r)
            log(f"round {i} {v['name']}: ready {r['ping_s']:.2f}s cpu {r['qemu_cpu_s']:.2f}s "
                f"rss {r['qemu_rss_kib'] // 1024} MiB {r['phases']}")
    out = {}
    for v in variants:
        rs = rows[v["name"]]
        phases = sorted({k for r in rs for k in r["phases"]}, key=lambda k: summary([r["phases"].get(k) for r in rs])["median"])
        out[v["name"]] = {**v, "ready_s": summary([r["ping_s"] for r in rs]),
                          "cpu_s": summary([r["qemu_cpu_s"] for r in rs]),
                          "rss_mib": summary([r["qemu_rss_kib"] / 1024 for r in rs if r["qemu_rss_kib"]]),
                          "guest_phases": {k: summary([r["phases"].get(k) for r in rs])["median"] for k in phases}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--memory", type=int, default=256)
    ap.add_argument("--json", default="")
    ap.add_argument("variants", nargs="+")
    a = ap.parse_args()
    res = run([parse(s) for s in a.variants], a.rounds, a.memory)
    for name, r in res.items():
        ph = " ".join(f"{k}={v:.2f}" for k, v in r["guest_phases"].items())
        print(f"{name:14s} ready {r['ready_s']['median']:.2f}s (min {r['ready_s']['min']:.2f}) "
              f"cpu {r['cpu_s']['median']:.2f}s (min {r['cpu_s']['min']:.2f}) rss {r['rss_mib']['median']:.0f} MiB | {ph}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
