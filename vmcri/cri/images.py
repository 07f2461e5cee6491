"""ImageService servicer: proto <-> vmcri.image.service.ImageService calls only."""
from __future__ import annotations

from cri_api.v1 import api_pb2 as pb
from cri_api.v1 import api_pb2_grpc as pb_grpc

from vmcri.errors import InvalidArgument
from vmcri.image.service import Image, ImageService

_AUTH_FIELDS = ("username", "password", "auth", "identity_token", "registry_token")


def image_to_proto(image: Image) -> pb.Image:
    msg = pb.Image(id=image.id, repo_tags=image.repo_tags, repo_digests=image.repo_digests,
                   size=image.size, username=image.username, pinned=image.pinned,
                   spec=pb.ImageSpec(image=image.id))
    if image.uid is not None:
        msg.uid.CopyFrom(pb.Int64Value(value=image.uid))
    return msg


def _fs_usage(fs: dict) -> pb.FilesystemUsage:
    return pb.FilesystemUsage(
        timestamp=fs["timestamp_ns"], fs_id=pb.FilesystemIdentifier(mountpoint=fs["mountpoint"]),
        used_bytes=pb.UInt64Value(value=fs["used_bytes"]),
        inodes_used=pb.UInt64Value(value=fs["inodes_used"]))


def _image_field(spec, field: str) -> str:
    name = spec.image if spec is not None else ""
    if not name:
        raise InvalidArgument(f"{field}: image reference must not be empty")
    return name


class ImageServicer(pb_grpc.ImageServiceServicer):
    def __init__(self, images: ImageService):
        self.images = images

    def ListImages(self, request, context):
        ref = request.filter.image.image if request.HasField("filter") else ""
        return pb.ListImagesResponse(images=[image_to_proto(i) for i in self.images.list(ref or None)])

    def ImageStatus(self, request, context):
        image = self.images.status(_image_field(request.image, "image.image"))
        if image is None:
            return pb.ImageStatusResponse()
        info = self.images.verbose_info(image) if request.verbose else {}
        return pb.ImageStatusResponse(image=image_to_proto(image), info=info)

    def PullImage(self, request, context):
        ref = _image_field(request.image, "image.image")
        auth = None
        if request.HasField("auth"):
            auth = {f: getattr(request.auth, f) for f in _AUTH_FIELDS}
        sandbox = request.sandbox_config if request.HasField("sandbox_config") else None
        return pb.PullImageResponse(image_ref=self.images.pull(ref, auth, sandbox))

    def RemoveImage(self, request, context):
        self.images.remove(_image_field(request.image, "image.image"))
        return pb.RemoveImageResponse()

    def ImageFsInfo(self, request, context):
        return pb.ImageFsInfoResponse(
            image_filesystems=[_fs_usage(self.images.fs_info())],
            container_filesystems=[_fs_usage(self.images.writable_fs_info())])


try:  # the integrator's error mapping; plain methods raise vmcri.errors until it exists
    from vmcri.cri.grpc_errors import wrap_all
except ImportError:  # pragma: no cover
    pass
else:
    wrap_all(ImageServicer, pb_grpc.ImageServiceServicer, {})
