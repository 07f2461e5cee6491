"""The log pump's persisted offsets: entries written after the last commit are cut at
the next start, because the replay from those offsets writes them again."""
from __future__ import annotations

import os

from vmcri.container.container_start import LogOffsets
from vmcri.container.logwriter import CriLogWriter


def test_entries_after_the_last_commit_are_cut_and_nothing_else(tmp_path):
    log_path, off_path = str(tmp_path / "c.log"), str(tmp_path / "offsets.json")
    w = CriLogWriter(log_path)
    off = LogOffsets(off_path)
    w.write("stdout", b"one\ntwo\n")
    off.commit({"stdout": 8, "stderr": 0}, w.position())
    committed = open(log_path, "rb").read()
    w.write("stdout", b"three\n")  # the daemon dies before this commit
    w.close()
    assert open(log_path, "rb").read() != committed

    again = LogOffsets(off_path)
    assert again.received == {"stdout": 8, "stderr": 0}
    assert again.trim_log(log_path) > 0
    assert open(log_path, "rb").read() == committed
    assert again.trim_log(log_path) == 0  # idempotent


def test_a_rotated_log_is_left_alone(tmp_path):
    log_path, off_path = str(tmp_path / "c.log"), str(tmp_path / "offsets.json")
    w = CriLogWriter(log_path)
    off = LogOffsets(off_path)
    w.write("stdout", b"one\n")
    off.commit({"stdout": 4, "stderr": 0}, w.position())
    w.close()
    os.rename(log_path, log_path + ".1")  # the kubelet rotated it
    with open(log_path, "wb") as f:
        f.write(b"x" * 4096)
    assert LogOffsets(off_path).trim_log(log_path) == 0
    assert os.path.getsize(log_path) == 4096


def test_old_offsets_files_without_a_file_position_still_load(tmp_path):
    off_path = tmp_path / "offsets.json"
    off_path.write_text('{"stdout": 12, "stderr": 3}')
    off = LogOffsets(str(off_path))
    assert off.received == {"stdout": 12, "stderr": 3}
    assert off.trim_log(str(tmp_path / "missing.log")) == 0
