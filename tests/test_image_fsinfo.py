"""ImageFsInfo.container_filesystems: the containers' writable layers (overlay upper dirs)."""
import os

from cri_api.v1 import api_pb2 as pb

from vmcri.config import Config
from vmcri.cri.images import ImageServicer
from vmcri.image.service import ImageService
from vmcri.store import Store


def test_container_filesystems_count_the_upper_dirs_and_nothing_a_symlink_points_at(tmp_path):
    cfg = Config(root_dir=str(tmp_path / "root"), run_dir=str(tmp_path / "run"))
    store = Store(cfg.db_path)
    try:
        svc = ImageService(cfg, store)
        servicer = ImageServicer(svc)
        empty = servicer.ImageFsInfo(pb.ImageFsInfoRequest(), None)
        assert [f.fs_id.mountpoint for f in empty.image_filesystems] == [cfg.image_store_dir]
        [fs0] = empty.container_filesystems
        assert fs0.fs_id.mountpoint == cfg.sandboxes_dir and fs0.used_bytes.value == 0

        outside = tmp_path / "outside.bin"
        outside.write_bytes(os.urandom(1 << 20))
        for sb, c, size in (("sb1", "c1", 64 << 10), ("sb1", "c2", 128 << 10), ("sb2", "c3", 8 << 10)):
            upper = tmp_path / "root" / "sandboxes" / sb / "containers" / c / "upper"
            (upper / "etc").mkdir(parents=True)
            (upper / "etc" / "written").write_bytes(os.urandom(size))
            os.symlink(outside, upper / "link")
        # the share (rootfs mount points, bundles) is not a writable layer
        share = tmp_path / "root" / "sandboxes" / "sb1" / "share"
        share.mkdir()
        (share / "big").write_bytes(os.urandom(1 << 20))
        svc._writable_usage = None  # the cache is by time; this test does not wait it out
        [fs] = servicer.ImageFsInfo(pb.ImageFsInfoRequest(), None).container_filesystems
        assert fs.fs_id.mountpoint == cfg.sandboxes_dir
        # 3 uppers, each: upper, etc, etc/written, link
        assert fs.inodes_used.value == 12
        assert 200 << 10 <= fs.used_bytes.value < 1 << 20  # neither the link target nor share/big
        assert fs.timestamp > 0
    finally:
        store.close()
