"""container_update: apply new cgroup limits with `crun update` (UpdateContainerResources)."""
from __future__ import annotations

import json
import os

from .handlers_container import _crun, _entry
from .handlers_system import AgentCallError

UPDATE_DIR = "/run/vmcri/updates"


def container_update(agent, params):
    entry = _entry(agent, params["id"])
    if entry.status is not None:
        raise AgentCallError("FailedPrecondition", f"id: container {entry.id!r} has exited")
    os.makedirs(UPDATE_DIR, mode=0o700, exist_ok=True)
    path = os.path.join(UPDATE_DIR, f"{entry.id}.json")
    with open(path, "w") as f:
        json.dump(params["resources"], f)
    try:
        rc, out = _crun(agent, "update", "--resources", path, entry.id)
    finally:
        os.unlink(path)
    if rc != 0:
        raise AgentCallError("Failed", f"crun update {entry.id}: {out}")
    return entry.state()


HANDLERS = {"container_update": container_update}
