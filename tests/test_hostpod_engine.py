"""The host-sandbox engine on real parts: crun and conmon on this host, rootfs overlays of
real image layers pulled from the test registry, pinned namespaces. No VM.

Each test builds its pod like RunPodSandbox will for a host sandbox (vmcri.hostpod.sandbox)
and its containers like CreateContainer (ocispec.build_spec + HostEngine.adjust_spec,
rootfs.mount_rootfs), then drives HostEngine. Networking: host-network pods listen only on
127.0.0.1; private pods get a bare netns made by the test (no CNI, no host config).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import time

import pytest
from cri_api.v1 import api_pb2 as pb

from tests.support.fx_registry import free_port
from vmcri.config import Config
from vmcri.container import rootfs, safepath
from vmcri.container.rootfs import ContainerDirs
from vmcri.errors import DeadlineExceeded
from vmcri.hostpod import cgroups, conmon, sandbox
from vmcri.hostpod.runner import HostEngine
from vmcri.hostpod.runtime import HostRuntime
from vmcri.image.service import ImageService
from vmcri.network import netns
from vmcri.sandbox import hostfs
from vmcri.sandbox.designer import SandboxPaths
from vmcri.store import Store

pytestmark = [pytest.mark.registry,
              pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("conmon")
                                 or not shutil.which("crun"), reason="needs root, crun, conmon")]
CRI_LINE = re.compile(rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}(Z|[+-]\d\d:\d\d) "
                      rb"(stdout|stderr) (F|P) (.*)$")


@pytest.fixture(scope="module")
def host(tmp_path_factory, test_images):
    base = tmp_path_factory.mktemp("hostpod")
    cfg = Config(root_dir=str(base / "root"), run_dir=str(base / "run"))
    store = Store(cfg.db_path)
    images = ImageService(cfg, store)
    images.pull(test_images.multi.ref)
    rt = HostRuntime(cfg.run_dir)
    rt.check()
    yield cfg, images, rt, test_images.multi.ref
    store.close()
    netns.release_dir(cfg.netns_dir)


class Pod:
    def __init__(self, host, ns: dict[str, int] | None = None, private_net: bool = False):
        self.cfg, self.images, self.rt, self.image_ref = host
        self.id = secrets.token_hex(32)
        self.paths = SandboxPaths.for_sandbox(self.cfg, self.id)
        os.makedirs(self.paths.state_dir, mode=0o700)
        self.config = pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name="hp", namespace="t", uid=self.id[:8]),
            hostname="hp-pod")
        opts = self.config.linux.security_context.namespace_options
        for field, mode in (ns or {}).items():
            setattr(opts, field, mode)
        self.netns = netns.create(self.cfg.netns_dir, self.id) if private_net else ""
        self.row = sandbox.setup(self.paths.share_dir, self.config, self.netns)
        self.engine = self.new_engine()
        self.containers: list[str] = []

    def new_engine(self) -> HostEngine:
        """As a restarted daemon makes it: from the row alone."""
        return HostEngine(self.rt, lambda cid: self.dirs(cid).bundle, dict(self.row))

    def dirs(self, cid: str) -> ContainerDirs:
        return ContainerDirs.make(self.paths.share_dir, self.paths.state_dir, cid)

    def create(self, command: list[str], log: bool = True, stdin: bool = False,
               tty: bool = False, **sec) -> tuple[str, str]:
        cid = secrets.token_hex(32)
        config = pb.ContainerConfig(metadata=pb.ContainerMetadata(name=f"c{len(self.containers)}"),
                                    image=pb.ImageSpec(image=self.image_ref), command=command,
                                    stdin=stdin, stdin_once=stdin, tty=tty)
        ctx = config.linux.security_context
        for key, value in sec.items():
            if key == "drop":
                ctx.capabilities.drop_capabilities.extend(value)
            elif key == "run_as_user":
                ctx.run_as_user.value = value
            else:
                setattr(ctx, key, value)
        ctx.namespace_options.CopyFrom(self.config.linux.security_context.namespace_options)
        image = self.images.resolve(self.image_ref)
        dirs = self.dirs(cid)
        rootfs.mount_rootfs(dirs, self.images.layer_dirs(image))
        self.containers.append(cid)
        spec = self.engine.build_spec(cid, config, self.config, image.raw_config.get("config") or {},
                                      lambda p: safepath.read_file(dirs.rootfs, p), self.id)
        with open(os.path.join(dirs.bundle, "config.json"), "w") as f:
            json.dump(spec, f)
        log_path = os.path.join(self.paths.state_dir, f"{cid[:12]}.log") if log else ""
        self.engine.create(cid, log_path=log_path, stdin=stdin, stdin_once=stdin, tty=tty)
        return cid, log_path

    def run(self, command: list[str], **kw) -> tuple[str, str]:
        cid, log_path = self.create(command, **kw)
        self.engine.start(cid)
        return cid, log_path

    def remove(self, cid: str) -> None:
        self.engine.delete(cid)
        rootfs.release(self.dirs(cid))

    def close(self) -> None:
        for cid in self.containers:
            self.remove(cid)
        sandbox.teardown(self.paths.share_dir, self.row, self.id)
        hostfs.unmount_tree(self.paths.share_dir)
        shutil.rmtree(self.paths.state_dir, ignore_errors=True)
        if self.netns:
            netns.delete_path(self.netns)


@pytest.fixture
def make_pod(host):
    pods: list[Pod] = []

    def make(**kw) -> Pod:
        pods.append(Pod(host, **kw))
        return pods[-1]
    yield make
    for p in pods:
        p.close()


def _log_entries(path: str) -> list[tuple[bytes, bytes]]:
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    out = []
    for line in lines:
        m = CRI_LINE.match(line)
        assert m, f"not a CRI log line: {line!r}"
        out.append((m.group(2), m.group(4)))
    return out


def _wait_for(check, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_container_runs_exits_with_its_code_and_logs_cri_lines(make_pod):
    pod = make_pod(ns={"network": pb.NamespaceMode.NODE})
    cid, log_path = pod.run(["sh", "-c", "echo out-line; echo err-line >&2; exit 3"])
    final = pod.engine.wait(cid, timeout=30)
    assert final["status"] == "stopped" and final["exit_code"] == 3
    entries = _log_entries(log_path)
    assert (b"stdout", b"out-line") in entries and (b"stderr", b"err-line") in entries
    assert len(entries) == 2


def test_exit_and_logs_survive_a_new_engine(make_pod):
    """What a daemon restart looks like to the engine: a fresh object, same row; conmon
    kept the container, its log, and then its exit code."""
    pod = make_pod(ns={"pid": pb.NamespaceMode.NODE})
    cid, log_path = pod.run(["sh", "-c", "echo before; sleep 2; echo after; exit 5"])
    _wait_for(lambda: os.path.getsize(log_path) > 0, what="the first log line")
    pod.engine = None  # the old daemon is gone
    engine = pod.new_engine()
    assert engine.state(cid)["status"] == "running"
    assert conmon.monitor_pid(engine.files(cid)) is not None
    final = engine.wait(cid, timeout=30)
    assert final["exit_code"] == 5
    assert [e[1] for e in _log_entries(log_path)] == [b"before", b"after"]
    pod.engine = engine


def test_exec_runs_with_the_containers_identity(make_pod):
    pod = make_pod(ns={"network": pb.NamespaceMode.NODE})
    cid, _ = pod.run(["sleep", "1000"], run_as_user=1000, no_new_privs=True,
                     drop=["CAP_NET_RAW", "CAP_CHOWN"])
    _wait_for(lambda: pod.engine.state(cid)["status"] == "running", what="running")
    code, out, err = pod.engine.exec_sync(cid, ["sh", "-c", "id -u; pwd; grep -E '^(CapEff|NoNewPrivs)' /proc/self/status"],
                                          cwd="/work", timeout=30)
    assert code == 0, err
    lines = out.decode().split("\n")
    assert lines[0] == "1000" and lines[1] == "/work"
    init_pid = pod.engine.state(cid)["pid"]
    with open(f"/proc/{init_pid}/status") as f:
        init = dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)
    assert f"CapEff:\t{init['CapEff']}" in lines
    assert "NoNewPrivs:\t1" in lines
    code, _, _ = pod.engine.exec_sync(cid, ["sh", "-c", "exit 7"], timeout=30)
    assert code == 7


def test_exec_timeout_kills_the_process(make_pod):
    pod = make_pod(ns={"network": pb.NamespaceMode.NODE})
    cid, _ = pod.run(["sleep", "1000"])
    marker = f"sleep {600 + secrets.randbelow(300)}"
    with pytest.raises(DeadlineExceeded):
        pod.engine.exec_sync(cid, marker.split(), timeout=1)
    time.sleep(0.5)
    ps = subprocess.run(["pgrep", "-f", f"^{marker}$"], capture_output=True, text=True)
    assert ps.stdout.strip() == ""


def test_kill_stops_the_container(make_pod):
    pod = make_pod(ns={"network": pb.NamespaceMode.NODE})
    cid, _ = pod.run(["sh", "-c", "trap 'exit 42' TERM; while :; do sleep 0.1; done"])
    _wait_for(lambda: pod.engine.state(cid)["status"] == "running", what="running")
    time.sleep(0.3)  # the trap is set once sh runs its loop
    pod.engine.kill(cid, "SIGTERM")
    assert pod.engine.wait(cid, timeout=30)["exit_code"] == 42
    cid2, _ = pod.run(["sleep", "1000"])
    _wait_for(lambda: pod.engine.state(cid2)["status"] == "running", what="running")
    pod.engine.kill(cid2, "KILL")
    assert pod.engine.wait(cid2, timeout=30)["exit_code"] == 137
    pod.engine.kill(cid2, "KILL")  # already stopped: still fine


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for init to reap it is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _mounts_under(path: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(path)]


def test_delete_leaves_nothing(make_pod, host):
    _, _, rt, _ = host
    pod = make_pod(ns={"network": pb.NamespaceMode.NODE})
    cid, _ = pod.run(["sleep", "1000"])
    _wait_for(lambda: pod.engine.state(cid)["status"] == "running", what="running")
    cg = f"/vmcri/{pod.id}/{cid}"
    assert cgroups.dirs_of(cg), "the container has a cgroup while it runs"
    files = pod.engine.files(cid)
    monitor = conmon.monitor_pid(files)
    pod.remove(cid)
    pod.containers.remove(cid)
    pod.remove(cid)  # twice: idempotent
    assert not os.path.exists(os.path.join(rt.crun_root, cid))
    assert not os.path.exists(pod.dirs(cid).bundle) and not os.path.exists(pod.dirs(cid).private)
    assert cgroups.dirs_of(cg) == []
    assert not _alive(monitor)
    assert not os.path.lexists(os.path.join(rt.socket_dir, files.cuuid))
    assert [m for m in _mounts_under(pod.paths.share_dir) if "/containers/" in m] == []
    pod.close()
    pod.containers = []
    assert _mounts_under(pod.paths.state_dir) == []
    assert cgroups.dirs_of(f"/vmcri/{pod.id}") == []


def _http_get(s) -> bytes:
    s.sendall(b"GET /index.html HTTP/1.0\r\n\r\n")
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    return data


def test_host_network_pod_listens_on_a_host_port(make_pod):
    pod = make_pod(ns={"network": pb.NamespaceMode.NODE})
    port = free_port()
    cid, _ = pod.run(["sh", "-c", f"echo hi > /tmp/index.html; exec httpd -f -p 127.0.0.1:{port} -h /tmp"])

    def fetch():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                return _http_get(s)
        except OSError:
            return None
    assert _wait_for(fetch, what="the pod's server on the host's loopback").endswith(b"\r\n\r\nhi\n")
    with pod.engine.port_forward(port) as s:  # port-forward dials the host's loopback
        assert _http_get(s).endswith(b"\r\n\r\nhi\n")
    code, out, _ = pod.engine.exec_sync(cid, ["hostname"], timeout=30)
    assert out.decode().strip() == socket.gethostname()  # a host-network pod has the node's UTS


def test_host_pid_pod_sees_a_host_process(make_pod):
    pod = make_pod(ns={"pid": pb.NamespaceMode.NODE})
    marker = subprocess.Popen(["sleep", f"{700 + secrets.randbelow(200)}"])
    try:
        cid, _ = pod.run(["sleep", "1000"])
        _wait_for(lambda: pod.engine.state(cid)["status"] == "running", what="running")
        code, out, _ = pod.engine.exec_sync(cid, ["cat", f"/proc/{marker.pid}/cmdline"], timeout=30)
        assert code == 0 and out.split(b"\0")[:2] == [b"sleep", marker.args[1].encode()]
    finally:
        marker.kill()
        marker.wait()


def _shm_ids(text: bytes) -> set[str]:
    return {line.split()[1] for line in text.decode().splitlines()[1:] if line.split()}


def test_host_ipc_pod_sees_a_host_sysv_segment(make_pod):
    made = subprocess.run(["ipcmk", "-M", "4096"], capture_output=True, text=True, check=True)
    shmid = re.search(r"(\d+)", made.stdout).group(1)
    try:
        pod = make_pod(ns={"ipc": pb.NamespaceMode.NODE})
        cid, _ = pod.run(["sleep", "1000"])
        _wait_for(lambda: pod.engine.state(cid)["status"] == "running", what="running")
        code, out, _ = pod.engine.exec_sync(cid, ["cat", "/proc/sysvipc/shm"], timeout=30)
        assert code == 0 and shmid in _shm_ids(out)
        private = make_pod(ns={"network": pb.NamespaceMode.NODE})  # its own IPC namespace
        cid2, _ = private.run(["sleep", "1000"])
        _wait_for(lambda: private.engine.state(cid2)["status"] == "running", what="running")
        _, out2, _ = private.engine.exec_sync(cid2, ["cat", "/proc/sysvipc/shm"], timeout=30)
        assert shmid not in _shm_ids(out2)
    finally:
        subprocess.run(["ipcrm", "-m", shmid], check=False)


def test_private_pod_shares_its_namespaces_and_forwards_inside_them(make_pod):
    """A host sandbox may still have a private netns (the `host` handler); its containers
    share it, its UTS and IPC namespaces, and port-forward dials inside it."""
    pod = make_pod(ns={"pid": pb.NamespaceMode.POD}, private_net=True)
    port = free_port()
    a, _ = pod.run(["sh", "-c", f"echo pod > /tmp/index.html; exec httpd -f -p 127.0.0.1:{port} -h /tmp"])
    b, _ = pod.run(["sleep", "1000"])
    _wait_for(lambda: pod.engine.state(b)["status"] == "running", what="running")
    _, out, _ = pod.engine.exec_sync(b, ["hostname"], timeout=30)
    assert out.decode().strip() == "hp-pod"
    # the shared PID namespace: b sees a's server
    _, ps, _ = pod.engine.exec_sync(b, ["ps", "-o", "args"], timeout=30)
    assert b"httpd" in ps
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()  # not on the host

    def forwarded():
        try:
            with pod.engine.port_forward(port) as s:
                return _http_get(s)
        except Exception:
            return None
    assert _wait_for(forwarded, what="the server in the pod's netns").endswith(b"\r\n\r\npod\n")


def test_attach_and_stdin(make_pod):
    pod = make_pod(ns={"network": pb.NamespaceMode.NODE})
    cid, log_path = pod.run(["sh", "-c", "read line; echo got-$line; exit 4"], stdin=True)
    proc = pod.engine.attach(cid, stdin=True)
    proc.send(b"hello\n")
    out = b""
    deadline = time.monotonic() + 20
    while b"got-hello" not in out and time.monotonic() < deadline:
        out += proc.channel.recv(4096)
        time.sleep(0.02)
    assert b"got-hello" in out
    assert proc.exit_status(timeout=20) == 4
    assert (b"stdout", b"got-hello") in _log_entries(log_path)


def test_stats_from_the_host_cgroup(make_pod):
    pod = make_pod(ns={"network": pb.NamespaceMode.NODE})
    cid, _ = pod.run(["sh", "-c", "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; sleep 1000"])
    _wait_for(lambda: pod.engine.state(cid)["status"] == "running", what="running")
    sample = _wait_for(lambda: (pod.engine.stats(cid) or {}).get("cpu_usage_usec", 0) > 0 and
                       pod.engine.stats(cid), what="CPU usage")
    assert sample["memory"]["current"] > 0
    pod.engine.update(cid, {"memory": {"limit": 256 << 20}})
    assert pod.engine.stats(cid)["memory"]["max"] == 256 << 20


def test_reopen_log(make_pod):
    pod = make_pod(ns={"network": pb.NamespaceMode.NODE})
    cid, log_path = pod.run(["sh", "-c", "echo one; sleep 1.5; echo two; sleep 1000"])
    _wait_for(lambda: os.path.getsize(log_path) > 0, what="the first line")
    os.rename(log_path, log_path + ".1")
    pod.engine.reopen_log(cid)
    _wait_for(lambda: os.path.exists(log_path) and os.path.getsize(log_path) > 0, what="two")
    assert [e[1] for e in _log_entries(log_path + ".1")] == [b"one"]
    assert [e[1] for e in _log_entries(log_path)] == [b"two"]


def test_oom_kill_is_reported(make_pod):
    pod = make_pod(ns={"network": pb.NamespaceMode.NODE})
    cid, _ = pod.create(["sh", "-c", "sleep 0.5; head -c 200000000 /dev/zero | tail > /dev/null"])
    spec_path = os.path.join(pod.dirs(cid).bundle, "config.json")
    assert json.load(open(spec_path))["linux"]["cgroupsPath"].endswith(cid)
    pod.engine.start(cid)
    pod.engine.update(cid, {"memory": {"limit": 32 << 20, "swap": 32 << 20}})
    final = pod.engine.wait(cid, timeout=60)
    assert final["exit_code"] != 0
    assert final["oom_killed"] is True


def test_exec_with_a_tty_made_in_the_container(make_pod):
    pod = make_pod(ns={"network": pb.NamespaceMode.NODE})
    cid, _ = pod.run(["sleep", "1000"])
    _wait_for(lambda: pod.engine.state(cid)["status"] == "running", what="running")
    proc = pod.engine.open_exec(cid, ["sh", "-c", "tty; read x; stty size; echo got-$x"],
                                tty=True, stdin=True)
    proc.resize(100, 30)
    proc.send(b"typed\n")
    out = b""
    deadline = time.monotonic() + 20
    while b"got-typed" not in out and time.monotonic() < deadline:
        out += proc.channel.recv(4096)
        time.sleep(0.02)
    assert proc.exit_status(timeout=20) == 0
    text = out.decode(errors="replace")
    assert "/dev/pts/" in text and "30 100" in text and "got-typed" in text


def test_tty_container_logs_and_attach(make_pod):
    pod = make_pod(ns={"network": pb.NamespaceMode.NODE})
    cid, log_path = pod.run(["sh", "-c", "tty; read x; echo got-$x; exit 3"], stdin=True, tty=True)
    proc = pod.engine.attach(cid, stdin=True)
    proc.resize(90, 20)
    proc.send(b"typed\n")
    assert proc.exit_status(timeout=20) == 3
    text = b" ".join(e[1] for e in _log_entries(log_path)).decode()
    assert "/dev/pts/0" in text and "got-typed" in text


def test_removal_also_unmounts_in_other_monitors_namespaces(make_pod):
    """On a cgroup hybrid host each conmon lives in its own mount namespace (runtime.py); a
    pod removed later must not stay mounted in there."""
    first = make_pod(ns={"network": pb.NamespaceMode.NODE})
    second = make_pod(ns={"network": pb.NamespaceMode.NODE})
    first.run(["sleep", "1000"])
    cid, _ = second.run(["sleep", "1000"])
    _wait_for(lambda: second.engine.state(cid)["status"] == "running", what="running")
    monitor = conmon.monitor_pid(second.engine.files(cid))

    def first_pods_mounts_there():
        with open(f"/proc/{monitor}/mountinfo") as f:
            return [line.split()[4] for line in f if first.id in line]
    assert first_pods_mounts_there(), "the later monitor's namespace got a copy of them"
    first.close()
    first.containers = []
    _wait_for(lambda: first_pods_mounts_there() == [], what="the unmounts to propagate")
