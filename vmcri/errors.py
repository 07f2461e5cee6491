"""Service-level errors. The CRI layer maps each to one gRPC status code."""
import grpc


class VmcriError(Exception):
    code = grpc.StatusCode.INTERNAL


class InvalidArgument(VmcriError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(VmcriError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(VmcriError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(VmcriError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(VmcriError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(VmcriError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(VmcriError):
    code = grpc.StatusCode.UNAUTHENTICATED


class Unimplemented(VmcriError):
    code = grpc.StatusCode.UNIMPLEMENTED
