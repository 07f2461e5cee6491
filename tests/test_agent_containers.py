"""The agent's container calls: validation on the host, then crun in a real TCG guest.

The guest tests drive the agent directly (AgentClient), with bundles written into the
VM's 9p share: a busybox-static rootfs and a config.json from vmcri's own build_spec.
"""
from __future__ import annotations

import inspect
import json
import os
import shutil
import time

import pytest

from tests.test_ocispec import container, sandbox
from vmcri.agent import protocol
from vmcri.agent.protocol import ProtocolError
from vmcri.channel import AgentClient, AgentError

DEB_CACHE = os.environ.get("VMCRI_TEST_DEB_CACHE", "/var/cache/vmcri-test/debs")
APPLETS = ("sh", "cat", "echo", "sleep", "stty", "tty", "touch", "test", "[", "ls", "id", "true")


# -- hostile parameters are refused (shared validation, host and guest) -----------------

@pytest.mark.parametrize("method, params, field", [
    ("container_create", {"id": "c1", "bundle": "/"}, "bundle:"),
    ("container_create", {"id": "c1", "bundle": protocol.container_bundle("c2")}, "bundle:"),
    ("container_create", {"id": "c1", "bundle": protocol.container_bundle("c1") + "/../../../etc"}, "bundle:"),
    ("container_create", {"id": "../c1", "bundle": protocol.container_bundle("../c1")}, "id:"),
    ("container_create", {"id": "c1", "bundle": protocol.container_bundle("c1"), "tty": "yes"}, "tty:"),
    ("container_create", {"id": "c1", "bundle": protocol.container_bundle("c1"), "stdin_once": 1}, "stdin_once:"),
    ("container_start", {"id": "x" * 65}, "id:"),
    ("container_kill", {"id": "c1", "signal": "SEGV"}, "signal:"),
    ("container_kill", {"id": "c1", "signal": 9}, "signal:"),
    ("container_delete", {}, "id:"),
    ("container_stats", {"id": "a/b"}, "id:"),
    ("attach", {"id": "c1", "live": "true"}, "live:"),
    ("set_sysctls", {"sysctls": {"../../etc/passwd": "x"}}, "sysctls."),
    ("set_sysctls", {"sysctls": {"net..ipv4": "1"}}, "sysctls."),
    ("set_sysctls", {"sysctls": {"kernel": "1"}}, "sysctls."),
    ("set_sysctls", {"sysctls": {"Net.IPv4.x": "1"}}, "sysctls."),
    ("set_sysctls", {"sysctls": {"net.ipv4/../x": "1"}}, "sysctls."),
    ("set_sysctls", {"sysctls": {"net.ipv4.ip_forward": "1\nkernel.x=1"}}, "sysctls.net.ipv4.ip_forward"),
    ("set_sysctls", {"sysctls": {"net.ipv4.ip_forward": 1}}, "sysctls.net.ipv4.ip_forward"),
    ("set_sysctls", {"sysctls": "net.ipv4.ip_forward=1"}, "sysctls:"),
])
def test_hostile_container_params_name_the_field(method, params, field):
    with pytest.raises(ProtocolError) as e:
        protocol.validate(method, params)
    assert str(e.value).startswith(field), e.value


def test_valid_container_params_are_normalised():
    p = protocol.validate("container_create", {"id": "c1", "bundle": protocol.container_bundle("c1") + "/"})
    assert p == {"id": "c1", "bundle": "/run/vmcri/share/containers/c1", "tty": False,
                 "stdin": False, "stdin_once": False}
    assert protocol.validate("attach", {"id": "c1"})["live"] is False
    assert protocol.validate("container_kill", {"id": "c1"})["signal"] == "KILL"


def _raw_call(client: AgentClient, command: str):
    """Send a command string as is, skipping the client-side validation (a hostile host)."""
    deadline = time.monotonic() + 30
    chan = client._open(command, deadline)
    try:
        return client._read_head(chan, deadline)[0]
    finally:
        chan.close()


def test_agent_refuses_hostile_params_itself(dev_agent):
    c = AgentClient(dev_agent)
    try:
        with pytest.raises(AgentError) as e:
            _raw_call(c, 'container_create {"id":"c1","bundle":"/etc"}')
        assert e.value.kind == "InvalidArgument" and "bundle:" in str(e.value)
        with pytest.raises(AgentError) as e:
            _raw_call(c, 'set_sysctls {"sysctls":{"kernel/../../x":"1"}}')
        assert e.value.kind == "InvalidArgument" and "sysctls." in str(e.value)
        # unknown containers: state/kill are NotFound, delete is a no-op
        for method in ("container_state", "container_start", "container_stats"):
            with pytest.raises(AgentError) as e:
                c.call(method, id="nosuch")
            assert e.value.kind == "NotFound", method
        with pytest.raises(AgentError) as e:
            c.call("container_kill", id="nosuch", signal="TERM")
        assert e.value.kind == "NotFound"
        # a bundle without config.json: nothing is left behind under that id
        with pytest.raises(AgentError) as e:
            c.call("container_create", id="nobundle", bundle=protocol.container_bundle("nobundle"))
        assert e.value.kind == "NotFound" and "config.json" in str(e.value)
        with pytest.raises(AgentError):
            c.call("container_state", id="nobundle")
        # live attach is for containers only; a run process keeps its single consumer
        p = c.open_process(["sleep", "30"], id="plain")
        with pytest.raises(AgentError) as e:
            c.attach("plain", live=True)
        assert e.value.kind == "InvalidArgument" and "live:" in str(e.value)
        p.signal("KILL")
        assert p.exit_status(10) == 137
        # sandbox_stats reads only procfs/sysfs, so it works on the host too
        s = c.call("sandbox_stats")
        assert s["memory"]["max"] > 0 and s["processes"] > 0 and s["cpu_usage_usec"] > 0
        assert all(i["name"] != "lo" for i in s["interfaces"])
    finally:
        c.close()


# -- crun in a real guest ---------------------------------------------------------------

@pytest.fixture(scope="module")
def busybox_rootfs(tmp_path_factory):
    from vmcri.guestimage import debs
    paths = debs.download(list(debs.resolve(["busybox-static"]).values()), DEB_CACHE)
    unpacked = tmp_path_factory.mktemp("bb-deb")
    debs.extract(paths["busybox-static"], str(unpacked))
    root = tmp_path_factory.mktemp("bb-rootfs")
    root.chmod(0o755)
    for d in ("bin", "etc", "proc", "sys", "dev", "tmp"):
        (root / d).mkdir()
    shutil.copy2(unpacked / "bin" / "busybox", root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    return root


@pytest.fixture(scope="module")
def guest(guest_image, tmp_path_factory):
    from tests.support.fx_guest import booted_guest
    work = tmp_path_factory.mktemp("ctr-guest")
    share = work / "share"
    (share / "containers").mkdir(parents=True)
    with booted_guest(guest_image, str(work), tag="ctr", share_dir=str(share)) as g:
        c = g["client"]
        deadline = time.monotonic() + 60
        while not c.call("info")["share_mounted"] and time.monotonic() < deadline:
            time.sleep(0.2)
        yield c, share


def make_bundle(share, rootfs, cid, script, tty=False, stdin=False, stdin_once=False):
    from vmcri.container.ocispec import GuestPaths, build_spec
    paths = GuestPaths(hosts="/run/vmcri/etc/hosts", resolv_conf="/run/vmcri/etc/resolv.conf",
                       hostname="/run/vmcri/etc/hostname", shm="/dev/shm", host_mount_to_guest={})
    bundle = share / "containers" / cid
    shutil.copytree(rootfs, bundle / "rootfs", symlinks=True)
    cfg = container(command=["/bin/sh", "-c", script], tty=tty, stdin=stdin, stdin_once=stdin_once)
    cfg.image.image = "busybox"
    spec = build_spec(cid, cfg, sandbox(), {}, rootfs_path=protocol.container_bundle(cid) + "/rootfs",
                      guest_paths=paths, sandbox_id="agent-test",
                      read_image_file=lambda p: (rootfs / p.lstrip("/")).read_bytes()
                      if (rootfs / p.lstrip("/")).is_file() else None)
    (bundle / "config.json").write_text(json.dumps(spec))
    return protocol.container_bundle(cid)


def create(client, share, rootfs, cid, script, **kw):
    bundle = make_bundle(share, rootfs, cid, script, **kw)
    return client.call("container_create", id=cid, bundle=bundle, tty=kw.get("tty", False),
                       stdin=kw.get("stdin", False), stdin_once=kw.get("stdin_once", False))


def read_until(stream, needle: bytes, timeout: float = 60) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while needle not in out:
        chunk = stream.recv(65536, timeout=max(0.1, deadline - time.monotonic()))
        if not chunk:
            break
        out += chunk
    return out


def read_rest(stream, timeout: float = 60) -> bytes:
    out = b""
    while True:
        chunk = stream.recv(65536, timeout=timeout)
        if not chunk:
            return out
        out += chunk


def in_ctr(client, cid, *cmd) -> bytes:
    rc, out, err = client.run(["crun", "exec", cid, *cmd], timeout=60)
    assert rc == 0, (cmd, out, err)
    return out


def pump_attach(client, cid, stdout=0, stderr=0):
    """The log pump's (re-)attach. An agent that keeps an output ring is told how many bytes
    of each stream the host already has; one with a consuming replay buffer is not. Either
    way each byte must arrive once."""
    if "offsets" in inspect.signature(client.attach).parameters:
        return client.attach(cid, offsets={"stdout": stdout, "stderr": stderr})
    return client.attach(cid)


def wait_file(client, cid, path, timeout=60):
    deadline = time.monotonic() + timeout
    while client.run(["crun", "exec", cid, "test", "-e", path], timeout=60)[0] != 0:
        assert time.monotonic() < deadline, f"{path} never appeared in {cid}"
        time.sleep(0.2)


def wait_stopped(client, cid, timeout=60):
    deadline = time.monotonic() + timeout
    while (st := client.call("container_state", id=cid))["status"] != "stopped":
        assert time.monotonic() < deadline, st
        time.sleep(0.1)
    return st


@pytest.mark.vm
def test_output_made_while_the_host_is_away_is_replayed_once(guest, busybox_rootfs):
    c, share = guest
    script = ("echo first; while [ ! -e /tmp/go ]; do sleep 0.1; done; echo during; echo err-during >&2; "
              "touch /tmp/said; while [ ! -e /tmp/end ]; do sleep 0.1; done; echo last")
    create(c, share, busybox_rootfs, "replay", script)
    pump = c.attach("replay")  # the log pump attaches before start
    assert c.call("container_start", id="replay")["status"] == "running"
    assert read_until(pump, b"first\n") == b"first\n"
    c.close()  # the host goes away; the next call reconnects
    # An immediate reconnect can lose its banner to the agent's not-yet-ended old session
    # (the agent learns of the drop from its next read); test_guest_boot waits likewise.
    time.sleep(3)
    in_ctr(c, "replay", "touch", "/tmp/go")
    wait_file(c, "replay", "/tmp/said")
    pump = pump_attach(c, "replay", stdout=len(b"first\n"))
    assert read_until(pump, b"during\n") == b"during\n"  # not "first" again
    assert pump.recv_stderr(65536, timeout=30) == b"err-during\n"
    in_ctr(c, "replay", "touch", "/tmp/end")
    assert read_rest(pump) == b"last\n"
    assert pump.exit_status(30) == 0
    # everything was delivered: only the exit status is left
    again = pump_attach(c, "replay", stdout=len(b"first\nduring\nlast\n"), stderr=len(b"err-during\n"))
    assert read_rest(again) == b""
    assert again.exit_status(30) == 0
    assert c.call("container_delete", id="replay") == {"deleted": True}


@pytest.mark.vm
def test_live_attach_gets_no_replay_and_consumes_nothing(guest, busybox_rootfs):
    c, share = guest
    create(c, share, busybox_rootfs, "live", "echo early; touch /tmp/said; "
           "while [ ! -e /tmp/go ]; do sleep 0.1; done; echo late; exec sleep 100000")
    c.call("container_start", id="live")
    wait_file(c, "live", "/tmp/said")
    live1, live2 = c.attach("live", live=True), c.attach("live", live=True)  # several at once
    in_ctr(c, "live", "touch", "/tmp/go")
    assert read_until(live1, b"late\n") == b"late\n"
    assert read_until(live2, b"late\n") == b"late\n"
    pump = c.attach("live")
    assert read_until(pump, b"late\n") == b"early\nlate\n"  # all of it, once
    c.call("container_kill", id="live", signal="KILL")
    for s in (live1, live2, pump):
        assert read_rest(s) == b""
        assert s.exit_status(30) == 137
    c.call("container_delete", id="live")


@pytest.mark.vm
def test_kill_state_delete_are_idempotent(guest, busybox_rootfs):
    c, share = guest
    # the init is PID 1 of its namespace: TERM reaches it only through a handler
    created = create(c, share, busybox_rootfs, "idem", "trap 'exit 143' TERM; echo up; while true; do sleep 0.1; done")
    assert created["pid"] > 1
    st = c.call("container_state", id="idem")
    assert st["status"] == "created" and st["pid"] == created["pid"]
    pump = c.attach("idem")
    assert c.call("container_start", id="idem")["status"] == "running"
    assert read_until(pump, b"up\n") == b"up\n"  # the trap is set: TERM before it is ignored
    c.call("container_kill", id="idem", signal="TERM")
    st = wait_stopped(c, "idem")
    assert st["exit_code"] == 143
    for sig in ("TERM", "KILL"):  # stopped already: not an error
        assert c.call("container_kill", id="idem", signal=sig)["status"] == "stopped"
    assert pump.exit_status(30) == 143
    with pytest.raises(AgentError) as e:
        c.call("container_start", id="idem")
    assert e.value.kind == "FailedPrecondition"
    assert c.call("container_delete", id="idem") == {"deleted": True}
    assert c.call("container_delete", id="idem") == {"deleted": False}
    with pytest.raises(AgentError) as e:
        c.call("container_state", id="idem")
    assert e.value.kind == "NotFound"
    rc, out, _ = c.run(["crun", "list", "-q"])
    assert "idem" not in out.decode().split()
    # the id is free again
    shutil.rmtree(share / "containers" / "idem")
    create(c, share, busybox_rootfs, "idem", "true")
    c.call("container_delete", id="idem")


@pytest.mark.vm
def test_failed_create_reports_crun_and_leaves_nothing(guest, busybox_rootfs):
    c, share = guest
    make_bundle(share, busybox_rootfs, "broken", "true")
    spec = json.loads((share / "containers" / "broken" / "config.json").read_text())
    spec["root"]["path"] = "/nonexistent-rootfs"
    (share / "containers" / "broken" / "config.json").write_text(json.dumps(spec))
    with pytest.raises(AgentError) as e:
        c.call("container_create", id="broken", bundle=protocol.container_bundle("broken"))
    assert "crun create broken" in str(e.value) and "nonexistent-rootfs" in str(e.value)
    with pytest.raises(AgentError):
        c.call("container_state", id="broken")
    rc, out, _ = c.run(["crun", "list", "-q"])
    assert "broken" not in out.decode().split()
    with pytest.raises(AgentError) as e:  # config.json says terminal=false
        c.call("container_create", id="broken", bundle=protocol.container_bundle("broken"), tty=True)
    assert e.value.kind == "InvalidArgument" and "tty:" in str(e.value)


@pytest.mark.vm
def test_tty_container_with_stdin_once_and_resize(guest, busybox_rootfs):
    c, share = guest
    create(c, share, busybox_rootfs, "term", "read x; stty size; tty; echo got-$x; cat; echo eof-seen",
           tty=True, stdin=True, stdin_once=True)
    pump = c.attach("term")
    c.call("container_start", id="term")
    user = c.attach("term", stdin=True, live=True)
    user.resize(101, 33)
    user.send(b"hello\n")
    out = read_until(pump, b"got-hello")
    assert b"33 101" in out and b"/dev/pts/" in out
    user.close()  # stdin_once: the first stdin attacher leaving ends the container's input
    assert b"eof-seen" in read_rest(pump)
    assert pump.exit_status(30) == 0
    c.call("container_delete", id="term")


@pytest.mark.vm
def test_pipe_stdin_exec_tty_and_stats(guest, busybox_rootfs):
    c, share = guest
    create(c, share, busybox_rootfs, "svc", "while read l; do echo in:$l; done; echo closed; exec sleep 100000",
           stdin=True)
    pump = c.attach("svc", stdin=True)
    c.call("container_start", id="svc")
    pump.send(b"one\n")
    assert read_until(pump, b"in:one\n") == b"in:one\n"
    # without stdin_once, an attacher leaving does not close the container's stdin
    other = c.attach("svc", stdin=True, live=True)
    other.close_stdin()
    other.close()
    pump.send(b"two\n")
    assert read_until(pump, b"in:two\n") == b"in:two\n"
    # crun exec with stdin, and crun exec -t through run with a terminal
    assert c.run(["crun", "exec", "svc", "cat"], stdin=b"piped\n") == (0, b"piped\n", b"")
    term = c.open_process(["crun", "exec", "-t", "svc", "/bin/sh", "-c", "stty size; tty"],
                          tty=True, size=(90, 20))
    out = read_rest(term)
    assert b"20 90" in out and b"/dev/pts/" in out, out
    assert term.exit_status(30) == 0
    stats = c.call("container_stats", id="svc")
    assert stats["memory"]["current"] > 0 and stats["pids"] >= 1
    assert stats["cpu_usage_usec"] > 0 and stats["memory"]["max"] == "max"
    pod = c.call("sandbox_stats")
    assert 0 < pod["memory"]["current"] < pod["memory"]["max"]
    assert pod["processes"] > 1 and pod["memory"]["pgfault"] > 0
    c.call("container_kill", id="svc", signal="KILL")
    assert pump.exit_status(30) == 137
    c.call("container_delete", id="svc")


@pytest.mark.vm
def test_set_sysctls_in_the_guest(guest):
    c, _ = guest
    assert c.call("set_sysctls", sysctls={"net.ipv4.ip_forward": "1", "kernel.shm_rmid_forced": "1"})[
        "set"] == ["net.ipv4.ip_forward", "kernel.shm_rmid_forced"]
    rc, out, _ = c.run(["cat", "/proc/sys/net/ipv4/ip_forward", "/proc/sys/kernel/shm_rmid_forced"])
    assert out == b"1\n1\n"
    with pytest.raises(AgentError) as e:
        c.call("set_sysctls", sysctls={"net.no_such.knob": "1"})
    assert e.value.kind == "InvalidArgument" and "sysctls.net.no_such.knob" in str(e.value)


def test_bad_pod_sysctl_names_are_refused_before_any_vm():
    from vmcri.errors import InvalidArgument
    from vmcri.sandbox.sandbox_run import validate
    sb = sandbox()
    sb.linux.sysctls["kernel/../../../etc/x"] = "1"
    with pytest.raises(InvalidArgument) as e:
        validate(sb)
    assert "config.linux.sysctls." in str(e.value)


@pytest.mark.vm
def test_run_pod_sandbox_sets_the_pod_sysctls_guest_wide():
    from tests.support.fx_daemon import make_daemon
    from vmcri import config as config_mod
    from vmcri.daemon import Runtime
    d = make_daemon('cni_conf_dir = ""', prefix="vmcri-sysctl-")
    rt, sid = None, None
    sb = sandbox()
    sb.log_directory = ""
    sb.linux.sysctls.update({"net.ipv4.ip_forward": "1", "kernel.shm_rmid_forced": "1"})
    try:
        rt = Runtime(config_mod.load(d.config_path))
        sid = rt.sandboxes.run(sb)
        agent = rt.sandboxes.agent(rt.sandboxes.get(sid))
        rc, out, _ = agent.run(["cat", "/proc/sys/net/ipv4/ip_forward", "/proc/sys/kernel/shm_rmid_forced"])
        assert (rc, out) == (0, b"1\n1\n")
    finally:
        if sid:
            rt.sandboxes.stop(sid)
            rt.sandboxes.remove(sid)
        if rt is not None:
            rt.close()
        shutil.rmtree(d.base, ignore_errors=True)
