"""A zstd-layered OCI image pushed to the tests' real registry (skopeo copies the
compressed blobs as they are)."""
from __future__ import annotations

import hashlib
import json
import os

import zstandard

from tests.support.fx_registry import (BASE_CONFIG, _init_layout, _put_blob, build_layer,
                                       push_layout, set_layout_index)

ZSTD_LAYER = "application/vnd.oci.image.layer.v1.tar+zstd"


def zstd_frames(data: bytes, frame_size: int = 1 << 16) -> bytes:
    """Several concatenated frames, as zstd:chunked and parallel encoders write them."""
    cctx = zstandard.ZstdCompressor(level=3)
    return b"".join(cctx.compress(data[i:i + frame_size])
                    for i in range(0, max(len(data), 1), frame_size))


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def push_zstd_image(layout: str, registry: str, base_layer: bytes, name: str = "zstd") -> dict:
    """busybox base + a marker layer, both tar+zstd; returns ref, digest, image_id, diff_ids."""
    _init_layout(layout)
    marker = build_layer([("file", "etc/vmcri-zstd", b"unpacked from zstd\n")])
    layers, diff_ids = [], []
    for tar_bytes in (base_layer, marker):
        blob = zstd_frames(tar_bytes)
        layers.append({"mediaType": ZSTD_LAYER, "digest": _put_blob(layout, blob),
                       "size": len(blob)})
        diff_ids.append(_digest(tar_bytes))
    cfg = {"architecture": "amd64", "os": "linux", "config": {**BASE_CONFIG, "User": "root"},
           "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    cfg_bytes = json.dumps(cfg, sort_keys=True).encode()
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": _put_blob(layout, cfg_bytes), "size": len(cfg_bytes)},
                "layers": layers}
    m_bytes = json.dumps(manifest, sort_keys=True).encode()
    set_layout_index(layout, name, [{"mediaType": manifest["mediaType"],
                                     "digest": _put_blob(layout, m_bytes), "size": len(m_bytes)}])
    repo = f"{registry}/vmcri-test/{name}"
    digest, served = push_layout(layout, name, f"{repo}:1.0")
    assert [layer["mediaType"] for layer in served["layers"]] == [ZSTD_LAYER, ZSTD_LAYER]
    return {"ref": f"{repo}:1.0", "repo": repo, "digest": digest,
            "image_id": manifest["config"]["digest"], "diff_ids": diff_ids,
            "layout": os.path.abspath(layout)}
