"""Resource calls: container_update applies new cgroup limits with `crun update`
(UpdateContainerResources); set_cpus_online onlines hot-plugged vCPUs, which the kernel
adds offline and no udev here would online (UpdatePodSandboxResources)."""
from __future__ import annotations

import json
import os
import re
import time

from . import podenv
from .handlers_container import _crun, _entry
from .handlers_system import AgentCallError

UPDATE_DIR = "/run/vmcri/updates"


def container_update(agent, params):
    entry = _entry(agent, params["id"])
    if entry.status is not None:
        raise AgentCallError("FailedPrecondition", f"id: container {entry.id!r} has exited")
    resources = dict(params["resources"])
    if "hugepageLimits" in resources:
        resources["hugepageLimits"] = podenv.filter_hugepages(resources["hugepageLimits"],
                                                              "resources.hugepageLimits")
    os.makedirs(UPDATE_DIR, mode=0o700, exist_ok=True)
    path = os.path.join(UPDATE_DIR, f"{entry.id}.json")
    with open(path, "w") as f:
        json.dump(resources, f)
    try:
        rc, out = _crun(agent, "update", "--resources", path, entry.id)
    finally:
        os.unlink(path)
    if rc != 0:
        raise AgentCallError("Failed", f"crun update {entry.id}: {out}")
    return entry.state()


CPU_DIR = "/sys/devices/system/cpu"
_CPU_NAME = re.compile(r"^cpu([0-9]+)$")


def _cpus() -> list[int]:
    return sorted(int(m.group(1)) for n in os.listdir(CPU_DIR) if (m := _CPU_NAME.match(n)))


def set_cpus_online(agent, params):
    want = params["count"]
    deadline = time.monotonic() + params["wait_ms"] / 1000
    while len(_cpus()) < want and time.monotonic() < deadline:
        time.sleep(0.05)  # the ACPI hotplug reaches the guest a moment after libvirt returns
    errors = []
    for n in _cpus():
        path = os.path.join(CPU_DIR, f"cpu{n}", "online")
        if not os.path.exists(path):
            continue  # the boot CPU cannot go offline and has no switch
        value = "1" if n < want else "0"
        try:
            with open(path) as f:
                if f.read().strip() == value:
                    continue
            with open(path, "w") as f:
                f.write(value)
        except OSError as e:
            errors.append(f"cpu{n}: cannot set online={value}: {e.strerror}")
    with open(os.path.join(CPU_DIR, "online")) as f:
        online = f.read(256).strip()
    return {"online": online, "present": len(_cpus()), "errors": errors}


HANDLERS = {"container_update": container_update, "set_cpus_online": set_cpus_online}
