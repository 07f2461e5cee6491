"""Every reply field from the agent is checked on the host (vmcri/agent/replies.py).

A hostile fake guest (an SSH server written here, as in test_channel.py) sends wrong types,
negative or huge numbers and oversized strings: the one call fails with an error naming the
field, the connection keeps serving the next call, and the log pump of a real
ContainerService (sqlite table, log writer, offsets file) keeps going or marks the container
EXITED with a reason instead of dying and leaving it RUNNING."""
from __future__ import annotations

import json
import os
import threading
import time
import types

import paramiko
import pytest

from tests.test_channel import RawServer, sock_path  # noqa: F401 - fixture
from tests.test_channel import FakeGuest
from vmcri.agent import protocol, replies
from vmcri.channel import AgentClient, AgentProtocolError
from vmcri.container.model import CREATED, RUNNING, EXITED, ContainerRecord
from vmcri.container.service import ContainerService
from vmcri.store import Store

GOOD_STATE = {"status": "running", "pid": 42, "exit_code": 0}


# -- the schemas ---------------------------------------------------------------------------

@pytest.mark.parametrize("bad,field", [
    ({"status": "running", "pid": "42", "exit_code": 0}, "pid"),
    ({"status": "running", "pid": -1, "exit_code": 0}, "pid"),
    ({"status": "running", "pid": 1 << 40, "exit_code": 0}, "pid"),
    ({"status": "stopped", "pid": 1, "exit_code": "137"}, "exit_code"),
    ({"status": "stopped", "pid": 1, "exit_code": -1}, "exit_code"),
    ({"status": "stopped", "pid": 1, "exit_code": 1 << 31}, "exit_code"),
    ({"status": "stopped", "pid": 1, "exit_code": 1.5}, "exit_code"),
    ({"status": "stopped", "pid": 1, "exit_code": True}, "exit_code"),
    ({"status": "stopped", "pid": 1, "exit_code": 0, "oom_killed": "yes"}, "oom_killed"),
    ({"status": "x" * 100_000, "pid": 1, "exit_code": 0}, "status"),
    ({"pid": 1, "exit_code": 0}, "status"),
])
def test_container_state_fields_are_checked(bad, field):
    with pytest.raises(protocol.ProtocolError) as e:
        replies.check_result("container_state", bad)
    assert str(e.value).startswith(field + ":")
    assert len(str(e.value)) < 300  # the message never echoes a huge value


def test_only_checked_fields_reach_the_host():
    got = replies.check_result("container_state", {**GOOD_STATE, "extra": {"x": [1] * 10}})
    assert got == GOOD_STATE
    assert replies.check_result("set_hostname", {"hostname": "h", "junk": [1]}) == {"hostname": "h"}
    # a call this host has no schema for (a newer agent's) gets the bounded-tree check
    with pytest.raises(protocol.ProtocolError):
        replies.check_result("new_call", {"x": "y" * 65})
    assert set(protocol.METHODS) - set(replies.RESULTS) == {"run", "attach"}  # check_head
    assert replies.check_result("ping", {"pong": True, "uptime": 3.5}) == {"pong": True,
                                                                           "uptime": 3.5}


@pytest.mark.parametrize("method,bad,field", [
    ("container_create", {"id": "../x", "pid": 3}, "id"),
    ("container_create", {"id": "a" * 64, "phases": {"crun_create": 1e9}}, "phases.crun_create"),
    ("container_create", {"id": "a" * 64, "phases": {"read_spec": "1"}}, "phases.read_spec"),
    ("container_create", {"id": "a" * 64, "phases": [0.1]}, "phases"),
    ("container_delete", {"deleted": 1}, "deleted"),
    ("set_cpus_online", {"online": "0-3; rm -rf /"}, "online"),
    ("set_cpus_online", {"online": "0-1", "errors": ["e"] * 1000}, "errors"),
    ("clone_init", {"clock_ns": -5}, "clock_ns"),
    ("ping", {"pong": True, "uptime": float("nan")}, "uptime"),
    ("container_stats", {"cpu_usage_usec": 1 << 70}, "cpu_usage_usec"),
    ("container_stats", {"memory": {"current": "9" * 100}}, "memory.current"),
    ("container_metrics", {"io": [{"major": [[[[[[1]]]]]]}]}, "io[0].major"),
    ("sandbox_stats", {"interfaces": [{"name": "eth0", "rx_bytes": {}}] * 5000}, "interfaces"),
    ("sandbox_stats", {"bad key!": 1}, ""),
    ("sandbox_stats", {"memory": [1, 2]}, "memory"),
    ("sandbox_stats", {"interfaces": {"eth0": {}}}, "interfaces"),
    ("sandbox_stats", {"interfaces": ["eth0"]}, "interfaces[0]"),
    ("container_metrics", {"processes": 7}, "processes"),
    ("container_stats", {"cpu_usage_usec": "lots"}, "cpu_usage_usec"),
])
def test_other_replies_are_checked(method, bad, field):
    with pytest.raises(protocol.ProtocolError) as e:
        replies.check_result(method, bad)
    assert str(e.value).startswith(field)


def test_create_phases_keep_only_the_known_steps():
    got = replies.check_result("container_create", {"id": "a" * 64, "pid": 7, "phases": {
        "read_spec": 0.01, "crun_create": 0.2, "x" * 1000: 1.0}})
    assert got == {"id": "a" * 64, "pid": 7, "phases": {"read_spec": 0.01, "crun_create": 0.2}}


def test_a_real_stats_sample_passes():
    sample = {"cpu_usage_usec": 123, "memory": {"current": 5, "max": "max", "peak": None},
              "io": [{"major": 254, "minor": 0, "rbytes": 1}], "hugetlb": {"2MB": 0},
              "pressure": {"cpu": None, "io": {"some": 1}}, "processes": {"nofile_soft": -1},
              "interfaces": [{"name": "eth0", "rx_bytes": 1}]}
    assert replies.check_result("container_metrics", sample) == sample


@pytest.mark.parametrize("head,field", [
    ({"id": "c1", "offsets": "abc"}, "offsets"),
    ({"id": "c1", "offsets": [1, 2]}, "offsets"),
    ({"id": "c1", "offsets": {"stdout": "12"}}, "offsets.stdout"),
    ({"id": "c1", "offsets": {"stdout": -1}}, "offsets.stdout"),
    ({"id": "c1", "offsets": {"stdout": 1 << 63}}, "offsets.stdout"),
    ({"id": "c1", "offsets": {"stdin": 0}}, "offsets"),
    ({"id": "c1", "dropped": -3}, "dropped"),
    ({"id": "c1", "dropped": "lots"}, "dropped"),
    ({"id": "c1", "pid": {}}, "pid"),
    ({"id": "x" * 5000}, "id"),
])
def test_stream_heads_are_checked(head, field):
    with pytest.raises(protocol.ProtocolError) as e:
        replies.check_head(head)
    assert str(e.value).startswith(field + ":")


# -- through the client, against a hostile fake guest --------------------------------------

class ScriptedGuest:
    """An SSH fake agent: `answers[method]` is a list of replies, used in turn (the last
    one repeats). A reply is a dict (sent as the result), or a tuple (result, output,
    exit status) for a stream. Every request is recorded."""

    def __init__(self, path: str, answers: dict):
        self.answers, self.requests = answers, []
        key = paramiko.ECDSAKey.generate()

        def behaviour(conn, stop):
            t = paramiko.Transport(conn)
            t.add_server_key(key)
            t.start_server(server=FakeGuest(self._answer))
            held = []
            while t.is_active() and not stop.is_set():
                ch = t.accept(0.5)
                if ch is not None:
                    held.append(ch)
            t.close()
        self.server = RawServer(path, behaviour)

    def _answer(self, chan):
        # FakeGuest hands us the channel; the exec command was its `command`
        method, params = chan.vmcri_request
        self.requests.append((method, params))
        script = self.answers.get(method, [{}])
        reply = script.pop(0) if len(script) > 1 else script[0]
        result, output, status = reply if isinstance(reply, tuple) else (reply, b"", None)
        try:
            chan.sendall(json.dumps({"ok": True, "result": result}).encode() + b"\n" + output)
            if status is not None:
                chan.send_exit_status(status)
            chan.close()
        except Exception:
            pass

    def close(self):
        self.server.close()


@pytest.fixture
def scripted(sock_path, monkeypatch):  # noqa: F811
    orig = FakeGuest.check_channel_exec_request

    def remember(self, chan, command):
        chan.vmcri_request = protocol.decode_request(command)
        return orig(self, chan, command)
    monkeypatch.setattr(FakeGuest, "check_channel_exec_request", remember)
    made = []

    def make(answers):
        g = ScriptedGuest(sock_path, answers)
        made.append(g)
        return g, AgentClient(sock_path, call_timeout=20)
    yield make
    for g in made:
        g.close()


def test_a_bad_reply_fails_that_call_and_the_next_one_is_served(scripted):
    _, client = scripted({"container_state": [{"status": "running", "pid": 1, "exit_code": "x"},
                                              GOOD_STATE]})
    with pytest.raises(AgentProtocolError, match="container_state reply: exit_code"):
        client.call("container_state", id="c1")
    assert client.connected  # the SSH framing was fine: no reconnect needed
    assert client.call("container_state", id="c1") == GOOD_STATE


def test_a_bad_stream_head_and_a_bad_exit_status_fail_the_call(scripted):
    _, client = scripted({"attach": [{"id": "c1", "offsets": {"stdout": "0"}}],
                          "run": [({"id": "p1", "pid": 9}, b"out", 1 << 20)]})
    with pytest.raises(AgentProtocolError, match="offsets.stdout"):
        client.attach("c1", offsets={"stdout": 0, "stderr": 0})
    with pytest.raises(AgentProtocolError, match="exit-status: 1048576 is outside 0..255"):
        client.run(["true"])
    assert client.call("ping") == {}


# -- the log pump --------------------------------------------------------------------------

class _Sandboxes:
    """What ContainerService needs of the sandbox service: one READY pod whose agent is the
    fake guest."""

    def __init__(self, base: str, client: AgentClient):
        self.base, self.client = base, client
        self.sb = types.SimpleNamespace(id="sb1", state="READY")
        self.on_stop, self.on_remove, self.on_vm_gone = [], [], []

    def paths(self, sandbox_id):
        return types.SimpleNamespace(share_dir=os.path.join(self.base, "share"),
                                     state_dir=os.path.join(self.base, "state"))

    def find(self, sandbox_id):
        return self.sb

    get = find

    def refresh(self, sb):
        return sb

    def agent(self, sb):
        return self.client


@pytest.fixture
def container_svc(tmp_path, scripted):
    def make(answers):
        guest, client = scripted(answers)
        cfg = types.SimpleNamespace(agent_timeout_s=20)
        svc = ContainerService(cfg, Store(str(tmp_path / "db.sqlite")),
                               _Sandboxes(str(tmp_path), client), images=None)
        rec = ContainerRecord(id="c1", sandbox_id="sb1", name="c", attempt=0, state=CREATED,
                              created_ns=1, image="i", image_id="sha256:" + "0" * 64,
                              config=b"", log_path=str(tmp_path / "c1.log"))
        svc.table.insert(rec)
        os.makedirs(svc.dirs(rec).private)
        return svc, guest
    return make


def _wait_exited(svc, timeout=60):
    deadline = time.monotonic() + timeout  # a hang detector, not a bound
    while time.monotonic() < deadline:
        rec = svc.table.get("c1")
        if rec.state == EXITED:
            return rec
        time.sleep(0.05)
    raise AssertionError(f"container still {svc.table.get('c1').state}")


def test_the_pump_outlives_malformed_offsets_and_then_logs_and_exits(container_svc,
                                                                     monkeypatch):
    from vmcri.container.container_start import LogPump
    monkeypatch.setattr(LogPump, "RETRY_S", 0.05)
    bad_heads = [{"id": "c1", "offsets": "abc"}, {"id": "c1", "offsets": {"stdout": [1]}},
                 {"id": "c1", "dropped": -1}, {"id": "c1", "pid": "1"}]
    good = ({"id": "c1", "pid": 7, "offsets": {"stdout": 0, "stderr": 0}}, b"hello\n", 3)
    svc, guest = container_svc({"attach": [*bad_heads, good],
                                "container_start": [GOOD_STATE],
                                "container_state": [{"status": "stopped", "pid": 7,
                                                     "exit_code": 3, "oom_killed": False}]})
    svc.start("c1")
    assert svc.table.get("c1").state in (RUNNING, EXITED)
    rec = _wait_exited(svc)
    assert (rec.exit_code, rec.reason) == (3, "Error")
    attaches = [p for m, p in guest.requests if m == "attach"]
    assert len(attaches) == len(bad_heads) + 1  # it kept going after each bad head
    assert open(rec.log_path).read().endswith(" stdout F hello\n")


@pytest.mark.parametrize("status", [256, 1 << 31, (1 << 32) - 1])
def test_a_made_up_exit_status_marks_the_container_failed(container_svc, status):
    svc, _ = container_svc({"attach": [({"id": "c1", "offsets": {"stdout": 0, "stderr": 0}},
                                        b"", status)],
                            "container_start": [GOOD_STATE]})
    svc.start("c1")
    rec = _wait_exited(svc)
    assert rec.exit_code == 255 and rec.reason == "Error"
    assert "invalid exit status" in rec.message and str(status) in rec.message


def test_a_bad_oom_answer_is_not_an_oom_kill(container_svc):
    svc, _ = container_svc({"attach": [({"id": "c1", "offsets": {"stdout": 0, "stderr": 0}},
                                        b"", 137)],
                            "container_start": [GOOD_STATE],
                            "container_state": [{"status": "stopped", "pid": 1,
                                                 "exit_code": 137, "oom_killed": "yes"}]})
    svc.start("c1")
    rec = _wait_exited(svc)
    assert (rec.exit_code, rec.reason) == (137, "Error")
    assert threading.active_count() < 200
