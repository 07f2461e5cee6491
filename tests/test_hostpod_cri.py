"""Host sandboxes through a real daemon: pods asking for the node's network, PID or IPC
namespace (or the `host` runtime handler) run on the host under crun + conmon, and every
CRI call reaches them through the same container RPCs as VM pods (vmcri.hostpod)."""
from __future__ import annotations

import glob
import json
import os
import platform
import queue
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time

import grpc
import pytest
from cri_api.v1 import api_pb2 as pb

from tests.support.fx_registry import free_port
from tests.support.pods import wait_for
from tests.support.spdy_client import ExecSession, PortForwardClient, exec_url

NODE = pb.NamespaceMode.NODE
pytestmark = [pytest.mark.registry,
              pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("conmon")
                                 or not shutil.which("crun"), reason="needs root, crun, conmon")]
CRI_LINE = re.compile(rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}(Z|[+-]\d\d:\d\d) "
                      rb"(stdout|stderr) (F|P) (.*)$")


class Env:
    def __init__(self, d, image: str, log_dir: str):
        self.d, self.image, self.log_dir = d, image, log_dir
        self.pods: list[str] = []

    @property
    def cri(self):
        return self.d.runtime

    def pod_config(self, name: str, handler_host: bool = False, **ns) -> pb.PodSandboxConfig:
        cfg = pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, namespace="hostpod",
                                           uid=secrets.token_hex(8)),
            hostname=name, log_directory=os.path.join(self.log_dir, name + secrets.token_hex(3)))
        for field, mode in ns.items():
            setattr(cfg.linux.security_context.namespace_options, field, mode)
        return cfg

    def run_pod(self, name: str, handler: str = "", **ns) -> tuple[str, pb.PodSandboxConfig]:
        cfg = self.pod_config(name, **ns)
        sid = self.cri.RunPodSandbox(pb.RunPodSandboxRequest(
            config=cfg, runtime_handler=handler)).pod_sandbox_id
        self.pods.append(sid)
        return sid, cfg

    def create(self, sid, cfg, name: str, command: list[str], stdin: bool = False,
               tty: bool = False) -> str:
        config = pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name=name), image=pb.ImageSpec(image=self.image),
            command=command, log_path=f"{name}.log", stdin=stdin, stdin_once=stdin, tty=tty)
        # as the kubelet does: the container's namespace options are the pod's
        config.linux.security_context.namespace_options.CopyFrom(
            cfg.linux.security_context.namespace_options)
        return self.cri.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=sid, sandbox_config=cfg, config=config)).container_id

    def start(self, sid, cfg, name: str, command: list[str], **kw) -> str:
        cid = self.create(sid, cfg, name, command, **kw)
        self.cri.StartContainer(pb.StartContainerRequest(container_id=cid))
        return cid

    def state(self, cid: str) -> int:
        return self.cri.ContainerStatus(pb.ContainerStatusRequest(container_id=cid)).status.state

    def wait_running(self, cid: str) -> None:
        wait_for(lambda: self.state(cid) == pb.ContainerState.CONTAINER_RUNNING, "running", 60)

    def exec(self, cid: str, cmd: list[str], timeout: int = 30) -> tuple[int, bytes]:
        r = self.cri.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=cmd, timeout=timeout))
        return r.exit_code, r.stdout

    def remove(self, sid: str) -> None:
        self.cri.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid))
        self.cri.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid))
        if sid in self.pods:
            self.pods.remove(sid)


@pytest.fixture(scope="module")
def env(daemon_factory, test_images, tmp_path_factory):
    d = daemon_factory('cni_conf_dir = ""\ninsecure_registries = ["%s"]' % test_images.registry)
    d.image.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=test_images.multi.ref)))
    e = Env(d, test_images.multi.ref, str(tmp_path_factory.mktemp("hostpod-logs")))
    yield e
    for sid in list(e.pods):  # a host pod's conmon and infra outlive the daemon by design
        try:
            e.remove(sid)
        except grpc.RpcError:
            pass


def log_entries(path: str) -> list[tuple[bytes, bytes]]:
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    out = []
    for line in lines:
        m = CRI_LINE.match(line)
        assert m, f"not a CRI log line: {line!r}"
        out.append((m.group(2), m.group(4)))
    return out


def http_get(port: int, connect=None) -> bytes | None:
    try:
        s = connect() if connect else socket.create_connection(("127.0.0.1", port), timeout=2)
    except OSError:
        return None
    with s:
        s.sendall(b"GET /index.html HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        return data


def httpd(port: int, text: str) -> list[str]:
    return ["sh", "-c", f"echo {text} > /tmp/index.html; exec httpd -f -p 127.0.0.1:{port} -h /tmp"]


def verbose(env, sid: str) -> dict:
    r = env.cri.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid, verbose=True))
    return json.loads(r.info["info"])


# -- which sandbox a pod gets ----------------------------------------------------------

def test_host_network_pod_listens_on_a_host_port(env):
    sid, cfg = env.run_pod("hnet", network=NODE)
    port = free_port()
    cid = env.start(sid, cfg, "web", httpd(port, "hi-from-host-pod"))
    got = wait_for(lambda: http_get(port), "the pod's server on the host's 127.0.0.1", 30)
    assert got.endswith(b"\r\n\r\nhi-from-host-pod\n")
    info = verbose(env, sid)
    assert info["kind"] == "host" and info["hostNamespaces"] == ["network"]
    st = env.cri.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid)).status
    assert st.state == pb.PodSandboxState.SANDBOX_READY
    assert st.linux.namespaces.options.network == NODE
    code, out = env.exec(cid, ["hostname"])
    assert code == 0 and out.decode().strip() == socket.gethostname()  # the node's UTS
    listed = env.cri.ListPodSandbox(pb.ListPodSandboxRequest(
        filter=pb.PodSandboxFilter(id=sid))).items
    assert [p.state for p in listed] == [pb.PodSandboxState.SANDBOX_READY]
    env.remove(sid)
    assert http_get(port) is None


def test_host_pid_pod_sees_a_host_process(env):
    marker = subprocess.Popen(["sleep", f"{700 + secrets.randbelow(200)}.5"])
    try:
        sid, cfg = env.run_pod("hpid", pid=NODE)
        cid = env.start(sid, cfg, "c", ["sleep", "1000"])
        env.wait_running(cid)
        code, out = env.exec(cid, ["cat", f"/proc/{marker.pid}/cmdline"])
        assert code == 0 and out.split(b"\0")[:2] == [b"sleep", marker.args[1].encode()]
        env.remove(sid)
    finally:
        marker.kill()
        marker.wait()


def _shm_ids(text: bytes) -> set[str]:
    return {line.split()[1] for line in text.decode().splitlines()[1:] if line.split()}


def test_host_ipc_pod_sees_a_host_sysv_segment(env):
    made = subprocess.run(["ipcmk", "-M", "4096"], capture_output=True, text=True, check=True)
    shmid = re.search(r"(\d+)", made.stdout).group(1)
    try:
        sid, cfg = env.run_pod("hipc", ipc=NODE)
        cid = env.start(sid, cfg, "c", ["sleep", "1000"])
        env.wait_running(cid)
        code, out = env.exec(cid, ["cat", "/proc/sysvipc/shm"])
        assert code == 0 and shmid in _shm_ids(out)
        # a host pod by handler keeps a private IPC namespace: the segment is not there
        sid2, cfg2 = env.run_pod("hprivate", handler="host")
        assert verbose(env, sid2)["kind"] == "host"
        cid2 = env.start(sid2, cfg2, "c", ["sleep", "1000"])
        env.wait_running(cid2)
        _, out2 = env.exec(cid2, ["cat", "/proc/sysvipc/shm"])
        assert shmid not in _shm_ids(out2)
        env.remove(sid)
        env.remove(sid2)
    finally:
        subprocess.run(["ipcrm", "-m", shmid], check=False)


# -- the same CRI surface ------------------------------------------------------------

def test_exec_attach_and_port_forward_through_the_streaming_server(env):
    sid, cfg = env.run_pod("hstream", network=NODE)
    port = free_port()
    web = env.start(sid, cfg, "web", httpd(port, "forwarded"))
    talker = env.start(sid, cfg, "talker", ["sh", "-c", "read line; echo got-$line; sleep 1000"],
                       stdin=True)
    wait_for(lambda: http_get(port), "the server", 30)
    # exec: the host's own kernel answers (no VM)
    url = env.cri.Exec(pb.ExecRequest(container_id=web, cmd=["uname", "-r"], stdout=True,
                                      stderr=True)).url
    res = exec_url(url)
    assert res.exit_code == 0 and res.stdout.decode().strip() == platform.release()
    url = env.cri.Exec(pb.ExecRequest(container_id=web, cmd=["sh", "-c", "cat; exit 5"],
                                      stdin=True, stdout=True, stderr=True)).url
    res = exec_url(url, stdin=b"via stdin\n")
    assert res.stdout == b"via stdin\n" and res.exit_code == 5
    url = env.cri.Exec(pb.ExecRequest(container_id=web, cmd=["sh", "-c", "tty"], tty=True,
                                      stdin=True, stdout=True)).url
    s = ExecSession(url, stdin=True, stdout=True, stderr=False, tty=True)
    s.resize(100, 30)
    s.close_stdin()
    assert "/dev/pts/" in s.wait(30).stdout.decode()
    # attach: the container's own stdin and stdout
    url = env.cri.Attach(pb.AttachRequest(container_id=talker, stdin=True, stdout=True,
                                          stderr=True)).url
    s = ExecSession(url, stdin=True, stdout=True, stderr=True)
    try:
        s.send(b"hello\n")
        wait_for(lambda: b"got-hello" in s.output(), "the attached output", 30)
    finally:
        s.conn.close()
    # port-forward in a host-network pod dials the host's loopback
    url = env.cri.PortForward(pb.PortForwardRequest(pod_sandbox_id=sid, port=[port])).url
    with PortForwardClient.connect(url) as pf:
        reply, _ = pf.roundtrip(port, b"GET /index.html HTTP/1.0\r\n\r\n")
    assert reply.endswith(b"\r\n\r\nforwarded\n")
    env.remove(sid)


def test_logs_reopen_stats_update_and_events(env):
    events: queue.Queue = queue.Queue()
    call = env.cri.GetContainerEvents(pb.GetEventsRequest())

    def listen():
        try:
            for e in call:
                events.put(e)
        except grpc.RpcError:
            pass  # cancelled at the end
    threading.Thread(target=listen, daemon=True).start()
    try:
        sid, cfg = env.run_pod("hlog", network=NODE)
        cid = env.start(sid, cfg, "talk", ["sh", "-c", "echo one; echo err >&2; sleep 2; "
                                           "echo two; exec sleep 1000"])
        log_path = os.path.join(cfg.log_directory, "talk.log")
        wait_for(lambda: len(log_entries(log_path)) >= 2, "the first lines", 30)
        assert sorted(log_entries(log_path)) == [(b"stderr", b"err"), (b"stdout", b"one")]
        os.rename(log_path, log_path + ".1")
        env.cri.ReopenContainerLog(pb.ReopenContainerLogRequest(container_id=cid))
        wait_for(lambda: os.path.exists(log_path) and log_entries(log_path), "two", 30)
        assert log_entries(log_path) == [(b"stdout", b"two")]
        stats = wait_for(lambda: (lambda s: s.cpu.usage_core_nano_seconds.value > 0 and s)(
            env.cri.ContainerStats(pb.ContainerStatsRequest(container_id=cid)).stats),
            "CPU usage from the host cgroup", 30)
        assert stats.memory.working_set_bytes.value > 0
        pod_stats = env.cri.ListPodSandboxStats(pb.ListPodSandboxStatsRequest(
            filter=pb.PodSandboxStatsFilter(id=sid))).stats
        assert [p.attributes.id for p in pod_stats] == [sid]
        env.cri.UpdateContainerResources(pb.UpdateContainerResourcesRequest(
            container_id=cid, linux=pb.LinuxContainerResources(memory_limit_in_bytes=96 << 20)))
        limits = glob.glob(f"/sys/fs/cgroup/memory/**/{cid}/memory.limit_in_bytes", recursive=True) \
            or glob.glob(f"/sys/fs/cgroup/**/{cid}/memory.max", recursive=True)
        assert limits and open(limits[0]).read().strip() == str(96 << 20)
        env.cri.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=2))
        assert env.state(cid) == pb.ContainerState.CONTAINER_EXITED
        env.remove(sid)
        seen = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "CONTAINER_DELETED_EVENT" not in seen:
            try:
                e = events.get(timeout=1)
            except queue.Empty:
                continue
            if e.container_id == cid:
                seen.append(pb.ContainerEventType.Name(e.container_event_type))
        assert seen == ["CONTAINER_CREATED_EVENT", "CONTAINER_STARTED_EVENT",
                        "CONTAINER_STOPPED_EVENT", "CONTAINER_DELETED_EVENT"]
    finally:
        call.cancel()


def test_status_lists_both_handlers(env):
    r = env.cri.Status(pb.StatusRequest(verbose=True))
    assert [h.name for h in r.runtime_handlers] == ["", "vmcri", "host"]
    handlers = {h["name"]: h["sandbox"] for h in json.loads(r.info["handlers"])}
    assert handlers == {"": "vm", "vmcri": "vm", "host": "host"}


def test_refuse_policy_names_the_field(daemon_factory, test_images):
    d = daemon_factory('cni_conf_dir = ""\nhost_namespace_pods = "refuse"')
    try:
        for field in ("network", "pid", "ipc"):
            cfg = pb.PodSandboxConfig(metadata=pb.PodSandboxMetadata(
                name=f"r-{field}", namespace="hostpod", uid=secrets.token_hex(8)))
            setattr(cfg.linux.security_context.namespace_options, field, NODE)
            with pytest.raises(grpc.RpcError) as e:
                d.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"namespace_options.{field}" in e.value.details()
            assert "virtual machine" in e.value.details()
        cfg = pb.PodSandboxConfig(metadata=pb.PodSandboxMetadata(
            name="r-handler", namespace="hostpod", uid=secrets.token_hex(8)))
        with pytest.raises(grpc.RpcError) as e:
            d.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg, runtime_handler="host"))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "runtime_handler" in e.value.details()
        names = [h.name for h in d.runtime.Status(pb.StatusRequest()).runtime_handlers]
        assert names == ["", "vmcri"]
        assert not d.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items
    finally:
        d.stop()


# -- restart and leaks ---------------------------------------------------------------

COUNTER = ["sh", "-c", "i=0; while true; do echo line-$i; i=$((i+1)); sleep 0.1; done"]


def assert_continuous(path: str) -> int:
    """Every counter line exactly once, in order; returns how many."""
    got = [text for stream, text in log_entries(path) if stream == b"stdout"]
    assert got == [f"line-{i}".encode() for i in range(len(got))], got[-20:]
    return len(got)


def kill9_and_restart(d) -> None:
    d.stop(signal.SIGKILL)
    d.start()


def test_kill9_of_the_daemon_adopts_the_host_pod(env):
    sid, cfg = env.run_pod("hrestart", network=NODE)
    cid = env.start(sid, cfg, "count", COUNTER)
    log_path = os.path.join(cfg.log_directory, "count.log")
    wait_for(lambda: os.path.exists(log_path) and len(log_entries(log_path)) >= 5, "lines", 30)
    kill9_and_restart(env.d)
    before = assert_continuous(log_path)
    time.sleep(1.0)  # the container kept running while the daemon was down and after
    assert env.state(cid) == pb.ContainerState.CONTAINER_RUNNING
    assert verbose(env, sid)["kind"] == "host"
    code, out = env.exec(cid, ["echo", "after-restart"])
    assert (code, out) == (0, b"after-restart\n")
    env.cri.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=1))
    assert env.state(cid) == pb.ContainerState.CONTAINER_EXITED
    assert assert_continuous(log_path) > before
    env.remove(sid)


def _footprint(env, ids: list[str]) -> dict:
    d = env.d
    netns_dir = os.path.join(d.run_dir, "netns")
    mounts = [line for line in open("/proc/self/mountinfo").read().splitlines()
              if any(i[:16] in line for i in ids)
              or (d.base in line and line.split()[4] != netns_dir)]  # the netns dir is a mount
    procs = []
    for p in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            text = open(p, "rb").read().replace(b"\0", b" ")
        except OSError:
            continue
        if any(i.encode() in text for i in ids) or (b"conmon" in text and d.base.encode() in text):
            procs.append(text.decode(errors="replace")[:200])
    cgs = [p for i in ids for p in glob.glob(f"/sys/fs/cgroup/**/{i}", recursive=True)]
    dirs = [p for i in ids for p in glob.glob(os.path.join(d.base, "**", i + "*"), recursive=True)
            + glob.glob(os.path.join(d.base, "**", i[:16]), recursive=True)]
    return {"mounts": mounts, "procs": procs, "cgroups": cgs, "dirs": dirs,
            "netns": os.listdir(netns_dir) if os.path.isdir(netns_dir) else []}


def test_remove_leaves_nothing(env):
    pods = [env.run_pod("hleak-net", network=NODE), env.run_pod("hleak-pid", pid=NODE),
            env.run_pod("hleak-priv", handler="host", pid=pb.NamespaceMode.POD)]
    ids = []
    for sid, cfg in pods:
        ids.append(sid)
        for name in ("a", "b"):
            cid = env.start(sid, cfg, name, ["sleep", "1000"])
            ids.append(cid)
        env.wait_running(cid)
        env.exec(cid, ["true"])
    during = _footprint(env, ids)
    assert during["procs"] and during["cgroups"] and during["mounts"]
    for sid, _ in pods:
        env.remove(sid)
        env.remove(sid)  # idempotent
    left = _footprint(env, ids)
    assert left == {"mounts": [], "procs": [], "cgroups": [], "dirs": [], "netns": []}
    assert not [p for p in env.cri.ListPodSandbox(pb.ListPodSandboxRequest()).items if p.id in ids]
    assert not [c for c in env.cri.ListContainers(pb.ListContainersRequest()).containers
                if c.id in ids]


# -- CNI: a host pod with its own netns gets one; a hostNetwork pod gets none ----------

def test_cni_for_a_private_netns_host_pod_and_none_for_host_network(daemon_factory, test_images,
                                                                     tmp_path_factory):
    from tests.support.fx_cni import NodeNetwork, run_in
    node = NodeNetwork(str(tmp_path_factory.mktemp("hostpodnet")), "10.89.7.0/24", "vmcri-tbr7")
    d = e = None
    try:
        d = daemon_factory(node.daemon_config() + f'insecure_registries = ["{test_images.registry}"]')
        d.image.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=test_images.multi.ref)))
        node.move_daemon_in(d)  # the node netns is "the host" for this daemon
        e = Env(d, test_images.multi.ref, str(tmp_path_factory.mktemp("hostpodnet-logs")))
        priv, priv_cfg = e.run_pod("hcni", handler="host")
        hnet, hnet_cfg = e.run_pod("hcni-hostnet", network=NODE)
        ip = e.cri.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=priv)).status.network.ip
        assert ip.startswith("10.89.7."), ip
        assert len(node.leases()) == 1 and len(node.veths()) == 1  # none for the hostNetwork pod
        e.start(priv, priv_cfg, "web", ["sh", "-c", "echo in-pod-netns > /tmp/index.html; "
                                         "exec httpd -f -p 8080 -h /tmp"])
        port = 18000 + secrets.randbelow(1000)
        e.start(hnet, hnet_cfg, "web", ["sh", "-c", "echo on-the-node > /tmp/index.html; "
                                        f"exec httpd -f -p {port} -h /tmp"])

        def get(addr: str) -> str:
            r = run_in(node.client, "wget", "-qO-", "-T", "2", f"http://{addr}/index.html",
                       check=False)
            return r.stdout.strip()
        assert wait_for(lambda: get(f"{ip}:8080") == "in-pod-netns", "the pod IP", 30)
        assert wait_for(lambda: get(f"{node.NODE_IP}:{port}") == "on-the-node", "the node IP", 30)
        for sid in (priv, hnet):
            e.remove(sid)
        assert node.leases() == [] and node.veths() == []
    finally:
        for sid in list(e.pods if e else []):  # conmon outlives the daemon: remove the pods
            e.remove(sid)
        if d is not None:
            d.stop()
        node.remove()
