"""Guest agent entry point: `python3.11 -I -S -m vmcri_agent` as PID 1 after switch_root.

Order matters for boot time: mounts and the background module loader come first, then
the (slow, ~2 s under TCG) paramiko import, then the port is served.
"""
import os
import sys


def _early_phase(name):
    # before any heavier import: shows the interpreter's own start-up cost
    try:
        with open("/proc/uptime") as f:
            os.write(1, f"VMCRI-PHASE {name} {f.read().split()[0]}\n".encode())
    except OSError:
        pass


if os.getpid() == 1:
    _early_phase("python-exec")

import threading  # noqa: E402
import time  # noqa: E402

from . import pid1, protocol  # noqa: E402

PORT_DIR = "/dev/virtio-ports"


class Agent:
    def __init__(self):
        self.reaper = pid1.Reaper()
        self.late_modules_done = threading.Event()
        self.share_mounted = False
        self.procs = None
        self.handlers = {}

    def spawn(self, argv, **kw):
        from .procs import spawn
        return spawn(argv, **kw)

    def load_late_modules(self):
        """insmod the non-root modules (9p, overlay, virtio_net) while paramiko imports; the
        rest of /lib/modules/<release> loads on demand (pid1: kernel modules)."""
        try:
            pid = self.spawn(["/bin/sh", "-c", "ip link set lo up; " + pid1.late_modules_script()])
            pid1.wait_status(self.reaper, pid, 120)
            pid1.phase("modules-late")
            pid1.module_static_nodes()
            self.share_mounted = pid1.mount_share_if_present()
        except Exception as e:
            print(f"vmcri-agent: late modules: {e}", flush=True)
        finally:
            self.late_modules_done.set()


def _cmdline() -> str:
    try:
        with open("/proc/cmdline") as f:
            return f.read()
    except OSError:
        return ""


def load_handlers() -> dict:
    """method -> handler(agent, params), merged from every handler module.

    A new family of calls (e.g. containers via crun) is a new `handlers_<area>.py` with a
    HANDLERS dict, listed here, plus its validators in protocol.METHODS.
    """
    from . import (handlers_clone, handlers_container, handlers_metrics, handlers_resources,
                   handlers_system)
    handlers = {}
    for mod in (handlers_system, handlers_container, handlers_resources, handlers_metrics,
                handlers_clone):
        clash = set(handlers) & set(mod.HANDLERS)
        if clash:
            raise RuntimeError(f"handler registered twice: {sorted(clash)}")
        handlers.update(mod.HANDLERS)
    return handlers


def find_port(name: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        link = os.path.join(PORT_DIR, name)
        if os.path.exists(link):
            return link
        try:
            for p in os.listdir("/sys/class/virtio-ports"):
                with open(f"/sys/class/virtio-ports/{p}/name") as f:
                    if f.read().strip() == name:
                        return f"/dev/{p}"
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"virtio-serial port {name!r} not found")
        time.sleep(0.05)


def main():
    pid1.phase("python-start")
    if len(sys.argv) == 3 and sys.argv[1] == "--listen-unix":
        return dev_main(sys.argv[2])
    is_init = os.getpid() == 1
    if is_init:
        pid1.setup_mounts()
    agent = Agent()
    # vmcri.late=after on the kernel cmdline defers the late modules until the agent is
    # ready (for measuring; parallel is the default)
    late_after = is_init and "vmcri.late=after" in _cmdline()
    if not late_after:
        threading.Thread(target=agent.load_late_modules, daemon=True, name="late-modules").start()
    sys.path.append("/usr/lib/python3/dist-packages")
    import logging
    logging.basicConfig(level=logging.WARNING, format="vmcri-agent: %(name)s: %(message)s")
    from . import procs, server  # imports paramiko (the slow part)
    pid1.phase("paramiko-imported")
    agent.procs = procs.ProcessTable(agent.reaper)
    agent.handlers = load_handlers()
    port = server.PortServer(agent, find_port(protocol.PORT_NAME))
    pid1.phase("agent-ready")
    print(protocol.READY_MARKER, flush=True)
    if late_after:
        threading.Thread(target=agent.load_late_modules, daemon=True, name="late-modules").start()
    port.serve_forever()


def dev_main(path: str) -> None:
    """Run the agent's call handling on the host (tests): no mounts, no port."""
    from . import procs, server
    agent = Agent()
    agent.late_modules_done.set()
    agent.procs = procs.ProcessTable(agent.reaper)
    agent.handlers = {k: v for k, v in load_handlers().items()
                      if k not in ("set_hostname", "configure_nic", "write_etc", "set_sysctls",
                                   "set_cpus_online", "clone_init")}
    agent.handlers["shutdown"] = lambda agent, params: (threading.Timer(0.2, os._exit, (0,)).start(),
                                                        {"powering_off": True})[1]
    server.serve_unix(agent, path)


if __name__ == "__main__":
    try:
        main()
    except BaseException as e:
        print(f"vmcri-agent: fatal: {type(e).__name__}: {e}", flush=True)
        if os.getpid() == 1:
            time.sleep(1)
            pid1.power_off()
        raise
