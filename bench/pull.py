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


def measure(runs: int = 5, extra_mib: int = 0) -> dict:
    """Pull the same image `runs` times with vmcri's ImageService and with skopeo; seconds."""
    work = tempfile.mkdtemp(prefix="vmcri-bench-")
    reg = start_registry(os.path.join(work, "registry"))
    try:
        layers = [build_layer([("tree", busybox_rootfs(os.path.join(work, "rootfs")))]),
                  *multi_layers()]
        if extra_mib:
            layers.append(build_layer([("file", "big.bin", os.urandom(extra_mib << 20))]))
        layout = os.path.join(work, "layout")
        set_layout_index(layout, "bench", [write_oci_image(layout, layers, BASE_CONFIG)])
        ref = f"{reg}/vmcri-bench/multi:1.0"
        push_layout(layout, "bench", ref)

        vmcri_s, skopeo_s, untar_s, phases = [], [], [], []
        for i in range(runs):
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
        return {"layers": len(layers), "uncompressed_mb": sum(len(x) for x in layers) / 1e6,
                "runs": runs, "vmcri_s": vmcri_s, "skopeo_copy_s": skopeo_s,
                "skopeo_copy_untar_s": untar_s,
                "vmcri_phases_median_s": {k: statistics.median(p[k] for p in phases) for k in phases[0]},
                "vmcri_median_s": statistics.median(vmcri_s),
                "skopeo_copy_median_s": statistics.median(skopeo_s),
                "skopeo_copy_untar_median_s": statistics.median(untar_s)}
    finally:
        stop_registry(reg)
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--extra-mib", type=int, default=0)
    args = ap.parse_args()
    r = measure(args.runs, args.extra_mib)
    v, s, u = r["vmcri_median_s"], r["skopeo_copy_median_s"], r["skopeo_copy_untar_median_s"]
    print(f"image: {r['layers']} layers, {r['uncompressed_mb']:.1f} MB uncompressed, runs={r['runs']}")
    print(f"vmcri pull (manifest, config, blobs, verify, unpack): median {v:.3f}s "
          f"(all: {', '.join(f'{x:.3f}' for x in r['vmcri_s'])})")
    print(f"skopeo copy docker:// -> dir:                        median {s:.3f}s "
          f"(all: {', '.join(f'{x:.3f}' for x in r['skopeo_copy_s'])})")
    print("vmcri phases (median): " + ", ".join(
        f"{k} {x:.3f}s" for k, x in r["vmcri_phases_median_s"].items()))
    print(f"skopeo copy -> dir: + tar -xzpf per layer:           median {u:.3f}s")
    print(f"ratio vmcri/skopeo-copy: {v / s:.2f}   ratio vmcri/(skopeo-copy + tar): {v / u:.2f}")


if __name__ == "__main__":
    main()
