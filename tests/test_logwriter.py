"""CRI log writer: entry format, F/P splitting like containerd, reopen after rotation."""
import os
import re
import threading

import pytest
from hypothesis import given, settings, strategies as st

from vmcri.container.logwriter import CriLogWriter, format_timestamp

ENTRY_RE = re.compile(
    rb"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z) (stdout|stderr) ([PF]) (.*)$")


def entries(path):
    """(stream, tag, content) per line, checking every line's shape."""
    out = []
    with open(path, "rb") as f:
        for line in f.read().split(b"\n")[:-1]:
            m = ENTRY_RE.match(line)
            assert m, f"malformed CRI log line: {line!r}"
            out.append((m.group(2).decode(), m.group(3).decode(), m.group(4)))
    return out


def test_timestamp_has_nine_fraction_digits_in_utc():
    assert format_timestamp(1_796_005_331_123_456_789) == "2026-11-30T02:22:11.123456789Z"
    assert format_timestamp(0) == "1970-01-01T00:00:00.000000000Z"
    assert format_timestamp(5) == "1970-01-01T00:00:00.000000005Z"


def test_real_clock_timestamps_are_rfc3339nano(tmp_path):
    path = tmp_path / "c.log"
    with CriLogWriter(str(path)) as w:
        w.write("stdout", b"hello\n")
    line = path.read_bytes()
    m = ENTRY_RE.match(line.rstrip(b"\n"))
    assert m and m.group(4) == b"hello"


def test_whole_lines_become_f_entries_per_stream(tmp_path):
    path = tmp_path / "c.log"
    w = CriLogWriter(str(path), clock_ns=lambda: 0)
    w.write("stdout", b"one\ntwo\n")
    w.write("stderr", b"oops\r\n")
    w.write("stdout", b"\n")
    w.close()
    assert path.read_bytes().startswith(b"1970-01-01T00:00:00.000000000Z stdout F one\n")
    assert entries(path) == [("stdout", "F", b"one"), ("stdout", "F", b"two"),
                             ("stderr", "F", b"oops"), ("stdout", "F", b"")]


def test_line_split_across_writes_is_joined(tmp_path):
    path = tmp_path / "c.log"
    w = CriLogWriter(str(path))
    w.write("stdout", b"hel")
    w.write("stderr", b"err")
    w.write("stdout", b"lo\nwor")
    w.write("stdout", b"ld\n")
    w.write("stderr", b"or\n")
    w.close()
    assert entries(path) == [("stdout", "F", b"hello"), ("stdout", "F", b"world"),
                             ("stderr", "F", b"error")]


def test_long_line_is_cut_into_p_entries_then_f(tmp_path):
    path = tmp_path / "c.log"
    w = CriLogWriter(str(path), max_line_size=4)
    w.write("stdout", b"abcdefghij\n")
    w.close()
    assert entries(path) == [("stdout", "P", b"abcd"), ("stdout", "P", b"efgh"),
                             ("stdout", "F", b"ij")]


def test_exactly_max_sized_line_is_one_f_entry_even_across_writes(tmp_path):
    path = tmp_path / "c.log"
    w = CriLogWriter(str(path), max_line_size=4)
    w.write("stdout", b"abcd")
    w.write("stdout", b"\n")
    w.write("stdout", b"wxyz\r\n")
    w.close()
    assert entries(path) == [("stdout", "F", b"abcd"), ("stdout", "F", b"wxyz")]


def test_default_max_line_is_16k(tmp_path):
    path = tmp_path / "c.log"
    w = CriLogWriter(str(path))
    w.write("stdout", b"x" * (16 * 1024 + 1) + b"\n")
    w.close()
    got = entries(path)
    assert [(s, t, len(c)) for s, t, c in got] == [("stdout", "P", 16384), ("stdout", "F", 1)]


def test_close_writes_unterminated_rest_as_partial(tmp_path):
    # containerd tags the bytes left at EOF without a newline as P.
    path = tmp_path / "c.log"
    w = CriLogWriter(str(path))
    w.write("stdout", b"done\nno newline")
    w.write("stderr", b"half")
    w.close()
    w.close()  # idempotent
    assert entries(path) == [("stdout", "F", b"done"), ("stdout", "P", b"no newline"),
                             ("stderr", "P", b"half")]
    with pytest.raises(ValueError):
        w.write("stdout", b"late\n")


def test_memory_is_bounded_by_max_line_size(tmp_path):
    path = tmp_path / "c.log"
    w = CriLogWriter(str(path), max_line_size=1024)
    for _ in range(100):
        w.write("stdout", b"y" * 1000)  # 100 KB with no newline at all
        assert len(w._pending["stdout"]) <= 1024
    w.close()
    got = entries(path)
    assert sum(len(c) for _, _, c in got) == 100_000
    assert all(t == "P" for _, t, _ in got)


def test_reopen_after_rename_writes_to_a_new_file(tmp_path):
    path = tmp_path / "c.log"
    w = CriLogWriter(str(path))
    w.write("stdout", b"before\npart")
    os.rename(path, tmp_path / "c.log.1")
    w.write("stdout", b"ial\n")       # still goes to the renamed file
    w.reopen()
    w.write("stdout", b"after\n")
    w.close()
    assert entries(tmp_path / "c.log.1") == [("stdout", "F", b"before"),
                                            ("stdout", "F", b"partial")]
    assert entries(path) == [("stdout", "F", b"after")]


def test_appends_to_an_existing_file(tmp_path):
    path = tmp_path / "c.log"
    for word in (b"first", b"second"):
        with CriLogWriter(str(path)) as w:
            w.write("stdout", word + b"\n")
    assert [c for _, _, c in entries(path)] == [b"first", b"second"]


def test_unknown_stream_is_rejected(tmp_path):
    with CriLogWriter(str(tmp_path / "c.log")) as w:
        with pytest.raises(ValueError, match="stdout or stderr"):
            w.write("stdin", b"x\n")


def test_concurrent_writers_never_interleave_within_an_entry(tmp_path):
    path = tmp_path / "c.log"
    w = CriLogWriter(str(path))
    lines = 300

    def produce(stream, ch):
        for i in range(lines):
            w.write(stream, ch * 50 + str(i).encode() + b"\n")

    threads = [threading.Thread(target=produce, args=(s, c))
               for s, c in (("stdout", b"o"), ("stderr", b"e"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    w.close()
    got = entries(path)
    assert len(got) == 2 * lines
    for stream, tag, content in got:
        assert tag == "F"
        ch = b"o" if stream == "stdout" else b"e"
        assert content.startswith(ch * 50) and content[50:].isdigit()


@settings(max_examples=200, deadline=None)
@given(lines=st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=12),
       cuts=st.lists(st.integers(min_value=0, max_value=600), max_size=8),
       max_line=st.integers(min_value=1, max_value=32))
def test_any_chunking_reassembles_the_same_lines(tmp_path_factory, lines, cuts, max_line):
    data = b"".join(line + b"\n" for line in lines)
    path = tmp_path_factory.mktemp("prop") / "c.log"
    w = CriLogWriter(str(path), max_line_size=max_line)
    bounds = sorted({0, len(data), *[c for c in cuts if c < len(data)]})
    for a, b in zip(bounds, bounds[1:]):
        w.write("stdout", data[a:b])
    w.close()
    rebuilt, current = [], b""
    for _, tag, content in entries(path):
        assert len(content) <= max_line
        current += content
        if tag == "F":
            rebuilt.append(current)
            current = b""
    assert current == b""
    # The writer drops one "\r" before "\n", as containerd's line reader does.
    assert rebuilt == [line[:-1] if line.endswith(b"\r") else line for line in lines]


def test_write_errors_drop_entries_instead_of_raising(tmp_path):
    # /dev/full fails every write with ENOSPC, like a full log disk.
    w = CriLogWriter("/dev/full")
    w.write("stdout", b"lost\nlost too\n")
    assert w.dropped_entries == 2
    w.close()
