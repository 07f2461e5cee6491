"""A pull killed with SIGKILL half-way leaves no visible image, and a retry succeeds."""
import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.support.fx_registry import build_layer, push_layout, set_layout_index, write_oci_image
from vmcri.config import Config
from vmcri.image.service import ImageService
from vmcri.store import Store

pytestmark = pytest.mark.registry

PULL_SCRIPT = """
import sys
from vmcri.config import Config
from vmcri.image.service import ImageService
from vmcri.store import Store
cfg = Config(root_dir=sys.argv[1], run_dir=sys.argv[2])
ImageService(cfg, Store(cfg.db_path)).pull(sys.argv[3])
"""
BIG = 48 << 20


@pytest.fixture(scope="module")
def big_image(test_images, tmp_path_factory):
    layout = str(tmp_path_factory.mktemp("big") / "layout")
    payload = os.urandom(BIG)  # incompressible, so download and unpack take a while
    layers = [test_images.base_layer, build_layer([("file", "big.bin", payload)]),
              build_layer([("file", "small.txt", b"after big\n")])]
    desc = write_oci_image(layout, layers, {"Cmd": ["/bin/sh"]})
    set_layout_index(layout, "big", [desc])
    ref = f"{test_images.registry}/vmcri-test/big:1.0"
    push_layout(layout, "big", ref)
    return ref, desc["config_digest"], hashlib.sha256(payload).hexdigest()


def _processes_mentioning(text: str, comm: str = "") -> list[int]:
    """PIDs whose command line contains `text` (and whose executable name is `comm`)."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if text.encode() not in f.read():
                        continue
                with open(f"/proc/{pid}/comm") as f:
                    if not comm or f.read().strip() == comm:
                        found.append(int(pid))
            except OSError:
                pass
    return found


def _staging_has(staging: str, prefix: str, sub: str = "") -> bool:
    try:
        return any(n.startswith(prefix) and (not sub or os.path.exists(os.path.join(staging, n, sub)))
                   for n in os.listdir(staging))
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("phase", ["download", "unpack"])
def test_killed_pull_leaves_nothing_and_retry_succeeds(tmp_path, big_image, phase):
    ref, image_id, payload_sha = big_image
    cfg = Config(root_dir=str(tmp_path / "root"), run_dir=str(tmp_path / "run"))
    staging = os.path.join(cfg.image_store_dir, "staging")
    proc = subprocess.Popen([sys.executable, "-c", PULL_SCRIPT, cfg.root_dir, cfg.run_dir, ref],
                            start_new_session=True, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    seen = False
    while time.monotonic() < deadline and proc.poll() is None:
        # "skopeo", not "setpriv": the parent-death signal is armed by then
        if (phase == "download" and _processes_mentioning(f"oci:{staging}/pull-", "skopeo")) or \
                (phase == "unpack" and _staging_has(staging, "layer-")):
            seen = True
            break
        time.sleep(0.002)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert seen, f"pull never reached the {phase} phase: {proc.stderr.read()[-2000:]}"
    assert proc.returncode == -signal.SIGKILL
    # its skopeo child dies with it (parent-death signal), leaving no writer behind
    deadline = time.monotonic() + 0.3
    while _processes_mentioning(cfg.root_dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    leftovers = _processes_mentioning(cfg.root_dir)
    for pid in leftovers:  # clean up before failing
        os.kill(pid, signal.SIGKILL)
    assert leftovers == []

    store = Store(cfg.db_path)
    assert not store.query("SELECT * FROM image_images")  # nothing visible even before recovery
    svc = ImageService(cfg, store)  # start-up recovery
    assert svc.list() == [] and svc.status(ref) is None
    assert os.listdir(svc.store.staging_dir) == []
    assert os.listdir(svc.store.layers_dir) == []

    assert svc.pull(ref) == image_id
    big_layer = svc.layer_dirs(svc.resolve(ref))[1]
    h = hashlib.sha256()
    with open(os.path.join(big_layer, "big.bin"), "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    assert h.hexdigest() == payload_sha
    store.close()
