"""Control-call handlers for the guest system: ping, info, hostname, /etc files, NIC, shutdown.

Each handler takes (agent, params) with params already validated by protocol.validate,
and returns a JSON-able dict. Raise AgentCallError for a failure the host should see.
"""
from __future__ import annotations

import os
import socket
import threading
import time

from . import pid1

ETC_DIR = "/run/vmcri/etc"


class AgentCallError(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def ping(agent, params):
    return {"pong": True, "uptime": pid1.uptime()}


def _meminfo() -> dict:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, _, rest = line.partition(":")
            if k in ("MemTotal", "MemFree", "MemAvailable"):
                out[k] = int(rest.split()[0]) * 1024
    return out


def info(agent, params):
    mem = _meminfo()
    return {
        "kernel_release": os.uname().release,
        "hostname": socket.gethostname(),
        "uptime": pid1.uptime(),
        "mem_total": mem.get("MemTotal", 0),
        "mem_free": mem.get("MemFree", 0),
        "mem_available": mem.get("MemAvailable", 0),
        "phases": dict(pid1.PHASES),
        "late_modules_loaded": agent.late_modules_done.is_set(),
        "share_mounted": agent.share_mounted,
        "pid": os.getpid(),
    }


def _write_atomic(name: str, content: str) -> None:
    path = os.path.join(ETC_DIR, name)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(content)
    os.replace(tmp, path)


def set_hostname(agent, params):
    socket.sethostname(params["hostname"])
    _write_atomic("hostname", params["hostname"] + "\n")
    return {"hostname": socket.gethostname()}


def write_etc(agent, params):
    for name, content in params["files"].items():
        _write_atomic(name, content)
    return {"written": sorted(params["files"])}


def _ip(agent, *args: str) -> None:
    r, w = os.pipe()
    try:
        pid = agent.spawn(["ip", *args], stdout=w, stderr=w)
    finally:
        os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read(4096)
    status = pid1.wait_status(agent.reaper, pid, 30)
    if status is None or pid1.exit_code(status) != 0:
        raise AgentCallError("Failed", f"ip {' '.join(args)}: {out.decode(errors='replace').strip()}")


def configure_nic(agent, params):
    if not agent.late_modules_done.wait(60):
        raise AgentCallError("Unavailable", "network drivers are still loading")
    mac = params["mac"]
    ifname = None
    deadline = time.monotonic() + 5
    while ifname is None:
        for name in sorted(os.listdir("/sys/class/net")):
            try:
                with open(f"/sys/class/net/{name}/address") as f:
                    if f.read().strip().lower() == mac:
                        ifname = name
                        break
            except OSError:
                continue
        if ifname is None:
            if time.monotonic() > deadline:
                raise AgentCallError("NotFound", f"mac: no interface with MAC {mac}")
            time.sleep(0.1)
    if params.get("name") and params["name"] != ifname:
        _ip(agent, "link", "set", "dev", ifname, "down")
        _ip(agent, "link", "set", "dev", ifname, "name", params["name"])
        ifname = params["name"]
    if "mtu" in params:
        _ip(agent, "link", "set", "dev", ifname, "mtu", str(params["mtu"]))
    _ip(agent, "addr", "flush", "dev", ifname)
    for a in params["addresses"]:
        _ip(agent, "addr", "add", a, "dev", ifname)
    _ip(agent, "link", "set", "dev", ifname, "up")
    for r in params["routes"]:
        args = ["route", "replace", r["dst"]]
        if "gw" in r:
            args += ["via", r["gw"]]
        _ip(agent, *args, "dev", ifname)
    return {"interface": ifname}


def shutdown(agent, params):
    def later():
        time.sleep(0.3)  # let the reply reach the host first
        agent.procs.kill_all()
        pid1.phase("power-off")
        pid1.power_off()
    threading.Thread(target=later, daemon=True).start()
    return {"powering_off": True}


HANDLERS = {
    "ping": ping,
    "info": info,
    "set_hostname": set_hostname,
    "write_etc": write_etc,
    "configure_nic": configure_nic,
    "shutdown": shutdown,
}
