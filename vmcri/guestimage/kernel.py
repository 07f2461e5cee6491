"""Kernel pieces of the guest image: the uncompressed ELF vmlinux and module closures."""
from __future__ import annotations

import glob
import lzma
import os
import shutil
import subprocess

XZ_MAGIC = b"\xfd7zXZ\x00"


class KernelError(RuntimeError):
    pass


def extract_vmlinux(bzimage: str, out: str) -> None:
    """Write the ELF vmlinux embedded (XZ-compressed) in a bzImage.

    QEMU boots the ELF through PVH; that skips the ~4.5 s in-guest XZ
    decompression under TCG (HOST-NOTES §1).
    """
    with open(bzimage, "rb") as f:
        data = f.read()
    pos = data.find(XZ_MAGIC)
    if pos < 0:
        raise KernelError(f"{bzimage}: no XZ payload (not a Debian generic kernel?)")
    elf = lzma.LZMADecompressor().decompress(data[pos:])
    if elf[:4] != b"\x7fELF":
        raise KernelError(f"{bzimage}: XZ payload is not an ELF image")
    with open(out, "wb") as f:
        f.write(elf)


def kernel_release(tree: str) -> str:
    dirs = sorted(os.listdir(os.path.join(tree, "lib", "modules")))
    if len(dirs) != 1:
        raise KernelError(f"expected one kernel release in {tree}/lib/modules, found {dirs}")
    return dirs[0]


def bzimage_path(tree: str, release: str) -> str:
    p = os.path.join(tree, "boot", f"vmlinuz-{release}")
    if not os.path.exists(p):
        raise KernelError(f"kernel package has no boot/vmlinuz-{release}")
    return p


def module_deps(tree: str, release: str) -> dict[str, tuple[str, list[str]]]:
    """Module name -> (relative path, relative paths of its deps) from a fresh depmod."""
    r = subprocess.run(["depmod", "-b", tree, release], capture_output=True, text=True)
    if r.returncode != 0:
        raise KernelError(f"depmod failed: {r.stderr.strip()}")
    out = {}
    with open(os.path.join(tree, "lib", "modules", release, "modules.dep")) as f:
        for line in f:
            path, _, deps = line.partition(":")
            out[_mod_name(path)] = (path, deps.split())
    return out


def _mod_name(path: str) -> str:
    base = os.path.basename(path)
    for suffix in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def load_order(wanted: list[str], deps: dict[str, tuple[str, list[str]]],
               skip: set[str] = frozenset()) -> list[str]:
    """Relative module paths in an insmod-safe order: each module after its dependencies.

    `wanted` order is kept where dependencies allow (it carries softdeps such as
    crc32c_generic before libcrc32c). Modules in `skip` (already loaded) are left out.
    """
    by_path = {p: n for n, (p, _) in deps.items()}
    order: list[str] = []
    seen = set(skip)

    def visit(name: str, chain: tuple[str, ...]):
        if name in seen:
            return
        if name not in deps:
            raise KernelError(f"module {name!r} is not in this kernel (wanted via {' -> '.join(chain)})")
        seen.add(name)
        path, dlist = deps[name]
        # modules.dep lists deps nearest-first; load the farthest first
        for d in reversed(dlist):
            visit(by_path[d], chain + (name,))
        order.append(path)

    for w in wanted:
        visit(w.replace("-", "_"), (w,))
    return order


def copy_modules(tree: str, release: str, paths: list[str], dest_dir: str) -> list[str]:
    """Copy (decompressing if needed) modules flat into dest_dir; return the file names in order."""
    os.makedirs(dest_dir, exist_ok=True)
    names = []
    base = os.path.join(tree, "lib", "modules", release)
    for rel in paths:
        src = os.path.join(base, rel)
        name = _mod_name(rel) + ".ko"
        dst = os.path.join(dest_dir, name)
        if rel.endswith(".ko.xz"):
            with lzma.open(src) as i, open(dst, "wb") as o:
                shutil.copyfileobj(i, o)
        elif rel.endswith(".ko"):
            shutil.copyfile(src, dst)
        else:
            raise KernelError(f"unsupported module compression: {rel}")
        names.append(name)
    return names


def select(specs: list[str], deps: dict[str, tuple[str, list[str]]]) -> list[str]:
    """Module names for recipe lines: a module name, or a directory of the kernel's module
    tree ending in '/' (e.g. kernel/net/netfilter/) meaning every module below it."""
    names: list[str] = []
    for spec in specs:
        if spec.endswith("/"):
            hits = sorted(n for n, (p, _) in deps.items() if p.startswith(spec))
            if not hits:
                raise KernelError(f"no modules under {spec!r} in this kernel")
            names += hits
        else:
            names.append(spec)
    return list(dict.fromkeys(names))


def install_tree(tree: str, release: str, paths: list[str], dest_root: str, work: str,
                 xz: set[str] = frozenset()) -> str:
    """Copy modules (uncompressed) into dest_root/lib/modules/<release>/ at their own paths,
    with the kernel's modules.builtin*, and run depmod there; returns that directory.
    Paths in `xz` are stored as .ko.xz (kmod decompresses them; 3 MB instead of 5.5 in the
    erofs): the modules busybox insmod loads at every boot must stay in `paths` without.

    The result is what modprobe expects on any node: modules.dep(.bin), modules.alias(.bin),
    modules.softdep, modules.devname..., so the kernel's request_module() -> /sbin/modprobe
    finds modules by alias (rtnl-link-bridge, nft-chain-2-nat, xt_REDIRECT, ...).
    """
    src_base = os.path.join(tree, "lib", "modules", release)
    dest = os.path.join(dest_root, "lib", "modules", release)
    os.makedirs(dest, exist_ok=True)
    shipped = []
    for rel in paths:
        ko_rel = rel[:-3] if rel.endswith(".ko.xz") else rel
        if not ko_rel.endswith(".ko"):
            raise KernelError(f"unsupported module compression: {rel}")
        if rel.endswith(".ko.xz"):
            with lzma.open(os.path.join(src_base, rel)) as i:
                data = i.read()
        else:
            with open(os.path.join(src_base, rel), "rb") as i:
                data = i.read()
        out_rel = ko_rel
        if rel in xz:
            out_rel += ".xz"
            # what the kernel's own CONFIG_MODULE_COMPRESS_XZ does: crc32, 1 MiB dictionary
            data = lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32, filters=[
                {"id": lzma.FILTER_LZMA2, "preset": 9, "dict_size": 1 << 20}])
        dst = os.path.join(dest, out_rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with open(dst, "wb") as o:
            o.write(data)
        shipped.append(out_rel)
    for name in ("modules.builtin", "modules.builtin.modinfo"):
        if os.path.exists(os.path.join(src_base, name)):
            shutil.copyfile(os.path.join(src_base, name), os.path.join(dest, name))
    order = []
    try:
        with open(os.path.join(src_base, "modules.order")) as f:
            order = [ln.strip() for ln in f if ln.strip()]
    except OSError:
        pass
    # modules.order names the .ko; depmod wants the names as shipped
    as_shipped = {(p[:-3] if p.endswith(".xz") else p): p for p in shipped}
    ordered = [as_shipped[p] for p in order if p in as_shipped]
    ordered += sorted(set(shipped) - set(ordered))
    with open(os.path.join(dest, "modules.order"), "w") as f:
        f.write("".join(p + "\n" for p in ordered))
    # an empty config dir: the host's /etc/depmod.d must not shape the guest's index
    conf = os.path.join(work, "depmod.d")
    os.makedirs(conf, exist_ok=True)
    r = subprocess.run(["depmod", "-C", conf, "-b", dest_root, release], capture_output=True, text=True)
    if r.returncode != 0 or not os.path.exists(os.path.join(dest, "modules.dep.bin")):
        raise KernelError(f"depmod of the guest module tree failed: {r.stderr.strip()[-800:]}")
    return dest


def find_tree_release(tree: str) -> str:
    for p in glob.glob(os.path.join(tree, "boot", "vmlinuz-*")):
        return os.path.basename(p)[len("vmlinuz-"):]
    return kernel_release(tree)
