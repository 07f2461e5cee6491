"""Exec, attach and port-forward through the daemon's streaming server into a real pod VM."""
import platform
import time

import grpc
import pytest
from cri_api.v1 import api_pb2 as pb

from tests.support.spdy_client import ExecSession, PortForwardClient, exec_url
from tests.test_container_vm import create_start, ctr_config, wait_state
from tests.support.pods import pod_env

pytestmark = [pytest.mark.vm, pytest.mark.registry]


@pytest.fixture(scope="module")
def env(daemon_factory, test_images, tmp_path_factory):
    yield from pod_env(daemon_factory, test_images, tmp_path_factory, "stream")


@pytest.fixture(scope="module")
def server_ctr(env):
    # a tiny TCP service inside the pod: answers each connection with a line
    cid = create_start(env, ctr_config("svc", env[3].multi.ref, command=["/bin/sh", "-c"],
                                       args=["while true; do echo pong-from-guest | nc -l -p 8080; done"],
                                       stdin=True))
    wait_state(env, cid, pb.ContainerState.CONTAINER_RUNNING)
    return cid


def test_exec_over_spdy_runs_in_the_guest(env, server_ctr):
    url = env[0].runtime.Exec(pb.ExecRequest(container_id=server_ctr, cmd=["uname", "-r"],
                                             stdout=True, stderr=True)).url
    res = exec_url(url)
    assert res.exit_code == 0
    assert res.stdout.decode().strip() not in ("", platform.release())


def test_exec_exit_code_and_stdin(env, server_ctr):
    url = env[0].runtime.Exec(pb.ExecRequest(container_id=server_ctr,
                                             cmd=["/bin/sh", "-c", "cat; exit 5"],
                                             stdin=True, stdout=True, stderr=True)).url
    res = exec_url(url, stdin=b"through stdin\n")
    assert res.stdout == b"through stdin\n"
    assert res.exit_code == 5


def test_exec_with_tty(env, server_ctr):
    url = env[0].runtime.Exec(pb.ExecRequest(container_id=server_ctr, cmd=["/bin/sh", "-c", "tty; stty size"],
                                             tty=True, stdout=True, stdin=True)).url
    s = ExecSession(url, stdin=True, stdout=True, stderr=False, tty=True)
    s.resize(100, 30)
    time.sleep(0.5)
    s.close_stdin()
    res = s.wait(60)
    out = res.stdout.decode()
    assert "/dev/pts/" in out


def test_port_forward_reaches_the_pod(env, server_ctr):
    url = env[0].runtime.PortForward(pb.PortForwardRequest(pod_sandbox_id=env[1], port=[8080])).url
    with PortForwardClient.connect(url) as pf:
        deadline = time.monotonic() + 30
        reply = b""
        while time.monotonic() < deadline:
            reply, err = pf.roundtrip(8080, b"ping\n")
            if b"pong-from-guest" in reply:
                break
            time.sleep(0.5)  # the nc loop restarts between connections
    assert b"pong-from-guest" in reply


def test_streaming_bad_input(env, server_ctr):
    with pytest.raises(grpc.RpcError) as e:
        env[0].runtime.Exec(pb.ExecRequest(container_id=server_ctr, cmd=[], stdout=True))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cmd" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        env[0].runtime.Exec(pb.ExecRequest(container_id="d" * 64, cmd=["true"], stdout=True))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        env[0].runtime.PortForward(pb.PortForwardRequest(pod_sandbox_id="d" * 64, port=[80]))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
