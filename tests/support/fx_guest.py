"""Guest image fixture (built once per run) and a helper that boots a throwaway VM.

The image lives under VMCRI_TEST_GUEST_ROOT (default /var/lib/vmcri-test) so the .deb
cache and unchanged images survive between runs; a recipe/agent change rebuilds.
"""
from __future__ import annotations

import contextlib
import os
import time
import uuid

import pytest

from vmcri import guestimage
from vmcri.config import Config

GUEST_ROOT = os.environ.get("VMCRI_TEST_GUEST_ROOT", "/var/lib/vmcri-test")
TEST_PREFIX = "vmcri-test-"


def guest_test_config() -> Config:
    return Config(root_dir=GUEST_ROOT)


@pytest.fixture(scope="session")
def guest_image() -> guestimage.GuestImage:
    cfg = guest_test_config()
    img = guestimage.locate(cfg)
    if img is None:
        img = guestimage.build(cfg, log=lambda m: print(f"[guest image] {m}", flush=True))
    return img


@contextlib.contextmanager
def booted_guest(image: guestimage.GuestImage, workdir: str, tag: str = "", memory_mib: int = 256,
                 share_dir: str | None = None, timeout: float = 120.0, uri: str = "qemu:///system"):
    """Boot a TCG domain from `image`, wait for the agent, yield a dict with the domain name,
    the connected AgentClient, the Hypervisor and paths. Always destroys the domain."""
    from vmcri.channel import AgentClient
    from vmcri.sandbox.domain import DomainSpec, SandboxMeta, render_domain
    from vmcri.sandbox.virt import Hypervisor

    name = f"{TEST_PREFIX}{tag or 'guest'}-{uuid.uuid4().hex[:8]}"
    os.makedirs(workdir, exist_ok=True)
    sock = os.path.join(workdir, "agent.sock")
    console = os.path.join(workdir, "console.log")
    spec = DomainSpec(name=name, uuid=str(uuid.uuid4()), metadata=SandboxMeta(sandbox_id=name, owner="tests"),
                      kernel=image.kernel, initrd=image.initrd, root_disk=image.rootfs, cmdline=image.cmdline,
                      agent_socket=sock, console_log=console, memory_mib=memory_mib, share_dir=share_dir)
    hv = Hypervisor(uri)
    client = AgentClient(sock, connect_timeout=30, call_timeout=60, name=name)
    t0 = time.monotonic()
    try:
        hv.create(render_domain(spec))
        created = time.monotonic() - t0
        client.wait_ready(timeout)
        ready = time.monotonic() - t0
        yield {"name": name, "client": client, "hv": hv, "console": console, "socket": sock,
               "created_s": created, "ready_s": ready}
    finally:
        client.close()
        hv.destroy(name)


def console_phases(console_log: str) -> dict[str, float]:
    """VMCRI-PHASE name uptime lines printed by the guest's /init and agent."""
    out = {}
    try:
        with open(console_log, errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and parts[0] == "VMCRI-PHASE":
                    try:
                        out[parts[1]] = float(parts[2])
                    except ValueError:
                        pass
    except OSError:
        pass
    return out
