"""The real agent code run on the host in its development mode (no VM, no mounts)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest


@pytest.fixture
def dev_agent(tmp_path):
    """Path of the unix socket a host-side agent serves SSH on."""
    path = str(tmp_path / "dev-agent.sock")
    proc = subprocess.Popen([sys.executable, "-m", "vmcri.agent", "--listen-unix", path],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.05)
        yield path
    finally:
        proc.kill()
        proc.wait()
