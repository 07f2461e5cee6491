"""Sandbox rows: the intent written before any side effect, read back by reconcile."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from vmcri.store import Store, dumps, loads

SCHEMA = """
CREATE TABLE IF NOT EXISTS sandboxes (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    namespace     TEXT NOT NULL,
    uid           TEXT NOT NULL,
    attempt       INTEGER NOT NULL,
    state         TEXT NOT NULL,          -- CREATING | READY | NOTREADY
    created_ns    INTEGER NOT NULL,
    domain        TEXT NOT NULL,
    runtime_handler TEXT NOT NULL DEFAULT '',
    config        BLOB NOT NULL,          -- serialized PodSandboxConfig
    labels        TEXT NOT NULL DEFAULT '{}',
    annotations   TEXT NOT NULL DEFAULT '{}',
    netns         TEXT NOT NULL DEFAULT '',
    network       TEXT NOT NULL DEFAULT '{}', -- ips, interfaces, routes from CNI
    resources     TEXT NOT NULL DEFAULT '{}', -- vcpus, memory_mib, accel
    timings       TEXT NOT NULL DEFAULT '{}', -- phase -> seconds
    reason        TEXT NOT NULL DEFAULT '',
    host_key      TEXT NOT NULL DEFAULT ''  -- agent SSH host key, pinned across daemon restarts
);
CREATE UNIQUE INDEX IF NOT EXISTS sandboxes_name
    ON sandboxes(name, namespace, uid, attempt);
"""

CREATING, READY, NOTREADY = "CREATING", "READY", "NOTREADY"


@dataclass
class SandboxRecord:
    id: str
    name: str
    namespace: str
    uid: str
    attempt: int
    state: str
    created_ns: int
    domain: str
    config: bytes
    runtime_handler: str = ""
    labels: dict = field(default_factory=dict)
    annotations: dict = field(default_factory=dict)
    netns: str = ""
    network: dict = field(default_factory=dict)
    resources: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    reason: str = ""
    host_key: str = ""

    @property
    def short_id(self) -> str:
        return self.id[:16]

    @classmethod
    def from_row(cls, row) -> "SandboxRecord":
        return cls(id=row["id"], name=row["name"], namespace=row["namespace"], uid=row["uid"],
                   attempt=row["attempt"], state=row["state"], created_ns=row["created_ns"],
                   domain=row["domain"], config=bytes(row["config"]),
                   runtime_handler=row["runtime_handler"],
                   labels=loads(row["labels"], {}), annotations=loads(row["annotations"], {}),
                   netns=row["netns"], network=loads(row["network"], {}),
                   resources=loads(row["resources"], {}), timings=loads(row["timings"], {}),
                   reason=row["reason"], host_key=row["host_key"])


class SandboxTable:
    def __init__(self, store: Store):
        self.store = store
        store.ensure_schema(SCHEMA)

    def insert(self, rec: SandboxRecord) -> None:
        """Raises sqlite3.IntegrityError if the (name, namespace, uid, attempt) is taken."""
        with self.store.tx() as c:
            c.execute(
                "INSERT INTO sandboxes (id, name, namespace, uid, attempt, state, created_ns, domain,"
                " runtime_handler, config, labels, annotations, netns, network, resources, timings, reason)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (rec.id, rec.name, rec.namespace, rec.uid, rec.attempt, rec.state, rec.created_ns,
                 rec.domain, rec.runtime_handler, rec.config, dumps(rec.labels),
                 dumps(rec.annotations), rec.netns, dumps(rec.network), dumps(rec.resources),
                 dumps(rec.timings), rec.reason))

    def update(self, sandbox_id: str, **fields) -> None:
        cols, vals = [], []
        for k, v in fields.items():
            cols.append(f"{k} = ?")
            vals.append(dumps(v) if isinstance(v, (dict, list)) else v)
        with self.store.tx() as c:
            c.execute(f"UPDATE sandboxes SET {', '.join(cols)} WHERE id = ?", (*vals, sandbox_id))

    def get(self, sandbox_id: str) -> SandboxRecord | None:
        row = self.store.query_one("SELECT * FROM sandboxes WHERE id = ?", (sandbox_id,))
        return SandboxRecord.from_row(row) if row else None

    def lookup(self, ident: str) -> SandboxRecord | None:
        """Exact id, or a unique id prefix as crictl allows."""
        row = self.store.row_by_id("sandboxes", ident)
        return SandboxRecord.from_row(row) if row else None

    def all(self) -> list[SandboxRecord]:
        return [SandboxRecord.from_row(r)
                for r in self.store.query("SELECT * FROM sandboxes ORDER BY created_ns")]

    def delete(self, sandbox_id: str) -> None:
        self.store.execute("DELETE FROM sandboxes WHERE id = ?", (sandbox_id,))


def now_ns() -> int:
    return time.time_ns()
