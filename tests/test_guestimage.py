"""Guest image builder: unit tests of its pieces, plus checks on the real built image."""
from __future__ import annotations

import json
import lzma
import os
import shutil
import subprocess

import pytest

from tests.support.fx_guest import guest_test_config
from vmcri import guestimage
from vmcri.config import Config
from vmcri.guestimage import builder, debs, kernel


def test_load_order_puts_dependencies_first_and_keeps_softdep_order():
    deps = {
        "virtio": ("kernel/virtio.ko", ["kernel/virtio_ring.ko"]),
        "virtio_ring": ("kernel/virtio_ring.ko", []),
        "virtio_blk": ("kernel/virtio_blk.ko", ["kernel/virtio.ko", "kernel/virtio_ring.ko"]),
        "crc32c_generic": ("kernel/crc32c_generic.ko", []),
        "libcrc32c": ("kernel/libcrc32c.ko", []),
        "erofs": ("kernel/erofs.ko", ["kernel/libcrc32c.ko"]),
    }
    order = kernel.load_order(["virtio_blk", "crc32c_generic", "erofs"], deps)
    assert order == ["kernel/virtio_ring.ko", "kernel/virtio.ko", "kernel/virtio_blk.ko",
                     "kernel/crc32c_generic.ko", "kernel/libcrc32c.ko", "kernel/erofs.ko"]
    assert kernel.load_order(["erofs"], deps, skip={"libcrc32c"}) == ["kernel/erofs.ko"]
    with pytest.raises(kernel.KernelError, match="'nope'"):
        kernel.load_order(["nope"], deps)


def test_extract_vmlinux_finds_the_xz_payload(tmp_path):
    elf = b"\x7fELF" + os.urandom(5000)
    bz = tmp_path / "vmlinuz"
    bz.write_bytes(b"MZ" + b"\0" * 1000 + lzma.compress(elf, format=lzma.FORMAT_XZ) + b"trailer")
    kernel.extract_vmlinux(str(bz), str(tmp_path / "vmlinux"))
    assert (tmp_path / "vmlinux").read_bytes() == elf
    bz.write_bytes(b"MZ no payload")
    with pytest.raises(kernel.KernelError, match="no XZ payload"):
        kernel.extract_vmlinux(str(bz), str(tmp_path / "vmlinux"))


def test_recipe_lists_ignore_comments(tmp_path):
    f = tmp_path / "list.txt"
    f.write_text("# header\nalpha\n\n  beta  # why\n#gamma\n")
    assert debs.read_list(str(f)) == ["alpha", "beta"]


def test_content_hash_follows_agent_code(tmp_path, monkeypatch):
    agent_copy = tmp_path / "agent"
    shutil.copytree(builder.AGENT_DIR, agent_copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(builder, "AGENT_DIR", str(agent_copy))
    before = guestimage.content_hash()
    assert guestimage.content_hash() == before
    (agent_copy / "handlers_system.py").write_text((agent_copy / "handlers_system.py").read_text() + "\n# x\n")
    assert guestimage.content_hash() != before


def test_locate_without_an_image_is_none(tmp_path):
    assert guestimage.locate(Config(root_dir=str(tmp_path))) is None
    assert guestimage.locate(Config(root_dir=str(tmp_path), guest_image_dir=str(tmp_path / "x"))) is None


# -- the real image ----------------------------------------------------------------------

def test_built_image_layout_and_manifest(guest_image):
    img = guest_image
    with open(img.kernel, "rb") as f:
        assert f.read(4) == b"\x7fELF"
    with open(img.rootfs, "rb") as f:
        f.seek(1024)
        assert f.read(4) == bytes.fromhex("e2e1f5e0")  # erofs superblock magic (LE 0xE0F5E1E2)
    m = img.manifest
    assert m["hash"] == guestimage.content_hash()
    meta = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], capture_output=True, text=True).stdout
    assert m["kernel_package"] in meta
    for pkg in ("python3-paramiko", "python3.11-minimal", "crun", "busybox-static", m["kernel_package"]):
        assert m["packages"][pkg]
    assert m["modules_root"].index("crc32c_generic") < m["modules_root"].index("libcrc32c")
    assert {"9p", "overlay", "virtio_net"} <= set(m["modules_late"])
    assert "console=ttyS0" in img.cmdline
    with open(os.path.join(img.dir, "manifest.json")) as f:
        assert json.load(f) == m


def test_initramfs_holds_init_busybox_and_ordered_modules(guest_image, tmp_path):
    with open(guest_image.initrd, "rb") as f:
        subprocess.run(["cpio", "-idm", "--quiet"], stdin=f, cwd=tmp_path, check=True)
    assert os.access(tmp_path / "init", os.X_OK)
    assert (tmp_path / "bin" / "busybox").exists() and os.readlink(tmp_path / "bin" / "sh") == "/bin/busybox"
    order = (tmp_path / "lib" / "modules" / "root.order").read_text().split()
    assert order == [f"{n}.ko" for n in guest_image.manifest["modules_root"]]
    assert all((tmp_path / "lib" / "modules" / n).exists() for n in order)


def test_erofs_root_holds_agent_python_and_precompiled_bytecode(guest_image, tmp_path):
    out = tmp_path / "root"
    r = subprocess.run(["fsck.erofs", f"--extract={out}", guest_image.rootfs], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    agent = out / "usr" / "lib" / "python3.11" / builder.AGENT_PACKAGE
    assert (agent / "__main__.py").read_bytes() == open(os.path.join(builder.AGENT_DIR, "__main__.py"), "rb").read()
    assert list((agent / "__pycache__").glob("server.cpython-311.pyc"))
    assert list((out / "usr" / "lib" / "python3" / "dist-packages" / "paramiko" / "__pycache__").glob("transport*.pyc"))
    assert (out / "usr" / "bin" / "crun").exists()
    assert os.readlink(out / "etc" / "hosts") == "/run/vmcri/etc/hosts"
    assert os.readlink(out / "bin" / "ip") == "/bin/busybox"


def test_rebuild_with_unchanged_recipe_reuses_the_image(guest_image):
    logs = []
    again = guestimage.build(guest_test_config(), log=logs.append)
    assert again.dir == guest_image.dir
    assert any("up to date" in line for line in logs)
    assert guestimage.locate(guest_test_config()).dir == guest_image.dir


def test_prune_keeps_the_newest_and_current(tmp_path):
    root = tmp_path
    for i, name in enumerate(["a", "b", "c", "d"]):
        d = root / name
        d.mkdir()
        (d / "manifest.json").write_text("{}")
        os.utime(d, (1000 + i, 1000 + i))
    os.symlink("a", root / "current")  # oldest, but current
    (root / ".build-x").mkdir()
    os.utime(root / ".build-x", (1, 1))
    builder.prune(str(root), keep=2, log=lambda m: None)
    assert sorted(p.name for p in root.iterdir()) == ["a", "c", "current", "d"]
