"""CRI v1alpha2 on the same socket as v1, for kubelets 1.20-1.25.

The two versions share every field number and enum value (v1alpha2 is a subset of v1;
tests/test_cri_v1alpha2.py checks that on the stubs we ship), so a v1alpha2 request is
parsed as the v1 message of the same name, served by the same v1 handler, and its v1
reply serialised as is: a v1alpha2 client reads it as its own message, skipping the
fields v1 added. Only Version differs: it names the API version the caller speaks."""
from __future__ import annotations

import grpc
from cri_api.v1 import api_pb2 as v1
from cri_api.v1alpha2 import api_pb2 as v1alpha2

API_VERSION = "v1alpha2"
_SERVICES = ("RuntimeService", "ImageService")


def _unimplemented(service: str, name: str):
    def method(request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED,
                      f"{service}.{name} has no CRI v1 counterpart in vmcri; use CRI v1")
    return method


def _handlers(service: str, servicer) -> dict:
    handlers = {}
    for method in v1alpha2.DESCRIPTOR.services_by_name[service].methods:
        request = getattr(v1, method.input_type.name, None)
        reply = getattr(v1, method.output_type.name, None)
        behaviour = getattr(servicer, method.name, None)
        if request is None or reply is None or behaviour is None or method.server_streaming:
            # raw bytes in and out: nothing to parse for an answer that is always an error
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _unimplemented(service, method.name))
            continue
        if method.name == "Version":
            behaviour = _version(behaviour)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            behaviour, request_deserializer=request.FromString,
            response_serializer=reply.SerializeToString)
    return handlers


def _version(v1_version):
    def version(request, context):
        reply = v1_version(request, context)
        reply.runtime_api_version = API_VERSION
        return reply
    return version


def add_to_server(server: grpc.Server, runtime_servicer, image_servicer) -> None:
    """Serve runtime.v1alpha2.RuntimeService and ImageService with the v1 servicers."""
    for service, servicer in zip(_SERVICES, (runtime_servicer, image_servicer)):
        full = v1alpha2.DESCRIPTOR.services_by_name[service].full_name
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(full, _handlers(service, servicer)),))
