"""SQLite state (WAL). Rows are written before the side effects they describe,
so a restarted daemon can reconcile what exists with what was intended.

Each service owns its tables and declares them with `ensure_schema`; the
store only provides the connection, a lock and transactions.
"""
from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
from typing import Any, Iterator


class Store:
    def __init__(self, path: str):
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        self.path = path
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                                     timeout=30)
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA foreign_keys=ON")

    def ensure_schema(self, ddl: str) -> None:
        with self._lock:
            self._conn.executescript(ddl)

    @contextlib.contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction; rolled back if the block raises."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def query(self, sql: str, params: tuple | dict = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def query_one(self, sql: str, params: tuple | dict = ()) -> sqlite3.Row | None:
        with self._lock:
            return self._conn.execute(sql, params).fetchone()

    def row_by_id(self, table: str, ident: str) -> sqlite3.Row | None:
        """The row whose id is `ident`, else the only row whose id starts with it (crictl's
        short ids); None when there is none or the prefix is ambiguous."""
        row = self.query_one(f"SELECT * FROM {table} WHERE id = ?", (ident,))
        if row is not None:
            return row
        escaped = ident.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        rows = self.query(f"SELECT * FROM {table} WHERE id LIKE ? || '%' ESCAPE '\\' LIMIT 2", (escaped,))
        return rows[0] if len(rows) == 1 else None

    def execute(self, sql: str, params: tuple | dict = ()) -> int:
        """Run one statement in its own transaction; returns the changed row count."""
        with self.tx() as conn:
            return conn.execute(sql, params).rowcount

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def loads(text: str | None, default: Any = None) -> Any:
    return default if text is None else json.loads(text)
