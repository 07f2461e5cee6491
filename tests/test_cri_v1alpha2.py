"""CRI v1alpha2 is served by the v1 handlers: that is sound only while every v1alpha2
message is a field-for-field subset of its v1 namesake, which the stubs we ship are."""
import grpc
import pytest
from cri_api.v1 import api_pb2 as v1
from cri_api.v1alpha2 import api_pb2 as v1alpha2
from cri_api.v1alpha2 import api_pb2_grpc as v1alpha2_grpc

from vmcri.cri import v1alpha2 as shim


def _messages(fd):
    out = {}

    def walk(m, prefix):
        out[prefix + m.name] = m
        for nested in m.nested_types:
            walk(nested, f"{prefix}{m.name}.")
    for m in fd.message_types_by_name.values():
        walk(m, "")
    return out


def _enums(fd, messages):
    out = {e.name: e for e in fd.enum_types_by_name.values()}
    for name, m in messages.items():
        out.update({f"{name}.{e.name}": e for e in m.enum_types})
    return out


def test_every_v1alpha2_field_and_enum_value_means_the_same_in_v1():
    new, old = _messages(v1.DESCRIPTOR), _messages(v1alpha2.DESCRIPTOR)
    problems = []
    for name, m in old.items():
        if name not in new:
            problems.append(f"message {name} is not in v1")
            continue
        by_number = {f.number: f for f in new[name].fields}
        for f in m.fields:
            g = by_number.get(f.number)
            if g is None or (g.name, g.type, g.is_repeated) != (f.name, f.type, f.is_repeated):
                problems.append(f"{name}.{f.name} (#{f.number}) differs in v1")
            elif f.message_type is not None and f.message_type.name != g.message_type.name:
                problems.append(f"{name}.{f.name} carries {f.message_type.name} vs {g.message_type.name}")
    new_enums = _enums(v1.DESCRIPTOR, new)
    for name, e in _enums(v1alpha2.DESCRIPTOR, old).items():
        values = {v.number: v.name for v in new_enums[name].values} if name in new_enums else {}
        problems += [f"enum {name}.{v.name} is {values.get(v.number)!r} in v1"
                     for v in e.values if values.get(v.number) != v.name]
    assert problems == []


def test_every_v1alpha2_rpc_has_a_unary_v1_twin():
    for service in ("RuntimeService", "ImageService"):
        twins = v1.DESCRIPTOR.services_by_name[service].methods_by_name
        for m in v1alpha2.DESCRIPTOR.services_by_name[service].methods:
            assert m.name in twins and not twins[m.name].server_streaming, m.name


class _Servicer:
    def Version(self, request, context):
        assert isinstance(request, v1.VersionRequest)
        return v1.VersionResponse(version="0.1.0", runtime_name="vmcri", runtime_api_version="v1")

    def ListPodSandbox(self, request, context):
        assert isinstance(request, v1.ListPodSandboxRequest)
        assert request.filter.label_selector == {"app": "a"}
        return v1.ListPodSandboxResponse(items=[v1.PodSandbox(
            id="abc", state=v1.PodSandboxState.SANDBOX_READY, runtime_handler="vmcri",
            metadata=v1.PodSandboxMetadata(name="p", namespace="n", uid="u", attempt=2))])


@pytest.fixture
def channel(tmp_path):
    from concurrent import futures
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    shim.add_to_server(server, _Servicer(), object())  # an image servicer with no RPCs
    sock = f"unix://{tmp_path}/a2.sock"
    server.add_insecure_port(sock)
    server.start()
    ch = grpc.insecure_channel(sock)
    yield ch
    ch.close()
    server.stop(None)


def test_requests_reach_the_v1_handler_and_replies_read_as_v1alpha2(channel):
    stub = v1alpha2_grpc.RuntimeServiceStub(channel)
    assert stub.Version(v1alpha2.VersionRequest()).runtime_api_version == "v1alpha2"
    reply = stub.ListPodSandbox(v1alpha2.ListPodSandboxRequest(
        filter=v1alpha2.PodSandboxFilter(label_selector={"app": "a"})))
    [item] = reply.items
    assert (item.id, item.state, item.runtime_handler, item.metadata.attempt) == \
        ("abc", v1alpha2.PodSandboxState.SANDBOX_READY, "vmcri", 2)


def test_an_rpc_the_servicer_lacks_is_unimplemented_with_a_message(channel):
    with pytest.raises(grpc.RpcError) as e:
        v1alpha2_grpc.ImageServiceStub(channel).ListImages(v1alpha2.ListImagesRequest())
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "ImageService.ListImages" in e.value.details()
