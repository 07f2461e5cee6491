"""Boot-time floor: the same kernel/initramfs/erofs root booted by raw qemu-system-x86_64
(no libvirt) and through libvirt (DomainSpec + Hypervisor), to the agent's ready marker
and to the first answered ping. Prints guest phases (VMCRI-PHASE lines) per run.

    /opt/vmcri/venv/bin/python bench/boot_floor.py [--runs 3] [--mode raw|libvirt|both]
        [--image-dir DIR] [--memory 256] [--pings 200]
Needs a built image (`vmcri image build`, or the test fixture's /var/lib/vmcri-test).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vmcri import guestimage  # noqa: E402
from vmcri.agent import protocol  # noqa: E402
from vmcri.channel import AgentClient  # noqa: E402
from vmcri.config import Config  # noqa: E402


def wait_marker(console: str, deadline: float) -> float | None:
    while time.monotonic() < deadline:
        try:
            with open(console, "rb") as f:
                if protocol.READY_MARKER.encode() in f.read():
                    return time.monotonic()
        except OSError:
            pass
        time.sleep(0.01)
    return None


def phases(console: str) -> dict[str, float]:
    out = {}
    with open(console, errors="replace") as f:
        for line in f:
            p = line.split()
            if len(p) == 3 and p[0] == protocol.PHASE_PREFIX:
                out[p[1]] = float(p[2])
    return out


APPEND_EXTRA = ""


def boot_raw(img, work: str, memory: int):
    sock, console = os.path.join(work, "agent.sock"), os.path.join(work, "console.log")
    argv = ["qemu-system-x86_64", "-machine", "pc", "-accel", "tcg,tb-size=32", "-cpu", "qemu64",
            "-m", str(memory), "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none",
            "-no-reboot", "-kernel", img.kernel, "-initrd", img.initrd, "-append", (img.cmdline + " " + APPEND_EXTRA).strip(),
            "-drive", f"file={img.rootfs},if=none,id=root,format=raw,readonly=on",
            "-device", "virtio-blk-pci,drive=root,serial=vmcri-root",
            "-device", "virtio-serial-pci",
            "-chardev", f"socket,id=agent,path={sock},server=on,wait=off",
            "-device", f"virtserialport,chardev=agent,name={protocol.PORT_NAME}",
            "-serial", f"file:{console}"]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return t0, sock, console, lambda: (proc.kill(), proc.wait())


def boot_libvirt(img, work: str, memory: int):
    from vmcri.sandbox.domain import DomainSpec, SandboxMeta, render_domain
    from vmcri.sandbox.virt import Hypervisor
    sock, console = os.path.join(work, "agent.sock"), os.path.join(work, "console.log")
    name = f"vmcri-bench-{uuid.uuid4().hex[:8]}"
    spec = DomainSpec(name=name, uuid=str(uuid.uuid4()), metadata=SandboxMeta(sandbox_id=name, owner="bench"),
                      kernel=img.kernel, initrd=img.initrd, root_disk=img.rootfs, cmdline=img.cmdline,
                      agent_socket=sock, console_log=console, memory_mib=memory)
    hv = Hypervisor()
    t0 = time.monotonic()
    hv.create(render_domain(spec))
    return t0, sock, console, lambda: hv.destroy(name)


def one_run(mode: str, img, memory: int, pings: int) -> dict:
    work = tempfile.mkdtemp(prefix=f"vmcri-bench-{mode}-")
    boot = boot_raw if mode == "raw" else boot_libvirt
    t0, sock, console, stop = boot(img, work, memory)
    try:
        marker = wait_marker(console, t0 + 180)
        client = AgentClient(sock, call_timeout=60)
        client.wait_ready(180)
        first_ping = time.monotonic()
        rtts = []
        for _ in range(pings):
            t = time.perf_counter()
            client.call("ping")
            rtts.append((time.perf_counter() - t) * 1000)
        rtts.sort()
        client.close()
        return {"marker_s": (marker - t0) if marker else None, "ping_s": first_ping - t0,
                "phases": phases(console),
                "rtt_p50_ms": statistics.median(rtts) if rtts else None,
                "rtt_p99_ms": rtts[max(0, int(len(rtts) * 0.99) - 1)] if rtts else None}
    finally:
        stop()
        shutil.rmtree(work, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mode", choices=("raw", "libvirt", "both"), default="both")
    ap.add_argument("--image-dir", default=os.environ.get("VMCRI_TEST_GUEST_ROOT", "/var/lib/vmcri-test") + "/guest/current")
    ap.add_argument("--memory", type=int, default=256)
    ap.add_argument("--pings", type=int, default=0)
    ap.add_argument("--append-extra", default="", help="extra kernel cmdline (raw mode), e.g. vmcri.late=after")
    a = ap.parse_args()
    global APPEND_EXTRA
    APPEND_EXTRA = a.append_extra
    img = guestimage.locate(Config(guest_image_dir=a.image_dir))
    if img is None:
        sys.exit(f"no guest image in {a.image_dir}; build one first")
    print(f"image {img.dir} (erofs compression {img.manifest.get('erofs_compression')})")
    modes = ("raw", "libvirt") if a.mode == "both" else (a.mode,)
    for i in range(a.runs):
        for mode in modes:
            r = one_run(mode, img, a.memory, a.pings)
            ph = " ".join(f"{k}={v:.2f}" for k, v in r["phases"].items())
            extra = f" rtt p50 {r['rtt_p50_ms']:.1f} ms p99 {r['rtt_p99_ms']:.1f} ms" if a.pings else ""
            print(f"run {i} {mode:7s} marker {r['marker_s']:.2f}s first-ping {r['ping_s']:.2f}s | guest {ph}{extra}",
                  flush=True)


if __name__ == "__main__":
    main()
