"""HostEngine: the container operations of a host sandbox (crun on the host, each
container watched by conmon). It is the host implementation of
vmcri.container.engine.ContainerEngine; the VM implementation talks to the guest agent.

It keeps no state of its own: crun's state dir, conmon's pid and exit files and the
container's bundle say everything, so an engine made after a daemon restart picks up
containers that kept running meanwhile.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import os
import secrets
import shutil
import signal as signals
import socket
import subprocess
import threading
import time

from vmcri.errors import DeadlineExceeded, FailedPrecondition, NotFound, Unavailable
from vmcri.hostpod import cgroups, conmon, stream
from vmcri.hostpod import spec as spec_mod
from vmcri.hostpod.conmon import MonitorFiles

log = logging.getLogger(__name__)
CLONE_NEWNET = 0x40000000
EXIT_FILE_WAIT_S = 5.0
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _signal_name(name: str) -> str:
    name = str(name).upper().removeprefix("SIG")
    if not name.isdigit():
        signals.Signals["SIG" + name]  # KeyError for an unknown name
    return name


class HostEngine:
    kind = "host"

    def __init__(self, runtime, bundle_of, pod: dict):
        """bundle_of(container_id) -> the container's bundle dir (config.json, rootfs/).
        pod: the sandbox's row from vmcri.hostpod.sandbox.setup() (namespaces, etc, shm)."""
        self.rt = runtime
        self.bundle_of = bundle_of
        self.pod = pod
        self.network_ns = pod.get("network", "")

    # -- the bundle ---------------------------------------------------------------------
    def build_spec(self, container_id: str, config, sandbox_config, image_config: dict,
                   read_image_file, sandbox_id: str) -> dict:
        """The container's config.json (the shared builder, host paths and namespaces)."""
        pod = dict(self.pod)
        target = config.linux.security_context.namespace_options.target_id
        if target:
            pid = self.state(target).get("pid")
            if not pid:
                raise FailedPrecondition(f"config.linux.security_context.namespace_options."
                                         f"target_id: container {target[:12]} is not running")
            pod["target_pid"] = f"/proc/{pid}/ns/pid"
        return spec_mod.build(container_id, config, sandbox_config, image_config, pod=pod,
                              read_image_file=read_image_file, sandbox_id=sandbox_id,
                              cgroups=self.rt.cgroups)

    def files(self, container_id: str) -> MonitorFiles:
        return MonitorFiles(self.bundle_of(container_id), container_id)

    def _spec(self, container_id: str) -> dict:
        try:
            with open(os.path.join(self.bundle_of(container_id), "config.json"), "rb") as f:
                return json.loads(f.read(16 << 20))
        except (OSError, ValueError) as e:
            raise NotFound(f"container {container_id[:12]} has no bundle: {e}") from None

    def _crun(self, what: str, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
        try:
            return self.rt.crun_run(*args, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise Unavailable(f"crun {what} on the host did not finish in {timeout:.0f}s") from e

    # -- lifecycle --------------------------------------------------------------------
    def create(self, container_id: str, log_path: str = "", tty: bool = False,
               stdin: bool = False, stdin_once: bool = False) -> int:
        files = self.files(container_id)
        return conmon.create(self.rt, files, log_path or os.path.join(files.bundle, "container.log"),
                             tty=tty, stdin=stdin, stdin_once=stdin_once)

    def start(self, container_id: str) -> None:
        done = self._crun("start", "start", container_id)
        if done.returncode != 0:
            raise Unavailable(f"crun start on the host failed: {_err(done)}")

    def kill(self, container_id: str, signal: str) -> None:
        done = self._crun("kill", "kill", container_id, _signal_name(signal))
        if done.returncode != 0 and self.state(container_id).get("status") not in ("stopped", "unknown"):
            raise Unavailable(f"crun kill on the host failed: {_err(done)}")

    def state(self, container_id: str) -> dict:
        """{"status": created|running|stopped|unknown, "pid", "exit_code", "oom_killed"}."""
        files = self.files(container_id)
        code = conmon.exit_code(files)
        if code is not None:
            return {"status": "stopped", "pid": 0, "exit_code": code,
                    "oom_killed": conmon.oom_killed(files)}
        done = self._crun("state", "state", container_id)
        try:
            st = json.loads(done.stdout) if done.returncode == 0 else {}
        except ValueError:
            st = {}
        status = st.get("status") if isinstance(st, dict) else None
        if status in ("created", "running", "paused"):
            return {"status": "running" if status == "paused" else status,
                    "pid": int(st.get("pid") or 0)}
        # stopped, or gone: conmon writes the exit file as it sees the exit
        if conmon.wait_monitor(files, EXIT_FILE_WAIT_S):
            code = conmon.exit_code(files)
            if code is not None:
                return {"status": "stopped", "pid": 0, "exit_code": code,
                        "oom_killed": conmon.oom_killed(files)}
        return {"status": "unknown" if not status else "stopped", "pid": 0, "exit_code": 137,
                "oom_killed": False}

    def wait(self, container_id: str, timeout: float | None = None) -> dict | None:
        """The final state once conmon has gone; None on timeout."""
        if not conmon.wait_monitor(self.files(container_id), timeout):
            return None
        return self.state(container_id)

    def watch(self, container_id: str, on_exit) -> threading.Thread:
        """on_exit(state) on a thread once the container has ended (at once if it has)."""
        def run():
            st = self.wait(container_id)
            try:
                on_exit(st)
            except Exception:
                log.exception("exit of host container %s", container_id[:12])
        t = threading.Thread(target=run, name=f"hostwatch-{container_id[:12]}", daemon=True)
        t.start()
        return t

    def delete(self, container_id: str) -> None:
        """Remove the container from crun and its cgroup; stop conmon. Safe to repeat."""
        files = self.files(container_id)
        try:
            spec = self._spec(container_id)
        except NotFound:
            spec = {}
        done = self._crun("delete", "delete", "-f", container_id)
        if done.returncode != 0 and os.path.isdir(os.path.join(self.rt.crun_root, container_id)):
            raise Unavailable(f"crun delete on the host failed: {_err(done)}")
        if not conmon.wait_monitor(files, EXIT_FILE_WAIT_S):
            pid = conmon.monitor_pid(files)
            if pid:
                os.kill(pid, signals.SIGKILL)
                conmon.wait_monitor(files, EXIT_FILE_WAIT_S)
        cg = (spec.get("linux") or {}).get("cgroupsPath")
        if cg:
            left = cgroups.remove(cg)
            if left:
                log.warning("host container %s: cgroups left: %s", container_id[:12], left)
        link = os.path.join(self.rt.socket_dir, files.cuuid)
        if os.path.islink(link):
            os.unlink(link)
        for d in (files.exit_dir, files.persist_dir):
            shutil.rmtree(d, ignore_errors=True)

    # -- processes ----------------------------------------------------------------------
    def _process_file(self, container_id: str, argv: list[str], cwd: str,
                      process: dict | None = None, tty: bool = False) -> str:
        """The exec'd process: the container's own process (user, groups, capabilities,
        no_new_privs, rlimits, env), given or read from its config.json, with another
        argv; crun applies the container's seccomp, namespaces and cgroup."""
        base = process if process is not None else self._spec(container_id)["process"]
        process = json.loads(json.dumps(base))
        process.update(args=list(argv), terminal=bool(tty))
        process.pop("consoleSize", None)
        if cwd:
            process["cwd"] = cwd
        spec_mod.fit_process(process)
        path = os.path.join(self.bundle_of(container_id), f"exec-{secrets.token_hex(8)}.json")
        with open(path, "w") as f:
            json.dump(process, f)
        return path

    def exec_argv(self, container_id: str, process_file: str, pid_file: str = "") -> list[str]:
        return self.rt.crun_argv("exec", "--process", process_file,
                                 *(["--pid-file", pid_file] if pid_file else []), container_id)

    def exec_sync(self, container_id: str, argv: list[str], cwd: str = "",
                  timeout: float = 3600, max_output: int = 16 << 20,
                  process: dict | None = None) -> tuple[int, bytes, bytes]:
        proc_file = self._process_file(container_id, argv, cwd, process)
        pid_file = proc_file[:-5] + ".pid"
        try:
            chan = stream.LocalChannel(self.exec_argv(container_id, proc_file, pid_file),
                                       tty=False, stdin=False)
            out, err = bytearray(), bytearray()
            deadline = time.monotonic() + timeout
            while not chan.status_event.wait(0.01) or chan.recv_ready() or chan.recv_stderr_ready():
                out += chan.recv(1 << 16)[: max(0, max_output - len(out))]
                err += chan.recv_stderr(1 << 16)[: max(0, max_output - len(err))]
                if time.monotonic() > deadline:
                    self._kill_exec(pid_file)
                    chan.close()
                    raise DeadlineExceeded(f"ExecSync {argv[0]!r} in {container_id[:12]}: timed "
                                           f"out after {timeout}s; the process was killed")
            code = chan.exit_status
            if code != 0 and not os.path.exists(pid_file):
                # crun writes the pid file before it runs the command: crun itself failed
                raise Unavailable(f"ExecSync in {container_id[:12]}: crun exec failed: "
                                  f"{bytes(err[:500]).decode(errors='replace').strip()}")
            return code, bytes(out), bytes(err)
        finally:
            for p in (proc_file, pid_file):
                if os.path.exists(p):
                    os.unlink(p)

    def _kill_exec(self, pid_file: str) -> None:
        try:
            with open(pid_file) as f:
                os.kill(int(f.read().strip()), signals.SIGKILL)
        except (OSError, ValueError):
            pass

    def open_exec(self, container_id: str, argv: list[str], tty: bool = False,
                  stdin: bool = False, cwd: str = "", process: dict | None = None):
        """A streaming exec (a ProcessStream); with tty, on a pty crun makes in the container."""
        proc_file = self._process_file(container_id, argv, cwd, process, tty)
        if tty:
            console = os.path.join(self.rt.socket_dir, f"console-{secrets.token_hex(6)}.sock")
            argv_c = self.rt.crun_argv("exec", "--process", proc_file, "--console-socket", console,
                                       container_id)
            try:
                chan = stream.ConsoleChannel(argv_c, console, stdin=stdin)
            except OSError as e:
                os.unlink(proc_file)
                raise Unavailable(f"exec with a tty in {container_id[:12]}: {e}") from e
        else:
            chan = stream.LocalChannel(self.exec_argv(container_id, proc_file), tty=False, stdin=stdin)
        threading.Thread(target=_unlink_when_done, args=(chan, proc_file), daemon=True).start()
        return stream.process_stream(chan)

    def attach(self, container_id: str, stdin: bool = False):
        files = self.files(container_id)
        if conmon.monitor_pid(files) is None:
            raise FailedPrecondition(f"container {container_id[:12]} has no monitor to attach to")
        dir_fd = os.open(files.bundle, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.connect(conmon.attach_socket_path(files, dir_fd))
        except OSError as e:
            sock.close()
            raise Unavailable(f"attach to {container_id[:12]}: {e}") from e
        finally:
            os.close(dir_fd)

        def exit_code():
            conmon.wait_monitor(files, EXIT_FILE_WAIT_S)
            return conmon.exit_code(files)
        chan = stream.AttachChannel(sock, exit_code, stdin=stdin,
                                    resize=lambda w, h: conmon.resize(files, w, h))
        return stream.process_stream(chan)

    def port_forward(self, port: int, timeout: float = 10.0) -> socket.socket:
        """A TCP connection to 127.0.0.1:port in the pod's network namespace (the host's
        own loopback for a host-network pod)."""
        if not self.network_ns:
            return socket.create_connection(("127.0.0.1", port), timeout=timeout)
        result: list = []

        def dial():  # setns changes only this thread; the socket keeps the pod's netns
            try:
                fd = os.open(self.network_ns, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    if _libc.setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns into the pod's netns")
                finally:
                    os.close(fd)
                result.append(socket.create_connection(("127.0.0.1", port), timeout=timeout))
            except OSError as e:
                result.append(e)
        t = threading.Thread(target=dial, name="portforward-dial", daemon=True)
        t.start()
        t.join()
        if not result or isinstance(result[0], OSError):
            raise Unavailable(f"port-forward to 127.0.0.1:{port}: {result[0] if result else 'no dial'}")
        return result[0]

    # -- resources ----------------------------------------------------------------------
    def update(self, container_id: str, resources: dict) -> None:
        if self.rt.cgroups == "hybrid":
            resources = {k: v for k, v in resources.items() if k not in ("unified", "hugepageLimits")}
        path = os.path.join(self.bundle_of(container_id), f"update-{secrets.token_hex(8)}.json")
        with open(path, "w") as f:
            json.dump(resources, f)
        try:
            done = self._crun("update", "update", "--resources", path, container_id)
        finally:
            os.unlink(path)
        if done.returncode != 0:
            raise Unavailable(f"crun update on the host failed: {_err(done)}")

    def stats(self, container_id: str) -> dict | None:
        cg = (self._spec(container_id).get("linux") or {}).get("cgroupsPath")
        return cgroups.sample(cg) if cg else None

    def reopen_log(self, container_id: str) -> None:
        if not conmon.reopen_log(self.files(container_id)):
            raise FailedPrecondition(f"container {container_id[:12]} has no monitor to reopen "
                                     f"its log")


def _unlink_when_done(chan, path: str) -> None:
    chan.status_event.wait()
    try:
        os.unlink(path)
    except OSError:
        pass


def _err(done: subprocess.CompletedProcess) -> str:
    return (done.stderr or done.stdout or b"").decode(errors="replace").strip()[:1000]
