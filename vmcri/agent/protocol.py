"""Agent protocol: the one definition both the guest agent and the host client import.

Transport: one SSH connection (host = client, agent = server, auth "none") over the
virtio-serial port named PORT_NAME, started by the session sync of sync.py (the host's
HELLO, echoed by the agent) so that nothing of an earlier connection leaks into it.

Every call is one SSH session channel:
  1. the host sends an `exec` request whose command string is `<method> <json-object>`
     (at most MAX_REQUEST_BYTES);
  2. the agent answers with ONE JSON line on the channel's stdout (at most MAX_REPLY_BYTES):
     {"ok": true, "result": {...}}  or  {"ok": false, "error": {"type": ..., "message": ...}}
  3. control calls end there (exit-status 0, channel closed). Streaming calls (`run`,
     `attach`) then carry the process's stdout/stderr as channel data / extended data
     and its stdin as channel data from the host; `pty-req` before the exec asks for a
     tty, `window-change` resizes it, `signal` (RFC 4254 6.9, name without "SIG") signals
     it, and the exit code arrives as `exit-status` (128+N when killed by signal N).

Port-forward (CRI PortForward) is a `direct-tcpip` channel to one of FORWARD_HOSTS and a
port; the agent connects inside the guest and relays (EOF passed on as half-close).

A process started by `run` outlives the channel: output produced while nobody is attached
is kept (PROCESS_BUFFER_BYTES per process, oldest dropped first, counted in `dropped`),
and `attach` with the process id resumes its stream and exit status.

A container (`container_create`, crun in the guest) is such an entry too, under its
container id, kept until `container_delete`: `attach` streams its init's output and exit
status; several attachers may be on at once (`live` ones get output from now on only).
Its bundle is always container_bundle(id), inside the host-shared 9p mount.

This module is stdlib only: it runs inside the guest.
"""
from __future__ import annotations

import ipaddress
import json
import re

PORT_NAME = "vmcri.agent"
SHARE_TAG = "vmcri-share"
SHARE_MOUNT = "/run/vmcri/share"
# The same export through a second 9p device, mounted with the guest's page cache
# (cache=loose), for container root filesystems only (host config rootfs_cache, default
# "loose"). The host never writes into a running container's rootfs, and qemu exports with
# multidevs=remap, so files of different host mounts never share a qid the cache trusts.
# Volumes (hostPath, configMap...) stay on SHARE_MOUNT, uncached, because the host changes them.
ROOTFS_TAG = "vmcri-rootfs"
ROOTFS_MOUNT = "/run/vmcri/rootfs"
READY_MARKER = "VMCRI-AGENT-READY"
# Placeholders of the OCI spec the host writes; the agent swaps in the real guest paths.
POD_PID_NS = "/run/vmcri/ns/pod/pid"            # the pod's PID namespace (its pod init's)
TARGET_PID_NS_PREFIX = "/run/vmcri/ns/container/"  # + <id>/pid: a container's PID namespace
POD_DEV_DIR = "/run/vmcri/pod-dev"              # /dev of a privileged container: the pod's devices
PHASE_PREFIX = "VMCRI-PHASE"

MAX_REQUEST_BYTES = 30_000       # fits one SSH packet
MAX_REPLY_BYTES = 1 << 20
PROCESS_BUFFER_BYTES = 1 << 20
MAX_ETC_FILE_BYTES = 16_384
ETC_FILES = ("hosts", "resolv.conf", "hostname")

STREAMING = frozenset({"run", "attach"})
FORWARD_HOSTS = ("127.0.0.1", "localhost", "::1")

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HOST_RE = re.compile(r"^(?=.{1,64}$)[A-Za-z0-9]([A-Za-z0-9-]{0,62}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}[A-Za-z0-9])?)*$")
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SIGNALS = ("HUP", "INT", "QUIT", "KILL", "USR1", "USR2", "TERM", "STOP", "CONT", "WINCH", "ALRM")


class ProtocolError(ValueError):
    """A request or reply does not follow the protocol; the message names the field."""


# -- field checks --------------------------------------------------------------

def _str(field, v, max_len=4096, allow_empty=False):
    if not isinstance(v, str):
        raise ProtocolError(f"{field}: expected a string, got {type(v).__name__}")
    if not v and not allow_empty:
        raise ProtocolError(f"{field}: must not be empty")
    if len(v) > max_len:
        raise ProtocolError(f"{field}: longer than {max_len} characters")
    if "\0" in v:
        raise ProtocolError(f"{field}: contains a NUL byte")
    return v


def _int(field, v, lo, hi):
    if not isinstance(v, int) or isinstance(v, bool):
        raise ProtocolError(f"{field}: expected an integer, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise ProtocolError(f"{field}: {v} is outside {lo}..{hi}")
    return v


def _bool(field, v):
    if not isinstance(v, bool):
        raise ProtocolError(f"{field}: expected true or false, got {type(v).__name__}")
    return v


def _list(field, v, max_items):
    if not isinstance(v, list):
        raise ProtocolError(f"{field}: expected a list, got {type(v).__name__}")
    if len(v) > max_items:
        raise ProtocolError(f"{field}: more than {max_items} items")
    return v


def check_id(field, v):
    _str(field, v, 64)
    if not _ID_RE.match(v):
        raise ProtocolError(f"{field}: {v!r} is not a valid id ([A-Za-z0-9_.-], at most 64)")
    return v


def _hostname(field, v):
    _str(field, v, 64)
    if not _HOST_RE.match(v):
        raise ProtocolError(f"{field}: {v!r} is not a valid hostname")
    return v


def _cidr(field, v):
    _str(field, v, 64)
    try:
        iface = ipaddress.ip_interface(v)
    except ValueError:
        raise ProtocolError(f"{field}: {v!r} is not an address with prefix (e.g. 10.0.0.2/24)") from None
    if "/" not in v:
        raise ProtocolError(f"{field}: {v!r} needs a prefix length")
    return str(iface)


def _ip(field, v):
    _str(field, v, 64)
    try:
        return str(ipaddress.ip_address(v))
    except ValueError:
        raise ProtocolError(f"{field}: {v!r} is not an IP address") from None


# -- per-method parameter validation -------------------------------------------

def _no_params(p):
    return {}


def _set_hostname(p):
    return {"hostname": _hostname("hostname", p.get("hostname"))}


def _write_etc(p):
    files = p.get("files")
    if not isinstance(files, dict) or not files:
        raise ProtocolError("files: expected a non-empty object of file name -> content")
    out = {}
    for name, content in files.items():
        if name not in ETC_FILES:
            raise ProtocolError(f"files.{name}: only {', '.join(ETC_FILES)} may be written")
        out[name] = _str(f"files.{name}", content, MAX_ETC_FILE_BYTES, allow_empty=True)
    return {"files": out}


def _configure_nic(p):
    mac = _str("mac", p.get("mac"), 17).lower()
    if not _MAC_RE.match(mac):
        raise ProtocolError(f"mac: {mac!r} is not a MAC address (aa:bb:cc:dd:ee:ff)")
    out = {"mac": mac, "addresses": [], "routes": []}
    for i, a in enumerate(_list("addresses", p.get("addresses", []), 32)):
        out["addresses"].append(_cidr(f"addresses[{i}]", a))
    for i, r in enumerate(_list("routes", p.get("routes", []), 64)):
        if not isinstance(r, dict):
            raise ProtocolError(f"routes[{i}]: expected an object with dst and optional gw")
        unknown = set(r) - {"dst", "gw"}
        if unknown:
            raise ProtocolError(f"routes[{i}].{sorted(unknown)[0]}: unknown field")
        dst = r.get("dst")
        if dst != "default":
            try:
                dst = str(ipaddress.ip_network(_str(f"routes[{i}].dst", dst, 64), strict=False))
            except ValueError:
                raise ProtocolError(f"routes[{i}].dst: {dst!r} is not 'default' or a network") from None
        route = {"dst": dst}
        if r.get("gw") is not None:
            route["gw"] = _ip(f"routes[{i}].gw", r["gw"])
        out["routes"].append(route)
    if p.get("mtu") not in (None, 0):  # 0 or absent: leave the MTU alone
        out["mtu"] = _int("mtu", p["mtu"], 68, 65535)
    if p.get("name") is not None:
        name = _str("name", p["name"], 15)
        if not _IFNAME_RE.match(name):
            raise ProtocolError(f"name: {name!r} is not a valid interface name")
        out["name"] = name
    return out


def _run(p):
    if p.get("container_exec") is not None:
        # exec in a container: the agent makes argv (crun exec --process ...)
        if p.get("argv") is not None:
            raise ProtocolError("argv: not allowed with container_exec")
        out = {"container_exec": _container_exec(p["container_exec"], p.get("tty", False))}
    else:
        argv = _list("argv", p.get("argv"), 4096)
        if not argv:
            raise ProtocolError("argv: must not be empty")
        out = {"argv": [_str(f"argv[{i}]", a, 16384, allow_empty=(i > 0))
                        for i, a in enumerate(argv)]}
    env = p.get("env", {})
    if not isinstance(env, dict) or len(env) > 1024:
        raise ProtocolError("env: expected an object of at most 1024 NAME -> value")
    for k, v in env.items():
        if not _ENV_KEY_RE.match(k):
            raise ProtocolError(f"env.{k}: not a valid variable name")
        _str(f"env.{k}", v, 16384, allow_empty=True)
    out["env"] = dict(env)
    cwd = p.get("cwd", "/")
    if not _str("cwd", cwd, 4096).startswith("/"):
        raise ProtocolError(f"cwd: {cwd!r} must be an absolute path")
    out["cwd"] = cwd
    out["tty"] = _bool("tty", p.get("tty", False))
    out["stdin"] = _bool("stdin", p.get("stdin", False))
    if p.get("id") is not None:
        out["id"] = check_id("id", p["id"])
    return out


_TOKEN_RE = re.compile(r"^[0-9a-f]{16}$")
_CAP_RE = re.compile(r"^CAP_[A-Z_]{1,32}$")
_PROCESS_KEYS = {"terminal", "user", "args", "env", "cwd", "capabilities", "noNewPrivileges",
                 "oomScoreAdj", "rlimits", "apparmorProfile", "selinuxLabel"}
EXEC_DIR = "/run/vmcri/exec"
# native: the agent joins the container itself (nsexec.py); crun: `crun exec` per exec
EXEC_RUNNERS = ("native", "crun")


def exec_pid_file(token: str) -> str:
    """Where `crun exec` of a container_exec writes the exec'd process's pid (ExecSync
    kills it there on a timeout); removed when crun exec ends."""
    return f"{EXEC_DIR}/{token}.pid"


def _ints(field, v, max_items=256):
    return [_int(f"{field}[{i}]", x, 0, (1 << 32) - 2) for i, x in enumerate(_list(field, v, max_items))]


def _oci_process(field, p, tty):
    """An OCI process object from the host's spec builder, type-checked key by key."""
    if not isinstance(p, dict):
        raise ProtocolError(f"{field}: expected an object")
    for key in p:
        if key not in _PROCESS_KEYS:
            raise ProtocolError(f"{field}.{str(key)[:40]}: unknown field")
    out = dict(p)
    args = _list(f"{field}.args", p.get("args"), 4096)
    if not args:
        raise ProtocolError(f"{field}.args: must not be empty")
    for i, a in enumerate(args):
        _str(f"{field}.args[{i}]", a, 16384, allow_empty=i > 0)
    for i, e in enumerate(_list(f"{field}.env", p.get("env", []), 4096)):
        _str(f"{field}.env[{i}]", e, 65536, allow_empty=True)
    if not _str(f"{field}.cwd", p.get("cwd"), 4096).startswith("/"):
        raise ProtocolError(f"{field}.cwd: must be an absolute path")
    if _bool(f"{field}.terminal", p.get("terminal", False)) != tty:
        raise ProtocolError(f"{field}.terminal: must match tty ({tty})")
    user = p.get("user")
    if not isinstance(user, dict) or set(user) - {"uid", "gid", "additionalGids", "umask"}:
        raise ProtocolError(f"{field}.user: expected an object with uid, gid, additionalGids")
    for k in ("uid", "gid"):
        _int(f"{field}.user.{k}", user.get(k), 0, (1 << 32) - 2)
    _ints(f"{field}.user.additionalGids", user.get("additionalGids", []))
    caps = p.get("capabilities", {})
    if not isinstance(caps, dict) or set(caps) - {"bounding", "effective", "permitted",
                                                   "inheritable", "ambient"}:
        raise ProtocolError(f"{field}.capabilities: expected an object of capability sets")
    for k, names in caps.items():
        for i, c in enumerate(_list(f"{field}.capabilities.{k}", names, 64)):
            if not isinstance(c, str) or not _CAP_RE.match(c):
                raise ProtocolError(f"{field}.capabilities.{k}[{i}]: not a capability name")
    _bool(f"{field}.noNewPrivileges", p.get("noNewPrivileges", False))
    _int(f"{field}.oomScoreAdj", p.get("oomScoreAdj", 0), -1000, 1000)
    for i, r in enumerate(_list(f"{field}.rlimits", p.get("rlimits", []), 64)):
        if not isinstance(r, dict) or set(r) != {"type", "hard", "soft"}:
            raise ProtocolError(f"{field}.rlimits[{i}]: expected type, hard and soft")
        _str(f"{field}.rlimits[{i}].type", r["type"], 32)
        _int(f"{field}.rlimits[{i}].hard", r["hard"], 0, (1 << 64) - 1)
        _int(f"{field}.rlimits[{i}].soft", r["soft"], 0, (1 << 64) - 1)
    for k in ("apparmorProfile", "selinuxLabel"):
        if k in p:
            _str(f"{field}.{k}", p[k], 4096, allow_empty=True)
    return out


def _container_exec(ce, tty):
    if not isinstance(ce, dict) or not {"id", "token", "process"} <= set(ce) <= \
            {"id", "token", "process", "runner"}:
        raise ProtocolError("container_exec: expected an object with id, token, process "
                            "and optionally runner")
    token = _str("container_exec.token", ce["token"], 16)
    if not _TOKEN_RE.match(token):
        raise ProtocolError("container_exec.token: expected 16 hex digits")
    runner = ce.get("runner", "native")
    if runner not in EXEC_RUNNERS:
        raise ProtocolError(f"container_exec.runner: {str(runner)[:40]!r} is not one of "
                            f"{', '.join(EXEC_RUNNERS)}")
    return {"id": check_id("container_exec.id", ce["id"]), "token": token, "runner": runner,
            "process": _oci_process("container_exec.process", ce["process"], tty)}


def _attach(p):
    # live: output from now on only, leaving the replay buffer to the log pump (containers)
    out = {"id": check_id("id", p.get("id")), "stdin": _bool("stdin", p.get("stdin", False)),
           "live": _bool("live", p.get("live", False))}
    # offsets (log pump): bytes of each stream the host already has; replay starts after them
    offsets = p.get("offsets")
    if offsets is not None:
        if not isinstance(offsets, dict) or set(offsets) - {"stdout", "stderr"}:
            raise ProtocolError("offsets: expected {\"stdout\": N, \"stderr\": M}")
        out["offsets"] = {k: _int(f"offsets.{k}", v, 0, 1 << 62) for k, v in offsets.items()}
    return out


# -- containers (crun in the guest; handlers in handlers_container.py) ----------------

_SYSCTL_RE = re.compile(r"^[a-z0-9_]+(\.[a-z0-9_]+)+$")


def target_pid_ns(container_id: str) -> str:
    return f"{TARGET_PID_NS_PREFIX}{container_id}/pid"


def container_bundle(container_id: str) -> str:
    """The only bundle a container may use: its dir in the host-shared 9p mount."""
    return f"{SHARE_MOUNT}/containers/{container_id}"


def _container_id(p):
    return {"id": check_id("id", p.get("id"))}


def _container_create(p):
    cid = check_id("id", p.get("id"))
    bundle = _str("bundle", p.get("bundle"), 4096)
    if bundle.rstrip("/") != container_bundle(cid):
        raise ProtocolError(f"bundle: must be {container_bundle(cid)!r}, got {bundle[:200]!r}")
    return {"id": cid, "bundle": container_bundle(cid), "tty": _bool("tty", p.get("tty", False)),
            "stdin": _bool("stdin", p.get("stdin", False)),
            "stdin_once": _bool("stdin_once", p.get("stdin_once", False))}


def _container_kill(p):
    return {"id": check_id("id", p.get("id")), "signal": check_signal(p.get("signal", "KILL"))}


def _set_sysctls(p):
    sysctls = p.get("sysctls")
    if not isinstance(sysctls, dict) or len(sysctls) > 256:
        raise ProtocolError("sysctls: expected an object of at most 256 name -> value")
    out = {}
    for name, value in sysctls.items():
        if len(name) > 256 or not _SYSCTL_RE.match(name) or ".." in name:
            raise ProtocolError(f"sysctls.{name[:80]}: not a sysctl name ([a-z0-9_] parts joined by '.')")
        value = _str(f"sysctls.{name}", value, 4096, allow_empty=True)
        if "\n" in value:
            raise ProtocolError(f"sysctls.{name}: value contains a newline")
        out[name] = value
    return {"sysctls": out}


MAX_GUEST_CPUS = 256


def _set_cpus_online(p):
    """Kata's OnlineCPUMem for vCPU hotplug: cpu0..count-1 online, the rest offline, after
    waiting up to wait_ms for hot-added CPUs to appear."""
    return {"count": _int("count", p.get("count"), 1, MAX_GUEST_CPUS),
            "wait_ms": _int("wait_ms", p.get("wait_ms", 5000), 0, 30_000)}


_RESOURCE_KEYS = {
    "cpu": {"shares", "quota", "period", "cpus", "mems"},
    "memory": {"limit", "swap"},
    "hugepageLimits": None,
    "unified": None,
}


def _container_update(p):
    """OCI linux.resources for `crun update`; only the keys crun update applies."""
    out = {"id": check_id("id", p.get("id"))}
    res = p.get("resources")
    if not isinstance(res, dict):
        raise ProtocolError("resources: expected an object (OCI linux.resources)")
    for key, value in res.items():
        if key not in _RESOURCE_KEYS:
            raise ProtocolError(f"resources.{key}: not updatable")
        allowed = _RESOURCE_KEYS[key]
        if allowed is not None:
            if not isinstance(value, dict) or set(value) - allowed:
                raise ProtocolError(f"resources.{key}: expected an object with {sorted(allowed)}")
            for k, v in value.items():
                if k in ("cpus", "mems"):
                    _str(f"resources.{key}.{k}", v, 256)
                else:
                    _int(f"resources.{key}.{k}", v, -1, 1 << 62)
    if len(json.dumps(res)) > 16384:
        raise ProtocolError("resources: too large")
    out["resources"] = res
    return out


_HEX_RE = re.compile(r"^[0-9a-f]*$")


def _clone_init(p):
    seed = _str("seed", p.get("seed"), 1024)
    if len(seed) % 2 or len(seed) < 64 or not _HEX_RE.match(seed):
        raise ProtocolError("seed: expected 32..512 bytes as lowercase hex")
    machine_id = _str("machine_id", p.get("machine_id"), 32)
    if len(machine_id) != 32 or not _HEX_RE.match(machine_id):
        raise ProtocolError("machine_id: expected 32 lowercase hex digits")
    return {"time_ns": _int("time_ns", p.get("time_ns"), 0, 2**63 - 1), "seed": seed,
            "machine_id": machine_id}


METHODS = {
    "ping": _no_params,
    "info": _no_params,
    "set_hostname": _set_hostname,
    "write_etc": _write_etc,
    "configure_nic": _configure_nic,
    "run": _run,
    "attach": _attach,
    "shutdown": _no_params,
    "container_create": _container_create,
    "container_start": _container_id,
    "container_kill": _container_kill,
    "container_state": _container_id,
    "container_delete": _container_id,
    "container_stats": _container_id,
    "container_metrics": _container_id,
    "sandbox_stats": _no_params,
    "set_sysctls": _set_sysctls,
    "container_update": _container_update,
    "set_cpus_online": _set_cpus_online,
    "clone_init": _clone_init,
    "pod_init_start": _no_params,
}


def validate(method: str, params) -> dict:
    """Normalised params for `method`, or ProtocolError naming the bad field."""
    if method not in METHODS:
        raise ProtocolError(f"method: unknown method {method!r}")
    if not isinstance(params, dict):
        raise ProtocolError("params: expected a JSON object")
    return METHODS[method](params)


def encode_request(method: str, params: dict) -> str:
    params = validate(method, params)
    cmd = f"{method} {json.dumps(params, separators=(',', ':'))}"
    if len(cmd.encode()) > MAX_REQUEST_BYTES:
        raise ProtocolError(f"params: request is larger than {MAX_REQUEST_BYTES} bytes")
    return cmd


def decode_request(command: bytes | str) -> tuple[str, dict]:
    if isinstance(command, str):
        command = command.encode("utf-8", "surrogatepass")
    if len(command) > MAX_REQUEST_BYTES:
        raise ProtocolError(f"request: larger than {MAX_REQUEST_BYTES} bytes")
    try:
        command = command.decode("utf-8", "strict")
    except UnicodeDecodeError:
        raise ProtocolError("request: not valid UTF-8") from None
    method, _, body = command.partition(" ")
    if method not in METHODS:
        raise ProtocolError(f"method: unknown method {method[:64]!r}")
    try:
        params = json.loads(body) if body.strip() else {}
    except ValueError as e:
        raise ProtocolError(f"params: not valid JSON ({e})") from None
    return method, validate(method, params)


def encode_reply(result: dict | None = None, error: tuple[str, str] | None = None) -> bytes:
    if error is not None:
        msg = {"ok": False, "error": {"type": error[0], "message": error[1][:4096]}}
    else:
        msg = {"ok": True, "result": result or {}}
    data = json.dumps(msg, separators=(",", ":")).encode() + b"\n"
    if len(data) > MAX_REPLY_BYTES:
        return encode_reply(error=("Internal", "reply too large"))
    return data


def decode_reply(line: bytes) -> dict:
    """The reply object ({"ok":..., ...}); ProtocolError if it is malformed."""
    if len(line) > MAX_REPLY_BYTES:
        raise ProtocolError(f"reply: larger than {MAX_REPLY_BYTES} bytes")
    try:
        msg = json.loads(line.decode("utf-8", "strict"))
    except ValueError as e:
        raise ProtocolError(f"reply: not valid JSON ({e})") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("ok"), bool):
        raise ProtocolError("reply: expected an object with boolean 'ok'")
    if msg["ok"]:
        if not isinstance(msg.get("result", {}), dict):
            raise ProtocolError("reply.result: expected an object")
    else:
        err = msg.get("error")
        if not isinstance(err, dict) or not isinstance(err.get("message"), str) or not isinstance(err.get("type"), str):
            raise ProtocolError("reply.error: expected an object with string type and message")
    return msg


def check_signal(name) -> str:
    _str("signal", name, 16)
    if name not in _SIGNALS:
        raise ProtocolError(f"signal: {name!r} is not one of {', '.join(_SIGNALS)}")
    return name
