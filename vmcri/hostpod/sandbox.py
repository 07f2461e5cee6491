"""A host sandbox's pod-level parts: its namespaces, etc files and /dev/shm.

Namespaces are held as CRI-O's pinns holds them: the IPC and UTS namespaces of a pod
with a private one are bind-mounted files (made by util-linux `unshare --ipc=FILE`);
the network namespace is the one vmcri's network service made and ran CNI in. A PID
namespace only lives while its init does, so a pod sharing one (shareProcessNamespace)
gets an infra process, `unshare --pid=FILE --fork --kill-child sleep infinity` in its
own session, as the pause container is elsewhere. Everything lives under the sandbox's
share dir, a shared mount, so that unmounting here also unmounts the copies other mount
namespaces (conmon's, see runtime.py) hold.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess

from cri_api.v1 import api_pb2 as pb

from vmcri.errors import InvalidArgument, Unavailable
from vmcri.hostpod import cgroups, spec
from vmcri.sandbox import hostfs

NODE = pb.NamespaceMode.NODE
POD = pb.NamespaceMode.POD
SHM_SIZE = "size=65536k"
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
HOST_HANDLER = "host"


def wants_host(config: pb.PodSandboxConfig) -> list[str]:
    """The namespace_options fields that ask for the node's namespaces."""
    ns = config.linux.security_context.namespace_options
    return [f for f in ("network", "pid", "ipc") if getattr(ns, f) == NODE]


def pod_dirs(share_dir: str) -> dict[str, str]:
    return {"ns": os.path.join(share_dir, "ns"), "etc": os.path.join(share_dir, "etc"),
            "shm": os.path.join(share_dir, "shm")}


def _pin(kinds: list[str], ns_dir: str, hostname: str) -> dict[str, str]:
    flags, pins = [], {}
    for kind in kinds:
        path = os.path.join(ns_dir, kind)
        open(path, "a").close()
        flags.append(f"--{kind}={path}")
        pins[kind] = path
    if not flags:
        return pins
    argv = ["unshare", *flags, *(["hostname", hostname] if "uts" in kinds else ["true"])]
    done = subprocess.run(argv, capture_output=True, timeout=30)
    if done.returncode != 0:
        raise Unavailable(f"pinning the pod's {'/'.join(kinds)} namespaces failed: "
                          f"{done.stderr.decode(errors='replace')[:500]}")
    return pins


def _loopback_up(netns_path: str) -> None:
    """Containers on the host reach 127.0.0.1 in their pod's netns (port-forward dials
    it); CNI configs without the loopback plugin leave lo down, so bring it up here, as
    containerd does."""
    done = subprocess.run(["nsenter", f"--net={netns_path}", "ip", "link", "set", "lo", "up"],
                          capture_output=True, timeout=30)
    if done.returncode != 0:
        raise Unavailable(f"bringing up lo in the pod's netns failed: "
                          f"{done.stderr.decode(errors='replace')[:500]}")


def _start_infra(ns_dir: str) -> tuple[str, int]:
    path = os.path.join(ns_dir, "pid")
    open(path, "a").close()
    proc = subprocess.Popen(["unshare", f"--pid={path}", "--fork", "--kill-child",
                             "sleep", "infinity"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    return path, proc.pid


def _write_etc(etc_dir: str, config: pb.PodSandboxConfig, host_network: bool,
               ips: list[str]) -> None:
    os.makedirs(etc_dir, mode=0o755, exist_ok=True)
    dns = config.dns_config
    if host_network:
        hostname = socket.gethostname()
        with open("/etc/hosts") as f:
            hosts = f.read(1 << 20)
    else:
        hostname = config.hostname or config.metadata.name
        hosts = hostfs.etc_hosts(hostname, ips)
    if dns.servers or dns.searches or dns.options:
        resolv = hostfs.resolv_conf(list(dns.servers), list(dns.searches), list(dns.options))
    else:
        try:
            with open("/etc/resolv.conf") as f:
                resolv = f.read(1 << 20)
        except OSError:
            resolv = ""
    for name, text in (("hostname", hostname + "\n"), ("hosts", hosts), ("resolv.conf", resolv)):
        with open(os.path.join(etc_dir, name), "w") as f:
            f.write(text)


def setup(share_dir: str, config: pb.PodSandboxConfig, netns_path: str = "",
          ips: list[str] | None = None) -> dict:
    """The pod's namespace row: {"network", "ipc", "uts", "pid"} -> pinned path or ""
    (the host's), "infra_pid", "shm". Undo with teardown(), also after a partial setup."""
    validate(config)
    hostfs.make_shared_dir(share_dir)
    dirs = pod_dirs(share_dir)
    os.makedirs(dirs["ns"], mode=0o700, exist_ok=True)
    host = set(wants_host(config))
    host_network = "network" in host
    kinds = ([] if "ipc" in host else ["ipc"]) + ([] if host_network else ["uts"])
    hostname = config.hostname or config.metadata.name
    pins = _pin(kinds, dirs["ns"], hostname)
    if netns_path and not host_network:
        _loopback_up(netns_path)
    row = {"network": "" if host_network else netns_path, "ipc": pins.get("ipc", ""),
           "uts": pins.get("uts", ""), "pid": "", "infra_pid": 0}
    if config.linux.security_context.namespace_options.pid == POD:
        row["pid"], row["infra_pid"] = _start_infra(dirs["ns"])
    if "ipc" in host:
        row["shm"] = "/dev/shm"
    else:
        os.makedirs(dirs["shm"], mode=0o1777, exist_ok=True)
        hostfs._mount("shm", dirs["shm"], "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                      f"mode=1777,{SHM_SIZE}")
        row["shm"] = dirs["shm"]
    _write_etc(dirs["etc"], config, host_network, ips or [])
    row["etc"] = dirs["etc"]
    row["cgroup_parent"] = config.linux.cgroup_parent
    return row


def infra_alive(row: dict) -> bool:
    pid = int(row.get("infra_pid") or 0)
    if pid <= 0:
        return True  # no infra process to lose
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read(4096).split(b"\0")
    except OSError:
        return False
    return bool(argv) and os.path.basename(argv[0]) == b"unshare" and \
        row.get("pid", "").encode() in b" ".join(argv)


def validate(config: pb.PodSandboxConfig) -> None:
    parent = config.linux.cgroup_parent
    if parent and (not parent.startswith("/") or ".." in parent.split("/")
                   or len(parent) > 1024):
        raise InvalidArgument(f"config.linux.cgroup_parent: {parent[:100]!r} is not an "
                              f"absolute cgroup path")


def pod_cgroup(row: dict, sandbox_id: str) -> str:
    """Parent of the pod's container cgroups (ocispec: <cgroup root>/<sandbox>/<container>)."""
    root = (row.get("cgroup_parent") or "") or spec.CGROUP_ROOT
    return f"{root.rstrip('/')}/{sandbox_id}"


def teardown(share_dir: str, row: dict | None, sandbox_id: str = "") -> None:
    """Stop the infra process, unpin the namespaces, unmount /dev/shm, remove the pod's
    cgroup; safe to repeat."""
    if row and infra_alive(row) and int(row.get("infra_pid") or 0) > 0:
        try:
            os.kill(int(row["infra_pid"]), signal.SIGKILL)  # --kill-child takes the sleeper
        except ProcessLookupError:
            pass
    dirs = pod_dirs(share_dir)
    for key in ("ns", "shm"):
        hostfs.unmount_tree(dirs[key])
    for key in ("ns", "etc", "shm"):
        shutil.rmtree(dirs[key], ignore_errors=True)
    if sandbox_id:
        cgroups.remove(pod_cgroup(row or {}, sandbox_id))
