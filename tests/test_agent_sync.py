"""The session sync below SSH (vmcri/agent/sync.py): pure byte-stream tests."""
from __future__ import annotations

import os

import pytest

from vmcri.agent import sync


def feed_all(scanner, chunks):
    out = []
    for c in chunks:
        out.extend(scanner.feed(c))
    return out


def joined_data(events):
    return b"".join(part for kind, part in events if kind == "data")


def test_data_passes_through_without_being_held_back():
    s = sync.HelloScanner()
    # a chunk ending in the first bytes of MAGIC must still be delivered at once
    events = s.feed(b"ssh bytes" + sync.MAGIC[:5])
    assert events == [("data", b"ssh bytes" + sync.MAGIC[:5])]


@pytest.mark.parametrize("split", [0, 1, 7, len(sync.MAGIC) - 1, len(sync.MAGIC), len(sync.MAGIC) + 5,
                                   sync.HELLO_BYTES - 1])
def test_hello_is_found_wherever_the_reads_split_it(split):
    hello = sync.new_hello()
    stream = b"old session tail" + hello + b"SSH-2.0-new\r\n"
    cut = len(b"old session tail") + split
    events = feed_all(sync.HelloScanner(), [stream[:cut], stream[cut:]])
    hellos = [p for k, p in events if k == "hello"]
    assert hellos == [hello]
    after = events[[k for k, _ in events].index("hello") + 1:]
    assert joined_data(after) == b"SSH-2.0-new\r\n"
    before = events[:[k for k, _ in events].index("hello")]
    assert joined_data(before).startswith(b"old session tail")


def test_two_hellos_in_one_read_start_two_sessions():
    a, b = sync.new_hello(), sync.new_hello()
    events = sync.HelloScanner().feed(a + b"x" + b + b"y")
    assert events == [("hello", a), ("data", b"x"), ("hello", b), ("data", b"y")]


def test_byte_by_byte_feed():
    hello = sync.new_hello()
    s = sync.HelloScanner()
    events = feed_all(s, [bytes([c]) for c in b"ab" + hello + b"cd"])
    assert [p for k, p in events if k == "hello"] == [hello]
    assert joined_data(events).endswith(b"cd")


def test_await_echo_skips_stale_bytes_and_keeps_what_follows():
    hello = sync.new_hello()
    data = [os.urandom(70_000), hello[:3], hello[3:] + b"SSH-2.0-x\r\n"]
    assert sync.await_echo(lambda n: data.pop(0), hello) == b"SSH-2.0-x\r\n"


def test_await_echo_ignores_another_connections_hello():
    mine, other = sync.new_hello(), sync.new_hello()
    data = [other + b"junk", mine]
    assert sync.await_echo(lambda n: data.pop(0), mine) == b""


def test_await_echo_is_bounded():
    with pytest.raises(sync.SyncError, match="before the session sync"):
        sync.await_echo(lambda n: b"z" * 65536, sync.new_hello(), limit=1 << 20)
    with pytest.raises(sync.SyncError, match="closed"):
        sync.await_echo(lambda n: b"", sync.new_hello())


def test_read_hello_for_the_dev_server():
    hello = sync.new_hello()
    data = [b"noise", hello]
    assert sync.read_hello(lambda n: data.pop(0)) == hello


def test_an_agent_without_the_sync_is_recognised():
    data = [b"SSH-2.0-paramiko_2.12.0\r\n"]
    with pytest.raises(sync.LegacyAgent):
        sync.await_echo(lambda n: data.pop(0), sync.new_hello())


def test_a_stale_banner_of_a_syncing_agent_is_not_mistaken_for_a_legacy_one():
    """An earlier session's echo and banner, undelivered, arrive before ours."""
    mine, old = sync.new_hello(), sync.new_hello()
    data = [old + b"SSH-2.0-paramiko_2.12.0\r\n" + b"\x00" * 100, mine + b"SSH-2.0-new\r\n"]
    assert sync.await_echo(lambda n: data.pop(0), mine) == b"SSH-2.0-new\r\n"
