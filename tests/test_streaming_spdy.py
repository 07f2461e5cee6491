"""SPDY/3.1 framing against hand-assembled bytes from the draft's layouts, and the
connection's PING/GOAWAY/RST/flow-control behaviour over real loopback sockets."""
import hashlib
import select
import socket
import struct
import threading
import zlib

import pytest

from vmcri.streaming import spdy
from vmcri.streaming.spdy_session import Connection, StreamReset

pytestmark = pytest.mark.timeout(60)

# sha256 of the dictionary bytes the Go peers (moby/spdystream headerDictionary) use
DICT_SHA256 = "51d27341373f923f3cd88e1eb7162aeaa3723d7585ff2399201dc06498407f02"


def tcp_pair():
    lst = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(lst.getsockname())
    b, _ = lst.accept()
    lst.close()
    return a, b


def nv_block(pairs):
    """Name/value block laid out by hand from the draft (2.6.10)."""
    out = struct.pack(">I", len(pairs))
    for k, v in pairs:
        out += struct.pack(">I", len(k)) + k + struct.pack(">I", len(v)) + v
    return out


def spec_compressor():
    c = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, zdict=spdy.DICTIONARY)
    return lambda raw: c.compress(raw) + c.flush(zlib.Z_SYNC_FLUSH)


def read_frame_raw(sock):
    head = b""
    while len(head) < 8:
        chunk = sock.recv(8 - len(head))
        assert chunk, "connection closed"
        head += chunk
    length = struct.unpack(">I", head[4:])[0] & 0xFFFFFF
    body = b""
    while len(body) < length:
        body += sock.recv(length - len(body))
    return head, body


# -- framing golden bytes ----------------------------------------------------------------
def test_dictionary_is_the_spdy3_one():
    d = spdy.DICTIONARY
    assert len(d) == 1423
    assert hashlib.sha256(d).hexdigest() == DICT_SHA256
    assert d[:11] == b"\x00\x00\x00\x07options" and d.endswith(b"enq=0.")


def test_data_frame_golden():
    assert spdy.data_frame(5, b"hello", fin=True) == b"\x00\x00\x00\x05\x01\x00\x00\x05hello"
    assert spdy.data_frame(0x7FFFFFFF, b"") == b"\x7f\xff\xff\xff\x00\x00\x00\x00"


def test_control_frames_golden():
    assert spdy.ping_frame(7) == b"\x80\x03\x00\x06\x00\x00\x00\x04\x00\x00\x00\x07"
    assert spdy.rst_stream_frame(3, spdy.CANCEL) == bytes.fromhex("80030003000000080000000300000005")
    assert spdy.goaway_frame(9, 1) == bytes.fromhex("80030007000000080000000900000001")
    assert spdy.window_update_frame(1, 0x10000) == bytes.fromhex("80030009000000080000000100010000")
    assert spdy.settings_frame({7: 0x20000}) == bytes.fromhex("800300040000000c000000010000000700020000")


def test_syn_stream_hand_assembled_is_decoded():
    block = spec_compressor()(nv_block([(b"streamtype", b"stdout"), (b"port", b"80\x0081")]))
    payload = struct.pack(">IIBB", 3, 0, 0b01100000, 0) + block
    raw = b"\x80\x03\x00\x01" + struct.pack(">I", (spdy.FLAG_FIN << 24) | len(payload)) + payload
    a, b = tcp_pair()
    a.sendall(raw)
    f = spdy.FrameReader(b).read()
    assert f.type == spdy.SYN_STREAM and f.stream_id == 3 and f.fin and f.priority == 3
    assert f.headers == {"streamtype": ["stdout"], "port": ["80", "81"]}
    a.close(), b.close()


def test_syn_stream_encoder_matches_the_layout():
    comp = spdy.HeaderCompressor()
    raw = spdy.syn_stream_frame(comp, 1, {"streamType": "error"}, priority=0)
    assert raw[:4] == b"\x80\x03\x00\x01"
    flags_len = struct.unpack(">I", raw[4:8])[0]
    assert flags_len >> 24 == 0 and flags_len & 0xFFFFFF == len(raw) - 8
    assert raw[8:18] == struct.pack(">IIBB", 1, 0, 0, 0)
    zblock = raw[18:]
    # zlib header announces a preset dictionary whose adler32 is the SPDY/3 one
    assert zblock[1] & 0x20
    assert zblock[2:6] == struct.pack(">I", zlib.adler32(spdy.DICTIONARY))
    d = zlib.decompressobj(zdict=spdy.DICTIONARY)
    assert d.decompress(zblock) == nv_block([(b"streamtype", b"error")])


def test_header_context_is_shared_per_direction():
    comp = spdy.HeaderCompressor()
    first = comp.compress({"streamtype": "stdin"})
    second = comp.compress({"streamtype": "stdin"})
    dec = spdy.HeaderDecompressor()
    assert dec.decompress(first) == {"streamtype": ["stdin"]}
    assert dec.decompress(second) == {"streamtype": ["stdin"]}
    with pytest.raises(spdy.SpdyError):
        spdy.HeaderDecompressor().decompress(second)   # only valid inside the same stream


def test_header_bomb_is_rejected():
    huge = nv_block([(b"x", b"a" * (2 << 20))])
    with pytest.raises(spdy.SpdyError, match="beyond"):
        spdy.HeaderDecompressor().decompress(spec_compressor()(huge))


@pytest.mark.parametrize("raw,msg", [
    (struct.pack(">I", 1) + struct.pack(">I", 5) + b"ab", "truncated"),
    (nv_block([(b"a", b"1"), (b"a", b"2")]), "duplicate"),
    (nv_block([(b"a", b"1")]) + b"junk", "trailing"),
])
def test_bad_header_blocks(raw, msg):
    with pytest.raises(spdy.SpdyError, match=msg):
        spdy.parse_header_block(raw)


# -- connection behaviour -----------------------------------------------------------------
class Served:
    """A server Connection on one end of a loopback pair; the test drives the other end raw."""

    def __init__(self, **kw):
        self.raw, srv = tcp_pair()
        self.streams = []
        self.got = threading.Event()

        def on_stream(s):
            self.streams.append(s)
            self.got.set()
        self.conn = Connection(srv, server=True, on_stream=on_stream, **kw).start()
        self.comp = spec_compressor()

    def syn(self, sid, headers, fin=False):
        block = self.comp(nv_block([(k.encode(), v.encode()) for k, v in headers.items()]))
        payload = struct.pack(">IIBB", sid, 0, 0, 0) + block
        self.raw.sendall(b"\x80\x03\x00\x01" + struct.pack(">I", (int(fin) << 24) | len(payload)) + payload)
        head, body = read_frame_raw(self.raw)
        assert head[:4] == b"\x80\x03\x00\x02" and struct.unpack(">I", body[:4])[0] == sid
        self.got.wait(5)
        return self.streams[-1]

    def close(self):
        self.raw.close()
        self.conn.close()


def test_ping_is_echoed():
    s = Served()
    s.raw.sendall(spdy.ping_frame(1))
    head, body = read_frame_raw(s.raw)
    assert head[:4] == b"\x80\x03\x00\x06" and body == b"\x00\x00\x00\x01"
    s.close()


def test_stream_data_and_fin_both_ways():
    s = Served()
    st = s.syn(1, {"streamtype": "stdin"})
    assert st.header("streamType") == "stdin"
    s.raw.sendall(spdy.data_frame(1, b"abc") + spdy.data_frame(1, b"", fin=True))
    assert st.read() == b"abc" and st.read() == b""
    st.write(b"xyz")
    st.close()
    assert read_frame_raw(s.raw) == (b"\x00\x00\x00\x01\x00\x00\x00\x03", b"xyz")
    assert read_frame_raw(s.raw) == (b"\x00\x00\x00\x01\x01\x00\x00\x00", b"")
    s.close()


def test_goaway_both_ways():
    s = Served()
    s.syn(1, {"streamtype": "error"})
    s.raw.sendall(spdy.goaway_frame(0, spdy.GOAWAY_OK))
    s.conn.shutdown(linger=0.2)
    frames = []
    while True:
        chunk = s.raw.recv(100)
        if not chunk:
            break
        frames.append(chunk)
    assert b"".join(frames) == spdy.goaway_frame(1, spdy.GOAWAY_OK)
    assert s.conn.goaway_received == spdy.GOAWAY_OK
    s.raw.close()


def test_rst_stream_ends_reads_and_writes():
    s = Served()
    st = s.syn(1, {"streamtype": "data"})
    s.raw.sendall(spdy.rst_stream_frame(1, spdy.CANCEL))
    assert st.read(timeout=5) == b""
    with pytest.raises(StreamReset):
        st.write(b"late")
    s.close()


def test_bad_stream_id_is_a_protocol_error():
    s = Served()
    s.syn(3, {"streamtype": "error"})
    block = s.comp(nv_block([(b"streamtype", b"x")]))
    payload = struct.pack(">IIBB", 1, 0, 0, 0) + block   # lower than the last id
    s.raw.sendall(spdy.control_frame(spdy.SYN_STREAM, 0, payload))
    head, body = read_frame_raw(s.raw)
    assert head[:4] == b"\x80\x03\x00\x07" and struct.unpack(">II", body) == (3, spdy.GOAWAY_PROTOCOL_ERROR)
    s.close()


def test_oversized_frame_is_rejected():
    s = Served(max_frame=1024)
    st = s.syn(1, {"streamtype": "stdin"})
    s.raw.sendall(spdy.data_frame(1, b"x" * 2000))
    head, body = read_frame_raw(s.raw)
    assert head[:4] == b"\x80\x03\x00\x07" and struct.unpack(">II", body)[1] == spdy.GOAWAY_PROTOCOL_ERROR
    assert st.read(timeout=5) == b""
    assert "exceeds" in s.conn.error
    s.close()


def test_flow_control_blocks_at_the_window_until_window_update():
    s = Served()
    s.raw.sendall(spdy.settings_frame({spdy.SETTINGS_INITIAL_WINDOW_SIZE: spdy.DEFAULT_WINDOW}))
    st = s.syn(1, {"streamtype": "stdout"})
    total = 200 * 1024
    writer = threading.Thread(target=st.write, args=(b"x" * total,))
    writer.start()
    got = 0
    while got < spdy.DEFAULT_WINDOW:
        head, body = read_frame_raw(s.raw)
        assert head[:4] == b"\x00\x00\x00\x01"
        got += len(body)
    assert got == spdy.DEFAULT_WINDOW
    # window spent: nothing more arrives until we open it
    assert select.select([s.raw], [], [], 0.5)[0] == []
    s.raw.sendall(spdy.window_update_frame(1, total) + spdy.window_update_frame(0, total))
    while got < total:
        head, body = read_frame_raw(s.raw)
        got += len(body)
    writer.join(10)
    assert got == total and not writer.is_alive()
    s.close()


def test_initial_window_setting_resizes_open_streams():
    s = Served()
    st = s.syn(1, {"streamtype": "stdout"})
    s.raw.sendall(spdy.settings_frame({spdy.SETTINGS_INITIAL_WINDOW_SIZE: 1000})
                  + spdy.window_update_frame(0, 1 << 20))
    s.raw.sendall(spdy.ping_frame(1))
    read_frame_raw(s.raw)   # ping reply: settings processed
    writer = threading.Thread(target=st.write, args=(b"y" * 5000,))
    writer.start()
    head, body = read_frame_raw(s.raw)
    assert len(body) == 1000
    assert select.select([s.raw], [], [], 0.5)[0] == []
    s.raw.sendall(spdy.window_update_frame(1, 4000))
    got = 1000
    while got < 5000:
        got += len(read_frame_raw(s.raw)[1])
    writer.join(10)
    assert got == 5000
    s.close()


def test_peer_without_flow_control_still_gets_everything():
    """moby/spdystream neither sends nor honours WINDOW_UPDATE."""
    s = Served()
    st = s.syn(1, {"streamtype": "stdout"})
    total = 300 * 1024
    writer = threading.Thread(target=st.write, args=(b"z" * total,))
    writer.start()
    got = 0
    while got < total:
        got += len(read_frame_raw(s.raw)[1])
    writer.join(10)
    assert got == total and s.conn.flow_control_off
    s.close()


def test_receiver_sends_window_updates_as_data_is_consumed():
    s = Served()
    st = s.syn(1, {"streamtype": "stdin"})
    s.raw.sendall(spdy.data_frame(1, b"q" * 40000))
    got = b""
    while len(got) < 40000:
        got += st.read()
    updates = {}
    for _ in range(2):
        head, body = read_frame_raw(s.raw)
        assert head[:4] == b"\x80\x03\x00\x09"
        sid, delta = struct.unpack(">II", body)
        updates[sid] = delta
    assert updates == {1: 40000, 0: 40000}
    s.close()


def test_idle_connection_is_closed():
    s = Served(idle_timeout=0.3)
    head, body = read_frame_raw(s.raw)
    assert head[:4] == b"\x80\x03\x00\x07"
    assert s.conn.closed.wait(5) and s.conn.error == "idle timeout"
    s.close()


def test_peer_without_session_flow_control_still_gets_everything():
    """A SPDY/3 style peer: stream-level WINDOW_UPDATEs only, none for the session."""
    s = Served()
    s.raw.sendall(spdy.settings_frame({spdy.SETTINGS_INITIAL_WINDOW_SIZE: spdy.DEFAULT_WINDOW}))
    st = s.syn(1, {"streamtype": "stdout"})
    total = 200 * 1024
    writer = threading.Thread(target=st.write, args=(b"s" * total,))
    writer.start()
    got = unacked = 0
    while got < total:
        n = len(read_frame_raw(s.raw)[1])
        got += n
        unacked += n
        if unacked >= 32 * 1024:
            s.raw.sendall(spdy.window_update_frame(1, unacked))
            unacked = 0
    writer.join(10)
    assert got == total and s.conn.session_flow_off and not s.conn.flow_control_off
    s.close()
