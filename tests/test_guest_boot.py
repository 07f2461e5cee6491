"""Boot the real guest image under TCG through DomainSpec/Hypervisor and drive its agent."""
from __future__ import annotations

import os
import statistics
import time

import pytest

from tests.support.fx_guest import booted_guest, console_phases
from vmcri.agent import protocol
from vmcri.channel import AgentError

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def share(tmp_path_factory):
    d = tmp_path_factory.mktemp("share")
    (d / "from-host.txt").write_text("hello from the host\n")
    return str(d)


@pytest.fixture(scope="module")
def vm(guest_image, tmp_path_factory, share):
    with booted_guest(guest_image, str(tmp_path_factory.mktemp("vm")), tag="boot", share_dir=share) as g:
        phases = console_phases(g["console"])
        print(f"\nboot: create {g['created_s']:.2f}s, agent ready (host) {g['ready_s']:.2f}s, "
              f"guest phases {phases}")
        yield g


def _wait_for_file(path: str) -> str:
    """Shell that blocks until the test creates `path`."""
    return f"while [ ! -e {path} ]; do sleep 0.05; done; "


def run_ok(client, argv, **kw):
    code, out, err = client.run(argv, **kw)
    assert code == 0, (argv, code, out, err)
    return out.decode()


def test_guest_kernel_is_not_the_host_kernel(vm, guest_image):
    guest_release = run_ok(vm["client"], ["uname", "-r"]).strip()
    assert guest_release == guest_image.manifest["kernel_release"]
    assert guest_release != os.uname().release


def test_info_reports_sane_values(vm):
    info = vm["client"].call("info")
    assert info["pid"] == 1  # the agent is the guest's init
    assert 100 << 20 < info["mem_total"] <= 256 << 20
    assert 0 < info["mem_free"] < info["mem_total"]
    assert info["uptime"] > 0
    assert "agent-ready" in info["phases"]


def test_hostname_and_etc_files_are_visible_to_processes(vm):
    c = vm["client"]
    assert c.call("set_hostname", hostname="pod-a.example")["hostname"] == "pod-a.example"
    c.call("write_etc", files={"hosts": "127.0.0.1 localhost\n10.0.0.9 peer\n",
                               "resolv.conf": "nameserver 10.0.0.53\nsearch svc.local\n"})
    assert run_ok(c, ["hostname"]).strip() == "pod-a.example"
    assert "10.0.0.9 peer" in run_ok(c, ["cat", "/etc/hosts"])
    assert "nameserver 10.0.0.53" in run_ok(c, ["cat", "/etc/resolv.conf"])
    assert run_ok(c, ["cat", "/etc/hostname"]).strip() == "pod-a.example"


def test_agent_itself_rejects_paths_outside_the_fixed_etc_set(vm):
    # bypass the client-side validation: the guest must refuse on its own
    c = vm["client"]
    chan = c._open('write_etc {"files":{"../../etc/passwd":"x"}}', time.monotonic() + 30)
    with pytest.raises(AgentError) as e:
        c._read_head(chan, time.monotonic() + 30)
    assert e.value.kind == "InvalidArgument" and "files." in str(e.value)
    assert c.call("ping")["pong"] is True  # the connection survives a refused call


def test_run_reports_exit_code_stdout_stderr_and_takes_stdin(vm):
    code, out, err = vm["client"].run(["sh", "-c", "cat; echo oops >&2; exit 7"], stdin=b"piped in")
    assert (code, out, err) == (7, b"piped in", b"oops\n")


def test_run_caps_output(vm):
    code, out, _ = vm["client"].run(["sh", "-c", "yes | head -c 300000"], max_output=1000)
    assert code == 0 and len(out) == 1000


def test_signal_and_tty(vm):
    c = vm["client"]
    p = c.open_process(["sleep", "100"])
    p.signal("TERM")
    assert p.exit_status(30) == 128 + 15
    t = c.open_process(["sh", "-c", "stty size; tty"], tty=True, size=(101, 33))
    assert t.exit_status(30) == 0
    out = b""
    while True:
        d = t.recv(4096, timeout=10)
        if not d:
            break
        out += d
    assert b"33 101" in out and b"/dev/pts/" in out


def test_guest_system_mounts_and_cgroups(vm, share):
    c = vm["client"]
    mounts = run_ok(c, ["cat", "/proc/mounts"])
    for needle in (" / erofs ", " /sys/fs/cgroup cgroup2 ", " /run tmpfs ", " /tmp tmpfs ", " /dev/pts devpts "):
        assert needle in mounts, needle
    assert "memory" in run_ok(c, ["cat", "/sys/fs/cgroup/cgroup.subtree_control"])
    assert "crun version" in run_ok(c, ["crun", "--version"])
    deadline = time.monotonic() + 60
    while not c.call("info")["late_modules_loaded"] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert c.call("info")["share_mounted"] is True
    assert run_ok(c, ["cat", f"{protocol.SHARE_MOUNT}/from-host.txt"]) == "hello from the host\n"


def test_configure_nic_by_mac(vm):
    c = vm["client"]
    # loopback is the one NIC every guest has; its MAC is all zeroes
    r = c.call("configure_nic", mac="00:00:00:00:00:00", addresses=["127.0.0.1/8", "10.77.0.5/32"],
               routes=[{"dst": "10.78.0.0/16", "gw": "10.77.0.5"}], mtu=60000)
    assert r["interface"] == "lo"
    assert "10.77.0.5/32" in run_ok(c, ["ip", "addr", "show", "dev", "lo"])
    assert "10.78.0.0/16" in run_ok(c, ["ip", "route", "show"])
    with pytest.raises(AgentError) as e:
        c.call("configure_nic", mac="02:00:00:00:00:99", addresses=["10.0.0.2/24"])
    assert e.value.kind == "NotFound"


def test_port_forward_into_the_guest(vm):
    c = vm["client"]
    server = ("import socket; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
              "s.bind(('127.0.0.1', 8099)); s.listen(1); print('listening', flush=True); "
              "c,_=s.accept(); c.sendall(b'guest says: ' + c.recv(100)); c.close()")
    p = c.open_process(["python3", "-c", server])
    assert p.recv(timeout=60) == b"listening\n"
    chan = c.open_port_forward(8099)
    chan.sendall(b"hi")
    chan.settimeout(30)
    got = b""
    while (d := chan.recv(100)):
        got += d
    assert got == b"guest says: hi"
    assert p.exit_status(30) == 0


def test_process_survives_reconnect_and_buffered_output_arrives(vm):
    c = vm["client"]
    fp = c.host_key_fingerprint
    # The process holds its lines and its exit until the test says go, so both happen while
    # nobody is attached, however fast or slow the machine is.
    p = c.open_process(["sh", "-c", "echo first; " + _wait_for_file("/tmp/survivor-go") +
                        "for i in 1 2 3 4 5; do echo line$i; done; touch /tmp/survivor-done; exit 5"],
                       id="survivor-1")
    assert p.recv(timeout=30).startswith(b"first")
    c.close()  # host drops the connection while the process runs
    assert c.call("ping")["pong"] is True  # fresh handshake on the same socket
    assert c.host_key_fingerprint == fp
    run_ok(c, ["sh", "-c", "touch /tmp/survivor-go; " + _wait_for_file("/tmp/survivor-done")])
    a = c.attach("survivor-1")
    out = b""
    while True:
        d = a.recv(4096, timeout=30)
        if not d:
            break
        out += d
    assert out.replace(b"first\n", b"") == b"".join(b"line%d\n" % i for i in range(1, 6))
    assert a.exit_status(30) == 5
    with pytest.raises(AgentError) as e:
        c.attach("survivor-1")  # delivered: gone
    assert e.value.kind == "NotFound"


def test_repeated_disconnects_during_heavy_output(vm):
    """The host drops the connection while the guest is streaming: every reconnect gets a
    clean handshake (no bytes of the old session leak into the new one) and the process's
    exit status still arrives."""
    c = vm["client"]
    # The output never stops until the test says go: every reconnect lands mid-stream and the
    # process cannot finish (and have its exit delivered) inside the loop on a fast machine.
    p = c.open_process(["sh", "-c", "i=0; while [ ! -e /tmp/noisy-go ]; do echo line-$i; i=$((i+1)); done; "
                                    "echo done"], id="noisy-1")
    assert p.recv(timeout=30)
    for _ in range(10):
        c.close()
        assert c.call("ping", timeout=60)["pong"] is True
        a = c.attach("noisy-1")
        assert a.recv(timeout=30)
    c.close()
    run_ok(c, ["touch", "/tmp/noisy-go"])
    a = c.attach("noisy-1")
    tail = b""
    while (d := a.recv(timeout=60)):
        tail = (tail + d)[-4096:]
    assert tail.endswith(b"done\n")
    assert a.exit_status(30) == 0


def test_ping_round_trip(vm):
    c = vm["client"]
    samples = []
    for _ in range(200):
        t = time.perf_counter()
        c.call("ping")
        samples.append((time.perf_counter() - t) * 1000)
    samples.sort()
    p50, p99 = statistics.median(samples), samples[int(len(samples) * 0.99) - 1]
    print(f"\nping round trip over 200 calls: p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    assert len(samples) == 200


def test_shutdown_powers_off(vm):
    # last test of the module: the shared VM goes away
    assert vm["client"].call("shutdown")["powering_off"] is True
    deadline = time.monotonic() + 60
    while vm["hv"].lookup(vm["name"]) is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert vm["hv"].lookup(vm["name"]) is None


def test_minimum_memory_guest_boots(guest_image, tmp_path):
    # config.min_memory_mib is 128: the smallest VM the daemon may start must work
    with booted_guest(guest_image, str(tmp_path), tag="min-mem", memory_mib=128) as g:
        assert g["client"].call("info")["mem_total"] <= 128 << 20
        assert g["client"].run(["python3", "-c", "print(6*7)"])[1] == b"42\n"
