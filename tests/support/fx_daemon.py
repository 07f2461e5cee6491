"""A real `vmcri serve` in a subprocess, with its own root/run dirs and CRI stubs."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import grpc
import pytest
from cri_api.v1 import api_pb2 as pb
from cri_api.v1 import api_pb2_grpc as pb_grpc


@dataclass
class Daemon:
    base: str
    config_path: str
    socket: str
    root_dir: str
    run_dir: str
    extra_config: str = ""
    netns: str = ""   # run the daemon in this network namespace (a test-made "node")
    proc: subprocess.Popen | None = None
    log_path: str = ""
    channel: grpc.Channel | None = None
    runtime: pb_grpc.RuntimeServiceStub | None = None
    image: pb_grpc.ImageServiceStub | None = None
    _logs: list = field(default_factory=list)

    def start(self, timeout: float = 60) -> None:
        self.log_path = os.path.join(self.base, f"daemon-{len(self._logs)}.log")
        self._logs.append(self.log_path)
        out = open(self.log_path, "w")
        enter = ["nsenter", f"--net={self.netns}"] if self.netns else []  # execs, same pid
        self.proc = subprocess.Popen(
            [*enter, sys.executable, "-m", "vmcri.cli", "--config", self.config_path, "serve"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vmcri serve did not come up:\n{self.log()}")
            time.sleep(0.05)
        self.channel = grpc.insecure_channel(f"unix://{self.socket}")
        grpc.channel_ready_future(self.channel).result(timeout=timeout)
        self.runtime = pb_grpc.RuntimeServiceStub(self.channel)
        self.image = pb_grpc.ImageServiceStub(self.channel)

    def log(self) -> str:
        try:
            with open(self.log_path) as f:
                return f.read()[-20000:]
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self, sig: int = signal.SIGTERM) -> None:
        self.stop(sig)
        self.start()


def write_config(path: str, root: str, run: str, sock: str, extra: str = "") -> None:
    guest = os.environ.get("VMCRI_TEST_GUEST_DIR", "/var/lib/vmcri/guest/current")
    # defaults go first: a table in `extra` ([registries...]) would swallow keys after it
    defaults = ""
    if "agent_timeout_s" not in extra:
        # a hang detector, not a performance bound: shared 2-core hosts boot TCG guests slowly
        defaults += "agent_timeout_s = 300\n"
    if "vm_template" not in extra:
        # cold boots unless a test asks for templates: tests that time or inspect a boot
        # must not depend on whether the lazily built template was ready (test_vm_template)
        defaults += "vm_template = false\n"
    guest_line = "" if "guest_image_dir" in extra else f'guest_image_dir = "{guest}"\n'
    with open(path, "w") as f:
        f.write(f'socket_path = "{sock}"\nroot_dir = "{root}"\nrun_dir = "{run}"\n'
                f'{guest_line}accel = "tcg"\nlog_level = "debug"\n'
                f'streaming_port = 0\n{defaults}{extra}\n')


def make_daemon(extra_config: str = "", prefix: str = "vmcri-test-") -> Daemon:
    base = tempfile.mkdtemp(prefix=prefix)
    root, run = os.path.join(base, "root"), os.path.join(base, "run")
    sock = os.path.join(run, "vmcri.sock")
    cfg = os.path.join(base, "config.toml")
    write_config(cfg, root, run, sock, extra_config)
    return Daemon(base=base, config_path=cfg, socket=sock, root_dir=root, run_dir=run,
                  extra_config=extra_config)


def dispose(d: Daemon, keep_dirs: bool = False) -> None:
    """Stop a test daemon and take everything it made with it: pods and pool VMs outlive
    their daemon by design, and their share dirs are mounts that rmtree cannot remove."""
    from vmcri.sandbox.hostfs import unmount_tree
    d.stop()
    _destroy_owned_domains(d.root_dir)
    if not keep_dirs:
        unmount_tree(d.base)
        shutil.rmtree(d.base, ignore_errors=True)


def _destroy_owned_domains(root_dir: str) -> None:
    """Pods outlive their daemon by design; a finished test's must not outlive the test."""
    import libvirt

    from vmcri.sandbox.domain import parse_metadata
    conn = libvirt.open("qemu:///system")
    try:
        for dom in conn.listAllDomains(0):
            try:
                meta = parse_metadata(dom.XMLDesc(0))
                if meta is not None and meta.owner == root_dir:
                    dom.destroy()
            except libvirt.libvirtError:
                pass  # gone meanwhile
    finally:
        conn.close()


@pytest.fixture(scope="session")
def daemon_factory():
    made: list[Daemon] = []

    def factory(extra_config: str = "") -> Daemon:
        d = make_daemon(extra_config)
        made.append(d)
        d.start()
        return d

    yield factory
    for d in made:
        dispose(d, keep_dirs=os.environ.get("VMCRI_KEEP_TEST_DIRS") == "1")


@pytest.fixture(scope="session")
def daemon(daemon_factory) -> Daemon:
    """One shared daemon for the session; tests must clean up the pods they make."""
    return daemon_factory()


@pytest.fixture
def cri(daemon):
    return daemon.runtime


__all__ = ["Daemon", "make_daemon", "pb"]
