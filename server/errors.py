"""Transport-free errors. Each class carries one status code; only
`server/protocol/status.py` turns the code into a gRPC status."""

from __future__ import annotations

import enum


class ErrorCode(enum.Enum):
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    CANCELLED = "CANCELLED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNKNOWN = "UNKNOWN"


class NereidError(Exception):
    """Base of every error a client may see; the message is shown to the client as is."""

    code: ErrorCode = ErrorCode.INTERNAL


class InvalidInput(NereidError):
    """The request is malformed or does not fit the model's config."""

    code = ErrorCode.INVALID_ARGUMENT


class ModelNotFound(NereidError):
    """No such model, or no such version of it."""

    code = ErrorCode.NOT_FOUND


class RegionNotFound(NereidError):
    """No shared memory region is registered under that name."""

    code = ErrorCode.NOT_FOUND


class AlreadyExists(NereidError):
    """A name is already taken (a shared memory region registered twice)."""

    code = ErrorCode.ALREADY_EXISTS


class ModelUnavailable(NereidError):
    """The model exists but cannot take requests now (loading, unloading, failed)."""

    code = ErrorCode.UNAVAILABLE


class ServerUnavailable(NereidError):
    """The server is stopping or overloaded (queue full, timeout)."""

    code = ErrorCode.UNAVAILABLE


class Unsupported(NereidError):
    """A feature of the protocol that Nereid does not implement (yet)."""

    code = ErrorCode.UNIMPLEMENTED


class ModelStatusError(NereidError):
    """An error a model returned with a status code of its own (a Python model's TritonError code);
    the message is the model's, unprefixed, as Triton sends it."""

    def __init__(self, message: str, code: ErrorCode) -> None:
        super().__init__(message)
        self.code = code

    def __reduce__(self) -> tuple[type, tuple[str, ErrorCode]]:  # copy/pickle: the code is not in args
        return type(self), (str(self.args[0]) if self.args else "", self.code)


class InternalError(NereidError):
    """The model or the server failed while handling a valid request."""

    code = ErrorCode.INTERNAL


class Cancelled(NereidError):
    """The client gave up on the request before it ran."""

    code = ErrorCode.CANCELLED


class ConfigError(NereidError):
    """A model's configuration or files are invalid; the message names the file."""

    code = ErrorCode.INVALID_ARGUMENT


class ExecutionTimeout(NereidError):
    """The model ran past its execution timeout; the server stopped waiting for it."""

    code = ErrorCode.DEADLINE_EXCEEDED


class Overloaded(NereidError):
    """A limit on load was reached (in-flight cap, a client's rate limit): retry later."""

    code = ErrorCode.RESOURCE_EXHAUSTED
