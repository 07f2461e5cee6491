"""Port forwarding over SPDY (portforward.k8s.io) to a TCP echo server on 127.0.0.1."""
import threading

import pytest
from cri_api.v1 import api_pb2

from tests.support import spdy_client
from tests.support.spdy_client import PortForwardClient, read_all
from tests.support.streaming_fake import EchoServer, FakeBackend
from vmcri import errors
from vmcri.config import Config
from vmcri.streaming.server import StreamingServer
from vmcri.streaming.spdy_session import StreamReset

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def backend():
    return FakeBackend()


@pytest.fixture
def server(backend):
    srv = StreamingServer(Config(streaming_port=0), backend, stream_creation_timeout=1.0)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def echo():
    e = EchoServer()
    yield e
    e.close()


def pf_url(srv, ports=()):
    return srv.get_port_forward(api_pb2.PortForwardRequest(pod_sandbox_id="pod1", port=list(ports))).url


def test_echo_roundtrip(server, echo, backend):
    with PortForwardClient.connect(pf_url(server)) as pf:
        reply, err = pf.roundtrip(echo.port, b"hello through spdy")
    assert reply == b"hello through spdy" and err == b""
    assert backend.dialed == [echo.port]


def test_many_pairs_on_one_connection_concurrently(server, echo):
    results = {}
    with PortForwardClient.connect(pf_url(server), send_settings=True) as pf:
        def one(i):
            results[i] = pf.roundtrip(echo.port, f"request {i} ".encode() * 5000)[0]
        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert results == {i: f"request {i} ".encode() * 5000 for i in range(8)}
    assert echo.accepted == 8


def test_backend_failure_closes_only_that_pair(server, echo):
    with PortForwardClient.connect(pf_url(server)) as pf:
        reply, err = pf.roundtrip(1, b"nobody listens")
        assert reply == b""
        assert b"error forwarding port 1 to pod pod1" in err
        assert pf.roundtrip(echo.port, b"still works")[0] == b"still works"


def test_ports_outside_the_request_are_refused(server, echo):
    with PortForwardClient.connect(pf_url(server, [echo.port])) as pf:
        assert pf.roundtrip(echo.port, b"allowed")[0] == b"allowed"
        other = EchoServer()
        try:
            reply, err = pf.roundtrip(other.port, b"not allowed")
        finally:
            other.close()
    assert reply == b"" and b"not in the PortForwardRequest" in err


@pytest.mark.parametrize("port", ["0", "65536", "http", ""])
def test_bad_port_header_resets_the_stream(server, port):
    with PortForwardClient.connect(pf_url(server)) as pf:
        with pytest.raises(StreamReset):
            pf.conn.open_stream({"streamType": "data", "port": port, "requestID": "0"})


def test_legacy_client_without_request_ids(server, echo):
    conn, _ = spdy_client.upgrade(pf_url(server), ["portforward.k8s.io"])
    err = conn.open_stream({"streamType": "error", "port": str(echo.port)})   # id 1
    err.close()
    data = conn.open_stream({"streamType": "data", "port": str(echo.port)})   # id 3 pairs with 1
    data.write(b"old kubectl")
    data.close()
    assert read_all(data) == b"old kubectl"
    conn.close()


def test_lonely_error_stream_times_out(server, backend):
    with PortForwardClient.connect(pf_url(server)) as pf:
        err = pf.conn.open_stream({"streamType": "error", "port": "80", "requestID": "7"})
        err.close()
        assert b"timed out waiting for the port-forward data stream" in read_all(err)
    assert backend.dialed == []


def test_negotiation_requires_portforward_protocol(server):
    with pytest.raises(spdy_client.UpgradeFailed) as ei:
        spdy_client.upgrade(pf_url(server), ["v4.channel.k8s.io"])
    assert ei.value.status == 403


def test_request_validation(server):
    with pytest.raises(errors.InvalidArgument, match="pod_sandbox_id"):
        server.get_port_forward(api_pb2.PortForwardRequest())
    with pytest.raises(errors.InvalidArgument, match=r"port\[1\]"):
        server.get_port_forward(api_pb2.PortForwardRequest(pod_sandbox_id="pod1", port=[80, 70000]))
    with pytest.raises(errors.NotFound):
        server.get_port_forward(api_pb2.PortForwardRequest(pod_sandbox_id="other"))
