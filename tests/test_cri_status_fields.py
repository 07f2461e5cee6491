"""Status fields as containerd reports them (unit level; tests/test_cri_kubelet_vm.py has
the same through real pod VMs and a real registry)."""
import types

import pytest
from cri_api.v1 import api_pb2 as pb

from vmcri.container import container_status
from vmcri.container.model import RUNNING, ContainerRecord
from vmcri.errors import NotFound
from vmcri.sandbox import sandbox_status
from vmcri.sandbox.model import CREATING, READY, SandboxRecord

IMAGE_ID = "sha256:" + "c" * 64
MANIFEST = "sha256:" + "d" * 64


def _sandbox(sid: str, state: str) -> SandboxRecord:
    return SandboxRecord(id=sid, name=f"pod-{sid}", namespace="ns", uid="u", attempt=0,
                         state=state, created_ns=1, domain=f"vmcri-{sid}",
                         config=pb.PodSandboxConfig().SerializeToString())


def _sandboxes(*recs):
    by_id = {r.id: r for r in recs}

    def get(sid):
        if sid not in by_id:
            raise NotFound(sid)
        return by_id[sid]
    return types.SimpleNamespace(table=types.SimpleNamespace(all=lambda: list(recs)),
                                 refresh=lambda rec: rec, get=get)


def test_a_creating_sandbox_is_not_listed_and_its_status_is_not_found():
    svc = _sandboxes(_sandbox("ready", READY), _sandbox("booting", CREATING))
    assert [s.id for s in sandbox_status.list_sandboxes(svc, None)] == ["ready"]
    notready = pb.PodSandboxFilter(state=pb.PodSandboxStateValue(state=pb.SANDBOX_NOTREADY))
    assert sandbox_status.list_sandboxes(svc, notready) == []
    with pytest.raises(NotFound, match="still being created"):
        sandbox_status.status(svc, "booting", False)
    assert sandbox_status.status(svc, "ready", False)[0].state == pb.SANDBOX_READY


def _container(image: str) -> ContainerRecord:
    return ContainerRecord(
        id="k" * 64, sandbox_id="s", name="app", attempt=0, state=RUNNING, created_ns=1,
        image=image, image_id=IMAGE_ID,
        config=pb.ContainerConfig(metadata=pb.ContainerMetadata(name="app"),
                                  image=pb.ImageSpec(image=image)).SerializeToString())


def _containers(image):
    images = types.SimpleNamespace(status=lambda ref: image if ref == IMAGE_ID else None)
    return types.SimpleNamespace(images=images)


def test_image_ref_is_the_repo_digest_of_the_asked_for_repository():
    image = types.SimpleNamespace(
        repo_tags=["reg:5000/a/app:1.0", "reg:5000/b/app:2.0"],
        repo_digests=[f"reg:5000/a/app@{MANIFEST}", f"reg:5000/b/app@{MANIFEST}"])
    st = container_status.to_status(_containers(image), _container("reg:5000/b/app:2.0"))
    assert st.image_ref == f"reg:5000/b/app@{MANIFEST}"
    assert st.image_id == IMAGE_ID
    assert st.image.image == "reg:5000/a/app:1.0"  # containerd: the first tag
    assert st.image.user_specified_image == "reg:5000/b/app:2.0"


def test_without_a_repo_digest_image_ref_falls_back_to_the_image_id():
    image = types.SimpleNamespace(repo_tags=[], repo_digests=[])
    st = container_status.to_status(_containers(image), _container(IMAGE_ID))
    assert (st.image_ref, st.image_id, st.image.image) == (IMAGE_ID, IMAGE_ID, IMAGE_ID)
    gone = container_status.to_status(_containers(None), _container("reg/x:1"))
    assert (gone.image_ref, gone.image.image) == (IMAGE_ID, "reg/x:1")
