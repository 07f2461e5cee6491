"""Exact-or-unique-prefix id lookup, shared by sandboxes and containers."""
from __future__ import annotations

from vmcri.store import Store


def test_exact_then_unique_prefix_and_nothing_when_ambiguous(tmp_path):
    s = Store(str(tmp_path / "t.db"))
    s.ensure_schema("CREATE TABLE things (id TEXT PRIMARY KEY, v INTEGER);")
    for i, ident in enumerate(("abc123", "abd456", "ab", "x%y", "x_z")):
        s.execute("INSERT INTO things (id, v) VALUES (?, ?)", (ident, i))
    assert s.row_by_id("things", "ab")["v"] == 2          # exact beats being a prefix
    assert s.row_by_id("things", "abc")["v"] == 0          # unique prefix
    assert s.row_by_id("things", "abz") is None
    assert s.row_by_id("things", "x") is None              # x%y and x_z: ambiguous
    assert s.row_by_id("things", "x%")["v"] == 3           # LIKE wildcards are literal
    assert s.row_by_id("things", "x_")["v"] == 4
    assert s.row_by_id("things", "%") is None
