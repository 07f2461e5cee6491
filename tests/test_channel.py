"""Host agent client against hostile fake guests (unix socket servers written here) and
against the real agent code run on the host in its development mode (no VM)."""
from __future__ import annotations

import os
import socket
import threading
import time

import paramiko
import pytest

from vmcri.agent import protocol, sync
from vmcri.channel import (AgentClient, AgentError, AgentProtocolError, AgentTimeout,
                           AgentUnavailable)


class RawServer:
    """Accepts connections on a unix socket and hands each to `behaviour(conn)`."""

    def __init__(self, path, behaviour, sync_first=True):
        self.path = path
        self.behaviour = behaviour
        self.sync_first = sync_first  # answer the host's session sync, as a real agent does
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(8)
        self.conns = []
        self.stop = threading.Event()
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn):
        try:
            if self.sync_first:
                conn.sendall(sync.read_hello(conn.recv))
            self.behaviour(conn, self.stop)
        except (OSError, EOFError, sync.SyncError, paramiko.SSHException):
            pass  # a fake guest's session ending is the point of most of these tests

    def close(self):
        self.stop.set()
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.fixture
def sock_path(tmp_path):
    return str(tmp_path / "agent.sock")


@pytest.fixture
def raw_server(sock_path):
    servers = []

    def make(behaviour, sync_first=True):
        s = RawServer(sock_path, behaviour, sync_first)
        servers.append(s)
        return s
    yield make
    for s in servers:
        s.close()


def test_garbage_banner_is_refused(raw_server, sock_path):
    def garbage(conn, stop):
        conn.sendall(b"\x00\xffNOT-SSH garbage\r\n" * 200)
        stop.wait(10)
    raw_server(garbage)
    c = AgentClient(sock_path, call_timeout=10)
    with pytest.raises(AgentProtocolError) as e:
        c.call("ping")
    assert "handshake failed" in str(e.value)
    assert not c.connected


def test_endless_banner_flood_is_cut_off(raw_server, sock_path):
    sent = []

    def flood(conn, stop):
        chunk = b"A" * 65536
        n = 0
        while not stop.is_set() and n < (64 << 20):
            conn.sendall(chunk)
            n += len(chunk)
            sent.append(n)
    raw_server(flood)
    c = AgentClient(sock_path, call_timeout=20)
    with pytest.raises(AgentProtocolError) as e:
        c.call("ping")
    assert "before authentication" in str(e.value)


def test_guest_without_session_sync_times_out(raw_server, sock_path):
    def no_sync(conn, stop):
        conn.recv(4096)
        conn.sendall(b"welcome\r\n")  # neither the echo of our hello nor an SSH banner
        stop.wait(30)
    raw_server(no_sync, sync_first=False)
    with pytest.raises(AgentTimeout) as e:
        AgentClient(sock_path, call_timeout=1.5).call("ping")
    assert "session sync" in str(e.value)


def test_flood_before_session_sync_is_cut_off(raw_server, sock_path):
    def flood(conn, stop):
        n = 0
        while not stop.is_set() and n < (64 << 20):
            conn.sendall(b"B" * 65536)
            n += 65536
    raw_server(flood, sync_first=False)
    with pytest.raises(AgentProtocolError) as e:
        AgentClient(sock_path, call_timeout=30).call("ping")
    assert "before the session sync" in str(e.value)


def test_stale_bytes_before_the_sync_echo_are_dropped(raw_server, sock_path):
    """What qemu does at a quick reconnect: the old session's undelivered output reaches
    the new connection first. The client must skip it and still shake hands."""
    pong = ssh_guest(lambda chan: (chan.sendall(b'{"ok":true,"result":{"pong":true}}\n'), chan.close()))

    def stale_then_agent(conn, stop):
        hello = sync.read_hello(conn.recv)
        conn.sendall(os.urandom(300_000) + b"SSH-2.0-old\r\n" + hello[:5])  # old session's tail
        conn.sendall(hello)
        pong(conn, stop)
    raw_server(stale_then_agent, sync_first=False)
    c = AgentClient(sock_path, call_timeout=20)
    assert c.call("ping")["pong"] is True


def test_agent_from_before_the_session_sync_is_still_reached(raw_server, sock_path):
    """A pod booted from an older guest image, met by an upgraded daemon."""
    raw_server(ssh_guest(lambda chan: (chan.sendall(b'{"ok":true,"result":{"pong":true}}\n'), chan.close())),
               sync_first=False)
    c = AgentClient(sock_path, call_timeout=20)
    assert c.call("ping")["pong"] is True
    assert c.legacy


def test_silent_guest_times_out(raw_server, sock_path):
    raw_server(lambda conn, stop: stop.wait(30))
    c = AgentClient(sock_path, call_timeout=1.5)
    with pytest.raises(AgentTimeout):
        c.call("ping")


def test_missing_socket_is_unavailable(sock_path):
    with pytest.raises(AgentUnavailable):
        AgentClient(sock_path, call_timeout=1).call("ping")


# -- fake guests that speak SSH but break the protocol --------------------------------

class FakeGuest(paramiko.ServerInterface):
    def __init__(self, reply):
        self.reply = reply

    def get_allowed_auths(self, username):
        return "none"

    def check_auth_none(self, username):
        return paramiko.AUTH_SUCCESSFUL

    def check_channel_request(self, kind, chanid):
        return paramiko.OPEN_SUCCEEDED

    def check_channel_exec_request(self, chan, command):
        def answer():
            time.sleep(0.05)
            self.reply(chan)
        threading.Thread(target=answer, daemon=True).start()
        return True


def ssh_guest(reply, fresh_key_per_connection=False):
    key = paramiko.ECDSAKey.generate()

    def behaviour(conn, stop):
        t = paramiko.Transport(conn)
        t.add_server_key(paramiko.ECDSAKey.generate() if fresh_key_per_connection else key)
        t.start_server(server=FakeGuest(reply))
        live = []
        while t.is_active() and not stop.is_set():
            ch = t.accept(0.5)
            if ch is not None:
                live.append(ch)
        t.close()
    return behaviour


def _pong(chan):
    chan.sendall(b'{"ok":true,"result":{"pong":true}}\n')
    chan.close()


def test_a_lost_hello_is_sent_again_on_a_new_connection(raw_server, sock_path, monkeypatch):
    """What a clone met once in ~40 quick reconnects: the agent read the new HELLO, then
    took the old connection's hang-up for this one's and ended the session before its echo.
    The client must not sit out the whole deadline on that connection."""
    monkeypatch.setattr("vmcri.channel.ECHO_WAIT_S", 0.5)
    seen = []
    answer = ssh_guest(_pong)

    def behaviour(conn, stop):
        hello = sync.read_hello(conn.recv)
        seen.append(time.monotonic())
        if len(seen) == 1:
            stop.wait(30)
            return
        conn.sendall(hello)
        answer(conn, stop)
    raw_server(behaviour, sync_first=False)
    c = AgentClient(sock_path, call_timeout=20)
    t0 = time.monotonic()
    assert c.call("ping")["pong"] is True
    assert len(seen) == 2 and c.stats_retries == 1
    assert time.monotonic() - t0 < 10  # not the 20 s deadline


def test_a_session_that_dies_after_its_echo_is_retried(raw_server, sock_path, monkeypatch):
    monkeypatch.setattr("vmcri.channel.HANDSHAKE_WAIT_S", 0.8)
    seen = []
    answer = ssh_guest(_pong)

    def behaviour(conn, stop):
        seen.append(1)
        if len(seen) == 1:
            stop.wait(30)  # echoed (by RawServer), then no SSH banner
            return
        answer(conn, stop)
    raw_server(behaviour)
    c = AgentClient(sock_path, call_timeout=20)
    assert c.call("ping")["pong"] is True
    assert len(seen) == 2 and c.stats_retries == 1


def test_retries_end_at_the_deadline(raw_server, sock_path, monkeypatch):
    monkeypatch.setattr("vmcri.channel.ECHO_WAIT_S", 0.3)
    attempts = []

    def never_echoes(conn, stop):
        attempts.append(sync.read_hello(conn.recv))
        stop.wait(30)
    raw_server(never_echoes, sync_first=False)
    t0 = time.monotonic()
    with pytest.raises(AgentTimeout) as e:
        AgentClient(sock_path, call_timeout=3).call("ping")
    assert "session sync" in str(e.value)
    assert 2.5 < time.monotonic() - t0 < 6
    assert len(attempts) >= 3 and len(set(attempts)) == len(attempts)  # a new HELLO each time


def test_oversized_reply_closes_the_connection(raw_server, sock_path):
    def huge(chan):
        try:
            chan.sendall(b"{" + b"x" * (protocol.MAX_REPLY_BYTES + 100_000))
        except Exception:
            pass
    raw_server(ssh_guest(huge))
    c = AgentClient(sock_path, call_timeout=30)
    with pytest.raises(AgentProtocolError) as e:
        c.call("ping")
    assert "larger than" in str(e.value)
    assert not c.connected


def test_malformed_reply_is_a_protocol_error(raw_server, sock_path):
    raw_server(ssh_guest(lambda chan: chan.sendall(b'{"ok": "yes"}\n')))
    with pytest.raises(AgentProtocolError) as e:
        AgentClient(sock_path, call_timeout=10).call("info")
    assert "ok" in str(e.value)


def test_guest_that_never_replies_times_out(raw_server, sock_path):
    raw_server(ssh_guest(lambda chan: None))
    c = AgentClient(sock_path, call_timeout=10)
    with pytest.raises(AgentTimeout):
        c.call("ping", timeout=1.0)


def test_changed_host_key_on_reconnect_is_an_error(raw_server, sock_path):
    ok = lambda chan: (chan.sendall(b'{"ok":true,"result":{"pong":true}}\n'), chan.close())  # noqa: E731
    raw_server(ssh_guest(ok, fresh_key_per_connection=True))  # a new key per connection: like a guest rebooted behind our back
    c = AgentClient(sock_path, call_timeout=10)
    assert c.call("ping") == {"pong": True}
    c.close()
    with pytest.raises(AgentProtocolError) as e:
        c.call("ping")
    assert "host key changed" in str(e.value)


def test_client_side_validation_names_the_field(sock_path):
    c = AgentClient(sock_path)
    with pytest.raises(protocol.ProtocolError) as e:
        c.call("set_hostname", hostname="bad host!")
    assert str(e.value).startswith("hostname:")


# -- the real agent code, on the host (fixture dev_agent: tests/support/fx_agent.py) ------

def test_dev_agent_run_attach_and_timeouts(dev_agent, tmp_path):
    c = AgentClient(dev_agent, call_timeout=20)
    assert c.wait_ready(20)["pong"] is True
    assert c.run(["sh", "-c", "echo out; echo err >&2; exit 4"]) == (4, b"out\n", b"err\n")
    with pytest.raises(AgentTimeout):
        c.run(["sleep", "30"], timeout=1.0)
    # b and c come only after the first client is gone, however slow this machine is
    go = tmp_path / "d1-go"
    p = c.open_process(["sh", "-c", f"echo a; while [ ! -e {go} ]; do sleep 0.02; done; echo b; echo c"],
                       id="d1")
    assert p.recv(timeout=10) == b"a\n"
    c.close()
    go.touch()
    a = AgentClient(dev_agent).attach("d1")
    out = b""
    while (d := a.recv(timeout=10)):
        out += d
    assert out == b"b\nc\n" and a.exit_status(10) == 0
    first = c.open_process(["sleep", "5"], id="d1x")
    with pytest.raises(AgentError) as e:
        c.open_process(["true"], id="d1x")
    assert e.value.kind == "AlreadyExists"
    first.signal("KILL")
    assert first.exit_status(10) == 128 + 9
    with pytest.raises(AgentError) as e:
        c.open_process(["/nonexistent/binary"])
    assert e.value.kind == "Failed"


def test_concurrent_calls_share_one_connection(dev_agent):
    c = AgentClient(dev_agent, call_timeout=30)
    c.wait_ready(20)
    errors, results = [], []

    def worker(n):
        try:
            for _ in range(10):
                results.append(c.call("ping")["pong"])
            results.append(c.run(["echo", str(n)])[1] == f"{n}\n".encode())
        except Exception as e:  # collected: asserted below
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and results.count(True) == 88


def test_one_hostile_guest_does_not_affect_another(raw_server, sock_path, dev_agent):
    def garbage(conn, stop):
        conn.sendall(b"junk\n" * 1000)
    raw_server(garbage)
    bad, good = AgentClient(sock_path, call_timeout=5), AgentClient(dev_agent, call_timeout=20)
    good.wait_ready(20)
    with pytest.raises(AgentError):
        bad.call("ping")
    assert good.call("ping")["pong"] is True
    assert good.run(["echo", "still fine"])[1] == b"still fine\n"


def test_guest_ignoring_the_flow_control_window_is_cut_off(raw_server, sock_path):
    def flood(chan):
        chan.sendall(b'{"ok":true,"result":{"id":"p1","pid":1,"dropped":0,"exited":false}}\n')
        chan.out_window_size = 1 << 40  # pretend the host granted an endless window
        try:
            for _ in range(64):
                chan.sendall(b"x" * (1 << 20))
        except Exception:
            pass
    raw_server(ssh_guest(flood))
    c = AgentClient(sock_path, call_timeout=10)
    p = c.open_process(["cat"])  # the host does not read: a polite guest would stop at 2 MiB
    deadline = time.monotonic() + 60
    while c.connected and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not c.connected
    assert len(p.channel.in_buffer) <= 9 << 20


def test_dev_agent_port_forward_reaches_loopback_only(dev_agent):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]

    def echo_upper():
        conn, _ = srv.accept()
        data = b""
        while (d := conn.recv(4096)):
            data += d
        conn.sendall(data.upper())
        conn.close()
    threading.Thread(target=echo_upper, daemon=True).start()
    c = AgentClient(dev_agent, call_timeout=20)
    c.wait_ready(20)
    chan = c.open_port_forward(port)
    chan.sendall(b"hello through the agent")
    chan.shutdown_write()  # half-close reaches the server as EOF
    got = b""
    chan.settimeout(10)
    while (d := chan.recv(4096)):
        got += d
    assert got == b"HELLO THROUGH THE AGENT"
    srv.close()
    with pytest.raises(AgentError) as e:
        c.open_port_forward(port)  # nothing listens any more
    assert e.value.kind == "Unavailable"
    with pytest.raises(ValueError, match="host"):
        c.open_port_forward(80, host="10.0.0.1")
    # bypassing the client check: the agent itself refuses anything but its loopback
    with pytest.raises(paramiko.ChannelException) as e:
        c._ensure(time.monotonic() + 10).open_channel("direct-tcpip", dest_addr=("10.0.0.1", 80),
                                                      src_addr=("127.0.0.1", 0), timeout=10)
    assert e.value.code == paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED


def test_output_faster_than_its_reader_loses_nothing(dev_agent):
    """While the host is attached the agent holds the process back instead of dropping
    output (kubectl exec of a big file through a slow link)."""
    c = AgentClient(dev_agent, call_timeout=60)
    expected = "".join(f"{i}\n" for i in range(1, 600_001)).encode()  # ~4.5 MB, > the 1 MiB ring
    p = c.open_process(["seq", "1", "600000"])
    got = bytearray()
    while True:
        d = p.recv(65536, timeout=60)
        if not d:
            break
        got += d
        time.sleep(0.005)  # a slow consumer
    assert p.exit_status(30) == 0
    assert len(got) == len(expected) and bytes(got) == expected
