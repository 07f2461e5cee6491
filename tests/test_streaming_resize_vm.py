"""TTY resize reaches the container's terminal in a real pod VM: after a resize, `stty size`
inside the container prints the new rows and columns, over SPDY and WebSocket, for exec
and for attach to a tty container."""
import threading

import pytest
from cri_api.v1 import api_pb2 as pb

from tests.support.pods import pod_env, wait_for
from tests.support.spdy_client import ExecSession
from tests.support.ws_client import WSClient
from tests.test_container_vm import create_start, ctr_config, wait_state

pytestmark = [pytest.mark.vm, pytest.mark.registry]

# Prints the terminal size once per line read: the test resizes, then sends lines until the
# new size shows (the resize and stdin travel on separate streams, so their order is free).
SIZE_LOOP = "stty size; while read l; do echo size=$(stty size); done"
COLS, ROWS = 97, 41
WANT = f"size={ROWS} {COLS}"


@pytest.fixture(scope="module")
def env(daemon_factory, test_images, tmp_path_factory):
    yield from pod_env(daemon_factory, test_images, tmp_path_factory, "resize")


@pytest.fixture(scope="module")
def sleeper(env):
    cid = create_start(env, ctr_config("sleeper", env[3].multi.ref, command=["sleep", "100000"]))
    wait_state(env, cid, pb.ContainerState.CONTAINER_RUNNING)
    return cid


def _until_size_shows(output, send_line) -> str:
    def seen():
        if WANT in output():
            return True
        send_line()
        return False
    try:
        wait_for(seen, f"'{WANT}' in the container's output", timeout=60, every=0.5)
    except AssertionError:
        raise AssertionError(f"the resize never reached the pty; output: {output()!r}") from None
    return output()


def _spdy_resize(url: str) -> str:
    s = ExecSession(url, stdin=True, stdout=True, stderr=False, tty=True)
    try:
        s.resize(123, 37)
        wait_for(lambda: s.output().strip(), "the first stty size")
        s.resize(COLS, ROWS)
        return _until_size_shows(lambda: s.output().decode(errors="replace"), lambda: s.send(b"x\n"))
    finally:
        s.close_stdin()
        s.conn.close()


def _ws_resize(url: str) -> str:
    c = WSClient(url, ["v5.channel.k8s.io"])
    out = bytearray()

    def collect():
        try:
            for ch, data in c.messages():
                if ch == 1:
                    out.extend(data)
        except OSError:
            pass
    t = threading.Thread(target=collect, daemon=True)
    t.start()
    try:
        c.resize(123, 37)
        wait_for(lambda: out.strip(), "the first stty size")
        c.resize(COLS, ROWS)
        return _until_size_shows(lambda: out.decode(errors="replace"), lambda: c.send(0, b"x\n"))
    finally:
        c.close()


def _exec_url(env, cid):
    return env[0].runtime.Exec(pb.ExecRequest(container_id=cid, cmd=["/bin/sh", "-c", SIZE_LOOP],
                                              tty=True, stdin=True, stdout=True)).url


def test_exec_resize_over_spdy(env, sleeper):
    assert WANT in _spdy_resize(_exec_url(env, sleeper))


def test_exec_resize_over_websocket(env, sleeper):
    assert WANT in _ws_resize(_exec_url(env, sleeper))


@pytest.fixture(scope="module")
def tty_ctr(env):
    cid = create_start(env, ctr_config("ttyloop", env[3].multi.ref, command=["/bin/sh", "-c", SIZE_LOOP],
                                       tty=True, stdin=True))
    wait_state(env, cid, pb.ContainerState.CONTAINER_RUNNING)
    return cid


def test_attach_resize_over_spdy(env, tty_ctr):
    url = env[0].runtime.Attach(pb.AttachRequest(container_id=tty_ctr, stdin=True, stdout=True,
                                                 tty=True)).url
    s = ExecSession(url, stdin=True, stdout=True, stderr=False, tty=True)
    try:
        s.resize(COLS, ROWS)
        out = _until_size_shows(lambda: s.output().decode(errors="replace"), lambda: s.send(b"x\n"))
    finally:
        s.conn.close()
    assert WANT in out
