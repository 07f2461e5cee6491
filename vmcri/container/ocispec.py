"""Build the OCI runtime spec (config.json, runtime-spec 1.0.2) that crun runs inside the guest.

Input: the CRI ContainerConfig, the pod's PodSandboxConfig and the image's OCI config.
The rules follow containerd's CRI plugin, except where a VM sandbox changes them:
- the pod's network, IPC and UTS namespaces are the guest's own, so containers join them
  by creating none; each container gets its own mount and cgroup namespace; its PID
  namespace is the pod's (POD, the proto's zero value: the one the agent's pod init
  holds), its own (CONTAINER) or a target container's (TARGET), named by placeholder
  paths of protocol.py that the agent resolves;
- privileged means privileged inside the pod: all capabilities, the pod's devices (the
  guest's /dev less vmcri's control devices, prepared by the agent), no seccomp and no
  masked paths; host devices are never passed (see validate.py).

Only `read_image_file` (the image's /etc/passwd and /etc/group) and a Localhost seccomp
profile are read; everything else is a pure function of the inputs.
"""
from __future__ import annotations

import json
import posixpath
import re
import signal
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from cri_api.v1 import api_pb2

from vmcri.agent import protocol
from vmcri.container.ocispec_process import (  # noqa: F401  (re-exported)
    ALL_CAPABILITIES, DEFAULT_CAPABILITIES, DEFAULT_PATH, build_process, image_strings,
    image_working_dir, merge_env, resolve_args, resolve_capabilities, resolve_seccomp,
    resolve_user)
from vmcri.container.validate import validate_container_config, validate_sandbox_config
from vmcri.errors import InvalidArgument

OCI_VERSION = "1.0.2"
CGROUP_ROOT = "/vmcri"

# Annotation keys read by the runtime itself (the guest agent / container service).
ANN_STDIN = "io.vmcri.stdin"
ANN_STDIN_ONCE = "io.vmcri.stdin-once"
ANN_STOP_SIGNAL = "io.vmcri.stop-signal"

DEFAULT_MASKED_PATHS = (
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
    "/sys/firmware", "/sys/devices/virtual/powercap",
)
DEFAULT_READONLY_PATHS = (
    "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
)


def _char_dev(major: int | None, minor: int | None, access: str = "rwm") -> dict:
    rule = {"allow": True, "type": "c", "access": access}
    if major is not None:
        rule["major"] = major
    if minor is not None:
        rule["minor"] = minor
    return rule


# The device cgroup allow-list of unprivileged containers (mknod of anything is allowed,
# opening only the usual pseudo devices).
DEFAULT_DEVICE_RULES = (
    {"allow": False, "access": "rwm"},
    _char_dev(None, None, "m"),
    {"allow": True, "type": "b", "access": "m"},
    _char_dev(1, 3), _char_dev(1, 5), _char_dev(1, 7), _char_dev(1, 8), _char_dev(1, 9),
    _char_dev(5, 0), _char_dev(5, 1), _char_dev(5, 2), _char_dev(136, None), _char_dev(10, 200),
)

_PROPAGATION = {
    api_pb2.PROPAGATION_PRIVATE: "rprivate",
    api_pb2.PROPAGATION_HOST_TO_CONTAINER: "rslave",
    api_pb2.PROPAGATION_BIDIRECTIONAL: "rshared",
}


@dataclass(frozen=True)
class PreparedMount:
    """A CRI mount the integrator has made visible to the runtime: where (`source`) and
    whether the runtime's bind is made read-only there (`readonly`; None: as the CRI
    mount asks). Image volumes must be prepared; hostPaths may be (else host_mount_to_guest)."""
    source: str
    readonly: bool | None = None
    # (path below the mount, source, read-only): mounts under a hostPath, each bound in
    # place after it, since the top's source does not carry them (rootfs.bind_host_path)
    submounts: tuple[tuple[str, str, bool], ...] = ()


@dataclass(frozen=True)
class GuestPaths:
    """Where the sandbox's shared files are, as the guest sees them.

    hosts / resolv_conf / hostname: the pod's files, bind-mounted read-only-or-not into
    every container (an empty string skips that mount). shm: the pod's /dev/shm dir.
    host_mount_to_guest: maps a CRI hostPath (a host path) to the guest path where the
    integrator made it visible (e.g. under the 9p share); a callable or a mapping.
    cgroup_root: parent of the per-pod cgroups inside the guest.
    prepared: CRI mount index -> PreparedMount, for the mounts the integrator prepared.
    """
    hosts: str
    resolv_conf: str
    hostname: str
    shm: str
    host_mount_to_guest: Callable[[str], str] | Mapping[str, str]
    cgroup_root: str = CGROUP_ROOT
    prepared: Mapping[int, PreparedMount] | None = None

    def guest_path(self, host_path: str) -> str:
        mapper = self.host_mount_to_guest
        if callable(mapper):
            return mapper(host_path)
        try:
            return mapper[host_path]
        except KeyError:
            raise InvalidArgument(f"host path {host_path!r} is not shared with the sandbox") from None


# ---------------------------------------------------------------- mounts


def _depth(destination: str) -> int:
    clean = posixpath.normpath(destination)
    return 0 if clean == "/" else clean.count("/")


def _standard_mounts(privileged: bool) -> list[dict]:
    ro = [] if privileged else ["ro"]
    if privileged:
        # The agent fills POD_DEV_DIR with the pod's devices; never the guest's own /dev,
        # which holds the agent's port and the root disk.
        dev = {"destination": "/dev", "type": "bind", "source": protocol.POD_DEV_DIR,
               "options": ["bind", "rprivate", "nosuid", "rw"]}
    else:
        dev = {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}
    return [
        {"destination": "/proc", "type": "proc", "source": "proc",
         "options": ["nosuid", "noexec", "nodev"]},
        dev,
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev"] + ro},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["nosuid", "noexec", "nodev", "relatime"] + ro},
    ]


def _bind(destination: str, source: str, readonly: bool, propagation: str = "rprivate",
          extra: Iterable[str] = ()) -> dict:
    return {"destination": destination, "type": "bind", "source": source,
            "options": ["rbind", propagation, "ro" if readonly else "rw", *extra]}


def _cri_mount_source(i: int, m: api_pb2.Mount, guest: GuestPaths) -> tuple[str, bool]:
    """(source, read-only bind) of CRI mount i."""
    prepared = (guest.prepared or {}).get(i)
    if m.image.image:
        if prepared is None:
            raise InvalidArgument(f"config.mounts[{i}].image: image volumes are supported "
                                  f"in VM sandboxes only")
        return prepared.source, True
    if prepared is None:
        return guest.guest_path(m.host_path), m.readonly
    return prepared.source, m.readonly if prepared.readonly is None else prepared.readonly


def build_mounts(config: api_pb2.ContainerConfig, guest: GuestPaths,
                 privileged: bool) -> tuple[list[dict], str | None]:
    """All mounts, parents before children, and the rootfs propagation they need."""
    cri_mounts = []
    rootfs_propagation = None
    for i, m in enumerate(config.mounts):
        propagation = _PROPAGATION.get(m.propagation)
        if propagation is None:
            raise InvalidArgument(f"config.mounts[{i}].propagation: unknown value {m.propagation}")
        if propagation == "rshared":
            rootfs_propagation = "rshared"
        elif propagation == "rslave" and rootfs_propagation is None:
            rootfs_propagation = "rslave"
        source, readonly = _cri_mount_source(i, m, guest)
        destination = posixpath.normpath(m.container_path)
        mount = _bind(destination, source, readonly, propagation)
        if m.recursive_read_only:
            mount["options"].append("rro")  # crun: mount_setattr(AT_RECURSIVE, RDONLY)
        cri_mounts.append(mount)
        for rel, sub_source, sub_ro in getattr((guest.prepared or {}).get(i), "submounts", ()):
            cri_mounts.append(_bind(posixpath.normpath(posixpath.join(destination, rel)),
                                    sub_source, sub_ro, propagation))
    taken = {m["destination"] for m in cri_mounts}
    readonly_etc = config.linux.security_context.readonly_rootfs
    sandbox_mounts = [
        _bind("/etc/hosts", guest.hosts, readonly_etc),
        _bind("/etc/resolv.conf", guest.resolv_conf, readonly_etc),
        _bind("/etc/hostname", guest.hostname, readonly_etc),
        _bind("/dev/shm", guest.shm, False, extra=("nosuid", "nodev", "noexec")),
    ]
    mounts = [m for m in _standard_mounts(privileged) + sandbox_mounts
              if m["destination"] not in taken and m["source"]]
    mounts += cri_mounts
    mounts.sort(key=lambda m: _depth(m["destination"]))  # stable: same depth keeps order
    return mounts, rootfs_propagation


# ---------------------------------------------------------------- resources


_PAGE_SIZE = re.compile(r"^[1-9][0-9]{0,6}(KB|MB|GB)$")


def build_resources(res: api_pb2.LinuxContainerResources, privileged: bool) -> dict:
    out: dict = {"devices": [{"allow": True, "access": "rwm"}] if privileged
                 else [dict(r) for r in DEFAULT_DEVICE_RULES]}
    cpu = {}
    if res.cpu_shares:
        cpu["shares"] = res.cpu_shares
    if res.cpu_quota:
        cpu["quota"] = res.cpu_quota
    if res.cpu_period:
        cpu["period"] = res.cpu_period
    if res.cpuset_cpus:
        cpu["cpus"] = res.cpuset_cpus
    if res.cpuset_mems:
        cpu["mems"] = res.cpuset_mems
    if cpu:
        out["cpu"] = cpu
    memory = {}
    if res.memory_limit_in_bytes:
        memory["limit"] = res.memory_limit_in_bytes
    if res.memory_swap_limit_in_bytes:
        memory["swap"] = res.memory_swap_limit_in_bytes
    if memory:
        out["memory"] = memory
    if len(res.hugepage_limits):
        # The agent keeps the sizes the guest kernel has (the kubelet lists the host's).
        for i, h in enumerate(res.hugepage_limits):
            if not _PAGE_SIZE.match(h.page_size):
                raise InvalidArgument(f"config.linux.resources.hugepage_limits[{i}].page_size: "
                                      f"{h.page_size!r} is not a size like 2MB or 1GB")
        out["hugepageLimits"] = [{"pageSize": h.page_size, "limit": h.limit}
                                 for h in res.hugepage_limits]
    if res.unified:
        out["unified"] = dict(sorted(res.unified.items()))
    return out


# ---------------------------------------------------------------- the spec


def sandbox_sysctls(sandbox_config: api_pb2.PodSandboxConfig) -> dict[str, str]:
    """The pod's sysctls, to be written once in the guest (by the agent at sandbox start).

    They are not put in linux.sysctl: pod sysctls are all network/IPC-namespaced, the
    containers join the guest's network and IPC namespaces instead of creating them, and
    crun refuses a namespaced sysctl without a new namespace of that kind. Setting them
    guest-wide is exactly "for the pod" here, since the VM is the pod.
    """
    return dict(sorted(sandbox_config.linux.sysctls.items()))


def _stop_signal(config: api_pb2.ContainerConfig, image_config: dict) -> str:
    """A signal name like SIGQUIT from the CRI stop_signal or the image's StopSignal
    ("SIGQUIT", "QUIT" or "3"); SIGTERM when neither sets one."""
    if config.stop_signal:
        return api_pb2.Signal.Name(config.stop_signal)
    raw = str(image_config.get("StopSignal") or "SIGTERM").strip().upper()
    try:
        if raw.isdigit():
            return signal.Signals(int(raw)).name
        name = raw if raw.startswith("SIG") else "SIG" + raw
        return signal.Signals[name].name
    except (KeyError, ValueError):
        raise InvalidArgument(f"image config StopSignal: unknown signal {raw!r}") from None


def _annotations(container_id: str, sandbox_id: str, config: api_pb2.ContainerConfig,
                 sandbox: api_pb2.PodSandboxConfig, image_config: dict) -> dict[str, str]:
    # Labels, then annotations (which win), then the runtime's own keys (which win over both).
    out = dict(config.labels)
    out.update(config.annotations)
    out.update({
        "io.kubernetes.cri.container-type": "container",
        "io.kubernetes.cri.container-name": config.metadata.name,
        "io.kubernetes.cri.sandbox-id": sandbox_id,
        "io.kubernetes.cri.sandbox-name": sandbox.metadata.name,
        "io.kubernetes.cri.sandbox-namespace": sandbox.metadata.namespace,
        "io.kubernetes.cri.sandbox-uid": sandbox.metadata.uid,
        "io.kubernetes.cri.image-name": config.image.user_specified_image or config.image.image,
        ANN_STDIN: "true" if config.stdin else "false",
        ANN_STDIN_ONCE: "true" if config.stdin_once else "false",
        ANN_STOP_SIGNAL: _stop_signal(config, image_config),
    })
    return dict(sorted(out.items()))


def _namespaces(sec: api_pb2.LinuxContainerSecurityContext) -> list[dict]:
    # Network, IPC and UTS are the guest's (= the pod's): no entry means "join the
    # runtime's own". PID: POD (the proto's zero value, so also no namespace_options)
    # joins the pod's, held by the agent's pod init; never the guest's, where the agent is.
    opts = sec.namespace_options
    if opts.pid == api_pb2.CONTAINER:
        pid = {"type": "pid"}
    elif opts.pid == api_pb2.TARGET:
        field = "config.linux.security_context.namespace_options.target_id"
        try:
            pid = {"type": "pid", "path": protocol.target_pid_ns(
                protocol.check_id(field, opts.target_id))}
        except protocol.ProtocolError as e:
            raise InvalidArgument(str(e)) from None
    else:
        pid = {"type": "pid", "path": protocol.POD_PID_NS}
    return [{"type": "mount"}, pid, {"type": "cgroup"}]


def build_spec(container_id: str, config: api_pb2.ContainerConfig,
               sandbox_config: api_pb2.PodSandboxConfig, image_config: dict, *,
               rootfs_path: str, guest_paths: GuestPaths,
               read_image_file: Callable[[str], bytes | None],
               sandbox_id: str | None = None) -> dict:
    """The config.json dict for one container.

    rootfs_path: root.path as crun in the guest must see it (absolute guest path, or
    relative to the bundle dir). sandbox_id: vmcri's pod id, used in annotations and in
    the guest cgroup path; defaults to the pod's metadata uid.
    Raises InvalidArgument naming the offending field.
    """
    validate_container_config(config)
    validate_sandbox_config(sandbox_config)
    image_config = image_config or {}
    sandbox_id = sandbox_id or sandbox_config.metadata.uid
    sec = config.linux.security_context
    privileged = sec.privileged
    if privileged and not sandbox_config.linux.security_context.privileged:
        raise InvalidArgument("config.linux.security_context.privileged: the pod sandbox "
                              "is not privileged")

    process = build_process(config, sandbox_config, image_config, read_image_file)
    caps = process["capabilities"]["bounding"]

    mounts, rootfs_propagation = build_mounts(config, guest_paths, privileged)
    linux: dict = {
        "namespaces": _namespaces(sec),
        "cgroupsPath": f"{guest_paths.cgroup_root.rstrip('/')}/{sandbox_id}/{container_id}",
        "resources": build_resources(config.linux.resources, privileged),
    }
    if not privileged:
        linux["maskedPaths"] = list(sec.masked_paths) or list(DEFAULT_MASKED_PATHS)
        linux["readonlyPaths"] = list(sec.readonly_paths) or list(DEFAULT_READONLY_PATHS)
        profile = resolve_seccomp(sec, caps)
        if profile is not None:
            linux["seccomp"] = profile
    if rootfs_propagation:
        linux["rootfsPropagation"] = rootfs_propagation

    return {
        "ociVersion": OCI_VERSION,
        "process": process,
        "root": {"path": rootfs_path, "readonly": bool(sec.readonly_rootfs)},
        "mounts": mounts,
        "annotations": _annotations(container_id, sandbox_id, config, sandbox_config,
                                    image_config),
        "linux": linux,
    }


def spec_json(spec: dict) -> str:
    """Stable text form, for the bundle file and for golden files."""
    return json.dumps(spec, indent=2) + "\n"
