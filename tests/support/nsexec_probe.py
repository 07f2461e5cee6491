"""Run one nsexec.spawn in a process of its own (it must be a subreaper with its own reaper,
which a pytest process cannot be) and print what happened as JSON.

stdin: {"target": pid, "cgroup": dir or null, "process": OCI process, "seccomp": profile or
null, "tty": bool}; stdout: {"pid", "status", "exit_code", "stdout", "stderr"} or {"error"}.
"""
from __future__ import annotations

import ctypes
import json
import os
import sys

from vmcri.agent import nsexec, pid1


def main() -> None:
    req = json.load(sys.stdin)
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: the grandchild comes here
    reaper = pid1.Reaper()
    spec = {"linux": {"seccomp": req["seccomp"]} if req.get("seccomp") else {}, "process": {}}
    info = nsexec.exec_info(spec, req.get("cgroup"))
    plan = nsexec.plan(req["process"], info)
    if plan is None:
        print(json.dumps({"error": f"no plan: {info.unsupported}"}))
        return
    r_out, w_out = os.pipe()
    r_err, w_err = os.pipe()
    devnull = os.open(os.devnull, os.O_RDONLY)
    try:
        pid = nsexec.spawn(plan, req["target"], info.cgroup, (devnull, w_out, w_err), reaper)
    except OSError as e:
        print(json.dumps({"error": str(e)}))
        return
    finally:
        for fd in (w_out, w_err, devnull):
            os.close(fd)
    status = pid1.wait_status(reaper, pid, 60)
    out = os.read(r_out, 1 << 20).decode(errors="replace")
    err = os.read(r_err, 1 << 20).decode(errors="replace")
    print(json.dumps({"pid": pid, "status": status, "exit_code": pid1.exit_code(status),
                      "stdout": out, "stderr": err}))


if __name__ == "__main__":
    main()
