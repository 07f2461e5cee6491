"""Pull time of vmcri's ImageService vs a plain `skopeo copy docker://... dir:` of the
same image from a local docker-registry, in one run. Prints medians and the ratio.

    /opt/vmcri/venv/bin/python bench/pull.py [--runs 5] [--extra-mib 0]

--extra-mib adds a layer of that many MiB of random bytes (throughput-bound case).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.support.fx_registry import (BASE_CONFIG, build_layer, busybox_rootfs,  # noqa: E402
                                       multi_layers, push_layout, set_layout_index,
                                       start_registry, stop_registry, write_oci_image)
from vmcri.config import Config  # noqa: E402
from vmcri.image.service import ImageService  # noqa: E402
from vmcri.store import Store  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--extra-mib", type=int, default=0)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="vmcri-bench-")
    reg = start_registry(os.path.join(work, "registry"))
    try:
        layers = [build_layer([("tree", busybox_rootfs(os.path.join(work, "rootfs")))]),
                  *multi_layers()]
        if args.extra_mib:
            layers.append(build_layer([("file", "big.bin", os.urandom(args.extra_mib << 20))]))
        layout = os.path.join(work, "layout")
        set_layout_index(layout, "bench", [write_oci_image(layout, layers, BASE_CONFIG)])
        ref = f"{reg}/vmcri-bench/multi:1.0"
        push_layout(layout, "bench", ref)

        vmcri_s, skopeo_s, untar_s, phases = [], [], [], []
        for i in range(args.runs):
            root = os.path.join(work, f"root{i}")
            cfg = Config(root_dir=root, run_dir=os.path.join(work, f"run{i}"))
            store = Store(cfg.db_path)
            svc = ImageService(cfg, store)
            t = time.monotonic()
            svc.pull(ref)
            vmcri_s.append(time.monotonic() - t)
            phases.append(svc.last_phases)
            store.close()
            shutil.rmtree(root)

            dest = os.path.join(work, f"dir{i}")
            t = time.monotonic()
            subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false",
                            f"docker://{ref}", f"dir:{dest}"], check=True)
            skopeo_s.append(time.monotonic() - t)
            # baseline that also unpacks: the same copy, then GNU tar per layer
            shutil.rmtree(dest)
            t = time.monotonic()
            subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false",
                            f"docker://{ref}", f"dir:{dest}"], check=True)
            with open(os.path.join(dest, "manifest.json")) as f:
                for n, layer in enumerate(json.load(f)["layers"]):
                    out = os.path.join(dest, f"unpacked{n}")
                    os.mkdir(out)
                    subprocess.run(["tar", "-xzpf", os.path.join(dest, layer["digest"].split(":")[1]),
                                    "-C", out], check=True)
            untar_s.append(time.monotonic() - t)
            shutil.rmtree(dest)
        v, s = statistics.median(vmcri_s), statistics.median(skopeo_s)
        total = sum(len(x) for x in layers)
        print(f"image: {len(layers)} layers, {total / 1e6:.1f} MB uncompressed, runs={args.runs}")
        print(f"vmcri pull (manifest, config, blobs, verify, unpack): median {v:.3f}s "
              f"(all: {', '.join(f'{x:.3f}' for x in vmcri_s)})")
        print(f"skopeo copy docker:// -> dir:                        median {s:.3f}s "
              f"(all: {', '.join(f'{x:.3f}' for x in skopeo_s)})")
        print("vmcri phases (median): " + ", ".join(
            f"{k} {statistics.median(p[k] for p in phases):.3f}s" for k in phases[0]))
        u = statistics.median(untar_s)
        print(f"skopeo copy -> dir: + tar -xzpf per layer:           median {u:.3f}s")
        print(f"ratio vmcri/skopeo-copy: {v / s:.2f}   ratio vmcri/(skopeo-copy + tar): {v / u:.2f}")
    finally:
        stop_registry(reg)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
