"""The shared agent protocol: request validation names the bad field; replies are bounded."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, strategies as st

from vmcri.agent import protocol
from vmcri.agent.protocol import ProtocolError


def test_every_method_round_trips_through_the_command_string():
    samples = {
        "ping": {}, "info": {}, "shutdown": {}, "pod_init_start": {},
        "set_hostname": {"hostname": "pod-1.ns"},
        "write_etc": {"files": {"hosts": "127.0.0.1 localhost\n", "resolv.conf": ""}},
        "configure_nic": {"mac": "02:AB:cd:00:00:01", "addresses": ["10.88.0.2/24", "fd00::2/64"],
                          "routes": [{"dst": "default", "gw": "10.88.0.1"}, {"dst": "10.0.0.0/8"}], "mtu": 1500},
        "run": {"argv": ["sh", "-c", "echo hi"], "env": {"A": "1"}, "cwd": "/tmp", "tty": True, "id": "x-1"},
        "attach": {"id": "x-1"},
        # containers: more cases in tests/test_agent_containers.py
        "container_create": {"id": "c1", "bundle": protocol.container_bundle("c1"), "tty": True},
        "container_start": {"id": "c1"}, "container_state": {"id": "c1"},
        "container_kill": {"id": "c1", "signal": "TERM"}, "container_delete": {"id": "c1"},
        "container_stats": {"id": "c1"}, "container_metrics": {"id": "c1"}, "sandbox_stats": {},
        "set_sysctls": {"sysctls": {"net.ipv4.ip_forward": "1"}},
        "container_update": {"id": "c1", "resources": {"memory": {"limit": 1048576}}},
        "set_cpus_online": {"count": 2, "wait_ms": 100},
        "clone_init": {"time_ns": 1_700_000_000_000_000_000, "seed": "ab" * 32, "machine_id": "0" * 32},
    }
    assert set(samples) == set(protocol.METHODS)
    for method, params in samples.items():
        m, p = protocol.decode_request(protocol.encode_request(method, params).encode())
        assert m == method
        assert p == protocol.validate(method, params)
    assert protocol.validate("configure_nic", samples["configure_nic"])["mac"] == "02:ab:cd:00:00:01"
    # CNI-shaped input as the sandbox service sends it; mtu 0 means "leave it"
    nic = protocol.validate("configure_nic", {"mac": "02:00:00:00:00:01", "addresses": ["10.88.0.2/24"],
                                              "routes": [{"dst": "0.0.0.0/0", "gw": "10.88.0.1"}], "mtu": 0})
    assert "mtu" not in nic and nic["routes"] == [{"dst": "0.0.0.0/0", "gw": "10.88.0.1"}]


@pytest.mark.parametrize("method, params, field", [
    ("set_hostname", {"hostname": "-bad"}, "hostname:"),
    ("set_hostname", {}, "hostname:"),
    ("write_etc", {"files": {"passwd": "root::0:0"}}, "files.passwd:"),
    ("write_etc", {"files": {"hosts": "x" * (protocol.MAX_ETC_FILE_BYTES + 1)}}, "files.hosts:"),
    ("write_etc", {"files": {}}, "files:"),
    ("configure_nic", {"mac": "zz:00:00:00:00:00"}, "mac:"),
    ("configure_nic", {"mac": "02:00:00:00:00:01", "addresses": ["10.0.0.1"]}, "addresses[0]:"),
    ("configure_nic", {"mac": "02:00:00:00:00:01", "routes": [{"dst": "default", "gw": "nope"}]}, "routes[0].gw:"),
    ("configure_nic", {"mac": "02:00:00:00:00:01", "routes": [{"dst": "x", "via": "1.1.1.1"}]}, "routes[0].via:"),
    ("configure_nic", {"mac": "02:00:00:00:00:01", "mtu": 10}, "mtu:"),
    ("clone_init", {"time_ns": 1, "seed": "ab" * 31, "machine_id": "0" * 32}, "seed:"),
    ("clone_init", {"time_ns": 1, "seed": "AB" * 32, "machine_id": "0" * 32}, "seed:"),
    ("clone_init", {"time_ns": 1, "seed": "ab" * 32, "machine_id": "0" * 31}, "machine_id:"),
    ("clone_init", {"time_ns": -1, "seed": "ab" * 32, "machine_id": "0" * 32}, "time_ns:"),
    ("run", {"argv": []}, "argv:"),
    ("run", {"argv": ["ls", 3]}, "argv[1]:"),
    ("run", {"argv": ["ls"], "cwd": "relative"}, "cwd:"),
    ("run", {"argv": ["ls"], "env": {"1BAD": "x"}}, "env.1BAD:"),
    ("run", {"argv": ["ls"], "tty": "yes"}, "tty:"),
    ("run", {"argv": ["ls"], "id": "../etc"}, "id:"),
    ("run", {"argv": ["nul\0byte"]}, "argv[0]:"),
    ("attach", {}, "id:"),
    ("nope", {}, "method:"),
])
def test_bad_requests_name_the_field(method, params, field):
    with pytest.raises(ProtocolError) as e:
        protocol.validate(method, params)
    assert str(e.value).startswith(field), str(e.value)


def test_oversized_and_malformed_commands_are_refused():
    with pytest.raises(ProtocolError, match="request"):
        protocol.decode_request(b"run " + b"x" * protocol.MAX_REQUEST_BYTES)
    with pytest.raises(ProtocolError, match="params"):
        protocol.encode_request("run", {"argv": ["a" * 10000] * 4})
    with pytest.raises(ProtocolError, match="params: not valid JSON"):
        protocol.decode_request("ping {nope")
    with pytest.raises(ProtocolError, match="params: expected"):
        protocol.decode_request("ping [1]")


def test_reply_encoding_and_bounds():
    assert protocol.decode_reply(protocol.encode_reply({"a": 1}).rstrip()) == {"ok": True, "result": {"a": 1}}
    err = protocol.decode_reply(protocol.encode_reply(error=("NotFound", "id: gone")))
    assert err["error"] == {"type": "NotFound", "message": "id: gone"}
    big = protocol.encode_reply({"blob": "x" * protocol.MAX_REPLY_BYTES})
    assert json.loads(big)["error"]["type"] == "Internal"  # the agent never sends more than the cap
    for bad in (b"[]", b'{"ok": 1}', b'{"ok": false}', b'{"ok": true, "result": []}', b"\xff"):
        with pytest.raises(ProtocolError):
            protocol.decode_reply(bad)
    with pytest.raises(ProtocolError, match="larger"):
        protocol.decode_reply(b" " * (protocol.MAX_REPLY_BYTES + 1))


def test_signals_are_a_fixed_set():
    assert protocol.check_signal("TERM") == "TERM"
    for bad in ("SIGTERM", "9", "", "TERM\0"):
        with pytest.raises(ProtocolError, match="signal"):
            protocol.check_signal(bad)


@given(st.text(max_size=200))
def test_decode_request_never_crashes_on_arbitrary_input(s):
    try:
        method, params = protocol.decode_request(s)
    except ProtocolError:
        return
    assert method in protocol.METHODS and isinstance(params, dict)


@given(st.binary(max_size=300))
def test_decode_reply_never_crashes_on_arbitrary_bytes(b):
    try:
        msg = protocol.decode_reply(b)
    except ProtocolError:
        return
    assert isinstance(msg["ok"], bool)


def test_str_commands_are_bounded_too():
    with pytest.raises(ProtocolError, match="request"):
        protocol.decode_request("ping " + "x" * protocol.MAX_REQUEST_BYTES)
    with pytest.raises(ProtocolError, match="UTF-8"):
        protocol.decode_request(b"ping \xff")


def test_every_control_method_has_exactly_one_guest_handler():
    from vmcri.agent.__main__ import load_handlers
    handlers = load_handlers()
    assert set(handlers) == set(protocol.METHODS) - protocol.STREAMING
    assert not set(handlers) & protocol.STREAMING  # run/attach are served by the SSH layer


def test_container_update_refuses_what_crun_update_cannot_apply():
    with pytest.raises(protocol.ProtocolError, match="resources.devices"):
        protocol.validate("container_update", {"id": "c1", "resources": {"devices": []}})
    with pytest.raises(protocol.ProtocolError, match="resources.memory"):
        protocol.validate("container_update", {"id": "c1", "resources": {"memory": {"kernel": 1}}})
    with pytest.raises(protocol.ProtocolError, match="resources.cpu.quota"):
        protocol.validate("container_update", {"id": "c1", "resources": {"cpu": {"quota": "x"}}})
