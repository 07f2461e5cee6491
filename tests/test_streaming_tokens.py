"""Single-use streaming tokens: one use, 404 after use or expiry, at most 1000 outstanding."""
import socket

import pytest
from cri_api.v1 import api_pb2

from tests.support import spdy_client
from tests.support.streaming_fake import FakeBackend
from vmcri import errors
from vmcri.config import Config
from vmcri.streaming.server import StreamingServer
from vmcri.streaming.tokens import TokenCache, TokenCacheFull

pytestmark = pytest.mark.timeout(60)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_token_is_single_use_and_bound_to_its_kind():
    cache = TokenCache()
    t = cache.insert("exec", "req")
    assert cache.consume(t, "exec") == "req"
    assert cache.consume(t, "exec") is None
    t2 = cache.insert("exec", "req2")
    assert cache.consume(t2, "attach") is None and cache.consume(t2, "exec") is None


def test_token_expires_after_ttl():
    clock = Clock()
    cache = TokenCache(ttl=60, clock=clock)
    t = cache.insert("exec", "r")
    clock.now += 59.9
    t2 = cache.insert("exec", "r2")
    assert cache.consume(t, "exec") == "r"
    clock.now += 60
    assert cache.consume(t2, "exec") is None


def test_at_most_1000_outstanding_and_expiry_frees_room():
    clock = Clock()
    cache = TokenCache(clock=clock)
    tokens = {cache.insert("exec", i) for i in range(1000)}
    assert len(tokens) == 1000 and len(cache) == 1000
    with pytest.raises(TokenCacheFull):
        cache.insert("exec", "one too many")
    clock.now += 61
    cache.insert("exec", "after expiry")
    assert len(cache) == 1


def test_tokens_are_unguessable_urlsafe_strings():
    cache = TokenCache()
    t = cache.insert("exec", None)
    assert len(t) >= 32 and all(c.isalnum() or c in "-_" for c in t)


@pytest.fixture
def server():
    srv = StreamingServer(Config(streaming_port=0), FakeBackend(), token_ttl=0.2, max_tokens=3)
    srv.start()
    yield srv
    srv.stop()


def http_status(url, server):
    host, port = server.address
    path = url.split(f":{port}", 1)[1]
    with socket.create_connection((host, port)) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
                  f"X-Stream-Protocol-Version: v4.channel.k8s.io\r\nContent-Length: 0\r\n\r\n".encode())
        return int(s.recv(200).split()[1])


def req():
    return api_pb2.ExecRequest(container_id="c1", cmd=["true"], stdout=True)


def test_server_answers_404_after_expiry(server):
    import time
    url = server.get_exec(req()).url
    time.sleep(0.3)
    assert http_status(url, server) == 404


def test_server_answers_404_after_use_and_for_wrong_route(server):
    url = server.get_exec(req()).url
    assert spdy_client.exec_url(url, stderr=False).exit_code == 0
    assert http_status(url, server) == 404
    url2 = server.get_exec(req()).url
    assert http_status(url2.replace("/exec/", "/attach/"), server) == 404
    assert http_status(url2, server) == 404   # the misrouted attempt used it up
    assert http_status(server.base_url + "/exec/", server) == 404


def test_server_cap_is_unavailable(server):
    for _ in range(3):
        server.get_exec(req())
    with pytest.raises(errors.Unavailable, match="outstanding"):
        server.get_exec(req())
