"""The agent's output ring (vmcri/agent/outring.py): replay from byte offsets, exactly once."""
import random

from vmcri.agent.outring import OutputRing, RingReader


def _collect(items):
    out = {1: b"", 2: b""}
    for s, data in items:
        out[s] += data
    return out


def test_replay_from_offsets_is_exact_and_ordered():
    ring = OutputRing(limit=1 << 20)
    produced = {1: b"", 2: b""}
    rnd = random.Random(7)
    order = []
    for i in range(2000):
        s = rnd.choice((1, 2))
        data = f"{s}:{i}\n".encode()
        ring.put(s, data)
        produced[s] += data
        order.append((s, data))
    # a reader that already has some of each stream gets exactly the rest
    for cut_out, cut_err in ((0, 0), (5, 0), (len(produced[1]) // 2, len(produced[2]) // 3),
                             (len(produced[1]), len(produced[2]))):
        start, dropped = ring.resume_point({"stdout": cut_out, "stderr": cut_err})
        assert dropped == 0 and start == {1: cut_out, 2: cut_err}
        got = _collect(RingReader(ring, start).take())
        assert got[1] == produced[1][cut_out:] and got[2] == produced[2][cut_err:]
    # interleaving is kept: a reader from zero sees the production order
    items = RingReader(ring, {1: 0, 2: 0}).take()
    assert b"".join(d for _, d in items) == b"".join(d for _, d in order)


def test_incremental_reads_and_a_reader_ahead_of_output():
    ring = OutputRing(limit=1 << 20)
    reader = RingReader(ring, {1: 0, 2: 0})
    assert not reader.items and reader.take() == []
    ring.put(1, b"ab")
    ring.put(1, b"cd")  # merged into one item
    assert reader.items and _collect(reader.take())[1] == b"abcd"
    ring.put(2, b"E")
    ring.put(1, b"f")
    assert reader.take() == [(2, b"E"), (1, b"f")]
    assert not reader.items
    start, dropped = ring.resume_point({"stdout": 10 ** 9})  # cannot be ahead: clamped
    assert start == {1: 5, 2: 0} and dropped == 0


def test_ring_is_bounded_and_reports_what_it_no_longer_holds():
    ring = OutputRing(limit=64 * 1024)
    for i in range(10000):
        ring.put(1, b"x" * 100)
    assert ring.size <= 64 * 1024 + 4096
    start, dropped = ring.resume_point({"stdout": 0})
    assert start[1] == ring.first[1] > 0 and dropped == ring.first[1]
    got = _collect(RingReader(ring, start).take())[1]
    assert len(got) == ring.end[1] - ring.first[1]
