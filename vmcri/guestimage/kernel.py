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


def find_tree_release(tree: str) -> str:
    for p in glob.glob(os.path.join(tree, "boot", "vmlinuz-*")):
        return os.path.basename(p)[len("vmlinuz-"):]
    return kernel_release(tree)
