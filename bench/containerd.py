"""A private containerd + runc (Debian's packages) as the baseline the container benches
compare vmcri with: own root/state/runc dirs under a temp dir, own socket, a generated
config.toml (CRI plugin, runc, overlayfs, the bench's loopback registry as a plain-HTTP
mirror). It is driven through the same CRI stubs as vmcri. Only what this module started is
stopped: the containerd by PID, then any runc shim whose -address is our socket.

    apt-get install -y containerd runc
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
from cri_api.v1 import api_pb2_grpc as pb_grpc

from bench.common import log

CONTAINERD = shutil.which("containerd") or "/usr/bin/containerd"
# BENCH_RUNC: another runc binary, e.g. a wrapper that adds --debug
RUNC = os.environ.get("BENCH_RUNC") or shutil.which("runc") or "/usr/sbin/runc"


def available() -> str:
    """'' when containerd, its runc v2 shim and runc are installed, else what is missing."""
    missing = [n for n in ("containerd", "containerd-shim-runc-v2", "runc") if not shutil.which(n)]
    return ", ".join(missing)


@dataclass
class Containerd:
    base: str
    socket: str
    proc: subprocess.Popen
    channel: grpc.Channel
    runtime: pb_grpc.RuntimeServiceStub
    image: pb_grpc.ImageServiceStub
    log_path: str

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-20000:]
        except OSError:
            return ""


def config_toml(base: str, socket: str, registry: str, sandbox_image: str) -> str:
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""version = 2
root = "{base}/root"
state = "{base}/state"
# plugins that would write outside base (opt: /opt/containerd) or that we do not use
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"

[{cri}]
  sandbox_image = "{sandbox_image}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  # never below containerd's own: this host refuses a lower oom_score_adj (pause gets -998)
  restrict_oom_score_adj = true
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        BinaryName = "{RUNC}"
        Root = "{base}/runc"
        SystemdCgroup = false
  [{cri}.cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{base}/cni"
  [{cri}.registry.mirrors."{registry}"]
    endpoint = ["http://{registry}"]
  [{cri}.registry.configs."{registry}".tls]
    insecure_skip_verify = true
"""


@contextmanager
def running(registry: str, sandbox_image: str, timeout: float = 60):
    """A private containerd pulling from `registry`; yields a Containerd. Stops it (by PID),
    its shims, unmounts what it left under its temp dir and removes the dir."""
    base = tempfile.mkdtemp(prefix="vmcri-bench-containerd-")
    sock = os.path.join(base, "containerd.sock")
    cfg = os.path.join(base, "config.toml")
    os.makedirs(os.path.join(base, "cni"))
    with open(cfg, "w") as f:
        f.write(config_toml(base, sock, registry, sandbox_image))
    log_path = os.path.join(base, "containerd.log")
    with open(log_path, "w") as out:
        proc = subprocess.Popen([CONTAINERD, "--config", cfg], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    ch = None
    try:
        deadline = time.monotonic() + timeout
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"containerd did not come up: {_tail(log_path)}")
            time.sleep(0.05)
        ch = grpc.insecure_channel(f"unix://{sock}")
        grpc.channel_ready_future(ch).result(timeout=timeout)
        log(f"containerd {proc.pid} up in {base}")
        yield Containerd(base, sock, proc, ch, pb_grpc.RuntimeServiceStub(ch),
                         pb_grpc.ImageServiceStub(ch), log_path)
    finally:
        if ch is not None:
            ch.close()
        _stop(proc, sock)
        _cleanup(base)


def _tail(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-3000:]
    except OSError:
        return ""


def _stop(proc: subprocess.Popen, sock: str) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pid in _our_shims(sock):  # normally gone already: pods are removed through CRI first
        try:
            os.kill(pid, signal.SIGKILL)
            log(f"killed leftover shim {pid}")
        except ProcessLookupError:
            pass


def _our_shims(sock: str) -> list[int]:
    """PIDs of containerd-shim-runc-v2 processes started for our socket (-address SOCK)."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"containerd-shim-runc-v2") and sock.encode() in argv:
            pids.append(int(d))
    return pids


def _cleanup(base: str) -> None:
    """Unmount everything containerd left below base (deepest first), then remove base."""
    prefix = base.rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for mp in sorted({p for p in points if p.startswith(prefix)}, key=len, reverse=True):
        r = subprocess.run(["umount", mp], capture_output=True)
        if r.returncode != 0:
            subprocess.run(["umount", "-l", mp], capture_output=True)
    shutil.rmtree(base, ignore_errors=True)
