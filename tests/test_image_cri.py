"""The CRI ImageService over real gRPC on a unix socket, against the real registry."""
import json

import grpc
import pytest
from cri_api.v1 import api_pb2 as pb
from cri_api.v1 import api_pb2_grpc as pb_grpc

from vmcri.config import Config
from vmcri.cri.images import ImageServicer
from vmcri.image.service import ImageService
from vmcri.store import Store

pytestmark = pytest.mark.registry


@pytest.fixture
def stub(tmp_path):
    cfg = Config(root_dir=str(tmp_path / "root"), run_dir=str(tmp_path / "run"))
    store = Store(cfg.db_path)
    server = grpc.server(__import__("concurrent.futures").futures.ThreadPoolExecutor(4))
    pb_grpc.add_ImageServiceServicer_to_server(ImageServicer(ImageService(cfg, store)), server)
    sock = f"unix://{tmp_path}/cri.sock"
    server.add_insecure_port(sock)
    server.start()
    channel = grpc.insecure_channel(sock)
    yield pb_grpc.ImageServiceStub(channel)
    channel.close()
    server.stop(0)
    store.close()


def spec(ref):
    return pb.ImageSpec(image=ref)


def test_cri_image_lifecycle(stub, test_images):
    img = test_images.multi
    fs0 = stub.ImageFsInfo(pb.ImageFsInfoRequest()).image_filesystems[0]
    reply = stub.PullImage(pb.PullImageRequest(image=spec(img.ref)))
    assert reply.image_ref == img.image_id

    (listed,) = stub.ListImages(pb.ListImagesRequest()).images
    assert listed.id == img.image_id and list(listed.repo_tags) == [img.ref]
    assert listed.username == "root" and not listed.HasField("uid") and listed.size > 0
    flt = pb.ImageFilter(image=spec(img.digest_ref))
    assert [i.id for i in stub.ListImages(pb.ListImagesRequest(filter=flt)).images] == [img.image_id]

    st = stub.ImageStatus(pb.ImageStatusRequest(image=spec(img.image_id), verbose=True))
    assert list(st.image.repo_digests) == [img.digest_ref]
    info = json.loads(st.info["info"])
    assert info["layers"] == img.diff_ids and info["chainID"]

    fs1 = stub.ImageFsInfo(pb.ImageFsInfoRequest()).image_filesystems[0]
    assert fs1.fs_id.mountpoint == fs0.fs_id.mountpoint
    assert fs1.used_bytes.value > fs0.used_bytes.value
    assert fs1.inodes_used.value > fs0.inodes_used.value

    stub.RemoveImage(pb.RemoveImageRequest(image=spec(img.ref)))
    stub.RemoveImage(pb.RemoveImageRequest(image=spec(img.ref)))  # idempotent
    assert stub.ListImages(pb.ListImagesRequest()).images == []
    missing = stub.ImageStatus(pb.ImageStatusRequest(image=spec(img.ref)))
    assert not missing.HasField("image")  # unknown image: empty answer, not an error


def test_cri_pull_with_uid_image(stub, test_images):
    stub.PullImage(pb.PullImageRequest(image=spec(test_images.single.ref)))
    st = stub.ImageStatus(pb.ImageStatusRequest(image=spec(test_images.single.ref)))
    assert st.image.uid.value == 1000 and st.image.username == ""


def test_cri_errors_carry_codes_and_names(stub, test_images):
    with pytest.raises(grpc.RpcError) as e:
        stub.PullImage(pb.PullImageRequest(image=spec("Not A/Valid::ref")))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Not A/Valid::ref" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.PullImage(pb.PullImageRequest(image=spec("")))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "image.image" in e.value.details()
    ref = f"{test_images.registry}/vmcri-test/absent:1"
    with pytest.raises(grpc.RpcError) as e:
        stub.PullImage(pb.PullImageRequest(image=spec(ref)))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "vmcri-test/absent" in e.value.details()
