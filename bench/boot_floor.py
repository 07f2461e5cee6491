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


def rss_kib(pid) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration, TypeError):
        return None


def cpu_s(pid) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, TypeError):
        return None


# libvirt puts every VM under the "machine" cgroup, whose CPU weight all VMs share; a raw
# qemu left in the root cgroup would get more CPU on a busy host than the VM it is compared
# with. The floor qemu therefore runs in its own child of that same cgroup.
MACHINE_CGROUPS = ("/sys/fs/cgroup/cpu/machine", "/sys/fs/cgroup/machine.slice", "/sys/fs/cgroup/machine")


def join_machine_cgroup(pid: int) -> str | None:
    for parent in MACHINE_CGROUPS:
        if os.path.isdir(parent):
            path = os.path.join(parent, f"vmcri-bench-floor-{pid}")
            try:
                os.mkdir(path)
                with open(os.path.join(path, "cgroup.procs"), "w") as f:
                    f.write(str(pid))
                return path
            except OSError:
                return None
    return None


def leave_cgroup(path: str | None) -> None:
    if path:
        try:
            os.rmdir(path)  # works once the process has exited
        except OSError:
            pass


APPEND_EXTRA = ""
USE_MACHINE_CGROUP = True
TB_MIB = 32  # the daemon's default tcg_tb_cache_mib, so the floor runs the same TCG


def boot_raw(img, work: str, memory: int, tb_mib: int | None = None, append_extra: str | None = None):
    sock, console = os.path.join(work, "agent.sock"), os.path.join(work, "console.log")
    argv = ["qemu-system-x86_64", "-machine", "pc", "-accel", f"tcg,tb-size={tb_mib or TB_MIB}", "-cpu", "qemu64",
            "-m", str(memory), "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none",
            "-no-reboot", "-kernel", img.kernel, "-initrd", img.initrd, "-append", (img.cmdline + " " + (APPEND_EXTRA if append_extra is None else append_extra)).strip(),
            "-drive", f"file={img.rootfs},if=none,id=root,format=raw,readonly=on",
            "-device", "virtio-blk-pci,drive=root,serial=vmcri-root",
            "-device", "virtio-serial-pci",
            "-chardev", f"socket,id=agent,path={sock},server=on,wait=off",
            "-device", f"virtserialport,chardev=agent,name={protocol.PORT_NAME}",
            "-serial", f"file:{console}"]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    cg = join_machine_cgroup(proc.pid) if USE_MACHINE_CGROUP else None
    return t0, sock, console, lambda: (proc.kill(), proc.wait(), leave_cgroup(cg)), proc.pid


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
    return t0, sock, console, lambda: hv.destroy(name), hv.pid(name)


def one_run(mode: str, img, memory: int, pings: int, **raw_kw) -> dict:
    """raw_kw (raw mode only): tb_mib, append_extra."""
    work = tempfile.mkdtemp(prefix=f"vmcri-bench-{mode}-")
    if mode == "raw":
        t0, sock, console, stop, pid = boot_raw(img, work, memory, **raw_kw)
    else:
        t0, sock, console, stop, pid = boot_libvirt(img, work, memory)
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
        return {"qemu_rss_kib": rss_kib(pid), "qemu_cpu_s": cpu_s(pid), "marker_s": (marker - t0) if marker else None, "ping_s": first_ping - t0,
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
    ap.add_argument("--tb-mib", type=int, default=32, help="TCG translation cache (raw mode)")
    ap.add_argument("--root-cgroup", action="store_true",
                    help="leave raw qemu in the root cgroup (default: a child of libvirt's machine cgroup)")
    a = ap.parse_args()
    global APPEND_EXTRA, TB_MIB, USE_MACHINE_CGROUP
    APPEND_EXTRA, TB_MIB, USE_MACHINE_CGROUP = a.append_extra, a.tb_mib, not a.root_cgroup
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
            print(f"run {i} {mode:7s} marker {r['marker_s']:.2f}s first-ping {r['ping_s']:.2f}s "
                  f"rss {r['qemu_rss_kib']} KiB | guest {ph}{extra}",
                  flush=True)


if __name__ == "__main__":
    main()
