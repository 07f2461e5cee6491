"""Container rows, written before the side effects they describe."""
from __future__ import annotations

from dataclasses import dataclass, field

from vmcri.store import Store, dumps, loads

SCHEMA = """
CREATE TABLE IF NOT EXISTS containers (
    id          TEXT PRIMARY KEY,
    sandbox_id  TEXT NOT NULL,
    name        TEXT NOT NULL,
    attempt     INTEGER NOT NULL,
    state       TEXT NOT NULL,      -- CREATING | CREATED | RUNNING | EXITED | UNKNOWN
    created_ns  INTEGER NOT NULL,
    started_ns  INTEGER NOT NULL DEFAULT 0,
    finished_ns INTEGER NOT NULL DEFAULT 0,
    exit_code   INTEGER NOT NULL DEFAULT 0,
    reason      TEXT NOT NULL DEFAULT '',
    message     TEXT NOT NULL DEFAULT '',
    image       TEXT NOT NULL,      -- the reference the user asked for
    image_id    TEXT NOT NULL,
    config      BLOB NOT NULL,      -- serialized ContainerConfig
    log_path    TEXT NOT NULL DEFAULT '',
    labels      TEXT NOT NULL DEFAULT '{}',
    annotations TEXT NOT NULL DEFAULT '{}',
    mounts      TEXT NOT NULL DEFAULT '[]',
    stop_signal TEXT NOT NULL DEFAULT 'SIGTERM'
);
CREATE UNIQUE INDEX IF NOT EXISTS containers_name ON containers(sandbox_id, name, attempt);
CREATE INDEX IF NOT EXISTS containers_sandbox ON containers(sandbox_id);
"""

CREATING, CREATED, RUNNING, EXITED, UNKNOWN = "CREATING", "CREATED", "RUNNING", "EXITED", "UNKNOWN"


@dataclass
class ContainerRecord:
    id: str
    sandbox_id: str
    name: str
    attempt: int
    state: str
    created_ns: int
    image: str
    image_id: str
    config: bytes
    started_ns: int = 0
    finished_ns: int = 0
    exit_code: int = 0
    reason: str = ""
    message: str = ""
    log_path: str = ""
    labels: dict = field(default_factory=dict)
    annotations: dict = field(default_factory=dict)
    mounts: list = field(default_factory=list)
    stop_signal: str = "SIGTERM"

    @classmethod
    def from_row(cls, row) -> "ContainerRecord":
        d = dict(row)
        d["config"] = bytes(d["config"])
        for k, default in (("labels", {}), ("annotations", {}), ("mounts", [])):
            d[k] = loads(d[k], default)
        return cls(**d)


class ContainerTable:
    def __init__(self, store: Store):
        self.store = store
        store.ensure_schema(SCHEMA)

    def insert(self, rec: ContainerRecord) -> None:
        d = dict(rec.__dict__)
        for k in ("labels", "annotations", "mounts"):
            d[k] = dumps(d[k])
        cols = ", ".join(d)
        with self.store.tx() as c:
            c.execute(f"INSERT INTO containers ({cols}) VALUES ({', '.join('?' * len(d))})",
                      tuple(d.values()))

    def update(self, container_id: str, **fields) -> None:
        sets = ", ".join(f"{k} = ?" for k in fields)
        vals = [dumps(v) if isinstance(v, (dict, list)) else v for v in fields.values()]
        with self.store.tx() as c:
            c.execute(f"UPDATE containers SET {sets} WHERE id = ?", (*vals, container_id))

    def update_if(self, container_id: str, while_in: str, **fields) -> bool:
        """update(), but only while the row's state is `while_in`; whether it was."""
        sets = ", ".join(f"{k} = ?" for k in fields)
        vals = [dumps(v) if isinstance(v, (dict, list)) else v for v in fields.values()]
        with self.store.tx() as c:
            cur = c.execute(f"UPDATE containers SET {sets} WHERE id = ? AND state = ?",
                            (*vals, container_id, while_in))
            return cur.rowcount > 0

    def get(self, container_id: str) -> ContainerRecord | None:
        row = self.store.query_one("SELECT * FROM containers WHERE id = ?", (container_id,))
        return ContainerRecord.from_row(row) if row else None

    def lookup(self, ident: str) -> ContainerRecord | None:
        """Exact id, or a unique id prefix as crictl allows."""
        row = self.store.row_by_id("containers", ident)
        return ContainerRecord.from_row(row) if row else None

    def for_sandbox(self, sandbox_id: str) -> list[ContainerRecord]:
        return [ContainerRecord.from_row(r) for r in self.store.query(
            "SELECT * FROM containers WHERE sandbox_id = ? ORDER BY created_ns", (sandbox_id,))]

    def all(self) -> list[ContainerRecord]:
        return [ContainerRecord.from_row(r)
                for r in self.store.query("SELECT * FROM containers ORDER BY created_ns")]

    def delete(self, container_id: str) -> None:
        self.store.execute("DELETE FROM containers WHERE id = ?", (container_id,))
