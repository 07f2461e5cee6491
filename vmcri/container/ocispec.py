"""Build the OCI runtime spec (config.json, runtime-spec 1.0.2) that crun runs inside the guest.

Input: the CRI ContainerConfig, the pod's PodSandboxConfig and the image's OCI config.
The rules follow containerd's CRI plugin, except where a VM sandbox changes them:
- the pod's network, IPC and UTS namespaces are the guest's own, so containers join them
  by creating none; each container gets its own mount and cgroup namespace, and its own
  PID namespace unless the pod shares one (then it is the guest's);
- privileged means privileged inside the guest: all capabilities, the guest's /dev, no
  seccomp and no masked paths; host devices are never passed (see validate.py).

Only `read_image_file` (the image's /etc/passwd and /etc/group) and a Localhost seccomp
profile are read; everything else is a pure function of the inputs.
"""
from __future__ import annotations

import json
import posixpath
import signal
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from cri_api.v1 import api_pb2

from vmcri.container import seccomp
from vmcri.container.validate import validate_container_config, validate_sandbox_config
from vmcri.errors import InvalidArgument

OCI_VERSION = "1.0.2"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CGROUP_ROOT = "/vmcri"
MAX_SECCOMP_PROFILE_BYTES = 1 << 20
MAX_ID_FILE_BYTES = 4 << 20  # /etc/passwd and /etc/group beyond this are not parsed

# Annotation keys read by the runtime itself (the guest agent / container service).
ANN_STDIN = "io.vmcri.stdin"
ANN_STDIN_ONCE = "io.vmcri.stdin-once"
ANN_STOP_SIGNAL = "io.vmcri.stop-signal"

DEFAULT_CAPABILITIES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
)

# Every capability of Linux 6.1 (the guest kernel), in number order.
ALL_CAPABILITIES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
    "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ",
    "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
)

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
class GuestPaths:
    """Where the sandbox's shared files are, as the guest sees them.

    hosts / resolv_conf / hostname: the pod's files, bind-mounted read-only-or-not into
    every container (an empty string skips that mount). shm: the pod's /dev/shm dir.
    host_mount_to_guest: maps a CRI hostPath (a host path) to the guest path where the
    integrator made it visible (e.g. under the 9p share); a callable or a mapping.
    cgroup_root: parent of the per-pod cgroups inside the guest.
    """
    hosts: str
    resolv_conf: str
    hostname: str
    shm: str
    host_mount_to_guest: Callable[[str], str] | Mapping[str, str]
    cgroup_root: str = CGROUP_ROOT

    def guest_path(self, host_path: str) -> str:
        mapper = self.host_mount_to_guest
        if callable(mapper):
            return mapper(host_path)
        try:
            return mapper[host_path]
        except KeyError:
            raise InvalidArgument(f"host path {host_path!r} is not shared with the sandbox") from None


# ---------------------------------------------------------------- process


def image_strings(image_config: dict, key: str) -> list[str]:
    """A list-of-strings field of the image config (which comes from a registry)."""
    value = image_config.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"image config {key}: must be a list of strings")
    return list(value)


def image_working_dir(image_config: dict) -> str:
    value = image_config.get("WorkingDir") or ""
    if not isinstance(value, str):
        raise InvalidArgument("image config WorkingDir: must be a string")
    # Docker resolves a relative WorkingDir against "/"; the OCI cwd must be absolute.
    return posixpath.normpath(posixpath.join("/", value)) if value else "/"


def resolve_args(command: Iterable[str], args: Iterable[str], image_config: dict) -> list[str]:
    """containerd's rule: CRI command wins over the image Entrypoint and drops the image
    Cmd; CRI args alone replace the image Cmd; neither gives Entrypoint + Cmd."""
    command, args = list(command), list(args)
    if not command:
        if not args:
            args = image_strings(image_config, "Cmd")
        entrypoint = image_strings(image_config, "Entrypoint")
        if entrypoint != [""]:
            command = entrypoint
    argv = command + args
    if not argv:
        raise InvalidArgument("config.command: no command specified, and the image has "
                              "neither Entrypoint nor Cmd")
    return argv


def merge_env(image_env: Iterable[str], cri_envs: Iterable[tuple[str, str]],
              extra_first: Iterable[tuple[str, str]] = ()) -> list[str]:
    """Image Env, then CRI envs replacing by key (in place) or appended; PATH defaulted."""
    merged: dict[str, str] = {}
    for key, value in extra_first:
        merged[key] = value
    for item in image_env:
        key, sep, value = item.partition("=")
        if key:
            merged[key] = value if sep else ""
    for key, value in cri_envs:
        merged[key] = value
    if "PATH" not in merged:
        merged = {"PATH": DEFAULT_PATH, **merged}
    return [f"{k}={v}" for k, v in merged.items()]


# ---------------------------------------------------------------- users


@dataclass(frozen=True)
class _PasswdEntry:
    name: str
    uid: int
    gid: int


def _id_file_lines(read_image_file: Callable[[str], bytes | None], path: str) -> list[list[str]]:
    data = read_image_file(path)
    if not data:
        return []
    text = data[:MAX_ID_FILE_BYTES].decode("utf-8", "replace")
    rows = []
    for line in text.splitlines():
        if line and not line.startswith("#"):
            rows.append(line.split(":"))
    return rows


def _passwd(read: Callable[[str], bytes | None]) -> list[_PasswdEntry]:
    entries = []
    for f in _id_file_lines(read, "/etc/passwd"):
        if len(f) >= 4 and f[2].isdigit() and f[3].isdigit():
            entries.append(_PasswdEntry(f[0], int(f[2]), int(f[3])))
    return entries


def _groups(read: Callable[[str], bytes | None]) -> list[tuple[str, int, list[str]]]:
    groups = []
    for f in _id_file_lines(read, "/etc/group"):
        if len(f) >= 3 and f[2].isdigit():
            members = [m for m in (f[3].split(",") if len(f) > 3 else []) if m]
            groups.append((f[0], int(f[2]), members))
    return groups


def _lookup_user(spec: str, field: str, read) -> tuple[int, int, str | None]:
    """(uid, primary gid, user name or None) for a user name or numeric uid."""
    passwd = _passwd(read)
    if spec.isdigit():
        uid = int(spec)
        for e in passwd:
            if e.uid == uid:
                return uid, e.gid, e.name
        return uid, 0, None
    for e in passwd:
        if e.name == spec:
            return e.uid, e.gid, e.name
    raise InvalidArgument(f"{field}: user {spec!r} is not in the image's /etc/passwd")


def _lookup_group(spec: str, field: str, read) -> int:
    if spec.isdigit():
        return int(spec)
    for name, gid, _ in _groups(read):
        if name == spec:
            return gid
    raise InvalidArgument(f"{field}: group {spec!r} is not in the image's /etc/group")


def resolve_user(sec: api_pb2.LinuxContainerSecurityContext, image_user: str,
                 read_image_file: Callable[[str], bytes | None]) -> dict:
    """process.user from run_as_user / run_as_username / the image User, plus groups."""
    base = "config.linux.security_context"
    group_spec = None
    if sec.HasField("run_as_user"):
        uid, gid, name = _lookup_user(str(sec.run_as_user.value), f"{base}.run_as_user",
                                      read_image_file)
    elif sec.run_as_username:
        uid, gid, name = _lookup_user(sec.run_as_username, f"{base}.run_as_username",
                                      read_image_file)
    elif image_user:
        user_spec, _, group_spec = image_user.partition(":")
        field = f"image config User {image_user!r}"
        uid, gid, name = _lookup_user(user_spec or "0", field, read_image_file)
        if group_spec:
            gid = _lookup_group(group_spec, field, read_image_file)
    else:
        uid, gid, name = _lookup_user("0", "", read_image_file)
    if sec.HasField("run_as_group"):
        gid = sec.run_as_group.value
    extra: list[int] = []
    strict = sec.supplemental_groups_policy == api_pb2.Strict
    if name and not strict:
        extra += [g for _, g, members in _groups(read_image_file) if name in members]
    extra += list(sec.supplemental_groups)
    # The primary gid is listed too, so a setgroups() never leaves stale image groups.
    return {"uid": uid, "gid": gid, "additionalGids": list(dict.fromkeys([gid] + extra))}


# ---------------------------------------------------------------- capabilities


def _cap_name(raw: str, field: str) -> str:
    name = raw.strip().upper()
    if not name.startswith("CAP_"):
        name = "CAP_" + name
    if name not in ALL_CAPABILITIES:
        raise InvalidArgument(f"{field}: unknown capability {raw!r}")
    return name


def resolve_capabilities(caps: api_pb2.Capability, privileged: bool) -> list[str]:
    """containerd's order: ALL added, ALL dropped, then single adds, then single drops."""
    if privileged:
        return list(ALL_CAPABILITIES)
    base = "config.linux.security_context.capabilities"
    add, drop = list(caps.add_capabilities), list(caps.drop_capabilities)
    result = set(DEFAULT_CAPABILITIES)
    if any(c.upper() == "ALL" for c in add):
        result = set(ALL_CAPABILITIES)
    if any(c.upper() == "ALL" for c in drop):
        result = set()
    for i, c in enumerate(add):
        if c.upper() != "ALL":
            result.add(_cap_name(c, f"{base}.add_capabilities[{i}]"))
    for i, c in enumerate(drop):
        if c.upper() != "ALL":
            result.discard(_cap_name(c, f"{base}.drop_capabilities[{i}]"))
    return [c for c in ALL_CAPABILITIES if c in result]


def _capabilities_block(caps: list[str], ambient_raw: Iterable[str]) -> dict:
    field = "config.linux.security_context.capabilities.add_ambient_capabilities"
    ambient = [_cap_name(c, f"{field}[{i}]") for i, c in enumerate(ambient_raw)]
    ambient = [c for c in ambient if c in caps]
    block = {"bounding": caps, "effective": caps, "permitted": caps}
    if ambient:
        block["inheritable"] = ambient
        block["ambient"] = ambient
    return block


# ---------------------------------------------------------------- seccomp


def _load_localhost_profile(path: str, field: str) -> dict:
    if not path.startswith("/"):
        raise InvalidArgument(f"{field}: localhost seccomp profile {path!r} must be absolute")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SECCOMP_PROFILE_BYTES + 1)
    except OSError as e:
        raise InvalidArgument(f"{field}: cannot read seccomp profile {path!r}: "
                              f"{e.strerror}") from None
    if len(raw) > MAX_SECCOMP_PROFILE_BYTES:
        raise InvalidArgument(f"{field}: seccomp profile {path!r} is larger than "
                              f"{MAX_SECCOMP_PROFILE_BYTES} bytes")
    try:
        profile = json.loads(raw)
    except ValueError as e:
        raise InvalidArgument(f"{field}: seccomp profile {path!r} is not valid JSON: {e}") from None
    if not isinstance(profile, dict) or not isinstance(profile.get("defaultAction"), str):
        raise InvalidArgument(f"{field}: seccomp profile {path!r} has no defaultAction")
    return profile


def resolve_seccomp(sec: api_pb2.LinuxContainerSecurityContext, caps: list[str]) -> dict | None:
    """The linux.seccomp block, or None for unconfined. Privileged is handled by the caller."""
    base = "config.linux.security_context"
    if sec.HasField("seccomp"):
        prof = sec.seccomp
        if prof.profile_type == api_pb2.SecurityProfile.RuntimeDefault:
            return seccomp.default_profile(caps)
        if prof.profile_type == api_pb2.SecurityProfile.Unconfined:
            return None
        return _load_localhost_profile(prof.localhost_ref, f"{base}.seccomp.localhost_ref")
    path = sec.seccomp_profile_path
    if path in ("", "unconfined"):
        return None
    if path in ("runtime/default", "docker/default"):
        return seccomp.default_profile(caps)
    if path.startswith("localhost/"):
        return _load_localhost_profile(path[len("localhost/"):], f"{base}.seccomp_profile_path")
    raise InvalidArgument(f"{base}.seccomp_profile_path: unknown profile {path!r}")


# ---------------------------------------------------------------- mounts


def _depth(destination: str) -> int:
    clean = posixpath.normpath(destination)
    return 0 if clean == "/" else clean.count("/")


def _standard_mounts(privileged: bool) -> list[dict]:
    ro = [] if privileged else ["ro"]
    if privileged:
        # Not rbind: the guest's own /dev/pts, /dev/shm... must not come along.
        dev = {"destination": "/dev", "type": "bind", "source": "/dev",
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
        mount = _bind(posixpath.normpath(m.container_path), guest.guest_path(m.host_path),
                      m.readonly, propagation)
        if m.recursive_read_only:
            mount["options"].append("rro")
        cri_mounts.append(mount)
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
    # runtime's own". A pod-shared (or target) PID namespace is likewise the guest's.
    # POD is the proto's zero value, so with no namespace_options at all the container
    # gets its own PID namespace (what the kubelet asks for unless shareProcessNamespace).
    namespaces = [{"type": "mount"}]
    opts = sec.namespace_options
    if not sec.HasField("namespace_options") or opts.pid == api_pb2.CONTAINER:
        namespaces.append({"type": "pid"})
    namespaces.append({"type": "cgroup"})
    return namespaces


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

    image_user = image_config.get("User") or ""
    if not isinstance(image_user, str):
        raise InvalidArgument("image config User: must be a string")
    extra_env = [("HOSTNAME", sandbox_config.hostname)] if sandbox_config.hostname else []
    if config.tty:
        extra_env.append(("TERM", "xterm"))
    caps = resolve_capabilities(sec.capabilities, privileged)
    process = {
        "terminal": bool(config.tty),
        "user": resolve_user(sec, image_user, read_image_file),
        "args": resolve_args(config.command, config.args, image_config),
        "env": merge_env(image_strings(image_config, "Env"),
                         [(kv.key, kv.value) for kv in config.envs], extra_env),
        "cwd": config.working_dir or image_working_dir(image_config),
        "capabilities": _capabilities_block(caps, sec.capabilities.add_ambient_capabilities),
        "noNewPrivileges": bool(sec.no_new_privs),
        "oomScoreAdj": int(config.linux.resources.oom_score_adj),
    }

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
