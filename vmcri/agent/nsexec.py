"""Exec into a running container without a `crun exec` process.

`crun exec` is a process start of its own, plus crun reading its state and the container's
config, on every exec: about 0.1 s under TCG. Here the agent forks, the child joins the
container's cgroup and namespaces and forks again (a pid namespace applies to children
only), and the grandchild takes the container's process identity (the OCI process object
the host built: user, groups, capabilities, no_new_privs, rlimits, oom score, umask, env,
cwd) plus the container's seccomp filter, then execs. The middle process exits at once, so
the grandchild is reparented to the agent (PID 1, or a subreaper when the agent runs as a
test process), and the agent's reaper gets its status as for any child.

Everything the children use is prepared before the fork (the agent has threads): the
children only make system calls. `plan()` returns None for what this path does not do
(a user or time namespace, an AppArmor or SELinux label), and a tty exec never comes here
(execproc.py): the caller then uses crun exec.
"""
from __future__ import annotations

import ctypes
import errno
import os
import resource
import signal
from dataclasses import dataclass, field

from . import seccompbpf

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.syscall.restype = ctypes.c_long
_libc.signal.restype = ctypes.c_void_p
_libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]

# The order the children join them in: the cgroup ns after the move into the cgroup, the
# mount ns last (it changes the root, after which /proc paths name the container's view).
NAMESPACES = (("cgroup", 0x02000000), ("ipc", 0x08000000), ("uts", 0x04000000),
              ("net", 0x40000000), ("pid", 0x20000000), ("mnt", 0x00020000))
UNSUPPORTED_NAMESPACES = ("user", "time")
CAPABILITIES = (
    "CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP "
    "LINUX_IMMUTABLE NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER "
    "SYS_MODULE SYS_RAWIO SYS_CHROOT SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE "
    "SYS_RESOURCE SYS_TIME SYS_TTY_CONFIG MKNOD LEASE AUDIT_WRITE AUDIT_CONTROL SETFCAP "
    "MAC_OVERRIDE MAC_ADMIN SYSLOG WAKE_ALARM BLOCK_SUSPEND AUDIT_READ PERFMON BPF "
    "CHECKPOINT_RESTORE").split()
CAP_NUMBER = {"CAP_" + name: i for i, name in enumerate(CAPABILITIES)}
PR_SET_KEEPCAPS, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 8, 24, 38, 47
PR_CAP_AMBIENT_RAISE = 2
SYS_CAPSET, SYS_SECCOMP, SYS_CLOSE_RANGE = 126, 317, 436
SECCOMP_SET_MODE_FILTER = 1
LINUX_CAPABILITY_VERSION_3 = 0x20080522
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAX_REPORT_BYTES = 4096


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


@dataclass
class Plan:
    """One exec, resolved down to numbers and bytes before the fork."""
    argv: list[str]
    env: dict[str, str]
    cwd: str
    uid: int
    gid: int
    groups: list[int]
    umask: int | None
    rlimits: list[tuple[int, int, int]]
    oom_score_adj: int | None
    no_new_privs: bool
    bounding: set[int]
    sets: tuple[int, int, int]  # effective, permitted, inheritable masks
    ambient: list[int]
    filter_prog: seccompbpf.Program | None
    ignored_signals: list[int] = field(default_factory=list)  # the agent's SIG_IGN ones
    cap_header: _CapHeader = field(default_factory=lambda: _CapHeader(LINUX_CAPABILITY_VERSION_3, 0))
    cap_data: ctypes.Array = None

    def __post_init__(self):
        eff, perm, inh = self.sets
        data = (_CapData * 2)()
        for i in range(2):
            data[i].effective = (eff >> (32 * i)) & 0xFFFFFFFF
            data[i].permitted = (perm >> (32 * i)) & 0xFFFFFFFF
            data[i].inheritable = (inh >> (32 * i)) & 0xFFFFFFFF
        self.cap_data = data


def _mask(names) -> int:
    m = 0
    for n in names or ():
        if n in CAP_NUMBER:  # a name the kernel may know but this table not: crun skips it too
            m |= 1 << CAP_NUMBER[n]
    return m


def _rlimit(name: str) -> int:
    res = getattr(resource, name, None)
    if not isinstance(res, int):
        raise ValueError(f"process.rlimits: unknown limit {name!r}")
    return res


def plan(process: dict, spec_info: "ContainerExecInfo") -> Plan | None:
    """The Plan of an exec of `process` (validated by protocol.py) in the container that
    `spec_info` describes, or None where crun exec must do it."""
    if spec_info.unsupported or process.get("apparmorProfile") or process.get("selinuxLabel"):
        return None
    user, caps = process["user"], process.get("capabilities") or {}
    env: dict[str, str] = {}
    for item in process.get("env", []):
        key, sep, value = item.partition("=")
        if sep and key:
            env[key] = value
    return Plan(
        argv=list(process["args"]), env=env, cwd=process["cwd"],
        uid=user["uid"], gid=user["gid"], groups=list(user.get("additionalGids", [])),
        umask=user.get("umask"),
        rlimits=[(_rlimit(r["type"]), r["soft"], r["hard"]) for r in process.get("rlimits", [])],
        oom_score_adj=process.get("oomScoreAdj"),
        no_new_privs=bool(process.get("noNewPrivileges")),
        bounding={CAP_NUMBER[n] for n in caps.get("bounding", []) if n in CAP_NUMBER},
        sets=(_mask(caps.get("effective")), _mask(caps.get("permitted")),
              _mask(caps.get("inheritable"))),
        ambient=[CAP_NUMBER[n] for n in caps.get("ambient", []) if n in CAP_NUMBER],
        filter_prog=spec_info.filter_prog,
        ignored_signals=_ignored_signals(),
    )


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return min(int(f.read().strip()), len(CAPABILITIES) - 1)
    except (OSError, ValueError):
        return len(CAPABILITIES) - 1


LAST_CAP = _last_cap()


def _ignored_signals() -> list[int]:
    """Signals the agent ignores: execve keeps SIG_IGN (handlers it resets itself)."""
    out = []
    for sig in signal.valid_signals():
        try:
            if signal.getsignal(sig) == signal.SIG_IGN:
                out.append(int(sig))
        except (ValueError, OSError):
            pass
    return out


@dataclass
class ContainerExecInfo:
    """What an exec needs from the container's config.json, kept from container_create."""
    cgroup: str | None
    filter_prog: seccompbpf.Program | None
    unsupported: str | None  # why crun exec must do it, or None


def exec_info(spec: dict, cgroup: str | None) -> ContainerExecInfo:
    linux = spec.get("linux") or {}
    kinds = {ns.get("type") for ns in linux.get("namespaces") or [] if isinstance(ns, dict)}
    for kind in UNSUPPORTED_NAMESPACES:
        if kind in kinds:
            return ContainerExecInfo(cgroup, None, f"a {kind} namespace")
    if linux.get("personality") or (spec.get("process") or {}).get("ioPriority"):
        return ContainerExecInfo(cgroup, None, "personality or ioPriority")
    profile = linux.get("seccomp")
    if not profile:
        return ContainerExecInfo(cgroup, None, None)
    try:
        return ContainerExecInfo(cgroup, seccompbpf.compile_profile(profile), None)
    except (OSError, ValueError) as e:
        return ContainerExecInfo(cgroup, None, f"seccomp profile: {e}")


def _ns_fds(target_pid: int) -> list[tuple[int, int]]:
    """(fd, CLONE_NEW*) of each namespace of target_pid that differs from the agent's."""
    fds = []
    try:
        for name, flag in NAMESPACES:
            path = f"/proc/{target_pid}/ns/{name}"
            if os.stat(path).st_ino == os.stat(f"/proc/self/ns/{name}").st_ino:
                continue
            fds.append((os.open(path, os.O_RDONLY | os.O_CLOEXEC), flag))
    except BaseException:
        for fd, _ in fds:
            os.close(fd)
        raise
    return fds


def _check(rc: int, what: bytes) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, what.decode() + ": " + os.strerror(err))


def spawn(p: Plan, target_pid: int, cgroup: str | None, stdio: tuple[int, int, int],
          reaper) -> int:
    """Start the exec; returns the exec'd process's pid once it has exec'd (or failed to
    exec, which it reports on its stderr and in its exit code, as crun does)."""
    ns = _ns_fds(target_pid)
    procs = os.path.join(cgroup, "cgroup.procs").encode() if cgroup else None
    exe_path = [p.argv[0]] if "/" in p.argv[0] else [
        os.path.join(d or ".", p.argv[0]) for d in p.env.get("PATH", DEFAULT_PATH).split(":")]
    report_r, report_w = os.pipe2(os.O_CLOEXEC)
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            _middle(p, ns, procs, stdio, report_w, exe_path)
        os.close(report_w)
        report_w = -1
        reaper.watch(pid, lambda status: None)
        report = bytearray()
        while len(report) < MAX_REPORT_BYTES:
            chunk = os.read(report_r, MAX_REPORT_BYTES)
            if not chunk:
                break
            report += chunk
    finally:
        for fd in (report_r, report_w, *(fd for fd, _ in ns)):
            if fd >= 0:
                os.close(fd)
    lines = bytes(report).decode(errors="replace").splitlines()
    child = next((int(line[1:]) for line in lines if line.startswith("P") and line[1:].isdigit()), 0)
    failure = next((line[1:] for line in lines if line.startswith("E")), None)
    if child > 0 and failure is not None:
        reaper.watch(child, lambda status: None)
    if failure is not None or child <= 0:
        raise OSError(errno.EPROTO, f"exec in the container: {failure or 'no process started'}")
    return child


def _middle(p, ns, procs, stdio, report_w, exe_path):  # pragma: no cover - child
    try:
        if procs is not None:
            with open(procs, "wb", buffering=0) as f:
                f.write(b"0")
        for fd, flag in ns:
            _check(_libc.setns(fd, flag), b"setns")
        child = os.fork()
        if child == 0:
            _final(p, stdio, report_w, exe_path)
        os.write(report_w, b"P%d\n" % child)
    except BaseException as e:
        _report(report_w, e)
    os._exit(0)


def _report(fd: int, e: BaseException) -> None:  # pragma: no cover - child
    try:
        os.write(fd, f"E{type(e).__name__}: {e}\n".encode(errors="replace")[:MAX_REPORT_BYTES])
    except OSError:
        pass


def _final(p: Plan, stdio, report_w, exe_path):  # pragma: no cover - child
    try:
        os.setsid()
        for target, fd in enumerate(stdio):
            os.dup2(fd, target, inheritable=True)
        _close_from(3, report_w)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        for sig in p.ignored_signals:
            _libc.signal(sig, 0)  # SIG_DFL: the agent ignores SIGPIPE, which exec would keep
        if p.oom_score_adj is not None:
            with open("/proc/self/oom_score_adj", "wb", buffering=0) as f:
                f.write(str(p.oom_score_adj).encode())
        for res, soft, hard in p.rlimits:
            resource.setrlimit(res, (soft, hard))
        if p.umask is not None:
            os.umask(p.umask)
        os.chdir(p.cwd)
        if p.filter_prog is not None and not p.no_new_privs:
            _load_filter(p)  # without no_new_privs only a privileged caller may load it
        _identity(p)
        if p.filter_prog is not None and p.no_new_privs:
            _load_filter(p)  # as late as possible: the filter then sees only the exec
    except BaseException as e:
        _report(report_w, e)
        os._exit(1)
    last = errno.ENOENT
    for path in exe_path:
        try:
            os.execve(path, p.argv, p.env)
        except OSError as e:
            if e.errno != errno.ENOENT or last == errno.ENOENT:
                last = e.errno
    os.write(2, f"executable file `{p.argv[0]}` not found in $PATH: {os.strerror(last)}\n".encode()
             if last == errno.ENOENT else f"exec `{p.argv[0]}`: {os.strerror(last)}\n".encode())
    os._exit(127 if last == errno.ENOENT else 126)


def _close_from(first: int, keep: int) -> None:  # pragma: no cover - child
    """Close every fd from `first` up but `keep`: close_range(2), not a loop of close."""
    for lo, hi in ((first, keep - 1), (keep + 1, 0xFFFFFFFF)):
        if lo <= hi and _libc.syscall(ctypes.c_long(SYS_CLOSE_RANGE), ctypes.c_long(lo), ctypes.c_long(hi), ctypes.c_long(0)) != 0:
            os.closerange(lo, min(hi + 1, 65536))


def _identity(p: Plan) -> None:  # pragma: no cover - child
    for cap in range(LAST_CAP + 1):
        if cap not in p.bounding:
            _check(_libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), b"drop from the bounding set")
    os.setgroups(p.groups)
    os.setresgid(p.gid, p.gid, p.gid)
    _check(_libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0), b"keepcaps")
    os.setresuid(p.uid, p.uid, p.uid)
    _check(_libc.syscall(ctypes.c_long(SYS_CAPSET), ctypes.byref(p.cap_header), p.cap_data), b"capset")
    for cap in p.ambient:
        _check(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0), b"ambient capability")
    if p.no_new_privs:
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), b"no_new_privs")


def _load_filter(p: Plan) -> None:  # pragma: no cover - child
    _check(_libc.syscall(ctypes.c_long(SYS_SECCOMP), ctypes.c_long(SECCOMP_SET_MODE_FILTER), ctypes.c_long(p.filter_prog.flags),
                         ctypes.byref(p.filter_prog.fprog)), b"seccomp")
