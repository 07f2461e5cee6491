"""A hostile guest next to a healthy one, through the real daemon.

Two pods run a container each. With the daemon down, the bad pod's agent socket is swapped
for a fake agent in this test (and the host-key pin cleared, as if the guest's own agent had
turned hostile); the daemon comes back and talks to it. The fake then sends garbage instead
of SSH, oversized and malformed replies, endless output, or nothing at all. Meanwhile
Version, Status and the good pod's ExecSync keep answering, the daemon's memory stays
bounded, and every call to the bad pod ends with a clear error instead of hanging.

The second test floods the daemon from a real guest: ExecSync of an endless writer.
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
import time

import grpc
import paramiko
import pytest
from cri_api.v1 import api_pb2 as pb

from tests.support.pods import start_container
from tests.test_channel import FakeGuest, RawServer
from tests.test_reliability_fuzz import _rss_kib
from tests.test_sandbox_vm import pod_config
from vmcri.agent import protocol

pytestmark = [pytest.mark.reliability, pytest.mark.vm, pytest.mark.registry]

HANG_DETECTOR_S = 120
RSS_GROWTH_LIMIT_KIB = 256 * 1024


def answer_badly(mode: str, chan) -> None:
    """Reply to one agent call the way `mode` breaks the protocol."""
    try:
        if mode == "oversized":
            chan.sendall(b"{" + b"x" * (protocol.MAX_REPLY_BYTES + 65536))
        elif mode == "malformed":
            chan.sendall(b'{"ok": "perhaps", "result": [1, 2\n')
        elif mode in ("flood", "flood-window"):
            chan.sendall(b'{"ok":true,"result":{"id":"p1","pid":7,"dropped":0,"exited":false}}\n')
            if mode == "flood-window":
                chan.out_window_size = 1 << 40  # as if the host granted an endless window
            while True:
                chan.sendall(b"y\n" * 32768)
        # "silent": never answer
    except Exception:
        pass


def hostile_server(path: str, mode):
    def behaviour(conn, stop):
        if mode() == "garbage":
            conn.sendall(b"\x00\xffnot ssh at all\r\n" * 4096)
            stop.wait(5)
            return
        t = paramiko.Transport(conn)
        t.add_server_key(KEY)
        t.start_server(server=FakeGuest(lambda chan: answer_badly(mode(), chan)))
        held = []  # a dropped server channel would close itself: "silent" must stay silent
        while t.is_active() and not stop.is_set():
            ch = t.accept(0.5)
            if ch is not None:
                held.append(ch)
        t.close()
    return RawServer(path, behaviour)


def new_mode(server: RawServer, mode: list, m: str) -> None:
    """Switch behaviour and cut the daemon's connection, so it reconnects into the new one."""
    mode[0] = m
    conns, server.conns = server.conns, []
    for c in conns:
        try:
            c.shutdown(2)
        except OSError:
            pass
        c.close()


KEY = paramiko.ECDSAKey.generate()


def _timed(fn):
    t = time.monotonic()
    out = fn()
    return out, time.monotonic() - t


@pytest.fixture(scope="module")
def two_pods(daemon_factory, test_images, tmp_path_factory):
    d = daemon_factory('cni_conf_dir = ""\nagent_timeout_s = 180.0\n'
                       'insecure_registries = ["%s"]' % test_images.registry)
    image = test_images.multi.ref
    d.image.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image)))
    made = {}
    for name in ("good", "bad"):
        cfg = pod_config(f"hostile-{name}")
        cfg.log_directory = str(tmp_path_factory.mktemp(f"logs-{name}"))
        sid = d.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg)).pod_sandbox_id
        made[name] = (sid, start_container(d, sid, cfg, image, "sleeper", ["sleep", "100000"]))
    yield d, made
    for sid, _ in made.values():
        d.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid))
        d.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid))


def test_hostile_agent_does_not_hurt_the_daemon_or_other_pods(two_pods):
    d, pods = two_pods
    bad_sid, bad_cid = pods["bad"]
    good_cid = pods["good"][1]
    st = d.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=bad_sid, verbose=True))
    agent_socket = json.loads(st.info["info"])["agentSocket"]

    # swap the bad pod's agent for ours while the daemon is down
    d.stop(signal.SIGTERM)
    db = sqlite3.connect(os.path.join(d.root_dir, "vmcri.db"))
    db.execute("UPDATE sandboxes SET host_key = '' WHERE id = ?", (bad_sid,))
    db.commit()
    db.close()
    os.unlink(agent_socket)
    mode = ["silent"]
    server = hostile_server(agent_socket, lambda: mode[0])
    try:
        d.start()
        rss_start = _rss_kib(d.proc.pid)
        outcomes = {}
        for m in ("garbage", "oversized", "malformed", "silent", "flood", "flood-window"):
            new_mode(server, mode, m)
            result = {}

            def bad_call():
                try:
                    d.runtime.ExecSync(pb.ExecSyncRequest(container_id=bad_cid, cmd=["true"],
                                                          timeout=8), timeout=HANG_DETECTOR_S)
                    result["code"] = grpc.StatusCode.OK
                except grpc.RpcError as e:
                    result["code"], result["details"] = e.code(), e.details()

            t = threading.Thread(target=bad_call)
            started = time.monotonic()
            t.start()
            # while the bad pod's call is in flight, everyone else is served
            lat = {}
            while t.is_alive() or not lat:
                _, lat["Version"] = _timed(lambda: d.runtime.Version(pb.VersionRequest(),
                                                                     timeout=HANG_DETECTOR_S))
                _, lat["Status"] = _timed(lambda: d.runtime.Status(pb.StatusRequest(),
                                                                   timeout=HANG_DETECTOR_S))
                r, lat["good ExecSync"] = _timed(lambda: d.runtime.ExecSync(pb.ExecSyncRequest(
                    container_id=good_cid, cmd=["echo", "ok"], timeout=60), timeout=HANG_DETECTOR_S))
                assert (r.exit_code, r.stdout) == (0, b"ok\n")
                if time.monotonic() - started > 2:
                    break
            t.join(HANG_DETECTOR_S)
            assert not t.is_alive(), f"ExecSync to a {m} agent hung"
            took = time.monotonic() - started
            outcomes[m] = (result["code"].name, round(took, 1), result.get("details", "")[:160])
            print(f"{m:13s} -> {outcomes[m]}; others: " +
                  ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in lat.items()))
            assert result["code"] in (grpc.StatusCode.UNAVAILABLE,
                                      grpc.StatusCode.DEADLINE_EXCEEDED), outcomes[m]
            assert result["details"], outcomes[m]
        # the kubelet's stats poll asks every pod: a silent one costs its timeout once, then
        # it is skipped for a while instead of delaying every poll
        new_mode(server, mode, "silent")
        for attempt in range(2):
            stats, took = _timed(lambda: d.runtime.ListPodSandboxStats(
                pb.ListPodSandboxStatsRequest(), timeout=HANG_DETECTOR_S).stats)
            print(f"ListPodSandboxStats with a silent pod, poll {attempt}: {took:.1f}s")
            assert {s.attributes.id for s in stats} >= {bad_sid, pods["good"][0]}
        # stats and status of the bad pod still answer (without the guest's numbers)
        d.runtime.ContainerStats(pb.ContainerStatsRequest(container_id=bad_cid),
                                 timeout=HANG_DETECTOR_S)
        d.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=bad_sid),
                                   timeout=HANG_DETECTOR_S)
        rss_end = _rss_kib(d.proc.pid)
        print(f"daemon RSS {rss_start} -> {rss_end} KiB")
        assert rss_end - rss_start < RSS_GROWTH_LIMIT_KIB
        assert "timed out" in outcomes["silent"][2]
        assert d.proc.poll() is None
    finally:
        mode[0] = "silent"
        server.close()


def test_guest_flooding_exec_output_is_capped(two_pods):
    d, pods = two_pods
    good_cid = pods["good"][1]
    rss_start = _rss_kib(d.proc.pid)
    # 'yes' writes as fast as the guest can; ExecSync keeps at most 16 MiB and stops at its timeout
    try:
        r = d.runtime.ExecSync(pb.ExecSyncRequest(container_id=good_cid, cmd=["yes"], timeout=15),
                               timeout=HANG_DETECTOR_S)
        code, size = "OK", len(r.stdout)
    except grpc.RpcError as e:
        code, size = e.code().name, 0
        assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e.details()
    rss_end = _rss_kib(d.proc.pid)
    print(f"flooding ExecSync -> {code}, {size} bytes; daemon RSS {rss_start} -> {rss_end} KiB")
    assert rss_end - rss_start < RSS_GROWTH_LIMIT_KIB
    r = d.runtime.ExecSync(pb.ExecSyncRequest(container_id=good_cid, cmd=["echo", "ok"], timeout=60))
    assert r.stdout == b"ok\n"
