"""Exec identity is read from the image's layers (host-only dirs), as overlay shows them."""
import os
import stat

import pytest

from vmcri.container.exec_identity import read_from_layers
from vmcri.image.unpack import OPAQUE_XATTR

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="whiteouts need mknod and trusted xattrs")


def layer(tmp_path, name, files):
    root = tmp_path / name
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(0, 0))  # a whiteout
        elif content == "opaque-dir":
            path.mkdir()
            os.setxattr(path, OPAQUE_XATTR, b"y")
        else:
            path.write_text(content)
    return str(root)


@needs_root
def test_topmost_layer_wins_and_whiteouts_hide(tmp_path):
    base = layer(tmp_path, "base", {"etc/passwd": "base\n", "etc/group": "g-base\n",
                                    "etc/gone": "x\n"})
    top = layer(tmp_path, "top", {"etc/passwd": "top\n", "etc/gone": None})
    assert read_from_layers([base, top], "/etc/passwd") == b"top\n"
    assert read_from_layers([base, top], "/etc/group") == b"g-base\n"
    assert read_from_layers([base, top], "/etc/gone") is None
    assert read_from_layers([base, top], "/etc/missing") is None


@needs_root
def test_an_opaque_dir_hides_the_lower_layers(tmp_path):
    base = layer(tmp_path, "base", {"etc/passwd": "base\n", "etc/group": "g\n"})
    top = layer(tmp_path, "top", {"etc": "opaque-dir"})
    (tmp_path / "top" / "etc" / "passwd").write_text("top\n")
    assert read_from_layers([base, top], "/etc/passwd") == b"top\n"
    assert read_from_layers([base, top], "/etc/group") is None


def test_symlinks_in_a_layer_are_not_followed(tmp_path):
    outside = tmp_path / "secret"
    outside.write_text("host secret\n")
    top = tmp_path / "top"
    (top / "etc").mkdir(parents=True)
    (top / "etc" / "passwd").symlink_to(outside)
    assert read_from_layers([str(top)], "/etc/passwd") is None
    (top / "etc" / "group").write_text("g\n")
    assert read_from_layers([str(top)], "/../../etc/group") == b"g\n"
