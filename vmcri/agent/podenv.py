"""The pod's own parts in the guest, and what the agent adds to a container's spec.

The host builds the spec; it cannot know guest pids or device numbers, so it writes the
placeholders of protocol.py, and `prepare_spec` resolves them into a guest-private copy
that crun runs (never the bundle's config.json, which lives in the host share):
- the pod's PID namespace is held by the pod init (podinit.py), started at the first
  container that joins it and restarted if it ever dies; TARGET joins a container's;
- no container may join any other namespace by path (the agent's own are in /proc/1/ns);
- a privileged container's /dev is a fresh copy of the guest's device nodes without
  vmcri's control devices (the agent's virtio-serial ports, the guest's vmcri disks, the
  console the host reads), and every container's device cgroup denies those devices, so
  mknod cannot bring them back;
- hugepage limits are kept for the page sizes the guest kernel has: the kubelet sends a
  zero limit for every size the *host* has.
"""
from __future__ import annotations

import json
import os
import re
import select
import shutil
import stat
import sys
import threading

from . import pid1, protocol
from .handlers_system import AgentCallError

SPEC_DIR = "/run/vmcri/specs"
DEVS_MOUNT = "/run/vmcri/devs"
CGROUP_MOUNT = "/sys/fs/cgroup"
HUGEPAGES_DIR = "/sys/kernel/mm/hugepages"
POD_INIT_OOM_SCORE = "-998"  # as containerd's pause: the last thing the OOM killer picks
# Its own small cgroup: a container that ptraces it must not run work outside its limits.
POD_INIT_CGROUP = {"pids.max": "16", "memory.max": str(64 << 20)}
_PAGE_SIZE = re.compile(r"^([1-9][0-9]{0,6})(KB|MB|GB)$")
_UNIT_KB = {"KB": 1, "MB": 1024, "GB": 1024 * 1024}
_NOT_BIND_SOURCES = ("/", "/dev", "/proc", "/sys", protocol.SHARE_MOUNT, protocol.ROOTFS_MOUNT)


POD_INIT_START_S = 120


class PodInit:
    """The pod init process: started once, watched by the agent's reaper."""

    def __init__(self, agent):
        self.agent = agent
        self._lock = threading.Lock()
        self.pid = 0
        self._exited: set[int] = set()

    def ensure(self) -> int:
        with self._lock:
            if self.pid <= 0 or self.pid in self._exited:
                self.pid = self._start()
            return self.pid

    def _on_exit(self, pid: int, status: int) -> None:
        # no lock: the reaper may call this from watch(), inside ensure()
        self._exited.add(pid)
        print(f"vmcri-agent: pod init {pid} exited ({pid1.exit_code(status)})", flush=True)

    def _start(self) -> int:
        with open(os.path.join(os.path.dirname(__file__), "podinit.py"), "rb") as f:
            source = f.read()  # a few KiB: fits the pipe, so the write never blocks
        src_r, src_w = os.pipe()
        r, w = os.pipe()
        try:
            # the program comes on stdin: `ps` in a pod shows `python3 -I -S -`, nothing more
            launcher = self.agent.spawn([sys.executable, "-I", "-S", "-"], stdin=src_r, stdout=w)
            os.write(src_w, source)
        finally:
            for fd in (w, src_r, src_w):
                os.close(fd)
        with os.fdopen(r, "rb") as out:
            # a Python start: seconds under TCG, far more with many VMs busy on few cores
            status = pid1.wait_status(self.agent.reaper, launcher, POD_INIT_START_S)
            ready = select.select([out], [], [], 5)[0]
            text = out.read(64).decode(errors="replace").strip() if ready else ""
        if status is None or pid1.exit_code(status) != 0 or not text.isdigit():
            raise AgentCallError("Failed", f"pod init did not start (launcher status "
                                           f"{status}, said {text!r})")
        pid = int(text)
        self._exited.discard(pid)  # a recycled pid of an earlier pod init
        self.agent.reaper.watch(pid, lambda st: self._on_exit(pid, st))
        if pid in self._exited:
            raise AgentCallError("Failed", "pod init exited at once (see the guest console)")
        _confine(pid)
        return pid


def _confine(pid: int) -> None:
    cgroup = os.path.join(CGROUP_MOUNT, "vmcri-pod-init")
    writes = [(f"/proc/{pid}/oom_score_adj", POD_INIT_OOM_SCORE)]
    writes += [(os.path.join(cgroup, k), v) for k, v in POD_INIT_CGROUP.items()]
    writes.append((os.path.join(cgroup, "cgroup.procs"), str(pid)))
    if os.path.exists(os.path.join(CGROUP_MOUNT, "cgroup.controllers")):  # cgroup2: the guest
        os.makedirs(cgroup, exist_ok=True)
    else:
        writes = writes[:1]
    for path, value in writes:
        try:
            with open(path, "w") as f:
                f.write(value)
        except OSError as e:
            print(f"vmcri-agent: pod init: {path}: {e.strerror}", flush=True)


# -- vmcri's control devices -------------------------------------------------------------

def _dev_number(sysdir: str) -> tuple[int, int] | None:
    try:
        with open(os.path.join(sysdir, "dev")) as f:
            major, _, minor = f.read(32).strip().partition(":")
        return int(major), int(minor)
    except (OSError, ValueError):
        return None


def _block_serial(name: str) -> str:
    sysdir = os.path.realpath(f"/sys/class/block/{name}")
    for d in (sysdir, os.path.dirname(sysdir)):  # a partition's serial is its disk's
        try:
            with open(os.path.join(d, "serial")) as f:
                return f.read(64).strip()
        except OSError:
            continue
    return ""


def control_devices() -> set[tuple[str, int, int]]:
    """("c" or "b", major, minor) of every device no container may open."""
    found = {("c", 5, 1)}  # /dev/console: the guest's console is the host's log
    for kind, cls, keep in (("c", "virtio-ports", lambda n: True),
                            ("b", "block", lambda n: _block_serial(n).startswith("vmcri"))):
        try:
            names = os.listdir(f"/sys/class/{cls}")
        except OSError:
            continue
        for name in names:
            number = _dev_number(f"/sys/class/{cls}/{name}") if keep(name) else None
            if number:
                found.add((kind, *number))
    try:
        with open("/sys/class/tty/console/active") as f:
            consoles = f.read(256).split()
    except OSError:
        consoles = []
    for name in consoles:
        number = _dev_number(f"/sys/class/tty/{name}")
        if number:
            found.add(("c", *number))
    return found


def _device_key(st: os.stat_result) -> tuple[str, int, int] | None:
    if stat.S_ISCHR(st.st_mode):
        return "c", os.major(st.st_rdev), os.minor(st.st_rdev)
    if stat.S_ISBLK(st.st_mode):
        return "b", os.major(st.st_rdev), os.minor(st.st_rdev)
    return None


def pod_dev_dir(cid: str, blocked: set) -> str:
    """A fresh /dev for one privileged container: the guest's nodes less `blocked`."""
    if not os.path.ismount(DEVS_MOUNT):
        pid1.mount("vmcri-devs", DEVS_MOUNT, "tmpfs", pid1.MS_NOSUID | pid1.MS_NOEXEC, "mode=0700")
    dst = os.path.join(DEVS_MOUNT, cid)
    shutil.rmtree(dst, ignore_errors=True)
    os.mkdir(dst, 0o755)
    for dirpath, dirnames, filenames in os.walk("/dev"):
        rel = os.path.relpath(dirpath, "/dev")
        target_dir = dst if rel == "." else os.path.join(dst, rel)
        for name in list(dirnames):
            src = os.path.join(dirpath, name)
            if os.path.islink(src):
                filenames.append(name)
                dirnames.remove(name)
            elif name == "virtio-ports" or os.path.ismount(src):
                dirnames.remove(name)  # pts, shm, mqueue: the container mounts its own
            else:
                os.mkdir(os.path.join(target_dir, name), stat.S_IMODE(os.lstat(src).st_mode))
        for name in filenames:
            src, out = os.path.join(dirpath, name), os.path.join(target_dir, name)
            try:
                st = os.lstat(src)
                if stat.S_ISLNK(st.st_mode):
                    link = os.readlink(src)
                    if "virtio-ports" not in link and not link.startswith("../vport"):
                        os.symlink(link, out)
                    continue
                key = _device_key(st)
                if key is None or key in blocked or name == "console":
                    continue
                os.mknod(out, st.st_mode, st.st_rdev)
                os.chown(out, st.st_uid, st.st_gid)
            except OSError as e:
                print(f"vmcri-agent: pod /dev: {src}: {e}", flush=True)
    return dst


def release(cid: str) -> None:
    """Forget what prepare_spec made for a container (at container_delete)."""
    shutil.rmtree(os.path.join(DEVS_MOUNT, cid), ignore_errors=True)
    try:
        os.unlink(os.path.join(SPEC_DIR, f"{cid}.json"))
    except OSError:
        pass


# -- hugepages ---------------------------------------------------------------------------

def _kernel_size_name(kb: int) -> str:
    if kb >= _UNIT_KB["GB"]:
        return f"{kb // _UNIT_KB['GB']}GB"
    if kb >= _UNIT_KB["MB"]:
        return f"{kb // _UNIT_KB['MB']}MB"
    return f"{kb}KB"


def guest_hugepage_sizes() -> dict[int, str]:
    """Page size in kB -> the hugetlb.<name>.max name, for the sizes the guest has."""
    try:
        with open(os.path.join(CGROUP_MOUNT, "cgroup.controllers")) as f:
            if "hugetlb" not in f.read().split():
                return {}
        names = os.listdir(HUGEPAGES_DIR)
    except OSError:
        return {}
    sizes = {}
    for name in names:
        m = re.match(r"^hugepages-([0-9]+)kB$", name)
        if m:
            sizes[int(m.group(1))] = _kernel_size_name(int(m.group(1)))
    return sizes


def filter_hugepages(limits, field: str) -> list[dict]:
    """The limits for sizes the guest has; a zero limit for a size it lacks is dropped (the
    kubelet lists the host's sizes), a non-zero one is an error naming the field."""
    if not isinstance(limits, list):
        raise AgentCallError("InvalidArgument", f"{field}: expected a list")
    sizes = guest_hugepage_sizes()
    kept = []
    for i, item in enumerate(limits):
        size = item.get("pageSize") if isinstance(item, dict) else None
        limit = item.get("limit") if isinstance(item, dict) else None
        m = _PAGE_SIZE.match(size) if isinstance(size, str) else None
        if m is None or not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            raise AgentCallError("InvalidArgument", f"{field}[{i}]: expected pageSize like "
                                                    f"2MB and a limit >= 0")
        kb = int(m.group(1)) * _UNIT_KB[m.group(2)]
        if kb in sizes:
            kept.append({"pageSize": sizes[kb], "limit": limit})
        elif limit:
            have = ", ".join(sizes[k] for k in sorted(sizes)) or "none"
            raise AgentCallError("InvalidArgument", f"{field}[{i}]: the pod VM has no {size} "
                                                    f"huge pages (it has: {have})")
    return kept


# -- the spec --------------------------------------------------------------------------

def _resolve_namespaces(linux: dict, pod_init: PodInit, target_pid) -> None:
    namespaces = linux.get("namespaces")
    if not isinstance(namespaces, list) or not all(isinstance(n, dict) for n in namespaces):
        raise AgentCallError("InvalidArgument", "linux.namespaces: expected a list of objects")
    types = [n.get("type") for n in namespaces]
    if "mount" not in types or "pid" not in types:
        raise AgentCallError("InvalidArgument", "linux.namespaces: a container needs its own "
                                                "mount namespace and a PID namespace entry")
    for ns in namespaces:
        path = ns.get("path")
        if path is None:
            continue
        prefix = protocol.TARGET_PID_NS_PREFIX
        if ns["type"] == "pid" and path == protocol.POD_PID_NS:
            ns["path"] = f"/proc/{pod_init.ensure()}/ns/pid"
        elif ns["type"] == "pid" and isinstance(path, str) and path.startswith(prefix) \
                and path.endswith("/pid"):
            target = path[len(prefix):-len("/pid")]
            try:
                protocol.check_id("namespace_options.target_id", target)
            except protocol.ProtocolError as e:
                raise AgentCallError("InvalidArgument", str(e)) from None
            ns["path"] = f"/proc/{target_pid(target)}/ns/pid"
        else:
            raise AgentCallError("InvalidArgument", f"linux.namespaces: joining {path!r} "
                                                    f"is not allowed")


def _check_mounts(spec: dict) -> bool:
    """True if the spec asks for the pod's devices as /dev (a privileged container)."""
    pod_dev = False
    for m in spec.get("mounts") or []:
        source = m.get("source") if isinstance(m, dict) else None
        if not isinstance(source, str):
            continue
        if m.get("destination") == "/dev" and source == protocol.POD_DEV_DIR:
            pod_dev = True
        elif m.get("type") == "bind" and (os.path.normpath(source) in _NOT_BIND_SOURCES
                                          or source.startswith("/dev/virtio-ports")):
            raise AgentCallError("InvalidArgument", f"mounts: {source!r} is the guest's own")
    return pod_dev


def _cached_root(cid: str, spec: dict, rootfs_mount: str = protocol.ROOTFS_MOUNT) -> None:
    """The container's own rootfs through the cached 9p view, when the VM has one."""
    root = spec.get("root")
    shared = protocol.container_bundle(cid) + "/rootfs"
    if isinstance(root, dict) and root.get("path") in (shared, "rootfs") \
            and os.path.ismount(rootfs_mount):
        root["path"] = f"{rootfs_mount}/containers/{cid}/rootfs"


def prepare_spec(cid: str, spec: dict, pod_init: PodInit, target_pid) -> str:
    """Resolve the spec's placeholders; returns the guest-private config file for crun."""
    linux = spec.get("linux")
    if not isinstance(linux, dict):
        raise AgentCallError("InvalidArgument", "linux: expected an object")
    resources = linux.setdefault("resources", {})
    if not isinstance(resources, dict):
        raise AgentCallError("InvalidArgument", "linux.resources: expected an object")
    if "hugepageLimits" in resources:
        resources["hugepageLimits"] = filter_hugepages(resources["hugepageLimits"],
                                                       "linux.resources.hugepageLimits")
    pod_dev = _check_mounts(spec)
    _cached_root(cid, spec)
    _resolve_namespaces(linux, pod_init, target_pid)
    blocked = control_devices()
    devices = resources.setdefault("devices", [])
    if not isinstance(devices, list):
        raise AgentCallError("InvalidArgument", "linux.resources.devices: expected a list")
    # after the host's rules: the last matching rule decides
    devices += [{"allow": False, "type": t, "major": ma, "minor": mi, "access": "rwm"}
                for t, ma, mi in sorted(blocked)]
    if pod_dev:
        dev_dir = pod_dev_dir(cid, blocked)
        for m in spec["mounts"]:
            if isinstance(m, dict) and m.get("source") == protocol.POD_DEV_DIR:
                m["source"] = dev_dir
    os.makedirs(SPEC_DIR, mode=0o700, exist_ok=True)
    path = os.path.join(SPEC_DIR, f"{cid}.json")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(spec, f)
    return path

