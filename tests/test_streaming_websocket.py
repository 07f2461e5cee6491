"""Exec, attach and port-forward over WebSocket channel protocols (wsproto client)."""
import json
import struct
import time

import pytest
from cri_api.v1 import api_pb2

from tests.support.streaming_fake import EchoServer, FakeBackend
from tests.support.ws_client import WSClient, WSRejected
from vmcri.config import Config
from vmcri.streaming.server import StreamingServer

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def backend():
    return FakeBackend(containers={"c1": ["sh", "-c", "cat"]})


@pytest.fixture
def server(backend):
    srv = StreamingServer(Config(streaming_port=0), backend)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def echo():
    e = EchoServer()
    yield e
    e.close()


def exec_url(srv, cmd, **kw):
    kw.setdefault("stdout", True)
    kw.setdefault("stderr", not kw.get("tty"))
    return srv.get_exec(api_pb2.ExecRequest(container_id="c1", cmd=cmd, **kw)).url


def test_v5_stdin_close_signal_ends_stdin(server):
    c = WSClient(exec_url(server, ["sh", "-c", "cat; echo done >&2"], stdin=True),
                 ["v5.channel.k8s.io", "v4.channel.k8s.io"])
    assert c.protocol == "v5.channel.k8s.io"
    c.send(0, b"over websocket\n")
    c.close_channel(0)   # without it cat would never end
    out = c.collect()
    assert out[1] == b"over websocket\n" and out[2] == b"done\n"
    assert json.loads(out[3]) == {"metadata": {}, "status": "Success"}


def test_v5_exit_code_status(server):
    out = WSClient(exec_url(server, ["sh", "-c", "exit 3"]), ["v5.channel.k8s.io"]).collect()
    st = json.loads(out[3])
    assert st["reason"] == "NonZeroExitCode"
    assert st["details"]["causes"] == [{"reason": "ExitCode", "message": "3"}]


def test_v4_binary_exec(server):
    c = WSClient(exec_url(server, ["sh", "-c", "echo out; echo err >&2; exit 4"]), ["v4.channel.k8s.io"])
    assert c.protocol == "v4.channel.k8s.io"
    out = c.collect()
    assert out[1] == b"out\n" and out[2] == b"err\n"
    assert json.loads(out[3])["details"]["causes"][0]["message"] == "4"


def test_v4_base64_exec_uses_text_frames(server):
    c = WSClient(exec_url(server, ["sh", "-c", "head -c 3 /dev/zero; printf '\\377'"]),
                 ["v4.base64.channel.k8s.io"])
    assert c.protocol == "v4.base64.channel.k8s.io" and not c.binary
    out = c.collect()
    assert out[1] == b"\0\0\0\xff"
    assert json.loads(out[3])["status"] == "Success"


@pytest.mark.parametrize("protocol", ["base64.channel.k8s.io", "channel.k8s.io", "v3.channel.k8s.io"])
def test_older_websocket_protocols_report_text_errors(server, protocol):
    out = WSClient(exec_url(server, ["sh", "-c", "echo x; exit 2"]), [protocol]).collect()
    assert out[1] == b"x\n"
    assert out[3] == b"command terminated with non-zero exit code: exit status 2"


def test_no_subprotocol_means_plain_channel_protocol(server):
    c = WSClient(exec_url(server, ["echo", "hi"]), [])
    assert c.protocol is None
    assert c.collect()[1] == b"hi\n"


def test_unsupported_subprotocol_is_rejected(server):
    with pytest.raises(WSRejected) as ei:
        WSClient(exec_url(server, ["true"]), ["v9.channel.k8s.io"])
    assert ei.value.status == 400 and b"v5.channel.k8s.io" in ei.value.body


def test_tty_resize_channel(server, backend):
    c = WSClient(exec_url(server, ["sh", "-c", "read a; stty size"], stdin=True, tty=True),
                 ["v5.channel.k8s.io"])
    c.resize(132, 43)
    deadline = time.monotonic() + 20
    while not (backend.channels and backend.channels[-1].resizes) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert backend.channels[-1].resizes == [(132, 43)]
    c.send(0, b"\n")
    out = c.collect()
    assert b"43 132" in out[1] and 2 not in out


def test_attach_over_websocket(server):
    url = server.get_attach(api_pb2.AttachRequest(container_id="c1", stdin=True, stdout=True)).url
    c = WSClient(url, ["v5.channel.k8s.io"])
    c.send(0, b"attached")
    c.close_channel(0)
    assert c.collect()[1] == b"attached"


def test_port_forward_v4_prefixes_ports_and_echoes(server, echo):
    url = server.get_port_forward(api_pb2.PortForwardRequest(pod_sandbox_id="pod1", port=[echo.port])).url
    c = WSClient(url, ["v4.channel.k8s.io"])
    msgs = c.messages()
    first = dict([next(msgs), next(msgs)])
    assert first == {0: struct.pack("<H", echo.port), 1: struct.pack("<H", echo.port)}
    c.send(0, b"ping over ws")
    got = b""
    while got != b"ping over ws":
        ch, data = next(msgs)
        assert ch == 0
        got += data
    c.close()


def test_port_forward_ports_from_the_query_and_two_ports(server, echo):
    other = EchoServer()
    try:
        url = server.get_port_forward(api_pb2.PortForwardRequest(pod_sandbox_id="pod1")).url
        c = WSClient(f"{url}?port={echo.port}&port={other.port}", ["portforward.k8s.io"])
        msgs = c.messages()
        prefixes = dict(next(msgs) for _ in range(4))
        assert prefixes[2] == struct.pack("<H", other.port)
        c.send(2, b"to the second port")
        ch, data = next(msgs)
        assert (ch, data) == (2, b"to the second port")
        c.close()
    finally:
        other.close()


def test_port_forward_backend_failure_goes_to_the_error_channel(server):
    url = server.get_port_forward(api_pb2.PortForwardRequest(pod_sandbox_id="pod1", port=[1])).url
    out = WSClient(url, ["v4.channel.k8s.io"]).collect()
    assert out[1].startswith(struct.pack("<H", 1))
    assert b"error forwarding port 1" in out[1]


def test_spdy_tunnelled_through_websocket_port_forward(server, echo):
    """client-go's SPDYOverWebsocketDialer (crictl --transport websocket, kubectl 1.31+)."""
    from tests.support.spdy_client import PortForwardClient
    from vmcri.streaming.spdy_session import Connection
    from vmcri.streaming.websocket import WSByteStream
    url = server.get_port_forward(api_pb2.PortForwardRequest(pod_sandbox_id="pod1")).url
    c = WSClient(url, ["SPDY/3.1+portforward.k8s.io"])
    assert c.protocol == "SPDY/3.1+portforward.k8s.io"
    c.sock.settimeout(None)
    conn = Connection(WSByteStream(c.sock, c.ws), server=False, name="tunnel-client").start()
    with PortForwardClient(conn) as pf:
        payload = bytes(range(256)) * 1000
        assert pf.roundtrip(echo.port, payload) == (payload, b"")
        assert pf.roundtrip(echo.port, b"second pair") == (b"second pair", b"")
