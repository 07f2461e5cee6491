"""The streaming server over the real guest agent code (run on the host with
--listen-unix) and the real host AgentClient: ProcessStreams are paramiko channels,
port-forward goes through the agent's direct-tcpip relay. This is the path the VMs use,
minus the VM."""
import os
import time

import pytest
from cri_api.v1 import api_pb2

from tests.support import spdy_client
from tests.support.streaming_fake import EchoServer
from tests.support.ws_client import WSClient
from vmcri import errors
from vmcri.channel import AgentClient
from vmcri.config import Config
from vmcri.streaming.server import StreamingServer

pytestmark = pytest.mark.timeout(120)


class AgentBackend:
    """What the integrator's backend does, over one AgentClient; container "c1" is a
    process id in the agent."""

    def __init__(self, client: AgentClient):
        self.client = client

    def check_container(self, container_id):
        if container_id != "c1":
            raise errors.NotFound(f"container {container_id} not found")

    def check_sandbox(self, sandbox_id):
        if sandbox_id != "pod1":
            raise errors.NotFound(f"pod sandbox {sandbox_id} not found")

    def exec(self, container_id, cmd, tty, stdin):
        return self.client.open_process(cmd, tty=tty, stdin=stdin)

    def attach(self, container_id, stdin, tty):
        return self.client.attach("main", stdin=stdin)

    def port_forward(self, sandbox_id, port):
        t = self.client._ensure(time.monotonic() + 10)
        return t.open_channel("direct-tcpip", ("127.0.0.1", port), ("127.0.0.1", 0), timeout=10)


@pytest.fixture
def agent(dev_agent):
    client = AgentClient(dev_agent, call_timeout=20)
    client.wait_ready(20)
    yield client
    client.close()


@pytest.fixture
def server(agent):
    srv = StreamingServer(Config(streaming_port=0), AgentBackend(agent))
    srv.start()
    yield srv
    srv.stop()


def test_exec_over_spdy_through_the_agent(server):
    url = server.get_exec(api_pb2.ExecRequest(
        container_id="c1", cmd=["sh", "-c", "cat; echo err >&2; exit 3"],
        stdin=True, stdout=True, stderr=True)).url
    res = spdy_client.exec_url(url, stdin=b"via paramiko\n" * 10000)
    assert res.stdout == b"via paramiko\n" * 10000
    assert res.stderr == b"err\n"
    assert res.exit_code == 3


def test_exec_tty_resize_through_the_agent(server):
    url = server.get_exec(api_pb2.ExecRequest(
        container_id="c1", cmd=["sh", "-c", "while read a; do stty size; done"],
        stdin=True, stdout=True, tty=True)).url
    s = spdy_client.ExecSession(url, stdin=True, tty=True)
    s.resize(111, 33)
    # resize and stdin travel on different streams: ask again until the new size shows
    deadline = time.monotonic() + 30
    while b"33 111" not in s.output() and time.monotonic() < deadline:
        s.send(b"\n")
        time.sleep(0.1)
    s.send(b"\x04")   # ^D ends the read loop
    res = s.wait()
    assert b"33 111" in res.stdout and res.exit_code == 0


def test_exec_over_websocket_through_the_agent(server):
    url = server.get_exec(api_pb2.ExecRequest(
        container_id="c1", cmd=["sh", "-c", "cat; exit 2"], stdin=True, stdout=True)).url
    c = WSClient(url, ["v5.channel.k8s.io"])
    c.send(0, b"ws via agent")
    c.close_channel(0)
    out = c.collect()
    assert out[1] == b"ws via agent"
    assert b'"message":"2"' in out[3]


def test_attach_through_the_agent(server, agent):
    # stdout only: whether stdin survives its first channel's close is the agent's business
    agent.open_process(["sh", "-c", "sleep 0.5; echo from main; echo and more"], id="main").close()
    url = server.get_attach(api_pb2.AttachRequest(container_id="c1", stdout=True)).url
    res = spdy_client.exec_url(url, stderr=False)
    assert res.stdout == b"from main\nand more\n"
    assert res.status["status"] == "Success"


def test_port_forward_through_the_agent_relay(server):
    echo = EchoServer()
    try:
        url = server.get_port_forward(api_pb2.PortForwardRequest(pod_sandbox_id="pod1")).url
        with spdy_client.PortForwardClient.connect(url) as pf:
            payload = os.urandom(300_000)
            reply, err = pf.roundtrip(echo.port, payload)
            assert reply == payload and err == b""
            reply, err = pf.roundtrip(1, b"x")
            assert reply == b"" and b"error forwarding port 1" in err
    finally:
        echo.close()
