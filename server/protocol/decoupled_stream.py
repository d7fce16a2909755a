"""ModelStreamInfer for decoupled models: every response on the stream as the model sends it.

What goes on the wire follows Triton's server (src/grpc/stream_infer_handler.cc):
- every response carries the parameter `triton_final_response` (bool): true on the one
  that closes its request (responses of non-decoupled models carry it too, always true);
- the final flag sent alone (no response) is written as an empty response (id, model name
  and version, `triton_final_response: true`) only when the request asked for it with the
  parameter `triton_enable_empty_final_response: true`; otherwise nothing is written;
- an error the model sends becomes a response with `error_message` (and the request's id,
  model name and version), and the stream stays open.

`emit` is awaited: it returns once the stream's window has room (servicer.py), so a client
that does not read stops this loop, which stops taking the model's responses, which holds
the model back (server/core/decoupled.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import Any

from tritonclient.grpc import service_pb2 as pb

from server.core.decoupled import stream_responses
from server.core.model import Model
from server.protocol import handlers
from server.protocol.codec import encode_infer_response
from server.protocol.wire import wrap_stream_response
from server.types import InferenceRequest

FINAL_KEY = "triton_final_response"
EMPTY_FINAL_KEY = "triton_enable_empty_final_response"


def _final_parameter(final: bool) -> bytes:
    message = pb.ModelInferResponse()
    message.parameters[FINAL_KEY].bool_param = final
    return message.SerializeToString()  # type: ignore[no-any-return]


# Serialized `parameters { triton_final_response }` fields, appended to a response's pieces.
FINAL_TRUE = _final_parameter(True)
FINAL_FALSE = _final_parameter(False)


async def stream_decoupled(model: Model, request: Any, decoded: InferenceRequest,
                           emit: Callable[[bytes], Awaitable[None]]) -> None:
    """Run `decoded` on a decoupled model, writing each response with `emit` as it comes and
    waiting for it (back-pressure). Cancelled while waiting, the request is cancelled at once
    (`aclosing`: the responses' generator ends here, not whenever it is collected)."""
    empty_final = decoded.parameters.get(EMPTY_FINAL_KEY) is True
    async with aclosing(stream_responses(model, decoded)) as responses:
        async for outputs, error, final in responses:
            if error is not None:
                _, message = handlers.failure("ModelStreamInfer", error)
                await emit(error_response(request, message, final))
            elif outputs is not None:
                parts = encode_infer_response(model, request.id, outputs)
                parts.append(FINAL_TRUE if final else FINAL_FALSE)
                await emit(b"".join(wrap_stream_response(parts)))
            elif empty_final:
                await emit(pb.ModelStreamInferResponse(
                    infer_response=_metadata(request, final)).SerializeToString())


def _metadata(request: Any, final: bool) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version,
                                     id=request.id)
    response.parameters[FINAL_KEY].bool_param = final
    return response


def error_response(request: Any, message: str, final: bool) -> bytes:
    return pb.ModelStreamInferResponse(  # type: ignore[no-any-return]
        error_message=message, infer_response=_metadata(request, final)).SerializeToString()
