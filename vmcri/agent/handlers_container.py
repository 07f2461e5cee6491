"""Container calls: crun in the guest, one process-table entry per container.

`container_create` runs `crun create` with the container's stdio (pipes, or a pty whose
master crun hands back over the console socket); crun exits and the container's init is
reparented to the agent, whose reaper records the init's status against the entry (crun's
own exit is only the create result). The entry streams the output to attachers
(outstream.py): the host's log pump from the byte offsets it names, so output made or in
flight while the host is away is delivered exactly once, and `live` attachers (kubectl
attach) from the moment they join. Every attacher gets the init's exit status (128+N for
signal N) as SSH exit-status.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time

from . import pid1, podenv, protocol
from .handlers_system import AgentCallError
from .outstream import OutputSource

STATE_DIR = os.environ.get("VMCRI_AGENT_STATE_DIR", "/run/vmcri/containers")
SHARE_MOUNT = os.environ.get("VMCRI_AGENT_SHARE_MOUNT", protocol.SHARE_MOUNT)
CGROUP_MOUNT = "/sys/fs/cgroup"
MAX_CONFIG_BYTES = 4 << 20
MAX_CRUN_OUTPUT = 8192
CRUN_TIMEOUT_S = 60
CRUN_STATE_ROOT = "/run/crun"  # crun's default --root for uid 0 without XDG_RUNTIME_DIR
PR_SET_CHILD_SUBREAPER = 36


class ContainerEntry(OutputSource):
    """The process-table entry of one container: its init's output and exit status, kept
    until container_delete whatever was delivered."""

    delivered = False
    finished = False
    supports_live = True

    def __init__(self, cid: str, tty: bool, want_stdin: bool, stdin_once: bool, cgroup: str | None):
        super().__init__(cid, tty)
        self.want_stdin = want_stdin
        self.stdin_once = stdin_once
        self.cgroup = cgroup
        self.started = False
        self.exec_spec: dict | None = None  # what an exec needs of config.json (execproc.py)
        self.exec_info = None               # ... compiled from it at the first exec
        self.crun_start_needed = False      # the spec has poststart hooks, which only crun runs

    def _stdin_ended(self, chan, first: bool) -> bool:
        return first and self.stdin_once  # as containerd: only the first attacher's EOF counts

    def signal(self, name: str) -> None:
        sig = getattr(signal, "SIG" + protocol.check_signal(name))
        if self.pid > 0 and self.status is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def oom_killed(self) -> bool:
        """The kernel's own count: the cgroup lives on until `crun delete`."""
        if not self.cgroup:
            return False
        try:
            with open(os.path.join(self.cgroup, "memory.events")) as f:
                events = dict(line.split() for line in f if len(line.split()) == 2)
            return int(events.get("oom_kill", "0")) > 0
        except (OSError, ValueError):
            return False

    def state(self) -> dict:
        with self._lock:
            if self.status is not None:
                return {"status": "stopped", "pid": max(self.pid, 0),
                        "exit_code": pid1.exit_code(self.status), "oom_killed": self.oom_killed()}
            return {"status": "running" if self.started else "created", "pid": max(self.pid, 0),
                    "exit_code": 0}


# -- helpers ------------------------------------------------------------------------

def _crun(agent, *args: str, timeout: float = CRUN_TIMEOUT_S) -> tuple[int, str]:
    """(exit code, first MAX_CRUN_OUTPUT bytes of stdout+stderr) of a short crun call."""
    r, w = os.pipe()
    try:
        pid = agent.spawn(["crun", *args], stdin=subprocess.DEVNULL, stdout=w, stderr=w)
    finally:
        os.close(w)
    out = bytearray()
    with os.fdopen(r, "rb") as f:
        while True:
            chunk = f.read1(65536)
            if not chunk:
                break
            out += chunk[: max(0, MAX_CRUN_OUTPUT - len(out))]
    status = pid1.wait_status(agent.reaper, pid, timeout)
    if status is None:
        os.kill(pid, signal.SIGKILL)
        return 124, f"crun {args[0]} timed out"
    return pid1.exit_code(status), out.decode(errors="replace").strip()


def _read_small(path: str, limit: int = 65536) -> str:
    with open(path, "rb") as f:
        return f.read(limit).decode(errors="replace")


def _ensure_subreaper() -> None:
    # PID 1 gets every orphan anyway; the agent run as a test process on a host must ask
    if os.getpid() != 1:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _load_config(bundle: str, tty: bool) -> dict:
    path = os.path.join(bundle, "config.json")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise AgentCallError("NotFound", f"bundle: no config.json in {bundle}: {e.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise AgentCallError("InvalidArgument", f"bundle: config.json is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        spec = json.loads(raw)
    except ValueError as e:
        raise AgentCallError("InvalidArgument", f"bundle: config.json is not JSON: {e}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("process"), dict):
        raise AgentCallError("InvalidArgument", "bundle: config.json has no process object")
    if bool(spec["process"].get("terminal")) != tty:
        raise AgentCallError("InvalidArgument", f"tty: {tty} but config.json process.terminal is "
                                                f"{bool(spec['process'].get('terminal'))}")
    return spec


def _cgroup_dir(spec: dict) -> str | None:
    path = (spec.get("linux") or {}).get("cgroupsPath")
    if not isinstance(path, str) or not path.startswith("/") or ":" in path:
        return None
    full = os.path.normpath(CGROUP_MOUNT + "/" + path)
    return full if full.startswith(CGROUP_MOUNT + "/") else None


def _entry(agent, cid: str) -> ContainerEntry:
    entry = agent.procs.get(cid)
    if not isinstance(entry, ContainerEntry):
        raise AgentCallError("NotFound", f"id: no container {cid!r}")
    return entry


def _recv_pty_master(listener: socket.socket, deadline: float) -> int:
    listener.settimeout(max(0.1, deadline - time.monotonic()))
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(max(0.1, deadline - time.monotonic()))
        _, fds, _, _ = socket.recv_fds(conn, 4096, 1)
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise OSError(errno.EPROTO, "crun sent no terminal over the console socket")
    return fds[0]


# -- calls --------------------------------------------------------------------------

def container_create(agent, params):
    cid = params["id"]
    t0 = time.monotonic()
    bundle = os.path.join(SHARE_MOUNT, "containers", cid)  # = params["bundle"] in the guest
    spec = _load_config(bundle, params["tty"])
    phases = {"read_spec": time.monotonic() - t0}
    entry = ContainerEntry(cid, params["tty"], params["stdin"], params["stdin_once"], _cgroup_dir(spec))
    entry.exec_spec = _exec_spec(spec)
    hooks = spec.get("hooks") if isinstance(spec.get("hooks"), dict) else {}
    entry.crun_start_needed = bool(hooks.get("poststart"))
    try:
        agent.procs.adopt(entry)
    except FileExistsError:
        raise AgentCallError("AlreadyExists", f"id: container {cid!r} already exists") from None
    state = os.path.join(STATE_DIR, cid)
    try:
        shutil.rmtree(state, ignore_errors=True)
        os.makedirs(state, mode=0o700)
        t1 = time.monotonic()
        config = podenv.prepare_spec(cid, spec, _pod_init(agent), lambda t: _target_pid(agent, t))
        t2 = time.monotonic()
        _create(agent, entry, bundle, config, state)
        phases.update(prepare_spec=t2 - t1, crun_create=time.monotonic() - t2)
    except BaseException as e:
        agent.procs.forget(cid)
        entry.close_stdin()
        _crun(agent, "delete", "-f", cid)
        podenv.release(cid)
        if isinstance(e, AgentCallError):
            raise
        if isinstance(e, OSError):
            raise AgentCallError("Failed", f"crun create {cid}: {e}") from None
        raise
    finally:
        shutil.rmtree(state, ignore_errors=True)
    return {"id": cid, "pid": entry.pid, "phases": {k: round(v, 4) for k, v in phases.items()}}


def _exec_spec(spec: dict) -> dict:
    linux = spec.get("linux") if isinstance(spec.get("linux"), dict) else {}
    keep = {k: linux[k] for k in ("namespaces", "seccomp", "personality") if k in linux}
    return {"linux": keep, "process": {"ioPriority": spec["process"].get("ioPriority")}}


_pod_init_lock = threading.Lock()


def _pod_init(agent) -> podenv.PodInit:
    _ensure_subreaper()  # the pod init is the launcher's orphan: it must come to the agent
    with _pod_init_lock:
        if getattr(agent, "pod_init", None) is None:
            agent.pod_init = podenv.PodInit(agent)
        return agent.pod_init


def pod_init_start(agent, params):
    """Start the pod init now, in the background: the host asks for it at RunPodSandbox when
    containers will share the pod's PID namespace, so that the first CreateContainer does not
    wait for its Python start (~1 s under TCG). A failure here is only logged: the first
    create that needs the pod init starts it again and reports."""
    pod_init = _pod_init(agent)

    def start():
        try:
            pod_init.ensure()
        except Exception as e:  # noqa: BLE001 - reported by the create that needs it
            print(f"vmcri-agent: early pod init start failed: {e}", flush=True)
    threading.Thread(target=start, name="pod-init-start", daemon=True).start()
    return {"starting": True}


def _target_pid(agent, target: str) -> int:
    entry = agent.procs.get(target)
    if not isinstance(entry, ContainerEntry) or entry.status is not None or entry.pid <= 0:
        raise AgentCallError("NotFound", f"namespace_options.target_id: no running container "
                                         f"{target!r} in this pod")
    return entry.pid


def _create(agent, entry: ContainerEntry, bundle: str, config: str, state: str) -> None:
    _ensure_subreaper()
    log, pidfile = os.path.join(state, "crun.log"), os.path.join(state, "pid")
    argv = ["crun", f"--log=file:{log}", "create", "--bundle", bundle, "--config", config,
            "--pid-file", pidfile]
    close_after: list[int] = []
    listener = None
    try:
        if entry.tty:
            sock_path = os.path.join(state, "console.sock")
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(sock_path)
            listener.listen(1)
            argv += ["--console-socket", sock_path, entry.id]
            pid = agent.spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
        else:
            r_in = w_in = None
            if entry.want_stdin:
                r_in, w_in = os.pipe()
                close_after.append(r_in)
                entry._stdin_fd = w_in
            r_out, w_out = os.pipe()
            r_err, w_err = os.pipe()
            close_after += [w_out, w_err]
            entry.start_reader(r_out, 1)
            entry.start_reader(r_err, 2)
            pid = agent.spawn(argv + [entry.id], stdin=r_in if r_in is not None else subprocess.DEVNULL,
                              stdout=w_out, stderr=w_err)
        for fd in close_after:  # the container's init holds its own copies now
            os.close(fd)
        close_after = []
        status = pid1.wait_status(agent.reaper, pid, CRUN_TIMEOUT_S)
        try:
            why = _read_small(log, MAX_CRUN_OUTPUT).strip()
        except OSError:
            why = ""
        if status is None:
            os.kill(pid, signal.SIGKILL)
            raise AgentCallError("DeadlineExceeded", f"crun create {entry.id}: no answer in "
                                                     f"{CRUN_TIMEOUT_S}s (crun log: {why or 'empty'})")
        if pid1.exit_code(status) != 0:
            raise AgentCallError("Failed", f"crun create {entry.id} exited {pid1.exit_code(status)}: "
                                           f"{why or 'no message'}")
        if listener is not None:
            master = _recv_pty_master(listener, time.monotonic() + 10)
            entry._stdin_fd = master
            entry.start_reader(os.dup(master), 1)
        init_pid = int(_read_small(pidfile, 32).strip())
        if init_pid <= 1:
            raise AgentCallError("Failed", f"crun create {entry.id}: bad pid file")
        entry.pid = init_pid
        agent.reaper.watch(init_pid, entry.on_exit)
    finally:
        for fd in close_after:
            os.close(fd)
        if listener is not None:
            listener.close()


def container_start(agent, params):
    entry = _entry(agent, params["id"])
    if entry.status is not None:
        raise AgentCallError("FailedPrecondition", f"id: container {entry.id!r} has already exited")
    if entry.crun_start_needed or not _release_init(entry.id):
        rc, out = _crun(agent, "start", entry.id)
        if rc != 0:
            raise AgentCallError("Failed", f"crun start {entry.id}: {out}")
    entry.started = True
    from .execproc import exec_info  # compile the seccomp filter before the first exec needs it
    threading.Thread(target=exec_info, args=(entry,), name=f"exec-info-{entry.id[:12]}",
                     daemon=True).start()
    return entry.state()


def _release_init(cid: str) -> bool:
    """What `crun start` does without its ~0.3 s of process start under TCG: write the
    byte that the created init waits for on its exec fifo, and unlink the fifo (crun
    reads "running" from its absence). False when the fifo is not where crun 1.x keeps
    it, so that crun itself answers."""
    fifo = os.path.join(CRUN_STATE_ROOT, cid, "exec.fifo")
    try:
        # non-blocking: with no reader (the init died) this fails instead of hanging
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    except OSError as e:
        if e.errno == errno.ENXIO:
            raise AgentCallError("FailedPrecondition", f"id: container {cid!r} has exited") from None
        raise AgentCallError("Failed", f"starting {cid}: {fifo}: {e.strerror}") from None
    try:
        os.unlink(fifo)
        os.write(fd, b"\0")
    except OSError as e:
        raise AgentCallError("Failed", f"starting {cid}: {fifo}: {e.strerror}") from None
    finally:
        os.close(fd)
    return True


def container_kill(agent, params):
    entry = _entry(agent, params["id"])
    if entry.status is not None:
        return entry.state()  # already stopped: nothing to signal
    signum = int(getattr(signal, "SIG" + params["signal"]))
    rc, out = _crun(agent, "kill", entry.id, str(signum))
    if rc != 0:
        deadline = time.monotonic() + 2  # it may have exited just now: let the reaper catch up
        while entry.status is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if entry.status is None:
            raise AgentCallError("Failed", f"crun kill {entry.id}: {out}")
    return entry.state()


def container_state(agent, params):
    return _entry(agent, params["id"]).state()


def container_delete(agent, params):
    cid = params["id"]
    entry = agent.procs.get(cid)
    if entry is not None and not isinstance(entry, ContainerEntry):
        raise AgentCallError("InvalidArgument", f"id: {cid!r} is a process, not a container")
    rc, out = _crun(agent, "delete", "-f", cid)
    if rc != 0:
        known, _ = _crun(agent, "state", cid)
        if known == 0:
            raise AgentCallError("Failed", f"crun delete {cid}: {out}")
    if entry is not None:
        agent.procs.forget(cid)
        entry.close_stdin()
    podenv.release(cid)
    return {"deleted": entry is not None}


# -- stats ---------------------------------------------------------------------------

def _keyed(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


def _int_file(path: str) -> int | str | None:
    try:
        v = _read_small(path, 64).strip()
    except OSError:
        return None
    return int(v) if v.isdigit() else v


def container_stats(agent, params):
    entry = _entry(agent, params["id"])
    cg = entry.cgroup
    if cg is None or not os.path.isdir(cg):
        raise AgentCallError("NotFound", f"id: container {entry.id!r} has no cgroup")
    try:
        cpu = _keyed(_read_small(os.path.join(cg, "cpu.stat")))
        mem = _keyed(_read_small(os.path.join(cg, "memory.stat")))
    except OSError as e:
        raise AgentCallError("NotFound", f"id: cgroup of {entry.id!r} is gone: {e.strerror}") from None
    return {
        "cpu_usage_usec": cpu.get("usage_usec", 0),
        "memory": {"current": _int_file(os.path.join(cg, "memory.current")) or 0,
                   "anon": mem.get("anon", 0), "file": mem.get("file", 0),
                   "inactive_file": mem.get("inactive_file", 0), "pgfault": mem.get("pgfault", 0),
                   "pgmajfault": mem.get("pgmajfault", 0),
                   "max": _int_file(os.path.join(cg, "memory.max")) or "max"},
        "pids": _int_file(os.path.join(cg, "pids.current")) or 0,
    }


def _guest_cpu_usec() -> int:
    try:
        usec = _keyed(_read_small(os.path.join(CGROUP_MOUNT, "cpu.stat"))).get("usage_usec")
        if usec is not None:
            return usec
    except OSError:
        pass
    fields = _read_small("/proc/stat", 4096).splitlines()[0].split()[1:]
    busy = sum(int(v) for i, v in enumerate(fields[:8]) if i not in (3, 4))  # minus idle, iowait
    return busy * 1_000_000 // os.sysconf("SC_CLK_TCK")


def sandbox_stats(agent, params):
    meminfo = {}
    for line in _read_small("/proc/meminfo").splitlines():
        k, _, rest = line.partition(":")
        if rest.split():
            meminfo[k] = int(rest.split()[0]) * 1024
    vm = _keyed(_read_small("/proc/vmstat"))
    ifaces = []
    for name in sorted(os.listdir("/sys/class/net"))[:16]:
        if name == "lo":
            continue
        st = f"/sys/class/net/{name}/statistics"
        ifaces.append({"name": name, **{k: _int_file(f"{st}/{k}") or 0
                                        for k in ("rx_bytes", "rx_errors", "tx_bytes", "tx_errors", "rx_packets",
                                                  "tx_packets", "rx_dropped", "tx_dropped")}})
    return {
        "cpu_usage_usec": _guest_cpu_usec(),
        "memory": {"current": meminfo.get("MemTotal", 0) - meminfo.get("MemAvailable", 0),
                   "inactive_file": meminfo.get("Inactive(file)", 0),
                   "anon": meminfo.get("AnonPages", 0), "max": meminfo.get("MemTotal", 0),
                   "pgfault": vm.get("pgfault", 0), "pgmajfault": vm.get("pgmajfault", 0)},
        "processes": sum(1 for d in os.listdir("/proc") if d.isdigit()),
        "interfaces": ifaces,
    }


def set_sysctls(agent, params):
    done = []
    for name, value in params["sysctls"].items():
        path = os.path.join("/proc/sys", *name.split("."))
        try:
            with open(path, "w") as f:
                f.write(value)
        except OSError as e:
            raise AgentCallError("InvalidArgument", f"sysctls.{name}: {e.strerror}") from None
        done.append(name)
    return {"set": done}


HANDLERS = {
    "container_create": container_create,
    "container_start": container_start,
    "container_kill": container_kill,
    "container_state": container_state,
    "container_delete": container_delete,
    "container_stats": container_stats,
    "sandbox_stats": sandbox_stats,
    "set_sysctls": set_sysctls,
    "pod_init_start": pod_init_start,
}
