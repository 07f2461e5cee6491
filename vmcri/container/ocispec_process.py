"""The process object of the OCI spec: the container's whole process identity.

CreateContainer puts it in config.json; ExecSync and Exec give the same identity to
`crun exec --process` (exec_process), as containerd derives an exec's process from the
container's spec. Built on the host only: the bundle lives in a guest-writable share,
so identity is never read back from it.
"""
from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from typing import Callable, Iterable

from cri_api.v1 import api_pb2

from vmcri.container import seccomp
from vmcri.errors import InvalidArgument

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAX_SECCOMP_PROFILE_BYTES = 1 << 20
MAX_ID_FILE_BYTES = 4 << 20  # /etc/passwd and /etc/group beyond this are not parsed

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
    if sec.HasField("run_as_group") and not sec.HasField("run_as_user") \
            and not sec.run_as_username:
        # containerd: "user group is specified without user"
        raise InvalidArgument(f"{base}.run_as_group: user group is specified without user "
                              f"(set run_as_user or run_as_username)")
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


# ---------------------------------------------------------------- the process object


def build_process(config: api_pb2.ContainerConfig, sandbox_config: api_pb2.PodSandboxConfig,
                  image_config: dict, read_image_file: Callable[[str], bytes | None]) -> dict:
    """process of config.json: args, env, cwd, user, capabilities, no_new_privs, oom score."""
    sec = config.linux.security_context
    image_user = image_config.get("User") or ""
    if not isinstance(image_user, str):
        raise InvalidArgument("image config User: must be a string")
    extra_env = [("HOSTNAME", sandbox_config.hostname)] if sandbox_config.hostname else []
    if config.tty:
        extra_env.append(("TERM", "xterm"))
    caps = resolve_capabilities(sec.capabilities, sec.privileged)
    return {
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


def exec_process(container_process: dict, cmd: list[str], tty: bool) -> dict:
    """An exec's process, as containerd makes it: the container's process with the exec's
    args and terminal (and TERM=xterm for a tty)."""
    process = json.loads(json.dumps(container_process))
    process["args"] = list(cmd)
    process["terminal"] = bool(tty)
    if tty:
        env = [e for e in process.get("env", []) if not e.startswith("TERM=")]
        process["env"] = env + ["TERM=xterm"]
    return process
