"""ImageService through a real docker-registry: pull, list, status, remove, fs info."""
import json
import os

import pytest

from vmcri.config import Config
from vmcri.image.service import ImageService
from vmcri.store import Store

pytestmark = pytest.mark.registry


@pytest.fixture
def cfg(tmp_path):
    return Config(root_dir=str(tmp_path / "root"), run_dir=str(tmp_path / "run"))


@pytest.fixture
def svc(cfg):
    store = Store(cfg.db_path)
    yield ImageService(cfg, store)
    store.close()


def test_pull_by_tag_gives_image_id_and_config(svc, test_images):
    img = test_images.single
    image_id = svc.pull(img.ref)
    assert image_id == img.image_id
    got = svc.resolve(img.ref)
    assert got.repo_tags == [img.ref]
    assert got.repo_digests == [img.digest_ref]
    assert got.layers == img.diff_ids
    assert got.config.entrypoint == ["/bin/sh", "-c"]
    assert got.config.working_dir == "/work"
    assert got.config.stop_signal == "SIGTERM"
    assert got.uid == 1000 and got.username == ""
    assert got.size > 100_000
    (layer,) = svc.layer_dirs(got)
    assert os.access(os.path.join(layer, "bin/busybox"), os.X_OK)
    assert os.readlink(os.path.join(layer, "bin/sh")) == "busybox"
