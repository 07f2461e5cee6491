"""Build the guest image (kernel vmlinux, busybox initramfs, erofs root) from Debian packages.

Layout: <root_dir>/guest/<hash>/{vmlinux,initrd.cpio,rootfs.erofs,manifest.json} plus the
`current` symlink and a .deb download cache in <root_dir>/guest/debs/. The hash covers the
recipe (package lists, init script, module lists), this builder's code and the agent code,
so any change to them builds a new directory; unchanged .debs are reused from the cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

from . import debs, kernel

HERE = os.path.dirname(os.path.abspath(__file__))
FILES = os.path.join(HERE, "files")
AGENT_DIR = os.path.join(os.path.dirname(HERE), "agent")
AGENT_PACKAGE = "vmcri_agent"  # name of vmcri/agent/ inside the guest (in the stdlib dir)
MANIFEST = "manifest.json"
LATE_ORDER = "vmcri-late.order"  # in the root's /lib/modules: absolute paths, one a line
KEEP_IMAGES = 3  # older image dirs are pruned after a successful build
FORMAT = 1
# lz4hc vs none boot equally fast under TCG (images/README.md); lz4hc is 31 MB instead of 55.
EROFS_COMPRESSION = os.environ.get("VMCRI_EROFS_COMPRESSION", "lz4hc")
# acpi=noirq: PCI INTx routing from the BIOS table instead of ACPI link devices; evaluating
# their AML under TCG took 0.6-0.9 s of virtio_pci probing (virtio uses MSI-X anyway). ACPI
# itself (power button, PCI hotplug) stays on. bench/README.md has the numbers.
BASE_CMDLINE = ("console=ttyS0 quiet loglevel=3 panic=-1 cryptomgr.notests tsc=reliable "
                "no_timer_check i8042.noaux i8042.nokbd i8042.nopnp acpi=noirq")

TRIM = ["usr/share/doc", "usr/share/man", "usr/share/lintian", "usr/share/locale",
        "usr/share/info", "usr/lib/x86_64-linux-gnu/gconv", "usr/lib/x86_64-linux-gnu/libcrun.a"]
TRIM_PY = ["test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data",
           "distutils", "config-3.11-x86_64-linux-gnu", "unittest", "sqlite3", "dbm", "curses"]


class BuildError(RuntimeError):
    pass


@dataclass
class GuestImage:
    dir: str
    kernel: str
    initrd: str
    rootfs: str
    cmdline: str
    manifest: dict = field(default_factory=dict)

    @classmethod
    def from_dir(cls, d: str) -> "GuestImage":
        with open(os.path.join(d, MANIFEST)) as f:
            m = json.load(f)
        files = m["files"]
        return cls(dir=os.path.realpath(d), kernel=os.path.join(d, files["kernel"]),
                   initrd=os.path.join(d, files["initrd"]), rootfs=os.path.join(d, files["rootfs"]),
                   cmdline=m["cmdline"], manifest=m)


def guest_root(cfg) -> str:
    return os.path.join(cfg.root_dir, "guest")


def _recipe_files() -> list[tuple[str, str]]:
    out = []
    for base, label in ((HERE, "guestimage"), (AGENT_DIR, "agent")):
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for fn in sorted(filenames):
                if fn.endswith((".pyc", ".pyo")):
                    continue
                p = os.path.join(dirpath, fn)
                out.append((f"{label}/{os.path.relpath(p, base)}", p))
    return out


def content_hash() -> str:
    """Hash of everything that decides the image: recipe files, builder and agent code."""
    h = hashlib.sha256(f"vmcri-guest-format-{FORMAT}-{EROFS_COMPRESSION}\n".encode())
    for rel, path in _recipe_files():
        with open(path, "rb") as f:
            data = f.read()
        h.update(f"{rel}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()[:16]


def _valid(d: str) -> GuestImage | None:
    try:
        img = GuestImage.from_dir(d)
    except (OSError, ValueError, KeyError):
        return None
    if all(os.path.exists(p) for p in (img.kernel, img.initrd, img.rootfs)):
        return img
    return None


def locate(cfg) -> GuestImage | None:
    """The current image if present and built from the current recipe (or the configured dir)."""
    if cfg.guest_image_dir:
        return _valid(cfg.guest_image_dir)
    img = _valid(os.path.join(guest_root(cfg), "current"))
    if img is None or img.manifest.get("hash") != content_hash():
        return None
    return img


def _set_current(root: str, name: str) -> None:
    tmp = os.path.join(root, f".current-{os.getpid()}")
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(name, tmp)
    os.replace(tmp, os.path.join(root, "current"))


def build(cfg, force: bool = False, log=print) -> GuestImage:
    """Build (or reuse) the guest image for the current recipe and point `current` at it."""
    root = guest_root(cfg)
    os.makedirs(root, exist_ok=True)
    h = content_hash()
    final = os.path.join(root, h)
    if not force:
        img = _valid(final)
        if img is not None:
            _set_current(root, h)
            log(f"guest image {h} is up to date: {final}")
            return img
    t0 = time.monotonic()
    work = tempfile.mkdtemp(prefix=f".build-{h}-", dir=root)
    try:
        out = os.path.join(work, "out")
        os.makedirs(out)
        manifest = _build_into(work, out, os.path.join(root, "debs"), log)
        manifest.update(hash=h, format=FORMAT, built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        with open(os.path.join(out, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
        if os.path.exists(final):  # force rebuild: move the old one aside first
            old = final + f".old-{os.getpid()}"
            os.rename(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(out, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _set_current(root, h)
    log(f"guest image {h} built in {time.monotonic() - t0:.1f}s: {final}")
    prune(root, keep=KEEP_IMAGES, log=log)
    return GuestImage.from_dir(final)


def prune(root: str, keep: int = 3, log=print) -> None:
    """Remove all but the `keep` newest images (never `current`) and stale build dirs.

    Running VMs are unaffected: qemu has already read the kernel/initrd and keeps the
    root disk open, so unlinking it does not take it away from them.
    """
    try:
        current = os.path.realpath(os.path.join(root, "current"))
        images, now = [], time.time()
        for name in os.listdir(root):
            p = os.path.join(root, name)
            if name.startswith(".build-") and now - os.path.getmtime(p) > 3600:
                shutil.rmtree(p, ignore_errors=True)
            elif os.path.isfile(os.path.join(p, MANIFEST)) and not os.path.islink(p):
                images.append((os.path.getmtime(p), p))
        images.sort(reverse=True)
        for _, p in images[keep:]:
            if p != current:
                log(f"removing old guest image {p}")
                shutil.rmtree(p, ignore_errors=True)
    except OSError as e:
        log(f"pruning old guest images failed: {e}")


def _build_into(work: str, out: str, deb_cache: str, log) -> dict:
    root_pkgs = debs.read_list(os.path.join(FILES, "packages-root.txt"))
    initrd_pkgs = debs.read_list(os.path.join(FILES, "packages-initramfs.txt"))
    kpkg = debs.kernel_package(log)
    log(f"resolving {len(root_pkgs) + len(initrd_pkgs) + 1} packages (kernel {kpkg})")
    names = list(dict.fromkeys([kpkg, *root_pkgs, *initrd_pkgs]))
    resolved = debs.resolve(names, log)
    paths = debs.download(list(resolved.values()), deb_cache, log)

    log("unpacking kernel")
    ktree = os.path.join(work, "kernel")
    debs.extract(paths[kpkg], ktree)
    release = kernel.kernel_release(ktree)
    kernel.extract_vmlinux(kernel.bzimage_path(ktree, release), os.path.join(out, "vmlinux"))
    deps = kernel.module_deps(ktree, release)
    root_mods = debs.read_list(os.path.join(FILES, "modules-root.txt"))
    late_mods = debs.read_list(os.path.join(FILES, "modules-late.txt"))
    root_order = kernel.load_order(root_mods, deps)
    loaded = {kernel._mod_name(p) for p in root_order}
    late_order = kernel.load_order(late_mods, deps, skip=loaded)
    ondemand = kernel.select(debs.read_list(os.path.join(FILES, "modules-ondemand.txt")), deps)
    # the root's module tree: the late modules and the on-demand set with all their deps
    # (root ones too, so modules.dep is whole; modprobe skips what is already loaded)
    tree_order = kernel.load_order(late_mods + ondemand, deps)

    log(f"building initramfs ({len(root_order)} modules)")
    itree = os.path.join(work, "initrd")
    for pkg in initrd_pkgs:
        debs.extract(paths[pkg], os.path.join(work, "initrd-debs"))
    os.makedirs(os.path.join(itree, "bin"))
    shutil.copy2(os.path.join(work, "initrd-debs", "bin", "busybox"), os.path.join(itree, "bin", "busybox"))
    _busybox_links(itree, "bin/busybox", ["bin"])
    for d in ("proc", "sys", "dev", "sysroot"):
        os.makedirs(os.path.join(itree, d))
    shutil.copy2(os.path.join(FILES, "init"), os.path.join(itree, "init"))
    os.chmod(os.path.join(itree, "init"), 0o755)
    mnames = kernel.copy_modules(ktree, release, root_order, os.path.join(itree, "lib", "modules"))
    with open(os.path.join(itree, "lib", "modules", "root.order"), "w") as f:
        f.write("".join(n + "\n" for n in mnames))
    _cpio(itree, os.path.join(out, "initrd.cpio"))

    log(f"building erofs root ({len(root_pkgs)} packages)")
    rtree = os.path.join(work, "root")
    for pkg in root_pkgs:
        debs.extract(paths[pkg], rtree)
    _trim(rtree)
    _busybox_links(rtree, "bin/busybox", ["bin", "sbin", "usr/bin", "usr/sbin"])
    os.symlink("python3.11", os.path.join(rtree, "usr", "bin", "python3"))
    log(f"module tree: {len(tree_order)} modules, {len(late_order)} loaded at boot")
    kernel.install_tree(ktree, release, tree_order, rtree, work,
                        xz=set(tree_order) - set(late_order))
    # the agent insmods these (uncompressed, busybox) while paramiko imports
    with open(os.path.join(rtree, "lib", "modules", LATE_ORDER), "w") as f:
        f.write("".join(f"/lib/modules/{release}/{p.removesuffix('.xz')}\n" for p in late_order))
    _install_agent(rtree)
    _etc_and_mountpoints(rtree)
    _compile_pyc(rtree, log)
    _mkfs_erofs(rtree, os.path.join(out, "rootfs.erofs"), log)

    return {
        "kernel_release": release,
        "kernel_package": kpkg,
        "packages": {n: d.version for n, d in sorted(resolved.items())},
        "modules_root": [kernel._mod_name(p) for p in root_order],
        "modules_late": [kernel._mod_name(p) for p in late_order],
        "modules_tree": sorted(kernel._mod_name(p) for p in tree_order),
        "cmdline": BASE_CMDLINE,
        "erofs_compression": EROFS_COMPRESSION,
        "agent_port": "vmcri.agent",
        "root_disk_serial": "vmcri-root",
        "files": {"kernel": "vmlinux", "initrd": "initrd.cpio", "rootfs": "rootfs.erofs"},
        "sizes": {n: os.path.getsize(os.path.join(out, n)) for n in ("vmlinux", "initrd.cpio", "rootfs.erofs")},
    }


def _busybox_links(tree: str, busybox_rel: str, dirs: list[str]) -> None:
    """Symlink every busybox applet into the first of `dirs`, unless a real file has the name."""
    r = subprocess.run([os.path.join(tree, busybox_rel), "--list"], capture_output=True, text=True)
    if r.returncode != 0:
        raise BuildError(f"busybox --list failed: {r.stderr.strip()}")
    target = "/" + busybox_rel
    for applet in r.stdout.split():
        if applet == "busybox" or "/" in applet:
            continue
        if any(os.path.lexists(os.path.join(tree, d, applet)) for d in dirs):
            continue
        os.makedirs(os.path.join(tree, dirs[0]), exist_ok=True)
        os.symlink(target, os.path.join(tree, dirs[0], applet))


def _trim(tree: str) -> None:
    for rel in TRIM:
        p = os.path.join(tree, rel)
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.unlink(p)
    for rel in TRIM_PY:
        p = os.path.join(tree, "usr", "lib", "python3.11", rel)
        if os.path.isdir(p):
            shutil.rmtree(p)


def _install_agent(tree: str) -> None:
    dest = os.path.join(tree, "usr", "lib", "python3.11", AGENT_PACKAGE)
    os.makedirs(dest)
    for fn in sorted(os.listdir(AGENT_DIR)):
        if fn.endswith(".py"):
            shutil.copy2(os.path.join(AGENT_DIR, fn), os.path.join(dest, fn))


def _etc_and_mountpoints(tree: str) -> None:
    # The root is read-only: the files the host may rewrite live on tmpfs /run (write_etc).
    etc = os.path.join(tree, "etc")
    os.makedirs(etc, exist_ok=True)
    for name in ("hostname", "hosts", "resolv.conf"):
        p = os.path.join(etc, name)
        if os.path.lexists(p):
            os.unlink(p)
        os.symlink(f"/run/vmcri/etc/{name}", p)
    with open(os.path.join(etc, "passwd"), "w") as f:
        f.write("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
    with open(os.path.join(etc, "group"), "w") as f:
        f.write("root:x:0:\nnogroup:x:65534:\n")
    for d in ("proc", "sys", "dev", "run", "tmp", "mnt", "root", "var", "sysroot"):
        os.makedirs(os.path.join(tree, d), exist_ok=True)


def _compile_pyc(tree: str, log) -> None:
    ld = os.path.join(tree, "lib64", "ld-linux-x86-64.so.2")
    libpath = ":".join(os.path.join(tree, p) for p in ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu"))
    dirs = [os.path.join(tree, "usr", "lib", "python3.11"), os.path.join(tree, "usr", "lib", "python3", "dist-packages")]
    env = {"PYTHONHOME": os.path.join(tree, "usr"), "PATH": "/usr/bin:/bin", "LC_ALL": "C"}
    r = subprocess.run([ld, "--library-path", libpath, os.path.join(tree, "usr", "bin", "python3.11"),
                        "-m", "compileall", "-q", "-j", "0", "--invalidation-mode", "unchecked-hash", "-s", tree, "-p", "/", *dirs],
                       capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise BuildError(f"compileall with the guest interpreter failed: {(r.stdout + r.stderr)[-1500:]}")


def _cpio(tree: str, out: str) -> None:
    names = []
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames.sort()
        rel = os.path.relpath(dirpath, tree)
        for n in sorted(dirnames + filenames):
            names.append(n if rel == "." else f"{rel}/{n}")
    with open(out, "wb") as f:
        r = subprocess.run(["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"], cwd=tree,
                           input=("\n".join(names) + "\n").encode(), stdout=f, stderr=subprocess.PIPE)
    if r.returncode != 0:
        raise BuildError(f"cpio failed: {r.stderr.decode(errors='replace').strip()}")


def _mkfs_erofs(tree: str, out: str, log) -> None:
    argv = ["mkfs.erofs", "-T0", "--all-root"]
    if EROFS_COMPRESSION and EROFS_COMPRESSION != "none":
        argv.append(f"-z{EROFS_COMPRESSION}")
    r = subprocess.run([*argv, out, tree], capture_output=True, text=True)
    if r.returncode != 0:
        raise BuildError(f"mkfs.erofs failed: {r.stderr.strip()[-800:]}")
