"""Exec and attach over SPDY/3.1 against real local processes, through the real
streaming server on 127.0.0.1."""
import json
import socket
import threading
import time

import pytest
from cri_api.v1 import api_pb2

from tests.support import spdy_client
from tests.support.streaming_fake import FakeBackend
from vmcri import errors
from vmcri.config import Config
from vmcri.streaming.server import StreamingServer
from vmcri.streaming.spdy_session import StreamReset

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def backend():
    return FakeBackend(containers={"c1": ["sh", "-c", "cat"], "c5": ["sh", "-c", "cat; exit 5"]})


@pytest.fixture
def server(backend):
    srv = StreamingServer(Config(streaming_port=0), backend)
    srv.start()
    yield srv
    backend.stuck.set()
    srv.stop()


def exec_url(srv, cmd, **kw):
    kw.setdefault("stdout", True)
    kw.setdefault("stderr", not kw.get("tty"))
    return srv.get_exec(api_pb2.ExecRequest(container_id="c1", cmd=cmd, **kw)).url


def wait_until(pred, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False


def test_stdout_stderr_separate_and_stdin_reaches_the_process(server):
    url = exec_url(server, ["sh", "-c", "cat; echo to-err >&2"], stdin=True, stderr=True)
    res = spdy_client.exec_url(url, stdin=b"line one\nline two\n")
    assert res.protocol == "v4.channel.k8s.io"
    assert res.stdout == b"line one\nline two\n"
    assert res.stderr == b"to-err\n"
    assert res.status == {"metadata": {}, "status": "Success"} and res.exit_code == 0


def test_exit_code_3_is_a_non_zero_exit_status(server):
    res = spdy_client.exec_url(exec_url(server, ["sh", "-c", "exit 3"]))
    st = res.status
    assert st["status"] == "Failure" and st["reason"] == "NonZeroExitCode"
    assert st["details"]["causes"] == [{"reason": "ExitCode", "message": "3"}]
    assert res.exit_code == 3


@pytest.mark.parametrize("protocol", ["v3.channel.k8s.io", "v2.channel.k8s.io", "channel.k8s.io"])
def test_older_protocols_report_errors_as_text(server, protocol):
    res = spdy_client.exec_url(exec_url(server, ["sh", "-c", "echo hi; exit 7"]), protocols=[protocol])
    assert res.protocol == protocol
    assert res.stdout == b"hi\n"
    assert res.error_raw == b"command terminated with non-zero exit code: exit status 7"
    ok = spdy_client.exec_url(exec_url(server, ["true"]), protocols=[protocol])
    assert ok.error_raw == b"" and ok.exit_code == 0


def test_client_preference_wins_negotiation(server):
    conn, proto = spdy_client.upgrade(exec_url(server, ["true"]), ["v2.channel.k8s.io", "v4.channel.k8s.io"])
    conn.close()
    assert proto == "v2.channel.k8s.io"


def test_unknown_protocol_is_refused_with_the_accepted_list(server):
    with pytest.raises(spdy_client.UpgradeFailed) as ei:
        spdy_client.upgrade(exec_url(server, ["true"]), ["v9.channel.k8s.io"])
    assert ei.value.status == 403
    assert "v4.channel.k8s.io" in ei.value.headers["x-accepted-stream-protocol-versions"]


def test_tty_merges_output_and_resizes_the_pty(server, backend):
    url = exec_url(server, ["sh", "-c", "read a; stty size; echo err >&2; read b; stty size"],
                   stdin=True, tty=True)
    s = spdy_client.ExecSession(url, stdin=True, tty=True)
    assert "stderr" not in s.streams and "resize" in s.streams
    s.resize(100, 30)
    assert wait_until(lambda: backend.channels and backend.channels[-1].resizes == [(100, 30)])
    s.send(b"x\n")
    assert wait_until(lambda: b"30 100" in s.output())
    s.resize(120, 40)
    assert wait_until(lambda: backend.channels[-1].resizes[-1:] == [(120, 40)])
    s.send(b"y\n")
    res = s.wait()
    out = res.stdout.replace(b"\r\n", b"\n")
    assert b"30 100\n" in out and b"40 120\n" in out and b"err\n" in out
    assert out.index(b"30 100") < out.index(b"40 120")
    assert res.exit_code == 0


def test_streams_may_arrive_in_any_order(server):
    url = exec_url(server, ["sh", "-c", "cat >&2"], stdin=True, stderr=True)
    s = spdy_client.ExecSession(url, stdin=True, stderr=True,
                                open_order=["stderr", "stdout", "stdin", "error"])
    s.send(b"reordered")
    s.close_stdin()
    res = s.wait()
    assert res.stderr == b"reordered" and res.exit_code == 0


def test_missing_stream_times_out_with_a_message(backend):
    srv = StreamingServer(Config(streaming_port=0), backend, stream_creation_timeout=0.5)
    srv.start()
    try:
        url = exec_url(srv, ["true"], stdin=True)
        # a client that never opens the stdin stream the request promised
        res = spdy_client.ExecSession(url, stdin=False).wait()
        assert res.status["status"] == "Failure"
        assert "timed out waiting for client to create streams: stdin" in res.status["message"]
        assert backend.exec_calls == []
    finally:
        srv.stop()


def test_backend_failure_is_reported_on_the_error_stream(server):
    res = spdy_client.exec_url(exec_url(server, ["fail-to-start"]))
    assert res.status["status"] == "Failure"
    assert res.status["message"] == "container c1 is not running"


def test_large_output_without_client_flow_control(server):
    res = spdy_client.exec_url(exec_url(server, ["sh", "-c", "head -c 3000000 /dev/zero"]))
    assert len(res.stdout) == 3000000 and res.exit_code == 0


def test_large_output_and_input_with_client_flow_control(server):
    payload = bytes(range(256)) * 4096   # 1 MiB
    url = exec_url(server, ["cat"], stdin=True)
    s = spdy_client.ExecSession(url, stdin=True, send_settings=True)
    t = threading.Thread(target=lambda: (s.send(payload), s.close_stdin()))
    t.start()
    res = s.wait()
    t.join()
    assert res.stdout == payload and res.exit_code == 0
    assert not s.conn.flow_control_off


def test_stuck_backend_does_not_stall_other_connections(server, backend):
    stuck = spdy_client.ExecSession(exec_url(server, ["stuck"]))
    res = spdy_client.exec_url(exec_url(server, ["echo", "still served"]))
    assert res.stdout == b"still served\n"
    backend.stuck.set()
    assert stuck.wait().status["status"] == "Failure"   # "stuck" is no real program


def test_client_disconnect_ends_the_process(server, backend):
    s = spdy_client.ExecSession(exec_url(server, ["sleep", "1000"]))
    assert wait_until(lambda: backend.channels)
    s.conn.close()
    assert wait_until(lambda: backend.channels[0].proc.poll() is not None)


def test_ping_on_an_exec_connection(server):
    s = spdy_client.ExecSession(exec_url(server, ["sleep", "1"]))
    rtt = s.conn.ping()
    assert rtt >= 0
    assert s.wait().exit_code == 0


def test_unexpected_stream_type_is_reset(server):
    conn, _ = spdy_client.upgrade(exec_url(server, ["true"]), ["v4.channel.k8s.io"])
    with pytest.raises(StreamReset):
        conn.open_stream({"streamType": "bogus"})
    conn.close()


def test_attach_streams_the_main_process_and_reports_success(server):
    url = server.get_attach(api_pb2.AttachRequest(container_id="c5", stdin=True, stdout=True)).url
    res = spdy_client.exec_url(url, stdin=b"attached\n", stderr=False)
    assert res.stdout == b"attached\n"
    assert res.status["status"] == "Success"   # attach has no exit code of its own


def test_token_is_single_use(server):
    url = exec_url(server, ["true"])
    assert spdy_client.exec_url(url).exit_code == 0
    with pytest.raises(spdy_client.UpgradeFailed) as ei:
        spdy_client.upgrade(url, ["v4.channel.k8s.io"])
    assert ei.value.status == 404


def test_plain_get_without_upgrade_is_rejected(server):
    url = exec_url(server, ["true"])
    host, port = server.address
    with socket.create_connection((host, port)) as s:
        s.sendall(f"GET {url.split(str(port))[1]} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert s.recv(100).startswith(b"HTTP/1.1 400")


@pytest.mark.parametrize("kw,field", [
    ({"cmd": ["x"], "stdout": True}, "container_id"),
    ({"container_id": "c1", "stdout": True}, "cmd"),
    ({"container_id": "c1", "cmd": ["x"], "tty": True, "stdout": True, "stderr": True}, "stderr"),
    ({"container_id": "c1", "cmd": ["x"]}, "stdin, stdout, stderr"),
])
def test_exec_request_validation_names_the_field(server, kw, field):
    with pytest.raises(errors.InvalidArgument, match=field):
        server.get_exec(api_pb2.ExecRequest(**kw))


def test_exec_of_unknown_container_is_not_found(server):
    with pytest.raises(errors.NotFound):
        server.get_exec(api_pb2.ExecRequest(container_id="nope", cmd=["x"], stdout=True))


def test_status_json_shape():
    from vmcri.streaming.remotecommand import status_json
    assert json.loads(status_json(0)) == {"metadata": {}, "status": "Success"}
    failure = json.loads(status_json(None, "boom"))
    assert failure["status"] == "Failure" and failure["message"] == "boom"


def test_legacy_client_without_protocol_header(server):
    res = spdy_client.exec_url(exec_url(server, ["sh", "-c", "echo legacy; exit 1"]), protocols=[])
    assert res.protocol == "" and res.stdout == b"legacy\n"
    assert res.error_raw == b"command terminated with non-zero exit code: exit status 1"


def test_client_goaway_does_not_cut_a_running_exec(server):
    s = spdy_client.ExecSession(exec_url(server, ["sh", "-c", "read x; echo got $x"], stdin=True), stdin=True)
    s.conn._send_goaway(0)   # kubectl says it opens no more streams; the exec goes on
    s.send(b"more\n")
    s.close_stdin()
    res = s.wait()
    assert res.stdout == b"got more\n" and res.exit_code == 0


def test_idle_connection_is_closed_by_the_server(backend):
    srv = StreamingServer(Config(streaming_port=0), backend, idle_timeout=0.5)
    srv.start()
    try:
        s = spdy_client.ExecSession(exec_url(srv, ["sleep", "1000"]))
        res = s.wait()   # the server gives up on the silent connection and ends the session
        assert res.exit_code is None
        assert wait_until(lambda: backend.channels[0].proc.poll() is not None)
    finally:
        srv.stop()


def test_stop_ends_running_sessions(backend):
    srv = StreamingServer(Config(streaming_port=0), backend)
    srv.start()
    address = srv.address
    s = spdy_client.ExecSession(exec_url(srv, ["sleep", "1000"]))
    assert wait_until(lambda: backend.channels)
    srv.stop()
    assert s.wait().exit_code is None
    assert wait_until(lambda: backend.channels[0].proc.poll() is not None)
    with pytest.raises(OSError):
        socket.create_connection(address, timeout=2)


def test_ipv6_listen_address(backend):
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 loopback")
    srv = StreamingServer(Config(streaming_address="::1", streaming_port=0), backend)
    srv.start()
    try:
        assert srv.base_url.startswith("http://[::1]:")
        assert spdy_client.exec_url(exec_url(srv, ["echo", "v6"])).stdout == b"v6\n"
    finally:
        srv.stop()


def test_port_in_use_fails_start(backend, server):
    other = StreamingServer(Config(streaming_port=server.address[1]), backend)
    with pytest.raises(OSError):
        other.start()
