"""The process identity of an exec, derived on the host as at CreateContainer.

The spec builder runs again on the stored CRI config, the pod's stored config and the
image config; /etc/passwd and /etc/group come from the image's unpacked layers (host-only
dirs), never from the container's rootfs or bundle, which the guest can write.
"""
from __future__ import annotations

import os
import stat

from cri_api.v1 import api_pb2

from vmcri.container import ocispec_process, safepath
from vmcri.image.unpack import OPAQUE_XATTR

MAX_ID_FILE_BYTES = ocispec_process.MAX_ID_FILE_BYTES


def _opaque(path: str) -> bool:
    try:
        return os.getxattr(path, OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


def read_from_layers(layer_dirs: list[str], path: str) -> bytes | None:
    """A file as the image's overlay shows it: the topmost layer that has it, unless a
    whiteout or an opaque dir of a higher layer hides it. Symlinks are not followed."""
    parts = [p for p in path.split("/") if p not in ("", ".", "..")]
    for layer in reversed(layer_dirs):  # top first
        here, hidden, stop = layer, False, False
        for i, part in enumerate(parts):
            here = os.path.join(here, part)
            try:
                st = os.lstat(here)
            except OSError:
                break
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                hidden = True  # a whiteout: lower layers do not show through
                break
            if i < len(parts) - 1:
                if not stat.S_ISDIR(st.st_mode):
                    hidden = True
                    break
                stop = stop or _opaque(here)
            elif stat.S_ISREG(st.st_mode):
                return safepath.read_file(layer, path, MAX_ID_FILE_BYTES)
            else:
                return None
        if hidden or stop:
            return None
    return None


def container_process(svc, rec) -> dict:
    """The container's OCI process object, as CreateContainer built it."""
    config = api_pb2.ContainerConfig.FromString(rec.config)
    sandbox_config = api_pb2.PodSandboxConfig.FromString(svc.sandboxes.get(rec.sandbox_id).config)
    image = svc.images.resolve(rec.image_id)
    layers = svc.images.layer_dirs(image)
    return ocispec_process.build_process(config, sandbox_config,
                                         image.raw_config.get("config") or {},
                                         lambda p: read_from_layers(layers, p))
